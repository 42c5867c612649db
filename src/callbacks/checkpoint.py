"""Checkpoints of a step-based run: every N steps, and at the step where training stops, however it stops."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for training by steps, with ``last.ckpt`` always the newest state of the run.

    Every checkpoint, periodic or last, is written in ``on_train_batch_end``, after the EMA update of the step:
    resuming from any of them is bit for bit (weights, optimizer, EMA, RNG and the position in the epoch's data
    order). Lightning's own class also writes ``last.ckpt`` when training ends, after the loop has closed the epoch
    and the EMA callback has copied the average into the module: a run resumed from that file starts the next
    epoch's data order instead of finishing this one. Here ``last.ckpt`` is written at:
    - every ``every_n_train_steps`` (with the periodic ``step=...ckpt``, of which ``save_top_k`` newest are kept);
    - the step that reaches ``trainer.max_steps``;
    - the first step that ends after a SIGTERM (sent by SLURM and most schedulers before they kill a job), after
      which the run exits with status 143;
    - the first step that ends after Ctrl+C (SIGINT): the first Ctrl+C only asks the run to stop there, then it
      exits with status 1; a second Ctrl+C stops at once and keeps the previous ``last.ckpt``;
    - the end of the last epoch when fitting ends otherwise (``max_epochs``, a callback's ``should_stop``).
    Stopped inside a step or during validation (while the EMA weights are swapped in), the previous ``last.ckpt``
    stays, and it is still the newest checkpoint on disk. Any other exception (the NaN loss ``FloatingPointError``)
    never writes one.

    Other defaults than Lightning's: no ``-vN`` file versions (a resumed run overwrites ``last.ckpt``, so it stays
    the newest), and checkpoints are not deferred to the end of validation. A run folder that was moved or copied
    keeps track of its periodic checkpoints (``save_top_k`` goes on pruning the old ones).
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, save_on_train_epoch_end: bool = True,
                 **kwargs: Any) -> None:
        # save_on_train_epoch_end=True: never defer a step's checkpoint to the end of validation (a step-interval
        # checkpoint saves nothing at epoch ends, so nothing else changes)
        super().__init__(*args, enable_version_counter=enable_version_counter,
                         save_on_train_epoch_end=save_on_train_epoch_end, **kwargs)
        self._interrupt_requested = False
        self._stop_pending = False
        self._previous_sigint: Any = None

    # ---------------------------------------------------------------- when to write last.ckpt
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._interrupt_requested = self._stop_pending = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        interrupted = self._interrupt_requested
        if trainer.world_size > 1:  # every rank stops at the same step (Lightning syncs SIGTERM itself)
            interrupted = trainer.strategy.reduce_boolean_decision(interrupted, all=False)
        last_step = 0 < trainer.max_steps <= trainer.global_step
        if last_step or interrupted or trainer.received_sigterm:
            reason = "Ctrl+C" if interrupted else "SIGTERM" if trainer.received_sigterm else None
            self.save_last_now(trainer, reason)
        # Ctrl+C: stop at the next hook, once Lightning has logged this step's metrics (a resumed run does not
        # log them again); a validation due at this step is skipped, as a resume from this checkpoint skips it
        self._stop_pending = interrupted

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._stop_if_interrupted()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_interrupted()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.should_stop or 0 < trainer.max_epochs <= trainer.current_epoch + 1:
            self.save_last_now(trainer)
        self._stop_if_interrupted()

    def _stop_if_interrupted(self) -> None:
        if self._stop_pending:
            self._stop_pending = False
            raise KeyboardInterrupt

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not Lightning's save at train end (see the class docstring): last.ckpt holds the final step already
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_sigint()
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or self._saved_this_step(trainer):
            return
        reason = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl+C"
        if not _between_training_steps(trainer):
            log.warning("%s inside a training step or during validation: last.ckpt keeps step %s, the newest "
                        "checkpoint", reason, self._last_global_step_saved)
            return
        self.save_last_now(trainer, reason)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restore_sigint()

    def save_last_now(self, trainer: L.Trainer, reason: str | None = None) -> None:
        """Write last.ckpt at the current step unless it holds that step already."""
        if not self.save_last or self._saved_this_step(trainer) or trainer.sanity_checking:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if reason:
            log.warning("%s at step %d: wrote %s (resume with ckpt_path=%s)", reason, trainer.global_step,
                        self.last_model_path, self.last_model_path)

    def _saved_this_step(self, trainer: L.Trainer) -> bool:
        return self._last_global_step_saved == trainer.global_step

    # ---------------------------------------------------------------- Ctrl+C
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupt_requested:  # the second Ctrl+C: stop now
            self._restore_sigint()
            raise KeyboardInterrupt
        self._interrupt_requested = True
        log.warning("Ctrl+C: stopping after the current training step, which is written to last.ckpt "
                    "(Ctrl+C again stops at once and keeps the previous last.ckpt)")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    # ---------------------------------------------------------------- moved run folders
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the record of earlier checkpoints. When the run folder was moved or copied since, its paths are
        rewritten to this folder, so ``save_top_k`` goes on pruning the old files (Lightning drops the record with a
        warning); resumed into another folder, the record starts afresh there."""
        old = state_dict.get("dirpath")
        if old and self.dirpath and Path(old) != Path(self.dirpath):
            moved = _moved_record(state_dict, Path(old), Path(self.dirpath))
            if moved is None:
                return
            state_dict = moved
        super().load_state_dict(state_dict)


def _moved_record(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any] | None:
    """``state`` with its checkpoint paths under ``old`` rewritten to ``new``, keeping the files found there; None
    when none of them is there."""

    def move(path: str) -> str | None:
        try:
            candidate = new / Path(path).relative_to(old)
        except ValueError:
            return None
        return str(candidate) if candidate.is_file() else None

    best_k = {moved: score for path, score in state.get("best_k_models", {}).items() if (moved := move(path))}
    if not best_k:
        return None
    state = dict(state, dirpath=str(new), best_k_models=best_k)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if state.get(key):
            state[key] = move(state[key]) or ""
    return state


def _between_training_steps(trainer: L.Trainer) -> bool:
    """True when the last batch finished all its hooks and the next has not begun, outside validation."""
    if not trainer.training or trainer.sanity_checking:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return progress.ready == progress.completed
