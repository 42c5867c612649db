"""Tests for the DataModules in src.data (offline: CIFAR-10 is faked in the real pickle format)."""

from __future__ import annotations

import pickle
import struct
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    Toy2DDataModule,
    scale_to_unit_range,
)
from src.data.base import EpochSeededSampler
from src.data.uint8_images import ImageBatch, Uint8ImagesDataModule, flip_decisions

# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def check_batch(batch, data_shape: tuple[int, ...], batch_size: int, bounded: bool = True) -> None:
    """The shared batch contract: (x, y), x float32 (in [-1, 1] if bounded), y int64 of shape (B,)."""
    x, y = batch
    assert x.shape == (batch_size, *data_shape)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    if bounded:
        assert x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.long and y.shape == (batch_size,)


class _Py2Str(bytes):
    """A Python 2 ``str``: the real CIFAR files' dict keys, read back as ``str`` with encoding='latin1'."""


class _Py2Pickler(pickle._Pickler):
    """Pure-Python pickler that writes ``_Py2Str`` as a protocol-2 BINSTRING, like Python 2's cPickle."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: _Py2Str) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2_str


def _dump_py2(obj: dict, path: Path) -> None:
    def convert(value):
        if isinstance(value, str):
            return _Py2Str(value.encode("latin1"))
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump({convert(k): convert(v) for k, v in obj.items()})


CIFAR_PER_BATCH = 4
CIFAR_N_TRAIN = 5 * CIFAR_PER_BATCH


def cifar_image(k: int) -> np.ndarray:
    """Image number ``k`` as a flat uint8 (3072,) row: all 256 values, not mirror-symmetric."""
    return ((np.arange(3072) * 7 + k) % 256).astype(np.uint8)


def cifar_label(k: int) -> int:
    return (3 * k + 1) % 10


def write_fake_cifar(root: Path) -> Path:
    """Write a tiny ``cifar-10-batches-py`` (4 images per batch) in the real file format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        ids = range(b * CIFAR_PER_BATCH, (b + 1) * CIFAR_PER_BATCH)
        batch = {
            "batch_label": f"fake batch {b}",
            "labels": [cifar_label(k) for k in ids],
            "data": np.stack([cifar_image(k) for k in ids]),
            "filenames": [f"img_{k}.png" for k in ids],
        }
        _dump_py2(batch, folder / name)
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"label_names": labels, "num_cases_per_batch": CIFAR_PER_BATCH, "num_vis": 3072}
    _dump_py2(meta, folder / "batches.meta")
    return folder


def expected_cifar(k: int) -> torch.Tensor:
    return torch.from_numpy(cifar_image(k).reshape(3, 32, 32)).to(torch.float32) / 127.5 - 1


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_fake_cifar(tmp_path)
    return tmp_path


def write_png(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """Six non-square images (PNG and JPEG, RGB and grayscale) in nested folders."""
    root = tmp_path / "images"
    write_png(root / "a" / "0.png", (20, 12), 0)
    write_png(root / "a" / "1.png", (12, 20), 1)
    write_png(root / "a" / "deep" / "2.png", (33, 17), 2, mode="L")
    write_png(root / "b" / "3.jpg", (40, 24), 3)
    write_png(root / "b" / "4.PNG", (17, 31), 4)
    write_png(root / "5.png", (16, 16), 5)
    (root / "notes.txt").write_text("not an image, wrong extension: ignored")
    return root


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def test_scale_to_unit_range():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(scale_to_unit_range(x), torch.tensor([-1.0, -0.5, 0.0, 1.0]))


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------


def test_digits_batches_values_and_labels():
    dm = DigitsDataModule(batch_size=64)
    assert dm.data_shape == (1, 8, 8) and dm.num_classes == 10 and dm.name == "digits"
    assert dm.value_range == (-1.0, 1.0)
    dm.prepare_data()
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), (1, 8, 8), 64)

    # Over the whole data set, values stay in [-1, 1] and reach both ends.
    everything, labels = dm.train_set.base.tensors
    assert everything.shape == (1797, 1, 8, 8)
    assert everything.min() == -1 and everything.max() == 1
    # v/16 on 0..16 is exact: every value lies on the 17-level grid.
    levels = (everything + 1) / 2 * 16
    assert torch.equal(levels, levels.round())
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(10))
    _, y = all_batches(dm.val_dataloader())
    assert y.min() >= 0 and y.max() <= 9 and len(set(y.tolist())) == 10


def test_digits_splits_sizes_disjoint_and_seeded():
    def indices(seed: int) -> list[list[int]]:
        dm = DigitsDataModule(batch_size=32, seed=seed)
        dm.setup("fit")
        return [dm.train_set.indices, dm.val_set.indices, dm.test_set.indices]

    a, a_again, b = indices(0), indices(0), indices(1)
    assert [len(s) for s in a] == [1437, 180, 180]
    assert sum(len(s) for s in a) == 1797
    assert set().union(*map(set, a)) == set(range(1797))  # disjoint and complete
    assert a == a_again
    assert a[1] != b[1] and a[0] != b[0]


def test_digits_split_sizes_follow_fractions_and_loader_len():
    dm = DigitsDataModule(batch_size=100, val_fraction=0.2, test_fraction=0.0)
    dm.setup("fit")
    assert dm.split_lengths() == {"train": 1438, "val": 359, "test": 0}
    assert len(dm.train_dataloader()) == 14  # drop_last: 1438 // 100
    assert len(dm.val_dataloader()) == 4  # no drop_last on val


def test_digits_resize():
    dm = DigitsDataModule(batch_size=16, image_size=16)
    assert dm.data_shape == (1, 16, 16)
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), (1, 16, 16), 16)


def test_digits_random_flip():
    dm = DigitsDataModule(batch_size=8, random_flip=True)
    dm.setup("fit")
    torch.manual_seed(0)
    original = dm.train_set.base[dm.train_set.indices[0]][0]
    assert not torch.equal(original, original.flip(-1))
    seen = {torch.equal(dm.train_set[0][0], original) for _ in range(50)}
    assert seen == {True, False}
    # No flips outside training.
    assert all(torch.equal(dm.val_set[0][0], dm.val_set.base[dm.val_set.indices[0]][0]) for _ in range(20))


def test_dataloader_flags():
    dm = DigitsDataModule(batch_size=4096)  # more than the train split holds
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.drop_last is False
    x, _ = next(iter(loader))
    assert len(x) == 1437
    dm = DigitsDataModule(batch_size=32, num_workers=1)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last is True and train.persistent_workers is True
    assert isinstance(train.sampler, EpochSeededSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler) and val.drop_last is False


def test_epoch_seeded_sampler_replays_and_skips():
    sampler = EpochSeededSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first  # a permutation, replayable
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(10)) and second != first
    sampler.skip = 4  # a resumed epoch continues where it stopped, once
    assert list(sampler) == second[4:] and list(sampler) == second
    assert list(EpochSeededSampler(10, seed=4)) != first


def test_loaders_leave_the_global_rng_alone():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    state = torch.get_rng_state()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)


def test_dataloader_before_setup_raises():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule(batch_size=8).train_dataloader()


# --------------------------------------------------------------------------------------------
# Toy 2-D
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["swiss_roll", "eight_gaussians", "two_moons"])
def test_toy2d_datasets(dataset: str):
    dm = Toy2DDataModule(dataset=dataset, num_samples=2000, batch_size=50)
    assert dm.data_shape == (2,) and dm.num_classes is None and dm.name == "toy2d"
    dm.setup("fit")
    assert dm.value_range is None  # standardised, not bounded: samples must not be clipped
    check_batch(next(iter(dm.train_dataloader())), (2,), 50, bounded=False)
    assert dm.split_lengths() == {"train": 1600, "val": 200, "test": 200}
    x, y = dm.train_set.base.tensors
    assert x.shape == (2000, 2) and torch.isfinite(x).all()
    assert (y == -1).all()
    # Roughly unit scale and centred.
    assert 0.6 < x.std().item() < 1.5
    assert x.mean(0).abs().max() < 0.3
    assert x.abs().max() < 10


def test_toy2d_deterministic_per_seed():
    def data(seed: int) -> torch.Tensor:
        dm = Toy2DDataModule(dataset="two_moons", num_samples=500, batch_size=10, seed=seed)
        dm.setup()
        return dm.train_set.base.tensors[0]

    assert torch.equal(data(3), data(3))
    assert not torch.equal(data(3), data(4))


def test_toy2d_unknown_dataset():
    with pytest.raises(ValueError) as info:
        Toy2DDataModule(dataset="spiral")
    message = str(info.value)
    for name in ("data.dataset", "swiss_roll", "eight_gaussians", "two_moons", "spiral"):
        assert name in message


@pytest.mark.parametrize("dataset", ["swiss_roll", "eight_gaussians", "two_moons"])
def test_toy2d_sample_reference(dataset: str):
    dm = Toy2DDataModule(dataset=dataset, num_samples=3000, batch_size=10, seed=0)
    ref = dm.sample_reference(3000, seed=0)  # works before setup
    assert ref.shape == (3000, 2) and ref.dtype == torch.float32
    assert torch.equal(ref, dm.sample_reference(3000, seed=0))
    assert not torch.equal(ref, dm.sample_reference(3000, seed=1))
    dm.setup()
    train = dm.train_set.base.tensors[0]
    assert not torch.equal(ref, train)  # fresh samples, not the training data
    # Same distribution and normalisation as the training data.
    assert torch.allclose(ref.mean(0), train.mean(0), atol=0.1)
    assert torch.allclose(ref.std(0), train.std(0), rtol=0.1)


def test_toy2d_eight_gaussians_geometry():
    dm = Toy2DDataModule(dataset="eight_gaussians", noise=0.0)
    ref = dm.sample_reference(400, seed=0)
    radius = ref.norm(dim=1)
    assert torch.allclose(radius, radius[0].expand_as(radius), atol=1e-5)
    angles = torch.atan2(ref[:, 1], ref[:, 0]) / (torch.pi / 4)
    assert torch.allclose(angles, angles.round(), atol=1e-4)
    assert len(set(angles.round().remainder(8).tolist())) == 8


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def test_fake_cifar_is_in_the_real_format(cifar_root: Path):
    # Like the real (Python 2) files: read with encoding="latin1", the keys come back as str.
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert isinstance(entry["data"], np.ndarray) and entry["data"].dtype == np.uint8
    assert entry["data"].shape == (CIFAR_PER_BATCH, 3072)
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")


def test_cifar10_loads_exact_values_and_labels(cifar_root: Path):
    dm = CIFAR10DataModule(
        data_dir=cifar_root, batch_size=2, download=False, random_flip=False, verify_checksums=False
    )
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == 10 and dm.name == "cifar10"
    dm.prepare_data()
    dm.setup("fit")
    assert dm.split_lengths() == {"train": CIFAR_N_TRAIN, "val": CIFAR_PER_BATCH, "test": CIFAR_PER_BATCH}
    check_batch(next(iter(dm.train_dataloader())), (3, 32, 32), 2)

    # The test split comes in file order: pixel v maps to exactly v/127.5 - 1, labels kept.
    x, y = all_batches(dm.test_dataloader())
    ids = range(CIFAR_N_TRAIN, CIFAR_N_TRAIN + CIFAR_PER_BATCH)
    assert torch.equal(x, torch.stack([expected_cifar(k) for k in ids]))
    assert y.tolist() == [cifar_label(k) for k in ids]
    assert x.min() == -1 and x.max() == 1
    # Val defaults to the test split.
    assert torch.equal(all_batches(dm.val_dataloader())[0], x)

    # Train: every image once per epoch with its own label.
    x, y = all_batches(dm.train_dataloader())
    found = {}
    for image, label in zip(x, y, strict=True):
        k = next(k for k in range(CIFAR_N_TRAIN) if torch.equal(image, expected_cifar(k)))
        found[k] = label.item()
    assert found == {k: cifar_label(k) for k in range(CIFAR_N_TRAIN)}


def test_cifar10_random_flip(cifar_root: Path):
    dm = CIFAR10DataModule(data_dir=cifar_root, batch_size=5, download=False, verify_checksums=False)
    dm.setup("fit")
    torch.manual_seed(0)
    flipped = plain = 0
    for _ in range(4):
        for image, label in zip(*all_batches(dm.train_dataloader()), strict=True):
            for k in range(CIFAR_N_TRAIN):
                if torch.equal(image, expected_cifar(k)):
                    plain += 1
                    break
                if torch.equal(image, expected_cifar(k).flip(-1)):
                    flipped += 1
                    break
            else:
                raise AssertionError("an image came out neither as stored nor mirrored")
            assert label.item() == cifar_label(k)
    assert plain + flipped == 4 * CIFAR_N_TRAIN
    assert plain > 0 and flipped > 0
    # Never flipped outside training.
    x, _ = all_batches(dm.test_dataloader())
    assert torch.equal(x, torch.stack([expected_cifar(k) for k in range(CIFAR_N_TRAIN, CIFAR_N_TRAIN + 4)]))


def test_cifar10_val_fraction_holds_out_train(cifar_root: Path):
    dm = CIFAR10DataModule(
        data_dir=cifar_root, batch_size=2, download=False, val_fraction=0.25, verify_checksums=False
    )
    dm.setup("fit")
    assert dm.split_lengths() == {"train": 15, "val": 5, "test": CIFAR_PER_BATCH}
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    x, _ = all_batches(dm.val_dataloader())
    expected = torch.stack([expected_cifar(k) for k in dm.val_set.indices])
    assert torch.equal(x, expected)


def test_cifar10_extracts_archive(tmp_path: Path):
    write_fake_cifar(tmp_path / "src")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    dm = CIFAR10DataModule(data_dir=data_dir, batch_size=4, download=False, verify_checksums=False)
    dm.prepare_data()
    assert (data_dir / "cifar-10-batches-py" / "data_batch_1").is_file()  # unpacked beside the archive
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), (3, 32, 32), 4)


def test_cifar10_missing_data(tmp_path: Path):
    dm = CIFAR10DataModule(data_dir=tmp_path / "nothing", batch_size=4, download=False)
    for step in (dm.prepare_data, partial(dm.setup, "fit")):
        with pytest.raises(RuntimeError) as info:
            step()
        message = str(info.value)
        assert "cifar-10-batches-py" in message and "data.data_dir" in message
        assert "cifar-10-python.tar.gz" in message and "data.download" in message
        assert str(tmp_path / "nothing") in message


def test_cifar10_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import src.data.cifar10 as cifar_module

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", offline)
    dm = CIFAR10DataModule(data_dir=tmp_path, batch_size=4, download=True)
    with pytest.raises(RuntimeError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "download failed" in message and "name resolution" in message
    assert "cifar-10-batches-py" in message and "data.data_dir" in message


def test_cifar10_checksum_mismatch(cifar_root: Path):
    # download=True must not try to fetch over a present-but-mismatched copy.
    for download in (False, True):
        dm = CIFAR10DataModule(data_dir=cifar_root, batch_size=4, download=download)
        for step in (dm.prepare_data, partial(dm.setup, "fit")):
            with pytest.raises(RuntimeError) as info:
                step()
            message = str(info.value)
            assert "checksum" in message and "data.verify_checksums=false" in message
            assert "data_batch_1" in message


def test_cifar10_partial_copy_is_missing(cifar_root: Path):
    (cifar_root / "cifar-10-batches-py" / "test_batch").unlink()
    dm = CIFAR10DataModule(data_dir=cifar_root, batch_size=4, download=False, verify_checksums=False)
    with pytest.raises(RuntimeError, match="test_batch"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------------


def test_image_folder_rgb(image_root: Path):
    dm = ImageFolderDataModule(root=image_root, image_size=16, batch_size=4, val_fraction=0.2, upscale=True)
    assert dm.data_shape == (3, 16, 16) and dm.num_classes is None and dm.name == "image_folder"
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.files) == 6  # recursive, case-insensitive extensions, .txt ignored
    assert dm.files == sorted(dm.files)
    assert dm.split_lengths() == {"train": 5, "val": 1, "test": 0}
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, ImageBatch) and batch.image.dtype == torch.uint8  # scaled after the transfer
    x, y = dm.to_model_batch(batch, train=True)
    check_batch((x, y), (3, 16, 16), 4)
    assert (y == -1).all()
    check_batch(dm.to_model_batch(next(iter(dm.val_dataloader())), train=False), (3, 16, 16), 1)


def test_image_folder_grayscale_and_not_recursive(image_root: Path):
    dm = ImageFolderDataModule(root=image_root, image_size=8, channels=1, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    check_batch(dm.to_model_batch(next(iter(dm.train_dataloader())), train=True), (1, 8, 8), 2)
    flat = ImageFolderDataModule(root=image_root, image_size=16, batch_size=1, val_fraction=0.0, recursive=False)
    flat.setup("fit")
    assert [p.name for p in flat.files] == ["5.png"]


def test_image_folder_resize_and_center_crop(tmp_path: Path):
    # 48x16: black | white | black thirds. The central square is exactly the white middle third.
    pixels = np.zeros((16, 48, 3), dtype=np.uint8)
    pixels[:, 16:32] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    dm = ImageFolderDataModule(
        root=tmp_path, image_size=16, batch_size=1, val_fraction=0.0, random_flip=False
    )
    dm.setup("fit")
    x, _ = dm.to_model_batch(next(iter(dm.train_dataloader())), train=True)
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x, torch.ones_like(x))
    # Downscaling: 96x32 -> central 32x32 (the white third) -> Lanczos to 16x16 (StyleGAN's dataset_tool).
    big = np.zeros((32, 96, 3), dtype=np.uint8)
    big[:, 32:64] = 255
    big[5:9, 40:50] = (200, 10, 90)  # something for the filter to work on
    Image.fromarray(big).save(tmp_path / "wide.png")
    dm = ImageFolderDataModule(
        root=tmp_path, image_size=16, batch_size=1, val_fraction=0.0, random_flip=False
    )
    dm.setup("fit")
    x, _ = dm.to_model_batch(next(iter(dm.train_dataloader())), train=True)
    assert x.shape == (1, 3, 16, 16)
    with Image.open(tmp_path / "wide.png") as img:
        square = img.crop((32, 0, 64, 32)).resize((16, 16), Image.LANCZOS)
    expected = torch.from_numpy(np.array(square)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(x[0], expected)
    # cropped before resizing: the black thirds never bleed into the edge columns
    assert (x[0, :, 10:] == 1).all()


def test_image_folder_empty(tmp_path: Path):
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("1,2")
    dm = ImageFolderDataModule(root=tmp_path, batch_size=2)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert ".png" in message and ".jpg" in message and str(tmp_path) in message
    assert "2 other files" in message and "data.extensions" in message


def test_image_folder_missing(tmp_path: Path):
    missing = tmp_path / "no_such_folder"
    dm = ImageFolderDataModule(root=missing, batch_size=2)  # constructing does no I/O
    assert dm.data_shape == (3, 64, 64)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    assert str(missing) in str(info.value) and "data.root" in str(info.value)


def test_image_folder_corrupt_file_verified(image_root: Path):
    bad = image_root / "a" / "broken.png"
    bad.write_bytes(b"not an image")
    dm = ImageFolderDataModule(root=image_root, image_size=16, batch_size=2)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(bad) in message and "1 of 7" in message and "data.verify=false" in message


def test_image_folder_many_corrupt_files_listed_up_to_ten(image_root: Path):
    for i in range(12):
        (image_root / f"bad_{i:02d}.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError) as info:
        ImageFolderDataModule(root=image_root, batch_size=2).setup("fit")
    message = str(info.value)
    assert "12 of 18" in message and "and 2 more" in message
    assert "bad_09.jpg" in message and "bad_10.jpg" not in message


def test_image_folder_corrupt_file_unverified(image_root: Path):
    bad = image_root / "a" / "broken.png"
    bad.write_bytes(b"not an image")
    dm = ImageFolderDataModule(root=image_root, image_size=16, batch_size=2, val_fraction=0.3, verify=False,
                               upscale=True)
    dm.setup("fit")  # no check at setup
    with pytest.raises(RuntimeError) as info:
        for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
            list(loader)
    assert str(bad) in str(info.value)


def test_image_folder_reference_images(image_root: Path):
    """reference_images: float (x, y) in [-1, 1], the split's uint8 images never flipped; the loaders still flip
    (on the device, by flip_decisions)."""
    make = partial(ImageFolderDataModule, root=image_root, image_size=12, batch_size=5, val_fraction=0.2,
                   upscale=True)
    dm, plain = make(random_flip=True), make(random_flip=False)
    reference = dm.reference_images("train")  # sets the module up
    plain.setup("fit")
    assert dm.random_flip and len(reference) == len(plain.train_set) == len(dm.train_set) == 5
    for i in range(len(reference)):
        x, y = reference[i]
        image, label, index = plain.train_set[i]
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and (y, label, index) == (-1, -1, i)
        assert torch.equal(x, image.float() / 127.5 - 1) and torch.equal(dm.train_set[i][0], image)
    flipped = 0
    for epoch in range(4):
        batch = next(iter(dm.train_dataloader()))
        x, _ = dm.to_model_batch(batch, train=True, epoch=epoch)
        flips = flip_decisions(batch.index, dm.seed, epoch)
        for row, i, flip in zip(x, batch.index.tolist(), flips.tolist(), strict=True):
            assert torch.equal(row, reference[i][0].flip(-1) if flip else reference[i][0])
            flipped += flip
    assert flipped > 0
    for split in ("val", "test"):
        ref = dm.reference_images(split)
        assert len(ref) == len(getattr(dm, f"{split}_set"))
        assert all(torch.equal(ref[i][0], getattr(dm, f"{split}_set")[i][0].float() / 127.5 - 1)
                   for i in range(len(ref)))
    with pytest.raises(ValueError, match="train, val or test"):
        dm.reference_images("training")


# --------------------------------------------------------------------------------------------
# All modules: arguments and the data_shape contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda p: DigitsDataModule(batch_size=0), "data.batch_size"),
        (lambda p: DigitsDataModule(batch_size=8, image_size=0), "data.image_size"),
        (lambda p: DigitsDataModule(batch_size=8, val_fraction=0.5, test_fraction=0.5), "data.val_fraction"),
        (lambda p: DigitsDataModule(batch_size=8, val_fraction=-0.1), "data.val_fraction"),
        (lambda p: DigitsDataModule(batch_size=8, num_workers=-1), "data.num_workers"),
        (lambda p: Toy2DDataModule(batch_size=0), "data.batch_size"),
        (lambda p: Toy2DDataModule(num_samples=0), "data.num_samples"),
        (lambda p: Toy2DDataModule(noise=-1.0), "data.noise"),
        (lambda p: Toy2DDataModule(val_fraction=0.6, test_fraction=0.7), "data.test_fraction"),
        (lambda p: CIFAR10DataModule(data_dir=p, batch_size=0), "data.batch_size"),
        (lambda p: CIFAR10DataModule(data_dir=p, val_fraction=1.0), "data.val_fraction"),
        (lambda p: ImageFolderDataModule(root=p, batch_size=0), "data.batch_size"),
        (lambda p: ImageFolderDataModule(root=p, channels=4), "data.channels"),
        (lambda p: ImageFolderDataModule(root=p, image_size=0), "data.image_size"),
        (lambda p: ImageFolderDataModule(root=p, val_fraction=0.9, test_fraction=0.1), "data.test_fraction"),
    ],
)
def test_bad_arguments(make, key: str, tmp_path: Path):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make(tmp_path)


def test_too_few_images_to_split(tmp_path: Path):
    write_png(tmp_path / "only.png", (8, 8), 0)
    with pytest.raises(ValueError, match="data.val_fraction"):
        ImageFolderDataModule(root=tmp_path, image_size=8, batch_size=1).setup("fit")


@pytest.mark.parametrize(
    "which", ["digits", "digits16", "toy2d", "cifar10", "image_folder", "image_folder_gray"]
)
def test_data_shape_matches_batches(which: str, cifar_root: Path, image_root: Path):
    dm = {
        "digits": lambda: DigitsDataModule(batch_size=3),
        "digits16": lambda: DigitsDataModule(batch_size=3, image_size=16),
        "toy2d": lambda: Toy2DDataModule(num_samples=100, batch_size=3),
        "cifar10": lambda: CIFAR10DataModule(
            data_dir=cifar_root, batch_size=3, download=False, verify_checksums=False
        ),
        "image_folder": lambda: ImageFolderDataModule(
            root=image_root, image_size=12, batch_size=3, test_fraction=0.2
        ),
        "image_folder_gray": lambda: ImageFolderDataModule(
            root=image_root, image_size=10, channels=1, batch_size=3, test_fraction=0.2
        ),
    }[which]()
    shape = dm.data_shape  # before any I/O
    assert isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")  # idempotent
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        # uint8 image batches become (x, y) after the transfer to the device
        x, y = dm.to_model_batch(batch, train=False) if isinstance(dm, Uint8ImagesDataModule) else batch
        assert tuple(x.shape[1:]) == shape
        assert x.dtype == torch.float32 and y.dtype == torch.long and y.shape == (x.shape[0],)
        if dm.value_range is not None:
            assert dm.value_range[0] <= x.min() and x.max() <= dm.value_range[1]
        if dm.num_classes is None:
            assert (y == -1).all()
        else:
            assert ((y >= 0) & (y < dm.num_classes)).all()


@pytest.mark.parametrize("which", ["digits", "cifar10"])  # image_folder: test_image_folder_reference_images
def test_reference_images_are_the_splits_never_flipped(which: str, cifar_root: Path, image_root: Path):
    """reference_images: the split as the loaders give it, in [-1, 1], but never flipped; the module keeps flipping."""
    make = {
        "digits": partial(DigitsDataModule, batch_size=4),
        "cifar10": partial(CIFAR10DataModule, data_dir=cifar_root, batch_size=4, download=False,
                           verify_checksums=False),
    }[which]
    dm, plain = make(random_flip=True), make(random_flip=False)
    reference = dm.reference_images("train")  # sets the module up
    plain.setup("fit")
    assert dm.random_flip and len(reference) == len(plain.train_set) == len(dm.train_set)
    torch.manual_seed(0)
    flipped = 0
    for i in range(4):
        x, y = reference[i]
        expected, label = plain.train_set[i]
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        assert torch.equal(x, expected) and torch.equal(reference[i][0], x) and y == label
        draws = [dm.train_set[i][0] for _ in range(20)]  # the training split still flips
        assert all(torch.equal(d, x) or torch.equal(d, x.flip(-1)) for d in draws)
        flipped += sum(not torch.equal(d, x) for d in draws)
    assert flipped > 0
    assert dm.reference_images("val") is dm.val_set and dm.reference_images("test") is dm.test_set
    with pytest.raises(ValueError, match="train, val or test"):
        dm.reference_images("training")


def test_reference_distribution_only_for_toy2d():
    toy, digits = Toy2DDataModule(num_samples=100), DigitsDataModule()
    assert toy.has_reference_distribution and toy.sample_reference(5).shape == (5, 2)
    assert not digits.has_reference_distribution and digits.sample_reference(5) is None
    with pytest.raises(ValueError, match="not images"):
        toy.reference_images("train")


def test_trainer_fit_on_digits(tmp_path: Path):
    """The DataModule plugs into a real Trainer (prepare_data/setup hooks, train and val loops)."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(64, 1)

        def training_step(self, batch, _):
            x, _ = batch
            return self.net(x.flatten(1)).pow(2).mean()

        def validation_step(self, batch, _):
            x, _ = batch
            self.log("val_loss", self.net(x.flatten(1)).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=DigitsDataModule(batch_size=16))
    assert trainer.global_step == 2 and "val_loss" in trainer.callback_metrics
