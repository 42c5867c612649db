"""src.eval: bits/dim with per-timestep terms and the rate-distortion table, through the real entry point."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from src.eval import evaluate
from src.metrics.nll import rate_distortion, to_8bit_grid
from tests.helpers import TINY, compose_config, run_entry_point, write_untrained_checkpoint


def test_rate_distortion_follows_the_paper_definitions():
    # code term[i] is the paper's L_i; receiving x_t costs L_T + sum_{s=t}^{T-1} L_s
    terms = torch.tensor([2.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    prior = torch.tensor(0.01, dtype=torch.float64)
    mse = torch.tensor([1e-4, 4e-4, 1e-2, 0.25], dtype=torch.float64)
    rows = rate_distortion(terms, prior, mse)
    assert [r["t"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["rate_bpd"] == pytest.approx(0.01)  # holding x_T: only the prior was sent
    assert rows[1]["rate_bpd"] == pytest.approx(0.01 + 0.25 + 0.125)
    assert rows[0]["rate_bpd"] == pytest.approx(0.01 + 0.5 + 0.25 + 0.125)  # paper: 1.78 bits/dim at t=1
    assert rows[0]["rate_bpd"] + terms[0].item() == pytest.approx(terms.sum().item() + 0.01)  # + L_0 = total
    assert rows[2]["distortion_rmse"] == pytest.approx(127.5 * 0.1)


def test_8bit_grid():
    x = torch.tensor([-1.0, -0.875, 0.0, 0.999, 1.0, 1.3])
    v = (to_8bit_grid(x) + 1) * 127.5
    assert torch.allclose(v, v.round(), atol=1e-4) and v.min() == 0 and v.max() == 255


def evaluate_in_process(ckpt_path, out, *overrides: str) -> dict:
    return evaluate(compose_config([f"ckpt_path={ckpt_path}", "progress=false", "device=cpu", *overrides], out,
                                   config_name="eval"))


def test_nll_of_a_run_folder(tmp_path, one_thread):
    """``ckpt_path=<run folder>`` (or its checkpoints/) means its checkpoints/last.ckpt, as in src.train."""
    last = write_untrained_checkpoint(tmp_path / "run")
    nll = ["metric=nll", "batch_size=2", "num_batches=1"]
    by_file = evaluate_in_process(last, tmp_path / "file", *nll)
    for name, path in (("run", tmp_path / "run"), ("checkpoints", tmp_path / "run" / "checkpoints")):
        summary = evaluate_in_process(path, tmp_path / name, *nll)
        assert summary["nll_bpd"] == by_file["nll_bpd"] and summary["num_images"] == 2
        assert summary["ckpt_path"] == str(last)  # metrics.json records the file that was read
    with pytest.raises(FileNotFoundError, match="ckpt_path=.* is a folder without checkpoints/last.ckpt"):
        evaluate_in_process(tmp_path, tmp_path / "out", *nll)


@pytest.mark.parametrize(("override", "message"), [
    ("num_batches=0", r"num_batches must be null or an integer >= 1, got 0 \(null: the whole split\)"),
    ("num_batches=-2", "num_batches must be null or an integer >= 1, got -2"),
    ("batch_size=0", "batch_size must be an integer >= 1, got 0"),
    ("num_samples=-1", "num_samples must be an integer >= 1, got -1"),
    ("sample_batch_size=0.5", "sample_batch_size must be an integer >= 1, got 0.5"),
])
def test_counts_are_checked_before_the_checkpoint_is_read(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        evaluate_in_process(tmp_path / "absent.ckpt", tmp_path / "out", override)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_ckpt")
    run_dir = tmp / "run"
    result = run_entry_point("src.train", *TINY, "callbacks.sample_grid=null", f"hydra.run.dir={run_dir}",
                             cwd=tmp, env={"DDPM_ROOT": str(tmp), "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_nll_through_the_entry_point(digits_checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = run_entry_point("src.eval", f"ckpt_path={digits_checkpoint}", "metric=nll", "num_batches=1",
                             "batch_size=16", "progress=false", "logger=csv", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_images"] == 16 and summary["split"] == "test"
    assert math.isfinite(summary["nll_bpd"]) and summary["nll_bpd"] > 0
    assert summary["nll_bpd"] == pytest.approx(
        summary["prior_bpd"] + summary["decoder_bpd"] + summary["kl_terms_bpd"], rel=1e-6)
    with open(out / "nll_terms.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50  # T = 50 in the tiny run
    assert float(rows[0]["term_bpd"]) == pytest.approx(summary["decoder_bpd"], rel=1e-6)
    assert (out / "nll_terms.png").is_file()
    logged = (out / "csv" / "metrics.csv").read_text()
    assert "eval/nll_bpd" in logged and "eval/decoder_bpd" in logged


@pytest.mark.slow
def test_bad_metric_and_bad_checkpoint_fail_clearly(digits_checkpoint, tmp_path):
    result = run_entry_point("src.eval", f"ckpt_path={digits_checkpoint}", "metric=fidd",
                             f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert result.returncode != 0 and "valid metrics are" in result.stderr
    result = run_entry_point("src.eval", f"ckpt_path={tmp_path / 'none.ckpt'}", f"hydra.run.dir={tmp_path / 'b'}",
                             cwd=tmp_path)
    assert result.returncode != 0 and "no checkpoint at" in result.stderr


@pytest.mark.slow
def test_digits_classifier_fd_through_the_entry_point(digits_checkpoint, tmp_path):
    out = tmp_path / "fd"
    result = run_entry_point("src.eval", f"ckpt_path={digits_checkpoint}", "metric=fd_digits_classifier",
                             "num_samples=24", "sample_batch_size=12", "sampler=ddim", "sampler.steps=5",
                             "progress=false", f"hydra.run.dir={out}", cwd=tmp_path,
                             env={"DDPM_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_samples"] == 24 and summary["sampler"]["_target_"] == "src.diffusion.samplers.DDIM"
    # a 4-step-trained model is far from the data; real digits at the same N are much closer
    assert summary["fd_digits_classifier"] > summary["fd_digits_classifier_real_floor"] > 0
    assert (tmp_path / "cache" / "digits_classifier_v1.pt").is_file()


@pytest.mark.slow
def test_nfe_curve_writes_a_row_per_point_and_seed_and_a_plot(digits_checkpoint, tmp_path):
    out = tmp_path / "nfe"
    summary = evaluate_in_process(digits_checkpoint, out, "metric=nfe_curve", "nfe_curve.samplers=[ddim,dpmpp_2m,heun]",
                                  "nfe_curve.nfe=[3,6]", "nfe_curve.seeds=[0,1]", "num_samples=12",
                                  "sample_batch_size=12", "logger=csv")
    with open(out / "nfe_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (3 * 2 + 1) * 2  # every sampler at every budget, then 50-step DDPM; two seeds each
    nfes = {(r["sampler"], int(r["nfe"])) for r in rows}
    assert nfes == {("ddim", 3), ("ddim", 6), ("dpmpp_2m", 3), ("dpmpp_2m", 6), ("heun", 3), ("heun", 5),
                    ("ddpm", 50)}  # heun spends 2 steps - 1: 5 within a budget of 6
    assert all(float(r["value"]) > float(r["floor"]) > 0 for r in rows)
    assert summary["sample_metric"] == "fd_digits_classifier" and summary["seeds"] == [0, 1]
    mean = sum(float(r["value"]) for r in rows if r["sampler"] == "heun" and r["nfe"] == "5") / 2
    assert summary["heun@5"] == pytest.approx(mean)
    assert (out / "nfe_curve.png").stat().st_size > 1000
    logged = (out / "csv" / "metrics.csv").read_text()
    assert "eval/dpmpp_2m@6" in logged and "eval/real_floor" in logged


def test_nfe_curve_names_an_unknown_sampler(digits_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="'dpm_fast' is not a sampler config; known: .*dpmpp_2m"):
        evaluate_in_process(digits_checkpoint, tmp_path / "x", "metric=nfe_curve", "nfe_curve.samplers=[dpm_fast]")


@pytest.mark.slow
def test_swd_on_a_toy_model(tmp_path):
    run_dir = tmp_path / "toy"
    result = run_entry_point("src.train", *TINY, "experiment=toy2d", "callbacks.sample_grid=null",
                             f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "swd"
    result = run_entry_point("src.eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "metric=swd",
                             "num_samples=200", "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["swd"] > summary["swd_real_floor"] > 0
    # the wrong metric for the data is refused with a reason
    result = run_entry_point("src.eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                             "metric=fd_digits_classifier", "num_samples=4", f"hydra.run.dir={tmp_path / 'x'}",
                             cwd=tmp_path)
    assert result.returncode != 0 and "needs a model of the 8x8 digits data" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("figure", ["progressive", "interpolation"])
def test_paper_figures_through_the_entry_point(digits_checkpoint, tmp_path, figure):
    import numpy as np
    from PIL import Image

    out = tmp_path / figure
    result = run_entry_point("src.eval", f"ckpt_path={digits_checkpoint}", f"metric={figure}", "figure.rows=3",
                             "figure.columns=5", "batch_size=8", "logger=tensorboard", f"hydra.run.dir={out}",
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    frames = np.load(out / f"{figure}.npz")["frames"]
    # progressive (T=50, every 10): paper t = 50, 41, 31, 21, 11, 1; interpolation: 5 lambdas + both ends
    assert frames.shape == ((6 if figure == "progressive" else 7), 3, 1, 8, 8)
    # the picture: the grid of 8x8 tiles (padding 1) enlarged to 32 px tiles, under a strip of column labels
    png = np.array(Image.open(out / f"{figure}.png").convert("RGB"))
    grid_h, grid_w = 4 * (1 + 3 * 9), 4 * (1 + frames.shape[0] * 9)
    assert png.shape[1] == grid_w and png.shape[0] > grid_h
    assert png[:png.shape[0] - grid_h].min() < 128  # dark label text on the white strip
    summary = json.loads((out / "metrics.json").read_text())
    if figure == "interpolation":
        assert summary["interp_t"] == 25 and summary["lambdas"][0] == 0.0
    # the figure also went to the active logger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert f"eval/{figure}" in events.Tags()["images"]


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    from src.metrics.fidelity import make_random_inception_weights

    return make_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.mark.slow
def test_fid_through_the_entry_point(digits_checkpoint, random_inception, tmp_path):
    """The whole FID pipeline with a random-weights Inception: the number is meaningless, the plumbing is real."""
    out = tmp_path / "fid"
    result = run_entry_point("src.eval", f"ckpt_path={digits_checkpoint}", "metric=fid", "num_samples=8",
                             "sampler=ddim", "sampler.steps=3", "fid.metrics=[fid]", "fid.feature=64",
                             "fid.reference=test", "fid.max_reference=16", f"fid.weights_path={random_inception}",
                             f"fid.cache_dir={tmp_path / 'cache'}", "progress=false", f"hydra.run.dir={out}",
                             cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(summary["fid"]) and summary["fid"] > 0 and summary["num_samples"] == 8
    assert list((tmp_path / "cache").rglob("*"))  # reference statistics cached
