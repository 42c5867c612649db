"""A sampling run into a folder: shards drawn by one or many processes, resumed, merged (src.sample and the sample
metrics of src.eval).

Sample k takes its noise from its own generator seeded by (seed, k) (src/diffusion/noise.py), so the ranks draw
disjoint shards (src/utils/shards.py) and the merged ``samples.npz`` is the same for any number of processes; a run
into a folder that holds complete shards of the same settings draws only the missing ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from src.utils import shards
from src.utils.distributed import Processes
from src.utils.progress import track
from src.utils.run_folder import mark_progress
from src.utils.sampling import draw_batches, stored_form, write_pngs, write_previews
from src.utils.validate import positive_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRun:
    """The settings of a sampling run (the keys of configs/sample.yaml; ``sample_settings`` reads them)."""

    num_samples: int
    batch_size: int
    seed: int = 0
    shard_size: int = 1000
    precision: str = "fp32"  # resolved: fp32 or bf16
    class_label: int | None = None
    guidance_scale: float = 1.0
    network_batch: int | None = None
    noise_device: str = "cpu"
    resume: bool = True
    progress: bool = True
    weights: str = "ema"
    sampler: dict[str, Any] = field(default_factory=dict)


def sample_settings(cfg: DictConfig, precision: str, batch_key: str = "batch_size") -> SampleRun:
    """A ``SampleRun`` from an entry point's config, every count checked."""
    return SampleRun(
        num_samples=positive_int(cfg.num_samples, "num_samples"),
        batch_size=positive_int(cfg[batch_key], batch_key),
        seed=int(cfg.seed),
        shard_size=positive_int(cfg.get("shard_size", 1000), "shard_size", hint="samples per shard file"),
        precision=precision, class_label=cfg.get("class_label"),
        guidance_scale=float(cfg.get("guidance_scale", 1.0)),
        network_batch=positive_int(cfg.get("network_batch"), "network_batch", allow_none=True,
                                   hint="null: the batch as it is"),
        noise_device=str(cfg.get("noise_device", "cpu")), resume=bool(cfg.get("resume", True)),
        progress=bool(cfg.get("progress", True)), weights=str(cfg.get("weights", "ema")),
        sampler=OmegaConf.to_container(cfg.sampler, resolve=True),
    )


def manifest_of(run: SampleRun, ckpt_path: Path, module: Any, labels: Any, devices: int) -> dict[str, Any]:
    """What decides the samples of this run (and the settings that do not: ``shards.FREE_KEYS``)."""
    return {
        "checkpoint": str(ckpt_path.resolve()), "checkpoint_sha256": shards.file_digest(ckpt_path),
        "weights": run.weights, "sampler": run.sampler, "num_samples": run.num_samples,
        "shard_size": run.shard_size, "seed": run.seed, "precision": run.precision, "class_label": run.class_label,
        "guidance_scale": run.guidance_scale, "conditional": labels is not None, "network_batch": run.network_batch,
        "noise_device": run.noise_device, "data_shape": list(module.data_shape or []), "batch_size": run.batch_size,
        "devices": devices,
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


def draw_shards(run: SampleRun, procs: Processes, module: Any, sampler: Any, labels: Any, out_dir: Path,
                mine: list[range], pending_total: int) -> None:
    """Draw this rank's shards, each written (PNGs, then the shard) as soon as its samples are done."""
    done = 0
    with track(total=pending_total, desc="samples", unit="samples", enabled=run.progress and procs.is_main) as bar:
        for indices in mine:
            parts = []
            for x in draw_batches(module, sampler, len(indices), run.batch_size, run.seed, procs.device,
                                  progress=run.progress and procs.is_main,
                                  labels=None if labels is None else labels[indices.start:indices.stop],
                                  guidance_scale=run.guidance_scale, precision=run.precision, start=indices.start,
                                  noise_device=run.noise_device, network_batch=run.network_batch,
                                  count_samples=False):
                parts.append(stored_form(x))
                done += len(x)
                if procs.is_main:  # rank 0 shows every rank's progress, read from their progress files
                    bar.update(done + shards.progress_of_others(out_dir, procs.world_size) - bar.n)
                else:
                    shards.report_progress(out_dir, procs.rank, done)
            stored = np.concatenate(parts)
            write_pngs(stored, out_dir, indices.start, run.num_samples)
            shard_labels = None if labels is None else labels[indices.start:indices.stop].numpy().astype(np.int64)
            shards.write_shard(out_dir, indices, stored, shard_labels)
            mark_progress()  # the folder holds samples now: a later failure must not remove it


def finish(run: SampleRun, module: Any, out_dir: Path, ranges: list[range], labels: Any) -> Path:
    """Rank 0, every shard done: previews from the first shards, then the merged ``samples.npz``."""
    missing = [r for r in ranges if r not in shards.complete_shards(out_dir, ranges)]
    if missing:
        raise RuntimeError(f"shards {[f'{r.start}-{r.stop}' for r in missing[:5]]} are missing after every rank "
                           f"finished: run the same command again to draw them into {out_dir}")
    first, _ = shards.read_first(out_dir, ranges, 100)
    cycled = labels is not None and run.class_label is None
    write_previews(first, out_dir, module, run.seed, total=run.num_samples,
                   grid_nrow=int(module.net.num_classes) if cycled else None)
    npz = shards.merge_shards(out_dir, ranges)
    manifest = shards.read_manifest(out_dir) or {}
    shards.write_manifest(out_dir, manifest | {"complete": True})
    shards.clear_progress(out_dir)
    return npz


def sample_to_folder(run: SampleRun, procs: Processes, module: Any, sampler: Any, labels: Any, ckpt_path: Path,
                     out_dir: Path) -> Path:
    """Draw ``run`` into ``out_dir`` over ``procs`` (resuming what is there); the merged npz, on every rank."""
    ranges = shards.shard_ranges(run.num_samples, run.shard_size)
    pending, error = None, None
    if procs.is_main:
        try:
            manifest = manifest_of(run, ckpt_path, module, labels, procs.world_size)
            pending = plan(out_dir, manifest, ranges, run.resume)
        except Exception as err:  # every rank stops with it, none waits for the others forever
            error = err
    procs.raise_together(error)
    pending = procs.broadcast(pending)
    npz = out_dir / shards.MERGED
    if pending is None:
        log.info("%s already holds the %d samples of this run: nothing to draw", out_dir, run.num_samples)
        return npz
    start = time.perf_counter()
    draw_shards(run, procs, module, sampler, labels, out_dir, shards.assign(pending, procs.rank, procs.world_size),
                sum(len(r) for r in pending))
    procs.barrier()
    if procs.is_main:
        seconds = time.perf_counter() - start
        drawn = sum(len(r) for r in pending)
        log.info("drew %d samples in %.1f s (%.3g samples/s) on %d process(es)", drawn, seconds, drawn / seconds,
                 procs.world_size)
        npz = finish(run, module, out_dir, ranges, labels)
        log.info("%d samples written to %s", run.num_samples, npz)
    procs.barrier()
    return npz
