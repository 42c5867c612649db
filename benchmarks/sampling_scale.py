"""Sampling at scale, measured: the cost of per-sample noise and the speed-up of several processes.

    python benchmarks/sampling_scale.py --ckpt outputs/train/runs/<run> [--samples 200] [--steps 100]

1. Per-sample noise (src/diffusion/noise.py) against one generator per batch, same model, sampler and batches,
   in this process with one thread: the medians of interleaved rounds, and the noise draws alone timed without the
   network (the precise figure: the difference of two sampling times is within their noise).
2. ``python -m src.sample`` with ``devices=1`` and ``devices=2`` (one thread per process; gloo on the CPU): the
   sampling throughput of each (from the run's own "drew N samples in S s" line) and their ratio.
Prints one JSON object. Run it on a quiet machine: another busy process takes a core from the two-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def noise_cost(ckpt: str, samples: int, batch_size: int, steps: int, rounds: int) -> dict:
    import src.utils.sampling as sampling
    from src.diffusion.samplers import Ancestral
    from src.utils.checkpoint import find_checkpoint, load_module

    torch.set_num_threads(1)
    module = load_module(find_checkpoint(ckpt), map_location="cpu", weights="ema")
    sampler = Ancestral(steps=steps)  # a noise draw at every step: the most noise per network call
    per_sample = sampling.SampleNoise

    def per_batch(seed, indices, device="cpu"):  # the old way: one generator for the batch
        return torch.Generator().manual_seed(seed * 1_000_003 + list(indices)[0])

    times = {"per_sample": [], "per_batch": []}
    for round_ in range(rounds):  # alternate the order: the first draw of a pair runs on a colder cache
        pair = (("per_sample", per_sample), ("per_batch", per_batch))
        for name, factory in pair if round_ % 2 == 0 else pair[::-1]:
            sampling.SampleNoise = factory
            start = time.perf_counter()
            sampling.draw(module, sampler, samples, batch_size, 0, torch.device("cpu"))
            times[name].append(time.perf_counter() - start)
    sampling.SampleNoise = per_sample
    median = {k: statistics.median(v) for k, v in times.items()}
    # the noise alone: the same generators and draws (x_T + one per step) without the network
    start = time.perf_counter()
    for first in range(0, samples, batch_size):
        noise = per_sample(0, range(first, min(first + batch_size, samples)))
        for _ in range(steps + 1):
            noise.randn((len(noise), *module.data_shape))
    alone = time.perf_counter() - start
    return {"samples": samples, "batch_size": batch_size, "steps": steps, "seconds": median, "rounds": rounds,
            "noise_alone_seconds": alone, "noise_percent_of_sampling": 100 * alone / median["per_sample"],
            "overhead_percent": 100 * (median["per_sample"] / median["per_batch"] - 1)}


def throughput(ckpt: str, devices: int, samples: int, batch_size: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [sys.executable, "-m", "src.sample", f"ckpt_path={ckpt}", f"num_samples={samples}",
             f"batch_size={batch_size}", f"shard_size={batch_size}", f"sampler.steps={steps}", f"devices={devices}",
             f"out_dir={out}/run", "progress=false", "precision=fp32"],
            cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(result.stderr[-3000:])
        match = re.search(r"drew \d+ samples in [\d.]+ s \(([\d.e+-]+) samples/s\)", result.stdout + result.stderr)
        return float(match[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint or run folder of src.train")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100, help="respaced ancestral steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-devices", action="store_true", help="only the noise cost")
    args = parser.parse_args()
    report = {"noise": noise_cost(args.ckpt, args.samples, args.batch_size, args.steps, args.rounds)}
    if not args.skip_devices:
        one = throughput(args.ckpt, 1, args.samples, args.batch_size, args.steps)
        two = throughput(args.ckpt, 2, args.samples, args.batch_size, args.steps)
        report["devices"] = {"samples_per_s": {"1": one, "2": two}, "speedup": two / one}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
