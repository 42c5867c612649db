"""Streamed shards: `python -m src.data.prepare` writes them from a source, `data=shards` reads them (LitData), the
ranks of a DDP run see disjoint parts of every epoch, and a run stopped mid-epoch resumes bit for bit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from src.data.cifar10 import CIFAR10DataModule
from src.data.shards import ShardsDataModule
from src.data.synthetic import write_cifar10_format, write_lsun_lmdb
from src.data.uint8_images import ImageBatch, flip_decisions
from tests.helpers import TINY, assert_same_weights_and_ema, load_checkpoint, run_entry_point

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PER_BATCH = 8  # cifar-10-batches-py of 5 x 8 training images and 8 test images


def prepare(tmp: Path, *args: str) -> tuple[Path, Path]:
    """``python -m src.data.prepare`` as users type it; (shards folder, run folder)."""
    out, run = tmp / "shards", tmp / "prepare-run"
    result = run_entry_point("src.data.prepare", *args, f"out={out}", "num_workers=1", f"hydra.run.dir={run}",
                             cwd=tmp, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, run


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cifar-shards")
    write_cifar10_format(tmp / "data", per_batch=PER_BATCH)
    source = [f"source.data_dir={tmp / 'data'}", "source.download=false", "source.verify_checksums=false"]
    out, run = prepare(tmp, "source=cifar10", *source)
    reference = CIFAR10DataModule(data_dir=str(tmp / "data"), download=False, verify_checksums=False)
    reference.setup()
    return {"tmp": tmp, "out": out, "run": run, "source": source, "reference": reference}


def shards(out: Path, **options) -> ShardsDataModule:
    dm = ShardsDataModule(root=str(out), image_size=32, **({"batch_size": 8, "num_workers": 0} | options))
    dm.setup()
    return dm


def epoch_indices(dm: ShardsDataModule) -> list[int]:
    return [i for batch in dm.train_dataloader() for i in batch.index.tolist()]


def test_shards_hold_the_source_images_labels_and_indices(cifar):
    dm = shards(cifar["out"])
    summary = json.loads((cifar["run"] / "prepare.json").read_text())
    assert summary["splits"]["train"]["images"] == 5 * PER_BATCH and summary["splits"]["val"]["images"] == PER_BATCH
    assert dm.split_lengths() == {"train": 5 * PER_BATCH, "val": PER_BATCH, "test": 0}
    source = cifar["reference"].unflipped_train_set()
    stored = dm.reference_images("train")
    seen = set()
    for k in range(len(stored)):
        x, y = stored[k]
        index = stored.base[k][2]
        sx, sy = source[index]
        assert torch.equal(x, sx) and y == sy  # exactly the source's pixels (on the 8-bit grid) and label
        seen.add(index)
    assert seen == set(range(5 * PER_BATCH))


def test_an_epoch_reads_every_image_once_in_an_order_drawn_from_seed_and_epoch(cifar):
    first = shards(cifar["out"], num_workers=2)
    loader = first.train_dataloader()
    epochs = [[i for b in loader for i in b.index.tolist()] for _ in range(2)]
    assert sorted(epochs[0]) == list(range(40)) and sorted(epochs[1]) == list(range(40))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    # the order is a function of (seed, epoch, ranks, workers): the same settings read the same order
    assert epoch_indices(shards(cifar["out"], num_workers=2)) == epochs[0]
    assert sorted(epoch_indices(shards(cifar["out"], num_workers=0))) == list(range(40))
    assert epoch_indices(shards(cifar["out"], seed=1)) != epochs[0]
    batch = next(iter(shards(cifar["out"]).train_dataloader()))
    assert isinstance(batch, ImageBatch) and batch.image.dtype == torch.uint8 and batch.image.shape == (8, 3, 32, 32)


def test_batches_are_scaled_and_flipped_on_the_device_by_index(cifar):
    dm = shards(cifar["out"])
    batch = next(iter(dm.train_dataloader()))
    plain, _ = dm.to_model_batch(batch, train=False)
    flipped, labels = dm.to_model_batch(batch, train=True, epoch=3)
    assert plain.dtype == torch.float32 and plain.min() >= -1 and plain.max() <= 1
    flips = flip_decisions(batch.index, dm.seed, 3)
    assert 0 < int(flips.sum()) < len(flips)
    for k in range(len(flips)):
        assert torch.equal(flipped[k], plain[k].flip(-1) if flips[k] else plain[k])
    assert torch.equal(labels, batch.label)


def test_lightning_gets_float_batches(cifar):
    class Check(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, i):
            x, y = batch
            assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and y.dtype == torch.long
            return self.w * x.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(Check(), datamodule=ShardsDataModule(root=str(cifar["out"]), image_size=32, batch_size=8,
                                                     num_workers=0))
    assert trainer.global_step == 5


def test_clear_errors(cifar, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*src.data.prepare"):
        shards(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="hold 32x32 images with 3 channels.*data.image_size=32"):
        ShardsDataModule(root=str(cifar["out"]), image_size=256).setup()
    result = run_entry_point("src.data.prepare", "source=cifar10", *cifar["source"], f"out={cifar['out']}",
                             f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode != 0 and "already holds shards" in result.stderr and "overwrite=true" in result.stderr


def test_unreadable_lsun_records_are_left_out_and_listed(tmp_path):
    lmdb_dir = write_lsun_lmdb(tmp_path / "lsun", count=12, corrupt=1, size=(48, 32))
    out, run = prepare(tmp_path, "source=lsun", f"source.root={lmdb_dir}", "source.image_size=32",
                       "source.val_fraction=0.0")
    bad = json.loads((run / "unreadable-train.json").read_text())
    assert len(bad) == 1 and "Could not decode LSUN record" in bad[0]["error"]
    dm = shards(out)
    assert dm.split_lengths()["train"] == 12
    # the other 12 records, each once, under their index in the source (keys in order)
    assert sorted(epoch_indices(shards(out, batch_size=4))) == sorted(set(range(13)) - {bad[0]["index"]})


# --------------------------------------------------------------- through src.train
def train_args(out: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "data=shards", f"data.root={out}", "data.image_size=32", "data.batch_size=8",
            "callbacks.sample_grid=null", "trainer.deterministic=true", "trainer.max_steps=12",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_two_ddp_ranks_read_disjoint_halves_of_every_epoch(cifar, tmp_path):
    run_dir = tmp_path / "ddp"
    result = run_entry_point("src.train", *train_args(cifar["out"], run_dir, "trainer=ddp", "trainer.accelerator=cpu",
                                                      "trainer.devices=2", "trainer.max_steps=5",
                                                      "data.random_flip=false", "data.batch_size=4",
                                                      "+callbacks.seen._target_=tests.data.test_shards.RecordImages"),
                             cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(run_dir / f"seen-rank{r}.pt") for r in (0, 1)]
    stored = shards(cifar["out"]).reference_images("train")
    names = {image_key(stored[k][0]): stored.base[k][2] for k in range(len(stored))}
    seen = [[names[key] for key in rank] for rank in ranks]
    # 40 images, batches of 4 on each of 2 ranks: an epoch is 5 steps, each rank reading 20 images
    assert len(seen[0]) == len(seen[1]) == 20
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(40))


def image_key(x: torch.Tensor) -> bytes:
    return ((x + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()


class RecordImages(L.Callback):
    """Writes the images each rank trained on (as their pixel bytes) to ``seen-rank<r>.pt`` in the run folder."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += [image_key(x.cpu()) for x in batch[0]]

    def on_train_end(self, trainer, pl_module):
        torch.save(self.keys, Path(trainer.default_root_dir) / f"seen-rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_exactly(cifar, tmp_path):
    """SIGTERM at step 7 (epoch 1, batch 2 of 5; loader workers running), then `ckpt_path=last`: the weights and EMA
    of the uninterrupted 12-step run, which needs the loader to continue from its saved position."""
    from tests.entry_points.test_resilience import sigterm_when_paused, start_training

    whole = tmp_path / "whole"
    result = run_entry_point("src.train", *train_args(cifar["out"], whole, "data.num_workers=2"), cwd=tmp_path,
                             env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir, log = tmp_path / "stopped", tmp_path / "stopped.log"
    marker = tmp_path / "stopped-paused"
    proc = start_training(log, *train_args(cifar["out"], run_dir, "data.num_workers=2",
                                           "+callbacks.pause._target_=tests.entry_points.test_resilience.PauseAtStep",
                                           "+callbacks.pause.step=7", f"+callbacks.pause.marker={marker}"))
    sigterm_when_paused(proc, marker, log)
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 7, log.read_text()[-3000:]
    time.sleep(0.1)
    result = run_entry_point("src.train", *train_args(cifar["out"], run_dir, "data.num_workers=2", "ckpt_path=last"),
                             cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_weights_and_ema(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"),
                                load_checkpoint(whole / "checkpoints" / "last.ckpt"))
