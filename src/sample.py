"""Sample a trained DDPM: `python -m src.sample ckpt_path=<.ckpt or run folder> num_samples=N [sampler=ddim]`.

Also `sampler.steps=50 sampler.eta=0.0`, `batch_size=`, `seed=`, `weights=ema|raw`, `device=auto|cpu|cuda[:N]|mps`
(see configs/sample.yaml). A run folder of `src.train` as `ckpt_path` means its `checkpoints/last.ckpt`.
Writes `samples/*.png`, `samples.npz` and `grid.png` (2-D points: `scatter.png`) into the run folder
(`outputs/sample/runs/<time>/` by default; see src/utils/sampling.py).

Class-conditional checkpoints (trained with `conditional=true`): `class_label=3` draws class 3 only, null cycles
through all classes (sample i has class i mod K; grid.png then shows one class per column), and
`guidance_scale=s` applies classifier-free guidance (1: plain conditional; see src/diffusion/guidance.py). The
labels are saved in `samples.npz` under `labels` (int64, N).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from src.utils.checkpoint import find_checkpoint, load_module
from src.utils.device import resolve_device
from src.utils.precision import resolve_precision
from src.utils.sampling import build_sampler, check_sampler, draw, sampling_labels, write_samples
from src.utils.validate import positive_int

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> Path:
    """Load the checkpoint, draw ``cfg.num_samples`` with ``cfg.sampler``, write them; returns the npz."""
    num_samples, batch_size = positive_int(cfg.num_samples, "num_samples"), positive_int(cfg.batch_size, "batch_size")
    device = resolve_device(cfg.device, key="device")
    sampler = build_sampler(cfg.sampler)
    ckpt_path = find_checkpoint(cfg.ckpt_path, key="ckpt_path")
    module = load_module(ckpt_path, map_location="cpu", weights=cfg.weights, compile=cfg.get("compile"),
                         compile_options=cfg.get("compile_options")).to(device)
    check_sampler(sampler, module.diffusion)
    log.info("checkpoint %s (%s weights): data shape %s, %s; sampler %s on %s", ckpt_path, cfg.weights,
             module.data_shape, module.diffusion, sampler, device)
    class_label, guidance_scale = cfg.get("class_label"), float(cfg.get("guidance_scale", 1.0))
    labels = sampling_labels(module, num_samples, class_label, guidance_scale, ckpt_path=cfg.ckpt_path)
    if labels is not None:
        log.info("class-conditional: %s, guidance_scale %s",
                 "all classes in turn" if class_label is None else f"class {class_label}", guidance_scale)
    precision = str(cfg.get("precision", "fp32"))
    log.info("network precision: %s (precision=%s)", resolve_precision(precision, device), precision)
    # one CPU generator seeded once: samples depend on seed and batch_size, not on the device
    generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    samples = draw(module, sampler, num_samples, batch_size, generator, device, progress=bool(cfg.progress),
                   labels=labels, guidance_scale=guidance_scale, precision=precision)
    cycled = labels is not None and class_label is None
    npz = write_samples(samples, Path(cfg.paths.output_dir), module, seed=int(cfg.seed), labels=labels,
                        grid_nrow=int(module.net.num_classes) if cycled else None)
    log.info("%d samples written to %s", len(samples), npz)
    return npz


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample.yaml")
def main(cfg: DictConfig) -> Path:
    from src.utils.process import prepare_process
    from src.utils.run_folder import mark_progress

    prepare_process()
    npz = sample(cfg)
    mark_progress()
    return npz


if __name__ == "__main__":
    main()
