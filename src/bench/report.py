"""What goes into bench.json: FLOPs, MFU, the levers each side ran with, one record builder, and the log table."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from .sides import Side

log = logging.getLogger(__name__)

# Dense peak FLOP/s by device-name substring (first match wins); fp32 is plain (non-tensor-core) FP32.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.0e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312.0e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.0e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121.0e12, "fp32": 30.3e12}),
]

# the size setting that counts a task's steps (train: optimizer steps per round; sampling: network evaluations)
TASK_STEPS = {"train": "train_steps", "sample_ddpm": "sample_steps", "sample_ddim": "ddim_steps",
              "sample_dpmpp": "dpmpp_steps"}
TASKS = tuple(TASK_STEPS)

# every record has these keys, in this order; null where they do not apply
RECORD_KEYS = ("task", "setting", "peer", "ours", "theirs", "ratio", "ratio_paired", "device", "precision",
               "grad_mode_ours", "batch_size", "image_size", "steps", "params", "flops_per_image",
               "forward_flops_per_image", "mfu", "peak_mem_bytes", "levers", "times_s", "repeats", "warmup", "note")


def peak_for(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops_per_image(model: nn.Module, in_channels: int, image_size: int, device: torch.device) -> int | None:
    """FLOPs of one forward pass of our model for one image (torch.utils.flop_counter; 2 FLOPs per MAC)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        was_training = model.training
        model.eval()
        x = torch.randn(2, in_channels, image_size, image_size, device=device)
        t = torch.zeros(2, dtype=torch.long, device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.forward(x, t)  # not model(...): a compiled __call__ would hide the ops from the counter
        model.train(was_training)
        return int(counter.get_total_flops() // 2)
    except Exception as err:  # noqa: BLE001
        log.warning("FLOP count failed: %s", err)
        return None


def images_per_round(task: str, sz: dict[str, int]) -> int:
    return sz["batch_size"] * (sz["train_steps"] if task == "train" else 1)


def flops_per_image(task: str, fwd: int | None, sz: dict[str, int]) -> int | None:
    if fwd is None:
        return None
    # train: forward + backward = 3 forwards; a sampler: one forward per network evaluation
    return 3 * fwd if task == "train" else sz[TASK_STEPS[task]] * fwd


def levers_used(side: Side, cfg: DictConfig, levers: bool) -> dict[str, Any]:
    """Which speed levers a side ran with (Adam's implementation; ours: compile, channels_last)."""
    defaults = side.optimizer.defaults if side.optimizer is not None else {}
    adam = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "torch default"
    return {"adam": adam, "compile": levers and bool(cfg.get("compile", False)),
            "channels_last": levers and bool(cfg.get("channels_last", False))}


@dataclass
class Measurement:
    """What one (setting, task) measured, per side name ("ours" and the peers that ran)."""

    task: str
    setting: str
    precision: dict[str, Any]  # the setting's {"ours", "peer", "grad_mode", "levers"}
    sizes: dict[str, int]
    image_size: int
    times: dict[str, list[float]]
    peak_mem: dict[str, int | None]
    params: dict[str, int]
    levers: dict[str, dict[str, Any]]
    forward_flops: int | None
    peak_flops: dict[str, float | None]  # the device's peak FLOP/s in the precision of "ours" and of "peer"

    def rate(self, name: str) -> float:
        """Images/s of a side from its median round time."""
        return images_per_round(self.task, self.sizes) / statistics.median(self.times[name])

    @property
    def flops_per_image(self) -> int | None:
        return flops_per_image(self.task, self.forward_flops, self.sizes)

    def mfu(self, name: str) -> float | None:
        """Model FLOPs utilisation, counting the peers' FLOPs as ours (the same architecture for diffusers; an
        estimate otherwise)."""
        fpi, peak = self.flops_per_image, self.peak_flops["ours" if name == "ours" else "peer"]
        return fpi * self.rate(name) / peak if (fpi and peak) else None


def make_record(device_name: str, sizes: dict[str, int], peer: str | None, m: Measurement | None = None,
                note: str | None = None) -> dict[str, Any]:
    """One bench.json record: ours against ``peer`` in ``m``, ours alone (``peer`` None), or a peer that did not
    run (``m`` None). Per-side values are {"ours": ..., "theirs": ...} with "theirs" only when a peer ran."""
    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record.update(peer=peer, device=device_name, batch_size=sizes["batch_size"], note=note)
    if m is None:
        return record
    names = {"ours": "ours", **({"theirs": peer} if peer is not None else {})}

    def per_side(values: dict[str, Any] | Callable[[str], Any]) -> dict[str, Any]:
        get = values if callable(values) else values.__getitem__
        return {role: get(name) for role, name in names.items()}

    record.update(
        task=m.task, setting=m.setting, ours=m.rate("ours"), theirs=None if peer is None else m.rate(peer),
        precision={"ours": m.precision["ours"], "theirs": None if peer is None else m.precision["peer"]},
        grad_mode_ours=m.precision["grad_mode"] if m.task != "train" else "train",
        image_size=m.image_size, steps=m.sizes[TASK_STEPS[m.task]], params=per_side(m.params),
        flops_per_image=m.flops_per_image, forward_flops_per_image=m.forward_flops,
        mfu=None if m.mfu("ours") is None else per_side(m.mfu), peak_mem_bytes=per_side(m.peak_mem),
        levers=per_side(m.levers), times_s=per_side(m.times), repeats=m.sizes["repeats"], warmup=m.sizes["warmup"],
    )
    if peer is not None:
        record["ratio"] = record["ours"] / record["theirs"]
        # median over rounds of theirs_time / ours_time, each pair timed back to back: less sensitive to load
        # that drifts between rounds than the ratio of medians
        record["ratio_paired"] = statistics.median(b / a for a, b in zip(m.times["ours"], m.times[peer], strict=True))
    return record


def format_table(records: list[dict[str, Any]]) -> str:
    head = (f"{'task':<12} {'setting':<15} {'peer':<28} {'ours img/s':>11} {'theirs img/s':>13} {'ratio':>7} "
            f"{'peak MiB ours/theirs':>21}")
    lines = [head, "-" * len(head)]
    for r in records:
        def f(v: float | None, w: int) -> str:
            return f"{v:>{w}.3g}" if v is not None else f"{'-':>{w}}"
        task, setting, peer = (str(r[k] if r[k] is not None else "-") for k in ("task", "setting", "peer"))
        mem = [v for v in (r.get("peak_mem_bytes") or {}).values()]
        if not r["task"]:
            mem_text = ""
        elif all(v is None for v in mem):
            mem_text = "n/a"  # CPU sampling, or cpu_memory=false
        else:
            mem_text = "/".join("-" if v is None else f"{v / 2**20:.0f}" for v in mem)
        lines.append(f"{task:<12} {setting:<15} {peer:<28} {f(r['ours'], 11)} "
                     f"{f(r['theirs'], 13)} {f(r['ratio'], 7)} {mem_text:>21}"
                     + (f"  ({r['note']})" if r.get("note") else ""))
    return "\n".join(lines)
