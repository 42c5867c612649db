"""ImageFolderDataModule on real-world files: 16-bit, transparency, other modes, small images, JPEG draft decoding,
the uint8 batches, its configs (image_folder, celebahq)."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from src.data import ImageFolderDataModule
from src.data.image_folder import DEFAULT_EXTENSIONS, to_mode
from src.data.synthetic import write_image_folder
from src.data.uint8_images import ImageBatch, flip_decisions, to_unit_range

SIZE = 16
LOGGER = "src.data.image_folder"


def write_png16(path: Path, values: np.ndarray, extra: bytes = b"") -> None:
    """A 16-bit PNG of uint16 ``values``, (H, W) gray or (H, W, C) with C = 2 (LA), 3 (RGB), 4 (RGBA); PIL
    cannot write 48/64-bit ones. ``extra``: chunks placed before the image data (e.g. tRNS)."""
    height, width = values.shape[:2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if values.ndim == 2 else values.shape[2]]
    rows = values.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def load_all(root: Path, **kwargs) -> torch.Tensor:
    """Every image under ``root`` in file order, decoded and scaled to [-1, 1] as the model gets it unflipped."""
    dm = ImageFolderDataModule(root=root, image_size=SIZE, batch_size=1, val_fraction=0.0, random_flip=False,
                               **kwargs)
    dm.setup("fit")
    base = dm.train_set.base
    return torch.stack([to_unit_range(base[i][0]) for i in range(len(base))])


def pil_square(path: Path, size: int, mode: str = "RGB", draft: bool = False) -> torch.Tensor:
    """StyleGAN's preprocessing written out in PIL: the central square, then Lanczos to ``size``; with ``draft`` a
    JPEG decodes at the DCT scale PIL picks for ``size`` first. uint8 (C, size, size)."""
    with Image.open(path) as img:
        if draft:
            img.draft(mode, (size, size))
        img = img.convert(mode)
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.array(img).reshape(size, size, -1)).permute(2, 0, 1)


def unit(pixels) -> torch.Tensor:
    """8-bit pixel values -> the exact [-1, 1] values the data module yields."""
    return torch.as_tensor(np.asarray(pixels, dtype=np.float32)) / 127.5 - 1


def to_8_bit(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535)


# 16 x 16 16-bit values: 257 * k for every 8-bit level k (= 65535 * k / 255, must give exactly k) ...
LEVELS = (np.arange(256, dtype=np.uint16) * 257).reshape(SIZE, SIZE)
# ... and values in between, where scaling rounds (e.g. 255 -> 1, 386 -> 2) and truncating would not.
BETWEEN = np.random.default_rng(0).integers(0, 65536, size=(SIZE, SIZE)).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# 16-bit images
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path, channels: int):
    Image.fromarray(LEVELS).save(tmp_path / "a_levels.png")
    Image.fromarray(BETWEEN).save(tmp_path / "b_between.png")
    with Image.open(tmp_path / "a_levels.png") as img:
        assert img.mode in ("I;16", "I")  # what PIL opens a 16-bit gray PNG as (older Pillow: I)
    x = load_all(tmp_path, channels=channels)
    assert x.shape == (2, channels, SIZE, SIZE)
    assert torch.equal(x[0], unit(np.arange(256).reshape(SIZE, SIZE)).expand(channels, -1, -1))
    assert torch.equal(x[1], unit(to_8_bit(BETWEEN)).expand(channels, -1, -1))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16_bit_modes_scale_to_8_bit(mode: str):
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    img = Image.frombytes(mode, (SIZE, SIZE), BETWEEN.astype(dtype).tobytes())
    assert np.array_equal(np.asarray(img), BETWEEN)
    for target in ("L", "RGB"):
        out = to_mode(img, target, 255)
        assert out.mode == target
        got = np.asarray(out)
        assert np.array_equal(got if target == "L" else got[..., 1], to_8_bit(BETWEEN))


def test_16_bit_rgb_png(tmp_path: Path):
    # PIL opens a 48-bit RGB PNG as 8-bit RGB itself, keeping the high byte of each value; at 257 * k that
    # is exactly k (elsewhere it may be one level below rounding).
    levels = np.stack([LEVELS, LEVELS[::-1], LEVELS.T], axis=-1)
    write_png16(tmp_path / "rgb48.png", levels)
    with Image.open(tmp_path / "rgb48.png") as img:
        assert img.mode == "RGB"
    x = load_all(tmp_path)
    k = np.arange(256).reshape(SIZE, SIZE)
    assert torch.equal(x[0], unit(np.stack([k, k[::-1], k.T])))


def test_16_bit_grayscale_transparent_value(tmp_path: Path):
    # a tRNS colour key on a 16-bit gray PNG names a 16-bit value: those pixels are transparent
    write_png16(tmp_path / "keyed.png", LEVELS, extra=chunk(b"tRNS", struct.pack(">H", 257 * 3)))
    x = load_all(tmp_path, alpha="black", channels=1)[0, 0]
    expected = unit(np.arange(256).reshape(SIZE, SIZE))
    expected[0, 3] = -1  # level 3 sits at (0, 3): composited onto black
    assert torch.equal(x, expected)


# --------------------------------------------------------------------------------------------
# Transparency
# --------------------------------------------------------------------------------------------

UNDER = (200, 30, 40)  # the colour hidden under the transparent pixel
OPAQUE = (10, 120, 250)
HALF = (90, 180, 60)  # at alpha 128


def write_transparent(path: Path, kind: str) -> None:
    """A 16 x 16 image of ``kind`` whose pixel (0, 0) is transparent over ``UNDER``, (0, 1) half transparent
    (RGBA and LA only) and the rest opaque ``OPAQUE``."""
    rgb = np.broadcast_to(np.array(OPAQUE, np.uint8), (SIZE, SIZE, 3)).copy()
    rgb[0, 0], rgb[0, 1] = UNDER, HALF
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 128
    if kind == "RGBA":
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
    elif kind == "LA":
        Image.fromarray(np.dstack([rgb[..., 0], alpha])).save(path)
    elif kind == "P":  # palette image with a transparent entry
        img = Image.fromarray((alpha > 0).astype(np.uint8), mode="P")
        img.putpalette([*UNDER, *OPAQUE])
        img.save(path, transparency=0)
    elif kind == "RGB-key":  # RGB PNG with a transparent colour (tRNS colour key)
        rgb[0, 1] = OPAQUE
        Image.fromarray(rgb).save(path, transparency=UNDER)
    else:
        raise ValueError(kind)


def over(color: tuple[int, ...], alpha: int, background: int) -> list[int]:
    return [round((c * alpha + background * (255 - alpha)) / 255) for c in color]


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "RGB-key"])
@pytest.mark.parametrize(("alpha", "background"), [("white", 255), ("black", 0)])
def test_transparency_is_composited(tmp_path: Path, kind: str, alpha: str, background: int):
    write_transparent(tmp_path / "t.png", kind)
    x = load_all(tmp_path, **({} if alpha == "white" else {"alpha": alpha}))[0]  # white is the default
    gray = kind == "LA"
    opaque, half = ((OPAQUE[0],) * 3, (HALF[0],) * 3) if gray else (OPAQUE, HALF)
    assert torch.equal(x[:, 0, 0], unit([background] * 3))  # not UNDER
    if kind in ("RGBA", "LA"):
        assert torch.equal(x[:, 0, 1], unit(over(half, 128, background)))
    assert torch.equal(x[:, 1:], unit(opaque).view(3, 1, 1).expand(3, SIZE - 1, SIZE))


def test_transparency_composited_for_grayscale_runs(tmp_path: Path):
    write_transparent(tmp_path / "t.png", "RGBA")
    x = load_all(tmp_path, channels=1)[0, 0]
    luma = Image.new("RGB", (1, 1), OPAQUE).convert("L").getpixel((0, 0))
    assert x[0, 0] == 1 and x[5, 5] == unit(luma)


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "RGB-key"])
def test_alpha_error_refuses_transparent_images(tmp_path: Path, kind: str):
    write_png_rgb(tmp_path / "plain.png")
    write_transparent(tmp_path / "t.png", kind)
    dm = ImageFolderDataModule(root=tmp_path, image_size=SIZE, batch_size=1, val_fraction=0.0, alpha="error")
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "t.png") in message and "plain.png" not in message
    assert "1 of 2 images" in message and "data.alpha=error" in message and "data.alpha=white" in message
    # without the setup scan the same rule holds when the file is loaded
    dm = ImageFolderDataModule(root=tmp_path, image_size=SIZE, batch_size=1, val_fraction=0.0, alpha="error",
                               verify=False)
    dm.setup("fit")
    base = dm.train_set.base
    assert base[0][0].shape == (3, SIZE, SIZE)  # plain.png
    with pytest.raises(ValueError, match="data.alpha=white") as info:
        base[1]
    assert str(tmp_path / "t.png") in str(info.value)


def test_alpha_must_be_a_known_rule(tmp_path: Path):
    with pytest.raises(ValueError, match=r"data\.alpha.*white, black, error.*'grey'"):
        ImageFolderDataModule(root=tmp_path, alpha="grey")


# --------------------------------------------------------------------------------------------
# One summary of the conversions
# --------------------------------------------------------------------------------------------


def write_png_rgb(path: Path, size: tuple[int, int] = (SIZE, SIZE)) -> None:
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def mixed_root(tmp_path: Path) -> Path:
    """Two RGB, two palette, one grayscale, one CMYK, one RGBA and one 16-bit gray image."""
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    write_png_rgb(root / "rgb_0.png")
    write_png_rgb(root / "sub" / "rgb_1.jpg")
    for i in range(2):
        Image.new("RGB", (SIZE, SIZE), (i * 100, 50, 9)).convert("P").save(root / f"palette_{i}.png")
    Image.new("L", (SIZE, SIZE), 77).save(root / "gray.png")
    Image.new("CMYK", (SIZE, SIZE), (0, 50, 100, 10)).save(root / "cmyk.tif")
    write_transparent(root / "sub" / "rgba.png", "RGBA")
    Image.fromarray(BETWEEN).save(root / "gray16.png")
    return root


def summaries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_conversions_logged_once(mixed_root: Path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    dm = ImageFolderDataModule(root=mixed_root, image_size=SIZE, batch_size=2, val_fraction=0.25, num_workers=1)
    dm.setup("fit")
    dm.setup("test")
    for loader, train in ((dm.train_dataloader(), True), (dm.val_dataloader(), False)):
        for batch in loader:  # loaded in a worker process
            x, _ = dm.to_model_batch(batch, train=train)
            assert x.shape[1:] == (3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    assert summaries(caplog) == [
        "image_folder: 8 images; converted 1 CMYK image to RGB, converted 2 grayscale images to RGB, "
        "converted 2 palette images to RGB, composited 1 transparent image onto white, "
        "scaled 1 16-bit image to 8 bit"
    ]


def test_conversions_logged_for_grayscale_runs(mixed_root: Path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    ImageFolderDataModule(root=mixed_root, image_size=SIZE, channels=1, batch_size=2, alpha="black").setup("fit")
    [message] = summaries(caplog)
    assert "converted 3 RGB images to grayscale" in message and "2 palette images to grayscale" in message
    assert "composited 1 transparent image onto black" in message and "grayscale images" not in message


def test_nothing_to_convert_and_verify_false(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    for i in range(3):
        write_png_rgb(tmp_path / f"{i}.png")
    ImageFolderDataModule(root=tmp_path, image_size=SIZE, batch_size=1).setup("fit")
    assert summaries(caplog) == ["image_folder: 3 images; all 8-bit RGB without transparency, nothing to convert"]
    caplog.clear()
    ImageFolderDataModule(root=tmp_path, image_size=SIZE, batch_size=1, verify=False).setup("fit")
    assert summaries(caplog) == []  # nothing is opened at setup


# --------------------------------------------------------------------------------------------
# Images smaller than the training size
# --------------------------------------------------------------------------------------------


def test_small_images_refused(tmp_path: Path):
    write_png_rgb(tmp_path / "big.png", (64, 80))  # the shorter side equals image_size: fine
    for i in range(12):
        write_png_rgb(tmp_path / f"small_{i:02d}.png", (3, 3) if i else (100, 9))
    with pytest.raises(ValueError) as info:
        ImageFolderDataModule(root=tmp_path, image_size=64, batch_size=1).setup("fit")
    message = str(info.value)
    assert "12 of 13 images" in message and "data.image_size=64" in message
    assert f"{tmp_path / 'small_00.png'}: 100x9" in message and f"{tmp_path / 'small_01.png'}: 3x3" in message
    assert "small_09.png" in message and "small_10.png" not in message and "and 2 more" in message
    assert "big.png" not in message
    assert "data.upscale=true" in message and "lower data.image_size" in message


def test_small_images_allowed_with_upscale(tmp_path: Path):
    for i in range(2):
        write_png_rgb(tmp_path / f"{i}.png", (3, 3))
    dm = ImageFolderDataModule(root=tmp_path, image_size=64, batch_size=2, val_fraction=0.0, upscale=True)
    dm.setup("fit")
    x, _ = dm.to_model_batch(next(iter(dm.train_dataloader())), train=True)
    assert x.shape == (2, 3, 64, 64)
    assert torch.equal(dm.train_set.base[0][0], pil_square(tmp_path / "0.png", 64))  # Lanczos up from 3x3


def test_small_images_refused_when_loaded_without_verify(tmp_path: Path):
    write_png_rgb(tmp_path / "tiny.png", (3, 3))
    dm = ImageFolderDataModule(root=tmp_path, image_size=64, batch_size=1, val_fraction=0.0, verify=False)
    dm.setup("fit")
    with pytest.raises(ValueError, match="data.upscale=true") as info:
        next(iter(dm.train_dataloader()))
    assert f"{tmp_path / 'tiny.png'}: 3x3" in str(info.value)


def test_upscale_must_be_a_bool(tmp_path: Path):
    with pytest.raises(ValueError, match=r"data\.upscale"):
        ImageFolderDataModule(root=tmp_path, upscale="false")


def test_draft_must_be_a_bool(tmp_path: Path):
    with pytest.raises(ValueError, match=r"data\.draft"):
        ImageFolderDataModule(root=tmp_path, draft="true")


# --------------------------------------------------------------------------------------------
# Centre square and Lanczos; JPEG draft decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 24), (24, 41), (96, 32)])
@pytest.mark.parametrize("channels", [1, 3])
def test_central_square_resized_with_lanczos(tmp_path: Path, size: tuple[int, int], channels: int):
    write_png_rgb(tmp_path / "a.png", size)
    dm = ImageFolderDataModule(root=tmp_path, image_size=SIZE, channels=channels, batch_size=1, val_fraction=0.0)
    dm.setup("fit")
    image, label, index = dm.train_set[0]
    assert image.dtype == torch.uint8 and image.shape == (channels, SIZE, SIZE) and (label, index) == (-1, 0)
    assert torch.equal(image, pil_square(tmp_path / "a.png", SIZE, "L" if channels == 1 else "RGB"))


def write_jpeg(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    rng = np.random.default_rng(len(path.name))
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    smooth = 127 + 100 * np.sin(x / 7.0 + rng.uniform(0, 3)) * np.cos(y / 11.0)  # like a photo, not noise
    rgb = np.clip(smooth[..., None] + rng.normal(0, 6, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, quality=90)


@pytest.mark.parametrize(("kind", "channels"), [("RGB", 3), ("RGB", 1), ("L", 3), ("CMYK", 3)])
@pytest.mark.parametrize("extra", [0, 5])
def test_jpeg_draft_decodes_at_reduced_scale(tmp_path: Path, kind: str, channels: int, extra: int):
    """A JPEG of 4x the size decodes at 1/4 scale with draft (as PIL's own draft does it), in full without."""
    write_jpeg(tmp_path / "a.jpg", (4 * SIZE + extra, 4 * SIZE), kind)
    mode = "L" if channels == 1 else "RGB"
    items = {}
    for draft in (True, False):
        dm = ImageFolderDataModule(root=tmp_path, image_size=SIZE, channels=channels, batch_size=1,
                                   val_fraction=0.0, draft=draft)
        dm.setup("fit")
        items[draft] = dm.train_set[0][0]
        assert items[draft].shape == (channels, SIZE, SIZE) and items[draft].dtype == torch.uint8
        assert torch.equal(items[draft], pil_square(tmp_path / "a.jpg", SIZE, mode, draft))
    assert not torch.equal(items[True], items[False])  # the draft did apply
    if not extra:  # a non-square draft crops its centre at the reduced scale: shifted by up to 2 source pixels here
        assert (items[True].float() - items[False].float()).abs().mean() < 2


def test_draft_leaves_other_formats_and_small_jpegs_alone(tmp_path: Path):
    write_png_rgb(tmp_path / "a.png", (4 * SIZE, 4 * SIZE))
    write_jpeg(tmp_path / "b.jpg", (2 * SIZE - 1, 2 * SIZE + 3))  # under twice the size: no DCT scaling
    dm = ImageFolderDataModule(root=tmp_path, image_size=SIZE, batch_size=1, val_fraction=0.0)
    dm.setup("fit")
    assert dm.draft is True
    assert torch.equal(dm.train_set[0][0], pil_square(tmp_path / "a.png", SIZE))
    assert torch.equal(dm.train_set[1][0], pil_square(tmp_path / "b.jpg", SIZE))


def test_refusals_see_the_size_before_draft(tmp_path: Path):
    write_jpeg(tmp_path / "a.jpg", (8 * SIZE, 8 * SIZE - 1))  # drafts to 1/4 scale, still >= 2 * SIZE
    dm = ImageFolderDataModule(root=tmp_path, image_size=2 * SIZE, batch_size=1, val_fraction=0.0, verify=False)
    dm.setup("fit")
    assert dm.train_set[0][0].shape == (3, 2 * SIZE, 2 * SIZE)
    write_jpeg(tmp_path / "a.jpg", (8 * SIZE, 2 * SIZE - 1))
    with pytest.raises(ValueError, match=f"{8 * SIZE}x{2 * SIZE - 1}"):
        dm.train_set[0]


# --------------------------------------------------------------------------------------------
# uint8 batches: scaled and flipped after the transfer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_flip", [True, False])
def test_loader_batches_are_uint8_and_flip_by_hash(tmp_path: Path, random_flip: bool):
    for i in range(8):
        write_png_rgb(tmp_path / f"{i}.png", (SIZE + i, SIZE))
    dm = ImageFolderDataModule(root=tmp_path, image_size=SIZE, batch_size=4, val_fraction=0.25, seed=3,
                               random_flip=random_flip)
    dm.setup("fit")
    split = [to_unit_range(dm.train_set[i][0]) for i in range(len(dm.train_set))]
    flips = 0
    for epoch in range(3):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            assert isinstance(batch, ImageBatch) and batch.image.dtype == torch.uint8
            assert batch.image.shape == (4, 3, SIZE, SIZE) and (batch.label == -1).all()
            flip = flip_decisions(batch.index, dm.seed, epoch)
            for train in (True, False):
                x, y = dm.to_model_batch(batch, train=train, epoch=epoch)
                assert x.dtype == torch.float32 and y.dtype == torch.long and -1 <= x.min() and x.max() <= 1
                for row, i, f in zip(x, batch.index.tolist(), flip.tolist(), strict=True):
                    flipped = train and random_flip and f
                    assert torch.equal(row, split[i].flip(-1) if flipped else split[i])
                    flips += flipped
    assert (flips > 0) == random_flip
    for batch in dm.val_dataloader():
        x, _ = dm.to_model_batch(batch, train=False)
        assert torch.equal(x[0], to_unit_range(dm.val_set[0][0]))


def test_trainer_gets_float_batches(tmp_path: Path):
    """Through a real Trainer: on_after_batch_transfer hands the steps float (x, y), not the uint8 batch."""
    import lightning as L

    seen, validated = [], []

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, _):
            x, y = batch
            assert x.dtype == torch.float32 and x.shape == (2, 3, SIZE, SIZE)
            assert -1 <= x.min() and x.max() <= 1 and y.dtype == torch.long and y.shape == (2,)
            seen.append(x)
            return (self.weight * x).pow(2).mean()

        def validation_step(self, batch, _):
            x, _ = batch
            assert x.dtype == torch.float32 and x.shape == (1, 3, SIZE, SIZE)
            validated.append(x)


        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for i in range(5):
        write_png_rgb(tmp_path / f"{i}.png", (SIZE, SIZE + 2))
    dm = ImageFolderDataModule(root=tmp_path, image_size=SIZE, batch_size=2, val_fraction=0.2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.global_step == 2 and len(seen) == 2
    [x] = validated  # one epoch of two batches, then its validation: never flipped
    assert torch.equal(x[0], to_unit_range(dm.val_set[0][0]))


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


def test_config_keys_override_without_plus(compose_cfg, tmp_path: Path):
    write_png_rgb(tmp_path / "a.png")
    write_png_rgb(tmp_path / "b.jpg")
    cfg = compose_cfg("data=image_folder", f"data.root={tmp_path}", "data.extensions=[.png]", "data.alpha=black",
                      "data.upscale=true", f"data.image_size={SIZE}", "data.val_fraction=0")
    dm = instantiate(cfg.data)
    assert dm.extensions == (".png",) and dm.alpha == "black" and dm.upscale is True
    dm.setup("fit")
    assert [p.name for p in dm.files] == ["a.png"]


def test_config_defaults_match_the_class(compose_cfg, tmp_path: Path):
    cfg = compose_cfg("data=image_folder", f"data.root={tmp_path}")
    assert tuple(cfg.data.extensions) == DEFAULT_EXTENSIONS
    assert cfg.data.alpha == "white" and cfg.data.upscale is False and cfg.data.draft is True


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_celebahq_config(compose_cfg, tmp_path: Path, fmt: str):
    """data=celebahq: 1024x1024 files -> (3, 256, 256) uint8 squares, all for training, flipped."""
    root = write_image_folder(tmp_path / "celebahq", count=6, size=1024, fmt=fmt)
    cfg = compose_cfg("data=celebahq", f"data.root={root}")
    assert cfg.data.image_size == 256 and cfg.data.batch_size == 64 and cfg.data.random_flip is True
    assert cfg.data.val_fraction == 0.001 and cfg.data.upscale is False and cfg.data.draft is True
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageFolderDataModule) and dm.data_shape == (3, 256, 256)
    dm.setup("fit")
    assert dm.split_lengths() == {"train": 5, "val": 1, "test": 0}  # 0.1 % held out: at least one
    files = sorted(root.iterdir())
    for i in range(2):
        image, label, index = dm.train_set[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 256, 256) and (label, index) == (-1, i)
        path = files[dm.train_set.indices[i]]
        if fmt == "PNG":  # no draft for PNG: exactly Lanczos from 1024
            assert torch.equal(image, pil_square(path, 256))
        else:  # decoded at 1/4 scale: 256x256, no resize left to do
            assert torch.equal(image, pil_square(path, 256, draft=True))
            full = pil_square(path, 256)
            assert not torch.equal(image, full)
            # 0.78 levels on these pictures (gradients with noise of 8 levels)
            assert (image.float() - full.float()).abs().mean() < 1.5


def test_celebahq_config_needs_root(compose_cfg):
    cfg = compose_cfg("data=celebahq")
    with pytest.raises(Exception, match="root"):
        instantiate(cfg.data)
