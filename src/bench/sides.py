"""The implementations under test: ours and the peers (diffusers, denoising-diffusion-pytorch), each built as a
``Side`` holding one callable per task that runs one timed unit."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from src.diffusion import DDIM, Ancestral, create_diffusion
from src.diffusion.samplers import DPMSolverPP2M
from src.models.speed import build_optimizer, compile_backbone, use_channels_last
from src.utils.sampling import sample_batch

log = logging.getLogger(__name__)

KNOWN_PEERS = ("diffusers", "denoising_diffusion_pytorch", "diffusers_scheduler")


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


def precision_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference(mode: str) -> contextlib.AbstractContextManager:
    return torch.inference_mode() if mode == "inference_mode" else torch.no_grad()


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
    # DPM-Solver++(2M) at the peer's default spacing (diffusers' "linspace" is about our trailing "uniform")
    dpmpp = DPMSolverPP2M(steps=sz["dpmpp_steps"], spacing="uniform")

    def sampling(sampler: Any, process: Any) -> Callable[[], Tensor]:
        def run() -> Tensor:
            model.eval()
            with inference(grad_mode), ctx():
                return sample_batch(sampler, model, process, shape, device=device)
        return run

    side.runs["sample_ddpm"] = sampling(ancestral, chain)
    side.runs["sample_ddim"] = sampling(ddim, diffusion)
    side.runs["sample_dpmpp"] = sampling(dpmpp, diffusion)
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
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

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
    dpmpp_sched = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear",
                                              algorithm_type="dpmsolver++", solver_order=2)
    side.runs["sample_dpmpp"] = lambda: loop(dpmpp_sched, sz["dpmpp_steps"])
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


def build_diffusers_scheduler(cfg: DictConfig, sz: dict[str, int], device: torch.device, precision: str) -> Side:
    """diffusers' DDIM and DPM-Solver++ scheduler loops driving *our* U-Net (the same weights as ours: both built
    from the seed), so the ratio is the sampling loop's own cost, the network being the same."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    from hydra.utils import instantiate

    torch.manual_seed(int(cfg.seed))
    model = instantiate(cfg.model).to(device)
    side = Side("diffusers_scheduler", model, precision)
    S, C, B, T = int(cfg.image_size), int(cfg.in_channels), sz["batch_size"], int(cfg.num_timesteps)
    ddim_sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear")
    dpmpp_sched = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear",
                                              algorithm_type="dpmsolver++", solver_order=2)

    def loop(sched: Any, steps: int, **step_kw: Any) -> Tensor:
        model.eval()
        with torch.no_grad(), precision_ctx(precision, device):
            x = torch.randn(B, C, S, S, device=device)
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                out = model(x, t.to(device).expand(B))
                x = sched.step(out, t, x, **step_kw).prev_sample
            return x

    side.runs["sample_ddim"] = lambda: loop(ddim_sched, sz["ddim_steps"], eta=0.0)
    side.runs["sample_dpmpp"] = lambda: loop(dpmpp_sched, sz["dpmpp_steps"])
    return side


PEER_BUILDERS = {"diffusers": build_diffusers, "denoising_diffusion_pytorch": build_ddp,
                 "diffusers_scheduler": build_diffusers_scheduler}


def build_sides(cfg: DictConfig, sz: dict[str, int], device: torch.device, prec: dict[str, Any],
                skipped: dict[str, str]) -> list[Side]:
    """Ours first, then every peer of ``cfg.peers`` that builds; the others go into ``skipped`` with the reason."""
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
