"""End to end: train a tiny model once through src.train, then sample it through src.sample."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from PIL import Image

from src.diffusion.samplers import DDIM, Ancestral, Sampler, space_timesteps
from src.sample import sample
from src.utils.sampling import write_samples
from tests.helpers import ROOT, TINY, compose_config, run_entry_point, write_untrained_checkpoint

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


def test_unknown_sampler_class_fails_before_the_checkpoint_is_read(tmp_path):
    with pytest.raises(InstantiationException, match="src.diffusion.samplers.Euler"):
        sample_in_process(tmp_path / "absent.ckpt", tmp_path / "out", "sampler._target_=src.diffusion.samplers.Euler")
    with pytest.raises(ValueError, match=r"is not a sampler: sampler._target_ must name a sampler class"):
        sample_in_process(tmp_path / "absent.ckpt", tmp_path / "out", "~sampler._target_")


def test_sample_config_defaults(tmp_path):
    cfg = compose_config(["ckpt_path=x"], tmp_path, config_name="sample")
    assert cfg.sampler._target_ == "src.diffusion.samplers.Ancestral" and cfg.sampler.steps is None
    assert (cfg.task_name, cfg.num_samples, cfg.batch_size, cfg.seed, cfg.weights, cfg.device) == (
        "sample", 64, 64, 0, "ema", "auto")
    ddim = compose_config(["ckpt_path=x", "sampler=ddim"], tmp_path, config_name="sample")
    assert (ddim.sampler._target_, ddim.sampler.steps, ddim.sampler.eta) == ("src.diffusion.samplers.DDIM", 50, 0.0)


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
    from src.utils.sampling import draw

    monkeypatch.delenv("DDPM_PROGRESS", raising=False)
    caplog.set_level(logging.INFO, logger="src.utils.progress")
    module = SimpleNamespace(data_shape=(2,), net=lambda x, t: 0.1 * x,
                             diffusion=GaussianDiffusion(make_beta_schedule("linear", 40)), clip_denoised=False)
    out = draw(module, Ancestral(), 5, 2, 0, torch.device("cpu"), progress=True)
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


# ------------------------------------------------------------------ a sampler added in a test file alone
class EulerODE(Sampler):
    """Euler steps of the probability-flow ODE in DDIM's coordinates, d(x / sqrt(abar)) = eps d sqrt((1 - abar) /
    abar) (Song et al. 2021, eq. 14), over the steps DDIM's stride keeps: DDIM with eta = 0, written differently."""

    def __init__(self, steps: int = 10):
        self.steps = steps

    def check(self, diffusion) -> None:
        if not 1 <= self.steps <= diffusion.num_timesteps:
            raise ValueError(f"sampler.steps={self.steps} must be in 1..{diffusion.num_timesteps}")

    def __call__(self, model, diffusion, x_T, generator=None, progress=False, clip_denoised=True):
        self.check(diffusion)
        abar = diffusion.alphas_cumprod
        order = list(reversed(space_timesteps(diffusion.num_timesteps, f"ddim{self.steps}")))
        x = x_T
        for n, i in enumerate(order):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
            eps = diffusion.predict_eps_from_x0(x, t, out["pred_x0"]) if clip_denoised else out["pred_eps"]
            a, a_prev = abar[i].item(), abar[order[n + 1]].item() if n + 1 < len(order) else 1.0
            sigma, sigma_prev = ((1 - a) / a) ** 0.5, ((1 - a_prev) / a_prev) ** 0.5
            x = (x / a**0.5 + (sigma_prev - sigma) * eps) * a_prev**0.5
        return x


@pytest.mark.parametrize("clip", [True, False])
def test_the_euler_sampler_of_this_file_is_ddim_with_eta_0(clip):
    from src.diffusion import create_diffusion
    from tests.diffusion.test_samplers import linear_model

    d = create_diffusion("linear", 100)
    model = linear_model((6, 4), 100)
    x_T = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    euler = EulerODE(steps=10)(model, d, x_T, clip_denoised=clip)
    ddim = DDIM(steps=10, eta=0.0)(model, d, x_T, clip_denoised=clip)
    assert euler.abs().max() > 0.1
    torch.testing.assert_close(euler, ddim, rtol=1e-4, atol=1e-4)


def test_a_sampler_class_outside_src_is_selected_by_target(tmp_path, one_thread):
    """`sampler._target_=<any importable class>`: nothing in src/ knows this file's sampler."""
    last = write_untrained_checkpoint(tmp_path / "run")
    state = torch.load(last, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for value in state["state_dict"].values():  # away from the near-zero output init, so the network matters
        if value.is_floating_point():
            value.add_(0.05 * torch.randn(value.shape, generator=g))
    torch.save(state, last)
    # one batch: DDIM draws a noise tensor per step whatever eta, Euler none, so later batches' x_T would differ
    quick = ["device=cpu", "precision=fp32", "batch_size=5"]
    npz = sample_in_process(last, tmp_path / "euler", f"sampler._target_={EulerODE.__module__}.EulerODE",
                            "sampler.steps=5", *quick)
    with np.load(npz) as f:
        euler = f["samples"].astype(int)
    with np.load(sample_in_process(last, tmp_path / "ddim", "sampler=ddim", "sampler.steps=5", *quick)) as f:
        ddim = f["samples"].astype(int)
    assert euler.shape == (5, 8, 8, 1) and euler.std() > 0
    assert np.abs(euler - ddim).max() <= 1  # the same samples up to rounding at a level's edge
    with pytest.raises(ValueError, match="sampler.steps=51 must be in 1..50"):
        sample_in_process(last, tmp_path / "bad", f"sampler._target_={EulerODE.__module__}.EulerODE",
                          "sampler.steps=51", *quick)


def test_no_module_in_src_imports_an_entry_point():
    pattern = re.compile(r"^\s*(from src\.(sample|eval|train) import|import src\.(sample|eval|train)\b)", re.M)
    assert [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py") if pattern.search(p.read_text())] == []
