"""Per-sample noise: sample k of a run seeded ``seed`` draws its initial x_T and every later noise (ancestral steps,
DDIM with eta > 0, the SDE solver) from a generator of its own, seeded by (``seed``, k). Sample k is then the same
whatever the batch size, the number of processes or the order in which batches run (EDM's ``generate.py`` gives
every image its own seed in the same spirit).

``SampleNoise`` stands wherever a ``torch.Generator`` is accepted by the samplers: every draw goes through
``src.diffusion.gaussian_diffusion.randn``, which hands a ``SampleNoise`` its request.

Cost. One generator call per sample instead of one per batch; to keep the calls few, each sample's stream is read in
blocks of ``block`` draws (``block_size``: up to 64 draws, at most 4096 numbers per sample and block), so a call per
sample happens once every ``block`` steps for small data and once a step for images. Blocks are a property of the
stream (refilled at the same points for any batch), so they do not break the invariance.

On the CPU (the default) the noise is the same on every machine. On a GPU the generators can live on the device
(``device=...``: CUDA's Philox), which avoids the host-to-device copy of every draw; the samples are then
batch-size invariant on that kind of device, but not equal to the CPU ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
BLOCK_DRAWS = 64  # draws per refill at most
BLOCK_NUMBERS = 4096  # numbers per sample and refill at most


def _fmix32(x: int) -> int:
    """MurmurHash3's finalizer: a bijection of 32-bit integers that spreads nearby inputs apart."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def sample_seed(seed: int, index: int) -> int:
    """The 32-bit generator seed of sample ``index`` in a run seeded ``seed``.

    torch's CPU generator keeps only the low 32 bits of a seed, so (seed, index) is folded to 32 bits: a bijection of
    ``index`` for a fixed ``seed`` (no two samples of a run share a stream, up to 2**32 samples), and another
    bijection for another seed (runs with different seeds share a stream only by chance, ~n**2 / 2**32 pairs).
    """
    if index < 0 or index > MASK32:
        raise ValueError(f"sample index {index} is outside [0, 2**32)")
    key = _fmix32((seed & MASK32) ^ _fmix32((seed >> 32) & MASK32) ^ 0x9E3779B9)
    return _fmix32((index + key) & MASK32)


def block_size(numbers_per_draw: int) -> int:
    """Draws per refill for data of ``numbers_per_draw`` numbers per sample (a function of the data shape only)."""
    return max(1, min(BLOCK_DRAWS, BLOCK_NUMBERS // max(1, numbers_per_draw)))


class SampleNoise:
    """The noise of samples ``indices`` of a run seeded ``seed``: ``randn((n, *shape))`` gives row j from sample
    ``indices[j]``'s own stream. Pass it as ``generator=`` to any sampler.

    ``device``: where the generators live and draw (cpu: the same numbers on every machine).
    """

    def __init__(self, seed: int, indices: Sequence[int] | range, device: torch.device | str = "cpu"):
        self.seed = int(seed)
        self.indices = list(indices)
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, k))
                           for k in self.indices]
        self._buffer: Tensor | None = None  # (n, block, *shape): the next draws of every sample
        self._next = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        first, last = (self.indices[0], self.indices[-1]) if self.indices else (None, None)
        return f"SampleNoise(seed={self.seed}, samples {first}..{last}, {len(self)} in all, device={self.device})"

    def _refill(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        block = block_size(int(torch.Size(shape).numel()))
        buffer = torch.empty((len(self), block, *shape), device=self.device, dtype=dtype)
        for row, generator in zip(buffer, self.generators, strict=True):
            torch.randn((block, *shape), generator=generator, device=self.device, dtype=dtype, out=row)
        self._buffer, self._next = buffer, 0

    def randn(self, shape: Sequence[int], device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> Tensor:
        """The next draw of every sample as a tensor of ``shape`` (``shape[0]`` = the number of samples)."""
        shape, dtype = tuple(shape), dtype or torch.get_default_dtype()
        if not shape or shape[0] != len(self):
            raise ValueError(f"per-sample noise for {len(self)} samples was asked for a draw of shape {shape}; the "
                             "first dimension must be the number of samples")
        buffer = self._buffer
        # a new shape or dtype starts a new block: the refill points stay a function of the draws asked for
        if buffer is None or self._next == buffer.shape[1] or buffer.shape[2:] != shape[1:] or buffer.dtype != dtype:
            self._refill(shape[1:], dtype)
            buffer = self._buffer
        draw = buffer[:, self._next]
        self._next += 1
        return draw.to(device) if device is not None else draw
