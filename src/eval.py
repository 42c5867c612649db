"""Evaluate a trained model: `python -m src.eval ckpt_path=<.ckpt or run folder> metric=nll` (see configs/eval.yaml).

A run folder of `src.train` as `ckpt_path` means its `checkpoints/last.ckpt`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.utils.checkpoint import find_checkpoint, load_module
from src.utils.device import resolve_device
from src.utils.files import atomic_write_text
from src.utils.images import to_uint8
from src.utils.progress import track
from src.utils.sampling import build_sampler, check_sampler, draw, read_samples
from src.utils.validate import positive_int

log = logging.getLogger(__name__)

METRICS = {
    "nll": "the variational bound in bits/dim on a data split",
    "fd_digits_classifier": "digits classifier-feature Fréchet distance of samples to the test split (no download)",
    "swd": "sliced Wasserstein distance of samples to fresh points of the true 2-D distribution",
    "fid": "FID (and IS, KID) of samples against the training set with torch-fidelity (paper: 50k samples)",
    "progressive": "predicted x0 along sampling chains as a grid (paper Fig. 6)",
    "interpolation": "interpolation of test images in the diffused latent x_t (paper Fig. 8)",
}


def to_8bit_grid(x: torch.Tensor) -> torch.Tensor:
    """Snap data in [-1, 1] to the 256-level grid the discretized decoder assumes (v/127.5 - 1)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def make_datamodule(module, cfg: DictConfig):
    data_cfg = OmegaConf.create(module.run_config["data"])
    data_cfg = OmegaConf.merge(data_cfg, cfg.get("data_overrides") or {})
    data_cfg.batch_size = cfg.batch_size
    return instantiate(data_cfg)


def split_loader(datamodule, split: str):
    loaders = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
    if split not in loaders:
        raise ValueError(f"split must be one of {', '.join(loaders)}, got {split!r}")
    datamodule.prepare_data()
    datamodule.setup("fit" if split != "test" else "test")
    return getattr(datamodule, loaders[split])()


def evaluate_nll(module, loader, cfg: DictConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Bits/dim over a loader: the mean total bound and the mean per-timestep terms and x0 errors."""
    if module.data_shape is None or len(module.data_shape) != 3:
        raise ValueError("metric=nll needs 8-bit image data; this checkpoint models "
                         f"data of shape {module.data_shape}")
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    if cfg.num_batches is not None:
        total = min(total, int(cfg.num_batches)) if total is not None else int(cfg.num_batches)
    # the per-batch bits/dim progress nests under this one
    with track(total=total, desc="nll", unit="batches", enabled=bool(cfg.progress)) as bar:
        for i, (x, _) in enumerate(loader):
            if cfg.num_batches is not None and i >= cfg.num_batches:
                break
            x0 = to_8bit_grid(x.to(device))
            out = module.diffusion.bits_per_dim(module.net, x0, generator=generator, progress=cfg.progress,
                                                clip_denoised=cfg.clip_denoised)
            for key in ("total", "prior", "terms", "mse"):
                sums[key] = sums.get(key, 0) + out[key].double().sum(dim=0).cpu()
            count += x0.shape[0]
            log.info("batch %d: %d images, running NLL %.4f bits/dim", i, count, (sums["total"] / count).item())
            bar.update(1)
    if count == 0:
        raise ValueError(f"the {cfg.split} split is empty: choose another split=")
    return {k: v / count for k, v in sums.items()} | {"count": torch.tensor(count)}


def rate_distortion(terms: torch.Tensor, prior: torch.Tensor, mse: torch.Tensor) -> list[dict[str, float]]:
    """Paper Fig. 5 / Table 4: after receiving x_t (paper t = index + 1), rate = L_T + sum_{s >= t} L_s in
    bits/dim and distortion = RMSE of the predicted x0 on the [0, 255] scale."""
    # code term[i] is the paper's L_i (term[0] = L_0, the decoder); the receiver holding x_t has paid for
    # L_T and the KL terms L_{T-1} .. L_t, i.e. code terms i >= t.
    tail = torch.flip(torch.cumsum(torch.flip(terms, [0]), 0), [0])
    rows = []
    for i in range(terms.shape[0]):
        t = i + 1
        rate = prior.item() + (tail[t].item() if t < terms.shape[0] else 0.0)
        rows.append({"t": t, "term_bpd": terms[i].item(), "rate_bpd": rate,
                     "distortion_rmse": 127.5 * math.sqrt(mse[i].item())})
    return rows


def write_nll_outputs(result: dict[str, torch.Tensor], out_dir: Path) -> dict[str, float]:
    rows = rate_distortion(result["terms"], result["prior"], result["mse"])
    with open(out_dir / "nll_terms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "nll_bpd": result["total"].item(),
        "prior_bpd": result["prior"].item(),
        "decoder_bpd": result["terms"][0].item(),
        "kl_terms_bpd": result["terms"][1:].sum().item(),
        "num_images": int(result["count"]),
    }
    _plot_terms(rows, out_dir / "nll_terms.png")
    return summary


def _plot_terms(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.semilogy(t, [max(r["term_bpd"], 1e-12) for r in rows])
    a.set(xlabel="t", ylabel="L_{t-1} (bits/dim)", title="per-timestep terms")
    b.plot([r["rate_bpd"] for r in rows], [r["distortion_rmse"] for r in rows])
    b.set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, [0,255])", title="rate-distortion")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def get_samples(module, cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """Samples in [-1, 1] (N, *data_shape): read from ``samples_path`` (an npz of src.sample) or drawn now."""
    if cfg.get("samples_path"):
        return read_samples(cfg.samples_path), 0.0
    sampler = build_sampler(cfg.sampler)
    check_sampler(sampler, module.diffusion)
    generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    start = time.perf_counter()
    samples = draw(module, sampler, int(cfg.num_samples), int(cfg.sample_batch_size), generator, device,
                   progress=bool(cfg.progress), precision=str(cfg.get("precision", "fp32")))
    return samples, time.perf_counter() - start


def evaluate_sample_quality(module, cfg: DictConfig, device: torch.device) -> dict[str, float]:
    data_cfg = (module.run_config or {}).get("data", {})
    samples, seconds = get_samples(module, cfg, device)
    summary: dict[str, float] = {"num_samples": len(samples), "sampling_seconds": seconds}
    if cfg.metric == "fd_digits_classifier":
        from src.metrics import DigitsFrechetDistance

        if not str(data_cfg.get("_target_", "")).endswith("DigitsDataModule") or tuple(samples.shape[1:]) != (1, 8, 8):
            raise ValueError("metric=fd_digits_classifier needs a model of the 8x8 digits data; this checkpoint "
                             f"models {data_cfg.get('_target_')} of shape {tuple(samples.shape[1:])}")
        # the real data on the 8-bit grid, as the samples are
        fd = DigitsFrechetDistance(split="test", seed=int(data_cfg.get("seed", 0)))
        summary["fd_digits_classifier"] = fd(to_uint8(samples).float() / 127.5 - 1)
        summary["fd_digits_classifier_real_floor"] = fd.reference_fd_of_real_data(len(samples), seed=int(cfg.seed))
    elif cfg.metric == "swd":
        from src.data.base import BaseDataModule
        from src.metrics import sliced_wasserstein_distance

        datamodule = instantiate(OmegaConf.create(data_cfg))
        has_reference = isinstance(datamodule, BaseDataModule) and datamodule.has_reference_distribution
        if not has_reference or samples.dim() != 2:
            raise ValueError("metric=swd needs a model of 2-D toy data (data=toy2d)")
        gen = torch.Generator().manual_seed(int(cfg.seed))
        reference = datamodule.sample_reference(len(samples), seed=int(cfg.seed))
        summary["swd"] = sliced_wasserstein_distance(samples, reference, generator=gen)
        summary["swd_real_floor"] = sliced_wasserstein_distance(
            datamodule.sample_reference(len(samples), seed=int(cfg.seed) + 1), reference, generator=gen)
    return summary


def figure_labels(metric: str, info: dict) -> tuple[list[str], str]:
    """Column labels and title of the ``progressive`` or ``interpolation`` figure, from ``make_figure``'s info."""
    if metric == "progressive":
        return [f"t={t}" for t in info["paper_timesteps"]], "predicted x0 at timestep t (a chain per row)"
    lambdas = [f"λ={round(lam, 2):g}" for lam in info["lambdas"]]
    return ["x0", *lambdas, "x0'"], f"(1-λ)·x_t + λ·x_t' at t={info['interp_t']}, decoded"


def make_figure(module, cfg: DictConfig, device: torch.device, out_dir: Path) -> dict[str, float]:
    """Progressive generation or interpolation, written as a labelled grid PNG (rows: chains or pairs) and an npz."""
    from src.diffusion.paper_figures import interpolate, progressive_generation
    from src.utils.images import labelled_grid, save_png

    if module.data_shape is None or len(module.data_shape) != 3:
        raise ValueError(f"metric={cfg.metric} draws images; this checkpoint models data of shape {module.data_shape}")
    T = module.diffusion.num_timesteps
    rows = int(cfg.figure.rows)
    if cfg.metric == "progressive":
        every = max(1, T // int(cfg.figure.columns))
        generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        frames, steps = progressive_generation(module.diffusion, module.net, (rows, *module.data_shape), every,
                                               generator=generator, device=device,
                                               clip_denoised=module.clip_denoised)
        info = {"paper_timesteps": steps}
    else:
        datamodule = make_datamodule(module, cfg)
        x, _ = next(iter(split_loader(datamodule, cfg.split)))
        if len(x) < 2 * rows:
            raise ValueError(f"the {cfg.split} split has {len(x)} images in a batch; interpolation needs {2 * rows}")
        a, b = x[:rows].to(device), x[rows:2 * rows].to(device)
        t = (int(cfg.figure.interp_t) if cfg.figure.interp_t is not None else T // 2) - 1
        lambdas = torch.linspace(0, 1, int(cfg.figure.columns)).tolist()
        mixed = interpolate(module.diffusion, module.net, a, b, t, lambdas, seed=int(cfg.seed),
                            clip_denoised=module.clip_denoised)
        frames = torch.cat([a[None], mixed, b[None]])  # originals at both ends of each row
        info = {"lambdas": lambdas, "interp_t": t + 1}
    labels, title = figure_labels(cfg.metric, info)
    image = labelled_grid(frames.transpose(0, 1).flatten(0, 1).float().cpu(), nrow=frames.shape[0], labels=labels,
                          title=title)
    save_png(image, out_dir / f"{cfg.metric}.png")
    np.savez(out_dir / f"{cfg.metric}.npz", frames=to_uint8(frames.cpu()).numpy())
    log.info("%s grid (%d rows x %d columns) written to %s", cfg.metric, rows, frames.shape[0], out_dir)
    return info


def evaluate_fid(module, cfg: DictConfig, device: torch.device, out_dir: Path) -> dict[str, float]:
    """FID/IS/KID with torch-fidelity: samples from ``fid.samples`` (folder or npz) or drawn now."""
    from src.metrics.fidelity import compute_fidelity

    fid_cfg = cfg.fid
    seconds = 0.0
    if fid_cfg.samples:
        samples = fid_cfg.samples
    else:
        drawn, seconds = get_samples(module, cfg, device)
        samples = to_uint8(drawn).permute(0, 2, 3, 1).contiguous()
    reference = fid_cfg.reference
    split = "train"
    if reference in ("train", "test"):
        split, reference = reference, make_datamodule(module, cfg)
    result = compute_fidelity(
        samples, reference, metrics=tuple(fid_cfg.metrics), weights_path=fid_cfg.weights_path,
        cache_root=fid_cfg.cache_dir, device=device, batch_size=int(fid_cfg.batch_size),
        kid_subset_size=int(fid_cfg.kid_subset_size), max_reference=int(fid_cfg.max_reference),
        seed=int(cfg.seed), feature=int(fid_cfg.feature), reference_split=split,
    )
    return {**result, "num_samples": len(samples) if not isinstance(samples, str) else None,
            "sampling_seconds": seconds, "reference": str(fid_cfg.reference)}


def check_counts(cfg: DictConfig) -> None:
    """The batch and sample counts of ``cfg``, checked before the checkpoint is loaded."""
    positive_int(cfg.get("num_batches"), "num_batches", allow_none=True, hint="null: the whole split")
    positive_int(cfg.batch_size, "batch_size")
    positive_int(cfg.num_samples, "num_samples")
    positive_int(cfg.sample_batch_size, "sample_batch_size")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.metric not in METRICS:
        raise ValueError(f"unknown metric {cfg.metric!r}: valid metrics are "
                         + "; ".join(f"{k} ({v})" for k, v in METRICS.items()))
    check_counts(cfg)
    device = resolve_device(cfg.device, key="device")
    ckpt_path = find_checkpoint(cfg.ckpt_path, key="ckpt_path")
    module = load_module(ckpt_path, map_location=device, weights=cfg.weights, compile=cfg.get("compile"),
                         compile_options=cfg.get("compile_options")).to(device)
    log.info("checkpoint %s (%s weights) on %s", ckpt_path, cfg.weights, device)
    out_dir = Path(cfg.get("output_dir") or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.metric == "nll":
        loader = split_loader(make_datamodule(module, cfg), cfg.split)
        with torch.no_grad():
            result = evaluate_nll(module, loader, cfg, device)
        summary = write_nll_outputs(result, out_dir)
        log.info("NLL on %s (%d images): %.4f bits/dim (decoder %.4f, prior %.2e)", cfg.split,
                 summary["num_images"], summary["nll_bpd"], summary["decoder_bpd"], summary["prior_bpd"])
    elif cfg.metric == "fid":
        summary = evaluate_fid(module, cfg, device, out_dir)
        if not cfg.fid.samples:
            summary["sampler"] = OmegaConf.to_container(cfg.sampler)
        log.info("fid: %s", summary)
    elif cfg.metric in ("progressive", "interpolation"):
        summary = make_figure(module, cfg, device, out_dir)
    else:
        summary = evaluate_sample_quality(module, cfg, device)
        summary["sampler"] = OmegaConf.to_container(cfg.sampler)
        log.info("%s: %s", cfg.metric, {k: v for k, v in summary.items() if k != "sampler"})
    summary |= {"metric": cfg.metric, "weights": cfg.weights, "ckpt_path": str(ckpt_path)}
    if cfg.metric in ("nll", "interpolation"):
        summary["split"] = cfg.split
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
    send_to_loggers(cfg, summary, out_dir)
    log.info("outputs in %s", out_dir)
    return summary


def send_to_loggers(cfg: DictConfig, summary: dict, out_dir: Path) -> None:
    """Log the numbers (as ``eval/<name>``) and the figures written to ``out_dir`` to the configured loggers."""
    from PIL import Image

    from src.utils.images import log_image
    from src.utils.instantiate import instantiate_loggers
    from src.utils.loggers import finish_wandb, log_hyperparams

    loggers = instantiate_loggers(cfg.get("logger"))
    if not loggers:
        return
    numbers = {f"eval/{k}": float(v) for k, v in summary.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and v is not None}
    for logger in loggers:
        log_hyperparams(logger, OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(numbers, step=0)
        for png in sorted(out_dir.glob("*.png")):
            image = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"))).permute(2, 0, 1)
            log_image([logger], f"eval/{png.stem}", image, step=0)
        logger.save()
    finish_wandb(loggers)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> float:
    from src.utils.quiet import silence_library_noise
    from src.utils.run_folder import mark_progress
    from src.utils.threads import configure_threads

    silence_library_noise()
    configure_threads()
    summary = evaluate(cfg)
    mark_progress()
    return summary.get("nll_bpd", summary.get(cfg.metric))


if __name__ == "__main__":
    main()
