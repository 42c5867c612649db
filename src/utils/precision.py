"""Which precision the network runs in while sampling: fp32, bf16 autocast, or auto."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from src.utils.device import has_fast_bf16

PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device runs it natively, else ``fp32``; checks the name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)} (auto: bf16 where the "
                         "device runs it natively, else fp32)")
    if precision == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return precision


@contextlib.contextmanager
def network_precision(precision: str, device: torch.device) -> Iterator[str]:
    """Run the enclosed network calls in ``precision`` (bf16: autocast; the diffusion math stays float32,
    since every model output is cast back to x_t's dtype). Yields the resolved name."""
    resolved = resolve_precision(precision, device)
    if resolved == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield resolved
    else:
        yield resolved
