"""Drawing samples from a model with a sampler, in batches, and writing them: shared by src.sample, src.eval,
the training callbacks (sample grids, FID) and src.bench.

Seeds: sample k of a run seeded ``seed`` takes its x_T and every later noise draw from its own generator, seeded by
(``seed``, k) (``src.diffusion.noise.SampleNoise``), so sample k does not depend on which batch, process or
order it is drawn in. Its bits can still depend on the batch size, through the network: CPU and GPU kernels pick
their blocking by the number of rows, which moves float round-off (~1e-6). ``network_batch`` removes that too: the
network then always sees exactly that many rows (``FixedBatchNet``), and sample k is bit for bit the same for any
``batch_size``.

``write_samples`` writes into a folder:
- images: ``samples/000000.png ...`` (one PNG per sample, at the data's resolution), ``samples.npz`` (key
  ``samples``, uint8 N x H x W x C, the layout FID tools expect) and ``grid.png`` (the first samples, enlarged: see
  ``src.utils.images.image_grid``);
- 2-D points (data shape (D,)): ``samples.npz`` (key ``samples``, float32 N x D) and ``scatter.png``;
- class-conditional samples: their labels in ``samples.npz`` under ``labels`` (int64, N).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from src.diffusion.gaussian_diffusion import GaussianDiffusion, Model, randn
from src.diffusion.guidance import conditional_model
from src.diffusion.noise import SampleNoise
from src.diffusion.samplers import Sampler
from src.utils.images import image_grid, save_png, scatter_image, to_uint8
from src.utils.precision import network_precision
from src.utils.progress import track

if TYPE_CHECKING:
    from src.models.ddpm_module import DDPMModule

log = logging.getLogger(__name__)

GRID_MAX = 100  # grid.png shows at most this many samples


def build_sampler(node: DictConfig) -> Sampler:
    """The sampler a ``sampler`` config node selects by ``_target_`` (configs/sampler/*.yaml)."""
    sampler = instantiate(node)
    if not callable(sampler):
        raise ValueError(f"sampler={OmegaConf.to_container(node)} is not a sampler: sampler._target_ must name a "
                         "sampler class, e.g. src.diffusion.samplers.DDIM (see configs/sampler/)")
    return sampler


def check_sampler(sampler: Sampler, diffusion: GaussianDiffusion) -> None:
    """Refuse sampler settings that do not fit ``diffusion`` (T, parameterization) before any sampling."""
    check = getattr(sampler, "check", None)
    if check is not None:
        check(diffusion)


def sample_batch(sampler: Sampler, model: Model, diffusion: GaussianDiffusion, shape: tuple[int, ...],
                 generator: torch.Generator | SampleNoise | None = None, device: torch.device | str | None = None,
                 progress: bool = False, clip_denoised: bool = True) -> Tensor:
    """One batch of ``shape``: x_T from ``generator`` first, then ``sampler`` from it with the same generator."""
    x_T = randn(shape, generator=generator, device=device)
    return sampler(model, diffusion, x_T, generator=generator, progress=progress, clip_denoised=clip_denoised)


class FixedBatchNet(nn.Module):
    """``net`` called on exactly ``size`` rows at a time: a batch is cut into pieces of ``size`` and the last one
    padded (zeros; extra tensor arguments such as labels repeat their first row). Kernels choose their blocking by
    the number of rows, so a row's float round-off depends on the batch it came in; at a fixed row count it does
    not depend on the other rows or its position (checked in tests/utils/test_sampling_seeds.py), which makes
    every sample's bits independent of the caller's batch size."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, int(size)
        if hasattr(net, "num_classes"):
            self.num_classes = net.num_classes

    def forward(self, x: Tensor, t: Tensor, *args: Tensor) -> Tensor:
        n, size = x.shape[0], self.size
        if n == size:
            return self.net(x, t, *args)
        outputs = []
        for start in range(0, n, size):
            pieces = [a[start:start + size] for a in (x, t, *args)]
            short = size - pieces[0].shape[0]
            if short:
                pieces = [torch.cat([p, torch.zeros_like(p[:1]).expand(short, *p.shape[1:]) if i == 0
                                     else p[:1].expand(short, *p.shape[1:])]) for i, p in enumerate(pieces)]
            outputs.append(self.net(*pieces)[:size - short])
        return torch.cat(outputs)


@contextlib.contextmanager
def _eval_mode(net: Any) -> Iterator[None]:
    """Dropout off while sampling (training callbacks may find the net in train mode); the mode restored after."""
    if not isinstance(net, nn.Module):
        yield
        return
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def draw_batches(module: DDPMModule, sampler: Sampler, num_samples: int, batch_size: int, seed: int,
                 device: torch.device, progress: bool = False, labels: Tensor | None = None,
                 guidance_scale: float = 1.0, precision: str = "fp32", *, start: int = 0,
                 noise_device: str = "cpu", network_batch: int | None = None,
                 count_samples: bool = True) -> Iterator[Tensor]:
    """Draw samples ``start .. start + num_samples - 1`` of the run seeded ``seed`` in batches of ``batch_size``,
    yielding each batch on ``device`` as (n, *data_shape).

    ``module`` has ``net``, ``diffusion``, ``data_shape`` and ``clip_denoised`` (a ``DDPMModule``); samples of a
    ``clip_denoised`` model are clamped to [-1, 1]. ``labels`` (num_samples,): class labels for a conditional model,
    sampled with classifier-free guidance scale ``guidance_scale`` (None: the model as it is, unconditional).
    ``precision``: the network's precision (``fp32``, ``bf16`` autocast, or ``auto``; see src.utils.precision).
    ``noise_device``: where the per-sample generators draw (``cpu``: the same noise on every machine; ``device``:
    on ``device``). ``network_batch``: the network's fixed row count (see ``FixedBatchNet``; None: the batch).
    ``count_samples``: a progress report of samples (false: the caller keeps its own; the steps still show).
    """
    if module.data_shape is None:
        raise RuntimeError("the model does not record its data shape (ddpm_data_shape in a checkpoint; "
                           "DDPMModule(data_shape=...)); re-save it with `python -m src.train`")
    if noise_device not in ("cpu", "device"):
        raise ValueError(f"noise_device={noise_device!r}: use cpu (the same noise on every machine) or device "
                         "(drawn on the sampling device)")
    net = module.net if network_batch is None else FixedBatchNet(module.net, network_batch)
    # the sampler's per-step progress nests under this one (a bar below it; silent as log lines)
    with (track(total=num_samples, desc="samples", unit="samples", enabled=progress and count_samples) as bar,
          _eval_mode(module.net)):
        for offset in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - offset)
            batch_labels = None if labels is None else labels[offset:offset + n].to(device)
            model = conditional_model(net, batch_labels, guidance_scale)
            noise = SampleNoise(seed, range(start + offset, start + offset + n),
                                device=device if noise_device == "device" else "cpu")
            # inference_mode: no autograd bookkeeping at all (cheaper than no_grad per op)
            with torch.inference_mode(), network_precision(precision, device):
                x = sample_batch(sampler, model, module.diffusion, (n, *module.data_shape), noise, device,
                                 progress=progress, clip_denoised=module.clip_denoised)
            check_finite(x, start + offset, precision, guidance_scale if labels is not None else None)
            if module.clip_denoised:
                x = x.clamp(-1.0, 1.0)  # bounded data (images): the same range the reference code writes
            bar.update(n)
            yield x


def check_finite(x: Tensor, start: int, precision: str, guidance_scale: float | None) -> None:
    """Refuse a batch with NaN or infinite values (samples ``start`` on) before it is written: a clamp would hide
    NaN as black pixels in the PNGs and every metric. Shards already written stay on disk."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if not bool(bad.any()):
        return
    first = [start + int(i) for i in bad.nonzero().flatten()[:5]]
    hints = ["sample with precision=fp32" if precision != "fp32" else None,
             f"lower guidance_scale={guidance_scale} or set the sampler's threshold (e.g. sampler.threshold=0.995)"
             if guidance_scale not in (None, 1.0) else None,
             "check the checkpoint: its training may have diverged (src.eval metric=nll shows it)"]
    raise FloatingPointError(f"{int(bad.sum())} of {len(x)} samples from index {start} are not finite (NaN or "
                             f"inf; first: {first}): " + "; ".join(h for h in hints if h))


def draw(module: DDPMModule, sampler: Sampler, num_samples: int, batch_size: int, seed: int, device: torch.device,
         progress: bool = False, labels: Tensor | None = None, guidance_scale: float = 1.0, precision: str = "fp32",
         **options: Any) -> Tensor:
    """``draw_batches`` gathered on the CPU as float32 (N, *data_shape)."""
    return torch.cat([x.float().cpu() for x in draw_batches(module, sampler, num_samples, batch_size, seed, device,
                                                            progress, labels, guidance_scale, precision,
                                                            **options)])


def sampling_labels(module: DDPMModule, num_samples: int, class_label: int | None = None,
                    guidance_scale: float = 1.0, ckpt_path: str = "the checkpoint") -> Tensor | None:
    """The class labels to sample with: ``class_label`` for every sample, or null for classes 0..K-1 in turn;
    None for an unconditional model (which refuses a class label or a guidance scale)."""
    guidance_scale = float(guidance_scale)
    num_classes = getattr(module.net, "num_classes", None)
    if num_classes is None:
        for key, value, default in (("class_label", class_label, None), ("guidance_scale", guidance_scale, 1.0)):
            if value != default:
                raise ValueError(f"{key}={value} needs a class-conditional checkpoint, but {ckpt_path} is "
                                 f"unconditional (trained without conditional=true): drop {key}")
        return None
    if class_label is None:
        return torch.arange(num_samples) % num_classes  # every class in turn
    if isinstance(class_label, bool) or not isinstance(class_label, int) or not 0 <= class_label < num_classes:
        raise ValueError(f"class_label={class_label!r} is not a class of this checkpoint: use an int in "
                         f"[0, {num_classes - 1}], or null for all classes in turn")
    return torch.full((num_samples,), class_label, dtype=torch.long)


def _reference_points(module: DDPMModule, n: int, seed: int) -> Tensor | None:
    """Points of the training distribution, when the run's data module can draw them (toy2d)."""
    data_cfg = (module.run_config or {}).get("data")
    if not data_cfg:
        return None
    try:
        datamodule = instantiate(OmegaConf.create(data_cfg))
        if not getattr(datamodule, "has_reference_distribution", False):
            return None
        return datamodule.sample_reference(n, seed=seed)
    except Exception as err:  # the grey reference cloud is decoration: never fail the run for it
        log.warning("no reference points for the scatter plot (%s: %s)", type(err).__name__, err)
        return None


def stored_form(samples: Tensor) -> np.ndarray:
    """Samples as written to disk: images (N, C, H, W) in [-1, 1] as uint8 N x H x W x C (the layout FID tools
    expect), 2-D or other flat data (N, D) as float32."""
    if samples.dim() == 2:
        return samples.float().cpu().numpy().astype(np.float32)
    return to_uint8(samples.cpu()).permute(0, 2, 3, 1).contiguous().numpy()  # clips to [-1, 1]


def png_name(index: int, total: int) -> str:
    """``000123.png``: six digits, more when the run has more samples, so names sort in index order."""
    return f"{index:0{max(6, len(str(max(total - 1, 0))))}d}.png"


def write_pngs(stored: np.ndarray, out_dir: Path, start: int, total: int) -> None:
    """One PNG per image sample at the data's own resolution (what FID tools read), named by its index."""
    if stored.ndim != 4:
        return
    for i, image in enumerate(stored):
        save_png(torch.from_numpy(image).permute(2, 0, 1), out_dir / "samples" / png_name(start + i, total))


def write_previews(stored: np.ndarray, out_dir: Path, module: DDPMModule, seed: int = 0, total: int | None = None,
                   grid_nrow: int | None = None) -> None:
    """``grid.png`` of the first images (enlarged for people), or ``scatter.png`` of 2-D points."""
    total = len(stored) if total is None else total
    if stored.ndim == 2:
        if stored.shape[1] == 2:
            points = torch.from_numpy(stored)
            reference = _reference_points(module, max(len(points), 1000), seed)
            save_png(scatter_image(points, reference, title=f"{total} samples"), out_dir / "scatter.png")
        return
    images = torch.from_numpy(stored[:GRID_MAX]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_png(image_grid(images, nrow=grid_nrow), out_dir / "grid.png")


def write_samples(samples: Tensor, out_dir: Path, module: DDPMModule, seed: int = 0, labels: Tensor | None = None,
                  grid_nrow: int | None = None) -> Path:
    """Write the samples (N, C, H, W) or (N, D) as described in the module docstring, at once; returns the npz
    path. (``src.sample`` writes the same files shard by shard: src.utils.shards.)

    ``labels`` (N,), for conditional samples, go into the npz as ``labels``; ``grid_nrow`` is the number of
    images per row of grid.png (default: a square).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "samples.npz"
    stored = stored_form(samples)
    extra = {} if labels is None else {"labels": labels.cpu().numpy().astype(np.int64)}
    np.savez(npz, samples=stored, **extra)
    write_pngs(stored, out_dir, 0, len(stored))
    write_previews(stored, out_dir, module, seed, grid_nrow=grid_nrow)
    return npz


def read_labels(path: str | Path) -> Tensor | None:
    """The class labels of a ``samples.npz`` of a class-conditional model (None when it has none)."""
    with np.load(path) as f:
        return torch.from_numpy(f["labels"]).long() if "labels" in f.files else None


def read_samples(path: str | Path) -> Tensor:
    """The samples of a ``samples.npz`` written by ``write_samples``, as float32 in the data's layout and range."""
    with np.load(path) as f:
        arr = torch.from_numpy(f["samples"])
    if arr.dtype == torch.uint8:  # images N x H x W x C on the 8-bit grid
        arr = arr.permute(0, 3, 1, 2).float() / 127.5 - 1
    return arr.float()
