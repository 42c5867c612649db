"""Evaluate a trained model: `python -m src.eval ckpt_path=<.ckpt or run folder> metric=nll` (see configs/eval.yaml).

A run folder of `src.train` as `ckpt_path` means its `checkpoints/last.ckpt`; the metrics are in src/metrics/.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from src.data.run_data import RunData
from src.metrics.figures import interpolation_figure, progressive_figure
from src.metrics.nfe_curve import nfe_curve
from src.metrics.nll import nll_metric
from src.metrics.sample_quality import class_accuracy, data_sample_metric, evaluate_fid, sample_quality
from src.utils.checkpoint import find_checkpoint, load_module
from src.utils.distributed import Processes, start_processes
from src.utils.files import atomic_write_text
from src.utils.loggers import send_to_loggers
from src.utils.precision import resolve_precision
from src.utils.sample_run import sample_settings, sample_to_folder
from src.utils.sampling import build_sampler, check_sampler, read_labels, read_samples, sampling_labels
from src.utils.validate import positive_int

log = logging.getLogger(__name__)

METRICS = {
    "nll": "the variational bound in bits/dim on a data split",
    "fd_digits_classifier": "digits classifier-feature Fréchet distance of samples to the test split (no download)",
    "swd": "sliced Wasserstein distance of samples to fresh points of the true 2-D distribution",
    "fid": "FID (and IS, KID) of samples against the training set with torch-fidelity (paper: 50k samples)",
    "progressive": "predicted x0 along sampling chains as a grid (paper Fig. 6)",
    "interpolation": "interpolation of test images in the diffused latent x_t (paper Fig. 8)",
    "nfe_curve": "sample quality against network evaluations for several samplers (the data's sample metric)",
    "class_accuracy": "how often the digits classifier names the class a conditional model's samples were drawn "
                      "for (classifier-free guidance), with the share of saturated pixels",
}


def check_counts(cfg: DictConfig) -> None:
    """The batch and sample counts of ``cfg``, checked before the checkpoint is loaded."""
    positive_int(cfg.get("num_batches"), "num_batches", allow_none=True, hint="null: the whole split")
    positive_int(cfg.batch_size, "batch_size")
    positive_int(cfg.num_samples, "num_samples")
    positive_int(cfg.sample_batch_size, "sample_batch_size")


# metrics that several processes share (devices > 1); the others run on one device
SHARED = ("nll", "fd_digits_classifier", "swd", "fid", "class_accuracy")


def run_metric(cfg: DictConfig, module, procs: Processes, out_dir: Path, ckpt_path: Path) -> dict:
    """``cfg.metric`` of ``module``, its files written into ``out_dir``; the summary for metrics.json (rank 0;
    the other ranks get an empty dict)."""
    data = RunData(module.run_config.get("data", {}), int(cfg.batch_size), cfg.get("data_overrides"))
    seed, rows, columns, device = int(cfg.seed), int(cfg.figure.rows), int(cfg.figure.columns), procs.device
    if cfg.metric == "nll":
        return nll_metric(module, data.loader(cfg.split), device, out_dir, split=cfg.split, seed=seed,
                          num_batches=cfg.num_batches, clip_denoised=bool(cfg.clip_denoised),
                          progress=bool(cfg.progress), procs=procs)
    if cfg.metric == "progressive":
        return progressive_figure(module, device, out_dir, rows=rows, columns=columns, seed=seed)
    if cfg.metric == "interpolation":
        return interpolation_figure(module, data.loader(cfg.split), device, out_dir, split=cfg.split, rows=rows,
                                    columns=columns, interp_t=cfg.figure.interp_t, seed=seed)
    if cfg.metric == "nfe_curve":
        return nfe_curve_metric(cfg, module, device, data, out_dir)
    return sample_metric(cfg, module, procs, data, out_dir, ckpt_path)


def nfe_curve_metric(cfg: DictConfig, module, device: torch.device, data: RunData, out_dir: Path) -> dict:
    """``metric=nfe_curve``: the data's sample metric for each sampler and NFE budget of ``cfg.nfe_curve``."""
    curve = cfg.nfe_curve
    metric = curve.metric if curve.metric != "auto" else data_sample_metric(data.config)

    def score(samples: torch.Tensor, seed: int) -> dict:
        if metric == "fid":
            options = {k: v for k, v in OmegaConf.to_container(cfg.fid, resolve=True).items() if k != "samples"}
            return evaluate_fid(samples, device=device, datamodule=data.datamodule, seed=seed, **options)
        return sample_quality(metric, samples, data.config, seed=seed)

    return nfe_curve(module, device, out_dir, score, metric, samplers=list(curve.samplers), nfe=list(curve.nfe),
                     baseline=curve.baseline, seeds=list(curve.seeds), num_samples=int(cfg.num_samples),
                     batch_size=int(cfg.sample_batch_size), precision=str(cfg.get("precision", "fp32")),
                     progress=bool(cfg.progress))


def sample_metric(cfg: DictConfig, module, procs: Processes, data: RunData, out_dir: Path, ckpt_path: Path) -> dict:
    """A metric of samples given as ``fid.samples`` (fid) or ``samples_path``, or drawn now with ``cfg.sampler``
    into ``out_dir`` (shards over the processes, resumable like src.sample, merged into samples.npz)."""
    given = (cfg.fid.samples if cfg.metric == "fid" else None) or cfg.get("samples_path")
    seconds = 0.0
    if not given:
        run = sample_settings(cfg, resolve_precision(cfg.get("precision", "fp32"), procs.device),
                              batch_key="sample_batch_size")
        sampler = build_sampler(cfg.sampler)
        check_sampler(sampler, module.diffusion)
        labels = sampling_labels(module, run.num_samples, run.class_label, run.guidance_scale, ckpt_path=ckpt_path)
        start = time.perf_counter()
        given = str(sample_to_folder(run, procs, module, sampler, labels, ckpt_path, out_dir))
        seconds = time.perf_counter() - start
    if not procs.is_main:
        return {}
    if cfg.metric == "fid":
        options = {k: v for k, v in OmegaConf.to_container(cfg.fid, resolve=True).items() if k != "samples"}
        summary = evaluate_fid(given, device=procs.device, datamodule=data.datamodule, seed=int(cfg.seed),
                               sampling_seconds=seconds, **options)  # read from disk a window at a time
    elif cfg.metric == "class_accuracy":
        samples = read_samples(given)
        summary = ({"num_samples": len(samples), "sampling_seconds": seconds}
                   | class_accuracy(samples, read_labels(given), data.config))
    else:
        summary = sample_quality(cfg.metric, read_samples(given), data.config, seed=int(cfg.seed),
                                 sampling_seconds=seconds)
    sampler_info = {} if seconds == 0.0 else {"sampler": OmegaConf.to_container(cfg.sampler)}
    if seconds and (cfg.get("class_label") is not None or float(cfg.get("guidance_scale", 1.0)) != 1.0):
        sampler_info |= {"class_label": cfg.get("class_label"), "guidance_scale": float(cfg.guidance_scale)}
    log.info("%s: %s", cfg.metric, (summary | sampler_info) if cfg.metric == "fid" else summary)
    return summary | sampler_info


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.metric not in METRICS:
        raise ValueError(f"unknown metric {cfg.metric!r}: valid metrics are "
                         + "; ".join(f"{k} ({v})" for k, v in METRICS.items()))
    check_counts(cfg)
    if str(cfg.get("devices", 1)) != "1" and cfg.metric not in SHARED:
        raise ValueError(f"metric={cfg.metric} runs on one device: devices={cfg.devices} applies to "
                         f"{', '.join(SHARED)}; drop devices")
    sampled = ("fd_digits_classifier", "swd", "fid", "class_accuracy")
    for key, default in (("class_label", None), ("guidance_scale", 1.0)):
        if cfg.metric not in sampled and cfg.get(key, default) != default:
            raise ValueError(f"{key}={cfg.get(key)} applies to the metrics that draw samples ({', '.join(sampled)}), "
                             f"not to metric={cfg.metric}: drop {key}")
    procs = start_processes(cfg.get("devices", 1), cfg.device, cfg.get("num_nodes", 1), cfg.get("strategy", "auto"))
    ckpt_path = find_checkpoint(cfg.ckpt_path, key="ckpt_path")
    module = load_module(ckpt_path, map_location=procs.device, weights=cfg.weights, compile=cfg.get("compile"),
                         compile_options=cfg.get("compile_options")).to(procs.device)
    out_dir = Path(cfg.get("output_dir") or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    if procs.is_main:
        log.info("checkpoint %s (%s weights) on %s x %d", ckpt_path, cfg.weights, procs.device, procs.world_size)
        out_dir.mkdir(parents=True, exist_ok=True)
    summary = run_metric(cfg, module, procs, out_dir, ckpt_path)
    if not procs.is_main:
        return summary
    summary |= {"metric": cfg.metric, "weights": cfg.weights, "ckpt_path": str(ckpt_path)}
    if cfg.metric in ("nll", "interpolation"):
        summary["split"] = cfg.split
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
    send_to_loggers(cfg, summary, out_dir)
    log.info("outputs in %s", out_dir)
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> float:
    from src.utils.process import prepare_process
    from src.utils.run_folder import mark_progress

    prepare_process(processes=int(cfg.devices) if str(cfg.get("devices", 1)).isdigit() else 1)
    summary = evaluate(cfg)
    mark_progress()
    return summary.get("nll_bpd", summary.get(cfg.metric))


if __name__ == "__main__":
    main()
