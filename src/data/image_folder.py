"""Any folder of images (e.g. CelebA-HQ, LSUN exports), found recursively; unlabeled."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import CenterCrop, Compose, RandomHorizontalFlip, Resize

from .base import (
    UNLABELED,
    BaseDataModule,
    TransformedSubset,
    check_fractions,
    check_int,
    pil_to_unit_range,
    split_indices,
)

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
PIL_MODES = {1: "L", 3: "RGB"}
MAX_LISTED = 10


def _normalise_extensions(extensions: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = [extensions]
    out = []
    for ext in extensions:
        ext = str(ext).strip().lower()
        if not ext or ext == ".":
            raise ValueError(f"data.extensions must be non-empty suffixes like '.png', got {ext!r}")
        out.append(ext if ext.startswith(".") else "." + ext)
    if not out:
        raise ValueError("data.extensions must list at least one suffix, e.g. ['.png', '.jpg']")
    return tuple(dict.fromkeys(out))


def list_files(root: Path, recursive: bool) -> list[Path]:
    """Sorted regular files under ``root`` (following symlinks), skipping hidden files and folders."""
    found = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            # Hidden entries are OS metadata (e.g. macOS '._x.png'), not images.
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    else:
        found = [p for p in root.iterdir() if not p.name.startswith(".")]
    # Sorting makes the file order, hence the seeded split, identical on every machine and rank.
    return sorted(p for p in found if p.is_file())


class ImageFileDataset(Dataset):
    """Loads images from a list of paths as PIL images in ``mode``; label is always -1."""

    def __init__(self, files: list[Path], mode: str) -> None:
        self.files = files
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)  # forces the full decode inside the try
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            raise RuntimeError(
                f"Could not load image {str(path)!r} ({type(err).__name__}: {err}). Remove or repair "
                "the file, or set data.verify=true to find all unreadable files at setup."
            ) from err
        return img, UNLABELED


class ImageFolderDataModule(BaseDataModule):
    """Unlabeled images from ``root`` (recursively by default), resized and center-cropped to a square.

    Train/val/test are a seeded random split of the sorted file list. Hidden files and folders
    (names starting with '.') are skipped. With ``verify=True`` every file is checked with PIL at
    setup so unreadable files are reported all at once, before training starts.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 64,
        random_flip: bool = True,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        recursive: bool = True,
        verify: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if root is None or str(root) == "":
            raise ValueError("data.root must be the path of a folder of images, got an empty value")
        self.root = Path(root).expanduser()
        self.image_size = check_int(image_size, "data.image_size", 1)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels not in PIL_MODES:
            raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.channels = int(channels)
        self.random_flip = bool(random_flip)
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)
        self.extensions = _normalise_extensions(extensions)
        self.recursive = bool(recursive)
        self.verify = bool(verify)
        self.files: list[Path] | None = None

    @property
    def name(self) -> str:
        return "image_folder"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def find_images(self) -> list[Path]:
        """Sorted image files under ``root``; raises if the folder is missing or holds no images."""
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise FileNotFoundError(
                f"Image folder {str(self.root)!r} {what} (resolved to {str(self.root.resolve())!r}); "
                "set data.root to a folder of images"
            )
        files = list_files(self.root, self.recursive)
        images = [p for p in files if p.suffix.lower() in self.extensions]
        if not images:
            where = "in or below" if self.recursive else "directly in"
            raise ValueError(
                f"No images with extensions {', '.join(self.extensions)} found {where} {str(self.root)!r} "
                f"({len(files)} other files found). Point data.root at the right folder, or add the "
                "suffixes your files use to data.extensions"
                + ("" if self.recursive else " (or set data.recursive=true to search subfolders)")
            )
        return images

    @staticmethod
    def find_unreadable(files: list[Path]) -> list[tuple[Path, str]]:
        """(path, error) for every file PIL cannot identify or that fails ``Image.verify``."""
        bad = []
        for path in files:
            try:
                # verify() checks structure without decoding all pixels, so it is cheap.
                with Image.open(path) as img:
                    img.verify()
            except Exception as err:  # any failure means the file cannot be trained on
                bad.append((path, f"{type(err).__name__}: {err}"))
        return bad

    def _verify(self, files: list[Path]) -> None:
        bad = self.find_unreadable(files)
        if not bad:
            return
        listed = "\n".join(f"  {path}: {error}" for path, error in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise ValueError(
            f"{len(bad)} of {len(files)} image files under {str(self.root)!r} are unreadable:\n"
            f"{listed}{more}\n"
            "Remove or repair them, or set data.verify=false to skip this check "
            "(an unreadable file then fails when it is loaded)."
        )

    def _transform(self, train: bool) -> Compose:
        steps = [Resize(self.image_size), CenterCrop(self.image_size)]  # Resize(int) scales the shorter side
        if train and self.random_flip:
            steps.append(RandomHorizontalFlip())
        steps.append(pil_to_unit_range)
        return Compose(steps)

    def prepare_data(self) -> None:
        # Local data: nothing to download.
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.is_setup:
            return
        files = self.find_images()
        if self.verify:
            self._verify(files)
        self.files = files
        full = ImageFileDataset(files, PIL_MODES[self.channels])
        train_idx, val_idx, test_idx = split_indices(
            len(full), self.val_fraction, self.test_fraction, self.seed
        )
        self.train_set = TransformedSubset(full, train_idx, self._transform(train=True))
        self.val_set = TransformedSubset(full, val_idx, self._transform(train=False))
        self.test_set = TransformedSubset(full, test_idx, self._transform(train=False))
