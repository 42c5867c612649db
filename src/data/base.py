"""Shared base class and helpers for the DataModules.

Every DataModule yields batches ``(x, y)``: ``x`` float32 in [-1, 1] and ``y`` a LongTensor of
class labels (``-1`` for unlabeled data). Splits are drawn from ``seed`` with a private
``torch.Generator`` so that every process of a distributed run sees the same split.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from src.utils.validate import check_int

# Label used for examples without a class.
UNLABELED = -1
SPLITS = ("train", "val", "test")


def scale_to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] to [-1, 1]."""
    return x * 2 - 1


def pil_to_unit_range(img: Any) -> torch.Tensor:
    """PIL image -> float32 (C, H, W) tensor with pixel v in 0..255 mapped to exactly v/127.5 - 1."""
    from torchvision.transforms.functional import pil_to_tensor

    # Dividing the integer pixels once (not v/255*2-1) keeps the mapping exact in float32.
    return pil_to_tensor(img).to(torch.float32) / 127.5 - 1


def check_fractions(val_fraction: Any, test_fraction: Any, prefix: str = "data") -> tuple[float, float]:
    """Validate split fractions: each in [0, 1) and their sum < 1 so the train split is not empty."""
    out = []
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{prefix}.{key} must be a number in [0, 1), got {value!r}")
        out.append(float(value))
    if out[0] + out[1] >= 1:
        raise ValueError(
            f"{prefix}.val_fraction + {prefix}.test_fraction must be < 1 to leave training data, "
            f"got {out[0]} + {out[1]} = {out[0] + out[1]}"
        )
    return out[0], out[1]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Train/val/test sizes for ``n`` items; a non-zero fraction gets at least one item."""

    def size(fraction: float) -> int:
        return 0 if fraction == 0 else max(1, round(n * fraction))

    n_val, n_test = size(val_fraction), size(test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"{n} examples are too few to split with data.val_fraction={val_fraction} and "
            f"data.test_fraction={test_fraction}: no training examples would remain; "
            "add data or lower the fractions"
        )
    return n_train, n_val, n_test


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Deterministic random train/val/test index lists for ``n`` items, drawn from ``seed``."""
    n_train, n_val, _ = split_sizes(n, val_fraction, test_fraction)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator).tolist()
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def leave_sigterm_to_the_trainer(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: a worker ends quietly (exit status 0) on SIGTERM. A scheduler (SLURM,
    Kubernetes, ``kill`` of the process group) signals every process of the job; a worker killed by the signal
    makes torch raise in the training process, which would abort the last checkpoint it writes on SIGTERM. (Not
    ignored: Python's exit would then wait forever for workers that do not stop.)"""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


class TransformedSubset(Dataset):
    """A view of ``base`` restricted to ``indices`` that applies ``transform`` to the input.

    Lets one loaded dataset serve several splits with different transforms (e.g. flips on train
    only) without loading the data twice.
    """

    def __init__(
        self, base: Dataset, indices: Sequence[int] | None = None, transform: Callable | None = None
    ) -> None:
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.base[self.indices[i]]
        if self.transform is not None:
            x = self.transform(x)
        return x, y


class EpochSeededSampler(Sampler[int]):
    """Random order drawn from (seed, epoch), so any epoch's order can be replayed, and a resumed run can
    skip the examples its epoch already used (``skip``, consumed by the next iteration)."""

    def __init__(self, num_examples: int, seed: int = 0) -> None:
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every epoch
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=g).tolist()
        start, self.skip = self.skip, 0
        yield from order[start:]

    def __len__(self) -> int:
        return self.num_examples


class BaseDataModule(L.LightningDataModule):
    """Common arguments, validation and DataLoader construction.

    Subclasses set ``train_set``/``val_set``/``test_set`` in ``setup`` and implement ``data_shape``. ``setup``
    builds all splits at once and is idempotent. Image modules whose training images flip at random
    (``random_flip``) implement ``unflipped_train_set``, which ``reference_images`` serves; a module that can draw
    from its true distribution (toy2d) implements ``sample_reference``. Training data kept on the training device:
    ``src.data.resident.DeviceResidentDataModule``.
    """

    random_flip: bool = False  # modules that flip training images at random set it from their arguments
    collate_fn: Callable | None = None  # how the loaders batch items (None: torch's default collate)

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.batch_size = check_int(batch_size, "data.batch_size", 1)
        self.num_workers = check_int(num_workers, "data.num_workers", 0)
        self.seed = check_int(seed, "data.seed", 0)
        self.pin_memory = bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Per-example shape without the batch dimension, known before ``setup``."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None for unlabeled data."""
        return None

    @property
    def value_range(self) -> tuple[float, float] | None:
        """Bounds every value of ``x`` lies in, or None if unbounded (then samples must not be clipped)."""
        return (-1.0, 1.0)

    def setup(self, stage: str | None = None) -> None:
        """Build all splits at once; later calls (every stage, every rank's hooks) find them built."""
        if not self.is_setup:
            self.load_splits()

    def load_splits(self) -> None:
        """Set ``train_set``, ``val_set`` and ``test_set`` (the data modules implement it; ``prepare_data``
        downloads first where there is something to download)."""
        raise NotImplementedError

    @property
    def is_setup(self) -> bool:
        return self.train_set is not None

    @property
    def train_flips(self) -> bool:
        """Whether training examples are flipped horizontally at random."""
        return bool(self.random_flip)

    # --- what sample metrics compare against -----------------------------------------------------

    @property
    def has_reference_distribution(self) -> bool:
        """Whether ``sample_reference`` draws fresh examples of the true data distribution (2-D toy data)."""
        return False

    def sample_reference(self, n: int, seed: int = 0) -> torch.Tensor | None:
        """``n`` fresh examples of the true distribution, scaled like the training data; None for a module that
        holds a finite data set only (``has_reference_distribution`` is False)."""
        return None

    def reference_images(self, split: str = "train") -> Dataset:
        """The real images of ``split`` that samples are compared with (FID): a Dataset of ``(x, y)`` with ``x``
        float32 (C, H, W) in [-1, 1], as the loaders give them but never flipped at random.

        Prepares and sets up the module first if it is not; its own splits keep their augmentation.
        """
        if len(self.data_shape) != 3:
            raise ValueError(f"{type(self).__name__} holds data of shape {self.data_shape}, not images (C, H, W)")
        if split not in SPLITS:
            raise ValueError(f"the reference split must be train, val or test, got {split!r}")
        if getattr(self, f"{split}_set") is None:
            self.prepare_data()
            self.setup("test" if split == "test" else "fit")
        dataset = getattr(self, f"{split}_set")
        if dataset is None:
            raise ValueError(f"{type(self).__name__} has no {split} split")
        return self.unflipped_train_set() if split == "train" and self.train_flips else dataset

    def unflipped_train_set(self) -> Dataset:
        """The train split (after ``setup``) as it loads, without the random flips."""
        raise NotImplementedError(f"{type(self).__name__} flips its training images at random but does not "
                                  "implement unflipped_train_set, which reference_images needs")

    # --- loaders ---------------------------------------------------------------------------------

    # --- where a resumed run continues ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning's DataModule state): the epoch and how many of its batches have
        been trained on, so a resumed run's first loader starts where the checkpoint left off."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if done >= trainer.num_training_batches:  # saved after an epoch's last batch: a fresh epoch follows
            return {"epoch": trainer.current_epoch + 1, "batches_done": 0}
        return {"epoch": trainer.current_epoch, "batches_done": done, "world_size": trainer.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = dict(state_dict) or None

    def train_sampler(self, num_examples: int) -> EpochSeededSampler:
        """The training order; in a resumed run the first one is set to the saved epoch, less the examples trained
        on. Set here, before Lightning starts the first iterator (with loader workers that happens before any
        ``on_train_start``), and counted in the undistributed order: ranks take every W-th example of it."""
        sampler = EpochSeededSampler(num_examples, self.seed)
        position, self._resume_position = getattr(self, "_resume_position", None), None
        if position:
            sampler.set_epoch(int(position["epoch"]))
            sampler.skip = int(position["batches_done"]) * self.batch_size * int(position.get("world_size", 1))
            if sampler.skip + self.batch_size > num_examples:  # the epoch was over (no full batch left)
                sampler.set_epoch(sampler.epoch + 1)
                sampler.skip = 0
        return sampler

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{split}_dataloader() called before setup(); "
                "call prepare_data() and setup() first (the Trainer does this for you)"
            )
        n = len(dataset)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # own generators, never the global RNG: a resumed run then draws the same noise as an unbroken one
            sampler=self.train_sampler(n) if train else None,
            generator=torch.Generator().manual_seed(self.seed),
            # Dropping the ragged last batch keeps batch statistics even, but only if a full batch exists.
            drop_last=train and n >= self.batch_size,
            num_workers=self.num_workers,
            collate_fn=type(self).collate_fn,
            worker_init_fn=leave_sigterm_to_the_trainer if self.num_workers > 0 else None,
            pin_memory=self._pin_memory(),
            persistent_workers=self.num_workers > 0,
        )

    def _pin_memory(self) -> bool:
        """``pin_memory`` where it helps: batches go to a CUDA device (on a CPU, pinning only costs time and torch
        warns about it)."""
        if not self.pin_memory:
            return False
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)

    def split_lengths(self) -> dict[str, int]:
        """Number of examples per split (after ``setup``)."""
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        return {k: (0 if v is None else len(v)) for k, v in sets.items()}  # type: ignore[arg-type]
