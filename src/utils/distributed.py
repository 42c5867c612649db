"""One process per device for sampling and evaluation, through Lightning Fabric's launcher.

``start_processes(devices=4)`` on one machine relaunches the command once per extra device (Fabric's subprocess
launcher, which keeps Hydra's run folder for the children) and joins a process group: NCCL on GPUs, gloo on CPUs.
Processes a cluster created itself (SLURM tasks through ``hydra/launcher=slurm``, ``torchrun``) are joined as they
are. One device without a cluster runs in this process, with no process group and no launcher.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from src.utils.device import resolve_device
from src.utils.validate import positive_int

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp")


@dataclass
class Processes:
    """This process's place among the sampling processes, and the few collective calls the entry points need."""

    rank: int
    world_size: int
    device: torch.device
    fabric: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        return obj if self.fabric is None else self.fabric.broadcast(obj, src=0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (float64 stays float64; gloo and NCCL add in rank order)."""
        if self.fabric is None:
            return tensor
        return self.fabric.all_reduce(tensor.to(self.device), reduce_op="sum").cpu()

    def raise_together(self, error: BaseException | None) -> None:
        """Raise rank 0's ``error`` on every rank (so no rank is left waiting in a collective call)."""
        message = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 stopped: {message}")


def _cluster_world_size() -> int:
    """Processes a cluster launched (torchrun workers, the tasks of a SLURM batch job); 1 when none did."""
    if os.environ.get("TORCHELASTIC_RUN_ID") or "LOCAL_RANK" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("SLURM_JOB_NAME") not in (None, "bash", "interactive"):  # not an interactive allocation
        return int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return 1


def start_processes(devices: Any = 1, device: str = "auto", num_nodes: Any = 1, strategy: str = "auto") -> Processes:
    """Start (or join) ``devices`` x ``num_nodes`` processes and return this one's place.

    ``device``: ``auto`` (CUDA if there is a GPU, else the CPU), ``cpu`` or ``cuda``; with more than one device
    each process takes one (``cuda:<local rank>``). ``strategy``: ``auto`` (a process group only when there is
    more than one process) or ``ddp`` (always one, e.g. to exercise NCCL with one GPU).
    """
    devices = positive_int(devices, "devices", hint="processes, one per device")
    num_nodes = positive_int(num_nodes, "num_nodes")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: use auto (a process group for more than one process) or ddp")
    if devices * num_nodes == 1 and strategy == "auto" and _cluster_world_size() == 1:
        return Processes(0, 1, resolve_device(device, key="device"))
    kind = resolve_device(device, key="device")
    if kind.index is not None and devices > 1:
        raise ValueError(f"device={device} picks one GPU, but devices={devices} asks for {devices}: use "
                         "device=cuda (each process takes the GPU of its local rank) or devices=1")
    if kind.type not in ("cpu", "cuda"):
        raise ValueError(f"devices={devices} runs one process per device on cpu or cuda, not {kind.type}")
    from lightning.fabric import Fabric

    from src.utils.quiet import silence_library_noise

    silence_library_noise()
    fabric = Fabric(accelerator=kind.type, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    log.info("process %d of %d on %s", fabric.global_rank, fabric.world_size, fabric.device)
    return Processes(fabric.global_rank, fabric.world_size, fabric.device, fabric)
