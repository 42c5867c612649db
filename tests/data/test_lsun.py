"""LSUNDataModule on generated LMDBs in the official export's layout (src.data.synthetic.write_lsun_lmdb)."""

from __future__ import annotations

import inspect
import io
import logging
import os
import pickle
import sys
from pathlib import Path

import lightning as L
import lmdb
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from src.data import LSUNDataModule
from src.data.decode import decode_square
from src.data.lsun import LMDBReader, close_lmdb, import_lmdb, shared_env
from src.data.synthetic import encode, write_lsun_lmdb
from src.data.uint8_images import ImageBatch, Uint8Items, flip_decisions, to_unit_range

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "lsun.yaml"
LOGGER = "src.data.lsun"
COUNT = 40


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Key lists are cached per test, never in the user's cache."""
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))


# (key, value) of every record of each generated LMDB, in key order, read independently of the module when written
# (py-lmdb refuses to open an LMDB the module holds open in this process)
STORED: dict[Path, list[tuple[bytes, bytes]]] = {}


def generated(root: Path, **kwargs) -> Path:
    folder = write_lsun_lmdb(root, count=COUNT, **kwargs)
    env = lmdb.open(str(folder), readonly=True, lock=False)
    with env.begin() as txn:
        STORED[folder] = list(txn.cursor())
    env.close()
    return folder


def records(root: Path) -> list[tuple[bytes, bytes]]:
    return STORED[root]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return generated(tmp_path_factory.mktemp("lsun"), corrupt=0)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> Path:
    return generated(tmp_path_factory.mktemp("lsun"), category="church_outdoor", corrupt=1)


def is_image(value: bytes) -> bool:
    try:
        Image.open(io.BytesIO(value)).close()
    except Exception:
        return False
    return True


def module(root: Path, **kwargs) -> LSUNDataModule:
    args = {"image_size": 32, "batch_size": 8, "num_workers": 0, "val_fraction": 0.0, **kwargs}
    dm = LSUNDataModule(root, **args)
    dm.setup("fit")
    return dm


def write_records(root: Path, values: list[bytes]) -> Path:
    folder = root / "custom_train_lmdb"
    folder.mkdir(parents=True)
    env = lmdb.open(str(folder), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(f"{i:040x}".encode(), value)
    env.close()
    return folder


# --------------------------------------------------------------------------------------------
# items and batches
# --------------------------------------------------------------------------------------------


def test_items_batches_and_model_batches(clean: Path):
    dm = module(clean, batch_size=COUNT)
    assert dm.name == "lsun" and dm.num_classes is None and dm.data_shape == (3, 32, 32)
    assert dm.split_lengths() == {"train": COUNT, "val": 0, "test": 0}
    image, label, index = dm.train_set[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == -1 and index == 5
    assert 0 < image.float().std()

    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, ImageBatch)
    assert batch.image.shape == (COUNT, 3, 32, 32) and batch.image.dtype == torch.uint8
    assert batch.label.dtype == torch.long and (batch.label == -1).all()
    assert sorted(batch.index.tolist()) == list(range(COUNT))
    for image, i in zip(batch.image, batch.index, strict=True):
        assert torch.equal(image, dm.train_set[int(i)][0])

    x, y = dm.to_model_batch(batch, train=True, epoch=0)
    plain, _ = dm.to_model_batch(batch, train=False)
    for out in (x, plain):
        assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
    assert torch.equal(plain, to_unit_range(batch.image)) and torch.equal(y, batch.label)
    flip = flip_decisions(batch.index, dm.seed, 0)
    assert 0 < flip.sum() < COUNT
    assert torch.equal(x[flip], plain[flip].flip(-1)) and torch.equal(x[~flip], plain[~flip])
    assert not torch.equal(x[flip], plain[flip])  # the flipped images are not mirror-symmetric


def test_no_flips_without_random_flip(clean: Path):
    dm = module(clean, random_flip=False)
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(dm.to_model_batch(batch, train=True)[0], to_unit_range(batch.image))


def test_reference_images_are_unflipped_unit_range(clean: Path):
    dm = LSUNDataModule(clean, image_size=16, num_workers=0, val_fraction=0.0)
    reference = dm.reference_images("train")  # sets the module up itself
    assert isinstance(reference, Uint8Items) and len(reference) == COUNT
    for i in (0, 7, COUNT - 1):
        x, y = reference[i]
        assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
        assert torch.equal(x, to_unit_range(dm.train_set[i][0])) and y == -1


@pytest.mark.parametrize("draft", [True, False])
def test_items_are_decode_square_of_the_stored_records(clean: Path, draft: bool):
    dm = module(clean, image_size=64, draft=draft)
    stored = records(clean)
    assert [bytes(k) for k in dm.train_set.keys] == [key for key, _ in stored]  # key order
    for i, (_, value) in enumerate(stored):
        assert torch.equal(dm.train_set[i][0], decode_square(value, 64, "RGB", draft))


def central_square(img: Image.Image) -> Image.Image:
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.convert("RGB").crop((left, top, left + side, top + side))


def pil_reference(value: bytes, size: int) -> torch.Tensor:
    """The dataset_tool preprocessing computed independently: crop the central square, then resize it (Lanczos)."""
    with Image.open(io.BytesIO(value)) as img:
        square = central_square(img).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)


def test_items_at_the_exports_size_are_the_central_square(clean: Path):
    """At 256 (the exports' shorter side: the paper's data) every record is cropped, not resampled: WebP and JPEG
    records equal the independent computation exactly, with draft on or off."""
    stored = records(clean)
    for draft in (True, False):
        dm = module(clean, image_size=256, draft=draft)
        for i in (0, 1, 2, 3, 4, 5):  # both formats, both orientations
            assert torch.equal(dm.train_set[i][0], pil_reference(stored[i][1], 256))


def test_downscaled_items_equal_crop_then_lanczos(clean: Path):
    stored = records(clean)
    dm = module(clean, image_size=64, draft=False)  # draft=False: JPEGs decode at full size, like WebP always
    for i, (_, value) in enumerate(stored):
        assert torch.equal(dm.train_set[i][0], pil_reference(value, 64)), i


def banded(transpose: bool) -> Image.Image:
    """342x256 (an export's shape): a green central square between a red and a blue band (left/right or, transposed,
    top/bottom)."""
    a = np.zeros((256, 342, 3), np.uint8)
    a[:, :43] = (255, 0, 0)
    a[:, 43:299] = (0, 255, 0)
    a[:, 299:] = (0, 0, 255)
    return Image.fromarray(np.ascontiguousarray(a.transpose(1, 0, 2)) if transpose else a)


def lossless(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("transpose", [False, True], ids=["landscape", "portrait"])
def test_non_square_records_are_centre_cropped(tmp_path: Path, transpose: bool):
    """The bands are cut entirely, also where the resize's filter reaches past the crop (a resize of the central box
    of the whole image would tint the outer columns with the bands)."""
    img = banded(transpose)
    root = write_records(tmp_path, [lossless(img, "PNG"), lossless(img, "WEBP")])
    green = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1)
    for size in (256, 64, 32):
        dm = module(root, image_size=size)
        for i in range(2):
            image = dm.train_set[i][0]
            assert torch.equal(image[:, size // 2, size // 2], green.flatten())  # the centre survives
            assert torch.equal(image, green.expand(3, size, size)), (size, i)  # no trace of the bands


# --------------------------------------------------------------------------------------------
# workers: one LMDB environment per process
# --------------------------------------------------------------------------------------------


def test_workers_give_the_same_batches(clean: Path):
    single = module(clean, val_fraction=0.25)
    single.train_set[0]  # the parent opens its environment before the workers fork
    multi = module(clean, val_fraction=0.25, num_workers=2)
    multi.train_set[0]
    for name in ("train_dataloader", "val_dataloader"):
        ours = list(getattr(single, name)())
        theirs = list(getattr(multi, name)())
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_one_environment_per_process_and_lmdb(clean: Path):
    """py-lmdb refuses a second open of one LMDB in a process: every module and split shares this process's."""
    first, second = module(clean), module(clean, image_size=16)
    assert torch.equal(first.train_set[3][0], module(clean).train_set[3][0]) and second.train_set[3][0].shape[-1] == 16
    assert shared_env(clean) is shared_env(clean.parent / ".." / clean.parent.name / clean.name)
    copy = pickle.loads(pickle.dumps(first.train_set))  # what a spawned worker gets: a path, no environment
    assert vars(copy.reader).keys() == {"path", "_key"} and torch.equal(copy[3][0], first.train_set[3][0])


def test_a_forked_child_opens_its_own_environment(clean: Path):
    dm = module(clean)
    expected = dm.train_set[4][0]
    parent_env = shared_env(clean)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a DataLoader worker does
        ok = False
        try:
            ok = shared_env(clean) is not parent_env and torch.equal(dm.train_set[4][0], expected)
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert shared_env(clean) is parent_env and torch.equal(dm.train_set[4][0], expected)


# --------------------------------------------------------------------------------------------
# corrupt records
# --------------------------------------------------------------------------------------------


def bad_key(root: Path) -> str:
    (key,) = [key for key, value in records(root) if not is_image(value)]
    return key.decode()


def test_verify_lists_the_corrupt_record(corrupt: Path):
    with pytest.raises(ValueError, match=rf"(?s)1 of {COUNT + 1} records.*{bad_key(corrupt)}.*data.skip_corrupt=true"):
        module(corrupt, verify=True)


def test_verify_with_skip_corrupt_only_warns(corrupt: Path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    dm = module(corrupt, verify=True, skip_corrupt=True)
    assert len(dm.train_set) == COUNT + 1
    assert any(bad_key(corrupt) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_corrupt_record_stops_loading_with_its_key(corrupt: Path):
    dm = module(corrupt)  # verify=false: found only when loaded
    key = bad_key(corrupt)
    j = [bytes(k).decode() for k in dm.train_set.keys].index(key)
    message = rf"{key}.*{corrupt}.*data.verify=true.*data.skip_corrupt=true"
    with pytest.raises(RuntimeError, match=message):
        dm.train_set[j]
    workers = module(corrupt, num_workers=1, batch_size=COUNT + 1)
    with pytest.raises(RuntimeError, match=key):  # from a worker, the message still names it
        next(iter(workers.train_dataloader()))


def test_skip_corrupt_serves_the_next_record_and_warns_once(corrupt: Path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dm = module(corrupt, skip_corrupt=True)
    key = bad_key(corrupt)
    n = len(dm.train_set)
    j = [bytes(k).decode() for k in dm.train_set.keys].index(key)
    image, label, index = dm.train_set[j]
    assert index == j and label == -1  # served under its own index: its flip stays its own
    assert torch.equal(image, dm.train_set[(j + 1) % n][0])
    dm.train_set[j]
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and key in warnings[0] and "so far in this process: 1" in warnings[0]
    assert dm.train_set.substitutions == 2
    batches = list(dm.train_dataloader())  # a whole epoch loads
    assert sum(len(b.index) for b in batches) == (n // 8) * 8


def test_skip_corrupt_wraps_around(tmp_path: Path):
    good = encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG")
    root = write_records(tmp_path, [good, b"no image", b"neither"])
    dm = module(root, image_size=8, skip_corrupt=True)
    assert torch.equal(dm.train_set[2][0], dm.train_set[0][0])
    only_bad = module(write_records(tmp_path / "b", [b"x", b"y"]), skip_corrupt=True)
    with pytest.raises(RuntimeError, match="No record of this split"):
        only_bad.train_set[0]


# --------------------------------------------------------------------------------------------
# splits, keys and their cache
# --------------------------------------------------------------------------------------------


def test_max_images_and_val_fraction(clean: Path, caplog):
    keys = [key for key, _ in records(clean)]
    dm = module(clean, max_images=10)
    assert dm.split_lengths() == {"train": 10, "val": 0, "test": 0}
    assert [bytes(k) for k in dm.train_set.keys] == keys[:10]  # the first N in key order

    dm = module(clean, max_images=20, val_fraction=0.25)
    assert dm.split_lengths() == {"train": 15, "val": 5, "test": 0}
    train, val = ([bytes(k) for k in s.keys] for s in (dm.train_set, dm.val_set))
    assert sorted(train + val) == keys[:20] and train == sorted(train) and val == sorted(val)
    again = module(clean, max_images=20, val_fraction=0.25)
    assert [bytes(k) for k in again.val_set.keys] == val  # the split is drawn from the seed
    other = module(clean, max_images=20, val_fraction=0.25, seed=1)
    assert [bytes(k) for k in other.val_set.keys] != val

    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert len(module(clean, max_images=1000).train_set) == COUNT
    assert "data.max_images=1000" in caplog.text


def test_keys_are_cached_outside_the_data_folder(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clean = write_lsun_lmdb(tmp_path / "data", count=COUNT, corrupt=0, size=(24, 16))
    module(clean, max_images=5)
    cache = tmp_path / "cache" / "lsun"
    assert not cache.exists()  # a partial listing is not cached
    first = module(clean)
    (cached,) = cache.glob("*.npy")
    assert "listed 40 keys" in caplog.text
    caplog.clear()
    second = module(clean, max_images=7)
    assert "read from" in caplog.text and "listed" not in caplog.text
    assert np.array_equal(second.train_set.keys, first.train_set.keys[:7])
    assert sorted(p.name for p in clean.iterdir()) == ["data.mdb", "lock.mdb"]  # nothing written there

    close_lmdb(clean)  # a changed LMDB is listed again
    env = lmdb.open(str(clean), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"ffff", encode(Image.new("RGB", (8, 8)), "PNG"))
    env.close()
    assert len(module(clean).train_set) == COUNT + 1
    assert len(list(cache.glob("*.npy"))) == 2


# --------------------------------------------------------------------------------------------
# wrong paths and values
# --------------------------------------------------------------------------------------------


def test_missing_folder_says_where_to_point_and_how_to_download(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*data.root=.*download.py -c bedroom"):
        module(tmp_path / "nowhere")


def test_folder_without_an_lmdb(tmp_path: Path, clean: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no data.mdb.*data.root.*download.py"):
        module(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"It holds bedroom_train_lmdb: point data.root at one"):
        module(clean.parent)
    with pytest.raises(FileNotFoundError, match="is a file"):
        module(clean / "data.mdb")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"not an lmdb" * 1000)
    with pytest.raises(ValueError, match="is not a readable LMDB"):
        module(tmp_path / "junk")
    with pytest.raises(ValueError, match="holds no records"):
        module(write_records(tmp_path / "none", []))


@pytest.mark.parametrize(("key", "value"), [
    ("image_size", 0), ("image_size", 64.0), ("batch_size", 0), ("max_images", 0), ("max_images", "all"),
    ("val_fraction", 1.0), ("val_fraction", -0.1), ("random_flip", "yes"), ("draft", 1), ("verify", None),
    ("skip_corrupt", "false"), ("num_workers", -1), ("seed", -1),
])
def test_bad_values_name_their_key(clean: Path, key: str, value):
    with pytest.raises(ValueError, match=f"data.{key}"):
        LSUNDataModule(clean, **{key: value})


def test_empty_root_is_refused():
    with pytest.raises(ValueError, match="data.root"):
        LSUNDataModule("")


def test_missing_lmdb_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[data\]'"):
        import_lmdb()
    with pytest.raises(ImportError, match="pip install"):
        LMDBReader(Path("x")).get(b"k")


# --------------------------------------------------------------------------------------------
# the config and the Trainer
# --------------------------------------------------------------------------------------------


def test_config_instantiates_with_the_class_defaults(clean: Path):
    cfg = OmegaConf.load(CONFIG)
    assert OmegaConf.is_missing(cfg, "root")
    cfg.root = str(clean)
    dm = instantiate(cfg)
    assert isinstance(dm, LSUNDataModule) and dm.root == clean
    defaults = {k: p.default for k, p in inspect.signature(LSUNDataModule).parameters.items() if k != "root"}
    assert {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "root")} == defaults
    assert dm.data_shape == (3, 256, 256) and dm.num_workers == 8 and not dm.verify and not dm.skip_corrupt
    dm.setup("fit")
    assert len(dm.train_set) == COUNT - 1 and len(dm.val_set) == 1  # val_fraction 0.001: at least one


class Probe(L.LightningModule):
    """Asserts what the Trainer hands training_step: (float32 x in [-1, 1], long y) after the batch transfer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = 0

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, tuple) and not isinstance(batch, ImageBatch)
        x, y = batch
        assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
        assert y.dtype == torch.long and (y == -1).all()
        self.seen += 1
        return (self.weight * x).mean() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fits_on_it(clean: Path):
    dm = LSUNDataModule(clean, image_size=16, batch_size=4, num_workers=0)
    probe = Probe()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(probe, datamodule=dm)
    assert probe.seen == 2
