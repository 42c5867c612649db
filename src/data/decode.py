"""Decoding one encoded image to a training-ready uint8 square: the preprocessing of the paper's 256x256 data.

LSUN (and CelebA-HQ) reach the reference code as StyleGAN-format records, made by StyleGAN's ``dataset_tool``: the
central square of each image (side = its shorter side), resized to 256x256 with PIL's antialiasing (Lanczos) filter.
``crop_resize`` does exactly that. A JPEG larger than it needs to be is first decoded at a reduced scale
(``Image.draft``: libjpeg's DCT scaling by 1/2, 1/4 or 1/8, never below the target size), which for 1024x1024
CelebA-HQ files skips 15/16 of the decoding work; the Lanczos resize then brings it to the exact size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RGB = "RGB"


def open_image(source: bytes | str | Path) -> Image.Image:
    """An image opened (not yet decoded) from its encoded bytes or a file path."""
    return Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source)


def crop_resize(img: Image.Image, size: int, mode: str = RGB, draft: bool = True) -> torch.Tensor:
    """The central square of ``img`` resized to ``size`` x ``size`` (Lanczos), as uint8 (C, H, W) in ``mode``.

    ``draft``: let a JPEG decode at the smallest DCT scale that keeps both sides >= ``size`` (a no-op for other
    formats and for JPEGs already near the size)."""
    if draft and img.format == "JPEG":
        img.draft(mode, (size, size))
    img = img.convert(mode) if img.mode != mode else img
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if width != height:
        # crop first, as dataset_tool does: resize(box=...) would also read pixels outside the box (the filter's
        # support at the edges), changing the outermost output columns or rows
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.LANCZOS)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # one copy, straight into C x H x W


def decode_square(source: bytes | str | Path, size: int, mode: str = RGB, draft: bool = True) -> torch.Tensor:
    """``crop_resize`` of an encoded image (bytes or a path); raises whatever PIL raises for a bad one."""
    with open_image(source) as img:
        return crop_resize(img, size, mode, draft)
