"""Training callbacks that are ours; checkpoints and LR monitoring come from Lightning."""

from src.callbacks.checkpoint import StepCheckpoint
from src.callbacks.ema import EMA
from src.callbacks.fid import FIDCallback
from src.callbacks.progress import ThrottledRichProgressBar, TrainingProgressLines
from src.callbacks.resume import ExactResume
from src.callbacks.sample_grid import SampleGrid

__all__ = ["EMA", "ExactResume", "FIDCallback", "SampleGrid", "StepCheckpoint", "ThrottledRichProgressBar",
           "TrainingProgressLines"]
