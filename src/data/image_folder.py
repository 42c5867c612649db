"""Any folder of images (e.g. CelebA-HQ, LSUN exports), found recursively; unlabeled.

Loader workers decode each file to a uint8 (C, S, S) square (StyleGAN's preprocessing: the central square, Lanczos
to the size; a large JPEG decoded at a reduced DCT scale first); scaling to [-1, 1] and the random flips happen on the
training device (``src.data.uint8_images``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .base import UNLABELED, check_fractions, check_int, split_indices
from .decode import crop_resize
from .uint8_images import Uint8ImagesDataModule

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
PIL_MODES = {1: "L", 3: "RGB"}
MAX_LISTED = 10
# background level transparent pixels are composited onto, per data.alpha ('error' refuses transparency)
BACKGROUNDS = {"white": 255, "black": 0}
ALPHA_RULES = (*BACKGROUNDS, "error")
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
KINDS = {"1": "1-bit black-and-white", "L": "grayscale", "LA": "grayscale", "La": "grayscale", "P": "palette",
         "PA": "palette", "RGB": "RGB", "RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "F": "32-bit float"}
TARGET_KINDS = {"L": "grayscale", "RGB": "RGB"}

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header tells about an image, read without decoding its pixels."""

    path: Path
    mode: str  # the PIL mode it opens in
    size: tuple[int, int]  # (width, height)
    kind: str  # colour kind of the file: 'RGB', 'grayscale', 'palette', 'CMYK', ...
    alpha: bool  # an alpha channel, or a transparent palette entry or colour key
    sixteen_bit: bool  # 16 bits per channel in the file


def _rawmodes(img: Image.Image) -> list[str]:
    """The raw (in-file) pixel layouts of the decoder tiles, e.g. 'RGB;16B' for a 48-bit PNG."""
    out = []
    for tile in getattr(img, "tile", None) or []:
        args = tile[3]
        rawmode = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")
        out.append(rawmode)
    return out


def read_header(path: Path, img: Image.Image) -> ImageHeader:
    """Header facts of an opened (not yet decoded) image."""
    rawmodes = _rawmodes(img)
    # 'BGR;16' and the like are 16 bits per pixel (5-6-5), which PIL expands exactly: not 16 bits per channel.
    wide = [r for r in rawmodes if r.endswith((";16B", ";16L", ";16N")) or r == "L;16"]
    sixteen_bit = img.mode in SIXTEEN_BIT_MODES or bool(wide)
    # PIL opens a 16-bit LA PNG as RGBA: the raw mode names the file's own colours
    base = wide[0].split(";")[0] if wide and img.mode not in SIXTEEN_BIT_MODES else img.mode
    kind = "grayscale" if base in SIXTEEN_BIT_MODES else KINDS.get(base, base)
    alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    return ImageHeader(path, img.mode, img.size, kind, alpha, sixteen_bit)


def scale_16_bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (modes I;16*, and I taken as 0..65535) -> 8-bit L, pixel v -> round(v * 255 / 65535);
    a transparent value (PNG colour key) becomes an alpha channel (LA)."""
    values = np.asarray(img).astype(np.int64)
    pixels = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)  # rounds: v/257 is never x.5
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([pixels, alpha], axis=-1))
    return Image.fromarray(pixels)


def composite(img: Image.Image, background: int) -> Image.Image:
    """RGB of ``img`` over a uniform ``background`` level (255 white, 0 black): round((c*a + bg*(255-a)) / 255)."""
    rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)  # also applies a palette's or colour key's transparency
    color, alpha = rgba[..., :3], rgba[..., 3:]
    return Image.fromarray(((color * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8))


def to_mode(img: Image.Image, mode: str, background: int) -> Image.Image:
    """A decoded image in ``mode`` ('L' or 'RGB'): 16-bit scaled (not clipped), transparency composited."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = scale_16_bit(img)  # PIL's own convert clips every value above 255 to white
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        img = composite(img, background)
    return img if img.mode == mode else img.convert(mode)


def _images(n: int, kind: str = "") -> str:
    return f"{n} {kind + ' ' if kind else ''}image{'' if n == 1 else 's'}"


class RefusedImage(ValueError):
    """A readable image the settings refuse (transparency with data.alpha=error, or one too small)."""


def _listing(lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return "\n".join(f"  {line}" for line in lines[:MAX_LISTED]) + more


def refuse(headers: list[ImageHeader], alpha: str, min_size: int, total: int | None = None) -> None:
    """Raise RefusedImage if ``alpha`` is 'error' and an image has transparency, or an image's shorter side is
    below ``min_size`` (it would be resized up); ``total`` is the number of images, for the message."""

    def count(n: int) -> str:
        return (f"{n} of {total} images" if total is not None else _images(n)) + (" is" if n == 1 else " are")

    transparent = [h for h in headers if h.alpha]
    if alpha == "error" and transparent:
        raise RefusedImage(
            f"{count(len(transparent))} transparent (an alpha channel or a transparent colour), which "
            f"data.alpha=error refuses:\n{_listing([f'{h.path} ({h.mode})' for h in transparent])}\n"
            "Set data.alpha=white or data.alpha=black to composite them onto that background, "
            "or remove their transparency."
        )
    small = [h for h in headers if min(h.size) < min_size]
    if small:
        raise RefusedImage(
            f"{count(len(small))} smaller than data.image_size={min_size} on the shorter side and would be "
            f"resized up:\n{_listing([f'{h.path}: {h.size[0]}x{h.size[1]}' for h in small])}\n"
            "Set data.upscale=true to allow resizing images up, lower data.image_size, or remove them."
        )


class ImageFileDataset(Dataset):
    """Decodes images from a list of paths to uint8 (C, ``size``, ``size``) tensors in ``mode``; label always -1.

    16-bit grayscale is scaled to 8 bit, transparency composited onto ``alpha`` ('white' or 'black'; 'error'
    refuses it), and an image whose shorter side is below ``min_size`` is refused. Then the central square is
    resized to ``size`` (Lanczos); with ``draft`` a JPEG larger than needed decodes at a reduced DCT scale first.
    """

    def __init__(self, files: list[Path], mode: str, size: int, alpha: str = "white", min_size: int = 0,
                 draft: bool = True) -> None:
        self.files = files
        self.mode = mode
        self.size = size
        self.alpha = alpha
        self.min_size = min_size
        self.draft = draft

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                refuse([read_header(path, img)], self.alpha, self.min_size)  # on the file's own size, before draft
                if self.draft and img.format == "JPEG":
                    # before to_mode, which may return a new image that no longer knows it is a JPEG
                    img.draft(self.mode, (self.size, self.size))
                img.load()  # the full decode inside the try
                img = to_mode(img, self.mode, BACKGROUNDS.get(self.alpha, 255))
                image = crop_resize(img, self.size, self.mode, draft=False)  # drafted above where it applies
        except RefusedImage:
            raise
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            raise RuntimeError(
                f"Could not load image {str(path)!r} ({type(err).__name__}: {err}). Remove or repair "
                "the file, or set data.verify=true to find all unreadable files at setup."
            ) from err
        return image, UNLABELED


class ImageSplit(Dataset):
    """The images of ``base`` at ``indices`` as ``(uint8 image, label, i)`` items, ``i`` the index in the split
    (what ``collate_images`` batches; the flip of an example is drawn from ``i``)."""

    def __init__(self, base: ImageFileDataset, indices: list[int]) -> None:
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        image, label = self.base[self.indices[i]]
        return image, label, i


class ImageFolderDataModule(Uint8ImagesDataModule):
    """Unlabeled images from ``root`` (recursively by default): the central square of each, resized to
    ``image_size`` with Lanczos (as StyleGAN's dataset_tool made the paper's 256x256 data).

    Train/val/test are a seeded random split of the sorted file list. Hidden files and folders
    (names starting with '.') are skipped. Every image is brought to 8-bit L or RGB when loaded:
    16-bit grayscale is scaled, round(v * 255 / 65535) (PIL itself reduces 16-bit RGB/RGBA to the high
    byte, at most one level off rounding); transparency (alpha channels, transparent palette entries
    or colour keys) is composited onto ``alpha`` ('white' or 'black'), or refused with 'error'; other
    modes (palette, CMYK, grayscale in an RGB run, ...) are converted by PIL. An image whose shorter
    side is below ``image_size`` is refused unless ``upscale``. With ``draft`` a JPEG at least twice the size
    decodes at a reduced DCT scale (1/2, 1/4, 1/8; never below ``image_size``) before the resize: several times
    faster for large files (1024x1024 CelebA-HQ at 256), within about a level of the full decode (a non-square
    JPEG's central square is then placed at the reduced scale: up to one reduced pixel off centre).

    The loaders yield uint8 ``ImageBatch``es; ``on_after_batch_transfer`` scales them to [-1, 1] and, in
    training with ``random_flip``, flips each by ``flip_decisions`` on the device.

    With ``verify=True`` setup opens every file once (headers and ``Image.verify``, no pixel decoding):
    unreadable, refused and too small files are reported all at once before training starts, and one
    summary of the conversions is logged. With ``verify=False`` nothing is opened at setup and nothing
    is logged; the same rules then apply as each file is loaded, and a file breaking them fails there.
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
        alpha: str = "white",
        upscale: bool = False,
        draft: bool = True,
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
        if alpha not in ALPHA_RULES:
            raise ValueError(f"data.alpha must be one of {', '.join(ALPHA_RULES)}, got {alpha!r}")
        self.alpha = alpha
        if not isinstance(upscale, bool):
            raise ValueError(f"data.upscale must be true or false, got {upscale!r}")
        self.upscale = upscale
        if not isinstance(draft, bool):
            raise ValueError(f"data.draft must be true or false, got {draft!r}")
        self.draft = draft
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
    def scan(files: list[Path]) -> tuple[list[ImageHeader], list[tuple[Path, str]]]:
        """Headers of the readable files, and (path, error) for every file PIL cannot identify or that fails
        ``Image.verify``."""
        headers, bad = [], []
        for path in files:
            try:
                # opening reads only the header, and verify() checks structure without decoding all pixels
                with Image.open(path) as img:
                    header = read_header(path, img)
                    img.verify()
            except Exception as err:  # any failure means the file cannot be trained on
                bad.append((path, f"{type(err).__name__}: {err}"))
            else:
                headers.append(header)
        return headers, bad

    def _verify(self, files: list[Path]) -> None:
        headers, bad = self.scan(files)
        if bad:
            raise ValueError(
                f"{len(bad)} of {len(files)} image files under {str(self.root)!r} are unreadable:\n"
                f"{_listing([f'{path}: {error}' for path, error in bad])}\n"
                "Remove or repair them, or set data.verify=false to skip this scan at setup "
                "(an unreadable file then fails when it is loaded)."
            )
        refuse(headers, self.alpha, self._min_size, total=len(files))
        log.info(self.summary(headers))

    @property
    def _min_size(self) -> int:
        return 0 if self.upscale else self.image_size

    def summary(self, headers: list[ImageHeader]) -> str:
        """One line saying what loading will convert in these images."""
        target = TARGET_KINDS[PIL_MODES[self.channels]]
        kinds = Counter(h.kind for h in headers if h.kind != target)
        done = [f"converted {_images(n, kind)} to {target}" for kind, n in sorted(kinds.items())]
        if n := sum(h.alpha for h in headers):
            done.append(f"composited {_images(n, 'transparent')} onto {self.alpha}")
        if n := sum(h.sixteen_bit for h in headers):
            done.append(f"scaled {_images(n, '16-bit')} to 8 bit")
        what = ", ".join(done) if done else f"all 8-bit {target} without transparency, nothing to convert"
        return f"{self.name}: {_images(len(headers))}; {what}"

    def load_splits(self) -> None:
        files = self.find_images()
        if self.verify:
            self._verify(files)
        self.files = files
        full = ImageFileDataset(files, PIL_MODES[self.channels], self.image_size, self.alpha, self._min_size,
                                self.draft)
        train_idx, val_idx, test_idx = split_indices(len(full), self.val_fraction, self.test_fraction, self.seed)
        self.train_set, self.val_set, self.test_set = (ImageSplit(full, idx) for idx in (train_idx, val_idx, test_idx))
