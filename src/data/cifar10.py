"""CIFAR-10 via torchvision: 50k train images (random horizontal flips), 10k test images."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive
from torchvision.transforms import Compose, RandomHorizontalFlip

from .base import TransformedSubset, check_fractions, pil_to_unit_range, split_indices
from .resident import DeviceResidentDataModule

FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
ARCHIVE = CIFAR10.filename  # "cifar-10-python.tar.gz"


class UncheckedCIFAR10(CIFAR10):
    """CIFAR10 whose integrity check only requires the files to exist.

    Used for custom copies (``verify_checksums=False``) and after the DataModule has already
    checked the MD5s itself. torchvision's ``check_integrity`` skips the MD5 when given None, so
    clearing the checksums is enough; the real pickle format is still parsed by torchvision's loader.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def _expected_files() -> list[tuple[str, str]]:
    entries = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return [(name, md5) for name, md5 in entries]


class CIFAR10DataModule(DeviceResidentDataModule):
    """CIFAR-10 with pixels mapped to [-1, 1] (v/127.5 - 1).

    Train is the 50k train split, flipped horizontally at random when ``random_flip``. Val is the
    10k test split unless ``val_fraction > 0``, which holds out that fraction of the train split
    instead (never flipped). Test is the test split. ``data_dir`` must hold ``cifar-10-batches-py``
    (or the archive ``cifar-10-python.tar.gz``, which is extracted); ``download=True`` fetches it.
    ``verify_checksums=False`` accepts a custom copy whose files do not match torchvision's MD5s.
    ``device_resident=True`` keeps the training images as one uint8 tensor on the training device (150 MB for
    the 50k) and gathers, flips and scales batches there (see ``src.data.resident``).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        batch_size: int = 128,
        download: bool = True,
        random_flip: bool = True,
        val_fraction: float = 0.0,
        verify_checksums: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory,
                         device_resident=device_resident)
        if data_dir is None or str(data_dir) == "":
            raise ValueError("data.data_dir must be a directory path, got an empty value")
        self.data_dir = Path(data_dir).expanduser()
        self.download = bool(download)
        self.random_flip = bool(random_flip)
        self.val_fraction, _ = check_fractions(val_fraction, 0.0)
        self.verify_checksums = bool(verify_checksums)

    @property
    def name(self) -> str:
        return "cifar10"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def num_classes(self) -> int | None:
        return 10

    # --- locating / checking the files -------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.data_dir / FOLDER

    def _missing_files(self) -> list[str]:
        return [name for name, _ in _expected_files() if not (self.folder / name).is_file()]

    def _mismatched_files(self) -> list[str]:
        return [name for name, md5 in _expected_files() if not check_integrity(str(self.folder / name), md5)]

    def _missing_error(self, reason: str) -> RuntimeError:
        return RuntimeError(
            f"CIFAR-10 not found: {reason}. Looked in data.data_dir={str(self.data_dir)!r} "
            f"(resolved to {str(self.data_dir.resolve())!r}) for the folder '{FOLDER}' "
            f"(with data_batch_1..5, test_batch, batches.meta) or the archive '{ARCHIVE}'. "
            f"To fix: set data.download=true on a machine with internet access, or download "
            f"{CIFAR10.url} manually and place the archive (or its extracted '{FOLDER}' folder) in "
            f"that directory, or point data.data_dir at the directory that holds it."
        )

    def _check_files(self) -> None:
        """Raise a clear error if the extracted files are missing or fail the checksum."""
        missing = self._missing_files()
        if missing:
            raise self._missing_error(f"missing {', '.join(missing)} in {str(self.folder)!r}")
        if self.verify_checksums:
            bad = self._mismatched_files()
            if bad:
                raise RuntimeError(
                    f"CIFAR-10 files in {str(self.folder)!r} failed the MD5 checksum check: "
                    f"{', '.join(bad)}. They are corrupt or not the official release. Delete the folder "
                    f"'{FOLDER}' (and any '{ARCHIVE}') to re-download with data.download=true, or set "
                    f"data.verify_checksums=false if this is a deliberate custom copy."
                )

    def _try_extract_archive(self) -> bool:
        archive = self.data_dir / ARCHIVE
        if not archive.is_file():
            return False
        if self.verify_checksums and not check_integrity(str(archive), CIFAR10.tgz_md5):
            raise RuntimeError(
                f"The archive {str(archive)!r} failed the MD5 checksum check (corrupt or partial "
                f"download). Delete it and re-download with data.download=true, or set "
                f"data.verify_checksums=false if it is a deliberate custom copy."
            )
        extract_archive(str(archive), str(self.data_dir))
        return True

    def prepare_data(self) -> None:
        """Download (rank 0 only) or extract the archive if the folder is missing, then check files."""
        if not self._missing_files():
            self._check_files()
            return
        if self._try_extract_archive():
            self._check_files()
            return
        if not self.download:
            raise self._missing_error("data.download=false and the files are not there")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(
                CIFAR10.url, str(self.data_dir), filename=ARCHIVE, md5=CIFAR10.tgz_md5
            )
        except Exception as err:  # network errors come in many types; all mean the same to the user
            raise self._missing_error(f"the download failed ({type(err).__name__}: {err})") from err
        self._check_files()

    # --- datasets ----------------------------------------------------------------------------

    def resident_train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split as uint8 (N, 3, 32, 32) images and int64 labels, in ``train_set``'s order."""
        subset = self.train_set
        full = subset.base  # type: ignore[union-attr]
        index = torch.as_tensor(subset.indices, dtype=torch.long)  # type: ignore[union-attr]
        images = torch.from_numpy(full.data)[index].permute(0, 3, 1, 2).contiguous()  # stored as (N, H, W, C)
        return images, torch.as_tensor(full.targets, dtype=torch.long)[index]

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32) / 127.5 - 1  # the same operations as pil_to_unit_range: equal values

    def unflipped_train_set(self) -> Dataset:
        subset = self.train_set
        return TransformedSubset(subset.base, subset.indices, pil_to_unit_range)  # type: ignore[union-attr]

    def load_splits(self) -> None:
        # prepare_data runs on rank 0 only; every rank checks the files it is about to read.
        self._check_files()
        # _check_files already verified the MD5s if asked to; hashing again in torchvision is wasted time.
        train_full = UncheckedCIFAR10(root=str(self.data_dir), train=True, download=False)
        test_full = UncheckedCIFAR10(root=str(self.data_dir), train=False, download=False)

        train_transform = (
            Compose([RandomHorizontalFlip(), pil_to_unit_range]) if self.random_flip else pil_to_unit_range
        )
        if self.val_fraction > 0:
            train_idx, val_idx, _ = split_indices(len(train_full), self.val_fraction, 0.0, self.seed)
            self.train_set = TransformedSubset(train_full, train_idx, train_transform)
            self.val_set = TransformedSubset(train_full, val_idx, pil_to_unit_range)
        else:
            self.train_set = TransformedSubset(train_full, None, train_transform)
            self.val_set = TransformedSubset(test_full, None, pil_to_unit_range)
        self.test_set = TransformedSubset(test_full, None, pil_to_unit_range)
