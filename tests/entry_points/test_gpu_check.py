"""benchmarks/gpu_check.sh, the one command that exercises every CUDA path on a GPU, run as its CPU smoke run so that
it cannot rot: every check must pass and report what the GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

CHECKS = ["environment", "sdpa_flash", "train", "train_compiled", "sample_reduce_overhead", "samplers",
          "distributed_nccl", "bench"]


def test_the_gpu_check_passes_its_cpu_smoke_run(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--cpu-smoke"],
                            capture_output=True, text=True, timeout=1500, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads((out / "gpu_check.json").read_text())
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert result.returncode == 0 and summary["all_ok"], json.dumps(failed, indent=1)[-6000:]
    checks = {c["name"]: c for c in summary["checks"]}
    assert list(checks) == CHECKS
    assert checks["environment"]["figures"]["torch"]
    assert checks["sdpa_flash"]["figures"]["backend"] == "MATH"  # flash on a GPU
    assert checks["train"]["figures"]["checkpoint"] and len(checks["train"]["figures"]["val_fid"]) >= 1
    assert checks["train_compiled"]["figures"]["checkpoint"]
    samplers = checks["samplers"]["figures"]
    assert {k for k in samplers if "@" in k} == {f"{s}@3" for s in ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc")} | {
        "heun@3"}
    bench = checks["bench"]["figures"]["records"]
    assert {r["task"] for r in bench} >= {"train", "sample_ddpm"}
    log = (out / "gpu_check.log").read_text()
    assert "===== distributed_nccl" in log and "process 0 of 1" in log
    for run in ("sample", "distributed"):
        assert (out / "runs" / run / "samples.npz").is_file()
