"""Digits classifier-feature Fréchet distance (key ``fd_digits_classifier``) for the 8x8 digits data.

Inception features mean little on 8x8 images, so this metric uses the 128-d penultimate features of a
small CNN trained on the digits train split. The numbers are comparable only with each other (same
classifier, same reference split), never with FID values from the literature.

Everything is built offline: the classifier trains in seconds on a CPU and is cached as a state_dict in
``cache_dir`` (default ``$DDPM_CACHE_DIR``, else ``~/.cache/ddpm``) together with the reference statistics.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.utils.files import atomic_write, cache_dir

from .frechet import frechet_distance, gaussian_statistics

METRIC_KEY = "fd_digits_classifier"
METRIC_NAME = "digits classifier-feature Fréchet distance"
CLASSIFIER_FILENAME = "digits_classifier_v1.pt"
FEATURE_DIM = 128
SPLITS = ("train", "val", "test")
# The split the classifier is trained on and evaluated with; fixed so the cached weights mean one thing.
CLASSIFIER_DATA_SEED = 0

log = logging.getLogger(__name__)


class DigitsClassifier(nn.Module):
    """Small CNN for (B, 1, 8, 8) digits in [-1, 1]: 128-d ``features`` and 10 logits (``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)  # -> (B, 32, 8, 8)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # -> (B, 64, 4, 4)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> (B, 128) penultimate activations (after ReLU)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsClassifier expects inputs of shape (B, 1, 8, 8), got {tuple(x.shape)}")
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> (B, 10) logits."""
        return self.head(self.features(x))


def default_cache_dir() -> Path:
    """``$DDPM_CACHE_DIR`` if set, else ``~/.cache/ddpm``."""
    return cache_dir()


def _resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Readers (and other processes racing to fill the cache) never see a half-written file."""
    atomic_write(path, lambda file: torch.save(obj, file))


@contextmanager
def _single_cpu_thread(device: str | torch.device) -> Iterator[None]:
    """Run torch on one CPU thread for the block (restored after), when ``device`` is the CPU.

    The model is tiny: one thread is fastest (several threads thrash on a shared CPU, ~20x slower
    measured) and makes training independent of the machine's thread count.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def digits_split(split: str = "test", seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 8, 8) in [-1, 1] and labels (N,) of one split of ``DigitsDataModule(seed=seed)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    from ..data.digits import DigitsDataModule  # lazy: keeps `import src.metrics` light

    dm = DigitsDataModule(seed=seed)
    dm.setup()
    dataset = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[split]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def classifier_accuracy(
    model: DigitsClassifier, split: str = "test", data_seed: int = CLASSIFIER_DATA_SEED
) -> float:
    """Top-1 accuracy of ``model`` on a digits split (0..1)."""
    x, y = digits_split(split, data_seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pred = model(x.to(device)).argmax(dim=1).cpu()
    model.train(was_training)
    return float((pred == y).double().mean())


def train_digits_classifier(
    seed: int = 0,
    epochs: int = 15,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    lr: float = 2e-3,
) -> tuple[DigitsClassifier, float]:
    """Train a ``DigitsClassifier`` on the train split of ``DigitsDataModule(seed=0)``.

    ``seed`` fixes the initialisation and the batch order, so the result is deterministic for a given
    seed (up to floating-point differences between devices). The global RNG state is left untouched.
    Returns the model in eval mode and its test-split accuracy.
    """
    with _single_cpu_thread(device):
        return _train(seed, epochs, device, batch_size, lr)


def _train(
    seed: int, epochs: int, device: str | torch.device, batch_size: int, lr: float
) -> tuple[DigitsClassifier, float]:
    x, y = digits_split("train", CLASSIFIER_DATA_SEED)
    x, y = x.to(device), y.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: does not touch the CUDA RNGs
        model = DigitsClassifier()
    model.to(device).train()
    order_gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay lets the last epochs settle instead of bouncing around at the full step size.
    steps_per_epoch = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order_gen).to(device)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, classifier_accuracy(model, "test", CLASSIFIER_DATA_SEED)


def load_digits_classifier(
    cache_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> DigitsClassifier:
    """The cached digits classifier (eval mode, no grads), trained and cached on first use.

    Reads ``<cache_dir>/digits_classifier_v1.pt`` with ``torch.load(weights_only=True)``; a missing or
    unreadable file is (re)written atomically after training with the default seed.
    """
    path = _resolve_cache_dir(cache_dir) / CLASSIFIER_FILENAME
    model = DigitsClassifier()
    loaded = False
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            loaded = True
        except Exception as err:  # corrupt/truncated/foreign file: any failure means "retrain"
            warnings.warn(
                f"cached digits classifier {path} is unreadable ({type(err).__name__}: {err}); retraining it",
                stacklevel=2,
            )
    if not loaded:
        start = time.perf_counter()
        model, acc = train_digits_classifier(seed=0)
        _atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        log.info(
            "trained the digits classifier in %.1fs (test accuracy %.3f) and cached it at %s",
            time.perf_counter() - start,
            acc,
            path,
        )
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def _fingerprint(model: nn.Module) -> str:
    """Short hash of the weights, so cached reference statistics are never reused with another classifier."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class DigitsFrechetDistance:
    """Digits classifier-feature Fréchet distance of samples to a real digits split (lower is better).

    ``metric(samples)`` with samples (N, 1, 8, 8) in [-1, 1] returns the Fréchet distance between the
    Gaussians fitted to the classifier features of the samples and of the reference split (default: the
    test split of ``DigitsDataModule(seed=seed)``). The reference statistics are cached in ``cache_dir``
    keyed by split, seed and classifier weights.

    The estimate is biased upwards for small N, so compare scores at equal N and report them next to
    ``reference_fd_of_real_data(N)``, the score real held-out digits get.
    """

    key = METRIC_KEY
    name = METRIC_NAME

    def __init__(
        self,
        split: str = "test",
        seed: int = 0,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        classifier: DigitsClassifier | None = None,
        batch_size: int = 1024,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split, self.seed = split, seed
        self.cache_dir = _resolve_cache_dir(cache_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        if classifier is None:
            classifier = load_digits_classifier(self.cache_dir, self.device)
        self.classifier = classifier.to(self.device).eval()
        self.mu, self.sigma = self._reference_statistics()

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(N, 1, 8, 8) images in [-1, 1] -> (N, 128) float64 classifier features on the CPU."""
        images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(
                f"{METRIC_NAME} needs samples of shape (N, 1, 8, 8) in [-1, 1] (data.image_size=8), "
                f"got {tuple(images.shape)}"
            )
        with _single_cpu_thread(self.device):
            chunks = [
                self.classifier.features(images[i : i + self.batch_size].to(self.device, torch.float32)).cpu()
                for i in range(0, len(images), self.batch_size)
            ]
        return torch.cat(chunks).double()

    def statistics(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Feature mean (128,) and covariance (128, 128) of images (N, 1, 8, 8), N >= 2."""
        return gaussian_statistics(self.features(images))

    def _reference_statistics(self) -> tuple[Tensor, Tensor]:
        path = (
            self.cache_dir
            / f"digits_fd_stats_v1_{self.split}_seed{self.seed}_{_fingerprint(self.classifier)}.pt"
        )
        if path.is_file():
            try:
                stats = torch.load(path, map_location="cpu", weights_only=True)
                mu, sigma = stats["mu"], stats["sigma"]
                if mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM):
                    return mu.double(), sigma.double()
            except Exception:  # unreadable cache: recompute below and overwrite it
                pass
        x, _ = digits_split(self.split, self.seed)
        mu, sigma = self.statistics(x)
        _atomic_torch_save({"mu": mu, "sigma": sigma, "n": len(x)}, path)
        return mu, sigma

    def __call__(self, samples: Tensor) -> float:
        """Digits classifier-feature Fréchet distance of samples (N, 1, 8, 8), N >= 2, to the reference."""
        mu, sigma = self.statistics(samples)
        return frechet_distance(mu, sigma, self.mu, self.sigma)

    def reference_fd_of_real_data(self, n: int | None = None, seed: int = 0) -> float:
        """Noise floor: the score of ``n`` real digits from a split disjoint from the reference one.

        Draws ``n`` images (default: all) without replacement, with ``seed``, from the train split (or the
        test split when the reference is the train split) and scores them like model samples. Use the
        same ``n`` as the number of generated samples, since the estimate depends on N.
        """
        other = "test" if self.split == "train" else "train"
        x, _ = digits_split(other, self.seed)
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= len(x):
                raise ValueError(
                    f"n must be an integer in [2, {len(x)}] (size of the {other} split), got {n!r}"
                )
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]
        return self(x)
