"""The LightningModule: an epsilon-model trained with L_simple (Algorithm 1), sampled with Algorithm 2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from src.diffusion import GaussianDiffusion

NUM_LOSS_BINS = 4  # the training loss is also logged per quarter of the timestep range


def linear_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier: linear from 0 to 1 over ``warmup_steps`` optimizer steps, then constant (no decay)."""
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, 1.0)


class DDPMModule(L.LightningModule):
    """Holds the backbone (``net``) and the diffusion process.

    Args:
        net: epsilon-model called as ``net(x_t, t)``.
        diffusion: the ``GaussianDiffusion`` (schedule and reverse-process variance).
        optimizer: a partial optimizer constructor taking the parameters (Hydra ``_partial_: true``).
        warmup_steps: linear learning-rate warm-up length in optimizer steps (paper: 5000).
        data_shape: per-example data shape (C, H, W) or (D,), used for sampling.
        clip_denoised: clip the predicted x0 to [-1, 1] while sampling (images: yes; unbounded toy data: no).
        run_config: the resolved run config as plain containers; saved in every checkpoint so that a
            checkpoint alone rebuilds the model (see ``src.utils.checkpoint``).
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 5000,
        data_shape: tuple[int, ...] | None = None,
        clip_denoised: bool = True,
        run_config: dict | None = None,
    ):
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"module.warmup_steps must be >= 0, got {warmup_steps}")
        self.net = net
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.warmup_steps = int(warmup_steps)
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self.clip_denoised = clip_denoised
        self.run_config = run_config
        self.train_loss_bins = nn.ModuleList(MeanMetric() for _ in range(NUM_LOSS_BINS))
        # plain values only (Hydra hands over ListConfigs): checkpoints load with weights_only=True
        self.save_hyperparameters({"warmup_steps": self.warmup_steps, "clip_denoised": bool(clip_denoised),
                                   "data_shape": list(self.data_shape) if self.data_shape else None})

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net(x_t, t)

    # --------------------------------------------------------------- steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0 = batch[0]
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        losses = self.diffusion.training_losses(self.model_for_batch(batch, train=True), x0, t)
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.global_step}: lower optimizer.lr, keep "
                "trainer.gradient_clip_val=1.0, or check the data for NaNs; earlier checkpoints are untouched"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x0.shape[0])
        bins = (t * NUM_LOSS_BINS) // self.diffusion.num_timesteps
        for q, metric in enumerate(self.train_loss_bins):
            # weighted mean: no boolean indexing, so no host sync
            metric.update(losses.detach(), weight=(bins == q).to(losses.dtype))
            self.log(f"train/loss_q{q + 1}", metric, on_step=False, on_epoch=True)
        return loss

    def model_for_batch(self, batch: tuple[Tensor, ...], train: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """The backbone as the diffusion math calls it, ``model(x_t, t)``, for this batch."""
        return self.net

    def _fixed_noise_loss(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x0 = batch[0]
        # Same t and noise for a given batch index every time, so evaluation losses are comparable.
        g = torch.Generator(device="cpu").manual_seed(1_000_003 * (batch_idx + 1))
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device, generator=g)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        return self.diffusion.training_losses(self.model_for_batch(batch, train=False), x0, t, noise).mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch[0].shape[0])

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None, progress: bool = False,
               **kwargs: Any) -> Tensor:
        """Draw ``num_samples`` with Algorithm 2 using the current weights (EMA ones when swapped in)."""
        if self.data_shape is None:
            raise RuntimeError("data_shape is unknown: pass data_shape to DDPMModule (train.py sets it from the data)")
        was_training = self.net.training
        self.net.eval()
        try:
            return self.diffusion.sample(
                self.net, (num_samples, *self.data_shape), generator=generator, progress=progress,
                device=self.device, clip_denoised=self.clip_denoised, **kwargs,
            )
        finally:
            self.net.train(was_training)

    # ----------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.net.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(linear_warmup, warmup_steps=self.warmup_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["ddpm_config"] = self.run_config
        checkpoint["ddpm_data_shape"] = list(self.data_shape) if self.data_shape else None
        # t, the noise and dropout come from the global RNG: saved so a resumed run draws what an unbroken one would
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_rng_states = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Resuming mid-epoch: the epoch's order is replayed from its seed, minus the batches already used.
        loader = self.trainer.train_dataloader
        # batches of this epoch whose step ran (the checkpoint was written after the last of them)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        sampler = getattr(loader, "sampler", None)
        if done >= self.trainer.num_training_batches:  # saved after an epoch's last batch: a fresh epoch follows
            done = 0
        if done and hasattr(sampler, "skip") and hasattr(loader, "batch_size"):
            sampler.skip = done * loader.batch_size

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        states = getattr(self, "_resume_rng_states", None)
        if states:
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            self._resume_rng_states = None
