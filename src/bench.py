"""Benchmark: images/s of our U-Net + diffusion against peer libraries. `python -m src.bench [quick=true]`.

Tasks (configs/bench.yaml `tasks`), each timed in images/s:
- ``train``: forward + backward + Adam step + EMA update (fused ``torch._foreach_lerp_``, as src/callbacks/ema.py)
  on random data. Ours: ``GaussianDiffusion.training_losses`` (L_simple). diffusers: ``UNet2DModel`` with the
  google/ddpm-cifar10-32 config, ``DDPMScheduler.add_noise`` and MSE on the noise (its train_unconditional
  example). denoising-diffusion-pytorch: ``Unet(dim=ch, dim_mults=ch_mult)`` with its own ``GaussianDiffusion``
  loss (objective pred_noise, linear betas). Same optimizer and EMA everywhere.
- ``sample_ddpm``: the full ancestral chain of ``sample_steps`` steps (ours: the ``Ancestral`` sampler of a
  T=sample_steps diffusion; diffusers: the ``DDPMScheduler`` step loop as ``DDPMPipeline`` runs it;
  denoising-diffusion-pytorch: ``p_sample_loop``).
- ``sample_ddim``: ``ddim_steps`` DDIM steps over T=num_timesteps (ours: the ``DDIM`` sampler; diffusers:
  ``DDIMScheduler`` loop with eta=0; denoising-diffusion-pytorch: ``ddim_sample``).

Settings: ``same_precision`` (both sides in ``precision``: fp32 on CPU, bf16 autocast on CUDA by default, and
the same plain Adam) and ``defaults`` (ours as it runs by default, bf16 autocast where the device runs it and
inference_mode for sampling, Adam with the training module's fused/foreach choice, plus the ``compile`` /
``channels_last`` levers when configs/bench.yaml turns them on; each peer as its own example / pipeline runs it:
fp32, no_grad / inference_mode, plain Adam).

Timing: within one (task, setting) the sides run in interleaved rounds (ours, peer 1, peer 2, ours, ...)
after ``warmup`` untimed rounds; images/s are computed from the median round time. On a shared machine
compare the ratios, not the absolute numbers.

Writes ``bench.json`` into the run folder: a list of records with task, setting, peer, ours, theirs
(images/s), ratio (ours / theirs), device, precision ({ours, theirs}), batch_size, params, flops_per_image
(ours; train counts forward + backward as 3x forward), mfu (CUDA with a known peak, else null),
peak_mem_bytes (the side's own peak; on CUDA the allocator's peak during its rounds minus what was allocated
when the round began, plus the side's own weights, gradients, optimizer and EMA state then; on a CPU, for the
train task only, each side alone in a fresh process: its peak RSS during one round minus its RSS before, plus
its weights and EMA; ``cpu_memory=false`` skips it) and the raw round times.
A peer that is not installed gets a record with theirs/ratio null and a ``note``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from src.diffusion import DDIM, Ancestral, create_diffusion
from src.models.speed import build_optimizer, compile_backbone, use_channels_last
from src.utils.device import has_fast_bf16, resolve_device
from src.utils.sampling import sample_batch

log = logging.getLogger(__name__)
# denoising-diffusion-pytorch's sampling loops draw a tqdm bar per chain; tqdm reads this when first imported
os.environ.setdefault("TQDM_DISABLE", "1")

# (full, quick) values of the settings left null in configs/bench.yaml
SIZES: dict[str, tuple[int, int]] = {
    "batch_size": (128, 4),
    "repeats": (5, 2),
    "warmup": (2, 1),
    "sample_steps": (1000, 10),
    "ddim_steps": (50, 5),
    "train_steps": (2, 1),
}

# Dense peak FLOP/s by device-name substring (first match wins); fp32 is plain (non-tensor-core) FP32.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.0e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312.0e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.0e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121.0e12, "fp32": 30.3e12}),
]

KNOWN_PEERS = ("diffusers", "denoising_diffusion_pytorch")


def resolve_sizes(cfg: DictConfig) -> dict[str, int]:
    """The null size settings take their full value, or the quick one with ``quick=true``."""
    quick = bool(cfg.get("quick", False))
    out = {}
    for key, (full, small) in SIZES.items():
        value = cfg.get(key)
        out[key] = int(value) if value is not None else (small if quick else full)
        if out[key] < (0 if key == "warmup" else 1):
            raise ValueError(f"{key} must be >= {0 if key == 'warmup' else 1}, got {out[key]}")
    return out


def bf16_autocast_works(device: torch.device) -> bool:
    """True when a conv + GroupNorm + matmul actually run under bf16 autocast on this device (natively or not)."""
    if device.type == "cuda":
        return has_fast_bf16(device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            x = torch.randn(1, 4, 8, 8, device=device)
            y = nn.Conv2d(4, 4, 3, padding=1).to(device)(x)
            y = F.group_norm(y, 2) @ torch.randn(8, 8, device=device)
        return y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())
    except Exception as err:  # noqa: BLE001 - any failure means "not supported here"
        log.info("bf16 autocast not usable on %s: %s", device, err)
        return False


def precision_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_for(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops_per_image(model: nn.Module, in_channels: int, image_size: int, device: torch.device) -> int | None:
    """FLOPs of one forward pass of our model for one image (torch.utils.flop_counter; 2 FLOPs per MAC)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        was_training = model.training
        model.eval()
        x = torch.randn(2, in_channels, image_size, image_size, device=device)
        t = torch.zeros(2, dtype=torch.long, device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.forward(x, t)  # not model(...): a compiled __call__ would hide the ops from the counter
        model.train(was_training)
        return int(counter.get_total_flops() // 2)
    except Exception as err:  # noqa: BLE001
        log.warning("FLOP count failed: %s", err)
        return None


# ------------------------------------------------------------------ sides
@dataclass
class Side:
    """One implementation under test: a name and, per task, a callable that runs one timed unit."""

    name: str
    model: nn.Module
    precision: str = "fp32"
    runs: dict[str, Callable[[], Any]] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None  # set by train_loop
    ema: FusedEMA | None = None


class FusedEMA:
    """EMA of the parameters with one fused lerp per step (torch._foreach_lerp_, as the EMA callback does)."""

    def __init__(self, model: nn.Module, decay: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.weight = 1.0 - decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], self.weight)


def train_loop(side: Side, loss_fn: Callable[[], Tensor], steps: int, lr: float, decay: float,
               ctx: Callable[[], contextlib.AbstractContextManager], auto_adam: bool = False) -> Callable[[], None]:
    """A callable running ``steps`` of: loss (under ctx), backward, Adam step, EMA update.

    Adam is torch's default, or with ``auto_adam`` the training module's choice (fused where torch has the kernels).
    """
    model = side.model
    if auto_adam:
        opt = build_optimizer(functools.partial(torch.optim.Adam, lr=lr), model.parameters())
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = FusedEMA(model, decay)
    side.optimizer, side.ema = opt, ema

    def run() -> None:
        model.train()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = loss_fn()
            loss.backward()
            opt.step()
            ema.update()
    return run


def inference(mode: str) -> contextlib.AbstractContextManager:
    return torch.inference_mode() if mode == "inference_mode" else torch.no_grad()


def build_ours(cfg: DictConfig, sz: dict[str, int], device: torch.device, precision: str, grad_mode: str,
               levers: bool = False) -> Side:
    """Our U-Net and diffusion; with ``levers`` (the ``defaults`` setting) the training module's speed levers:
    Adam's fused/foreach choice, and ``compile`` / ``channels_last`` when configs/bench.yaml turns them on."""
    from hydra.utils import instantiate

    model = instantiate(cfg.model).to(device)
    side = Side("ours", model, precision)
    B, C, S = sz["batch_size"], int(cfg.in_channels), int(cfg.image_size)
    shape = (B, C, S, S)
    diffusion = create_diffusion("linear", int(cfg.num_timesteps))
    x0 = torch.rand(shape, device=device) * 2 - 1
    if levers and bool(cfg.get("channels_last", False)) and use_channels_last(model):
        x0 = x0.contiguous(memory_format=torch.channels_last)
    if levers and bool(cfg.get("compile", False)):
        compile_backbone(model, cfg.get("compile_options"))

    def ctx() -> contextlib.AbstractContextManager:
        return precision_ctx(precision, device)

    side.runs["train"] = train_loop(side, lambda: diffusion.training_losses(model, x0).mean(), sz["train_steps"],
                                    float(cfg.lr), float(cfg.ema_decay), ctx, auto_adam=levers)
    # the paper's beta endpoints whatever T (linear scales them by 1000/T, which breaks for a short chain)
    chain = create_diffusion("linear", sz["sample_steps"], schedule_kwargs={"beta_start": 1e-4, "beta_end": 0.02})

    ancestral, ddim = Ancestral(), DDIM(steps=sz["ddim_steps"])

    def sample_ddpm() -> Tensor:
        model.eval()
        with inference(grad_mode), ctx():
            return sample_batch(ancestral, model, chain, shape, device=device)

    def sample_ddim() -> Tensor:
        model.eval()
        with inference(grad_mode), ctx():
            return sample_batch(ddim, model, diffusion, shape, device=device)

    side.runs["sample_ddpm"] = sample_ddpm
    side.runs["sample_ddim"] = sample_ddim
    return side


def diffusers_unet_config(mcfg: DictConfig, image_size: int, in_channels: int) -> dict[str, Any]:
    """google/ddpm-cifar10-32's UNet2DModel config, generalised to our model node (ch, ch_mult, ...)."""
    ch_mult = [int(m) for m in mcfg.ch_mult]
    attn = {int(r) for r in mcfg.attn_resolutions}
    res = [image_size // 2**i for i in range(len(ch_mult))]
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res))
    return dict(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                block_out_channels=tuple(int(mcfg.ch) * m for m in ch_mult),
                layers_per_block=int(mcfg.num_res_blocks), down_block_types=down, up_block_types=up,
                dropout=float(mcfg.dropout), act_fn="silu", attention_head_dim=None, norm_eps=1e-6,
                norm_num_groups=int(mcfg.get("num_groups", 32)), center_input_sample=False,
                downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1,
                resnet_time_scale_shift="default", time_embedding_type="positional")


def build_diffusers(cfg: DictConfig, sz: dict[str, int], device: torch.device, precision: str) -> Side:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    S, C, B = int(cfg.image_size), int(cfg.in_channels), sz["batch_size"]
    shape = (B, C, S, S)
    unet = UNet2DModel(**diffusers_unet_config(cfg.model, S, C)).to(device)
    side = Side("diffusers", unet, precision)
    T = int(cfg.num_timesteps)
    train_sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    x0 = torch.rand(shape, device=device) * 2 - 1

    def ctx() -> contextlib.AbstractContextManager:
        return precision_ctx(precision, device)

    def loss_fn() -> Tensor:  # examples/unconditional_image_generation/train_unconditional.py, epsilon
        noise = torch.randn_like(x0)
        t = torch.randint(0, T, (B,), device=device)
        x_t = train_sched.add_noise(x0, noise, t)
        return F.mse_loss(unet(x_t, t).sample.float(), noise)

    side.runs["train"] = train_loop(side, loss_fn, sz["train_steps"], float(cfg.lr), float(cfg.ema_decay), ctx)
    ddpm_sched = DDPMScheduler(num_train_timesteps=sz["sample_steps"], beta_schedule="linear")
    ddim_sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear")

    def loop(sched: Any, steps: int, **step_kw: Any) -> Tensor:  # DDPMPipeline.__call__'s loop
        unet.eval()
        with torch.no_grad(), ctx():
            x = torch.randn(shape, device=device)
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                out = unet(x, t).sample
                x = sched.step(out, t, x, **step_kw).prev_sample
            return (x / 2 + 0.5).clamp(0, 1)

    side.runs["sample_ddpm"] = lambda: loop(ddpm_sched, sz["sample_steps"])
    side.runs["sample_ddim"] = lambda: loop(ddim_sched, sz["ddim_steps"], eta=0.0)
    return side


def build_ddp(cfg: DictConfig, sz: dict[str, int], device: torch.device, precision: str) -> Side:
    from denoising_diffusion_pytorch import GaussianDiffusion as DDPGaussianDiffusion
    from denoising_diffusion_pytorch import Unet

    S, C, B = int(cfg.image_size), int(cfg.in_channels), sz["batch_size"]
    mcfg = cfg.model
    unet = Unet(dim=int(mcfg.ch), dim_mults=tuple(int(m) for m in mcfg.ch_mult), channels=C,
                dropout=float(mcfg.dropout)).to(device)
    side = Side("denoising_diffusion_pytorch", unet, precision)
    common = dict(image_size=S, objective="pred_noise", beta_schedule="linear")
    train_gd = DDPGaussianDiffusion(unet, timesteps=int(cfg.num_timesteps), **common).to(device)
    ddpm_gd = DDPGaussianDiffusion(unet, timesteps=sz["sample_steps"], **common).to(device)
    ddim_gd = DDPGaussianDiffusion(unet, timesteps=int(cfg.num_timesteps), sampling_timesteps=sz["ddim_steps"],
                                   **common).to(device)
    x01 = torch.rand(B, C, S, S, device=device)  # this library normalises [0, 1] images itself

    def ctx() -> contextlib.AbstractContextManager:
        return precision_ctx(precision, device)

    side.runs["train"] = train_loop(side, lambda: train_gd(x01), sz["train_steps"], float(cfg.lr),
                                    float(cfg.ema_decay), ctx)

    def sample(gd: Any) -> Tensor:  # its sample() picks p_sample_loop or ddim_sample (inference_mode inside)
        unet.eval()
        with ctx():
            return gd.sample(batch_size=B)

    side.runs["sample_ddpm"] = lambda: sample(ddpm_gd)
    side.runs["sample_ddim"] = lambda: sample(ddim_gd)
    return side


PEER_BUILDERS = {"diffusers": build_diffusers, "denoising_diffusion_pytorch": build_ddp}


# ------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(sides: list[Side], task: str, repeats: int, warmup: int,
                     device: torch.device) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Round-robin the sides (A B C A B C ...): ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Returns the round times per side (seconds) and, on CUDA, each side's own peak memory over the timed rounds
    (None on CPU): the allocator's peak during the round minus what was allocated when it began (every side's
    state is alive at once), plus the side's own state then (``resident_bytes``).
    """
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    peak: dict[str, int | None] = {s.name: None for s in sides}
    for r in range(warmup + repeats):
        for side in sides:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                baseline = torch.cuda.memory_allocated(device) - resident_bytes(side)
            sync(device)
            start = time.perf_counter()
            side.runs[task]()
            sync(device)
            elapsed = time.perf_counter() - start
            if device.type == "cuda" and r >= warmup:
                peak[side.name] = max(peak[side.name] or 0, torch.cuda.max_memory_allocated(device) - baseline)
            if r >= warmup:
                times[side.name].append(elapsed)
            log.info("%s round %d/%d%s %s: %.3f s", task, r + 1, warmup + repeats,
                     " (warmup)" if r < warmup else "", side.name, elapsed)
    return times, peak


def resident_bytes(side: Side) -> int:
    """Bytes held by one side between rounds: weights, buffers, gradients, optimizer state, EMA (each storage once)."""
    tensors = [*side.model.parameters(), *side.model.buffers()]
    tensors += [p.grad for p in side.model.parameters() if p.grad is not None]
    if side.optimizer is not None:
        tensors += [v for state in side.optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    if side.ema is not None:
        tensors += side.ema.shadow
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _proc_status_bytes(field: str) -> int | None:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _side_train_peak_cpu(cfg_yaml: str, sz: dict[str, int], prec: dict[str, Any], name: str,
                          threads: int) -> int | None:
    """Run in a fresh process: build one side, run one train round, return its peak memory (bytes).

    The peak is the process's peak RSS during the round (Linux resets the high-water mark when 5 is written to
    /proc/self/clear_refs) minus its RSS when the round began, plus what the side held then (weights, EMA):
    the CPU counterpart of the CUDA figure, without the interpreter's and the libraries' own memory.
    """
    from omegaconf import OmegaConf

    torch.set_num_threads(threads)
    cfg = OmegaConf.create(cfg_yaml)
    cfg.peers = [p for p in cfg.peers if str(p) == name]  # build this side only
    sides = [s for s in build_sides(cfg, sz, torch.device("cpu"), prec, {}) if s.name == name]
    if not sides:
        return None
    side = sides[0]
    held = resident_bytes(side)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _proc_status_bytes("VmRSS")
    side.runs["train"]()
    peak = _proc_status_bytes("VmHWM")
    if before is None or peak is None:
        return None
    return peak - before + held


def cpu_train_peaks(cfg: DictConfig, sz: dict[str, int], prec: dict[str, Any],
                    names: list[str]) -> dict[str, int | None]:
    """Each side's peak training memory on the CPU, each measured alone in a fresh (spawned) process: one
    process's peak RSS cannot be split between sides that share it."""
    import concurrent.futures
    import importlib
    import multiprocessing

    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("paths", "hydra"):
        plain.pop(key, None)
    cfg_yaml = OmegaConf.to_yaml(OmegaConf.create(plain))
    # by module name, not __main__: the spawned child imports src.bench and finds the function there
    fn = importlib.import_module("src.bench")._side_train_peak_cpu
    peaks: dict[str, int | None] = {}
    ctx = multiprocessing.get_context("spawn")
    for name in names:
        try:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                peaks[name] = pool.submit(fn, cfg_yaml, sz, prec, name, torch.get_num_threads()).result()
        except Exception as err:  # noqa: BLE001 - a failed measurement is a missing figure, not a failed bench
            log.warning("CPU peak memory of %s not measured: %s", name, err)
            peaks[name] = None
    return peaks


def images_per_round(task: str, sz: dict[str, int]) -> int:
    return sz["batch_size"] * (sz["train_steps"] if task == "train" else 1)


def flops_per_image(task: str, fwd: int | None, sz: dict[str, int]) -> int | None:
    if fwd is None:
        return None
    return {"train": 3 * fwd, "sample_ddpm": sz["sample_steps"] * fwd, "sample_ddim": sz["ddim_steps"] * fwd}[task]


# ------------------------------------------------------------------ main
def resolve_precisions(cfg: DictConfig, device: torch.device) -> dict[str, dict[str, Any]]:
    """{setting: {"ours": precision, "peer": precision, "grad_mode": ..., "levers": ours with its speed levers}}."""
    bf16_ok = bf16_autocast_works(device)
    same = str(cfg.precision)
    if same == "auto":
        same = "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if same not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    if same == "bf16" and not bf16_ok:
        raise ValueError(f"precision=bf16: bf16 autocast does not run on {device}")
    ours_default = str(cfg.get("defaults_precision", "auto"))
    if ours_default == "auto":  # as src.sample's precision=auto: bf16 only where the device runs it natively
        ours_default = "bf16" if has_fast_bf16(device) else "fp32"
    if ours_default not in ("fp32", "bf16"):
        raise ValueError(f"defaults_precision must be auto, fp32 or bf16, got {cfg.defaults_precision!r}")
    return {
        "same_precision": {"ours": same, "peer": same, "grad_mode": "no_grad", "levers": False},
        # ours by default: bf16 autocast where it runs, inference_mode for sampling; peers: fp32 (their examples)
        "defaults": {"ours": ours_default, "peer": "fp32", "grad_mode": "inference_mode", "levers": True},
    }


def build_sides(cfg: DictConfig, sz: dict[str, int], device: torch.device, prec: dict[str, str],
                skipped: dict[str, str]) -> list[Side]:
    torch.manual_seed(int(cfg.seed))
    sides = [build_ours(cfg, sz, device, prec["ours"], prec["grad_mode"], levers=bool(prec["levers"]))]
    for peer in cfg.peers:
        peer = str(peer)
        if peer in skipped:
            continue
        if peer not in PEER_BUILDERS:
            skipped[peer] = f"unknown peer (known: {', '.join(KNOWN_PEERS)})"
            continue
        try:
            sides.append(PEER_BUILDERS[peer](cfg, sz, device, prec["peer"]))
        except ImportError as err:
            skipped[peer] = f"not installed ({err})"
            log.warning("peer %s skipped: %s", peer, skipped[peer])
    return sides


def levers_used(side: Side, cfg: DictConfig, levers: bool) -> dict[str, Any]:
    """Which speed levers a side ran with (Adam's implementation; ours: compile, channels_last)."""
    defaults = side.optimizer.defaults if side.optimizer is not None else {}
    adam = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "torch default"
    return {"adam": adam, "compile": levers and bool(cfg.get("compile", False)),
            "channels_last": levers and bool(cfg.get("channels_last", False))}


def format_table(records: list[dict[str, Any]]) -> str:
    head = (f"{'task':<12} {'setting':<15} {'peer':<28} {'ours img/s':>11} {'theirs img/s':>13} {'ratio':>7} "
            f"{'peak MiB ours/theirs':>21}")
    lines = [head, "-" * len(head)]
    for r in records:
        def f(v: float | None, w: int) -> str:
            return f"{v:>{w}.3g}" if v is not None else f"{'-':>{w}}"
        task, setting, peer = (str(r[k] if r[k] is not None else "-") for k in ("task", "setting", "peer"))
        mem = [v for v in (r.get("peak_mem_bytes") or {}).values()]
        if not r["task"]:
            mem_text = ""
        elif all(v is None for v in mem):
            mem_text = "n/a"  # CPU sampling, or cpu_memory=false
        else:
            mem_text = "/".join("-" if v is None else f"{v / 2**20:.0f}" for v in mem)
        lines.append(f"{task:<12} {setting:<15} {peer:<28} {f(r['ours'], 11)} "
                     f"{f(r['theirs'], 13)} {f(r['ratio'], 7)} {mem_text:>21}"
                     + (f"  ({r['note']})" if r.get("note") else ""))
    return "\n".join(lines)


def bench(cfg: DictConfig) -> list[dict[str, Any]]:
    sz = resolve_sizes(cfg)
    device = resolve_device(str(cfg.device))
    precisions = resolve_precisions(cfg, device)
    tasks = [str(t) for t in cfg.tasks]
    for t in tasks:
        if t not in ("train", "sample_ddpm", "sample_ddim"):
            raise ValueError(f"unknown task {t!r}: valid are train, sample_ddpm, sample_ddim")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    log.info("bench on %s, sizes %s, precisions %s", device_name, sz, precisions)

    skipped: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for setting in [str(s) for s in cfg.settings]:
        if setting not in precisions:
            raise ValueError(f"unknown setting {setting!r}: valid are {', '.join(precisions)}")
        prec = precisions[setting]
        sides = build_sides(cfg, sz, device, prec, skipped)
        ours = sides[0]
        fwd = forward_flops_per_image(ours.model, int(cfg.in_channels), int(cfg.image_size), device)
        params = {s.name: count_params(s.model) for s in sides}
        log.info("[%s] params %s; our forward %s FLOPs/image", setting, params, fwd)
        for task in tasks:
            times, peak = time_interleaved(sides, task, sz["repeats"], sz["warmup"], device)
            if task == "train" and device.type == "cpu" and bool(cfg.get("cpu_memory", True)):
                peak = cpu_train_peaks(cfg, sz, prec, [s.name for s in sides])
            n = images_per_round(task, sz)
            rate = {name: n / statistics.median(ts) for name, ts in times.items()}
            fpi = flops_per_image(task, fwd, sz)
            peak_ours = peak_for(device, prec["ours"])
            mfu_ours = fpi * rate["ours"] / peak_ours if (fpi and peak_ours) else None
            for side in sides[1:]:
                records.append({
                    "task": task, "setting": setting, "peer": side.name,
                    "ours": rate["ours"], "theirs": rate[side.name], "ratio": rate["ours"] / rate[side.name],
                    # median over rounds of theirs_time / ours_time, each pair timed back to back: less
                    # sensitive to load that drifts between rounds than the ratio of medians
                    "ratio_paired": statistics.median(
                        b / a for a, b in zip(times["ours"], times[side.name], strict=True)),
                    "device": device_name, "precision": {"ours": prec["ours"], "theirs": prec["peer"]},
                    "grad_mode_ours": prec["grad_mode"] if task != "train" else "train",
                    "batch_size": sz["batch_size"], "image_size": int(cfg.image_size),
                    "steps": {"train": sz["train_steps"], "sample_ddpm": sz["sample_steps"],
                              "sample_ddim": sz["ddim_steps"]}[task],
                    "params": {"ours": params["ours"], "theirs": params[side.name]},
                    "flops_per_image": fpi, "forward_flops_per_image": fwd,
                    # the peer's FLOPs are taken as ours (same architecture for diffusers; an estimate otherwise)
                    "mfu": None if mfu_ours is None else {
                        "ours": mfu_ours, "theirs": fpi * rate[side.name] / peak_for(device, prec["peer"])},
                    "peak_mem_bytes": {"ours": peak["ours"], "theirs": peak[side.name]},
                    "levers": {"ours": levers_used(ours, cfg, prec["levers"]),
                               "theirs": levers_used(side, cfg, False)},
                    "times_s": {"ours": times["ours"], "theirs": times[side.name]},
                    "repeats": sz["repeats"], "warmup": sz["warmup"],
                })
            if len(sides) == 1:
                records.append({"task": task, "setting": setting, "peer": None, "ours": rate["ours"],
                                "theirs": None, "ratio": None, "device": device_name,
                                "precision": {"ours": prec["ours"], "theirs": None},
                                "batch_size": sz["batch_size"], "flops_per_image": fpi,
                                "forward_flops_per_image": fwd, "mfu": None if mfu_ours is None else {"ours": mfu_ours},
                                "peak_mem_bytes": {"ours": peak["ours"]}, "times_s": {"ours": times["ours"]},
                                "levers": {"ours": levers_used(ours, cfg, prec["levers"])},
                                "note": "no peer ran"})
            log.info("%s/%s done: %s img/s", setting, task, {k: round(v, 3) for k, v in rate.items()})
        del sides
    for peer, why in skipped.items():
        records.append({"task": None, "setting": None, "peer": peer, "ours": None, "theirs": None, "ratio": None,
                        "device": device_name, "precision": None, "batch_size": sz["batch_size"],
                        "flops_per_image": None, "mfu": None, "note": f"skipped: {why}"})
    if device.type != "cuda":
        log.info("peak memory on %s: train only, each side alone in a fresh process (peak RSS during one round "
                 "minus RSS before it, plus its weights and EMA)", device)
    return records


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench.yaml")
def main(cfg: DictConfig) -> Path:
    records = bench(cfg)
    out = Path(cfg.paths.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2, default=str))
    log.info("\n%s", format_table(records))
    log.info("records written to %s", out)
    return out


if __name__ == "__main__":
    main()
