"""Data written in the on-disk formats of the real datasets, which cannot be downloaded in tests."""

from __future__ import annotations

from pathlib import Path

from src.data.synthetic import write_cifar10_format


def write_fake_cifar10(root: Path, per_batch: int = 8) -> Path:
    """A tiny ``cifar-10-batches-py`` in the real on-disk format (src/data/synthetic.py)."""
    return write_cifar10_format(root, per_batch)
