"""Prepare streamed shards once: `python -m src.data.prepare source=lsun source.root=<lmdb> out=<folder or s3://...>`.

Every image of the source's splits is decoded, centre-cropped and resized by the source's own DataModule (exactly
what training on the source would see, before flips), then written with LitData's ``optimize`` as uint8 HWC arrays
in shard files of ``chunk_bytes`` under ``<out>/<split>``: training from them (``data=shards``) decodes nothing.
Each sample keeps its index in the source split (``index``), which decides its random flips, and its label.

Unreadable source images are not dropped silently: they are left out of the shards, listed in
``unreadable.json`` in the run folder, and counted in the log.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
REMOTE = ("s3://", "gs://", "gcs://", "azure://", "az://", "hf://")


def is_remote(url: str) -> bool:
    return str(url).startswith(REMOTE)


def split_dataset(datamodule: Any, split: str) -> Any:
    """A split of ``datamodule`` as its items come before any random flip: ``(uint8 (C, H, W), label, index)`` for
    the uint8-image modules, ``(x in [-1, 1], label)`` for the others."""
    from src.data.uint8_images import Uint8ImagesDataModule

    dataset = getattr(datamodule, f"{split}_set")
    if dataset is None or len(dataset) == 0:
        return None
    if split == "train" and datamodule.train_flips and not isinstance(datamodule, Uint8ImagesDataModule):
        dataset = datamodule.unflipped_train_set()
    return dataset


def as_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """An item's image (uint8, or float in [-1, 1] on the 8-bit grid) as uint8 H x W x C."""
    if image.dtype != torch.uint8:
        image = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return image.permute(1, 2, 0).contiguous().numpy()


class ReadItem:
    """LitData's ``fn``: item ``i`` of the split as a shard sample, or None (left out, and recorded in
    ``bad_dir``) when the source cannot read it. Picklable, so optimize's worker processes each get a copy."""

    def __init__(self, dataset: Any, bad_dir: Path) -> None:
        self.dataset, self.bad_dir = dataset, bad_dir

    def __call__(self, i: int) -> dict[str, Any] | None:
        try:
            item = self.dataset[i]
        except Exception as err:  # a corrupt file or record: recorded, never silently dropped
            with open(self.bad_dir / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps({"index": i, "error": f"{type(err).__name__}: {err}"}) + "\n")
            return None
        image, label = item[0], item[1]
        return {"image": as_uint8_hwc(image), "label": int(label), "index": int(i)}


def unreadable(bad_dir: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(bad_dir.glob("*.jsonl")):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(found, key=lambda r: r["index"])


def check_out(out: str, overwrite: bool) -> None:
    """Refuse to write over shards at a local ``out`` unless ``overwrite``."""
    if is_remote(out):
        return  # LitData's optimize refuses a non-empty remote folder itself unless mode="overwrite"
    existing = [p for p in Path(out).glob("*/index.json")]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({', '.join(str(p.parent.name) for p in existing)}): "
                              "choose another out, or set overwrite=true to replace them")


def prepare(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Write the shards of every non-empty split of ``cfg.source`` under ``cfg.out``; a summary per split."""
    from litdata import optimize

    out = str(cfg.out)
    if not out or out == "None":
        raise ValueError("out must be a folder or an object-store URL (s3://bucket/prefix) to write the shards to")
    check_out(out, bool(cfg.overwrite))
    for split in cfg.splits:
        if split not in SPLITS:
            raise ValueError(f"splits must name train, val or test, got {split!r}")
    source = OmegaConf.to_container(cfg.source, resolve=True)
    datamodule = instantiate(cfg.source)
    datamodule.prepare_data()
    datamodule.setup("fit")
    summary: dict[str, Any] = {"source": source, "out": out, "splits": {}}
    workers = int(cfg.num_workers) if cfg.num_workers is not None else max(1, os.cpu_count() or 1)
    for split in cfg.splits:
        dataset = split_dataset(datamodule, split)
        if dataset is None:
            log.info("%s: no %s split, skipped", type(datamodule).__name__, split)
            continue
        bad_dir = run_dir / f"unreadable-{split}"
        shutil.rmtree(bad_dir, ignore_errors=True)
        bad_dir.mkdir(parents=True)
        target = f"{out.rstrip('/')}/{split}"
        if not is_remote(out) and bool(cfg.overwrite):
            shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        optimize(fn=ReadItem(dataset, bad_dir), inputs=list(range(len(dataset))), output_dir=target,
                 chunk_bytes=str(cfg.chunk_bytes), num_workers=min(workers, len(dataset)),
                 mode="overwrite" if cfg.overwrite else None, verbose=False)
        seconds = time.perf_counter() - start
        bad = unreadable(bad_dir)
        shutil.rmtree(bad_dir, ignore_errors=True)
        written = len(dataset) - len(bad)
        summary["splits"][split] = {"images": written, "unreadable": len(bad), "seconds": round(seconds, 1),
                                    "images_per_second": round(written / max(seconds, 1e-9), 1),
                                    "shape": list(datamodule.data_shape)}
        log.info("%s: %d images written to %s in %.0f s (%.0f images/s with %d processes)", split, written, target,
                 seconds, written / max(seconds, 1e-9), workers)
        if bad:
            (run_dir / f"unreadable-{split}.json").write_text(json.dumps(bad, indent=1))
            log.warning("%s: %d of %d source images are unreadable and were left out (first: %s); the list is in "
                        "%s", split, len(bad), len(dataset), bad[0], run_dir / f"unreadable-{split}.json")
        if written == 0:
            raise RuntimeError(f"no image of the {split} split could be read: see {run_dir}/unreadable-{split}.json")
    if not summary["splits"]:
        raise ValueError(f"the source has none of the splits {list(cfg.splits)} with images")
    (run_dir / "prepare.json").write_text(json.dumps(summary, indent=2))
    return summary


@hydra.main(version_base="1.3", config_path="../../configs", config_name="prepare.yaml")
def main(cfg: DictConfig) -> None:
    from src.utils.process import prepare_process
    from src.utils.run_folder import mark_progress

    prepare_process()
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    prepare(cfg, run_dir)
    mark_progress()


if __name__ == "__main__":
    main()
