"""Training progress: Lightning's Rich bar counting optimizer steps, or plain log lines for log files.

Both read the per-step metrics (``train/loss``) only every N steps, to avoid host-device syncs. Which one a run
gets is decided by ``src.utils.progress.training_progress`` (a terminal or not).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn, ProcessingSpeedColumn
from rich.text import Text

from src.utils import progress as progress_utils
from src.utils.progress import EVERY_FRACTION, EVERY_SECONDS, format_duration, format_rate

log = logging.getLogger(__name__)


def _counts_steps(trainer: Any) -> bool:
    """Training bounded by ``max_steps`` (DDPM's way): progress is optimizer steps, not batches of an epoch."""
    return trainer.max_steps is not None and trainer.max_steps > 0


def _epoch_text(trainer: Any, word: str = "Epoch", epoch: int | None = None) -> str:
    """``Epoch 3``, with Lightning's ``/last`` only when ``max_epochs`` bounds the run (it is -1 for DDPM)."""
    text = f"{word} {trainer.current_epoch if epoch is None else epoch}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        text += f"/{trainer.max_epochs - 1}"
    return text


class _ThrottledReads:
    """Per-step metrics from ``trainer.callback_metrics``, read (one host-device sync) once every N steps."""

    def __init__(self, step_metrics: Sequence[str], every_n_steps: int) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.step_metrics = list(step_metrics)
        self.every_n_steps = int(every_n_steps)
        self.shown: dict[str, float] = {}
        self._shown_key: int | None = None

    def read(self, trainer: Any, key: int) -> dict[str, float]:
        if key != self._shown_key:
            logged = trainer.callback_metrics
            self.shown = {name: float(logged[name]) for name in self.step_metrics if name in logged}
            self._shown_key = key
        return self.shown


class ThrottledRichProgressBar(RichProgressBar):
    """``RichProgressBar`` that counts optimizer steps and shows ``step_metrics`` refreshed every ``every_n_steps``.

    With ``trainer.max_steps`` set, the training bar runs from ``global_step`` (also after a resume) to
    ``max_steps`` (``step 1234/800000``, steps/s, ETA), and the epoch is a plain counter unless ``max_epochs``
    bounds the run; the validation bar is Lightning's. Lightning copies every metric logged with
    ``prog_bar=True`` and ``on_step=True`` to the host after every batch, and that copy waits for the device to
    finish the step. So the module logs its step loss without ``prog_bar`` and this bar reads it from
    ``trainer.callback_metrics`` once every ``every_n_steps``: one host-device sync per N steps.
    The bar draws on stderr, whose terminal-ness decides between it and plain lines.
    """

    def __init__(self, *args: Any, step_metrics: Sequence[str] = ("train/loss",), every_n_steps: int = 50,
                 console_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._reads = _ThrottledReads(step_metrics, every_n_steps)
        super().__init__(*args, console_kwargs={"stderr": True, **(console_kwargs or {})}, **kwargs)

    @property
    def step_metrics(self) -> list[str]:
        return self._reads.step_metrics

    @property
    def every_n_steps(self) -> int:
        return self._reads.every_n_steps

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if trainer.training:
            self._reads.read(trainer, trainer.global_step // self.every_n_steps)
        return {**items, **self._reads.shown}

    def _get_train_description(self, current_epoch: int) -> str:
        description = _epoch_text(self.trainer, epoch=current_epoch)
        if len(self.validation_description) > len(description):
            # as Lightning: the same width as "Validation", so the bars do not jump
            description = f"{description:{len(self.validation_description)}}"
        return description

    def _styled(self, description: str) -> str:
        return f"[{self.theme.description}]{description}" if self.theme.description else description

    def is_step_task(self, task: Any) -> bool:
        return (self._trainer is not None and task.id == self.train_progress_bar_id
                and _counts_steps(self._trainer))

    def configure_columns(self, trainer: Any) -> list:
        columns = super().configure_columns(trainer)
        swap = {BatchesProcessedColumn: _StepsColumn, ProcessingSpeedColumn: _StepSpeedColumn}
        return [swap[type(c)](self, c.style) if type(c) in swap else c for c in columns]

    def _initialize_train_progress_bar_id(self) -> None:
        if not _counts_steps(self.trainer):
            return super()._initialize_train_progress_bar_id()
        assert self.progress is not None
        self.train_progress_bar_id = self.progress.add_task(
            self._styled(self._get_train_description(self.trainer.current_epoch)), total=self.trainer.max_steps,
            completed=self.trainer.global_step)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not _counts_steps(trainer):
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled:
            return
        if self.train_progress_bar_id is not None and self._leave:
            self._stop_progress()
            self._init_progress(trainer)
        if self.progress is not None:
            if self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            else:  # one bar over all epochs: only the epoch in its description changes
                self.progress.update(self.train_progress_bar_id, total=trainer.max_steps,
                                     completed=trainer.global_step, visible=True,
                                     description=self._styled(self._get_train_description(trainer.current_epoch)))
        self.refresh()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not _counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a resume mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class _StepAware:
    """A column of Lightning's bar that renders the step-counting training task its own way (``step_text``)."""

    def __init__(self, bar: ThrottledRichProgressBar, style: Any) -> None:
        super().__init__(style)  # type: ignore[call-arg]
        self.bar = bar

    def render(self, task: Any) -> Any:
        if self.bar.is_step_task(task):
            return Text(self.step_text(task), style=self.style)  # type: ignore[attr-defined]
        return super().render(task)  # type: ignore[misc]

    def step_text(self, task: Any) -> str:
        raise NotImplementedError


class _StepsColumn(_StepAware, BatchesProcessedColumn):
    """``step 1234/800000`` on the step-counting training bar, Lightning's ``n/total`` elsewhere."""

    def step_text(self, task: Any) -> str:
        return f"step {int(task.completed)}/{int(task.total)}"


class _StepSpeedColumn(_StepAware, ProcessingSpeedColumn):
    def step_text(self, task: Any) -> str:
        return f"{task.speed or 0.0:.2f} steps/s"


class TrainingProgressLines(ProgressBar):
    """Training progress as log lines, for log files (no redraws, no escape codes), e.g.

        step 1000/800000 (0.1%), epoch 11, 12.3 steps/s, loss 0.0312, ETA 18h 02m

    A line comes at most every ``every_n_seconds`` or per 10% of ``max_steps``, checked every ``every_n_steps``
    steps, and at the end; ``step_metrics`` are read from the device only for a line (the Rich bar's throttle).
    After each validation a line gives the metrics logged with ``prog_bar=True`` (``val/loss``).
    """

    def __init__(self, step_metrics: Sequence[str] = ("train/loss",), every_n_steps: int = 50,
                 every_n_seconds: float = EVERY_SECONDS) -> None:
        super().__init__()
        self._reads = _ThrottledReads(step_metrics, every_n_steps)
        self.every_n_seconds = float(every_n_seconds)
        self._enabled = True
        self._start_step = 0
        self._last_step = 0
        self._start_time = self._last_time = 0.0
        self._last_part = 0
        self._checked_step: int | None = None
        self._epoch = 0

    @property
    def every_n_steps(self) -> int:
        return self._reads.every_n_steps

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _part(self, trainer: Any) -> int:
        if not _counts_steps(trainer):
            return 0
        return int(trainer.global_step // max(1.0, trainer.max_steps * EVERY_FRACTION))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_step = self._last_step = trainer.global_step
        self._last_time = self._start_time = progress_utils._clock()
        self._last_part = self._part(trainer)
        self._epoch = trainer.current_epoch
        if self._enabled:
            total = f"/{trainer.max_steps}" if _counts_steps(trainer) else ""
            log.info("training from step %d%s", trainer.global_step, total)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._epoch = trainer.current_epoch  # Lightning counts a stopped epoch as done by on_train_end
        if not self._enabled or step % self.every_n_steps or step == self._checked_step:
            return
        self._checked_step = step  # gradient accumulation: several batches end at one step
        if _counts_steps(trainer) and step >= trainer.max_steps:
            return  # the final line says it
        now = progress_utils._clock()
        if now - self._last_time >= self.every_n_seconds or self._part(trainer) > self._last_part:
            self._line(trainer, now)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._enabled:
            self._line(trainer, progress_utils._clock(), final=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        shown = trainer.progress_bar_metrics  # already host floats: Lightning converts prog_bar metrics
        if shown:
            values = ", ".join(f"{name} {value:.4g}" for name, value in shown.items())
            log.info("validation at step %d (%s): %s", trainer.global_step, _epoch_text(trainer, "epoch"), values)

    def _line(self, trainer: Any, now: float, final: bool = False) -> None:
        step = trainer.global_step
        metrics = self._reads.read(trainer, step)  # the one host read for this line
        parts = [f"step {step}/{trainer.max_steps} ({100 * step / trainer.max_steps:.1f}%)"
                 if _counts_steps(trainer) else f"step {step}", _epoch_text(trainer, "epoch", self._epoch)]
        if final:
            parts.append(format_rate(step - self._start_step, now - self._start_time, "steps"))
        else:
            parts.append(format_rate(step - self._last_step, now - self._last_time, "steps"))
        parts += [f"{name.rsplit('/', 1)[-1]} {value:.4g}" for name, value in metrics.items()]
        if final:
            parts.append(f"done in {format_duration(now - self._start_time)}")
        elif _counts_steps(trainer) and step > self._last_step:
            rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
            parts.append(f"ETA {format_duration((trainer.max_steps - step) / rate)}")
        log.info("%s", ", ".join(parts))
        self._last_step, self._last_time, self._last_part = step, now, self._part(trainer)
