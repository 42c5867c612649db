"""Run folders that ordinary actions cannot corrupt: exact resumes from every kind of last.ckpt, one run per folder,
no -vN files, one metrics row per step, no empty folders from failed starts, clear disk-full errors."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from src.utils.checkpoint_io import AtomicCheckpointIO
from src.utils.run_folder import LOCK_NAME, FolderLock, RunFolderError
from tests.helpers import ROOT, assert_same_weights_and_ema, load_checkpoint, run_entry_point

# The default experiment (digits: 11 batches an epoch at batch 128) with a short chain for fast sample grids;
# validation and a sample grid after every epoch, so the resumed part crosses an epoch end with sampling.
DIGITS = ["trainer=cpu", "diffusion.num_timesteps=50", "callbacks.sample_grid.num_samples=4",
          "callbacks.sample_grid.every_n_epochs=1", "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=1",
          "trainer.log_every_n_steps=1", "trainer.deterministic=true"]
TOTAL, STOP = 14, 5
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class SignalAtStep(L.Callback):
    """Sends ``signal`` to this process while training step ``step`` (1-based) runs: a scheduler's SIGTERM, a
    user's Ctrl+C, or a SIGKILL (out of memory, a lost node), arriving at a known step."""

    def __init__(self, step: int, signal: str):
        self.step, self.signal = step, getattr(__import__("signal"), signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signal)


def stop_at(step: int, sig: str) -> list[str]:
    return ["+callbacks.stop._target_=tests.entry_points.test_run_folders.SignalAtStep", f"+callbacks.stop.step={step}",
            f"+callbacks.stop.signal={sig}"]


def train(run_dir: Path, *args: str, env: dict | None = ONE_THREAD) -> subprocess.CompletedProcess:
    """Separate runs compute alike only with the same CPU thread count: one, unless ``env`` says otherwise."""
    return run_entry_point("src.train", *DIGITS, *args, f"hydra.run.dir={run_dir}", cwd=run_dir.parent, env=env)


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    result = train(run_dir, f"trainer.max_steps={TOTAL}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# How each first attempt stops at step STOP, the exit status it must report, and the kind of last.ckpt it leaves.
WAYS = {
    "periodic": (["callbacks.model_checkpoint.every_n_train_steps=5", f"trainer.max_steps={TOTAL}",
                  *stop_at(STOP + 1, "SIGKILL")], -signal.SIGKILL),
    "max_steps": ([f"trainer.max_steps={STOP}"], 0),
    "sigterm": ([f"trainer.max_steps={TOTAL}", *stop_at(STOP, "SIGTERM")], 128 + signal.SIGTERM),
    "ctrl_c": ([f"trainer.max_steps={TOTAL}", *stop_at(STOP, "SIGINT")], 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("way", list(WAYS))
def test_resume_from_any_last_checkpoint_is_exact(tmp_path, uninterrupted, way):
    """14 steps in one run == 5 steps stopped in any way + a resume from its last.ckpt: same weights, EMA and
    metrics rows, bit for bit, with the default interval of periodic checkpoints (1000) unless the way is one."""
    args, status = WAYS[way]
    run_dir = tmp_path / "run"
    first = train(run_dir, *args)
    assert first.returncode == status, first.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STOP
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["cpu_threads"] == 1
    env = ONE_THREAD
    if way == "max_steps":  # a folder that was moved (or copied) before it resumes, without OMP_NUM_THREADS:
        run_dir = run_dir.rename(tmp_path / "moved")  # the resume takes the thread count of its checkpoint
        env = {"OMP_NUM_THREADS": None}
    resumed = train(run_dir, f"trainer.max_steps={TOTAL}", "ckpt_path=last", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr + resumed.stdout
    assert_same_weights_and_ema(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"),
                                load_checkpoint(uninterrupted / "checkpoints" / "last.ckpt"))
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if "-v" in p.name or ".tmp-" in p.name]
    # one row per step and kind: the stopped attempt's rows after its checkpoint are gone; the aggregates of the
    # epoch that was split cover only the resumed part, all other values are the uninterrupted run's
    def comparable(rows):
        return [r for r in rows if not (r.get("train/loss_epoch") and r["epoch"] == "0")]

    got, want = metric_rows(run_dir), metric_rows(uninterrupted)
    assert len(got) == len(want)
    assert comparable(got) == comparable(want)


def test_checkpoint_record_follows_a_moved_folder(tmp_path):
    from src.callbacks.checkpoint import _moved_record

    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    new.mkdir(parents=True)
    (new / "step=0000002.ckpt").touch()
    state = {"dirpath": str(old), "best_k_models": {str(old / "step=0000002.ckpt"): 2.0,
                                                    str(old / "step=0000001.ckpt"): 1.0},
             "best_model_path": str(old / "step=0000002.ckpt"), "kth_best_model_path": str(old / "step=0000001.ckpt"),
             "last_model_path": str(old / "last.ckpt"), "best_model_score": 2.0, "kth_value": 1.0}
    moved = _moved_record(state, old, new)
    assert moved["dirpath"] == str(new) and moved["best_k_models"] == {str(new / "step=0000002.ckpt"): 2.0}
    assert moved["best_model_path"] == str(new / "step=0000002.ckpt") and moved["kth_best_model_path"] == ""
    # resumed into a folder that holds none of them: no record to carry over
    assert _moved_record(state, old, tmp_path / "elsewhere") is None


# --------------------------------------------------------------------------- one run per folder
HOLD_LOCK = """
import sys, time
from pathlib import Path
from src.utils.run_folder import FolderLock
FolderLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_held_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
            FolderLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # the holder died without cleaning up: its lock file remains, the lock itself went with the process
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = FolderLock(folder)
    lock.acquire()
    assert f"taking over the lock of process {holder.pid}" in caplog.text
    lock.release()
    assert not (folder / LOCK_NAME).exists()


def _text_or_empty(path):
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.mark.slow
def test_a_second_training_in_a_busy_run_folder_stops_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    first = subprocess.Popen([sys.executable, "-m", "src.train", *DIGITS, "trainer.max_steps=1000",
                              f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # the lock (with its owner) is taken at run start; Hydra writes overrides.yaml after config.yaml
        while (f'"pid": {first.pid}' not in _text_or_empty(run_dir / LOCK_NAME)
               or not _text_or_empty(run_dir / ".hydra" / "overrides.yaml")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        config = (run_dir / ".hydra" / "config.yaml").read_bytes()
        second = run_entry_point("src.train", *DIGITS, "trainer.max_steps=2", "diffusion/variance=fixed_small",
                                 f"hydra.run.dir={run_dir}", cwd=tmp_path, env=ONE_THREAD)
        assert second.returncode == 1
        assert f"the run folder {run_dir} is in use by process {first.pid}" in second.stderr
        assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config  # untouched
        assert first.poll() is None  # and the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)


# --------------------------------------------------------------------------- failed starts, bad folders
@pytest.mark.slow
def test_a_failed_start_leaves_no_run_folder(tmp_path):
    result = run_entry_point("src.train", "trainer=cpu", "data.batch_size=0", cwd=tmp_path,
                             env={"DDPM_ROOT": str(tmp_path)})
    assert result.returncode == 1 and "data.batch_size must be an integer >= 1" in result.stderr
    assert list((tmp_path / "outputs" / "train" / "runs").iterdir()) == []
    # a folder that existed before keeps everything it had
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    result = run_entry_point("src.train", "trainer=cpu", "data.batch_size=0", f"hydra.run.dir={existing}",
                             cwd=tmp_path)
    assert result.returncode == 1 and (existing / "notes.txt").read_text() == "mine"


def test_a_file_as_run_folder_is_a_clear_error(tmp_path):
    from omegaconf import OmegaConf

    from src.utils.run_folder import RunFolderGuard

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(RunFolderError, match="is an existing file: point hydra.run.dir"):
        RunFolderGuard().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(a_file)}}}))


# --------------------------------------------------------------------------- a full disk
def checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((1000,), value)}, "global_step": int(value)}


@pytest.mark.parametrize("failure", ["enospc", "unexpected_pos"])
def test_disk_full_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), target)

    def full_disk(checkpoint, file):
        file.write(b"partial")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(io, "_write", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OSError, match=rf"no space left in {tmp_path} \(0 MiB free\) .* previous checkpoint is intact"):
        io.save_checkpoint(checkpoint(2.0), target)
    assert load_checkpoint(target)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


LIMITED_WRITER = """
import resource, signal, sys, torch
from src.utils.checkpoint_io import AtomicCheckpointIO
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1_000_000), "global_step": 2}, sys.argv[1])
except OSError as err:
    print(err)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_cut_short_by_the_file_system_is_named(tmp_path):
    """A real failing write (the process's file size limit, as a full disk does it): torch's own error says only
    'unexpected pos'."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), target)
    result = subprocess.run([sys.executable, "-c", LIMITED_WRITER, str(target)], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert "exceeds the file size limit" in result.stdout and "previous checkpoint is intact" in result.stdout, \
        result.stdout + result.stderr
    assert load_checkpoint(target)["global_step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
