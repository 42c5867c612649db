"""The data pipeline alone at 256x256: training-ready images/s per CPU core of each reader against torchvision.

    python benchmarks/data_throughput.py [--out DIR] [--images 256] [--rounds 5] [--size 256] [--source-size 1024]
    python benchmarks/data_throughput.py --smoke --out DIR      # tiny, for the test suite

Readers (ours), each against the baseline most people write, torchvision's ``ImageFolder`` with ``Resize(size)``,
``CenterCrop(size)``, ``RandomHorizontalFlip()``, ``ToTensor()`` and ``Normalize(0.5, 0.5)`` (x * 2 - 1), on the
same encoded images:

1. ``image_folder`` (``ImageFolderDataModule``, what ``data=celebahq`` is) on a folder of CelebA-HQ-like square
   JPEGs of ``--source-size`` (``write_image_folder``, generated into ``<root>/all/`` so that torchvision's
   ImageFolder sees one class; ours searches recursively and reads the same files);
2. ``shards`` (``ShardsDataModule``) prepared from that folder by ``python -m src.data.prepare source=celebahq`` in
   a subprocess (LitData's ``optimize`` sets the start method to spawn for the whole process), against the baseline
   on the original JPEGs;
3. ``lsun_mixed`` (``LSUNDataModule``) on a generated LMDB of records ``size`` on the shorter side, alternately WebP
   and JPEG (``write_lsun_lmdb``), against the baseline on the same encoded bytes written out as files (.webp,
   .jpg); ``lsun_jpeg``: the same with every record JPEG (the WebP ones re-encoded).

Per core: everything in this process with one torch thread and ``num_workers=0`` loaders. After a warm-up, rounds of
``--images`` images are interleaved (the order alternates between rounds); per side the median images/s over the
rounds, by wall clock (the headline) and by this process's CPU time (steadier on a shared machine). Training-ready:
the baseline's loader gives float tensors in [-1, 1]; ours gives uint8 ``ImageBatch``es, and ``to_model_batch(batch,
train=True)`` (scaling and flips, run on the GPU in training) is timed separately on the CPU: the loader's rate is
what the CPU must deliver, the rate with the conversion is reported beside it. A run of each side with
``num_workers=2`` (alone, not interleaved: idle persistent workers would prefetch during the other side's round)
checks that workers scale.

Context: the images/s one GPU consumes training the paper's 113.7M-parameter 256x256 U-Net (training FLOPs per
image = 3 x the forward's, counted by ``src.bench.report.forward_flops_per_image`` on the meta device) at a stated
sustained bf16 throughput (H100: 40 % of 989.4 TFLOP/s dense; A100: 40 % of 312), and the CPU cores each reader
needs to feed 8 such GPUs. Prints a table and writes ``data_throughput.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ours / baseline images/s per core the issue asks for
TARGETS = {"image_folder": 1.5, "shards": 5.0, "lsun_mixed": 1.5, "lsun_jpeg": 1.5}
READERS = tuple(TARGETS)
# sustained bf16 throughput assumed for the GPU context: (name, dense peak FLOP/s, fraction sustained)
GPUS = (("H100", 989.4e12, 0.40), ("A100", 312.0e12, 0.40))
GPUS_PER_NODE = 8
# the paper's 256x256 U-Net (configs/experiment/paper256/common.yaml) and its global batch
UNET_256 = {"ch": 128, "ch_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2, "attn_resolutions": (16,),
            "dropout": 0.0}
GLOBAL_BATCH = 64


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- the data
def lsun_record_size(size: int) -> tuple[int, int]:
    """(width, height) of the generated LSUN records: ``size`` on the shorter side, 4:3 (342x256 at 256)."""
    return math.ceil(size * 4 / 3), size


def export_lmdb(lmdb_dir: Path, folder: Path) -> dict[str, int]:
    """Every value of the LMDB written as ``folder/<key><suffix>`` (.webp or .jpg by its format): the same bytes
    as files, for the baseline. Returns the count per format."""
    import lmdb
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=False)
    with env.begin() as txn:
        for key, value in txn.cursor():
            with Image.open(io.BytesIO(value)) as img:
                fmt = img.format
            (folder / (bytes(key).decode() + {"WEBP": ".webp", "JPEG": ".jpg"}[fmt])).write_bytes(value)
            counts[fmt] = counts.get(fmt, 0) + 1
    env.close()
    return counts


def jpeg_only_lmdb(source: Path, target: Path) -> None:
    """A copy of the LMDB at ``source`` with every WebP record re-encoded as JPEG (quality 90, as the generator's)."""
    import lmdb
    from PIL import Image

    from src.data.synthetic import encode

    target.mkdir(parents=True, exist_ok=True)
    env_in = lmdb.open(str(source), readonly=True, lock=False)
    env_out = lmdb.open(str(target), map_size=1 << 30)
    with env_in.begin() as txn_in, env_out.begin(write=True) as txn_out:
        for key, value in txn_in.cursor():
            with Image.open(io.BytesIO(value)) as img:
                if img.format != "JPEG":
                    value = encode(img.convert("RGB"), "JPEG")
            txn_out.put(bytes(key), value)
    env_in.close()
    env_out.close()


def prepare_shards(source: Path, out: Path, size: int, run_dir: Path) -> float:
    """``python -m src.data.prepare source=celebahq`` on the JPEG folder, in a subprocess; its seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "src.data.prepare", "source=celebahq", f"source.root={source}",
         f"source.image_size={size}", "source.val_fraction=0.0", "splits=[train]", f"out={out}", "num_workers=1",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"src.data.prepare failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def make_data(work: Path, args: argparse.Namespace, readers: tuple[str, ...]) -> dict[str, Any]:
    """Generate every input the readers need under ``work``; what was made, with sizes and seconds."""
    from src.data.synthetic import write_image_folder, write_lsun_lmdb

    made: dict[str, Any] = {}
    if {"image_folder", "shards"} & set(readers):
        start = time.perf_counter()
        folder = write_image_folder(work / "jpeg" / "all", count=args.files, size=args.source_size)
        sizes = [p.stat().st_size for p in folder.iterdir()]
        made["jpeg"] = {"root": str(work / "jpeg"), "files": len(sizes), "side": args.source_size,
                        "mean_bytes": statistics.mean(sizes), "seconds": time.perf_counter() - start}
        say(f"wrote {len(sizes)} {args.source_size}x{args.source_size} JPEGs ({statistics.mean(sizes) / 1e3:.0f} kB "
            f"each) in {made['jpeg']['seconds']:.0f} s")
    if "shards" in readers:
        seconds = prepare_shards(work / "jpeg", work / "shards", args.size, work / "prepare-run")
        made["shards"] = {"root": str(work / "shards"), "seconds": seconds}
        say(f"prepared shards in {seconds:.0f} s")
    if {"lsun_mixed", "lsun_jpeg"} & set(readers):
        start = time.perf_counter()
        mixed = write_lsun_lmdb(work / "lsun", count=args.files, corrupt=0, size=lsun_record_size(args.size))
        made["lsun_mixed"] = {"root": str(mixed), "formats": export_lmdb(mixed, work / "lsun_files" / "all"),
                              "files_root": str(work / "lsun_files")}
        if "lsun_jpeg" in readers:
            jpeg = work / "lsun_jpeg" / "bedroom_train_lmdb"
            jpeg_only_lmdb(mixed, jpeg)
            made["lsun_jpeg"] = {"root": str(jpeg), "formats": export_lmdb(jpeg, work / "lsun_jpeg_files" / "all"),
                                 "files_root": str(work / "lsun_jpeg_files")}
        for name in ("lsun_mixed", "lsun_jpeg"):
            if name in made:
                files = list(Path(made[name]["files_root"]).rglob("*.*"))
                made[name]["mean_bytes"] = statistics.mean(p.stat().st_size for p in files)
                made[name]["record"] = list(lsun_record_size(args.size))
        say(f"wrote the LSUN LMDBs and their files in {time.perf_counter() - start:.0f} s")
    return made


# --------------------------------------------------------------------------------------------- the sides
def baseline_loader(root: str, size: int, batch_size: int, num_workers: int) -> Any:
    """torchvision's ImageFolder with the usual transforms: float (B, 3, size, size) in [-1, 1]."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    dataset = datasets.ImageFolder(root, transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0), persistent_workers=num_workers > 0)


def our_datamodule(reader: str, made: dict[str, Any], args: argparse.Namespace, num_workers: int) -> Any:
    from src.data import ImageFolderDataModule, LSUNDataModule, ShardsDataModule

    common = {"image_size": args.size, "batch_size": args.batch_size, "num_workers": num_workers,
              "pin_memory": False, "seed": 0}
    if reader == "image_folder":  # data=celebahq, all files in the train split
        dm = ImageFolderDataModule(root=made["jpeg"]["root"], val_fraction=0.0, **common)
    elif reader == "shards":
        cache = Path(made["shards"]["root"]).parent / "litdata-cache"  # LitData's, inside the generated data
        dm = ShardsDataModule(root=made["shards"]["root"], cache_dir=str(cache), **common)
    else:
        dm = LSUNDataModule(root=made[reader]["root"], val_fraction=0.0, **common)
    dm.setup("fit")
    return dm


class Feed:
    """Batches of one loader, epoch after epoch (a new iterator at each epoch's end), timed by the round.

    ``convert`` turns a loader batch into the model's ``(x, y)`` (ours: ``to_model_batch``), timed apart."""

    def __init__(self, loader: Any, convert: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.loader, self.convert = loader, convert
        self.iterator: Any = None
        self.epochs = 0
        self.last: dict[str, Any] = {}

    def _next(self) -> Any:
        while True:
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
                self.epochs += 1

    def take(self, n: int) -> dict[str, float]:
        """Whole batches until at least ``n`` images; the images, and wall and CPU seconds of loading and of
        converting."""
        got, wall, cpu, conv_wall, conv_cpu = 0, 0.0, 0.0, 0.0, 0.0
        while got < n:
            w0, c0 = time.perf_counter(), time.process_time()
            batch = self._next()
            w1, c1 = time.perf_counter(), time.process_time()
            wall, cpu = wall + w1 - w0, cpu + c1 - c0
            raw = batch[0]
            x = raw
            if self.convert is not None:
                x, _ = self.convert(batch)
                conv_wall, conv_cpu = conv_wall + time.perf_counter() - w1, conv_cpu + time.process_time() - c1
            got += len(x)
        self.last = {"loader": describe(raw), "model": describe(x)}
        return {"images": got, "seconds": wall, "cpu_seconds": cpu, "convert_seconds": conv_wall,
                "convert_cpu_seconds": conv_cpu}

    def close(self) -> None:
        """Stop the loader's workers now (persistent workers would outlive the side, and a later fork would
        inherit the iterator that owns them)."""
        if self.iterator is not None and hasattr(self.iterator, "gi_frame"):
            self.iterator.close()  # LitData's loader iterates through a generator around torch's iterator
        for iterator in (self.iterator, getattr(self.loader, "_iterator", None)):
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self.iterator = None
        if getattr(self.loader, "_iterator", None) is not None:
            self.loader._iterator = None
        gc.collect()


def describe(x: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."), "min": float(x.min()),
            "max": float(x.max())}


def rate(rounds: list[dict[str, float]], seconds: Callable[[dict[str, float]], float]) -> float:
    return statistics.median(r["images"] / max(seconds(r), 1e-12) for r in rounds)


def summarise(rounds: list[dict[str, float]], feed: Feed, requested: int, with_convert: bool) -> dict[str, Any]:
    out = {"images_per_s": rate(rounds, lambda r: r["seconds"]),
           "images_per_cpu_s": rate(rounds, lambda r: r["cpu_seconds"]),
           "requested": requested, "delivered": [r["images"] for r in rounds], "batch": feed.last, "rounds": rounds}
    if with_convert:
        out["images_per_s_with_to_model_batch"] = rate(rounds, lambda r: r["seconds"] + r["convert_seconds"])
        out["images_per_cpu_s_with_to_model_batch"] = rate(
            rounds, lambda r: r["cpu_seconds"] + r["convert_cpu_seconds"])
        out["to_model_batch_images_per_s"] = rate(rounds, lambda r: r["convert_seconds"])
    return out


def interleave(feeds: dict[str, Feed], images: int, rounds: int, warmup: int) -> dict[str, list[dict[str, float]]]:
    """A warm-up take per side, then ``rounds`` rounds of ``images`` per side, the order reversed every other round
    (the first side of a round tends to run on a colder cache)."""
    names = list(feeds)
    for name in names:
        feeds[name].take(warmup)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(feeds[name].take(images))
        say(f"  round {round_ + 1}/{rounds}: " + ", ".join(
            f"{n} {times[n][-1]['images'] / times[n][-1]['seconds']:.0f} img/s" for n in names))
    return times


def workers_check(feed: Feed, images: int, rounds: int, warmup: int) -> dict[str, Any]:
    """One side alone with ``num_workers=2``: warm-up (the workers start), ``rounds`` back-to-back takes."""
    try:
        feed.take(warmup)
        times = [feed.take(images) for _ in range(rounds)]
    finally:
        feed.close()
    return {"images_per_s": rate(times, lambda r: r["seconds"]), "delivered": [r["images"] for r in times],
            "batch": feed.last, "rounds": times}


# --------------------------------------------------------------------------------------------- measuring
GROUPS = {"jpeg": ("image_folder", "shards"), "lsun_mixed": ("lsun_mixed",), "lsun_jpeg": ("lsun_jpeg",)}
FILES_TEXT = {
    "image_folder": "{side}x{side} JPEG files ({kb:.0f} kB)",
    "shards": "shards prepared from those JPEGs; baseline on the JPEGs",
    "lsun_mixed": "LMDB, {w}x{h} WebP+JPEG ({kb:.0f} kB); baseline: same bytes as files",
    "lsun_jpeg": "LMDB, {w}x{h} JPEG only ({kb:.0f} kB); baseline: same bytes as files",
}


def baseline_root(group: str, made: dict[str, Any]) -> str:
    return made["jpeg"]["root"] if group == "jpeg" else made[group]["files_root"]


def measure(made: dict[str, Any], args: argparse.Namespace, readers: tuple[str, ...]) -> dict[str, Any]:
    warmup = min(args.images, 2 * args.batch_size)
    results: dict[str, Any] = {}
    for group, members in GROUPS.items():
        members = tuple(r for r in members if r in readers)
        if not members:
            continue
        say(f"{group}: {', '.join(members)} against torchvision, {args.rounds} interleaved rounds of {args.images}")
        modules = {r: our_datamodule(r, made, args, 0) for r in members}
        feeds = {r: Feed(dm.train_dataloader(), lambda b, dm=dm: dm.to_model_batch(b, train=True))
                 for r, dm in modules.items()}
        feeds["baseline"] = Feed(baseline_loader(baseline_root(group, made), args.size, args.batch_size, 0))
        times = interleave(feeds, args.images, args.rounds, warmup)
        baseline = summarise(times["baseline"], feeds["baseline"], args.images, with_convert=False)
        workers: dict[str, Any] = {}
        if args.worker_rounds:
            say(f"{group}: num_workers=2, each side alone, {args.worker_rounds} rounds")
            for r in members:
                workers[r] = workers_check(Feed(our_datamodule(r, made, args, 2).train_dataloader()),
                                           args.images, args.worker_rounds, warmup)
            workers["baseline"] = workers_check(
                Feed(baseline_loader(baseline_root(group, made), args.size, args.batch_size, 2)),
                args.images, args.worker_rounds, warmup)
        for r in members:
            ours = summarise(times[r], feeds[r], args.images, with_convert=True)
            ratio = ours["images_per_s"] / baseline["images_per_s"]
            entry = {
                "files": files_text(r, made, args), "ours": ours, "baseline": baseline, "ratio": ratio,
                "ratio_cpu_time": ours["images_per_cpu_s"] / baseline["images_per_cpu_s"],
                "ratio_with_to_model_batch": ours["images_per_s_with_to_model_batch"] / baseline["images_per_s"],
                "target": TARGETS[r], "met": ratio >= TARGETS[r],
            }
            if workers:
                entry["workers_2"] = {
                    "ours_images_per_s": workers[r]["images_per_s"],
                    "baseline_images_per_s": workers["baseline"]["images_per_s"],
                    "ours_speedup_over_one_process": workers[r]["images_per_s"] / ours["images_per_s"],
                    "baseline_speedup_over_one_process": workers["baseline"]["images_per_s"]
                    / baseline["images_per_s"],
                    "ours": workers[r], "baseline": workers["baseline"]}
            results[r] = entry
        for feed in feeds.values():
            feed.close()
    return results


def files_text(reader: str, made: dict[str, Any], args: argparse.Namespace) -> str:
    if reader in ("image_folder", "shards"):
        return FILES_TEXT[reader].format(side=args.source_size, kb=made["jpeg"]["mean_bytes"] / 1e3)
    w, h = made[reader]["record"]
    return FILES_TEXT[reader].format(w=w, h=h, kb=made[reader]["mean_bytes"] / 1e3)


# --------------------------------------------------------------------------------------------- GPU context
def gpu_context(readers: dict[str, Any], image_size: int = 256) -> dict[str, Any]:
    """Images/s one GPU consumes training the paper's 256x256 U-Net, and the cores each reader needs for 8 (from the
    readers' rates at the size they ran at: 256 in a real run)."""
    from src.bench.report import count_params, flops_per_image, forward_flops_per_image
    from src.models.unet import UNet

    with torch.device("meta"):  # shapes only: the count is that of the CPU (same ops), in no time
        model = UNet(in_channels=3, resolution=image_size, **UNET_256)
    forward = forward_flops_per_image(model, 3, image_size, torch.device("meta"))
    if forward is None:
        raise RuntimeError("the FLOP count of the U-Net failed")
    train = flops_per_image("train", forward, {})
    gpus = {}
    for name, peak, fraction in GPUS:
        per_s = peak * fraction / train
        gpus[name] = {
            "peak_bf16_flops": peak, "sustained_fraction": fraction, "sustained_flops": peak * fraction,
            "images_per_s": per_s, "steps_per_s_at_global_batch_64_on_8": GPUS_PER_NODE * per_s / GLOBAL_BATCH,
            "cores_for_8_gpus": {
                reader: {side: GPUS_PER_NODE * per_s / entry[side]["images_per_s"] for side in ("ours", "baseline")}
                for reader, entry in readers.items()},
        }
    return {"model": "paper's 256x256 U-Net (ch 128, ch_mult 1,1,2,2,4,4, attention at 16, 2 res-blocks)",
            "image_size": image_size, "params": count_params(model), "forward_flops_per_image": forward,
            "train_flops_per_image": train, "assumption": "training FLOPs = 3 x forward (forward + backward); "
            "sustained bf16 = 40 % of the dense peak (H100 SXM 989.4 TFLOP/s, A100 312 TFLOP/s)", "gpus": gpus}


# --------------------------------------------------------------------------------------------- report
def table(readers: dict[str, Any]) -> str:
    rows = [("reader", "files", "ours img/s/core", "baseline img/s/core", "ratio", "target", "met?",
             "ours +to_model_batch", "ratio (CPU time)")]
    for name, e in readers.items():
        rows.append((name, e["files"], f"{e['ours']['images_per_s']:.1f}", f"{e['baseline']['images_per_s']:.1f}",
                     f"{e['ratio']:.2f}", f">= {e['target']:g}", "yes" if e["met"] else "NO",
                     f"{e['ours']['images_per_s_with_to_model_batch']:.1f}", f"{e['ratio_cpu_time']:.2f}"))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    workers = [(n, e["workers_2"]) for n, e in readers.items() if "workers_2" in e]
    if workers:
        lines += ["", "| reader | ours img/s, 2 workers | x one process | baseline img/s, 2 workers | x one process |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {w['ours_images_per_s']:.1f} | {w['ours_speedup_over_one_process']:.2f} | "
                  f"{w['baseline_images_per_s']:.1f} | {w['baseline_speedup_over_one_process']:.2f} |"
                  for n, w in workers]
    return "\n".join(lines)


def gpu_text(gpu: dict[str, Any]) -> str:
    lines = [f"GPU context: {gpu['model']}, {gpu['params'] / 1e6:.1f}M parameters, "
             f"{gpu['forward_flops_per_image'] / 1e9:.0f} GFLOP forward, {gpu['train_flops_per_image'] / 1e12:.2f} "
             f"TFLOP per training image ({gpu['assumption']})"]
    for name, g in gpu["gpus"].items():
        cores = ", ".join(f"{r} {c['ours']:.1f} (baseline {c['baseline']:.1f})"
                          for r, c in g["cores_for_8_gpus"].items())
        lines.append(f"  {name}: {g['sustained_flops'] / 1e12:.0f} TFLOP/s sustained -> {g['images_per_s']:.0f} "
                     f"images/s per GPU; CPU cores to feed 8: {cores}")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    for key in ("images", "rounds", "size", "source_size", "batch_size", "files"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be at least 1")
    if args.source_size < args.size:
        raise SystemExit("--source-size must be at least --size (the readers refuse to upscale)")
    if args.files < args.batch_size:
        raise SystemExit("--files must be at least --batch-size (the training loaders drop a ragged batch)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder for data_throughput.json (default: a new temporary folder)")
    parser.add_argument("--images", type=int, default=256, help="images per side and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side")
    parser.add_argument("--size", type=int, default=256, help="training resolution")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the generated square JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--files", type=int, default=None, help="images generated per source (default: --images)")
    parser.add_argument("--worker-rounds", type=int, default=3, help="rounds of the num_workers=2 check (0: skip)")
    parser.add_argument("--readers", default=",".join(READERS), help=f"comma-separated subset of {','.join(READERS)}")
    parser.add_argument("--keep-data", action="store_true", help="keep the generated data under --out")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny: 24 images of 96x96 sources at 32, batch 8, 2 rounds, 1 worker round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.rounds, args.size, args.source_size, args.batch_size = 24, 2, 32, 96, 8
        args.worker_rounds = min(args.worker_rounds, 1)
    args.files = args.files or args.images
    check_args(args)
    readers = tuple(r.strip() for r in args.readers.split(",") if r.strip())
    if unknown := set(readers) - set(READERS):
        raise SystemExit(f"unknown readers {sorted(unknown)}; choose from {', '.join(READERS)}")

    torch.set_num_threads(1)  # one core: the loader, its conversion and the baseline in this process alone
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="data_throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "data"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    os.environ["DDPM_CACHE_DIR"] = str(work / "cache")  # the LMDB key lists are cached there, not in ~/.cache
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        made = make_data(work, args, readers)
        results = measure(made, args, readers)
    finally:
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep_data")} | {"readers": readers},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "torch": torch.__version__, "seconds": time.perf_counter() - start},
        "data": made,
        "readers": results,
        "gpu": gpu_context(results),
    }
    (out / "data_throughput.json").write_text(json.dumps(report, indent=1))
    print(table(results))
    print()
    print(gpu_text(report["gpu"]))
    print(f"\nwrote {out / 'data_throughput.json'}")
    return report


if __name__ == "__main__":
    main()
