"""The device a config string names, checked against this machine, and whether it runs bf16 natively."""

from __future__ import annotations

import torch

DEVICE_FORMS = "auto (cuda if available, else cpu), cpu, cuda, cuda:<index>, mps"


def resolve_device(name: str | torch.device, key: str = "device") -> torch.device:
    """``auto`` -> cuda if available, else cpu; ``cpu``, ``cuda``, ``cuda:<index>`` or ``mps`` if this machine has it.

    ValueError naming ``key`` (the config key that gave ``name``) for a malformed string or a missing device,
    instead of the driver error torch raises at the first tensor moved there.
    """
    text = str(name).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"{key}={text!r} is not a device: use one of {DEVICE_FORMS}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={text} but this machine has no CUDA GPU (torch.cuda.is_available() is False): "
                             f"use {key}=auto or {key}=cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{key}={text} but this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                             f"(torch.cuda.device_count() is {count}, indices 0 to {count - 1}): use {key}=cuda, "
                             f"{key}=cuda:<index below {count}> or {key}=auto")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{key}={text} but this machine has no Apple MPS device "
                             f"(torch.backends.mps.is_available() is False): use {key}=auto or {key}=cpu")
    elif device.type != "cpu":
        raise ValueError(f"{key}={text}: this project runs on {DEVICE_FORMS}; not on {device.type}")
    return device


def has_fast_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls and convolutions run natively: CUDA GPUs with bf16 (Ampere on), and CPUs with
    AVX512-BF16 or AMX (elsewhere on a CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False
