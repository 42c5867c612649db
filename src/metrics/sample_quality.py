"""Sample metrics of a model: the digits classifier-feature Fréchet distance and the sliced Wasserstein distance, each
next to its floor (the same number for real data at the same count), and FID/IS/KID with torch-fidelity."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.utils.images import to_uint8


def classifier_fd(samples: torch.Tensor, data_config: Mapping[str, Any], seed: int = 0) -> dict[str, float]:
    """Fréchet distance of 8x8 digit samples to the test split in the digits classifier's features, and that of
    as many real digits (seeded by ``seed``)."""
    from src.metrics import DigitsFrechetDistance

    target = str(data_config.get("_target_", ""))
    if not target.endswith("DigitsDataModule") or tuple(samples.shape[1:]) != (1, 8, 8):
        raise ValueError("metric=fd_digits_classifier needs a model of the 8x8 digits data; this checkpoint "
                         f"models {data_config.get('_target_')} of shape {tuple(samples.shape[1:])}")
    fd = DigitsFrechetDistance(split="test", seed=int(data_config.get("seed", 0)))
    # the real data on the 8-bit grid, as the samples are
    return {"fd_digits_classifier": fd(to_uint8(samples).float() / 127.5 - 1),
            "fd_digits_classifier_real_floor": fd.reference_fd_of_real_data(len(samples), seed=seed)}


def sliced_wasserstein(samples: torch.Tensor, data_config: Mapping[str, Any], seed: int = 0) -> dict[str, float]:
    """Sliced Wasserstein distance of 2-D samples to fresh points of the true distribution, and that of as many
    other fresh points."""
    from src.data.base import BaseDataModule
    from src.metrics import sliced_wasserstein_distance

    datamodule = instantiate(OmegaConf.create(data_config))
    has_reference = isinstance(datamodule, BaseDataModule) and datamodule.has_reference_distribution
    if not has_reference or samples.dim() != 2:
        raise ValueError("metric=swd needs a model of 2-D toy data (data=toy2d)")
    generator = torch.Generator().manual_seed(seed)
    reference = datamodule.sample_reference(len(samples), seed=seed)
    return {"swd": sliced_wasserstein_distance(samples, reference, generator=generator),
            "swd_real_floor": sliced_wasserstein_distance(datamodule.sample_reference(len(samples), seed=seed + 1),
                                                          reference, generator=generator)}


def class_accuracy(samples: torch.Tensor, labels: torch.Tensor | None, data_config: Mapping[str, Any],
                   seed: int = 0) -> dict[str, float]:
    """How often the digits classifier names the class each 8x8 digit sample was drawn for (what classifier-free
    guidance aims at), overall and per class, next to the classifier's accuracy on the real test digits; and the
    share of pixels at either end of the 8-bit range in the samples and in the real digits (strong guidance pushes
    predicted x0 out of [-1, 1]: clipped, the images saturate and this share climbs above the real one)."""
    from src.metrics.digits_classifier import (
        CLASSIFIER_DATA_SEED,
        classifier_accuracy,
        digits_split,
        load_digits_classifier,
    )

    target = str(data_config.get("_target_", ""))
    if not target.endswith("DigitsDataModule") or tuple(samples.shape[1:]) != (1, 8, 8):
        raise ValueError("metric=class_accuracy scores with the digits classifier: it needs a model of the 8x8 "
                         f"digits data; this checkpoint models {data_config.get('_target_')} of shape "
                         f"{tuple(samples.shape[1:])}")
    if labels is None:
        raise ValueError("metric=class_accuracy needs the class each sample was drawn for: a class-conditional "
                         "checkpoint (trained with conditional=true), or a samples.npz of one with its labels")
    labels = torch.as_tensor(labels).long()
    if len(labels) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
    classifier = load_digits_classifier()
    images = to_uint8(samples)  # the 8-bit grid, as written to disk
    with torch.no_grad():
        predicted = torch.cat([classifier(images[i:i + 1024].float() / 127.5 - 1).argmax(dim=1)
                               for i in range(0, len(images), 1024)])
    hit = (predicted == labels).double()
    real, _ = digits_split("test", int(data_config.get("seed", 0)))
    summary = {"class_accuracy": float(hit.mean()),
               "class_accuracy_real_digits": classifier_accuracy(classifier, "test", CLASSIFIER_DATA_SEED),
               "extreme_pixels": float(((images == 0) | (images == 255)).double().mean()),
               "extreme_pixels_real_digits": float(((to_uint8(real) == 0) | (to_uint8(real) == 255)).double().mean())}
    for k in sorted(set(labels.tolist())):
        summary[f"class_accuracy_{k}"] = float(hit[labels == k].mean())
    return summary


SAMPLE_METRICS = {"fd_digits_classifier": classifier_fd, "swd": sliced_wasserstein}


def data_sample_metric(data_config: Mapping[str, Any]) -> str:
    """The sample metric that fits a run's data: the digits classifier FD on digits, SWD on toy 2-D data, else FID."""
    target = str(data_config.get("_target_", ""))
    if target.endswith("DigitsDataModule"):
        return "fd_digits_classifier"
    if target.endswith("Toy2DDataModule"):
        return "swd"
    return "fid"


def sample_quality(metric: str, samples: torch.Tensor, data_config: Mapping[str, Any], *, seed: int = 0,
                   sampling_seconds: float = 0.0) -> dict[str, float]:
    """``metric`` (a key of ``SAMPLE_METRICS``) of ``samples`` of a model of the data ``data_config`` builds."""
    summary = {"num_samples": len(samples), "sampling_seconds": sampling_seconds}
    return summary | SAMPLE_METRICS[metric](samples, data_config, seed)


def evaluate_fid(samples: torch.Tensor | str, reference: str, device: torch.device, *,
                 datamodule: Callable[[], Any] | None = None, seed: int = 0, sampling_seconds: float = 0.0,
                 metrics: Sequence[str] = ("fid", "isc", "kid"), weights_path: str | None = None,
                 cache_dir: str | None = None, feature: int = 2048, batch_size: int = 250, kid_subset_size: int = 1000,
                 max_reference: int = 50_000) -> dict[str, Any]:
    """FID/IS/KID with torch-fidelity of ``samples`` (images in [-1, 1], or a folder / npz) against ``reference``:
    ``train`` or ``test`` (that split of the DataModule ``datamodule()`` builds) or a folder / npz of images."""
    from src.metrics.fidelity import compute_fidelity

    if isinstance(samples, torch.Tensor):
        samples = to_uint8(samples).permute(0, 2, 3, 1).contiguous()
    images, split = reference, "train"
    if reference in ("train", "test"):
        if datamodule is None:
            raise ValueError(f"fid.reference={reference} needs the checkpoint's data")
        images, split = datamodule(), reference
    result = compute_fidelity(
        samples, images, metrics=tuple(metrics), weights_path=weights_path, cache_root=cache_dir, device=device,
        batch_size=int(batch_size), kid_subset_size=int(kid_subset_size), max_reference=int(max_reference),
        seed=int(seed), feature=int(feature), reference_split=split,
    )
    from src.metrics.fidelity import image_dataset

    count = len(samples) if not isinstance(samples, str) else len(image_dataset(samples))  # headers only
    return {**result, "num_samples": count,
            "sampling_seconds": sampling_seconds, "reference": str(reference)}
