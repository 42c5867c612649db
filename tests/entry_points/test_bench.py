"""Smoke test of `python -m src.bench`: it runs end to end and writes well-formed records (no speed thresholds)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT, run_entry_point

TASKS = {"train", "sample_ddpm", "sample_ddim", "sample_dpmpp"}
SETTINGS = {"same_precision", "defaults"}
# a tiny U-Net (ch=32, the peers follow it) and the smallest chains: seconds on a CPU
SMALL = ["quick=true", "batch_size=2", "sample_steps=3", "ddim_steps=2", "dpmpp_steps=2", "repeats=1", "warmup=0",
         "model.ch=32", "device=cpu"]


def _run(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "bench"
    result = run_entry_point("src.bench", *SMALL, f"hydra.run.dir={out}", *extra, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    records = json.loads((out / "bench.json").read_text())
    assert isinstance(records, list) and records
    return records


def _check_record(r: dict) -> None:
    for key in ("task", "setting", "peer", "ours", "theirs", "ratio", "device", "precision", "batch_size",
                "flops_per_image", "mfu"):
        assert key in r, key
    assert r["task"] in TASKS and r["setting"] in SETTINGS
    assert r["batch_size"] == 2
    assert r["ours"] > 0
    assert r["flops_per_image"] > 0
    assert r["device"].startswith("cpu") and r["mfu"] is None  # MFU only on CUDA


def test_bench_ours_only(tmp_path):
    """Ours always runs, peers or not: with no peers every task/setting gets an ours-only record."""
    records = _run(tmp_path, "peers=[]", "cpu_memory=false")
    assert {(r["task"], r["setting"]) for r in records} == {(t, s) for t in TASKS for s in SETTINGS}
    for r in records:
        _check_record(r)
        assert r["peer"] is None and r["theirs"] is None and r["ratio"] is None
        assert r["peak_mem_bytes"] == {"ours": None}  # cpu_memory=false: not measured
    fwd = {r["forward_flops_per_image"] for r in records}
    assert len(fwd) == 1 and fwd.pop() > 0
    by_task = {r["task"]: r for r in records if r["setting"] == "same_precision"}
    assert by_task["sample_ddim"]["flops_per_image"] == 2 * by_task["train"]["forward_flops_per_image"]
    assert by_task["train"]["precision"]["ours"] == "fp32"  # same_precision on CPU is fp32


def test_bench_with_peers(tmp_path):
    pytest.importorskip("diffusers")
    peers = ["diffusers", "diffusers_scheduler"]
    if importlib.util.find_spec("denoising_diffusion_pytorch") is not None:
        peers.append("denoising_diffusion_pytorch")
    records = _run(tmp_path, f"peers=[{','.join(peers)},no_such_peer]", "settings=[same_precision]")
    timed = [r for r in records if r["task"] is not None and r["theirs"] is not None]
    # denoising-diffusion-pytorch has no DPM-Solver; diffusers' scheduler loops on our U-Net only sample
    absent = {("sample_dpmpp", "denoising_diffusion_pytorch"), ("train", "diffusers_scheduler"),
              ("sample_ddpm", "diffusers_scheduler")} & {(t, p) for t in TASKS for p in peers}
    assert {(r["task"], r["peer"]) for r in timed} == {(t, p) for t in TASKS for p in peers} - absent
    untimed = [r for r in records if r["task"] is not None and r["theirs"] is None]
    assert {(r["task"], r["peer"]) for r in untimed} == absent
    assert all(f"has no {r['task']} run" in r["note"] for r in untimed)
    for r in timed:
        _check_record(r)
        assert r["theirs"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["theirs"])
        assert r["ratio_paired"] > 0
        assert r["precision"] == {"ours": "fp32", "theirs": "fp32"}
        mem = r["peak_mem_bytes"]
        if r["task"] == "train":  # each side alone in a fresh process: at least weights, grads, Adam, EMA
            for side in ("ours", "theirs"):
                assert isinstance(mem[side], int) and mem[side] >= 5 * 4 * r["params"][side], (side, mem)
        else:
            assert mem == {"ours": None, "theirs": None}
    same_net = next(r for r in timed if r["peer"] == "diffusers_scheduler" and r["task"] == "sample_dpmpp")
    assert same_net["params"]["ours"] == same_net["params"]["theirs"]  # our U-Net on both sides
    diffusers_train = next(r for r in timed if r["peer"] == "diffusers" and r["task"] == "train")
    # the diffusers model is built from our model node: the same architecture, the same parameter count
    assert diffusers_train["params"]["ours"] == diffusers_train["params"]["theirs"]
    skipped = [r for r in records if r["task"] is None]
    assert [r["peer"] for r in skipped] == ["no_such_peer"] and "skipped" in skipped[0]["note"]


def test_quick_flag_and_paper_config():
    """quick=true switches the null sizes; the defaults are the full ones; the diffusers config is the paper's."""
    from src.bench.run import resolve_sizes
    from src.bench.sides import diffusers_unet_config

    base = dict(batch_size=None, repeats=None, warmup=None, sample_steps=None, ddim_steps=None, dpmpp_steps=None,
                train_steps=None)
    full = resolve_sizes(OmegaConf.create({**base, "quick": False}))
    quick = resolve_sizes(OmegaConf.create({**base, "quick": True}))
    assert (full["batch_size"], full["sample_steps"], full["ddim_steps"], full["repeats"]) == (128, 1000, 50, 5)
    assert (full["dpmpp_steps"], quick["dpmpp_steps"]) == (10, 3)
    assert (quick["batch_size"], quick["sample_steps"], quick["ddim_steps"], quick["repeats"]) == (4, 10, 5, 2)
    assert resolve_sizes(OmegaConf.create({**base, "quick": True, "batch_size": 7}))["batch_size"] == 7

    model = OmegaConf.load(ROOT / "configs" / "model" / "unet_ddpm.yaml")
    cfg = diffusers_unet_config(model, 32, 3)
    assert cfg["block_out_channels"] == (128, 256, 256, 256) and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert cfg["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(**cfg)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
