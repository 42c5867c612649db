"""Sinusoidal timestep embedding (DDPM variant), class-label embedding, and input checks shared by the backbones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM sinusoidal embedding of timestep indices.

    t: (B,) timestep indices (any numeric dtype; used as float32). Returns (B, dim) float32,
    laid out as [sin(t*f_0..f_{half-1}), cos(t*f_0..f_{half-1})] with
    f_i = exp(-ln(max_period) * i / (half - 1)), half = dim // 2, plus one zero column if dim is odd.

    This is the DDPM/TF ordering and divisor (the reference get_timestep_embedding); improved-diffusion uses divisor
    `half` and [cos, sin], which is not weight-compatible.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {tuple(t.shape)}")
    dim = int(dim)
    if dim < 2:
        raise ValueError(f"timestep embedding dim must be >= 2, got {dim}")
    half = dim // 2
    # With half == 1 the exponent i/(half-1) is 0/0; use the only sensible frequency, 1.
    denom = max(half - 1, 1)
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / denom)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def check_timesteps(t: Tensor, batch: int, owner: str) -> None:
    """Raise ValueError unless t is an integer tensor of shape (batch,)."""
    if not isinstance(t, Tensor):
        raise ValueError(
            f"{owner} expects t as an integer tensor of shape ({batch},), got {type(t).__name__}"
        )
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(
            f"{owner} expects integer timestep indices in [0, T-1] (dtype int64), got dtype {t.dtype}"
        )
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{owner} expects t of shape ({batch},) (one timestep index per example), got {tuple(t.shape)}"
        )


class LabelEmbedding(nn.Embedding):
    """Class-label embedding with one extra "null" row: index ``num_classes`` means "no label".

    ``embed(y, batch, owner)`` returns (batch, dim); ``y=None`` embeds the null label for every example
    (the unconditional prediction of classifier-free guidance). Labels must be int64 in [0, num_classes].
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        if isinstance(num_classes, bool) or int(num_classes) < 1:
            raise ValueError(f"model.num_classes must be a positive int (or null: unconditional), got {num_classes}")
        self.num_classes = int(num_classes)
        super().__init__(self.num_classes + 1, int(dim))

    @property
    def null_label(self) -> int:
        return self.num_classes

    def embed(self, y: Tensor | None, batch: int, owner: str) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.null_label, dtype=torch.long, device=self.weight.device)
        check_labels(y, batch, self.num_classes, owner)
        return self(y)


def check_labels(y: Tensor, batch: int, num_classes: int, owner: str) -> None:
    """Raise ValueError unless y is an int64 tensor of shape (batch,) with values in [0, num_classes]."""
    if not isinstance(y, Tensor) or y.dtype != torch.long:
        what = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{owner} expects class labels y as an int64 tensor of shape ({batch},), got {what}")
    if y.ndim != 1 or y.shape[0] != batch:
        raise ValueError(f"{owner} expects y of shape ({batch},) (one class label per example), got {tuple(y.shape)}")
    if bool(((y < 0) | (y > num_classes)).any()):  # one host sync; min/max only on the error path
        raise ValueError(
            f"{owner} has num_classes={num_classes}: labels must be in [0, {num_classes - 1}], or {num_classes} "
            f"for the null (unconditional) label; got values in [{int(y.min())}, {int(y.max())}]"
        )


def check_no_labels(y: Tensor | None, owner: str) -> None:
    """Raise ValueError if labels reach an unconditional backbone."""
    if y is not None:
        raise ValueError(
            f"{owner} is unconditional (model.num_classes=null) but class labels y were passed: train with "
            "conditional=true for a class-conditional model, or call it as net(x, t)"
        )
