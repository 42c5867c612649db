"""Keep ``last.ckpt`` current when training ends between checkpoint intervals."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpointOnTrainEnd(L.Callback):
    """Write ``<checkpoint dir>/last.ckpt`` when fitting ends, unless it already holds the final step.

    Runs before the EMA callback (src.train keeps weight averaging last), so the file still has the raw
    weights in ``current_model_state`` and the average in ``state_dict``, like every other checkpoint.
    Lightning writes checkpoints atomically (a temporary file, then a rename).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or not ckpt.save_last or ckpt.dirpath is None:
            return
        if ckpt._last_global_step_saved == trainer.global_step:
            return
        trainer.save_checkpoint(Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}")
