"""One benchmark run: the sizes and precision settings from the config, then every (setting, task) timed."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from src.utils.device import has_fast_bf16, resolve_device

from .report import (
    TASKS,
    Measurement,
    count_params,
    forward_flops_per_image,
    levers_used,
    make_record,
    peak_for,
)
from .sides import Side, build_sides
from .timing import cpu_train_peaks, time_interleaved

log = logging.getLogger(__name__)

# (full, quick) values of the settings left null in configs/bench.yaml
SIZES: dict[str, tuple[int, int]] = {
    "batch_size": (128, 4),
    "repeats": (5, 2),
    "warmup": (2, 1),
    "sample_steps": (1000, 10),
    "ddim_steps": (50, 5),
    "dpmpp_steps": (10, 3),
    "train_steps": (2, 1),
}


def resolve_sizes(cfg: DictConfig) -> dict[str, int]:
    """The null size settings take their full value, or the quick one with ``quick=true``."""
    quick = bool(cfg.get("quick", False))
    out = {}
    for key, (full, small) in SIZES.items():
        value = cfg.get(key)
        out[key] = int(value) if value is not None else (small if quick else full)
        if out[key] < (0 if key == "warmup" else 1):
            raise ValueError(f"{key} must be >= {0 if key == 'warmup' else 1}, got {out[key]}")
    return out


def bf16_autocast_works(device: torch.device) -> bool:
    """True when a conv + GroupNorm + matmul actually run under bf16 autocast on this device (natively or not)."""
    if device.type == "cuda":
        return has_fast_bf16(device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            x = torch.randn(1, 4, 8, 8, device=device)
            y = nn.Conv2d(4, 4, 3, padding=1).to(device)(x)
            y = F.group_norm(y, 2) @ torch.randn(8, 8, device=device)
        return y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())
    except Exception as err:  # noqa: BLE001 - any failure means "not supported here"
        log.info("bf16 autocast not usable on %s: %s", device, err)
        return False


def resolve_precisions(cfg: DictConfig, device: torch.device) -> dict[str, dict[str, Any]]:
    """{setting: {"ours": precision, "peer": precision, "grad_mode": ..., "levers": ours with its speed levers}}."""
    bf16_ok = bf16_autocast_works(device)
    same = str(cfg.precision)
    if same == "auto":
        same = "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if same not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    if same == "bf16" and not bf16_ok:
        raise ValueError(f"precision=bf16: bf16 autocast does not run on {device}")
    ours_default = str(cfg.get("defaults_precision", "auto"))
    if ours_default == "auto":  # as src.sample's precision=auto: bf16 only where the device runs it natively
        ours_default = "bf16" if has_fast_bf16(device) else "fp32"
    if ours_default not in ("fp32", "bf16"):
        raise ValueError(f"defaults_precision must be auto, fp32 or bf16, got {cfg.defaults_precision!r}")
    return {
        "same_precision": {"ours": same, "peer": same, "grad_mode": "no_grad", "levers": False},
        # ours by default: bf16 autocast where it runs, inference_mode for sampling; peers: fp32 (their examples)
        "defaults": {"ours": ours_default, "peer": "fp32", "grad_mode": "inference_mode", "levers": True},
    }


def checked_names(values: Any, valid: Any, what: str) -> list[str]:
    """``values`` as strings, each one of ``valid``."""
    names = [str(v) for v in values]
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {what} {name!r}: valid are {', '.join(valid)}")
    return names


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def measure(cfg: DictConfig, sides: list[Side], task: str, setting: str, prec: dict[str, Any], sz: dict[str, int],
            device: torch.device, forward_flops: int | None) -> Measurement:
    """Time ``task`` on every side in interleaved rounds; on a CPU the train task's memory comes from
    ``cpu_train_peaks`` (unless ``cpu_memory=false``)."""
    sides = [s for s in sides if task in s.runs]  # a peer without this sampler sits it out
    times, peak = time_interleaved(sides, task, sz["repeats"], sz["warmup"], device)
    if task == "train" and device.type == "cpu" and bool(cfg.get("cpu_memory", True)):
        peak = cpu_train_peaks(cfg, sz, prec, [s.name for s in sides])
    levers = {s.name: levers_used(s, cfg, bool(prec["levers"]) and s.name == "ours") for s in sides}
    return Measurement(task=task, setting=setting, precision=prec, sizes=sz, image_size=int(cfg.image_size),
                       times=times, peak_mem=peak, params={s.name: count_params(s.model) for s in sides},
                       levers=levers, forward_flops=forward_flops,
                       peak_flops={"ours": peak_for(device, prec["ours"]), "peer": peak_for(device, prec["peer"])})


def bench_setting(cfg: DictConfig, setting: str, prec: dict[str, Any], tasks: list[str], sz: dict[str, int],
                  device: torch.device, skipped: dict[str, str]) -> list[dict[str, Any]]:
    """Every task of one setting: one record per peer that ran, or one of ours alone when none did."""
    sides = build_sides(cfg, sz, device, prec, skipped)
    fwd = forward_flops_per_image(sides[0].model, int(cfg.in_channels), int(cfg.image_size), device)
    log.info("[%s] params %s; our forward %s FLOPs/image", setting, {s.name: count_params(s.model) for s in sides},
             fwd)
    name, peers = device_name(device), [s.name for s in sides[1:]]
    records = []
    for task in tasks:
        m = measure(cfg, sides, task, setting, prec, sz, device, fwd)
        ran = [s.name for s in sides[1:] if task in s.runs]
        records += [make_record(name, sz, peer, m) for peer in ran]
        records += [make_record(name, sz, peer, note=f"{peer} has no {task} run") | {"task": task,
                    "setting": setting} for peer in peers if peer not in ran]
        if not peers:
            records.append(make_record(name, sz, None, m, note="no peer ran"))
        log.info("%s/%s done: %s img/s", setting, task, {n: round(m.rate(n), 3) for n in m.times})
    return records


def bench(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every (setting, task) of ``cfg``, then one record per peer that was skipped."""
    sz = resolve_sizes(cfg)
    device = resolve_device(str(cfg.device))
    precisions = resolve_precisions(cfg, device)
    tasks = checked_names(cfg.tasks, TASKS, "task")
    settings = checked_names(cfg.settings, precisions, "setting")
    log.info("bench on %s, sizes %s, precisions %s", device_name(device), sz, precisions)
    skipped: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for setting in settings:
        records += bench_setting(cfg, setting, precisions[setting], tasks, sz, device, skipped)
    records += [make_record(device_name(device), sz, peer, note=f"skipped: {why}") for peer, why in skipped.items()]
    if device.type != "cuda":
        log.info("peak memory on %s: train only, each side alone in a fresh process (peak RSS during one round "
                 "minus RSS before it, plus its weights and EMA)", device)
    return records
