"""Samples written as shards named by their index range, so that a long sampling run survives being stopped.

A run of ``num_samples`` is cut into shards of ``shard_size`` consecutive sample indices; shard ``[a, b)`` is
``<out>/shards/<a:08d>-<b:08d>.npz`` (key ``samples``: uint8 N x H x W x C for images, float32 N x D for points;
``labels``: int64 N for conditional samples), written atomically when all its samples are done, after its PNGs.
A crash (SIGKILL included) loses the shards in flight, never a finished one. ``shards/manifest.json`` records
what the samples are (checkpoint, sampler, seed, count, ...): a rerun into the same folder keeps the complete
shards whose manifest matches and draws the rest; a rerun with other settings is refused before it draws.

When every shard is there, the shards are merged in index order into ``samples.npz`` (written as a stream, one
shard in memory at a time, ZIP64 beyond 4 GB) and removed; the manifest stays, marked complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from src.utils.files import TEMP_MARK, atomic_write, atomic_write_text

log = logging.getLogger(__name__)

SHARD_DIR = "shards"
MANIFEST = "manifest.json"
MERGED = "samples.npz"
_NAME = re.compile(r"^(\d{8})-(\d{8})\.npz$")
# settings that may change between a run and its continuation: they do not change what sample k is
FREE_KEYS = ("batch_size", "devices", "checkpoint")  # the checkpoint is known by its sha256, not its path


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """[0, s), [s, 2s), ... covering ``range(num_samples)``."""
    return [range(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def shard_path(out_dir: Path, indices: range) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{indices.start:08d}-{indices.stop:08d}.npz"


def shard_files(out_dir: Path) -> dict[range, Path]:
    """The shard files in ``out_dir/shards``, by their index range."""
    folder = Path(out_dir) / SHARD_DIR
    found = {}
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        match = _NAME.match(path.name)
        if match:
            found[range(int(match[1]), int(match[2]))] = path
    return found


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (a checkpoint of several GB hashes in seconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ the manifest
def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / SHARD_DIR / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a sampling manifest ({err}); move the folder {out_dir} aside or sample "
                         "into another out_dir") from err


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_text(Path(out_dir) / SHARD_DIR / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def check_manifest(out_dir: Path, manifest: Mapping[str, Any], resume: bool) -> dict[str, Any] | None:
    """Compare ``manifest`` (what this run will draw) with the one ``out_dir`` holds; returns the recorded one.

    Refuses (ValueError) a folder of other samples, and any earlier samples when ``resume`` is false; warns when a
    free setting changed (``FREE_KEYS``: the samples stay the same up to float round-off, see below).
    """
    recorded = read_manifest(out_dir)
    if recorded is None:
        return None
    if not resume:
        raise ValueError(f"{out_dir} already holds samples of an earlier run ({_progress_text(out_dir, recorded)}); "
                         "resume=true continues them, or choose another out_dir")
    differ = sorted(k for k in set(manifest) | set(recorded)
                    if k not in FREE_KEYS and k != "complete" and manifest.get(k) != recorded.get(k))
    if differ:
        lines = "; ".join(f"{k}: {recorded.get(k)!r} there, {manifest.get(k)!r} now" for k in differ)
        raise ValueError(f"{out_dir} holds samples drawn with other settings ({lines}). Continuing would mix two "
                         "sample sets: rerun with the recorded settings, or choose another out_dir")
    if recorded.get("batch_size") != manifest.get("batch_size") and manifest.get("network_batch") is None:
        log.warning("batch_size %s differs from the %s the finished shards were drawn with: the new shards agree "
                    "with an uninterrupted run to float round-off, not bit for bit (set network_batch to make "
                    "samples independent of batch_size)", manifest.get("batch_size"), recorded.get("batch_size"))
    return recorded


def _progress_text(out_dir: Path, recorded: Mapping[str, Any]) -> str:
    if recorded.get("complete"):
        return f"{recorded.get('num_samples')} samples, complete"
    done = sum(len(r) for r in shard_files(out_dir))
    return f"{done} of {recorded.get('num_samples')} samples"


# ------------------------------------------------------------------ shards
def write_shard(out_dir: Path, indices: range, samples: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Shard ``indices`` of ``samples`` (and ``labels``), atomically: readers see all of it or nothing."""
    if len(samples) != len(indices):
        raise ValueError(f"shard {indices.start}-{indices.stop} got {len(samples)} samples")
    arrays = {"samples": samples} | ({} if labels is None else {"labels": labels})
    return atomic_write(shard_path(out_dir, indices), lambda f: np.savez(f, **arrays))


def complete_shards(out_dir: Path, ranges: Sequence[range]) -> set[range]:
    """Which of ``ranges`` have a readable shard of the right length; an unreadable one (a file put there by
    something else: our writes are atomic) is renamed ``*.bad`` with a warning and drawn again."""
    files, done = shard_files(out_dir), set()
    for indices in ranges:
        path = files.get(indices)
        if path is None:
            continue
        try:
            with np.load(path) as f:
                ok = f["samples"].shape[0] == len(indices)
        except Exception as err:  # noqa: BLE001 - anything unreadable is redrawn, never trusted
            ok, reason = False, f"{type(err).__name__}: {err}"
        else:
            reason = "wrong number of samples"
        if ok:
            done.add(indices)
        else:
            path.rename(path.with_suffix(".bad"))
            log.warning("shard %s is unreadable (%s): renamed to %s and drawn again", path, reason,
                        path.with_suffix(".bad").name)
    return done


def clear_temporaries(out_dir: Path) -> None:
    """Remove half-written shards a killed process left (``*.npz.tmp-<pid>``)."""
    folder = Path(out_dir) / SHARD_DIR
    for path in folder.glob(f"*{TEMP_MARK}*") if folder.is_dir() else ():
        path.unlink(missing_ok=True)


def assign(pending: Sequence[range], rank: int, world_size: int) -> list[range]:
    """Rank ``rank``'s share of the pending shards: every ``world_size``-th, so ranks finish together."""
    return list(pending[rank::world_size])


# ------------------------------------------------------------------ merging
def _npy_header(array: np.ndarray, rows: int) -> dict[str, Any]:
    header = np.lib.format.header_data_from_array_1_0(array)
    header["shape"] = (rows, *array.shape[1:])
    return header


def _write_member(zf: zipfile.ZipFile, key: str, paths: Sequence[Path], rows: int) -> None:
    """The .npy member ``key`` of the npz, written from ``key`` of every shard in turn (one shard in memory)."""
    with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
        for i, path in enumerate(paths):
            with np.load(path) as f:
                array = np.ascontiguousarray(f[key])
            if i == 0:
                np.lib.format.write_array_header_1_0(member, _npy_header(array, rows))
            member.write(array.tobytes())


def merge_shards(out_dir: Path, ranges: Sequence[range], remove: bool = True) -> Path:
    """``samples.npz`` (and ``labels``) from the shards ``ranges`` in index order, written as a stream; the shard
    files are removed afterwards unless ``remove`` is false."""
    out_dir = Path(out_dir)
    ordered = sorted(ranges, key=lambda r: r.start)
    if [r.start for r in ordered[1:]] != [r.stop for r in ordered[:-1]] or ordered[0].start != 0:
        raise ValueError(f"the shards of {out_dir} do not tile 0..{ordered[-1].stop}: cannot merge them")
    paths, rows = [shard_path(out_dir, r) for r in ordered], ordered[-1].stop
    with np.load(paths[0]) as f:
        keys = [k for k in ("samples", "labels") if k in f.files]

    def write(file: Any) -> None:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key in keys:
                _write_member(zf, key, paths, rows)

    merged = atomic_write(out_dir / MERGED, write)
    if remove:
        for path in paths:
            path.unlink()
    return merged


def read_first(out_dir: Path, ranges: Sequence[range], count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``count`` samples (and labels) of the shards, for the grid."""
    samples, labels, have = [], [], 0
    for indices in sorted(ranges, key=lambda r: r.start):
        with np.load(shard_path(out_dir, indices)) as f:
            samples.append(f["samples"][: count - have])
            if "labels" in f.files:
                labels.append(f["labels"][: count - have])
        have += len(samples[-1])
        if have >= count:
            break
    return np.concatenate(samples), (np.concatenate(labels) if labels else None)


def progress_file(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f".progress-rank{rank}"


def report_progress(out_dir: Path, rank: int, done: int) -> None:
    """This rank's samples done so far, for rank 0's progress bar (a tiny file: no collective call in the loop,
    which would hang ranks with different numbers of batches)."""
    path = progress_file(out_dir, rank)
    tmp = path.with_name(path.name + f"{TEMP_MARK}{os.getpid()}")
    tmp.write_text(str(done))
    os.replace(tmp, path)


def progress_of_others(out_dir: Path, world_size: int) -> int:
    total = 0
    for rank in range(1, world_size):
        try:
            total += int(progress_file(out_dir, rank).read_text() or 0)
        except (OSError, ValueError):
            pass
    return total


def clear_progress(out_dir: Path) -> None:
    for path in (Path(out_dir) / SHARD_DIR).glob(".progress-rank*"):
        path.unlink(missing_ok=True)
