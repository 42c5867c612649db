"""Progress display: steps (not epochs) on the training bar, plain log lines where output is not a terminal."""

from __future__ import annotations

import io
import logging
import re

import lightning as L
import pytest
import rich
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.progress import ThrottledRichProgressBar, TrainingProgressLines
from src.utils import progress as progress_utils
from src.utils.progress import format_duration, track, training_progress

ESCAPES = ("\r", "\x1b[")


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True)  # not prog_bar, as DDPMModule
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.net(batch[0]).pow(2).mean(), on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):  # 4 batches an epoch
        return DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)


def tiny_trainer(tmp_path, bar, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, max_epochs=-1, callbacks=[bar, *kwargs.pop("callbacks", [])],
                     logger=False, accelerator="cpu", devices=1, enable_model_summary=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


@pytest.fixture
def rich_console():
    """A terminal-like Rich console into a buffer, put back to the default after the test."""
    buffer = io.StringIO()
    yield buffer, {"file": buffer, "force_terminal": True, "width": 200}
    rich.reconfigure()


class FirstBatch(L.Callback):
    """What the training bar shows when the first batch of a fit starts."""

    def __init__(self, bar: ThrottledRichProgressBar) -> None:
        self.bar, self.seen = bar, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            task = self.bar.train_progress_bar
            self.seen = (task.completed, task.total, str(task.description))


def test_training_bar_counts_steps_to_max_steps_and_resumes_at_the_checkpoint_step(tmp_path, rich_console):
    buffer, console = rich_console
    bar = ThrottledRichProgressBar(every_n_steps=2, console_kwargs=console)
    trainer = tiny_trainer(tmp_path, bar, max_steps=6, enable_checkpointing=False, check_val_every_n_epoch=100)
    trainer.fit(Tiny())
    task = bar.train_progress_bar
    assert (task.completed, task.total) == (6, 6)  # 6 steps over 2 epochs of 4 batches: one bar, not per epoch
    assert "Epoch 1" in task.description and "/" not in task.description  # max_epochs=-1: no "Epoch 1/-2"
    shown = buffer.getvalue()
    assert "step 6/6" in shown and "steps/s" in shown and "train/loss" in shown
    assert "/-2" not in shown
    ckpt = tmp_path / "step6.ckpt"
    trainer.save_checkpoint(ckpt)

    bar = ThrottledRichProgressBar(every_n_steps=2, console_kwargs=console)
    first = FirstBatch(bar)
    resumed = tiny_trainer(tmp_path, bar, max_steps=10, enable_checkpointing=False, check_val_every_n_epoch=100,
                           callbacks=[first])
    resumed.fit(Tiny(), ckpt_path=ckpt)
    assert first.seen[:2] == (6, 10)  # starts at the checkpoint's step, not at 0 of the steps left
    assert (bar.train_progress_bar.completed, bar.train_progress_bar.total) == (10, 10)
    assert "step 10/10" in buffer.getvalue() and "10/3" not in buffer.getvalue()


def test_training_bar_description_keeps_a_bounded_epoch_count(tmp_path):
    bar = ThrottledRichProgressBar()
    trainer = L.Trainer(max_epochs=5, callbacks=[bar], logger=False, accelerator="cpu")
    bar._trainer = trainer
    assert bar._get_train_description(2).strip() == "Epoch 2/4"  # Lightning's 0-based "current/last"
    trainer.fit_loop.max_epochs = -1
    assert bar._get_train_description(2).strip() == "Epoch 2"


def test_training_lines_are_plain_log_lines_with_rate_loss_and_eta(tmp_path, caplog, capfd, monkeypatch):
    clock = iter(range(0, 10_000, 10))  # every clock read: 10 s later
    monkeypatch.setattr(progress_utils, "_clock", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="src.callbacks.progress")
    bar = TrainingProgressLines(every_n_steps=2, every_n_seconds=15)
    trainer = tiny_trainer(tmp_path, bar, max_steps=6, enable_checkpointing=False)
    trainer.fit(Tiny())
    lines = [r.getMessage() for r in caplog.records if r.name == "src.callbacks.progress"]
    assert lines[0] == "training from step 0/6"
    steps = [line for line in lines if line.startswith("step ")]
    # checked at steps 2 and 4 (every 2 steps), each 20 s after the last line (>= 15 s), and the end
    assert [s.split(",")[0] for s in steps] == ["step 2/6 (33.3%)", "step 4/6 (66.7%)", "step 6/6 (100.0%)"]
    assert re.fullmatch(r"step 4/6 \(66\.7%\), epoch 0, 0\.2 steps/s, loss [0-9.e-]+, ETA 10s", steps[1])
    assert "done in" in steps[-1] and ", epoch 1," in steps[-1]  # the epoch of the last step
    assert any(line.startswith("validation at step 4 (epoch 0): val/loss ") for line in lines)
    out, err = capfd.readouterr()
    assert not any(e in out + err for e in ESCAPES)


def test_training_lines_wait_for_the_interval(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(progress_utils, "_clock", lambda: 0.0)  # no time passes: only the 10% marks print
    caplog.set_level(logging.INFO, logger="src.callbacks.progress")
    bar = TrainingProgressLines(every_n_steps=1, every_n_seconds=30)
    trainer = tiny_trainer(tmp_path, bar, max_steps=40, enable_checkpointing=False, check_val_every_n_epoch=100)
    trainer.fit(Tiny())
    steps = [r.getMessage().split(" (")[0] for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps == [f"step {s}/40" for s in range(4, 40, 4)] + ["step 40/40"]  # the last: the final line


def test_training_progress_is_lines_unless_a_terminal_or_asked(monkeypatch):
    monkeypatch.delenv(progress_utils.ENV_VAR, raising=False)
    monkeypatch.setattr(progress_utils, "_interactive", lambda: False)
    assert isinstance(training_progress(), TrainingProgressLines)
    assert isinstance(training_progress("bar", every_n_steps=7), ThrottledRichProgressBar)
    monkeypatch.setattr(progress_utils, "_interactive", lambda: True)
    chosen = training_progress(step_metrics=["train/loss"], every_n_steps=7)
    assert isinstance(chosen, ThrottledRichProgressBar) and chosen.every_n_steps == 7
    monkeypatch.setenv(progress_utils.ENV_VAR, "lines")
    assert isinstance(training_progress("auto"), TrainingProgressLines)
    assert isinstance(training_progress("bar"), ThrottledRichProgressBar)  # the config's explicit choice wins
    with pytest.raises(ValueError, match="auto, bar, lines"):
        training_progress("fancy")


def emitted(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "src.utils.progress"]


def test_lines_come_per_tenth_or_per_interval_and_at_the_end(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="src.utils.progress")
    monkeypatch.delenv(progress_utils.ENV_VAR, raising=False)
    now = [0.0]
    monkeypatch.setattr(progress_utils, "_clock", lambda: now[0])
    for _ in track(range(100), desc="sampling", unit="steps", mode="lines"):
        now[0] += 1.0  # 100 s in all: each tenth (10 s) comes before the 30 s interval
    lines = emitted(caplog)
    assert [line.split(" (")[0] for line in lines[:-1]] == [f"sampling: {n}/100" for n in range(10, 100, 10)]
    assert lines[3] == "sampling: 40/100 (40%), 1 steps/s, ETA 1m 00s"
    assert lines[-1] == "sampling: 100/100 done in 1m 40s, 1 steps/s"

    caplog.clear()
    with track(total=10_000, desc="samples", unit="samples", mode="lines") as bar:
        for _ in range(100):  # 1% of the total: only the 30 s interval prints, then the (early) end
            now[0] += 1.0
            bar.update(1)
    lines = emitted(caplog)
    assert [line.split(" (")[0] for line in lines[:-1]] == ["samples: 30/10000", "samples: 60/10000",
                                                            "samples: 90/10000"]
    assert lines[-1] == "samples: 100/10000 done in 1m 40s (stopped), 1 samples/s"


def test_nested_progress_is_silent_as_lines_and_a_cleared_bar_below_on_a_terminal(caplog, monkeypatch, capfd):
    caplog.set_level(logging.INFO, logger="src.utils.progress")
    monkeypatch.delenv(progress_utils.ENV_VAR, raising=False)
    with track(total=2, desc="outer", mode="lines") as outer:
        for _ in track(range(3), desc="inner", mode="lines"):
            pass
        outer.update(2)
    assert [line.split(":")[0] for line in emitted(caplog)] == ["outer"]

    monkeypatch.setenv(progress_utils.ENV_VAR, "bar")
    with track(total=2, desc="outer") as outer:
        inner = track(range(3), desc="inner")
        assert outer._tqdm.leave and not inner._tqdm.leave
        assert abs(inner._tqdm.pos) == 1  # the line below the outer bar
        list(inner)
        outer.update(2)
    assert not progress_utils._open
    assert "outer" in capfd.readouterr().err


def test_durations_read_naturally():
    assert [format_duration(s) for s in (0, 42, 183, 64_920, 183_600)] == ["0s", "42s", "3m 03s", "18h 02m",
                                                                          "2d 03h"]


def test_a_run_without_a_progress_callback_gets_ours_not_lightnings(compose_cfg, monkeypatch):
    from lightning.pytorch.callbacks import ProgressBar

    from src.train import build

    monkeypatch.delenv(progress_utils.ENV_VAR, raising=False)
    built = build(compose_cfg("callbacks.progress_bar=null"))
    bars = [cb for cb in built["trainer"].callbacks if isinstance(cb, ProgressBar)]
    assert [type(cb) for cb in bars] == [TrainingProgressLines]  # not a tty here
