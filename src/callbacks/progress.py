"""Lightning's rich progress bar, showing per-step metrics read every N steps instead of every step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class ThrottledRichProgressBar(RichProgressBar):
    """``RichProgressBar`` that shows ``step_metrics`` (e.g. ``train/loss``) refreshed every ``every_n_steps``.

    Lightning copies every metric logged with ``prog_bar=True`` and ``on_step=True`` to the host after every
    batch, and that copy waits for the device to finish the step. So the module logs its step loss without
    ``prog_bar`` and this bar reads it from ``trainer.callback_metrics`` once every ``every_n_steps``: one
    host-device sync per N steps instead of one per step. The bar itself (step count, speed) moves every step;
    epoch-level metrics (``val/loss``) show as Lightning shows them.
    """

    def __init__(self, *args: Any, step_metrics: Sequence[str] = ("train/loss",), every_n_steps: int = 50,
                 **kwargs: Any) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        super().__init__(*args, **kwargs)
        self.step_metrics = list(step_metrics)
        self.every_n_steps = int(every_n_steps)
        self._shown: dict[str, float] = {}
        self._shown_key: int | None = None

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if trainer.training:
            key = trainer.global_step // self.every_n_steps
            if key != self._shown_key:
                logged = trainer.callback_metrics
                # the one host read in N steps
                self._shown = {name: float(logged[name]) for name in self.step_metrics if name in logged}
                self._shown_key = key
        return {**items, **self._shown}
