"""Download-free sample-quality metrics: digits classifier-feature Fréchet distance, sliced Wasserstein.

What src.eval runs is in nll.py (bits/dim), sample_quality.py (FD, SWD, FID/IS/KID of samples) and figures.py.
"""

from .digits_classifier import (
    METRIC_KEY,
    METRIC_NAME,
    DigitsClassifier,
    DigitsFrechetDistance,
    classifier_accuracy,
    default_cache_dir,
    load_digits_classifier,
    train_digits_classifier,
)
from .frechet import frechet_distance, gaussian_statistics
from .sliced_wasserstein import random_unit_directions, sliced_wasserstein_distance

__all__ = [
    "METRIC_KEY",
    "METRIC_NAME",
    "DigitsClassifier",
    "DigitsFrechetDistance",
    "classifier_accuracy",
    "default_cache_dir",
    "frechet_distance",
    "gaussian_statistics",
    "load_digits_classifier",
    "random_unit_directions",
    "sliced_wasserstein_distance",
    "train_digits_classifier",
]
