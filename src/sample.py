"""Sample a trained DDPM: `python -m src.sample ckpt_path=<.ckpt or run folder> num_samples=N [sampler=ddim]`.

Also `sampler.steps=50 sampler.eta=0.0`, `batch_size=`, `seed=`, `weights=ema|raw`, `device=auto|cpu|cuda[:N]|mps`,
`devices=4` (one process per device), `out_dir=<folder>` (see configs/sample.yaml). A run folder of `src.train` as
`ckpt_path` means its `checkpoints/last.ckpt`.

Sample k takes its noise from its own generator seeded by (seed, k) (src/diffusion/noise.py), so it is the same
sample for any batch size, number of processes or order. Samples are written as shards named by their index range
as they complete (src/utils/shards.py); the same command run again into the same `out_dir` skips the complete
shards, so a stopped 50,000-sample run loses at most the shards in flight. When all are done, rank 0 merges them
into `samples.npz`; `samples/*.png` (one per image) and `grid.png` (2-D points: `scatter.png`) sit beside it.

Class-conditional checkpoints (trained with `conditional=true`): `class_label=3` draws class 3 only, null cycles
through all classes (sample i has class i mod K; grid.png then shows one class per column), and
`guidance_scale=s` applies classifier-free guidance (1: plain conditional; see src/diffusion/guidance.py). The
labels are saved in `samples.npz` under `labels` (int64, N).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.utils.checkpoint import find_checkpoint, load_module
from src.utils.distributed import start_processes
from src.utils.precision import resolve_precision
from src.utils.sample_run import sample_settings, sample_to_folder
from src.utils.sampling import build_sampler, check_sampler, sampling_labels
from src.utils.validate import positive_int

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> Path:
    """Load the checkpoint, draw ``cfg.num_samples`` with ``cfg.sampler`` over ``cfg.devices`` processes, write
    them; returns the merged npz (on every rank)."""
    positive_int(cfg.num_samples, "num_samples")
    procs = start_processes(cfg.devices, cfg.device, cfg.get("num_nodes", 1), cfg.get("strategy", "auto"))
    run = sample_settings(cfg, resolve_precision(cfg.precision, procs.device))
    sampler = build_sampler(cfg.sampler)
    ckpt_path = find_checkpoint(cfg.ckpt_path, key="ckpt_path")
    module = load_module(ckpt_path, map_location="cpu", weights=cfg.weights, compile=cfg.get("compile"),
                         compile_options=cfg.get("compile_options")).to(procs.device)
    check_sampler(sampler, module.diffusion)
    labels = sampling_labels(module, run.num_samples, run.class_label, run.guidance_scale, ckpt_path=cfg.ckpt_path)
    if procs.is_main:
        log.info("checkpoint %s (%s weights): data shape %s, %s; sampler %s on %s x %d", ckpt_path, cfg.weights,
                 module.data_shape, module.diffusion, sampler, procs.device, procs.world_size)
        if labels is not None:
            log.info("class-conditional: %s, guidance_scale %s", "all classes in turn" if run.class_label is None
                     else f"class {run.class_label}", run.guidance_scale)
        log.info("network precision: %s (precision=%s)", run.precision, cfg.precision)
    return sample_to_folder(run, procs, module, sampler, labels, ckpt_path, Path(cfg.paths.output_dir))


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample.yaml")
def main(cfg: DictConfig) -> Path:
    from src.utils.process import prepare_process
    from src.utils.run_folder import mark_progress

    prepare_process(processes=int(cfg.devices) if str(cfg.devices).isdigit() else 1)
    npz = sample(cfg)
    mark_progress()
    return npz


if __name__ == "__main__":
    main()
