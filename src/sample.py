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
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from src.utils import shards
from src.utils.checkpoint import find_checkpoint, load_module
from src.utils.distributed import Processes, start_processes
from src.utils.precision import resolve_precision
from src.utils.progress import track
from src.utils.run_folder import mark_progress
from src.utils.sampling import (
    build_sampler,
    check_sampler,
    draw_batches,
    sampling_labels,
    stored_form,
    write_pngs,
    write_previews,
)
from src.utils.validate import positive_int

log = logging.getLogger(__name__)


def sample_manifest(cfg: DictConfig, ckpt_path: Path, module: Any, labels: Any, precision: str) -> dict[str, Any]:
    """What decides the samples of this run (and two settings that do not: ``shards.FREE_KEYS``)."""
    return {
        "checkpoint": str(ckpt_path.resolve()), "checkpoint_sha256": shards.file_digest(ckpt_path),
        "weights": cfg.weights, "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "num_samples": int(cfg.num_samples), "shard_size": int(cfg.shard_size), "seed": int(cfg.seed),
        "precision": precision, "class_label": cfg.get("class_label"),
        "guidance_scale": float(cfg.get("guidance_scale", 1.0)), "conditional": labels is not None,
        "network_batch": cfg.get("network_batch"), "noise_device": cfg.get("noise_device", "cpu"),
        "data_shape": list(module.data_shape or []), "batch_size": int(cfg.batch_size), "devices": int(cfg.devices),
    }


def plan(out_dir: Path, manifest: dict[str, Any], ranges: list[range], resume: bool) -> list[range] | None:
    """Rank 0: check the folder against ``manifest`` and write it; the shards still to draw (None: the merged
    samples are already there)."""
    recorded = shards.check_manifest(out_dir, manifest, resume)
    if recorded and recorded.get("complete") and (out_dir / shards.MERGED).is_file():
        return None
    shards.clear_temporaries(out_dir)
    shards.write_manifest(out_dir, manifest | {"complete": False})
    done = shards.complete_shards(out_dir, ranges)
    if done:
        log.info("resuming in %s: %d of %d samples already drawn (%d complete shards)", out_dir,
                 sum(len(r) for r in done), manifest["num_samples"], len(done))
    return [r for r in ranges if r not in done]


def draw_shards(cfg: DictConfig, procs: Processes, module: Any, sampler: Any, labels: Any, out_dir: Path,
                mine: list[range], pending_total: int) -> None:
    """Draw this rank's shards, each written (PNGs, then the shard) as soon as its samples are done."""
    num_samples, batch_size = int(cfg.num_samples), int(cfg.batch_size)
    done = 0
    with track(total=pending_total, desc="samples", unit="samples",
               enabled=bool(cfg.progress) and procs.is_main) as bar:
        for indices in mine:
            parts = []
            for x in draw_batches(module, sampler, len(indices), batch_size, int(cfg.seed), procs.device,
                                  progress=bool(cfg.progress) and procs.is_main,
                                  labels=None if labels is None else labels[indices.start:indices.stop],
                                  guidance_scale=float(cfg.get("guidance_scale", 1.0)), precision=str(cfg.precision),
                                  start=indices.start, noise_device=str(cfg.get("noise_device", "cpu")),
                                  network_batch=cfg.get("network_batch"), count_samples=False):
                parts.append(stored_form(x))
                done += len(x)
                if procs.is_main:  # rank 0 shows every rank's progress, read from their progress files
                    bar.update(done + shards.progress_of_others(out_dir, procs.world_size) - bar.n)
                else:
                    shards.report_progress(out_dir, procs.rank, done)
            stored = np.concatenate(parts)
            write_pngs(stored, out_dir, indices.start, num_samples)
            shard_labels = None if labels is None else labels[indices.start:indices.stop].numpy().astype(np.int64)
            shards.write_shard(out_dir, indices, stored, shard_labels)
            mark_progress()  # the folder holds samples now: a later failure must not remove it


def finish(cfg: DictConfig, module: Any, out_dir: Path, ranges: list[range], labels: Any) -> Path:
    """Rank 0, every shard done: previews from the first shards, then the merged ``samples.npz``."""
    missing = [r for r in ranges if r not in shards.complete_shards(out_dir, ranges)]
    if missing:
        raise RuntimeError(f"shards {[f'{r.start}-{r.stop}' for r in missing[:5]]} are missing after every rank "
                           f"finished: run the same command again to draw them into {out_dir}")
    first, _ = shards.read_first(out_dir, ranges, 100)
    cycled = labels is not None and cfg.get("class_label") is None
    write_previews(first, out_dir, module, int(cfg.seed), total=int(cfg.num_samples),
                   grid_nrow=int(module.net.num_classes) if cycled else None)
    npz = shards.merge_shards(out_dir, ranges)
    manifest = shards.read_manifest(out_dir) or {}
    shards.write_manifest(out_dir, manifest | {"complete": True})
    shards.clear_progress(out_dir)
    return npz


def sample(cfg: DictConfig) -> Path:
    """Load the checkpoint, draw ``cfg.num_samples`` with ``cfg.sampler`` over ``cfg.devices`` processes, write
    them; returns the merged npz (on every rank)."""
    num_samples = positive_int(cfg.num_samples, "num_samples")
    positive_int(cfg.batch_size, "batch_size")
    positive_int(cfg.shard_size, "shard_size", hint="samples per shard file")
    positive_int(cfg.get("network_batch"), "network_batch", allow_none=True, hint="null: the batch as it is")
    procs = start_processes(cfg.devices, cfg.device, cfg.get("num_nodes", 1), cfg.get("strategy", "auto"))
    sampler = build_sampler(cfg.sampler)
    ckpt_path = find_checkpoint(cfg.ckpt_path, key="ckpt_path")
    module = load_module(ckpt_path, map_location="cpu", weights=cfg.weights, compile=cfg.get("compile"),
                         compile_options=cfg.get("compile_options")).to(procs.device)
    check_sampler(sampler, module.diffusion)
    class_label, guidance_scale = cfg.get("class_label"), float(cfg.get("guidance_scale", 1.0))
    labels = sampling_labels(module, num_samples, class_label, guidance_scale, ckpt_path=cfg.ckpt_path)
    out_dir = Path(cfg.paths.output_dir)
    ranges = shards.shard_ranges(num_samples, int(cfg.shard_size))
    npz = out_dir / shards.MERGED
    pending, error = None, None
    if procs.is_main:
        log.info("checkpoint %s (%s weights): data shape %s, %s; sampler %s on %s x %d", ckpt_path, cfg.weights,
                 module.data_shape, module.diffusion, sampler, procs.device, procs.world_size)
        if labels is not None:
            log.info("class-conditional: %s, guidance_scale %s",
                     "all classes in turn" if class_label is None else f"class {class_label}", guidance_scale)
        precision = resolve_precision(cfg.precision, procs.device)
        log.info("network precision: %s (precision=%s)", precision, cfg.precision)
        try:
            manifest = sample_manifest(cfg, ckpt_path, module, labels, precision)
            pending = plan(out_dir, manifest, ranges, bool(cfg.resume))
        except Exception as err:  # every rank stops with it, none waits for the others forever
            error = err
    procs.raise_together(error)
    pending = procs.broadcast(pending)
    if pending is None:
        log.info("%s already holds the %d samples of this run: nothing to draw", out_dir, num_samples)
        return npz
    draw_shards(cfg, procs, module, sampler, labels, out_dir, shards.assign(pending, procs.rank, procs.world_size),
                sum(len(r) for r in pending))
    procs.barrier()
    if procs.is_main:
        npz = finish(cfg, module, out_dir, ranges, labels)
        log.info("%d samples written to %s", num_samples, npz)
    procs.barrier()
    return npz


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample.yaml")
def main(cfg: DictConfig) -> Path:
    from src.utils.process import prepare_process

    prepare_process(processes=int(cfg.devices) if str(cfg.devices).isdigit() else 1)
    npz = sample(cfg)
    mark_progress()
    return npz


if __name__ == "__main__":
    main()
