"""Speed levers for the backbone and the optimizer: torch.compile, channels-last, fused/foreach Adam.

Each lever changes how the work runs, never what is computed (up to float rounding), and none changes the
checkpoint format: the backbone is compiled and converted in place, so ``state_dict`` keys stay as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn


def check_flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def compile_backbone(net: nn.Module, options: Mapping[str, Any] | None = None) -> None:
    """``torch.compile`` the backbone's ``__call__`` in place (``nn.Module.compile``).

    In place rather than ``torch.compile(net)``: the module stays the same object, so its ``state_dict`` keys
    carry no ``_orig_mod.`` prefix, and deep copies (the EMA callback's) come out uncompiled. ``options`` go to
    ``torch.compile`` as they are (``mode``, ``backend``, ``dynamic``, ...).
    """
    if isinstance(options, DictConfig):
        options = OmegaConf.to_container(options, resolve=True)
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"module.compile_options must be a mapping of torch.compile arguments, got {options!r}")
    net.compile(**dict(options or {}))


def _inputs_to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x, *rest = args
    if isinstance(x, Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *rest)
    return None


def use_channels_last(net: nn.Module) -> bool:
    """Store the 4-D weights of a conv net in ``torch.channels_last`` and convert its 4-D inputs on the way in.

    Returns False, changing nothing, for a backbone without 4-D weights (the MLP). The memory layout survives
    ``.to(device)``, ``load_state_dict`` and the EMA swaps (all copy into the existing tensors); the keys and
    values of the ``state_dict`` are unchanged.
    """
    if not any(p.dim() == 4 for p in net.parameters()):
        return False
    net.to(memory_format=torch.channels_last)
    net.register_forward_pre_hook(_inputs_to_channels_last)
    return True


def choose_fused_foreach(fused: bool | None, foreach: bool | None, fused_by_default: bool) -> tuple[bool, bool]:
    """Fill the unset (None) of the optimizer's ``fused`` / ``foreach`` flags.

    Both unset: fused where ``fused_by_default`` (one kernel for the whole update), else foreach (one kernel per
    op over all tensors instead of a Python loop over them). One set: the other follows (foreach unless fused).
    """
    for key, value in (("fused", fused), ("foreach", foreach)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"module.optimizer.{key} must be true, false or null (auto), got {value!r}")
    if fused is None and foreach is None:
        return (True, False) if fused_by_default else (False, True)
    if fused is None:
        fused = fused_by_default and not foreach
    if foreach is None:
        foreach = not fused
    if fused and foreach:
        raise ValueError("module.optimizer.fused and module.optimizer.foreach cannot both be true: pick one, or "
                         "leave both null (fused where torch has the kernels, else foreach)")
    return fused, foreach


def has_fused_kernels(params: list[Tensor]) -> bool:
    """True when every parameter is floating point on one device type that torch has fused optimizer kernels for."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: CUDA has had fused Adam the longest
        supported = {"cuda"}
    device_types = {p.device.type for p in params}
    return (len(device_types) == 1 and device_types <= supported
            and all(p.is_floating_point() for p in params))


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable[Tensor],
                    fused_allowed: bool = True) -> torch.optim.Optimizer:
    """``factory(params=...)`` with its ``fused`` / ``foreach`` flags resolved (see ``choose_fused_foreach``).

    ``factory`` is a Hydra partial (``_partial_: true``). Fused is the default for floating-point parameters
    that all live on one kind of device with fused optimizer kernels (CUDA and CPU among them: a fused Adam step
    of the paper's U-Net ran ~3-5x faster than foreach or the loop on a CPU, benchmarks/NOTES.md), unless
    ``fused_allowed`` is False (Lightning's mixed-precision plugin refuses to clip the gradients of a fused
    optimizer). An optimizer whose constructor takes no such flags gets none, and unset (null) ones in its
    config are dropped.
    """
    params = list(params)
    func = getattr(factory, "func", factory)
    given = dict(getattr(factory, "keywords", None) or {})
    try:
        accepted = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no introspectable signature: call it as configured
        return factory(params=params)
    if "fused" not in accepted or "foreach" not in accepted:
        for key in ("fused", "foreach"):
            if key in given and given.pop(key) is not None:
                raise ValueError(f"module.optimizer.{key} is set, but {getattr(func, '__name__', func)} takes no "
                                 f"{key} argument: set it to null or remove it")
        return func(*getattr(factory, "args", ()), params=params, **given)
    fused, foreach = choose_fused_foreach(given.get("fused"), given.get("foreach"),
                                          has_fused_kernels(params) and fused_allowed)
    if fused and not fused_allowed:
        raise ValueError("module.optimizer.fused=true cannot be used with a mixed trainer.precision (16-mixed, "
                         "bf16-mixed) and trainer.gradient_clip_val > 0: Lightning does not clip the gradients of a "
                         "fused optimizer; set module.optimizer.fused=null (foreach) or trainer.gradient_clip_val=0")
    return factory(params=params, fused=fused, foreach=foreach)
