"""End to end: train a few steps through the real entry point for every experiment, and a multirun."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from src.utils.checkpoint import load_module
from tests.helpers import TINY, run_entry_point, write_fake_cifar10


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_complete_run(run_dir: Path, result) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(run_dir)
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert list((run_dir / "samples").glob("final-step=*.png"))
    # checkpoints load with weights_only=True and carry the config, the EMA and the raw weights
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {"state_dict", "current_model_state", "ddpm_config"} <= set(ckpt)
    assert ckpt["global_step"] == 4
    return ckpt


# What the libraries print that is not the user's business, and what a log file must not hold.
NOISE = ["isinstance(treespec, LeafSpec)", "litlogger", "pin_memory", "not resumable", "\x1b[A", "\r"]


def assert_no_library_noise(result) -> None:
    """A run's output (a pipe, as in a log file) has none of ``NOISE``."""
    output = result.stdout + result.stderr
    found = [noise for noise in NOISE if noise in output]
    assert not found, f"{found} in the output of a run: {output[-2000:]}"


@pytest.mark.slow
def test_default_digits_run(tmp_path):
    run_dir = tmp_path / "digits"
    result = run_entry_point("src.train", *TINY, f"hydra.run.dir={run_dir}", "test=true", cwd=tmp_path)
    ckpt = assert_complete_run(run_dir, result)
    assert_no_library_noise(result)
    assert ckpt["ddpm_config"]["data"]["_target_"].endswith("DigitsDataModule")
    assert ckpt["ddpm_config"]["model"]["in_channels"] == 1  # filled from the data
    assert ckpt["ddpm_config"]["trainer"]["precision"] == "32-true"  # precision=auto resolved, on a CPU
    assert "test/loss" in (run_dir / "csv" / "metrics.csv").read_text()
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["diffusion"]["variance"] == "fixed_large"
    # EMA and raw weights differ after training, and both are finite
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("net."))
    # the checkpoint alone rebuilds the model, with either set of weights
    module = load_module(run_dir / "checkpoints" / "last.ckpt")
    assert torch.equal(module.net.conv_in.weight, ema["net.conv_in.weight"])
    assert torch.equal(load_module(run_dir / "checkpoints" / "last.ckpt", weights="raw").net.conv_in.weight,
                       raw["net.conv_in.weight"])
    x = module.sample(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1


@pytest.mark.slow
def test_toy2d_run(tmp_path):
    run_dir = tmp_path / "toy"
    result = run_entry_point("src.train", *TINY, "experiment=toy2d", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    ckpt = assert_complete_run(run_dir, result)
    assert ckpt["ddpm_config"]["model"]["data_dim"] == 2


@pytest.mark.slow
def test_cifar10_paper_run_on_a_tiny_copy(tmp_path):
    """The paper's experiment (35.7M U-Net, W&B logger offline) on a generated cifar-10-batches-py."""
    from src.metrics.fidelity import make_random_inception_weights

    write_fake_cifar10(tmp_path / "cifar")
    inception = make_random_inception_weights(tmp_path / "random-inception.pth")
    run_dir = tmp_path / "cifar_run"
    result = run_entry_point(
        "src.train", "experiment=cifar10", *TINY, "logger=wandb", "logger.wandb.offline=true",
        f"callbacks.fid.weights_path={inception}", "callbacks.fid.feature=64",
        f"data.data_dir={tmp_path / 'cifar'}", "data.download=false", "data.verify_checksums=false",
        "data.batch_size=4", "callbacks.sample_grid.num_samples=2",
        f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert_no_library_noise(result)  # pin_memory: true in the config, unused on a CPU without a word
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    n_params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    assert n_params == 35_746_307


@pytest.mark.slow
def test_missing_cifar10_says_what_to_do(tmp_path):
    result = run_entry_point("src.train", "experiment=cifar10", *TINY, "logger=csv", "data.download=false",
                             f"data.data_dir={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "cifar-10-batches-py" in result.stderr and "data.data_dir" in result.stderr


@pytest.mark.slow
def test_multirun_over_reverse_variances(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_entry_point("src.train", "-m", "diffusion/variance=fixed_large,fixed_small", *TINY,
                             "logger=wandb", "callbacks.sample_grid=null", f"hydra.sweep.dir={sweep_dir}",
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    variances = []
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        config = yaml.safe_load((sweep_dir / job / ".hydra" / "config.yaml").read_text())
        variances.append(config["diffusion"]["variance"])
        ckpt = torch.load(sweep_dir / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        # both runs land in one W&B group named after the sweep
        assert ckpt["ddpm_config"]["logger"]["wandb"]["group"] == "digits-sweep-sweep"
        assert list((sweep_dir / job / "wandb").glob("offline-run-*"))
    assert variances == ["fixed_large", "fixed_small"]


def test_foreign_files_are_rejected_clearly(tmp_path):
    garbage = tmp_path / "notes.ckpt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        load_module(garbage)
    other = tmp_path / "other.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="not written by `python -m src.train`"):
        load_module(other)
    with pytest.raises(FileNotFoundError):
        load_module(tmp_path / "missing.ckpt")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """trainer=ddp with two CPU processes (gloo) through the real entry point."""
    from src.metrics.fidelity import make_random_inception_weights

    inception = make_random_inception_weights(tmp_path / "random-inception.pth")
    run_dir = tmp_path / "ddp"
    # two steps make an epoch, so validation runs and the FID callback samples on both ranks
    result = run_entry_point("src.train", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                             "trainer.limit_train_batches=2", "callbacks=[default,fid]",
                             "callbacks.fid.every_n_epochs=1", "callbacks.fid.num_samples=4",
                             "callbacks.fid.batch_size=2", "callbacks.fid.feature=64",
                             f"callbacks.fid.weights_path={inception}", "callbacks.sample_grid.num_samples=2",
                             f"hydra.run.dir={run_dir}", cwd=tmp_path)
    ckpt = assert_complete_run(run_dir, result)
    fids = [float(r["val/fid"]) for r in read_metrics(run_dir) if r.get("val/fid")]
    assert fids and all(math.isfinite(f) and f > 0 for f in fids)
    assert ckpt["ddpm_config"]["trainer"]["strategy"] == "ddp"
    # data.batch_size is per process: the recorded global batch is twice it
    assert ckpt["ddpm_config"]["world_size"] == 2
    assert ckpt["ddpm_config"]["global_batch_size"] == 2 * ckpt["ddpm_config"]["data"]["batch_size"]
    # rank zero alone writes the run folder: one final grid, one metrics file
    assert len(list((run_dir / "samples").glob("final-step=*.png"))) == 1


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_steps_and_ema(tmp_path):
    """`ckpt_path=last` in the same run folder picks up optimizer, schedule, EMA and the step count."""
    run_dir = tmp_path / "resume"
    common = [*TINY, "callbacks.sample_grid=null", f"hydra.run.dir={run_dir}"]
    first = run_entry_point("src.train", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    first_rows = read_metrics(run_dir)
    before = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    second = run_entry_point("src.train", *common, "ckpt_path=last", "trainer.max_steps=8", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert before["global_step"] == 4 and after["global_step"] == 8
    # the EMA kept averaging across the restart: 8 updates in all, not 4
    assert int(before["averaging_state"]["n_averaged"]) == 4 and int(after["averaging_state"]["n_averaged"]) == 8
    # the warm-up schedule continued rather than restarting
    assert after["lr_schedulers"][0]["last_epoch"] == 8
    # metrics.csv keeps the first attempt's step rows and appends the second's; the first attempt's aggregate of
    # the epoch it stopped in is dropped (the resumed run writes that epoch's when it ends)
    rows = read_metrics(run_dir)
    kept = [r for r in first_rows if not r.get("train/loss_epoch")]
    assert rows[:len(kept)] == kept and len(rows) > len(first_rows)
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == sorted(set(steps)) and min(steps) < 4 <= max(steps)


@pytest.mark.slow
def test_named_sweep_runs_the_schedule_by_variance_grid(tmp_path):
    sweep_dir = tmp_path / "grid"
    result = run_entry_point("src.train", "+sweep=schedule_x_variance", *TINY, "callbacks.sample_grid=null",
                             "trainer.max_steps=2", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    combos = set()
    for job in range(4):
        config = yaml.safe_load((sweep_dir / str(job) / ".hydra" / "config.yaml").read_text())
        combos.add((config["diffusion"]["schedule"], config["diffusion"]["variance"]))
        assert (sweep_dir / str(job) / "checkpoints" / "last.ckpt").is_file()
    assert combos == {(s, v) for s in ("linear", "cosine") for v in ("fixed_large", "fixed_small")}


@pytest.mark.parametrize(
    ("precision", "accelerator", "cuda", "bf16", "expected"),
    [
        ("auto", "cpu", True, True, "32-true"),
        ("auto", "auto", False, False, "32-true"),
        ("auto", "auto", True, True, "bf16-mixed"),
        ("auto", "gpu", True, True, "bf16-mixed"),
        ("auto", "cuda", True, False, "32-true"),  # a GPU without bf16 (pre-Ampere)
        ("16-mixed", "auto", True, True, "16-mixed"),  # explicit values are kept
        ("32-true", "gpu", True, True, "32-true"),
    ],
)
def test_trainer_precision_auto(monkeypatch, precision, accelerator, cuda, bf16, expected):
    from omegaconf import OmegaConf

    from src.config import resolve_trainer_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg = OmegaConf.create({"precision": precision, "accelerator": accelerator})
    resolve_trainer_precision(cfg)
    assert cfg.precision == expected
