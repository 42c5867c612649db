"""What makes a resumed run continue exactly where the checkpoint left it: RNG state, data position, metric rows."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class ExactResume(L.Callback):
    """Resuming from a checkpoint of any step draws what the uninterrupted run would have drawn.

    - The global RNG (timesteps, noise, label dropout) is saved in every checkpoint (``rng_states``) and restored
      before the first resumed step; so is the number of CPU threads (``cpu_threads``, restored by src.train).
    - Resumed mid-epoch, the epoch's data order is replayed from its seed (``EpochSeededSampler``) minus the
      batches already trained on: the data modules save their position (``BaseDataModule.state_dict``), and the
      shards' streaming loader its own.
    - Loggers that can (``ResumableCSVLogger``) drop the rows the stopped attempt wrote after the checkpoint, so
      ``metrics.csv`` has one row per step.

    ``src.train`` always adds it: exactness does not depend on the ``callbacks`` group.
    """

    def __init__(self) -> None:
        self._rng_states: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        checkpoint["cpu_threads"] = torch.get_num_threads()  # see src.utils.threads.keep_threads_of_run

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._rng_states = checkpoint.get("rng_states")
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "train_sampler") and type(datamodule).__qualname__ not in checkpoint:
            # a checkpoint written before data modules saved their position: read it from the loop's progress
            try:
                done = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
            except (KeyError, TypeError):
                return
            datamodule.load_state_dict({"epoch": int(checkpoint.get("epoch", 0)), "batches_done": int(done),
                                        "world_size": trainer.world_size})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "resume_at"):
                logger.resume_at(step=trainer.global_step, epoch=trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._rng_states:
            torch.set_rng_state(self._rng_states["torch"])
            if self._rng_states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_states["cuda"])
            self._rng_states = None
