"""End to end: train a tiny model once through src.train, then sample it through src.sample."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from PIL import Image

from src.sample import sample, write_samples
from tests.conftest import TINY, compose_config, run_entry_point, write_untrained_checkpoint

# One intra-op thread everywhere: on a small shared CPU, 2+ OpenMP threads per process spin against other
# work and make the tiny U-Net several times slower; it also keeps CPU results identical across processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A T=50 digits checkpoint from four training steps of the real entry point (trained once per module)."""
    root = tmp_path_factory.mktemp("train")
    run_dir = root / "run"
    result = run_entry_point("src.train", *TINY, "callbacks.sample_grid=null", f"hydra.run.dir={run_dir}",
                             cwd=root, env={"DDPM_ROOT": str(root), **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-4000:]
    path = run_dir / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def sample_in_process(ckpt: Path, out: Path, *overrides: str) -> Path:
    cfg = compose_config([f"ckpt_path={ckpt}", "num_samples=5", "batch_size=2", "progress=false", *overrides],
                         out, config_name="sample")
    return sample(cfg)


def check_image_run(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as f:
        arr = f["samples"]
    assert arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8
    pngs = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    # each PNG holds the same pixels as its npz row
    assert np.array_equal(np.array(Image.open(pngs[3])), arr[3, ..., 0])
    grid = np.array(Image.open(out / "grid.png"))
    assert grid.shape[:2] == (4 * 19, 4 * 28)  # 2 rows of 3 8x8 tiles (padding 1), enlarged to 32 px tiles
    assert (out / ".hydra" / "config.yaml").is_file()
    return arr


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [[], ["sampler=ddim", "sampler.steps=10"]], ids=["ddpm", "ddim10"])
def test_sample_entry_point_writes_pngs_npz_and_grid(ckpt, tmp_path, sampler, one_thread):
    out = tmp_path / "samples_run"
    result = run_entry_point("src.sample", f"ckpt_path={ckpt}", "num_samples=5", "batch_size=2", *sampler,
                             f"hydra.run.dir={out}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    arr = check_image_run(out)
    assert arr.std() > 0  # not a constant image
    if sampler:
        # the same seed (and batch size) gives the same samples, here from a second, in-process run; only
        # for the 10-step sampler, to keep the suite fast on a CPU
        again = sample_in_process(ckpt, tmp_path / "again", *sampler)
        with np.load(again) as f:
            assert np.array_equal(f["samples"], arr)
        other = sample_in_process(ckpt, tmp_path / "other", "seed=1", *sampler)
        with np.load(other) as f:
            assert not np.array_equal(f["samples"], arr)


@pytest.mark.slow
def test_bad_checkpoint_path_fails_clearly(tmp_path):
    missing = tmp_path / "nope.ckpt"
    result = run_entry_point("src.sample", f"ckpt_path={missing}", "num_samples=2",
                             f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode != 0
    assert f"no checkpoint at {missing}" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), [
    (["sampler.name=euler"], "unknown sampler 'euler'"),
    (["sampler.steps=51"], r"sampler.steps=51 does not fit this checkpoint \(T=50\)"),
    (["sampler=ddim", "sampler.steps=0"], "out of range"),
    (["sampler.steps=1"], "needs at least 2"),
    (["sampler=ddim", "sampler.eta=-1"], "eta must be >= 0"),
    (["num_samples=0"], "num_samples must be an integer >= 1, got 0"),
])
def test_bad_sampler_settings_fail_clearly(ckpt, tmp_path, overrides, message, one_thread):
    with pytest.raises(ValueError, match=message):
        sample_in_process(ckpt, tmp_path / "out", *overrides)


def test_unknown_sampler_group_is_a_config_error(tmp_path):
    with pytest.raises(MissingConfigException, match="sampler"):
        compose_config(["ckpt_path=x", "sampler=euler"], tmp_path, config_name="sample")


def test_sample_config_defaults(tmp_path):
    cfg = compose_config(["ckpt_path=x"], tmp_path, config_name="sample")
    assert cfg.sampler.name == "ddpm" and cfg.sampler.steps is None
    assert (cfg.task_name, cfg.num_samples, cfg.batch_size, cfg.seed, cfg.weights, cfg.device) == (
        "sample", 64, 64, 0, "ema", "auto")
    ddim = compose_config(["ckpt_path=x", "sampler=ddim"], tmp_path, config_name="sample")
    assert (ddim.sampler.name, ddim.sampler.steps, ddim.sampler.eta) == ("ddim", 50, 0.0)


def test_points_are_written_as_float_npz_and_a_scatter_plot(tmp_path):
    points = torch.randn(300, 2)
    toy = {"_target_": "src.data.Toy2DDataModule", "dataset": "two_moons", "num_samples": 100}
    for run_config, name in ((None, "plain"), ({"data": toy}, "with_reference")):
        module = SimpleNamespace(run_config=run_config)
        npz = write_samples(points, tmp_path / name, module)
        with np.load(npz) as f:
            assert f["samples"].dtype == np.float32 and np.array_equal(f["samples"], points.numpy())
        assert (tmp_path / name / "scatter.png").is_file()
        assert not (tmp_path / name / "samples").exists()


def test_compile_at_load_follows_the_run_unless_overridden(ckpt, tmp_path, monkeypatch, one_thread):
    """A run trained with module.compile=true loads compiled; ``compile=false`` (sample.yaml / eval.yaml
    ``compile``) loads it eager, and ``compile=true`` compiles a run that was trained eager."""
    from torch._dynamo.utils import counters

    import src.models.ddpm_module as ddpm_module
    from src.utils.checkpoint import load_module

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["ddpm_config"]["module"]["compile"] = True
    state["ddpm_config"]["module"]["compile_options"] = {"backend": "aot_eager"}
    compiled_run = tmp_path / "compiled.ckpt"
    torch.save(state, compiled_run)

    def is_compiled(module) -> bool:
        return module.net._compiled_call_impl is not None

    assert is_compiled(load_module(compiled_run))
    assert not is_compiled(load_module(compiled_run, compile=False))
    assert not is_compiled(load_module(ckpt))
    compiled = load_module(ckpt, compile=True, compile_options={"backend": "aot_eager"})
    assert is_compiled(compiled)
    frames = counters["frames"]["ok"]
    with torch.no_grad():
        compiled.net(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    assert counters["frames"]["ok"] > frames  # compiled with the given (aot_eager) backend
    # the entry point passes its `compile` through: no compile is attempted with compile=false

    def refuse(*args, **kwargs):
        raise AssertionError("compiled although compile=false")

    monkeypatch.setattr(ddpm_module, "compile_backbone", refuse)
    out = tmp_path / "s"
    sample_in_process(compiled_run, out, "compile=false")
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (5, 8, 8, 1)


def test_draw_reports_samples_not_every_step_in_a_log_file(capfd, caplog, monkeypatch):
    from src.diffusion import GaussianDiffusion, make_beta_schedule
    from src.sample import draw, make_sampler

    monkeypatch.delenv("DDPM_PROGRESS", raising=False)
    caplog.set_level(logging.INFO, logger="src.utils.progress")
    module = SimpleNamespace(data_shape=(2,), net=lambda x, t: 0.1 * x,
                             diffusion=GaussianDiffusion(make_beta_schedule("linear", 40)), clip_denoised=False)
    sampler = make_sampler(OmegaConf.create({"name": "ddpm", "steps": None}), 40)
    out = draw(module, sampler, 5, 2, torch.Generator().manual_seed(0), torch.device("cpu"), progress=True)
    assert out.shape == (5, 2)
    captured = capfd.readouterr()
    assert "\r" not in captured.out + captured.err and "\x1b[" not in captured.out + captured.err
    lines = [r.getMessage() for r in caplog.records if r.name == "src.utils.progress"]
    # the per-step progress of each batch is silent under the samples one
    assert lines and all(line.startswith("samples: ") for line in lines)
    assert lines[-1].startswith("samples: 5/5 done in")


def test_run_folder_or_its_checkpoints_folder_as_ckpt_path(tmp_path, one_thread):
    """``ckpt_path=<run folder>`` (or ``<run folder>/checkpoints``) means its checkpoints/last.ckpt, as in src.train."""
    last = write_untrained_checkpoint(tmp_path / "run")
    quick = ["sampler=ddim", "sampler.steps=2", "device=cpu", "num_samples=2"]
    samples = {}
    for name, path in (("file", last), ("run", tmp_path / "run"), ("checkpoints", tmp_path / "run" / "checkpoints")):
        with np.load(sample_in_process(path, tmp_path / name, *quick)) as f:
            samples[name] = f["samples"]
    assert np.array_equal(samples["run"], samples["file"]) and np.array_equal(samples["checkpoints"], samples["file"])
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "checkpoints" / "epoch=0-step=2.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*empty is a folder without checkpoints/last.ckpt.*"
                                                r"holds epoch=0-step=2.ckpt"):
        sample_in_process(tmp_path / "empty", tmp_path / "out", *quick)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*absent.ckpt: no checkpoint at"):
        sample_in_process(tmp_path / "absent.ckpt", tmp_path / "out", *quick)


@pytest.mark.parametrize(("override", "message"), [
    ("num_samples=0", "num_samples must be an integer >= 1, got 0"),
    ("batch_size=2.5", "batch_size must be an integer >= 1, got 2.5"),
])
def test_counts_are_checked_before_the_checkpoint_is_read(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        sample_in_process(tmp_path / "absent.ckpt", tmp_path / "out", override)
