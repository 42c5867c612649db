"""Library messages that are not the user's business, silenced once per process by the entry points."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.starts)


def silence_library_noise() -> None:
    # torch deprecates LeafSpec checks that Lightning still makes; nothing for a user to change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # mid-epoch resumes are exact here: the data order is replayed from (seed, epoch) and the batches already
    # trained on are skipped (src.data.base.EpochSeededSampler), which Lightning cannot see
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # a resumed run writes into its own checkpoint folder: the run-folder lock rules out a second writer
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # an advertisement Lightning prints at every Trainer start
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("💡 Tip"))
