"""EMA of the weights on Lightning's WeightAveraging, with a fused (foreach) update and no host-device sync."""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class SyncFreeAveragedModel(AveragedModel):
    """``AveragedModel`` whose ``update_parameters`` never waits for the device.

    torch's version reads its device-side counter ``n_averaged`` on the host twice per update
    (``bool(n_averaged == 0)``, ``n_averaged > 0``), which stalls the GPU queue every optimizer step. Here the
    host keeps its own copy of the count; the buffer is still incremented (on the device) and checkpointed.
    The arithmetic is torch's: the first update copies, later ones call ``multi_avg_fn`` per (device, dtype).
    """

    _host_count: int | None = None  # None: not known on the host yet (fresh, or loaded from a checkpoint)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_count = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.multi_avg_fn is None:
            raise ValueError("SyncFreeAveragedModel needs multi_avg_fn (e.g. get_ema_multi_avg_fn(decay))")
        if self._host_count is None:
            self._host_count = int(self.n_averaged)  # one read after construction or a load, then never again
        if self.use_buffers:
            averaged = list(chain(self.module.parameters(), self.module.buffers()))
            current = list(chain(model.parameters(), model.buffers()))
        else:
            averaged, current = list(self.parameters()), list(model.parameters())
        pairs = [(a.detach(), c.detach().to(a.device)) for a, c in zip(averaged, current, strict=True)]
        if self._host_count == 0:
            torch._foreach_copy_([a for a, _ in pairs], [c for _, c in pairs])
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = defaultdict(lambda: ([], []))
            for a, c in pairs:
                groups[(a.device, a.dtype)][0].append(a)
                groups[(a.device, a.dtype)][1].append(c)
            for (device, _), (avg, cur) in groups.items():
                self.multi_avg_fn(avg, cur, self.n_averaged.to(device))
        if not self.use_buffers:  # as torch: buffers are not averaged, they track the model
            for a, c in zip(self.module.buffers(), model.buffers(), strict=True):
                a.detach().copy_(c.detach().to(a.device))
        self.n_averaged += 1
        self._host_count += 1


class EMA(WeightAveraging):
    """Exponential moving average of the weights, updated after every ``update_every_n_steps`` optimizer steps.

    Lightning's ``EMAWeightAveraging`` with the update done for all tensors of a device at once (its own
    loops over the tensors one by one) and without the host reading a device counter each step
    (``SyncFreeAveragedModel``). Semantics are Lightning's: the first update copies the weights
    (the reference code's decay of 1e-10 at step 0), later ones compute decay * ema + (1 - decay) * w;
    validation and sampling see the average; checkpoints hold the average in ``state_dict`` and the raw
    weights in ``current_model_state``; when fitting ends the module keeps the average.
    """

    def __init__(self, decay: float = 0.9999, update_every_n_steps: int = 1, update_starting_at_step: int = 0,
                 **kwargs: Any):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1], got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"callbacks.ema.update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), **kwargs)
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None and type(self._average_model) is AveragedModel:
            # same object and state, update without host syncs
            self._average_model.__class__ = SyncFreeAveragedModel

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return (step_idx is not None and step_idx >= self.update_starting_at_step
                and step_idx % self.update_every_n_steps == 0)
