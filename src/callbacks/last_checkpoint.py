"""Keep ``last.ckpt`` current when training ends between checkpoint intervals or is stopped by a signal."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class LastCheckpointOnTrainEnd(L.Callback):
    """Write ``<checkpoint dir>/last.ckpt`` when fitting ends or is interrupted, unless it holds that step already.

    Interruptions: SIGTERM (what SLURM and most schedulers send before killing a job; Lightning finishes the
    current step, then raises ``SIGTERMException``) and Ctrl+C (``KeyboardInterrupt``). The file is written only
    when the run stands between two training steps, so it is exactly what a periodic checkpoint of that step would
    be; stopped inside a step or during validation (when the EMA weights are swapped in), the previous
    ``last.ckpt`` is kept. Any other exception, such as the NaN loss ``FloatingPointError``, never touches it.

    Runs before the EMA callback (src.train keeps weight averaging last), so the file still has the raw
    weights in ``current_model_state`` and the average in ``state_dict``, like every other checkpoint.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        reason = "SIGTERM" if isinstance(exception, SIGTERMException) else "KeyboardInterrupt"
        if not _between_training_steps(trainer):
            log.warning("%s inside a training step or during validation: last.ckpt keeps its last saved step",
                        reason)
            return
        path = self._save_last(trainer)
        if path is not None:
            log.warning("%s at step %d: wrote %s (resume with ckpt_path=%s)", reason, trainer.global_step, path, path)

    def _save_last(self, trainer: L.Trainer) -> Path | None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or not ckpt.save_last or ckpt.dirpath is None:
            return None
        if ckpt._last_global_step_saved == trainer.global_step:
            return None
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        return path


def _between_training_steps(trainer: L.Trainer) -> bool:
    """True when the last batch finished all its hooks and the next has not begun, outside validation."""
    if not trainer.training or trainer.sanity_checking:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return progress.ready == progress.completed
