"""Sample arrays on disk read an image at a time: ``samples.npz`` and folders of shards ``<start>-<stop>.npz``.

``np.savez`` stores each array uncompressed (ZIP_STORED) inside the zip, so the ``samples`` member is read in place
with ``np.memmap`` at its data offset (zip local file header, then the .npy header). Pages of a mapping stay in the
reader's resident set once touched, so only a window of images (``WINDOW_BYTES``) is mapped at a time: reading
50,000 images costs the memory of one window, not of the set. Compressed members (``np.savez_compressed``) are
loaded whole, with a warning.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import operator
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SAMPLES_KEY = "samples"
SHARD_NAME = re.compile(r"^(\d{8,})-(\d{8,})\.npz$")  # <start>-<stop>.npz, zero-padded, half-open range
MANIFEST = "manifest.json"  # beside the shards: what src.sample draws, num_samples included
WINDOW_BYTES = 16 << 20  # mapped at a time: 85 images of 256x256x3
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header: 30 bytes before the name and extra field
_LOCAL_SIGNATURE = b"PK\x03\x04"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _image_index(j: int, n: int) -> int:
    """``j`` as an index into ``n`` images (negative from the end), or IndexError."""
    j = operator.index(j)
    j = j + n if j < 0 else j
    if not 0 <= j < n:
        raise IndexError(f"image {j} of {n}")
    return j


@dataclass(frozen=True)
class NpyInfo:
    """Shape and dtype of an array in an npz, and the byte offset of its data in the file when it can be mapped
    (stored uncompressed, C order, no objects); None when it has to be loaded."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_npy_header(f: Any, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the .npy header at ``f``'s position."""
    version = np.lib.format.read_magic(f)
    reader = _HEADER_READERS.get(version)
    if reader is None:  # 3.0 is only written for structured dtypes with unicode field names: never images
        raise ValueError(f"{what}: .npy format version {version[0]}.{version[1]} is not an image array")
    try:
        shape, fortran_order, dtype = reader(f)
    except ValueError as e:
        raise ValueError(f"{what}: unreadable .npy header ({e})") from None
    return tuple(shape), fortran_order, dtype


def npy_info(path: Path, key: str = SAMPLES_KEY) -> NpyInfo:
    """Where array ``key`` of an npz lies, from the zip and .npy headers alone: no data is read (a compressed
    member decompresses only its header)."""
    what = f"{str(path)!r}"
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{what} is not a readable .npz ({e}), as when its writing was interrupted") from None
    with zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            keys = ", ".join(name.removesuffix(".npy") for name in zf.namelist())
            raise ValueError(f"{what} has no array {key!r} (keys: {keys}); write it with `python -m src.sample`") \
                from None
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # deflated or encrypted
            with zf.open(info) as member:
                shape, _, dtype = _read_npy_header(member, what)
            return NpyInfo(shape, dtype, None)
    # ZipInfo has the member's local header offset (ZIP64 extra fields and data prepended to the zip resolved);
    # the data starts after that header's name and extra field, whose lengths only the local header has
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_SIGNATURE:
            raise ValueError(f"{what}: no zip local file header for {key}.npy at byte {info.header_offset}")
        start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        f.seek(start)
        shape, fortran_order, dtype = _read_npy_header(f, what)
        offset = f.tell()
    array = NpyInfo(shape, dtype, offset)
    if offset - start + array.nbytes > info.file_size:
        raise ValueError(f"{what}: {key}.npy holds {info.file_size} bytes, fewer than its header's {shape} "
                         f"{dtype} needs, as when its writing was interrupted")
    if fortran_order or dtype.hasobject:  # images are not contiguous, or not plain data: load
        return NpyInfo(shape, dtype, None)
    return array


class MappedArray:
    """The array of an ``NpyInfo`` with an offset, read through ``np.memmap`` a window of whole items at a time
    (at most ``window_bytes``, at least one item); ``a[j]`` is a copy, so that the window can be unmapped."""

    def __init__(self, path: Path, info: NpyInfo, window_bytes: int = WINDOW_BYTES):
        if info.offset is None or not info.shape:  # not mappable, or 0-d
            raise ValueError(f"{str(path)!r}: the array cannot be memory-mapped")
        self.path, self.info = Path(path), info
        self.shape, self.dtype = info.shape, info.dtype
        self.item_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        self.per_window = max(1, window_bytes // max(1, self.item_bytes))
        self._window: tuple[int, np.memmap] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, j: int) -> np.ndarray:
        j = _image_index(j, len(self))
        start = j - j % self.per_window
        if self._window is None or self._window[0] != start:
            self._window = None  # unmaps the previous window before the next is mapped
            count = min(self.per_window, len(self) - start)
            window = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(count, *self.shape[1:]),
                               offset=self.info.offset + start * self.item_bytes)
            self._window = (start, window)
        return np.array(self._window[1][j - start])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_window": None}  # a pickled np.memmap would carry its data along


def load_npz(path: Path, key: str = SAMPLES_KEY) -> np.ndarray:
    """Array ``key`` of an npz, loaded whole."""
    with np.load(path) as data:
        if key not in data:
            raise ValueError(f"{str(path)!r} has no array {key!r} (keys: {', '.join(data.files)}); "
                             "write it with `python -m src.sample`")
        return data[key]


def _held_in_memory(path: Path, info: NpyInfo) -> str:
    return (f"{str(path)!r} is compressed (np.savez_compressed) or not a plain C-order array: it is held in "
            f"memory ({info.nbytes / 2**30:.2f} GiB), not read a window at a time as np.savez files are")


def open_npz(path: Path, key: str = SAMPLES_KEY, warn: bool = True) -> MappedArray | np.ndarray:
    """Array ``key`` of an npz: memory-mapped a window at a time when stored uncompressed (``np.savez``), else
    loaded whole with a warning."""
    info = npy_info(path, key)
    if info.offset is not None:
        return MappedArray(path, info)
    if warn:
        log.warning(_held_in_memory(path, info))
    return load_npz(path, key)


# ------------------------------------------------------------------ shards
@dataclass(frozen=True)
class Shard:
    """``<start>-<stop>.npz``: images ``start`` to ``stop - 1`` of a sampling run."""

    start: int
    stop: int
    path: Path


def find_shards(folder: Path) -> list[Shard]:
    """The shard files directly in ``folder`` in index order (other files, e.g. one being written, are skipped)."""
    shards = []
    for p in folder.iterdir():
        match = SHARD_NAME.match(p.name)
        if match and p.is_file():
            shards.append(Shard(int(match[1]), int(match[2]), p))
    return sorted(shards, key=lambda s: (s.start, s.stop))


def _missing(folder: Path, start: int, stop: int, previous: Shard | None, note: str = "") -> ValueError:
    after = f" after {previous.path.name}" if previous else ""
    return ValueError(f"sample shards in {str(folder)!r}: images {start} to {stop - 1} ({start:08d}-{stop:08d}.npz"
                      f"{after}{note}) are missing: the sampling run is incomplete; rerun the same `python -m "
                      "src.sample` command to finish it")


def manifest_total(folder: Path) -> int | None:
    """``num_samples`` of the sampling manifest beside the shards, if there is one: the N the shards must reach."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        total = json.loads(path.read_text()).get("num_samples")
    except (OSError, ValueError, AttributeError) as e:
        log.warning("%s is not a readable sampling manifest (%s): the shards are checked without it", path, e)
        return None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def check_tiling(shards: list[Shard], folder: Path, total: int | None = None) -> None:
    """Shards (in index order) must cover 0..N once each, N = ``total`` when known (else the last shard's end): a
    gap means unfinished shards, an overlap shards of two runs."""
    if not shards:
        raise ValueError(f"sample shards in {str(folder)!r}: no <start>-<stop>.npz shard yet: the sampling run is "
                         "incomplete; rerun the same `python -m src.sample` command to finish it")
    expected, previous = 0, None
    for shard in shards:
        if shard.stop <= shard.start:
            raise ValueError(f"sample shard {str(shard.path)!r} names an empty range")
        if shard.start > expected:
            raise _missing(folder, expected, shard.start, previous)
        if shard.start < expected:
            assert previous is not None
            raise ValueError(f"sample shards in {str(folder)!r}: {previous.path.name} and {shard.path.name} overlap "
                             f"(images {shard.start} to {min(expected, shard.stop) - 1}); they come from different "
                             "runs or shard sizes: keep one shard per range, then rerun the same `python -m "
                             "src.sample` command to fill any gap")
        expected, previous = shard.stop, shard
    if total is not None and expected < total:
        raise _missing(folder, expected, total, previous, f", of the {total} in {MANIFEST}")
    if total is not None and expected > total:
        raise ValueError(f"sample shards in {str(folder)!r} reach image {expected - 1}, beyond the {total} samples "
                         f"of its {MANIFEST}: shards of another run?")


class ShardedArray:
    """The ``samples`` arrays of a folder of shards as one array of N items, read an item at a time with at most
    one shard open (memory-mapped a window at a time like ``samples.npz``; a compressed shard is loaded)."""

    def __init__(self, folder: Path, key: str = SAMPLES_KEY):
        self.folder, self.key = Path(folder), key
        self.shards = find_shards(self.folder)
        merged = self.folder.parent / f"{SAMPLES_KEY}.npz"
        if not self.shards and merged.is_file():  # src.sample removes the shards once merged
            raise ValueError(f"no sample shards in {str(self.folder)!r}: they were merged into {str(merged)!r}, "
                             "pass that (or its folder)")
        check_tiling(self.shards, self.folder, manifest_total(self.folder))
        infos = [self._info(shard) for shard in self.shards]  # headers only: len() loads no image
        first = infos[0]
        for shard, info in zip(self.shards, infos, strict=True):
            if info.shape[:1] != (shard.stop - shard.start,):
                raise ValueError(f"sample shard {str(shard.path)!r} holds {info.shape[:1] or 'no'} images for its "
                                 f"range of {shard.stop - shard.start}; delete it and rerun the same `python -m "
                                 "src.sample` command to redo it")
            if (info.shape[1:], info.dtype) != (first.shape[1:], first.dtype):
                raise ValueError(f"sample shards in {str(self.folder)!r} differ: {shard.path.name} holds "
                                 f"{info.dtype} {info.shape[1:]} images, {self.shards[0].path.name} "
                                 f"{first.dtype} {first.shape[1:]}")
        self.shape = (self.shards[-1].stop, *first.shape[1:])
        self.dtype = first.dtype
        self._starts = [shard.start for shard in self.shards]
        self._current: tuple[int, MappedArray | np.ndarray] | None = None
        self._warned = False

    def _info(self, shard: Shard) -> NpyInfo:
        try:
            return npy_info(shard.path, self.key)
        except ValueError as e:  # e.g. a shard cut short by a killed job
            raise ValueError(f"sample shard {e}: delete it and rerun the same `python -m src.sample` command to "
                             "redo it") from None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, j: int) -> np.ndarray:
        j = _image_index(j, len(self))
        k = bisect.bisect_right(self._starts, j) - 1
        if self._current is None or self._current[0] != k:
            self._current = None  # releases the previous shard before the next is opened
            shard = self.shards[k]
            array = open_npz(shard.path, self.key, warn=False)
            if isinstance(array, np.ndarray) and not self._warned:
                log.warning(_held_in_memory(shard.path, npy_info(shard.path, self.key)) + " (one shard at a time)")
                self._warned = True
            self._current = (k, array)
        shard = self._current[1]
        item = shard[j - self._starts[k]]
        return item if isinstance(shard, MappedArray) else np.array(item)  # a copy either way

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_current": None}
