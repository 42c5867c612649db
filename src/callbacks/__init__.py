"""Training callbacks that are ours; checkpoints and LR monitoring come from Lightning."""

from src.callbacks.ema import EMA
from src.callbacks.fid import FIDCallback
from src.callbacks.last_checkpoint import LastCheckpointOnTrainEnd
from src.callbacks.progress import ThrottledRichProgressBar
from src.callbacks.sample_grid import SampleGrid

__all__ = ["EMA", "FIDCallback", "LastCheckpointOnTrainEnd", "SampleGrid", "ThrottledRichProgressBar"]
