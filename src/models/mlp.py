"""Residual MLP backbone for low-dimensional (e.g. 2-D toy) data."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import LabelEmbedding, check_no_labels, check_timesteps, timestep_embedding


class _Block(nn.Module):
    """Pre-norm residual block conditioned on the time embedding: (B,H), (B,H) -> (B,H)."""

    def __init__(self, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.temb_proj = nn.Linear(hidden_dim, hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        # Time enters every block additively, like the U-Net's res-blocks.
        a = self.norm(h) + self.temb_proj(F.silu(temb))
        a = self.fc1(F.silu(a))
        a = self.fc2(self.dropout(F.silu(a)))
        return h + a


class TimeMLP(nn.Module):
    """forward(x: (B, data_dim), t: (B,) int64 indices in [0, T-1], y: (B,) labels or None) -> (B, out_dim).

    ``out_dim`` defaults to ``data_dim``. With ``num_classes`` set, a label embedding (the last of its
    ``num_classes + 1`` rows is the null label, used for ``y=None``) is added to the time embedding.
    """

    def __init__(
        self,
        data_dim: int = 2,
        hidden_dim: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 128,
        out_dim: int | None = None,
        dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        data_dim, hidden_dim, num_layers = int(data_dim), int(hidden_dim), int(num_layers)
        time_embed_dim = int(time_embed_dim)
        out_dim = data_dim if out_dim is None else int(out_dim)
        if min(data_dim, hidden_dim, out_dim) < 1 or num_layers < 0 or time_embed_dim < 2:
            raise ValueError(
                f"invalid TimeMLP config: model.data_dim={data_dim}, model.hidden_dim={hidden_dim}, "
                f"model.num_layers={num_layers}, model.time_embed_dim={time_embed_dim}, out_dim={out_dim}"
            )
        self.data_dim = data_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.time_embed_dim = time_embed_dim
        self.out_dim = out_dim
        self.num_classes = None if num_classes is None else int(num_classes)

        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.input = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList([_Block(hidden_dim, float(dropout)) for _ in range(num_layers)])
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.output = nn.Linear(hidden_dim, out_dim)
        # Zero output layer: the prediction starts at 0, as with the U-Net's ~0 output conv.
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        # Last, so the other weights start exactly as in the unconditional model.
        self.label_emb = None if num_classes is None else LabelEmbedding(num_classes, hidden_dim)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError (naming the config keys to change) unless `shape` = (data_dim,)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 1:
            raise ValueError(
                f"TimeMLP expects vector data (D,) but the data has shape {shape} (images?): use "
                f"model=unet_small (or another U-Net model config) for image data"
            )
        if shape[0] != self.data_dim:
            raise ValueError(
                f"data has dimension {shape[0]} but model.data_dim={self.data_dim}: set "
                f"model.data_dim={shape[0]}"
            )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, data_dim), t: (B,) integer indices, y: (B,) labels (conditional models) -> (B, out_dim)."""
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(
                f"TimeMLP expects x of shape (B, {self.data_dim}) (model.data_dim={self.data_dim}), "
                f"got {tuple(x.shape)}"
            )
        check_timesteps(t, x.shape[0], "TimeMLP")
        first = self.time_mlp[0]
        temb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(first.weight.dtype))
        if self.label_emb is not None:
            temb = temb + self.label_emb.embed(y, x.shape[0], "TimeMLP").to(temb.dtype)
        else:
            check_no_labels(y, "TimeMLP")
        h = self.input(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.output(F.silu(self.out_norm(h)))
