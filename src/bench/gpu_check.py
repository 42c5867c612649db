"""One command that exercises every CUDA path of the project on one GPU and writes what it found.

    bash benchmarks/gpu_check.sh <out folder>            # on a machine with one CUDA GPU, in about 6-8 minutes
    bash benchmarks/gpu_check.sh <out folder> --cpu-smoke  # the same checks at tiny sizes on a CPU (the test suite)

Each check runs a real entry point (or a short script) in a fresh process, with a time limit, and its output goes
to ``<out>/gpu_check.log``; ``<out>/gpu_check.json`` holds, per check, the command, exit status, seconds, and the
figures read from its outputs (bench ratios, MFU, CUDA peak memory, FID). The checks:

- ``environment``: torch, CUDA, the GPU, native bf16 (``has_fast_bf16``);
- ``sdpa_flash``: the U-Net's attention under ``sdpa_kernel(FLASH_ATTENTION)`` in bf16 (fails if flash cannot run);
- ``train``: the CIFAR-10 experiment with its defaults (bf16-mixed, fused Adam) plus ``data.device_resident=true``,
  a few hundred steps, the FID callback on CUDA (random Inception weights) at the end of each epoch;
- ``train_compiled``: the same with ``module.compile=true``;
- ``sample_reduce_overhead``: ``src.sample`` with CPU noise copied from pinned memory and
  ``compile_options={mode: reduce-overhead}`` (CUDA graphs);
- ``samplers``: ``src.eval metric=nfe_curve`` over every sampler at 10 NFE, scored by FID on CUDA;
- ``distributed_nccl``: ``src.sample devices=1 strategy=ddp`` (a NCCL process group of one);
- ``bench``: ``src.bench`` at the CIFAR-10 size (ratios against diffusers, MFU, CUDA peak memory).

The CIFAR-10 files are the real ones when ``--data-dir`` holds ``cifar-10-batches-py``, else random images in
the same format (a GPU node is often offline): throughput is the same, FID values are meaningless either way
(random Inception weights).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# a tiny U-Net for the CPU smoke run, and the few steps it takes
SMOKE_MODEL = ["model.ch=32", "model.ch_mult=[1,2]", "model.attn_resolutions=[16]", "model.num_res_blocks=1",
               "diffusion.num_timesteps=50"]

ENVIRONMENT = """
import json, torch
from src.utils.device import has_fast_bf16
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
print("RESULT " + json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if cuda else None,
    "fast_bf16": has_fast_bf16(device),
    "capability": list(torch.cuda.get_device_capability()) if cuda else None}))
"""

SDPA_FLASH = """
import json, sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from src.models.unet import UNet
smoke = sys.argv[1] == "smoke"
device = torch.device("cpu" if smoke else "cuda")
net = UNet(in_channels=3, ch=32 if smoke else 128, ch_mult=(1, 2) if smoke else (1, 2, 2, 2), num_res_blocks=1 if smoke
           else 2, attn_resolutions=(16,), resolution=32, dropout=0.0).to(device).eval()
x, t = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 1000, (8,), device=device)
backend = SDPBackend.MATH if smoke else SDPBackend.FLASH_ATTENTION
with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16), sdpa_kernel([backend]):
    out = net(x, t)
assert torch.isfinite(out).all()
print("RESULT " + json.dumps({"backend": backend.name, "output_shape": list(out.shape)}))
"""


@dataclass
class Check:
    name: str
    argv: list[str]
    timeout: int
    after: Any = None  # reads figures from the check's outputs: (check, out folder) -> dict
    figures: dict = field(default_factory=dict)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _bench_figures(check: Check, folder: Path) -> dict:
    path = folder / "bench.json"
    if not path.is_file():
        return {}
    records = json.loads(path.read_text())
    keep = ("task", "setting", "peer", "ours", "theirs", "ratio", "ratio_paired", "precision", "mfu",
            "peak_mem_bytes", "note")
    return {"records": [{k: r.get(k) for k in keep if k in r} for r in records]}


def _metrics_json(check: Check, folder: Path) -> dict:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _train_figures(check: Check, folder: Path) -> dict:
    """The FID values the callback logged (random weights: the callback ran on the device, nothing more) and
    whether the run left its checkpoint."""
    import csv

    rows = []
    for csv_path in folder.glob("csv/**/metrics.csv"):
        with open(csv_path) as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/fid")]
    return {"val_fid": [float(r["val/fid"]) for r in rows],
            "checkpoint": (folder / "checkpoints" / "last.ckpt").is_file()}


def build_checks(out: Path, smoke: bool, data_dir: Path, weights: Path) -> list[Check]:
    """The checks in order; ``smoke``: tiny sizes on the CPU."""
    run = out / "runs"
    data = [f"data.data_dir={data_dir}", "data.download=false", "data.verify_checksums=false"]
    if smoke:
        train_size = ["trainer=cpu", *SMOKE_MODEL, "trainer.max_steps=4", "trainer.limit_train_batches=2",
                      "data.batch_size=4", "data.num_workers=0", "trainer.limit_val_batches=1",
                      "callbacks.fid.num_samples=8", "callbacks.fid.batch_size=8", "callbacks.fid.feature=64",
                      "callbacks.sample_grid.num_samples=4"]
        sample_size, samples, nfe, bench = ["num_samples=4", "batch_size=4"], 4, 3, [
            "quick=true", "model.ch=32", "batch_size=2", "sample_steps=3", "ddim_steps=2", "dpmpp_steps=2",
            "repeats=1", "warmup=0", "device=cpu", "cpu_memory=false"]
    else:
        train_size = ["trainer.max_steps=300", "trainer.limit_train_batches=150", "trainer.limit_val_batches=2",
                      "callbacks.fid.num_samples=1000", "callbacks.fid.feature=2048"]
        sample_size, samples, nfe, bench = ["num_samples=512", "batch_size=256"], 512, 10, [
            "batch_size=128", "sample_steps=100", "ddim_steps=50", "dpmpp_steps=10", "repeats=3", "warmup=1"]
    train = ["-m", "src.train", "experiment=cifar10", "logger=csv", *data, "data.device_resident=true",
             "trainer.check_val_every_n_epoch=1", "callbacks.fid.every_n_epochs=1",
             f"callbacks.fid.weights_path={weights}",
             "+callbacks.fid.sampler={_target_: src.diffusion.samplers.DDIM, steps: 20}",
             "+callbacks.sample_grid.sampler={_target_: src.diffusion.samplers.DDIM, steps: 50}", *train_size]
    ckpt = f"ckpt_path={run / 'train'}"
    # on a CPU inductor's C++ compile of every graph takes minutes: the smoke run traces with dynamo and AOTAutograd
    # only (the same wiring, no code generation) and leaves the sampling callbacks out
    compiled_train = ["trainer.max_steps=100"] if not smoke else [
        "trainer.max_steps=2", "module.compile_options={backend: aot_eager}", "callbacks.fid=null",
        "callbacks.sample_grid=null"]
    ddim = ["sampler=ddim", "sampler.steps=" + ("3" if smoke else "50")]
    checks = [
        Check("environment", _python("-c", ENVIRONMENT), 120),
        Check("sdpa_flash", _python("-c", SDPA_FLASH, "smoke" if smoke else "gpu"), 300),
        Check("train", _python(*train, f"hydra.run.dir={run / 'train'}"), 900, _train_figures),
        Check("train_compiled", _python(*train, "module.compile=true", *compiled_train,
                                        f"hydra.run.dir={run / 'train_compiled'}"), 900, _train_figures),
        Check("sample_reduce_overhead", _python(
            "-m", "src.sample", ckpt, *ddim, *sample_size, "noise_device=cpu", "precision=auto", "compile=true",
            "compile_options={backend: eager}" if smoke else "compile_options={mode: reduce-overhead}",
            f"out_dir={run / 'sample'}"), 900),
        Check("samplers", _python(
            "-m", "src.eval", ckpt, "metric=nfe_curve", "nfe_curve.samplers=[ddim,dpmpp_2m,dpmpp_2m_sde,unipc,heun]",
            f"nfe_curve.nfe=[{nfe}]", "nfe_curve.baseline=null", "nfe_curve.metric=fid", f"num_samples={samples}",
            f"sample_batch_size={min(samples, 256)}", f"fid.weights_path={weights}", f"fid.max_reference={samples}",
            "fid.feature=" + ("64" if smoke else "2048"), *[f"+data_overrides.{d.removeprefix('data.')}" for d in data],
            "precision=auto",
            f"out_dir={run / 'samplers'}"), 900, _metrics_json),
        Check("distributed_nccl", _python(
            "-m", "src.sample", ckpt, *ddim, *sample_size, "devices=1", "strategy=ddp",
            f"out_dir={run / 'distributed'}"), 600),
        Check("bench", _python("-m", "src.bench", *bench, f"hydra.run.dir={run / 'bench'}"), 900, _bench_figures),
    ]
    for check in checks:
        check.folder = run / {"train_compiled": "train_compiled", "sample_reduce_overhead": "sample",
                              "distributed_nccl": "distributed"}.get(check.name, check.name)
    return checks


def run_check(check: Check, log_file: Any, env: dict[str, str]) -> dict[str, Any]:
    """Run one check; its output appended to the log; the record for gpu_check.json."""
    log_file.write(f"\n===== {check.name}: {' '.join(check.argv)}\n")
    log_file.flush()
    start = time.perf_counter()
    try:
        result = subprocess.run(check.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=check.timeout)
        rc, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as err:
        rc, output = 124, f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {check.timeout} s"
    seconds = time.perf_counter() - start
    log_file.write(output if isinstance(output, str) else output.decode(errors="replace"))
    log_file.flush()
    record: dict[str, Any] = {"name": check.name, "command": check.argv[1:], "returncode": rc, "ok": rc == 0,
                              "seconds": round(seconds, 1)}
    found = re.findall(r"^RESULT (.*)$", output, flags=re.MULTILINE)
    if found:
        record["figures"] = json.loads(found[-1])
    if check.after is not None and rc == 0:
        record["figures"] = check.after(check, check.folder)
    if rc:
        record["tail"] = output[-3000:]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exercise every CUDA path on one GPU (see src/bench/gpu_check.py).")
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.log and the runs")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    parser.add_argument("--data-dir", type=Path, default=None, help="a folder holding cifar-10-batches-py")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: run on a GPU machine, or pass --cpu-smoke for the CPU smoke run", file=sys.stderr)
        return 2
    from src.data.synthetic import write_cifar10_format
    from src.metrics.fidelity import make_random_inception_weights

    data_dir = args.data_dir
    if data_dir is None or not (data_dir / "cifar-10-batches-py").is_dir():
        data_dir = out / "data"
        if not (data_dir / "cifar-10-batches-py").is_dir():  # random images, the real format and size
            write_cifar10_format(data_dir, per_batch=16 if args.cpu_smoke else 10_000)
    weights = out / "random-inception-NOT-FOR-SCORES.pth"
    if not weights.is_file():
        make_random_inception_weights(weights)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline",
           "DDPM_PROGRESS": "lines"}
    checks = build_checks(out, args.cpu_smoke, data_dir.resolve(), weights)
    if args.only:
        checks = [c for c in checks if c.name in args.only or c.name == "environment"]
    records, start = [], time.perf_counter()
    with open(out / "gpu_check.log", "a") as log_file:
        for check in checks:
            records.append(run_check(check, log_file, env))
            print(f"{check.name}: {'ok' if records[-1]['ok'] else 'FAILED'} ({records[-1]['seconds']} s)", flush=True)
    summary = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "seconds": round(time.perf_counter() - start, 1),
               "all_ok": all(r["ok"] for r in records), "data": str(data_dir), "checks": records}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"{'all checks passed' if summary['all_ok'] else 'some checks FAILED'} in {summary['seconds']} s: "
          f"{out / 'gpu_check.json'}, log {out / 'gpu_check.log'}")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
