"""The LightningModule: a backbone trained with the diffusion's objective (L_simple by default, Algorithm 1) and
sampled with Algorithm 2; the parameterization, objective and variance come from the ``GaussianDiffusion``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torchmetrics import Metric

from src.diffusion import GaussianDiffusion
from src.diffusion.guidance import ConditionalModel, conditional_model, make_class_labels
from src.models.speed import build_optimizer, check_flag, compile_backbone, use_channels_last

NUM_LOSS_BINS = 4  # the training loss is also logged per quarter of the timestep range


class WeightedMean(Metric):
    """sum(value * weight) / sum(weight) over an epoch, summed across ranks. Unlike torchmetrics' MeanMetric it
    never checks for NaNs on the host, so an update costs no device sync."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor) -> None:
        self.total += (value.float() * weight).sum()
        self.weight += weight.float().sum()

    def compute(self) -> Tensor:
        return self.total / self.weight


def linear_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier: linear from 0 to 1 over ``warmup_steps`` optimizer steps, then constant (no decay)."""
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, 1.0)


class DDPMModule(L.LightningModule):
    """Holds the backbone (``net``) and the diffusion process.

    Args:
        net: epsilon-model called as ``net(x_t, t)``; a class-conditional one (``net.num_classes`` set) as
            ``net(x_t, t, y)``, trained on the batch's labels ``batch[1]``.
        diffusion: the ``GaussianDiffusion`` (schedule and reverse-process variance).
        optimizer: a partial optimizer constructor taking the parameters (Hydra ``_partial_: true``).
        warmup_steps: linear learning-rate warm-up length in optimizer steps (paper: 5000).
        data_shape: per-example data shape (C, H, W) or (D,), used for sampling.
        clip_denoised: clip the predicted x0 to [-1, 1] while sampling (images: yes; unbounded toy data: no).
        run_config: the resolved run config as plain containers; saved in every checkpoint so that a
            checkpoint alone rebuilds the model (see ``src.utils.checkpoint``).
        label_dropout: conditional nets only: the probability that a training label is replaced by the null
            label, which trains the unconditional prediction that classifier-free guidance needs.
        compile: ``torch.compile`` the backbone in place (training, validation and sampling; state_dict keys
            unchanged). ``compile_options`` go to ``torch.compile`` (e.g. ``mode``, ``backend``).
        channels_last: keep a conv backbone's weights and inputs in ``torch.channels_last`` (no-op for the MLP).
        nan_check_every_n_steps: how often the loss's finiteness is checked on the host; a NaN/Inf loss is
            recorded on the device every step and raises at the next check or checkpoint, naming its step.
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
        label_dropout: float = 0.1,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        channels_last: bool = False,
        nan_check_every_n_steps: int = 100,
    ):
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"module.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= float(label_dropout) <= 1.0:
            raise ValueError(f"module.label_dropout is a probability in [0, 1], got {label_dropout}")
        self.channels_last = check_flag(channels_last, "module.channels_last") and use_channels_last(net)
        if check_flag(compile, "module.compile"):
            compile_backbone(net, compile_options)
        self.net = net
        self.label_dropout = float(label_dropout)
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.warmup_steps = int(warmup_steps)
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self.clip_denoised = clip_denoised
        self.run_config = run_config
        self.train_loss_bins = nn.ModuleList(WeightedMean() for _ in range(NUM_LOSS_BINS))
        if int(nan_check_every_n_steps) < 1:
            raise ValueError(f"module.nan_check_every_n_steps must be >= 1, got {nan_check_every_n_steps}")
        self.nan_check_every_n_steps = int(nan_check_every_n_steps)
        # first step whose loss was NaN/Inf, -1 if none; not saved (a checkpoint never holds a diverged run)
        self.register_buffer("_first_nonfinite_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        # plain values only (Hydra hands over ListConfigs): checkpoints load with weights_only=True
        self.save_hyperparameters({"warmup_steps": self.warmup_steps, "clip_denoised": bool(clip_denoised),
                                   "data_shape": list(self.data_shape) if self.data_shape else None,
                                   "label_dropout": self.label_dropout})

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x_t, t) if y is None else self.net(x_t, t, y)

    # --------------------------------------------------------------- steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0 = batch[0]
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        terms = self.diffusion.training_losses(self.model_for_batch(batch, train=True), x0, t, return_terms=True)
        losses = terms["loss"]
        loss = losses.mean()
        self._note_nonfinite(loss)
        if (self.global_step + 1) % self.nan_check_every_n_steps == 0:
            self.check_finite_loss()
        # not prog_bar: Lightning would copy it to the host every step (the bar reads it every N steps)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=x0.shape[0])
        for name in self.diffusion.objective.logged_terms:  # the parts of a composite loss (hybrid: mse, vb)
            self.log(f"train/{name}", terms[name].mean(), on_step=True, on_epoch=True, batch_size=x0.shape[0])
        bins = (t * NUM_LOSS_BINS) // self.diffusion.num_timesteps
        for q, metric in enumerate(self.train_loss_bins):
            # weighted mean: no boolean indexing, so no host sync
            metric.update(losses.detach(), weight=(bins == q).to(losses.dtype))
            self.log(f"train/loss_q{q + 1}", metric, on_step=False, on_epoch=True)
        return loss

    def _note_nonfinite(self, loss: Tensor) -> None:
        # Records the first step with a NaN/Inf loss on the device: no host sync in the step.
        flag = self._first_nonfinite_step
        bad = ~torch.isfinite(loss.detach()) & (flag < 0)
        flag.copy_(torch.where(bad, torch.full_like(flag, self.global_step), flag))

    def check_finite_loss(self) -> None:
        """Raise if any training loss so far was NaN or infinite (one host sync; run every
        ``nan_check_every_n_steps`` steps and before every checkpoint, so no diverged weights are saved)."""
        step = int(self._first_nonfinite_step)
        if step >= 0:
            raise FloatingPointError(
                f"the training loss became NaN or infinite at step {step}: lower optimizer.lr, keep "
                "trainer.gradient_clip_val=1.0, or check the data for NaNs; checkpoints already written are "
                "untouched and none is written after that step"
            )

    def model_for_batch(self, batch: tuple[Tensor, ...], train: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """The backbone as the diffusion math calls it, ``model(x_t, t)``, for this batch.

        A conditional net sees the labels ``batch[1]``; in training each is replaced by the null label with
        probability ``label_dropout``, drawn from the global RNG (saved in checkpoints: resuming stays exact).
        """
        num_classes = getattr(self.net, "num_classes", None)
        if num_classes is None:
            return self.net
        if len(batch) < 2:
            raise ValueError("a class-conditional model (conditional=true) needs (x, label) batches, but the data "
                             "yields no labels: use labelled data or set conditional=false")
        labels = batch[1]
        if train and self.label_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
        return ConditionalModel(self.net, labels)

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
               class_labels: int | Sequence[int] | Tensor | None = None, guidance_scale: float = 1.0,
               **kwargs: Any) -> Tensor:
        """Draw ``num_samples`` with Algorithm 2 using the current weights (EMA ones when swapped in).

        Conditional nets: ``class_labels`` is one class index for all samples or one per sample (None:
        unconditional, the null label); ``guidance_scale`` s gives classifier-free guidance,
        uncond + s * (cond - uncond) (1: plain conditional, 0: unconditional; see ``src.diffusion.guidance``).
        """
        if self.data_shape is None:
            raise RuntimeError("data_shape is unknown: pass data_shape to DDPMModule (train.py sets it from the data)")
        labels = make_class_labels(class_labels, num_samples, getattr(self.net, "num_classes", None), self.device)
        model = conditional_model(self.net, labels, guidance_scale)
        was_training = self.net.training
        self.net.eval()
        try:
            return self.diffusion.sample(
                model, (num_samples, *self.data_shape), generator=generator, progress=progress,
                device=self.device, clip_denoised=self.clip_denoised, **kwargs,
            )
        finally:
            self.net.train(was_training)

    # ----------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        params = list(self.net.parameters())
        trainer = self._trainer
        # Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients
        mixed = trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision)
        clipping = trainer is not None and bool(trainer.gradient_clip_val)
        optimizer = build_optimizer(self.optimizer_factory, params, fused_allowed=not (mixed and clipping))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(linear_warmup, warmup_steps=self.warmup_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_loss()  # raising here stops the write: a diverged model never replaces a good one
        if self.run_config is not None:
            checkpoint["ddpm_config"] = self.run_config
        checkpoint["ddpm_data_shape"] = list(self.data_shape) if self.data_shape else None
