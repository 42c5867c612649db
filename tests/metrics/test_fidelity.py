"""FID/IS/KID through torch-fidelity with random (Kaiming) Inception weights: no download, meaningless values,
but identical sets must score ~0 and different ones clearly more."""

from __future__ import annotations

import math
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from src.data.base import BaseDataModule
from src.metrics.fidelity import (
    INCEPTION_FILENAME,
    WEIGHTS_ENV,
    compute_fidelity,
    image_dataset,
    inception_weights_file,
    make_random_inception_weights,
    resolve_inception_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N, SIZE = 8, 32
QUICK = 64  # Inception width for the tests beyond the first: 2048-d FIDs cost ~10 s each on 2 busy cores


def noise_images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)


def gradient_images() -> np.ndarray:
    """Smooth horizontal ramps, each shifted: nothing like uniform noise, and not mirror-symmetric."""
    ramp = np.linspace(0, 255, SIZE)
    rows = np.stack([np.roll(ramp, 4 * i) for i in range(N)])  # (N, W)
    return np.broadcast_to(rows[:, None, :, None], (N, SIZE, SIZE, 3)).round().astype(np.uint8).copy()


@pytest.fixture(scope="module")
def fid_env(tmp_path_factory):
    """Random weights, a cache folder, and the standard (2048-d) scores of a set against itself."""
    root = tmp_path_factory.mktemp("fidelity")
    weights = make_random_inception_weights(root / "random-inception-NOT-FOR-SCORES.pth")
    cache = root / "cache"
    same = compute_fidelity(noise_images(), noise_images(), metrics=("fid", "isc", "kid"),
                            weights_path=weights, cache_root=cache, reference_cache_name="ref", device="cpu")
    return {"weights": weights, "cache": cache, "same": same}


def test_identical_sets_score_zero_and_all_keys_are_finite(fid_env):
    same = fid_env["same"]
    assert set(same) == {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std"}
    assert all(math.isfinite(v) for v in same.values())
    assert abs(same["fid"]) < 1e-2
    assert abs(same["kid_mean"]) < 1e-3


def test_input_kinds_agree_and_different_sets_score_high(fid_env, tmp_path):
    images = gradient_images()
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    Image.fromarray(images[0]).save(tmp_path / "grid.png")  # beside the folder, as src.sample writes it
    np.savez(tmp_path / "samples.npz", samples=images)
    kwargs = dict(reference=noise_images(), weights_path=fid_env["weights"], cache_root=fid_env["cache"],
                  reference_cache_name="noise", device="cpu", feature=QUICK)
    from_array = compute_fidelity(images, **kwargs)["fid"]
    from_folder = compute_fidelity(folder, **kwargs)["fid"]
    from_npz = compute_fidelity(str(tmp_path / "samples.npz"), **kwargs)["fid"]
    same = compute_fidelity(noise_images(), **kwargs)["fid"]
    assert abs(same) < 1e-3 and from_array > 1.0
    assert from_folder == pytest.approx(from_array, rel=1e-6)
    assert from_npz == pytest.approx(from_array, rel=1e-6)
    # channels-first input and one grey channel are accepted
    chw = image_dataset(torch.from_numpy(images).permute(0, 3, 1, 2))
    grey = image_dataset(images[..., :1])
    assert chw[3].shape == grey[3].shape == (3, SIZE, SIZE) and torch.equal(grey[3][0], grey[3][2])


def test_reference_statistics_come_from_the_cache(fid_env):
    def cached():
        return sorted(p.name for p in fid_env["cache"].iterdir() if p.name.startswith("cached-weights-"))

    kwargs = dict(weights_path=fid_env["weights"], cache_root=fid_env["cache"], reference_cache_name="cached",
                  device="cpu", feature=QUICK)
    assert not cached()
    first = compute_fidelity(gradient_images(), noise_images(), **kwargs)["fid"]
    assert any(f"stat-fid-{QUICK}" in name for name in cached()), cached()
    # another reference under the same name: the cached statistics (of the noise set) are used
    again = compute_fidelity(gradient_images(), gradient_images(), **kwargs)["fid"]
    assert again == first and first > 1.0


class FlippingImages(BaseDataModule):
    """A tiny DataModule that flips every training image, as a random flip with p=1 would."""

    def __init__(self, images: np.ndarray, random_flip: bool = True):
        super().__init__(batch_size=4)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.random_flip = random_flip

    @property
    def name(self) -> str:
        return "flipping"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def setup(self, stage: str | None = None) -> None:
        if self.is_setup:
            return
        x = self.images.flip(-1) if self.random_flip else self.images
        self.train_set = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))

    def unflipped_train_set(self) -> TensorDataset:
        return TensorDataset(self.images, torch.zeros(len(self.images), dtype=torch.long))


def test_datamodule_reference_uses_unflipped_training_images(fid_env):
    images = gradient_images()
    datamodule = FlippingImages(images)
    fid = compute_fidelity(images, datamodule, weights_path=fid_env["weights"], cache_root=fid_env["cache"],
                           device="cpu", feature=QUICK)["fid"]
    assert abs(fid) < 1e-4  # the flipped set scores ~6e-3 here: 64-d features are nearly flip-invariant
    assert datamodule.random_flip  # the module used for training keeps its augmentation
    assert any(p.name.startswith("flipping-") and f"-train-3x{SIZE}x{SIZE}-max50000-weights-" in p.name
               for p in fid_env["cache"].iterdir())


def test_missing_weights_file_names_both_settings(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=rf"fid\.weights_path.*{WEIGHTS_ENV}"):
        compute_fidelity(noise_images(), noise_images(), weights_path=tmp_path / "nope.pth", device="cpu")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "also-nope.pth"))
    with pytest.raises(FileNotFoundError, match="also-nope.pth"):
        resolve_inception_weights(None)
    monkeypatch.setenv(WEIGHTS_ENV, __file__)
    assert resolve_inception_weights(None) == __file__
    with pytest.raises(FileNotFoundError, match="fid.weights_path"):
        resolve_inception_weights(tmp_path)  # a folder is not a weights file


def test_no_weights_and_no_network_fails_fast_with_instructions(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # no network attempt can hang
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached download either
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        compute_fidelity(noise_images(), noise_images(), device="cpu", cache_root=tmp_path)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "fid.weights_path" in message and WEIGHTS_ENV in message and INCEPTION_FILENAME in message


def write_not_inception(path, kind: str):
    """A file that is not torch-fidelity's Inception weights: a text file, random bytes, another model's weights,
    torchvision's Inception-v3 layout (1000 classes), a pickled non-dict."""
    if kind == "text":
        path.write_text("weights-inception-2015-12-05-6726825d.pth\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "other_model":
        torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), path)
    elif kind == "torchvision_layout":
        torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
                    "Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 1, 1),
                    "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, path)
    else:
        torch.save([torch.zeros(2)], path)
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("text", "cannot be read as PyTorch weights"),
    ("random", "cannot be read as PyTorch weights"),
    ("other_model", r"lacks \['Conv2d_1a_3x3.conv.weight'.*its keys begin \['bias', 'weight'\]"),
    ("torchvision_layout", r"has fc.weight \(1000, 2048\) instead of \(1008, 2048\)"),
    ("list", "holds a list, not a state dict of tensors"),
])
def test_a_file_that_is_not_the_inception_weights_names_the_key_and_the_file_expected(tmp_path, monkeypatch, kind,
                                                                                      message):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    path = write_not_inception(tmp_path / "weights.pth", kind)
    expected = rf"fid\.weights_path={path}.*{message}.*torch-fidelity's {INCEPTION_FILENAME}"
    with pytest.raises(ValueError, match=expected):
        compute_fidelity(noise_images(), noise_images(), weights_path=path, device="cpu", cache_root=tmp_path)


def test_a_bad_weights_file_from_the_environment_or_the_callback_names_that_setting(tmp_path, monkeypatch):
    path = write_not_inception(tmp_path / "weights.pth", "text")
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_ENV}={path} cannot be read"):
        compute_fidelity(noise_images(), noise_images(), device="cpu", cache_root=tmp_path)
    monkeypatch.delenv(WEIGHTS_ENV)
    with pytest.raises(ValueError, match=rf"callbacks\.fid\.weights_path={path} cannot be read"):
        inception_weights_file(path, key="callbacks.fid.weights_path")


def test_reference_statistics_are_cached_per_data_subset_and_split_settings(tmp_path):
    from src.data import ImageFolderDataModule
    from src.metrics.fidelity.compute import reference_cache_stem

    def stem(**options):
        return reference_cache_stem(ImageFolderDataModule(root=tmp_path, image_size=16, **options), 1000)

    assert stem() == stem()
    assert len({stem(), stem(val_fraction=0.2), stem(seed=1), stem(channels=1), stem(draft=False)}) == 5
    assert stem() != reference_cache_stem(ImageFolderDataModule(root=tmp_path / "other", image_size=16), 1000)
    assert stem().startswith("image_folder-") and stem().endswith("-train-3x16x16-max1000")
