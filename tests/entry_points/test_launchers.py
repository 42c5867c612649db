"""SLURM submission (hydra/launcher=slurm) and the Optuna sweep (+sweep=optuna), with no cluster: the sbatch script
the launcher would submit, Lightning's view of a SLURM task, resuming a requeued job, and both through the real entry
point (SLURM played by tests/fake_slurm.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from src.utils.resume import slurm_requeue_checkpoint
from tests.helpers import CONFIG_DIR, ROOT, TINY, run_entry_point


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_slurm_extra = pytest.mark.skipif(not installed("hydra_plugins.hydra_submitit_launcher"),
                                       reason="hydra-submitit-launcher missing: pip install -e '.[slurm]'")
needs_optuna_extra = pytest.mark.skipif(not installed("hydra_plugins.hydra_optuna_sweeper"),
                                        reason="hydra-optuna-sweeper missing: pip install -e '.[optuna]'")

TWO_NODES = ["experiment=cifar10", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]


def compose_with_hydra(overrides: list[str], output_dir: Path):
    """The composed config with its `hydra` node, as the submitting process of a multirun sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def hydra_cfg(tmp_path):
    yield lambda *overrides: compose_with_hydra(list(overrides), tmp_path / "run")
    GlobalHydra.instance().clear()


@pytest.fixture
def fake_slurm_bin(tmp_path, monkeypatch):
    """A folder with sbatch, srun, sacct and scontrol (tests/fake_slurm.py), put first on PATH."""
    bin_dir, state = tmp_path / "fake-slurm-bin", tmp_path / "fake-slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    for command in ("sbatch", "srun", "sacct", "scontrol"):
        tool = bin_dir / command
        script = ROOT / "tests" / "helpers" / "fake_slurm.py"
        tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" {command} "$@"\n')
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    return state


def slurm_task_env(monkeypatch, *, ntasks: int, ntasks_per_node: int, procid: int, localid: int, nodeid: int,
                   restart_count: int | None = None) -> None:
    """The variables srun gives one task of a job (what Lightning's SLURMEnvironment reads)."""
    variables = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train-cifar10", "SLURM_NTASKS": ntasks,
                 "SLURM_NTASKS_PER_NODE": ntasks_per_node, "SLURM_PROCID": procid, "SLURM_LOCALID": localid,
                 "SLURM_NODEID": nodeid, "SLURM_NODELIST": "gpu[07-08]",
                 "SLURM_JOB_NUM_NODES": ntasks // ntasks_per_node}
    for key, value in variables.items():
        monkeypatch.setenv(key, str(value))
    if restart_count is None:
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart_count))
    # Lightning writes MASTER_ADDR into os.environ: set-then-delete makes monkeypatch remove it afterwards
    monkeypatch.setenv("MASTER_ADDR", "unset")
    monkeypatch.delenv("MASTER_ADDR")


# --- hydra/launcher=slurm: configuration and the sbatch script -----------------------------------------------------

@needs_slurm_extra
def test_slurm_launcher_takes_its_resources_from_the_trainer(hydra_cfg):
    cfg = hydra_cfg(*TWO_NODES)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # one task per GPU on each node
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["timeout_min"] == 1440 and launcher["signal_delay_s"] == 120
    assert launcher["additional_parameters"] == {"signal": "USR1@120", "requeue": True}
    assert launcher["name"] == "train-cifar10"
    assert launcher["submitit_folder"].endswith("/.submitit/%j")


@needs_slurm_extra
def test_slurm_launcher_with_a_single_device_trainer(hydra_cfg):
    launcher = OmegaConf.to_container(hydra_cfg("hydra/launcher=slurm", "trainer=gpu").hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 1, 1)


@needs_slurm_extra
@pytest.mark.parametrize("override, key", [("trainer.devices=auto", "trainer.devices"),
                                           ("trainer.num_nodes=0", "trainer.num_nodes")])
def test_slurm_launcher_rejects_counts_sbatch_cannot_take(hydra_cfg, override, key):
    cfg = hydra_cfg(*TWO_NODES, override)
    with pytest.raises(InterpolationResolutionError, match=re.escape(f"set it to a whole number, e.g. {key}=4")):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@needs_slurm_extra
def test_slurm_launcher_writes_the_sbatch_script_lightning_needs(hydra_cfg, fake_slurm_bin, monkeypatch):
    """The real launcher plugin, up to the sbatch call: two nodes of four tasks and four GPUs each, the requeue
    signal Lightning listens to, and a requeueable job."""
    from submitit.slurm.slurm import SlurmExecutor

    class Submitted(Exception):
        pass

    scripts = []

    def capture_instead_of_sbatch(executor, command):
        scripts.append(executor._make_submission_file_text(command, "uid"))
        raise Submitted

    monkeypatch.setattr(SlurmExecutor, "_submit_command", capture_instead_of_sbatch)
    cfg = hydra_cfg(*TWO_NODES, "hydra.launcher.partition=gpu")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["seed=1"]], initial_job_idx=0)
    sbatch = {line for line in scripts[0].splitlines() if line.startswith("#SBATCH")}
    expected = {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB",
                "--time=1440", "--partition=gpu", "--job-name=train-cifar10", "--signal=USR1@120", "--requeue",
                "--open-mode=append"}
    assert {f"#SBATCH {flag}" for flag in expected} <= sbatch
    # a single --signal line: USR1 replaced submitit's USR2, which Lightning would never see
    assert sum(line.startswith("#SBATCH --signal=") for line in sbatch) == 1
    srun = [line for line in scripts[0].splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in srun[0]


# --- Lightning inside a SLURM task -----------------------------------------------------------------------------------

@needs_slurm_extra
def test_lightning_takes_ranks_and_requeue_signal_from_slurm(hydra_cfg, monkeypatch):
    """Task 3 of 2 nodes x 2 tasks: Lightning's SLURMEnvironment (not its own launcher) with auto-requeue on the
    signal that configs/hydra/launcher/slurm.yaml asks SLURM to send, and the handler that saves and requeues."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from src.config import resolve_trainer_precision

    cfg = hydra_cfg(*TINY, "hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    "trainer.num_nodes=2")
    slurm_task_env(monkeypatch, ntasks=4, ntasks_per_node=2, procid=3, localid=1, nodeid=1)
    resolve_trainer_precision(cfg.trainer)  # as src.train does before building the trainer
    trainer = instantiate(cfg.trainer)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    sbatch_signal = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["additional_parameters"]["signal"]
    assert environment.requeue_signal == getattr(signal, "SIG" + sbatch_signal.split("@")[0]) == signal.SIGUSR1
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert environment.main_address == "gpu07"
    assert environment.creates_processes_externally  # srun made them: Lightning starts no others
    # what fit() installs: Lightning's save-and-requeue handler on that signal, nothing on it before
    connector = trainer._signal_connector
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)
    connector.register_signal_handlers()
    try:
        handler = signal.getsignal(signal.SIGUSR1)
        assert connector._slurm_sigusr_handler_fn in getattr(handler, "signal_handlers", [])
    finally:
        connector.teardown()


def touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_requeued_job_resumes_from_the_newest_checkpoint_of_its_run_folder(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    folders = (run_dir, run_dir / "checkpoints")
    slurm_task_env(monkeypatch, ntasks=1, ntasks_per_node=1, procid=0, localid=0, nodeid=0, restart_count=1)
    assert slurm_requeue_checkpoint(*folders) is None  # requeued before any checkpoint: nothing to resume
    touch(run_dir / "hpc_ckpt_1.ckpt", 100)
    last = touch(run_dir / "checkpoints" / "last.ckpt", 150)
    assert slurm_requeue_checkpoint(*folders) == str(last)
    hpc_9 = touch(run_dir / "hpc_ckpt_9.ckpt", 200)
    assert slurm_requeue_checkpoint(*folders) == str(hpc_9)
    hpc_10 = touch(run_dir / "hpc_ckpt_10.ckpt", 300)  # newer, though "9" sorts after "10" as text
    assert slurm_requeue_checkpoint(*folders) == str(hpc_10)
    touch(last, 400)  # a periodic checkpoint or the SIGTERM one after the last signal
    assert slurm_requeue_checkpoint(*folders) == str(last)
    # the first attempt of a job, and runs outside SLURM, keep ckpt_path as configured
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert slurm_requeue_checkpoint(*folders) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's opt-out of SLURM detection
    assert slurm_requeue_checkpoint(*folders) is None
    monkeypatch.delenv("SLURM_NTASKS")
    assert slurm_requeue_checkpoint(*folders) is None


@pytest.mark.slow
@needs_slurm_extra
def test_slurm_job_checkpoints_requeues_and_resumes_in_its_run_folder(tmp_path, fake_slurm_bin):
    """`-m hydra/launcher=slurm` through the real entry point, submitit and a stand-in SLURM: near the time limit the
    job gets the sbatch script's signal, Lightning writes hpc_ckpt_1.ckpt and runs `scontrol requeue`, SLURM stops
    and restarts the job, and the second attempt finishes the run in the same folder from the newest checkpoint."""
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "0"
    env = {
        "FAKE_SLURM_SIGNAL_WHEN": str(run_dir / "checkpoints" / "step=*.ckpt"),
        # the first attempt would train on past its time limit; the restarted one ends at step 16
        "FAKE_SLURM_ATTEMPT_ENV": json.dumps([{"MAX_STEPS": "100000"}, {"MAX_STEPS": "16"}]),
        "OMP_NUM_THREADS": "1",  # small ops on shared cores: one thread is several times faster
    }
    try:
        result = run_entry_point(
            "src.train", "-m", "hydra/launcher=slurm", *TINY, "data.batch_size=8", "callbacks.sample_grid=null",
            "trainer.max_steps='${oc.decode:${oc.env:MAX_STEPS}}'", f"hydra.sweep.dir={sweep_dir}",
            "hydra.launcher.timeout_min=5", cwd=tmp_path, env=env, timeout=300)
    finally:
        stop_controller(fake_slurm_bin)
    logs = "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("4242/4242_0_log.*")))
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]
    assert "#SBATCH --signal=USR1@120" in (fake_slurm_bin / "job.sbatch").read_text()
    assert (fake_slurm_bin / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
    # one run folder for both attempts
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["global_step"] >= 2  # written by Lightning's handler, after the periodic checkpoint of step 2
    # the second attempt picked the newer of hpc_ckpt_1.ckpt and the last.ckpt written on SIGTERM
    resumed_from = re.search(r"restart 1: resuming from (\S+)", logs).group(1)
    assert resumed_from in (str(run_dir / "hpc_ckpt_1.ckpt"), str(run_dir / "checkpoints" / "last.ckpt"))
    assert f"Restoring states from the checkpoint path at {resumed_from}" in logs
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # (a fast machine may have trained past step 16 before the requeue stopped the first attempt)
    assert last["global_step"] >= 16
    assert int(last["averaging_state"]["n_averaged"]) == last["global_step"]  # one EMA update per step throughout


def stop_controller(state: Path) -> None:
    """End the stand-in SLURM controller this test started (and its job) if a failure left it running."""
    pid_file = state / "controller.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- +sweep=optuna -------------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_optuna_extra
def test_optuna_sweep_minimises_the_returned_metric(tmp_path):
    """Two TPE trials through the real entry point: each a run folder with sampled values inside the search space,
    and optimization_results.yaml holding the trial with the lowest val/loss, as each run logged it."""
    import optuna

    sweep_dir = tmp_path / "optuna"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = run_entry_point(
        "src.train", "-m", "+sweep=optuna", "experiment=digits", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
        *TINY, "data.batch_size=16", "trainer.limit_train_batches=1", "trainer.max_steps=2",
        "callbacks.sample_grid=null", f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=lr-ema-schedule", cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    val_losses, sampled = [], []
    for trial in ("0", "1"):
        config = yaml.safe_load((sweep_dir / trial / ".hydra" / "config.yaml").read_text())
        lr, decay = config["module"]["optimizer"]["lr"], config["callbacks"]["ema"]["decay"]
        assert 1e-4 <= lr <= 2e-3 and decay in (0.99, 0.995, 0.999, 0.9999)
        assert config["diffusion"]["schedule"] in ("linear", "cosine")
        sampled.append({"module.optimizer.lr": lr, "callbacks.ema.decay": decay,
                        "diffusion/schedule": config["diffusion"]["schedule"]})
        metrics = (sweep_dir / trial / "csv" / "metrics.csv").read_text().splitlines()
        header = metrics[0].split(",")
        column = header.index("val/loss")
        values = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
        val_losses.append(values[-1])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = min(range(2), key=lambda i: val_losses[i])
    assert math.isfinite(results["best_value"])
    assert results["best_value"] == pytest.approx(val_losses[best], rel=1e-6)
    assert results["best_params"] == pytest.approx(sampled[best])
    # the study is kept in the database: it can be resumed or inspected
    study = optuna.load_study(study_name="lr-ema-schedule", storage=storage)
    assert [t.value for t in study.trials] == pytest.approx(val_losses, rel=1e-6)


@needs_slurm_extra
def test_slurm_launcher_takes_its_resources_from_src_sample(tmp_path):
    """src.sample and src.eval name devices / num_nodes at the top level: the same sbatch resources."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.helpers import CONFIG_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("sample", overrides=["ckpt_path=x", "hydra/launcher=slurm", "devices=4", "num_nodes=2"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["name"] == "sample-run"
