"""How many CPU threads torch may use in this process: the CPUs it may really run on, shared with its siblings."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

# What `python -m src.*` sets before torch starts OpenMP (src/__init__.py), unless the user set it: OpenMP threads
# that wait for each other sleep after a short spin instead of spinning for ~0.1 s. On a machine whose cores are
# also busy with other work, spinning threads hold the cores that the threads they wait for need: a training step
# of the digits U-Net took 25x longer with a second busy process (benchmarks/NOTES.md).
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_openmp_defaults() -> None:
    """Set ``OPENMP_DEFAULTS`` where the environment has no value; only effective before torch is imported."""
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the container's CPU quota allows (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``), None if none."""
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


def choose_threads(processes: int = 1, loader_workers: int = 0) -> tuple[int, str]:
    """Intra-op threads for each of ``processes`` processes of this node that each feed ``loader_workers`` data
    loader workers (one CPU each), and why."""
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
    return threads, why


def configure_threads(processes: int = 1, loader_workers: int = 0) -> int:
    """Set torch's intra-op threads by ``choose_threads`` and log the choice once."""
    import torch

    threads, why = choose_threads(processes, loader_workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread%s (%s; OMP_WAIT_POLICY=%s)", threads, "" if threads == 1 else "s", why,
             os.environ.get("OMP_WAIT_POLICY", "unset"))
    return threads
