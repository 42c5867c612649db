"""EMA of the weights on Lightning's WeightAveraging, with a fused (foreach) update."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    """Exponential moving average of the weights, updated after every ``update_every_n_steps`` optimizer steps.

    Lightning's ``EMAWeightAveraging`` with the update done for all tensors of a device at once (its own
    loops over the tensors one by one). Semantics are Lightning's: the first update copies the weights
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

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return (step_idx is not None and step_idx >= self.update_starting_at_step
                and step_idx % self.update_every_n_steps == 0)
