"""Timing and memory: interleaved rounds of the sides, each side's peak memory (CUDA allocator, or peak RSS of a
fresh process on a CPU)."""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .sides import Side, build_sides

log = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(sides: list[Side], task: str, repeats: int, warmup: int,
                     device: torch.device) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Round-robin the sides (A B C A B C ...): ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Returns the round times per side (seconds) and, on CUDA, each side's own peak memory over the timed rounds
    (None on CPU): the allocator's peak during the round minus what was allocated when it began (every side's
    state is alive at once), plus the side's own state then (``resident_bytes``).
    """
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    peak: dict[str, int | None] = {s.name: None for s in sides}
    for r in range(warmup + repeats):
        for side in sides:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                baseline = torch.cuda.memory_allocated(device) - resident_bytes(side)
            sync(device)
            start = time.perf_counter()
            side.runs[task]()
            sync(device)
            elapsed = time.perf_counter() - start
            if device.type == "cuda" and r >= warmup:
                peak[side.name] = max(peak[side.name] or 0, torch.cuda.max_memory_allocated(device) - baseline)
            if r >= warmup:
                times[side.name].append(elapsed)
            log.info("%s round %d/%d%s %s: %.3f s", task, r + 1, warmup + repeats,
                     " (warmup)" if r < warmup else "", side.name, elapsed)
    return times, peak


def resident_bytes(side: Side) -> int:
    """Bytes held by one side between rounds: weights, buffers, gradients, optimizer state, EMA (each storage once)."""
    tensors = [*side.model.parameters(), *side.model.buffers()]
    tensors += [p.grad for p in side.model.parameters() if p.grad is not None]
    if side.optimizer is not None:
        tensors += [v for state in side.optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    if side.ema is not None:
        tensors += side.ema.shadow
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _proc_status_bytes(field: str) -> int | None:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def side_train_peak_cpu(cfg_yaml: str, sz: dict[str, int], prec: dict[str, Any], name: str,
                        threads: int) -> int | None:
    """Run in a fresh process: build one side, run one train round, return its peak memory (bytes).

    The peak is the process's peak RSS during the round (Linux resets the high-water mark when 5 is written to
    /proc/self/clear_refs) minus its RSS when the round began, plus what the side held then (weights, EMA):
    the CPU counterpart of the CUDA figure, without the interpreter's and the libraries' own memory.
    """
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(cfg_yaml)
    cfg.peers = [p for p in cfg.peers if str(p) == name]  # build this side only
    sides = [s for s in build_sides(cfg, sz, torch.device("cpu"), prec, {}) if s.name == name]
    if not sides:
        return None
    side = sides[0]
    held = resident_bytes(side)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _proc_status_bytes("VmRSS")
    side.runs["train"]()
    peak = _proc_status_bytes("VmHWM")
    if before is None or peak is None:
        return None
    return peak - before + held


def cpu_train_peaks(cfg: DictConfig, sz: dict[str, int], prec: dict[str, Any],
                    names: list[str]) -> dict[str, int | None]:
    """Each side's peak training memory on the CPU, each measured alone in a fresh (spawned) process: one
    process's peak RSS cannot be split between sides that share it."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("paths", "hydra"):
        plain.pop(key, None)
    cfg_yaml = OmegaConf.to_yaml(OmegaConf.create(plain))
    peaks: dict[str, int | None] = {}
    ctx = multiprocessing.get_context("spawn")
    for name in names:
        try:
            # side_train_peak_cpu pickles by its module name (src.bench.timing), which the spawned child imports
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                peaks[name] = pool.submit(side_train_peak_cpu, cfg_yaml, sz, prec, name,
                                          torch.get_num_threads()).result()
        except Exception as err:  # noqa: BLE001 - a failed measurement is a missing figure, not a failed bench
            log.warning("CPU peak memory of %s not measured: %s", name, err)
            peaks[name] = None
    return peaks
