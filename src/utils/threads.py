"""How many CPU threads torch may use in this process: the CPUs it may really run on, shared with its siblings."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# How long the start-up look at the other processes' CPU use lasts.
PROBE_SECONDS = 0.25


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """CPUs the container's CPU quota allows (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``), None if none."""
    root = CGROUP_ROOT if root is None else root
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, SLURM's binding) capped by the cgroup quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def busy_cpus(seconds: float = PROBE_SECONDS) -> float | None:
    """How many of this process's CPUs other work keeps busy now (from /proc/stat over ``seconds``), None where
    that cannot be read."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or (mine is not None and int(name[3:]) not in mine):
                    continue
                values = [int(v) for v in fields[:8]]
                out[name] = (sum(values), values[3] + values[4])  # total, idle + iowait
        return out

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError):
        return None
    busy = 0.0
    for name, (total, idle) in after.items():
        if name in before and total > before[name][0]:
            busy += 1 - (idle - before[name][1]) / (total - before[name][0])
    return busy


def choose_threads(processes: int = 1, loader_workers: int = 0, probe: bool = True) -> tuple[int, str]:
    """Intra-op threads for each of ``processes`` processes of this node that each feed ``loader_workers`` data
    loader workers (one CPU each), and why. With ``probe``, CPUs that other work keeps busy at start-up are left
    to it: OpenMP threads that share a core with another busy process spin against it (a digits training step took
    23x longer with 2 threads beside another 2-thread torch process, 2.8x longer with 1; benchmarks/NOTES.md)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS is set"
    cpus = usable_cpus()
    per_process = cpus // max(1, processes)
    threads = max(1, per_process - max(0, loader_workers))
    why = f"{cpus} usable CPUs"
    if processes > 1:
        why += f" / {processes} processes on this node"
    if loader_workers:
        why += f", less {loader_workers} data loader workers each"
    busy = busy_cpus() if probe and threads > 1 else None
    if busy is not None and round(busy) > 0:
        free = max(1, (cpus - round(busy)) // max(1, processes))
        if free < threads:
            threads = free
            why += f", {busy:.1f} of them busy with other work"
    return threads, why


def configure_threads(processes: int = 1, loader_workers: int = 0, probe: bool = True) -> int:
    """Set torch's intra-op threads by ``choose_threads`` and log the choice once (the entry points call it)."""
    import torch

    threads, why = choose_threads(processes, loader_workers, probe)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread%s (%s)", threads, "" if threads == 1 else "s", why)
    return threads


def keep_threads_of_run(threads: int | None) -> None:
    """A resumed run computes with the thread count its checkpoint was written with (recorded by
    ``ExactResume``): a matrix product's reduction order, and so its last bits, can depend on it, and resuming is
    bit for bit. ``OMP_NUM_THREADS`` still wins."""
    import torch

    if threads is None or os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() == int(threads):
        return
    log.info("resuming with the %d CPU thread%s the run computed with (bit for bit), not %d", int(threads),
             "" if int(threads) == 1 else "s", torch.get_num_threads())
    torch.set_num_threads(int(threads))
