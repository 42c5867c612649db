"""Denoiser backbones: every model is called as net(x, t) with t a (B,) int64 tensor of indices 0..T-1."""

from .embeddings import timestep_embedding
from .mlp import TimeMLP
from .unet import UNet

__all__ = ["TimeMLP", "UNet", "timestep_embedding"]
