"""Losing nothing: atomic checkpoint writes, SIGKILL and SIGTERM mid-run, resuming, identical DDP ranks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.train import build, train
from src.utils.checkpoint_io import AtomicCheckpointIO
from src.utils.resume import resolve_ckpt_path, run_dir_named
from tests.helpers import (
    ROOT,
    TINY,
    assert_same_weights_and_ema,
    compose_config,
    load_checkpoint,
    run_entry_point,
)

# Deterministic tiny runs of 8 steps over epochs of 3 batches, as in test_train.test_resume_is_exact.
EXACT = [*TINY, "callbacks.sample_grid=null", "trainer.deterministic=true", "trainer.limit_train_batches=3",
         "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_steps=8"]
# Generous: the machines that run the suite are shared and can be slow.
START_TIMEOUT_S = 300
# One intra-op thread per training process: faster for these tiny models on shared cores, and the same for the
# runs that are compared bit for bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------- test-only callbacks (loaded by the entry point)
class PauseAtStep(L.Callback):
    """At ``step``, touch ``marker`` and wait until a SIGTERM arrives (or a SIGKILL ends the process).

    Stands for a run that is busy when a scheduler stops it; the marker tells the test that the run got there.
    """

    def __init__(self, step: int, marker: str, limit_s: float = START_TIMEOUT_S):
        self.step, self.marker, self.limit_s = step, Path(marker), limit_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        self.marker.touch()
        deadline = time.monotonic() + self.limit_s
        while not trainer.received_sigterm:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PauseAtStep: nothing stopped the run within {self.limit_s} s")
            time.sleep(0.05)


class RankStateDump(L.Callback):
    """When fitting ends, write this rank's raw weights, EMA weights and a checksum of its first batch."""

    def __init__(self):
        self.first_batch_sum = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch_sum is None:
            self.first_batch_sum = batch[0].double().sum().item()

    def on_train_end(self, trainer, pl_module):
        # runs before the EMA callback's on_train_end (src.train keeps it last), which copies the average in
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging))
        state = {"step": trainer.global_step, "first_batch_sum": self.first_batch_sum,
                 "net": {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()},
                 "ema": {k: v.detach().cpu().clone() for k, v in ema._average_model.module.net.state_dict().items()}}
        torch.save(state, Path(trainer.default_root_dir) / f"rank{trainer.global_rank}-state.pt")


class RequestSigterm(L.Callback):
    """Sets Lightning's SIGTERM flag after ``step``, as its signal handler would (in-process tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


class RequestSigtermInValidation(L.Callback):
    """Sets Lightning's SIGTERM flag during the first validation batch, while the EMA weights are swapped in."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            trainer._signal_connector.received_sigterm = True


class InterruptBeforeOptimizerStep(L.Callback):
    """Ctrl+C in the middle of a training step: after the backward pass, before the weights change."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


# --------------------------------------------------------------- helpers
def start_training(log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m src.train args`` in its own process group (a signal reaches all of it), output into ``log``."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1", **ONE_THREAD, **(env or {})}
    with open(log, "w") as out:  # a file, not a pipe that nobody reads and that could fill up
        return subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path.name}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.1)


def sigterm_when_paused(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    """Once the run has touched ``marker`` (``PauseAtStep``), SIGTERM its whole process group, as schedulers do,
    and wait for it to end (SIGKILL if it does not)."""
    try:
        wait_for(marker, proc, log)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def paused_run_args(run_dir: Path, step: int) -> list[str]:
    marker = run_dir.parent / f"{run_dir.name}-paused"
    return [*EXACT, f"hydra.run.dir={run_dir}",
            "+callbacks.pause._target_=tests.entry_points.test_resilience.PauseAtStep",
            f"+callbacks.pause.step={step}", f"+callbacks.pause.marker={marker}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """last.ckpt of the 8-step run, never stopped."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_entry_point("src.train", *EXACT, f"hydra.run.dir={root / 'run'}", cwd=root,
                             env={"DDPM_ROOT": str(root), **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint(root / "run" / "checkpoints" / "last.ckpt")


# --------------------------------------------------------------- 1. atomic writes
def checkpoint(value: float, numel: int = 16) -> dict:
    return {"state_dict": {"w": torch.full((numel,), value)}, "global_step": int(value)}


def test_save_replaces_the_file_whole_and_leaves_no_temporaries(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "new" / "folder" / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), target)  # creates the folder
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    io.save_checkpoint(checkpoint(2.0), target)
    saved = load_checkpoint(target)
    assert saved["global_step"] == 2 and torch.equal(saved["state_dict"]["w"], torch.full((16,), 2.0))
    # the file's bytes reach the disk before the rename, and the rename (the folder) after it
    assert events == [("fsync", "file"), ("replace", f"last.ckpt.tmp-{os.getpid()}", "last.ckpt"),
                      ("fsync", "folder")]
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(target, weights_only=True)["global_step"] == 2


def test_failed_save_keeps_the_old_file(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), target)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an object it cannot pickle
        io.save_checkpoint({"state_dict": {}, "bad": lambda: None}, target)
    assert load_checkpoint(target)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(checkpoint(1.0), target, storage_options={"x": 1})


def test_remote_paths_go_through_lightnings_writer():
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(3.0), "memory://ckpts/last.ckpt")
    assert io.load_checkpoint("memory://ckpts/last.ckpt", weights_only=True)["global_step"] == 3


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import torch
    from src.utils.checkpoint_io import AtomicCheckpointIO

    class SlowDisk(AtomicCheckpointIO):
        # serialises, writes half, and stalls: a kill now hits a save in progress
        def _write(self, checkpoint, file):
            import io
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            file.write(data[: len(data) // 2])
            file.flush()
            print("half written", flush=True)
            time.sleep(600)
            file.write(data[len(data) // 2 :])

    big = {"state_dict": {"w": torch.full((4_000_000,), 2.0)}, "global_step": 2}
    SlowDisk().save_checkpoint(big, sys.argv[1])
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), target)
    before = target.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = child.stdout.readline()  # blocks until the child is mid-write (or has died)
        assert line.strip() == "half written", child.stderr.read()[-3000:]
        temps = list(target.parent.glob("last.ckpt.tmp-*"))
        assert len(temps) == 1 and temps[0].stat().st_size > 8_000_000  # the new bytes are really being written
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == before and load_checkpoint(target)["global_step"] == 1
    # the torn bytes are only in the temporary, which does not load and does not look like a checkpoint
    with pytest.raises(Exception):  # noqa: B017
        load_checkpoint(temps[0])
    assert [p.name for p in target.parent.glob("*.ckpt")] == ["last.ckpt"]
    # the next save of that path clears it away
    AtomicCheckpointIO().save_checkpoint(checkpoint(3.0), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(target)["global_step"] == 3


@pytest.mark.parametrize("trainer", ["cpu", "ddp"])
def test_trainer_configs_use_the_plugin_and_keep_cluster_detection(compose_cfg, monkeypatch, trainer):
    extra = ["trainer.accelerator=cpu", "trainer.devices=2"] if trainer == "ddp" else []
    built = build(compose_cfg(f"trainer={trainer}", *extra))["trainer"]
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(built._accelerator_connector.cluster_environment, LightningEnvironment)
    # under SLURM, Lightning still finds its environment by itself
    for key, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "train",
                       "SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    built = build(compose_cfg(f"trainer={trainer}", *extra))["trainer"]
    assert isinstance(built._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)


def test_gpu_trainer_config_has_the_plugin(compose_cfg):
    cfg = compose_cfg("trainer=gpu")
    assert [p["_target_"] for p in cfg.trainer.plugins] == ["src.utils.checkpoint_io.AtomicCheckpointIO"]


# --------------------------------------------------------------- ckpt_path resolution
def fake_checkpoint(path: Path, step: int) -> Path:
    """A file that reads as a checkpoint of this project at ``step`` (what ckpt_path resolution looks at)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ddpm_config": {}, "state_dict": {}, "global_step": step}, path)
    return path


def test_ckpt_path_last_is_this_runs_file_or_a_clear_error(tmp_path):
    old_run = tmp_path / "old"
    last = fake_checkpoint(old_run / "checkpoints" / "last.ckpt", 4)
    assert resolve_ckpt_path("last", old_run / "checkpoints", run_dir_named=True) == str(last)
    # a new run folder has nothing to resume: say how to resume instead of silently starting at step 0
    new = tmp_path / "new" / "checkpoints"
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=<run folder>/checkpoints/last\.ckpt"):
        resolve_ckpt_path("last", new, run_dir_named=False)
    # a named folder without a checkpoint yet (first start of a job that is requeued) starts at step 0
    assert resolve_ckpt_path("last", new, run_dir_named=True) is None
    # a run folder stands for its last.ckpt; a missing file is an error naming the key
    assert resolve_ckpt_path(str(old_run), new, run_dir_named=False) == str(last)
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), new, run_dir_named=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without checkpoints/last.ckpt"):
        resolve_ckpt_path(str(tmp_path / "empty"), new, run_dir_named=False)
    assert resolve_ckpt_path(None, new, run_dir_named=False) is None
    assert resolve_ckpt_path("hpc", new, run_dir_named=False) == "hpc"


def test_ckpt_path_last_is_the_newest_checkpoint_on_disk(tmp_path):
    """A kill between writing step=N.ckpt and last.ckpt leaves last.ckpt one interval behind: resume from step N."""
    folder = tmp_path / "checkpoints"
    last = fake_checkpoint(folder / "last.ckpt", 16)
    fake_checkpoint(folder / "step=0000016.ckpt", 16)
    assert resolve_ckpt_path("last", folder, run_dir_named=True) == str(last)  # a tie goes to last.ckpt
    newer = fake_checkpoint(folder / "step=0000018.ckpt", 18)
    assert resolve_ckpt_path("last", folder, run_dir_named=True) == str(newer)
    assert resolve_ckpt_path(str(tmp_path), None, run_dir_named=False) == str(newer)


def test_ckpt_path_last_in_a_new_run_fails_before_training(compose_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=<run folder>/checkpoints/last\.ckpt"):
        train(compose_cfg("ckpt_path=last"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_run_folder_named_on_the_command_line_is_detected(tmp_path):
    try:
        compose_config(TINY, tmp_path / "a")
        assert not run_dir_named()
        compose_config([*TINY, f"hydra.run.dir={tmp_path / 'b'}"], tmp_path / "b")
        assert run_dir_named()
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


# --------------------------------------------------------------- 3. interruptions in-process
def test_sigterm_between_steps_writes_last_checkpoint(compose_cfg, tmp_path, one_thread):
    objects = build(compose_cfg("trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2",
                                "callbacks.sample_grid=null"))
    trainer = objects["trainer"]
    trainer.callbacks.insert(0, RequestSigterm(step=3))
    with pytest.raises(SIGTERMException):
        trainer.fit(objects["module"], datamodule=objects["datamodule"])
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and int(last["averaging_state"]["n_averaged"]) == 3
    # the raw weights are the module's own, the average is in state_dict (EMA not swapped in)
    raw = objects["module"].state_dict()
    assert all(torch.equal(raw[k], last["current_model_state"][k]) for k in raw)


def test_sigterm_during_validation_keeps_the_last_good_checkpoint(compose_cfg, tmp_path, one_thread):
    # epochs of 3 batches, validation of 2 after each: the stop comes during the first validation, at step 3
    objects = build(compose_cfg("trainer.max_steps=6", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
                                "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid=null"))
    trainer = objects["trainer"]
    trainer.callbacks.insert(0, RequestSigtermInValidation())
    with pytest.raises(SIGTERMException):
        trainer.fit(objects["module"], datamodule=objects["datamodule"])
    assert trainer.global_step == 3
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_ctrl_c_inside_a_step_keeps_the_last_good_checkpoint(compose_cfg, tmp_path, one_thread):
    objects = build(compose_cfg("trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2",
                                "callbacks.sample_grid=null"))
    trainer = objects["trainer"]
    trainer.callbacks.insert(0, InterruptBeforeOptimizerStep(step=3))
    with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into exit status 1 after its on_exception hooks
        trainer.fit(objects["module"], datamodule=objects["datamodule"])
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2


# --------------------------------------------------------------- 2. and 3. through the entry point
@pytest.mark.slow
def test_sigterm_writes_last_checkpoint_and_the_run_resumes_exactly(tmp_path, request):
    run_dir, log = tmp_path / "stopped", tmp_path / "stopped.log"
    proc = start_training(log, *paused_run_args(run_dir, step=5), env={"DDPM_ROOT": str(tmp_path)})
    uninterrupted = request.getfixturevalue("uninterrupted")  # trains while the other run waits
    sigterm_when_paused(proc, tmp_path / "stopped-paused", log)
    output = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]  # a stopped run must not report success
    assert "SIGTERM at step 5" in output, output[-3000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 5  # the step reached, not 4
    # continue in the same folder
    result = run_entry_point("src.train", *EXACT, "ckpt_path=last", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                             env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights_and_ema(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"), uninterrupted)


@pytest.mark.slow
def test_a_run_with_loader_workers_resumes_exactly(tmp_path, request):
    """As above with two loader workers (the data configs' defaults use workers): the workers draw the sampler's
    first indices as soon as Lightning creates the iterator, before any on_train_start, so the resumed position
    must be set when the loader is built; and they must not die of the scheduler's SIGTERM before the checkpoint."""
    run_dir, log = tmp_path / "stopped", tmp_path / "stopped.log"
    proc = start_training(log, *paused_run_args(run_dir, step=5), "data.num_workers=2",
                          env={"DDPM_ROOT": str(tmp_path)})
    uninterrupted = request.getfixturevalue("uninterrupted")  # no workers: the same order
    sigterm_when_paused(proc, tmp_path / "stopped-paused", log)
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 5, log.read_text()[-3000:]
    result = run_entry_point("src.train", *EXACT, "data.num_workers=2", "ckpt_path=last", f"hydra.run.dir={run_dir}",
                             cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights_and_ema(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"), uninterrupted)


# --------------------------------------------------------------- 4. DDP ranks agree
@pytest.mark.slow
def test_two_ddp_ranks_end_with_identical_weights_and_ema(tmp_path):
    run_dir = tmp_path / "ddp"
    started = time.monotonic()
    result = run_entry_point("src.train", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                             "callbacks.sample_grid=null",
                             "+callbacks.rank_dump._target_=tests.entry_points.test_resilience.RankStateDump",
                             f"hydra.run.dir={run_dir}", cwd=tmp_path, env=ONE_THREAD)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (load_checkpoint(run_dir / f"rank{r}-state.pt") for r in (0, 1))
    print(f"two-process DDP run: {wall:.1f} s")
    assert rank0["step"] == rank1["step"] == 4
    # each rank trained on its own shard of the data, yet both hold the same weights and the same average
    assert rank0["first_batch_sum"] != rank1["first_batch_sum"]
    for key in ("net", "ema"):
        assert rank0[key].keys() == rank1[key].keys()
        assert all(torch.equal(rank0[key][k], rank1[key][k]) for k in rank0[key]), key
    assert any(not torch.equal(rank0["net"][k], rank0["ema"][k]) for k in rank0["net"])
