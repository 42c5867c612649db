"""Sample a trained DDPM: `python -m src.sample ckpt_path=<.ckpt or run folder> num_samples=N [sampler=ddim]`.

Also `sampler.steps=50 sampler.eta=0.0`, `batch_size=`, `seed=`, `weights=ema|raw`, `device=auto|cpu|cuda[:N]|mps`
(see configs/sample.yaml). A run folder of `src.train` as `ckpt_path` means its `checkpoints/last.ckpt`.

Writes into the run folder (`outputs/sample/runs/<time>/` by default):
- images: `samples/000000.png ...` (one PNG per sample, at the data's resolution), `samples.npz` (key
  `samples`, uint8 N x H x W x C, the layout FID tools expect) and `grid.png` (the first samples, enlarged: see
  `src.utils.images.image_grid`);
- 2-D points (data shape (D,)): `samples.npz` (key `samples`, float32 N x D) and `scatter.png`.

Class-conditional checkpoints (trained with `conditional=true`): `class_label=3` draws class 3 only, null cycles
through all classes (sample i has class i mod K; grid.png then shows one class per column), and
`guidance_scale=s` applies classifier-free guidance (1: plain conditional; see src/diffusion/guidance.py). The
labels are saved in `samples.npz` under `labels` (int64, N).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from src.diffusion.guidance import conditional_model
from src.diffusion.samplers import SAMPLERS, resolve_timesteps
from src.models.ddpm_module import DDPMModule
from src.utils.checkpoint import find_checkpoint, load_module
from src.utils.device import resolve_device
from src.utils.images import image_grid, save_png, scatter_image, to_uint8
from src.utils.precision import network_precision, resolve_precision
from src.utils.progress import track
from src.utils.validate import positive_int

log = logging.getLogger(__name__)

GRID_MAX = 100  # grid.png shows at most this many samples


def make_sampler(sampler_cfg: DictConfig, num_timesteps: int) -> Callable[..., Tensor]:
    """Check the ``sampler`` config node against T and return the sampler with its settings bound.

    The result is called as ``fn(diffusion, model, shape, generator=, progress=, clip_denoised=, device=)``.
    """
    name = sampler_cfg.get("name")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (sampler.name): valid values are {', '.join(SAMPLERS)}")
    steps = sampler_cfg.get("steps")
    if isinstance(steps, ListConfig | list | tuple):
        # a list on the command line means section counts, like the string "10,15,20"
        steps = ",".join(str(int(c)) for c in steps)
    try:
        kept = resolve_timesteps(num_timesteps, steps)
    except ValueError as err:
        raise ValueError(f"sampler.steps={steps!r} does not fit this checkpoint (T={num_timesteps}): "
                         f"{err}") from err
    if name == "ddpm":
        if len(kept) < 2:
            raise ValueError(f"sampler.steps={steps!r} keeps {len(kept)} step; ancestral sampling needs at "
                             "least 2 (use sampler=ddim for a single step)")
        return functools.partial(SAMPLERS[name], steps=steps)
    eta = float(sampler_cfg.get("eta", 0.0))
    if eta < 0:
        raise ValueError(f"sampler.eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta}")
    return functools.partial(SAMPLERS[name], steps=steps, eta=eta)


def draw(module: DDPMModule, sampler: Callable[..., Tensor], num_samples: int, batch_size: int,
         generator: torch.Generator, device: torch.device, progress: bool = False, labels: Tensor | None = None,
         guidance_scale: float = 1.0, precision: str = "fp32") -> Tensor:
    """Draw ``num_samples`` in batches of ``batch_size``; returns them on the CPU as (N, *data_shape).

    ``labels`` (N,): class labels for a conditional model, sampled with classifier-free guidance scale
    ``guidance_scale`` (None: the model as it is, unconditional). ``precision``: the network's precision
    (``fp32``, ``bf16`` autocast, or ``auto``; see ``src.utils.precision``).
    """
    if module.data_shape is None:
        raise RuntimeError("the checkpoint does not record the data shape (ddpm_data_shape); re-save it with "
                           "`python -m src.train`")
    batches = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    out = []
    # the sampler's per-step progress nests under this one (a bar below it; silent as log lines)
    with track(total=num_samples, desc="samples", unit="samples", enabled=progress) as bar:
        for start, n in zip(range(0, num_samples, batch_size), batches, strict=True):
            batch_labels = None if labels is None else labels[start:start + n].to(device)
            model = conditional_model(module.net, batch_labels, guidance_scale)
            # inference_mode: no autograd bookkeeping at all (cheaper than no_grad per op)
            with torch.inference_mode(), network_precision(precision, device):
                x = sampler(module.diffusion, model, (n, *module.data_shape), generator=generator,
                            progress=progress, clip_denoised=module.clip_denoised, device=device)
            out.append(x.float().cpu())
            bar.update(n)
    return torch.cat(out)


def _reference_points(module: DDPMModule, n: int, seed: int) -> Tensor | None:
    """Points of the training distribution, when the run's data module can draw them (toy2d)."""
    data_cfg = (module.run_config or {}).get("data")
    if not data_cfg:
        return None
    try:
        datamodule = instantiate(OmegaConf.create(data_cfg))
        if not hasattr(datamodule, "sample_reference"):
            return None
        return datamodule.sample_reference(n, seed=seed)
    except Exception as err:  # the grey reference cloud is decoration: never fail the run for it
        log.warning("no reference points for the scatter plot (%s: %s)", type(err).__name__, err)
        return None


def write_samples(samples: Tensor, out_dir: Path, module: DDPMModule, seed: int = 0, labels: Tensor | None = None,
                  grid_nrow: int | None = None) -> Path:
    """Write the samples (N, C, H, W) or (N, D) as described in the module docstring; returns the npz path.

    ``labels`` (N,), for conditional samples, go into the npz as ``labels``; ``grid_nrow`` is the number of
    images per row of grid.png (default: a square).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "samples.npz"
    extra = {} if labels is None else {"labels": labels.cpu().numpy().astype(np.int64)}
    if samples.dim() == 2:
        np.savez(npz, samples=samples.numpy().astype(np.float32), **extra)
        if samples.shape[1] == 2:
            reference = _reference_points(module, max(len(samples), 1000), seed)
            image = scatter_image(samples, reference, title=f"{len(samples)} samples")
            save_png(image, out_dir / "scatter.png")
        return npz
    images = to_uint8(samples)  # (N, C, H, W); clips to [-1, 1]
    np.savez(npz, samples=images.permute(0, 2, 3, 1).contiguous().numpy(), **extra)
    # one PNG per sample at the data's own resolution, not enlarged: these are what FID tools read
    for i, image in enumerate(images):
        save_png(image, out_dir / "samples" / f"{i:06d}.png")
    save_png(image_grid(samples[:GRID_MAX], nrow=grid_nrow), out_dir / "grid.png")  # enlarged for people
    return npz


def sampling_labels(cfg: DictConfig, module: DDPMModule, num_samples: int) -> Tensor | None:
    """The class labels to sample with (``cfg.class_label``), or None for an unconditional checkpoint."""
    class_label = cfg.get("class_label")
    guidance_scale = float(cfg.get("guidance_scale", 1.0))
    num_classes = getattr(module.net, "num_classes", None)
    if num_classes is None:
        for key, value, default in (("class_label", class_label, None), ("guidance_scale", guidance_scale, 1.0)):
            if value != default:
                raise ValueError(f"{key}={value} needs a class-conditional checkpoint, but {cfg.ckpt_path} is "
                                 f"unconditional (trained without conditional=true): drop {key}")
        return None
    if class_label is None:
        return torch.arange(num_samples) % num_classes  # every class in turn
    if isinstance(class_label, bool) or not isinstance(class_label, int) or not 0 <= class_label < num_classes:
        raise ValueError(f"class_label={class_label!r} is not a class of this checkpoint: use an int in "
                         f"[0, {num_classes - 1}], or null for all classes in turn")
    return torch.full((num_samples,), class_label, dtype=torch.long)


def sample(cfg: DictConfig) -> Path:
    """Load the checkpoint, draw ``cfg.num_samples`` with ``cfg.sampler``, write them; returns the npz."""
    num_samples, batch_size = positive_int(cfg.num_samples, "num_samples"), positive_int(cfg.batch_size, "batch_size")
    device = resolve_device(cfg.device, key="device")
    ckpt_path = find_checkpoint(cfg.ckpt_path, key="ckpt_path")
    module = load_module(ckpt_path, map_location="cpu", weights=cfg.weights, compile=cfg.get("compile"),
                         compile_options=cfg.get("compile_options")).to(device)
    diffusion = module.diffusion
    sampler = make_sampler(cfg.sampler, diffusion.num_timesteps)
    log.info("checkpoint %s (%s weights): data shape %s, %s; sampler %s on %s", ckpt_path, cfg.weights,
             module.data_shape, diffusion, OmegaConf.to_container(cfg.sampler), device)
    # one CPU generator seeded once: samples depend on seed and batch_size, not on the device
    generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    labels = sampling_labels(cfg, module, num_samples)
    guidance_scale = float(cfg.get("guidance_scale", 1.0))
    if labels is not None:
        log.info("class-conditional: %s, guidance_scale %s",
                 "all classes in turn" if cfg.get("class_label") is None else f"class {cfg.class_label}",
                 guidance_scale)
    precision = str(cfg.get("precision", "fp32"))
    log.info("network precision: %s (precision=%s)", resolve_precision(precision, device), precision)
    samples = draw(module, sampler, num_samples, batch_size, generator, device,
                   progress=bool(cfg.progress), labels=labels, guidance_scale=guidance_scale, precision=precision)
    if module.clip_denoised:
        samples = samples.clamp(-1.0, 1.0)  # bounded data (images): the same range the reference code writes
    cycled = labels is not None and cfg.get("class_label") is None
    npz = write_samples(samples, Path(cfg.paths.output_dir), module, seed=int(cfg.seed), labels=labels,
                        grid_nrow=int(module.net.num_classes) if cycled else None)
    log.info("%d samples written to %s", len(samples), npz)
    return npz


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample.yaml")
def main(cfg: DictConfig) -> Path:
    from src.utils.quiet import silence_library_noise
    from src.utils.run_folder import mark_progress
    from src.utils.threads import configure_threads

    silence_library_noise()
    configure_threads()
    npz = sample(cfg)
    mark_progress()
    return npz


if __name__ == "__main__":
    main()
