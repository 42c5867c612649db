"""No host-device sync in the training step: the EMA update and the progress bar must not read device values
every step (each read waits for the GPU to finish the step).

On a CPU there is nothing to wait for, so these tests count the Python-level reads that would sync on a GPU
(``Tensor.item``, ``__bool__``, ``__float__``, ...) and check that the count does not grow with the steps.
"""

from __future__ import annotations

import collections
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from src.callbacks.ema import SyncFreeAveragedModel
from src.callbacks.progress import ThrottledRichProgressBar, TrainingProgressLines
from src.train import train
from tests.helpers import compose_config

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def count_host_reads(monkeypatch):
    counts: collections.Counter = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def train_counting(tmp_path, counts, steps: int) -> int:
    # nothing periodic falls inside the run: no logging, checks, checkpoints, grids or validation
    cfg = compose_config([
        "trainer=cpu", "diffusion.num_timesteps=50", "data.num_workers=0", "logger=csv", "data.batch_size=16",
        f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1000",
        "callbacks.progress_bar.every_n_steps=1000", "module.nan_check_every_n_steps=1000",
        "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.sample_grid.every_n_epochs=1000",
    ], tmp_path / f"run{steps}")
    counts.clear()
    train(cfg)
    return sum(counts.values())


@pytest.mark.slow
def test_training_steps_read_nothing_back_from_the_device(tmp_path, count_host_reads, one_thread):
    # digits' training split at batch 16 is 89 steps an epoch: both runs stay inside the first epoch
    short = train_counting(tmp_path, count_host_reads, 4)
    long = train_counting(tmp_path, count_host_reads, 16)
    assert short > 0  # the counting works: fit start and end do read values
    assert long == short, f"{long - short} host reads in 12 extra training steps"


def ema_pair(decay: float = 0.9):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # a float and an integer buffer too
    ours = SyncFreeAveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    torch_ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return model, ours, torch_ref


def step(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(5, 3))  # moves the BatchNorm running stats and its counter


def assert_same_average(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_sync_free_ema_equals_torchs_averaged_model(count_host_reads):
    model, ours, torch_ref = ema_pair()
    updates = []
    for _ in range(4):
        step(model)
        updates.append(copy.deepcopy(model))
    count_host_reads.clear()
    for m in updates:
        ours.update_parameters(m)
    ours_reads = sum(count_host_reads.values())
    count_host_reads.clear()
    for m in updates:
        torch_ref.update_parameters(m)
    torch_reads = sum(count_host_reads.values())
    assert_same_average(ours, torch_ref)
    assert int(ours.n_averaged) == 4
    assert torch_reads >= 8 and ours_reads == 1  # torch reads its counter twice per update; ours once in all


def test_sync_free_ema_resumes_from_a_state_dict():
    model, ours, torch_ref = ema_pair()
    for _ in range(3):
        step(model)
        ours.update_parameters(model)
        torch_ref.update_parameters(model)
    _, resumed, _ = ema_pair()
    resumed.update_parameters(model)  # a fresh count of 1 that the load must replace
    resumed.load_state_dict(ours.state_dict())
    step(model)
    resumed.update_parameters(model)
    torch_ref.update_parameters(model)
    assert_same_average(resumed, torch_ref)
    assert int(resumed.n_averaged) == 4


class CountingMetrics(dict):
    def __init__(self, *args):
        super().__init__(*args)
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key)


def test_progress_bar_reads_the_step_loss_every_n_steps(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, trainer, module: {"v_num": 0})
    bar = ThrottledRichProgressBar(step_metrics=["train/loss", "absent"], every_n_steps=4)
    metrics = CountingMetrics({"train/loss": torch.tensor(0.5)})
    trainer = SimpleNamespace(training=True, global_step=0, callback_metrics=metrics)
    shown = []
    for step_ in range(10):
        trainer.global_step = step_
        metrics["train/loss"] = torch.tensor(float(step_))
        shown.append(bar.get_metrics(trainer, None))
    assert metrics.reads == 3  # steps 0, 4 and 8
    assert [s["train/loss"] for s in shown] == [0.0] * 4 + [4.0] * 4 + [8.0] * 2
    assert all(s["v_num"] == 0 and "absent" not in s for s in shown)
    trainer.training = False  # validation: the last shown loss stays, nothing is read
    assert bar.get_metrics(trainer, None)["train/loss"] == 8.0 and metrics.reads == 3
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        ThrottledRichProgressBar(every_n_steps=0)


def test_progress_lines_read_the_step_loss_only_for_a_line(monkeypatch):
    from src.utils import progress

    now = [0.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    lines = TrainingProgressLines(every_n_steps=4, every_n_seconds=30)
    metrics = CountingMetrics({"train/loss": torch.tensor(0.5)})
    trainer = SimpleNamespace(global_step=0, max_steps=1000, max_epochs=-1, current_epoch=0,
                              callback_metrics=metrics)
    lines.on_train_start(trainer, None)
    for step_ in range(1, 41):
        now[0] += 2.0  # a line is due every 15 steps, checked every 4: at steps 16 and 32
        trainer.global_step = step_
        lines.on_train_batch_end(trainer, None, None, None, step_ - 1)
    assert metrics.reads == 2
    lines.on_train_end(trainer, None)
    assert metrics.reads == 3  # the final line
