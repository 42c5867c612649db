"""Sampling at scale: per-sample seeds (sample k is the same in any batch, process or order), shards written as they
complete, a stopped run continued, several processes, the merged npz."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from src.diffusion.noise import SampleNoise, block_size, sample_seed
from src.diffusion.samplers import DDIM, Ancestral, DPMSolverPP2M, DPMSolverPP2MSDE, UniPC
from src.utils import shards
from src.utils.sampling import FixedBatchNet, draw
from tests.helpers import ROOT, run_entry_point, write_untrained_checkpoint

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ per-sample noise
def test_sample_seeds_are_distinct_within_a_run_and_differ_between_seeds():
    seeds = {sample_seed(0, k) for k in range(200_000)}
    assert len(seeds) == 200_000  # a bijection of the index: no two samples share a stream
    assert all(0 <= s < 2**32 for s in list(seeds)[:1000])  # torch's CPU generator keeps 32 bits
    assert len({sample_seed(s, 0) for s in range(1000)}) == 1000
    assert sample_seed(2**40 + 1, 5) != sample_seed(1, 5)  # the high bits of a seed count too
    with pytest.raises(ValueError, match="outside"):
        sample_seed(0, -1)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8), (3, 32, 32)])
def test_a_samples_noise_does_not_depend_on_its_batch(shape):
    """200 draws (several block refills) of samples 0..6 at once, in two groups, and one at a time: equal bits."""
    draws = 200
    together = SampleNoise(7, range(7))
    groups = [SampleNoise(7, range(0, 3)), SampleNoise(7, range(3, 7))]
    alone = [SampleNoise(7, [k]) for k in range(7)]
    for _ in range(draws):
        a = together.randn((7, *shape))
        b = torch.cat([g.randn((len(g), *shape)) for g in groups])
        c = torch.cat([g.randn((1, *shape)) for g in alone])
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a[0], a[1])
    assert block_size(64) == 64 and block_size(3 * 32 * 32) == 1
    with pytest.raises(ValueError, match="number of samples"):
        together.randn((6, *shape))


def tiny_module(seed: int = 0):
    import functools

    from src.diffusion import create_diffusion
    from src.models.ddpm_module import DDPMModule
    from src.models.unet import UNet

    torch.manual_seed(seed)
    net = UNet(in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
               num_groups=8, dropout=0.0)
    for p in net.parameters():  # away from the near-zero output init, so the network matters
        p.data.add_(0.05 * torch.randn_like(p))
    return DDPMModule(net, create_diffusion("linear", 50), functools.partial(torch.optim.Adam),
                      data_shape=(1, 8, 8)).eval()


def test_the_network_at_a_fixed_row_count_gives_a_row_the_same_bits_in_any_company(one_thread):
    """What FixedBatchNet relies on: at a fixed number of rows a row's output does not depend on the other rows or
    its position; at another number of rows it may (kernels block by the row count)."""
    net = tiny_module().net
    x, t = torch.randn(12, 1, 8, 8), torch.randint(0, 50, (12,))
    with torch.inference_mode():
        ref = net(x[:4], t[:4])[0]
        for order in ([0, 5, 6, 7], [8, 9, 0, 11], [3, 2, 1, 0]):
            out = net(x[order], t[order])
            assert torch.equal(out[order.index(0)], ref)
        fixed = FixedBatchNet(net, 4)
        assert torch.equal(fixed(x[:1], t[:1])[0], ref)  # padded to 4 rows
        assert torch.equal(fixed(x[:9], t[:9])[:4], net(x[:4], t[:4]))  # cut into 4 + 4 + 1 (padded)


SAMPLERS = {"ddpm": Ancestral(), "ddim_eta1": DDIM(steps=10, eta=1.0), "dpmpp_2m": DPMSolverPP2M(steps=8),
            "dpmpp_2m_sde": DPMSolverPP2MSDE(steps=8), "unipc": UniPC(steps=8)}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_gives_sample_k_the_same_bits_for_any_batch_size(name, one_thread):
    module, sampler, cpu = tiny_module(), SAMPLERS[name], torch.device("cpu")
    whole = draw(module, sampler, 7, 7, 11, cpu, network_batch=4)
    for batch_size in (1, 3):
        assert torch.equal(draw(module, sampler, 7, batch_size, 11, cpu, network_batch=4), whole)
    # samples 3.. alone (a later shard, another process) are the same as within the whole run
    assert torch.equal(draw(module, sampler, 4, 2, 11, cpu, network_batch=4, start=3), whole[3:])
    # without a fixed network batch: the same samples to float round-off
    loose = draw(module, sampler, 7, 3, 11, cpu)
    assert (loose - whole).abs().max() < 1e-4
    assert not torch.equal(draw(module, sampler, 7, 7, 12, cpu, network_batch=4), whole)  # another seed


class TurnsNaN(torch.nn.Module):
    """A network that returns NaN from its ``after``-th call on (a diverged model, or guidance run away)."""

    def __init__(self, net: torch.nn.Module, after: int) -> None:
        super().__init__()
        self.net, self.after, self.calls = net, after, 0
        self.num_classes = 10  # takes labels (and ignores them), so guidance can be asked for

    def forward(self, x, t, y=None):
        self.calls += 1
        out = self.net(x, t)
        return out * float("nan") if self.calls > self.after else out


def test_a_non_finite_sample_stops_the_run_and_keeps_the_shards_before_it(tmp_path, one_thread):
    from src.utils.distributed import start_processes
    from src.utils.sample_run import SampleRun, sample_to_folder

    module = tiny_module()
    sampler = DDIM(steps=3)
    module.net = TurnsNaN(module.net, after=2 * 3)  # batches 0 and 1 (3 steps each) are fine, batch 2 is NaN
    run = SampleRun(num_samples=6, batch_size=2, shard_size=2, progress=False)
    ckpt_path = tmp_path / "model.ckpt"
    ckpt_path.write_bytes(b"weights")  # the manifest records its digest
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"2 of 2 samples from index 4 are not finite.*diverged"):
        sample_to_folder(run, start_processes(1, "cpu"), module, sampler, None, ckpt_path, out)
    ranges = shards.shard_ranges(6, 2)
    assert shards.complete_shards(out, ranges) == {ranges[0], ranges[1]}  # written before it: kept
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"00000{i}.png" for i in range(4)]
    with pytest.raises(FloatingPointError, match="guidance_scale=3.0 or set the sampler's threshold"):
        module.net.calls = 100
        draw(module, sampler, 2, 2, 0, torch.device("cpu"), labels=torch.tensor([1, 2]), guidance_scale=3.0)


# ------------------------------------------------------------------------------------------ shards
def test_merged_npz_streams_shards_in_index_order_as_zip64(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 23).astype(np.int64)
    ranges = shards.shard_ranges(23, 5)
    for r in reversed(ranges):  # written in any order
        shards.write_shard(tmp_path, r, data[r.start:r.stop], labels[r.start:r.stop])
    assert set(shards.shard_files(tmp_path)) == set(ranges)
    merged = shards.merge_shards(tmp_path, ranges)
    with np.load(merged) as f:
        assert np.array_equal(f["samples"], data) and np.array_equal(f["labels"], labels)
    with zipfile.ZipFile(merged) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())  # memory-mappable members
    assert not shards.shard_files(tmp_path)  # merged: the shards are gone
    with pytest.raises(ValueError, match="do not tile"):
        shards.merge_shards(tmp_path, [range(0, 5), range(10, 15)])


def test_an_unreadable_shard_is_set_aside_and_drawn_again(tmp_path):
    ranges = shards.shard_ranges(6, 3)
    shards.write_shard(tmp_path, ranges[0], np.zeros((3, 2), np.float32))
    shards.shard_path(tmp_path, ranges[1]).write_bytes(b"not a zip")
    assert shards.complete_shards(tmp_path, ranges) == {ranges[0]}
    assert shards.shard_path(tmp_path, ranges[1]).with_suffix(".bad").is_file()


# ------------------------------------------------------------------------------------------ the entry point
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained T=50 digits model with its weights pushed away from the near-zero output init."""
    path = write_untrained_checkpoint(tmp_path_factory.mktemp("run"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for value in state["state_dict"].values():
        if value.is_floating_point():
            value.add_(0.05 * torch.randn(value.shape, generator=generator))
    torch.save(state, path)
    return path


def run_sample(ckpt: Path, out: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run_entry_point("src.sample", f"ckpt_path={ckpt}", f"out_dir={out}", "progress=false", *overrides,
                             cwd=out.parent, env=ONE_THREAD)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def samples_of(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as f:
        return f["samples"]


COMMON = ("num_samples=20", "shard_size=6", "sampler=ddpm")


@pytest.mark.slow
def test_batch_size_and_process_count_leave_every_sample_bit_for_bit_the_same(ckpt, tmp_path):
    """The same 20 samples with batch_size=1, batch_size=7, and batch_size=7 on 2 processes (gloo)."""
    fixed = (*COMMON, "network_batch=4")
    run_sample(ckpt, tmp_path / "b1", *fixed, "batch_size=1")
    run_sample(ckpt, tmp_path / "b7", *fixed, "batch_size=7")
    two = run_sample(ckpt, tmp_path / "b7x2", *fixed, "batch_size=7", "devices=2")
    want = samples_of(tmp_path / "b1")
    assert want.shape == (20, 8, 8, 1) and len(np.unique(want.reshape(20, -1), axis=0)) == 20
    assert np.array_equal(samples_of(tmp_path / "b7"), want)
    assert np.array_equal(samples_of(tmp_path / "b7x2"), want)
    assert "process 0 of 2" in two.stdout + two.stderr
    assert len(list((tmp_path / "b7x2" / "samples").glob("*.png"))) == 20  # each rank wrote its shards' PNGs
    assert not list((tmp_path / "b7x2" / "shards").glob(".progress*"))


@pytest.mark.slow
def test_two_processes_give_the_samples_of_one_with_the_default_settings(ckpt, tmp_path):
    """No network_batch: the batches are the same on any number of processes, so the bits are too."""
    run_sample(ckpt, tmp_path / "one", *COMMON, "batch_size=4")
    run_sample(ckpt, tmp_path / "two", *COMMON, "batch_size=4", "devices=2")
    assert np.array_equal(samples_of(tmp_path / "two"), samples_of(tmp_path / "one"))


@pytest.mark.slow
def test_a_killed_run_continues_where_it_stopped_and_ends_with_the_same_samples(ckpt, tmp_path):
    overrides = ("num_samples=16", "shard_size=2", "batch_size=1", "sampler=ddpm")
    run_sample(ckpt, tmp_path / "whole", *overrides)
    out = tmp_path / "killed"
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "src.sample", f"ckpt_path={ckpt}", f"out_dir={out}",
                             "progress=false", *overrides], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(shards.shard_files(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = shards.shard_files(out)
    assert 2 <= len(finished) < 8, "the run was not stopped in the middle"
    for indices, path in finished.items():  # SIGKILL never leaves a finished shard damaged
        with np.load(path) as f:
            assert f["samples"].shape[0] == len(indices)
    again = run_sample(ckpt, out, *overrides)
    assert f"{2 * len(finished)} of 16 samples already drawn" in again.stdout + again.stderr
    assert np.array_equal(samples_of(out), samples_of(tmp_path / "whole"))
    assert not list((out / "shards").glob("*.tmp-*"))


@pytest.mark.slow
def test_a_folder_of_other_samples_is_refused_and_a_complete_one_left_as_it_is(ckpt, tmp_path):
    out = tmp_path / "run"
    run_sample(ckpt, out, "num_samples=4", "shard_size=2", "sampler=ddim", "sampler.steps=3")
    before = samples_of(out)
    other = run_sample(ckpt, out, "num_samples=4", "shard_size=2", "sampler=ddim", "sampler.steps=3", "seed=1",
                       check=False)
    assert other.returncode != 0
    assert "other settings (seed: 0 there, 1 now)" in other.stderr and "another out_dir" in other.stderr
    fresh = run_sample(ckpt, out, "num_samples=4", "shard_size=2", "sampler=ddim", "sampler.steps=3", "resume=false",
                       check=False)
    assert fresh.returncode != 0 and "resume=true continues them" in fresh.stderr
    same = run_sample(ckpt, out, "num_samples=4", "shard_size=2", "sampler=ddim", "sampler.steps=3",
                      "batch_size=3")
    assert "nothing to draw" in same.stdout + same.stderr
    assert np.array_equal(samples_of(out), before)


# ------------------------------------------------------------------------------------------ src.eval on 2 processes
def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict:
    import json

    result = run_entry_point("src.eval", f"ckpt_path={ckpt}", f"out_dir={out}", "progress=false", *overrides,
                             cwd=out.parent, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_nll_on_two_processes_is_the_one_process_mean(ckpt, tmp_path):
    """Each image's noise comes from its own generator: the same per-image bounds, summed in another order."""
    common = ("metric=nll", "batch_size=8", "num_batches=3")
    one = run_eval(ckpt, tmp_path / "one", *common)
    two = run_eval(ckpt, tmp_path / "two", *common, "devices=2")
    assert one["num_images"] == two["num_images"] == 24
    for key in ("nll_bpd", "prior_bpd", "decoder_bpd", "kl_terms_bpd"):
        assert two[key] == pytest.approx(one[key], rel=1e-12, abs=1e-12)


@pytest.mark.slow
def test_a_sample_metric_on_two_processes_scores_the_samples_of_one(ckpt, tmp_path):
    common = ("metric=fd_digits_classifier", "num_samples=12", "sample_batch_size=4", "shard_size=4", "sampler=ddim",
              "sampler.steps=5")
    one = run_eval(ckpt, tmp_path / "one", *common)
    two = run_eval(ckpt, tmp_path / "two", *common, "devices=2")
    assert np.array_equal(samples_of(tmp_path / "two"), samples_of(tmp_path / "one"))
    assert two["fd_digits_classifier"] == one["fd_digits_classifier"] and one["num_samples"] == 12


def test_the_sampling_scale_benchmark_measures_the_noise_cost(ckpt):
    """benchmarks/sampling_scale.py at a tiny size, so that it cannot rot."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sampling_scale", ROOT / "benchmarks" / "sampling_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        report = bench.noise_cost(str(ckpt), samples=4, batch_size=2, steps=3, rounds=1)
    finally:
        torch.set_num_threads(threads)
    assert set(report["seconds"]) == {"per_sample", "per_batch"} and report["seconds"]["per_sample"] > 0
    from src.utils import sampling

    assert sampling.SampleNoise.__name__ == "SampleNoise"  # restored
