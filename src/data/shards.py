"""``data=shards``: images prepared once by ``python -m src.data.prepare``, streamed with LitData.

The shards hold uint8 H x W x C arrays at the training resolution, so the loader workers only read bytes: no
decoding, no resizing. ``root`` is a local folder or an object-store URL (``s3://bucket/prefix``); remote shards
are downloaded chunk by chunk into a local cache (``cache_dir``, at most ``max_cache_size``) as training reaches
them. Each epoch LitData shuffles the order of the shard files and the samples within a window, from (seed,
epoch), and gives every rank, and every loader worker within it, a disjoint part of the epoch. The loader's
position is saved in every checkpoint (Lightning keeps the state of a ``StreamingDataLoader``), so a run resumed
mid-epoch reads exactly the samples the uninterrupted run would have read; the flips, decided on the device from
(seed, epoch, sample index), follow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .base import UNLABELED, check_int, leave_sigterm_to_the_trainer
from .prepare import is_remote
from .uint8_images import Uint8ImagesDataModule, collate_images

INSTALL = "pip install -e '.[data]' (LitData streams the shards)"


def shard_item(sample: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
    """A stored sample -> ``(uint8 (C, H, W), label, index in the source split)``."""
    image = torch.from_numpy(sample["image"]).permute(2, 0, 1)
    return image, int(sample.get("label", UNLABELED)), int(sample["index"])


class ShardItems(Dataset):
    """Random access to every sample of a split's shards, on any rank (sample metrics read reference images)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.count = sum(end - start for start, end in stream.region_of_interest)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        if not 0 <= i < self.count:
            raise IndexError(f"sample {i} of {self.count}")
        return self.stream[i]


def shard_loader(*args: Any, trained_batches: Any = None, **kwargs: Any) -> Any:
    """LitData's ``StreamingDataLoader`` whose saved position is the last batch trained on, not the last fetched.

    Lightning fetches a batch ahead of the step it runs (to know which batch is an epoch's last), and the
    loader counts what it has handed out: saved as it is, a resumed run would skip the prefetched batch.
    ``trained_batches()`` (the batches of this epoch whose step ran) sets the position back by the difference.
    """
    from litdata import StreamingDataLoader

    class TrainedPositionLoader(StreamingDataLoader):
        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._resumed_epoch_read = False

        def __iter__(self) -> Any:
            # LitData replays the loaded position until an iteration runs to its end, but Lightning stops an epoch
            # by its batch count: once the resumed epoch has been read, the next epoch starts afresh
            if self.restore and getattr(self, "_resumed_epoch_read", False):
                self.restore = False
            self._resumed_epoch_read = True
            yield from super().__iter__()

        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            trained = trained_batches() if trained_batches is not None else None
            ahead = state["num_samples_yielded"] // self.batch_size - trained if trained is not None else 0
            if ahead > 0:
                state["num_samples_yielded"] -= ahead * self.batch_size
                state["dataset"] = self.dataset.state_dict(state["num_samples_yielded"], self.num_workers,
                                                           self.batch_size)
                if self.num_workers:  # batches come from the workers in turn
                    state["latest_worker_idx"] = (state["latest_worker_idx"] - ahead) % self.num_workers
            return state

    return TrainedPositionLoader(*args, **kwargs)


class ShardsDataModule(Uint8ImagesDataModule):
    """Streamed shards written by ``src.data.prepare``: ``<root>/train`` (and ``<root>/val`` when prepared).

    ``image_size`` and ``channels`` say what the shards must hold (checked at setup against the first sample), so
    the model's shape is known before any data is read.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        channels: int = 3,
        batch_size: int = 64,
        random_flip: bool = True,
        num_workers: int = 8,
        pin_memory: bool = True,
        seed: int = 0,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        shuffle_window: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if root is None or str(root) in ("", "???"):
            raise ValueError("data.root must be the folder or URL that `python -m src.data.prepare out=...` wrote")
        self.root = str(root).rstrip("/")
        self.image_size = check_int(image_size, "data.image_size", 1)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"data.channels must be 1 or 3, got {channels!r}")
        self.channels = int(channels)
        self.random_flip = bool(random_flip)
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.shuffle_window = None if shuffle_window is None else check_int(shuffle_window, "data.shuffle_window", 1)

    @property
    def name(self) -> str:
        return "shards"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def _split_url(self, split: str) -> str:
        return f"{self.root}/{split}"

    def _has_split(self, split: str) -> bool:
        if is_remote(self.root):
            return split == "train" or self._remote_has(split)
        return (Path(self.root) / split / "index.json").is_file()

    def _remote_has(self, split: str) -> bool:
        try:
            self._stream(split, shuffle=False)
        except Exception:  # no index.json there: the split was not prepared
            return False
        return True

    def _stream(self, split: str, shuffle: bool) -> Any:
        try:
            from litdata import StreamingDataset
        except ImportError as err:
            raise ImportError(f"data=shards needs litdata: {INSTALL}") from err
        # decode one item at a time: LitData's default decodes a group of items per read and keeps only the
        # current group, which shuffled reads of large arrays redo for nearly every item (~9x slower measured)
        options: dict[str, Any] = {"max_cache_size": self.max_cache_size, "batch_decode": "item"}
        if self.cache_dir is not None:
            options["cache_dir"] = str(self.cache_dir)
        if self.shuffle_window is not None:
            options["item_shuffle_window"] = self.shuffle_window
        return StreamingDataset(self._split_url(split), shuffle=shuffle, seed=self.seed, drop_last=shuffle,
                                transform=shard_item, **options)

    def load_splits(self) -> None:
        if not is_remote(self.root) and not (Path(self.root) / "train" / "index.json").is_file():
            where = Path(self.root)
            what = "does not exist" if not where.exists() else "holds no prepared train split (train/index.json)"
            raise FileNotFoundError(f"shards folder {self.root!r} {what}: write it first with `python -m "
                                    f"src.data.prepare source=<lsun|celebahq|image_folder|cifar10> out={self.root}`")
        self._check_shape(self._stream("train", shuffle=False))
        self.train_set = self._stream("train", shuffle=True)
        self.val_set = self._stream("val", shuffle=False) if self._has_split("val") else None

    def _check_shape(self, stream: Any) -> None:
        image = ShardItems(stream)[0][0]
        if tuple(image.shape) != self.data_shape:
            c, h, w = image.shape
            raise ValueError(f"the shards at {self.root} hold {h}x{w} images with {c} channels, not "
                             f"{self.image_size}x{self.image_size}x{self.channels}: set data.image_size={h} "
                             f"data.channels={c}, or prepare shards at the size to train on")

    def _loader(self, dataset: Any, split: str, train: bool) -> Any:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{split}_dataloader() called before setup(), or the shards "
                               f"have no {split} split")
        # LitData splits the epoch over ranks and workers; a DataLoader sampler would not see the stream
        return shard_loader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate_images, pin_memory=self._pin_memory(), drop_last=train,
                            persistent_workers=self.num_workers > 0,
                            worker_init_fn=leave_sigterm_to_the_trainer if self.num_workers > 0 else None,
                            trained_batches=self._trained_batches if train else None,
                            # the workers' base seed from a private generator: never a draw from the global RNG,
                            # whose state (the training noise) a resumed run restores
                            generator=torch.Generator().manual_seed(self.seed))

    def _trained_batches(self) -> int | None:
        """Batches of the current epoch whose training step ran (None outside a Trainer's fit)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def reference_images(self, split: str = "train") -> Dataset:
        """Every image of ``split`` in its stored order, as ``(x in [-1, 1], label)``, never flipped."""
        from .uint8_images import Uint8Items

        if split not in ("train", "val"):
            raise ValueError(f"shards have train and val splits, not {split!r}")
        self.setup()
        if split == "val" and self.val_set is None:
            raise ValueError(f"the shards at {self.root} have no val split (prepare one with splits=[train,val] from "
                             "a source with data.val_fraction > 0)")
        return Uint8Items(ShardItems(self._stream(split, shuffle=False)))

    def unflipped_train_set(self) -> Dataset:
        return self.reference_images("train")

    def split_lengths(self) -> dict[str, int]:
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        return {k: (0 if v is None else len(ShardItems(v))) for k, v in sets.items()}
