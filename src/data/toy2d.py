"""Synthetic 2-D point clouds (swiss roll, eight Gaussians, two moons) for quick experiments."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .base import UNLABELED, BaseDataModule, TransformedSubset, check_fractions, check_int, split_indices

# Per-dataset default noise, in the generator's own units (before normalisation).
DEFAULT_NOISE = {"swiss_roll": 0.5, "eight_gaussians": 0.1, "two_moons": 0.05}

# Fixed (centre, scale) per dataset, measured on large samples at the default noise, so the data
# have roughly zero mean and unit std. Fixed constants (not statistics of the drawn data) keep the
# training data and ``sample_reference`` on exactly the same scale whatever the seed or size.
NORMALISATION = {
    "swiss_roll": ((2.0, 0.2), 6.8),
    "eight_gaussians": ((0.0, 0.0), 1.42),  # radius 2 on the circle: each coordinate has std ~sqrt(2)
    "two_moons": ((0.5, 0.25), 0.7),
}

DATASETS = tuple(DEFAULT_NOISE)

EIGHT_GAUSSIANS_RADIUS = 2.0


def _draw(dataset: str, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` raw (un-normalised) points of ``dataset`` as a float64 (n, 2) array."""
    if dataset == "eight_gaussians":
        angles = rng.integers(0, 8, size=n) * (np.pi / 4)
        centres = EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return centres + noise * rng.standard_normal((n, 2))
    # scikit-learn wants a RandomState; derive one from our generator's stream.
    random_state = np.random.RandomState(rng.integers(0, 2**31 - 1))
    if dataset == "swiss_roll":
        from sklearn.datasets import make_swiss_roll

        points, _ = make_swiss_roll(n, noise=noise, random_state=random_state)
        return points[:, [0, 2]]  # the roll lies in the x-z plane; y is its height
    from sklearn.datasets import make_moons

    points, _ = make_moons(n, noise=noise, random_state=random_state)
    return points


class Toy2DDataModule(BaseDataModule):
    """2-D toy distributions, standardised with fixed per-dataset constants (see ``NORMALISATION``).

    Unlike the image modules, points are NOT bounded to [-1, 1] (std ~1, so ``value_range`` is None).

    ``noise`` is the std of the Gaussian noise in the generator's units (None: a per-dataset
    default, see ``DEFAULT_NOISE``); for ``eight_gaussians`` it is each component's std.
    Labels are all -1 (unlabeled).
    """

    def __init__(
        self,
        dataset: str = "swiss_roll",
        num_samples: int = 10000,
        noise: float | None = None,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
        self.dataset = dataset
        self.num_samples = check_int(num_samples, "data.num_samples", 1)
        if noise is None:
            noise = DEFAULT_NOISE[dataset]
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ValueError(f"data.noise must be a number >= 0 (or null for the default), got {noise!r}")
        self.noise = float(noise)
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)

    @property
    def name(self) -> str:
        return "toy2d"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def value_range(self) -> tuple[float, float] | None:
        # Standardised to ~unit std with Gaussian tails: values can exceed [-1, 1].
        return None

    def _sample(self, n: int, seed: int, stream: int) -> torch.Tensor:
        # Separate streams keep reference samples independent of the training data for the same seed.
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
        centre, scale = NORMALISATION[self.dataset]
        points = (_draw(self.dataset, n, self.noise, rng) - np.asarray(centre)) / scale
        return torch.as_tensor(points, dtype=torch.float32)

    @property
    def has_reference_distribution(self) -> bool:
        return True

    def sample_reference(self, n: int, seed: int = 0) -> torch.Tensor:
        """Fresh (n, 2) samples from the true distribution, normalised like the training data."""
        check_int(n, "n", 1)
        return self._sample(n, seed, stream=1)

    def load_splits(self) -> None:
        x = self._sample(self.num_samples, self.seed, stream=0)
        y = torch.full((len(x),), UNLABELED, dtype=torch.long)
        full = TensorDataset(x, y)
        train_idx, val_idx, test_idx = split_indices(
            len(full), self.val_fraction, self.test_fraction, self.seed
        )
        self.train_set = TransformedSubset(full, train_idx)
        self.val_set = TransformedSubset(full, val_idx)
        self.test_set = TransformedSubset(full, test_idx)
