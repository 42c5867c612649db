"""The DDPM U-Net (Ho et al. 2020 Appendix B; TF reference `diffusion_tf/models/unet.py`).

Submodule names (temb.dense, conv_in, down[i].block/attn/downsample, mid.block_1/attn_1/block_2,
up[i].block/attn/upsample, norm_out, conv_out; ResBlock norm1/conv1/temb_proj/norm2/conv2/nin_shortcut;
AttnBlock norm/q/k/v/proj_out) follow the layout commonly used by PyTorch ports of the reference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import LabelEmbedding, check_no_labels, check_timesteps, timestep_embedding

# TF variance_scaling(scale, "fan_avg", "uniform") == xavier_uniform_ with gain = sqrt(scale).
# The reference uses scale 1e-10 ("init_scale=0") for layers that should start as ~zero.
_ZERO_SCALE = 1e-10


def _init_dense(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)


class ResBlock(nn.Module):
    """Wide-ResNet block with additive timestep conditioning: (B,in,H,W), (B,temb) -> (B,out,H,W)."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 ("NIN") projection only when the channel count changes.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        # In-place adds onto fresh conv outputs (a conv's backward does not need its output): no extra
        # activation-sized buffer per add, which shows on a CPU.
        h = self.conv1(F.silu(self.norm1(x)))
        h += self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions: (B,C,H,W) -> (B,C,H,W), residual."""

    def __init__(self, channels: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm = norm(channels)
        # Separate q/k/v (not one fused 3C conv) so xavier fan_out is C per projection, as in the reference.
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        attend = self.attend_sdpa if x.is_cuda else self.attend_matmul
        out = attend(self.norm(x))  # (B, C, HW)
        return self.proj_out(out.reshape(b, c, hgt, wid)).add_(x)

    def attend_sdpa(self, h: Tensor) -> Tensor:
        """Attention with PyTorch's fused SDPA kernels (flash / memory-efficient on a GPU): (B,C,H,W) -> (B,C,HW)."""
        b, c, hgt, wid = h.shape

        # (B,C,H,W) -> (B,1,HW,C) with a unit stride on C: the fused kernels refuse anything else and SDPA
        # would fall back to its unfused math path (free for channels_last inputs, one copy otherwise).
        def tokens(z: Tensor) -> Tensor:
            return z.flatten(2).transpose(1, 2).contiguous()[:, None]

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)), scale=c**-0.5)
        return out[:, 0].transpose(1, 2)

    def attend_matmul(self, h: Tensor) -> Tensor:
        """The same attention as two batched matmuls on the channel-major layout: (B,C,H,W) -> (B,C,HW).

        On a CPU this is ~2x faster than SDPA at the paper's 256 tokens x 256 channels (SDPA falls back to its
        unfused math kernel for these strides).
        """
        b, c, hgt, wid = h.shape
        q, k, v = (proj(h).reshape(b, c, hgt * wid) for proj in (self.q, self.k, self.v))
        w = torch.bmm(q.transpose(1, 2), k).mul_(c**-0.5).softmax(dim=-1)  # (B, HW_q, HW_k)
        return torch.bmm(v, w.transpose(1, 2))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TF "SAME" padding (bottom/right only): (B,C,H,W) -> (B,C,H/2,W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # TF pads asymmetrically for even sizes; symmetric padding=1 would shift the sampling grid.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: (B,C,H,W) -> (B,C,2H,2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # Nearest x2 as a broadcast copy: the same values as F.interpolate(mode="nearest"), whose CPU kernel
        # detours through a channels-last copy at these channel counts (~5x slower here).
        b, c, hgt, wid = x.shape
        up = x[:, :, :, None, :, None].expand(b, c, hgt, 2, wid, 2).reshape(b, c, 2 * hgt, 2 * wid)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            up = up.contiguous(memory_format=torch.channels_last)
        return self.conv(up)


def _stage() -> nn.Module:
    """One level of the down or up path: ``block`` (res-blocks) and ``attn`` (their attention, if any)."""
    stage = nn.Module()
    stage.block = nn.ModuleList()
    stage.attn = nn.ModuleList()
    return stage


class UNet(nn.Module):
    """DDPM U-Net epsilon/x0/mean predictor.

    forward(x: (B, in_channels, H, W), t: (B,) int64 indices in [0, T-1], y: (B,) int64 labels or None)
    -> (B, out_channels, H, W). Defaults are the CIFAR-10 model (35,746,307 parameters).

    With ``num_classes`` set the model is class-conditional: a label embedding (``num_classes + 1`` rows, the
    last one the null label) is added to the time embedding; ``y=None`` means the null label.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resolution: int = 32,
        num_groups: int = 32,
        norm_eps: float = 1e-6,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        # Hydra passes ListConfig / possibly strings-as-ints; normalise to plain Python types.
        self.in_channels = int(in_channels)
        self.out_channels = self.in_channels if out_channels is None else int(out_channels)
        self.ch = int(ch)
        self.ch_mult = tuple(int(m) for m in ch_mult)
        self.num_res_blocks = int(num_res_blocks)
        self.attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.dropout = float(dropout)
        self.resolution = int(resolution)
        self.num_groups = int(num_groups)
        self.norm_eps = float(norm_eps)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.temb_dim = 4 * self.ch
        self._check_arguments()

        # Timestep MLP: sinusoid(ch) -> Dense(4ch) -> swish -> Dense(4ch).
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList(
            [nn.Linear(self.ch, self.temb_dim), nn.Linear(self.temb_dim, self.temb_dim)]
        )
        self.conv_in = nn.Conv2d(self.in_channels, self.ch, 3, padding=1)
        self.down, skip_channels = self._build_down()
        self.mid = self._build_mid(skip_channels[-1])
        self.up = self._build_up(skip_channels)
        self.norm_out = self._norm(self.ch * self.ch_mult[0])
        self.conv_out = nn.Conv2d(self.ch * self.ch_mult[0], self.out_channels, 3, padding=1)

        self._init_weights()
        # Built after the init above, so the other weights start exactly as in the unconditional model.
        self.label_emb = None if num_classes is None else LabelEmbedding(self.num_classes, self.temb_dim)

    def _check_arguments(self) -> None:
        """ValueError naming the config keys for arguments that build no U-Net; a warning for attention
        resolutions the levels never reach."""
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(
                f"model.in_channels={self.in_channels} and model.out_channels={self.out_channels} must be >= 1"
            )
        if self.ch < 1 or len(self.ch_mult) == 0 or any(m < 1 for m in self.ch_mult):
            raise ValueError(
                f"model.ch={self.ch} must be >= 1 and model.ch_mult={self.ch_mult} a non-empty list of positive ints"
            )
        if self.num_res_blocks < 0:
            raise ValueError(f"model.num_res_blocks={self.num_res_blocks} must be >= 0")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.resolution < 1 or self.resolution % factor != 0:
            raise ValueError(
                f"model.resolution={self.resolution} is not divisible by 2**(len(ch_mult)-1)={factor} required by "
                f"model.ch_mult={self.ch_mult}: set model.resolution (= data.image_size) to a multiple of "
                f"{factor} or use fewer levels in model.ch_mult"
            )
        reachable = {self._level_resolution(level) for level in range(len(self.ch_mult))}
        unused = sorted(set(self.attn_resolutions) - reachable)
        if unused:
            warnings.warn(
                f"model.attn_resolutions contains {unused}, which the U-Net never reaches (its levels run at "
                f"{sorted(reachable, reverse=True)} for model.resolution={self.resolution}); no attention is "
                f"added there",
                stacklevel=3,  # the caller of UNet(...)
            )

    def _norm(self, channels: int) -> nn.GroupNorm:
        if channels % self.num_groups != 0:
            raise ValueError(
                f"GroupNorm needs channel counts divisible by model.num_groups={self.num_groups}, but the "
                f"U-Net has a {channels}-channel feature map (model.ch={self.ch}, model.ch_mult={self.ch_mult}): "
                f"choose model.ch (and its multiples) divisible by model.num_groups or lower num_groups"
            )
        return nn.GroupNorm(self.num_groups, channels, eps=self.norm_eps)

    def _level_resolution(self, level: int) -> int:
        return self.resolution // 2**level

    def _add_block(self, stage: nn.Module, level: int, in_ch: int) -> int:
        """Append a res-block of ``level`` (and its attention, at an attention resolution) to ``stage``; returns its
        output channels."""
        out_ch = self.ch * self.ch_mult[level]
        stage.block.append(ResBlock(in_ch, out_ch, self.temb_dim, self.dropout, self._norm))
        if self._level_resolution(level) in self.attn_resolutions:
            stage.attn.append(AttnBlock(out_ch, self._norm))
        return out_ch

    def _build_down(self) -> tuple[nn.ModuleList, list[int]]:
        """down[i]: ``num_res_blocks`` res-blocks of level i, then a downsample (all but the last level). Also
        returns the channels of every skip connection, in the order the forward pass stores them."""
        down = nn.ModuleList()
        skip_channels = [self.ch]  # conv_in's output
        for level in range(len(self.ch_mult)):
            stage = _stage()
            for _ in range(self.num_res_blocks):
                skip_channels.append(self._add_block(stage, level, skip_channels[-1]))
            if level != len(self.ch_mult) - 1:
                stage.downsample = Downsample(skip_channels[-1])
                skip_channels.append(skip_channels[-1])
            down.append(stage)
        return down, skip_channels

    def _build_mid(self, channels: int) -> nn.Module:
        """Res-block, attention, res-block at the lowest resolution."""
        mid = nn.Module()
        mid.block_1 = ResBlock(channels, channels, self.temb_dim, self.dropout, self._norm)
        mid.attn_1 = AttnBlock(channels, self._norm)
        mid.block_2 = ResBlock(channels, channels, self.temb_dim, self.dropout, self._norm)
        return mid

    def _build_up(self, skip_channels: list[int]) -> nn.ModuleList:
        """up[i]: ``num_res_blocks + 1`` res-blocks of level i, each taking one skip connection (consumed from
        ``skip_channels``), then an upsample (all but level 0)."""
        stages = []
        cur = skip_channels[-1]
        for level in reversed(range(len(self.ch_mult))):
            stage = _stage()
            for _ in range(self.num_res_blocks + 1):
                cur = self._add_block(stage, level, cur + skip_channels.pop())
            if level != 0:
                stage.upsample = Upsample(cur)
            stages.insert(0, stage)  # up[i] is level i, matching down[i]
        assert not skip_channels
        return nn.ModuleList(stages)

    def _init_weights(self) -> None:
        # Reference init: xavier-uniform (fan_avg) everywhere, zero biases; the last conv of each
        # res-block, the attention output projection and conv_out get scale 1e-10 (gain 1e-5), so every
        # residual branch, and the network output, starts at ~0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                _init_dense(m)
        for m in self.modules():
            if isinstance(m, ResBlock):
                _init_dense(m.conv2, _ZERO_SCALE)
            elif isinstance(m, AttnBlock):
                _init_dense(m.proj_out, _ZERO_SCALE)
        _init_dense(self.conv_out, _ZERO_SCALE)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError (naming the config keys to change) unless `shape` = (C, H, W) fits this model."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            kind = "2-D points" if len(shape) == 1 else f"{len(shape)}-D data"
            raise ValueError(
                f"UNet expects image data (C,H,W) but the data is {kind} of shape {shape}: use model=mlp "
                f"for vector data"
            )
        c, hgt, wid = shape
        problems = []
        if c != self.in_channels:
            plural = "channel" if c == 1 else "channels"
            problems.append(
                f"data has {c} {plural} but model.in_channels={self.in_channels}: set model.in_channels={c}"
            )
        if hgt != wid:
            problems.append(f"images must be square but are {hgt}x{wid}: set data.image_size to one size")
        factor = 2 ** (len(self.ch_mult) - 1)
        if hgt % factor != 0 or wid % factor != 0:
            problems.append(
                f"image size {hgt} is not divisible by 2**(len(ch_mult)-1)={factor} required by "
                f"model.ch_mult={self.ch_mult}: choose data.image_size divisible by {factor} or fewer levels "
                f"in model.ch_mult"
            )
        if hgt != self.resolution or wid != self.resolution:
            problems.append(
                f"image size {hgt} differs from model.resolution={self.resolution} (attention placement "
                f"depends on it): set model.resolution to data.image_size={hgt}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, in_channels, H, W), t: (B,) integer indices, y: (B,) labels -> (B, out_channels, H, W)."""
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but model.in_channels={self.in_channels}: set model.in_channels"
            )
        factor = 2 ** (len(self.ch_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by {factor} required by "
                f"model.ch_mult={self.ch_mult}"
            )
        check_timesteps(t, x.shape[0], "UNet")

        dense0, dense1 = self.temb.dense
        temb = timestep_embedding(t, self.ch).to(dense0.weight.dtype)
        temb = dense1(F.silu(dense0(temb)))
        if self.label_emb is not None:
            temb = temb + self.label_emb.embed(y, x.shape[0], "UNet").to(temb.dtype)
        else:
            check_no_labels(y, "UNet")

        last = len(self.ch_mult) - 1
        hs = [self.conv_in(x)]
        for level, stage in enumerate(self.down):
            for j, block in enumerate(stage.block):
                h = block(hs[-1], temb)
                if len(stage.attn) > 0:
                    h = stage.attn[j](h)
                hs.append(h)
            if level != last:
                hs.append(stage.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for level in reversed(range(len(self.ch_mult))):
            stage = self.up[level]
            for j, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(stage.attn) > 0:
                    h = stage.attn[j](h)
            if level != 0:
                h = stage.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
