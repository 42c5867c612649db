"""The data a checkpoint was trained on, rebuilt for evaluation: its DataModule and the loader of one split."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

LOADERS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}


@dataclass(frozen=True)
class RunData:
    """A run's ``data`` config node (``module.run_config["data"]``), built into a DataModule only when asked for,
    at ``batch_size`` and with ``overrides`` (e.g. ``data_dir``, ``num_workers``) merged in."""

    config: Mapping[str, Any]
    batch_size: int
    overrides: Mapping[str, Any] | None = None

    def datamodule(self) -> Any:
        node = OmegaConf.merge(OmegaConf.create(self.config), self.overrides or {})
        node.batch_size = self.batch_size
        return instantiate(node)

    def loader(self, split: str) -> Any:
        return split_loader(self.datamodule(), split)


class ModelBatches:
    """A loader whose batches are made ``(x, y)`` (unflipped, in [-1, 1]) by ``to_model_batch``: what the
    ``on_after_batch_transfer`` of a uint8-image DataModule does for the Trainer (src/data/uint8_images.py)."""

    def __init__(self, loader: Any, to_model_batch: Any) -> None:
        self.loader, self.to_model_batch = loader, to_model_batch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.to_model_batch(batch, train=False)


def split_loader(datamodule: Any, split: str) -> Any:
    """The ``train``, ``val`` or ``test`` loader of ``datamodule``, after preparing and setting it up, yielding
    ``(x, y)`` batches."""
    if split not in LOADERS:
        raise ValueError(f"split must be one of {', '.join(LOADERS)}, got {split!r}")
    datamodule.prepare_data()
    datamodule.setup("fit" if split != "test" else "test")
    loader = getattr(datamodule, LOADERS[split])()
    to_model_batch = getattr(datamodule, "to_model_batch", None)
    return loader if to_model_batch is None else ModelBatches(loader, to_model_batch)
