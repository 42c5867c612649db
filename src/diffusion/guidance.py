"""Class conditioning at sampling time: a fixed label per example, and classifier-free guidance. Plain PyTorch.

Both wrappers turn a class-conditional backbone ``net(x_t, t, y)`` into the ``model(x_t, t)`` callable the
diffusion math and every sampler take, so sampling code needs no change for conditional models.

Guidance convention (Ho & Salimans 2022, written with s = 1 + w): the guided prediction is
``uncond + s * (cond - uncond)``; ``s = 1`` is plain conditional sampling, ``s = 0`` unconditional, ``s > 1``
pushes samples towards their class (sharper, less diverse).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ConditionalModel", "ClassifierFreeGuidance", "conditional_model", "make_class_labels"]


def _null_label(net: nn.Module) -> int:
    num_classes = getattr(net, "num_classes", None)
    if num_classes is None:
        raise ValueError(
            f"{type(net).__name__} is unconditional (model.num_classes=null): class labels and guidance need a "
            "model trained with conditional=true"
        )
    return int(num_classes)


class ConditionalModel(nn.Module):
    """``model(x_t, t) = net(x_t, t, labels)``: the backbone with one fixed class label per example."""

    def __init__(self, net: nn.Module, labels: Tensor) -> None:
        super().__init__()
        _null_label(net)
        self.net = net
        self.labels = labels

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net(x_t, t, self.labels)


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance as a ``model(x_t, t)`` callable: ``uncond + s * (cond - uncond)``.

    The conditional (``labels``) and unconditional (``null_label``) predictions come from one forward pass
    over the batch stacked twice (2B). Only the first ``x_t.shape[1]`` output channels (the epsilon / mean
    prediction) are guided; any further channels (a learned variance: output 2C) are taken from the
    conditional pass, since mixing variance parameters has no meaning.

    Args:
        net: class-conditional backbone ``net(x_t, t, y)``.
        labels: (B,) int64 class labels, one per example of the batches it will be called on.
        guidance_scale: s; 1 = plain conditional, 0 = unconditional.
        null_label: the label index meaning "no class" (``net.num_classes`` for this project's backbones).
    """

    def __init__(self, net: nn.Module, labels: Tensor, guidance_scale: float, null_label: int | None = None) -> None:
        super().__init__()
        guidance_scale = float(guidance_scale)
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1: plain conditional, 0: unconditional), "
                             f"got {guidance_scale}")
        self.net = net
        self.labels = labels
        self.guidance_scale = guidance_scale
        self.null_label = _null_label(net) if null_label is None else int(null_label)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        batch, channels = x_t.shape[0], x_t.shape[1]
        null = torch.full_like(self.labels, self.null_label)
        out = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.labels, null]))
        cond, uncond = out[:batch], out[batch:]
        guided = uncond[:, :channels] + self.guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        if out.shape[1] == channels:
            return guided
        return torch.cat([guided, cond[:, channels:]], dim=1)


def conditional_model(net: nn.Module, labels: Tensor | None, guidance_scale: float = 1.0) -> nn.Module:
    """The ``model(x_t, t)`` to sample ``net`` with: the net itself (no labels; a conditional net then predicts
    unconditionally), the net with fixed labels (scale 1), or classifier-free guidance (any other scale)."""
    guidance_scale = float(guidance_scale)
    if labels is None:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs class labels to guide towards (class_label)")
        return net
    if guidance_scale == 1.0:
        return ConditionalModel(net, labels)  # s = 1 is the conditional prediction: one forward pass, not two
    return ClassifierFreeGuidance(net, labels, guidance_scale)


def make_class_labels(class_labels: int | Sequence[int] | Tensor | None, num_samples: int, num_classes: int | None,
                      device: torch.device | str | None = None) -> Tensor | None:
    """(num_samples,) int64 labels from one class index (every sample), a sequence/tensor of them, or None.

    None stays None (unconditional). Raises if the model is unconditional or a label is outside [0, K-1].
    """
    if class_labels is None:
        return None
    if num_classes is None:
        raise ValueError("class labels were given, but the model is unconditional (model.num_classes=null): "
                         "train with conditional=true, or sample without class labels")
    labels = torch.as_tensor(class_labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"class labels must be integer class indices, got {class_labels!r}")
    if labels.ndim == 0:
        labels = torch.full((num_samples,), int(labels), dtype=torch.long)
    else:
        labels = labels.long().reshape(-1)
        if labels.numel() != num_samples:
            raise ValueError(f"{labels.numel()} class labels for {num_samples} samples: give one per sample")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must be in [0, {num_classes - 1}] (the model has {num_classes} classes), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(device)
