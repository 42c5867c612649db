"""LSUN from its official LMDB exports (``<category>_train_lmdb``: keys are image ids, values encoded images).

Each record is decoded to the central square resized to ``image_size`` with Lanczos (``decode_square``: the paper's
preprocessing) in the loader workers and stays uint8 until the training device (``Uint8ImagesDataModule``).

Listing the keys is the one pass setup makes over the LMDB: it walks the B-tree's leaf pages only, never the
overflow pages holding the images. Measured on one core with the pages cached: 0.5M keys/s on a 200k-record LMDB of
the exports' layout (1.5M/s on a small one), so about 6 s for the 3M keys of bedroom, longer from a cold disk. The
list is then kept in ``$DDPM_CACHE_DIR/lsun`` (else ``~/.cache/ddpm/lsun``; never in the data folder, which may be
read-only) and found again by the folder's resolved path, its entry count and the size and mtime of ``data.mdb``.
Decoding, the loaders' work, runs at about 150 WebP or 400-500 JPEG records/s per core (342x256 to 256x256);
an LMDB read costs far less (15k records/s).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.utils.files import atomic_write, cache_dir

from .base import UNLABELED, check_fractions, check_int, split_indices
from .decode import RGB, decode_square
from .uint8_images import Uint8ImagesDataModule

MAX_LISTED = 10
DOWNLOAD_HINT = ("To get a category: python download.py -c bedroom (https://github.com/fyu/lsun), then unzip "
                 "bedroom_train_lmdb.zip")

log = logging.getLogger(__name__)


def import_lmdb() -> Any:
    try:
        import lmdb
    except ImportError as err:
        raise ImportError("data=lsun reads LMDB files with the lmdb package, which is not installed: "
                          "pip install -e '.[data]'") from err
    return lmdb


def open_lmdb(path: Path) -> Any:
    """``path`` opened read-only without a lock file (the data folder may be read-only, and nothing writes)."""
    lmdb = import_lmdb()
    # lock=False keeps no reader table, so max_readers bounds nothing; readahead=False because reads are random.
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)


# this process's environment of each LMDB, by resolved path: (the pid that opened it, the environment)
_ENVS: dict[str, tuple[int, Any]] = {}


def shared_env(path: str | Path) -> Any:
    """This process's environment of the LMDB at ``path``, opened on first use.

    py-lmdb refuses to open one LMDB twice in a process, and an environment must not be used across a fork: every
    process keeps one per LMDB, shared by all its readers, and a forked child (a DataLoader worker) closes the copy
    it inherited, which frees the files for its own open (with lock=False closing touches only the child's copy).
    """
    pid = os.getpid()
    entry = _ENVS.get(str(path))  # the readers pass the resolved path: no filesystem call per record
    if entry is not None and entry[0] == pid:
        return entry[1]
    key = str(Path(path).resolve())
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == pid:
        return entry[1]
    if entry is not None:
        del _ENVS[key]
        entry[1].close()
    env = open_lmdb(Path(key))
    _ENVS[key] = (pid, env)
    return env


def close_lmdb(path: str | Path) -> None:
    """Close this process's environment of the LMDB at ``path`` (if open), e.g. to open it for writing; the
    readers reopen it when next used."""
    entry = _ENVS.pop(str(Path(path).resolve()), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def key_text(key: bytes) -> str:
    return bytes(key).decode("ascii", errors="backslashreplace")


def _listing(lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return "\n".join(f"  {line}" for line in lines[:MAX_LISTED]) + more


class LMDBReader:
    """Reads values of one LMDB through ``shared_env``: it holds only the path, so it pickles and forks safely, and
    each DataLoader worker opens the environment on its first read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key = str(path.resolve())

    def get(self, key: bytes) -> bytes | None:
        with shared_env(self._key).begin() as txn:
            return txn.get(bytes(key))


class LSUNRecords(Dataset):
    """The records of ``keys`` as ``(uint8 (3, S, S), -1, i)``, ``i`` the index in this split.

    A record that does not decode raises a RuntimeError naming it, or with ``skip_corrupt`` is replaced by the next
    readable record of the split (index i+1, i+2, ..., wrapping), warned about once per key.
    """

    def __init__(self, reader: LMDBReader, keys: np.ndarray, image_size: int, draft: bool = True,
                 skip_corrupt: bool = False) -> None:
        self.reader = reader
        self.keys = keys
        self.image_size = image_size
        self.draft = draft
        self.skip_corrupt = skip_corrupt
        self.skipped_keys: set[bytes] = set()  # per process: each worker counts what it met
        self.substitutions = 0

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        n = len(self.keys)
        for step in range(n):
            key = bytes(self.keys[(i + step) % n])
            value = self.reader.get(key)  # outside the try: a failing LMDB is no bad record to skip
            try:
                if value is None:
                    raise KeyError("no record with this key (was the LMDB changed after the key list was made?)")
                return decode_square(value, self.image_size, RGB, self.draft), UNLABELED, i
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for a bad record
                if not self.skip_corrupt:
                    raise RuntimeError(
                        f"Could not decode LSUN record {key_text(key)!r} of {str(self.reader.path)!r} "
                        f"({type(err).__name__}: {err}). Set data.verify=true to list every unreadable record at "
                        "setup, or data.skip_corrupt=true to replace each with the next readable record."
                    ) from err
                self._skipped(key, err)
        raise RuntimeError(f"No record of this split of {str(self.reader.path)!r} decodes ({n} tried)")

    def _skipped(self, key: bytes, err: Exception) -> None:
        self.substitutions += 1
        if key not in self.skipped_keys:
            self.skipped_keys.add(key)
            log.warning("lsun: record %r of %s does not decode (%s: %s); serving the next readable record instead "
                        "(data.skip_corrupt=true). Corrupt records met so far in this process: %d",
                        key_text(key), self.reader.path, type(err).__name__, err, len(self.skipped_keys))


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"data.{key} must be true or false, got {value!r}")
    return value


class LSUNDataModule(Uint8ImagesDataModule):
    """One LSUN category from its official LMDB export, unlabeled, as uint8 squares of ``image_size``.

    ``root`` is the ``<category>_train_lmdb`` folder (the one holding ``data.mdb``). The keys are taken in key order;
    ``max_images`` keeps the first N. ``val_fraction`` > 0 carves a seeded random val split out of them (each split
    in key order); there is no test split. ``draft`` lets JPEG records decode at a reduced scale first (WebP is
    unaffected). ``verify`` opens every record's header at setup (a full pass over the data: slow for big
    categories) and reports all that are not images; ``skip_corrupt`` replaces a record that fails to decode in
    training by the next readable one of its split instead of stopping with an error.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 256,
        batch_size: int = 64,
        random_flip: bool = True,
        val_fraction: float = 0.001,
        max_images: int | None = None,
        draft: bool = True,
        verify: bool = False,
        skip_corrupt: bool = False,
        num_workers: int = 8,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if root is None or str(root) == "":
            raise ValueError("data.root must be the path of an LSUN LMDB folder (e.g. bedroom_train_lmdb), "
                             "got an empty value")
        self.root = Path(root).expanduser()
        self.image_size = check_int(image_size, "data.image_size", 1)
        self.random_flip = check_bool(random_flip, "random_flip")
        self.val_fraction, _ = check_fractions(val_fraction, 0.0)
        self.max_images = check_int(max_images, "data.max_images", 1, allow_none=True,
                                    hint="the number of records to train on, null for all")
        self.draft = check_bool(draft, "draft")
        self.verify = check_bool(verify, "verify")
        self.skip_corrupt = check_bool(skip_corrupt, "skip_corrupt")
        self.keys: np.ndarray | None = None

    @property
    def name(self) -> str:
        return "lsun"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    # --- the LMDB and its keys -------------------------------------------------------------------

    def check_root(self) -> None:
        """Raise a FileNotFoundError saying where to point ``data.root`` unless it holds ``data.mdb``."""
        where = f"data.root={str(self.root)!r} (resolved to {str(self.root.resolve())!r})"
        point = ("Point data.root at the folder of an LSUN category export, the one holding data.mdb, "
                 "e.g. data.root=/data/lsun/bedroom_train_lmdb.")
        if not self.root.exists():
            raise FileNotFoundError(f"The LSUN LMDB folder {where} does not exist. {point} {DOWNLOAD_HINT}.")
        if not self.root.is_dir():
            raise FileNotFoundError(f"{where} is a file, not an LMDB folder. {point}")
        if not (self.root / "data.mdb").is_file():
            inside = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.endswith("_lmdb"))
            found = f" It holds {', '.join(inside)}: point data.root at one of them." if inside else ""
            raise FileNotFoundError(
                f"{where} holds no data.mdb, so it is not an LMDB.{found} {point} {DOWNLOAD_HINT}."
            )

    def _env(self) -> Any:
        lmdb = import_lmdb()
        try:
            return shared_env(self.root)
        except lmdb.Error as err:
            raise ValueError(f"{str(self.root / 'data.mdb')!r} is not a readable LMDB ({type(err).__name__}: {err})."
                             " Point data.root at an LSUN export folder, re-extracting it if it is damaged.") from err

    def _cache_file(self, entries: int) -> Path:
        stat = (self.root / "data.mdb").stat()
        identity = f"{self.root.resolve()}\n{entries}\n{stat.st_size}\n{stat.st_mtime_ns}"
        return cache_dir("lsun", hashlib.sha256(identity.encode()).hexdigest()[:32] + ".npy")

    def list_keys(self) -> np.ndarray:
        """The keys to use in key order (the first ``max_images`` if set), as a bytes array (one buffer: no
        per-key objects for forked workers to copy); the full list is cached between runs."""
        self.check_root()
        env = self._env()
        entries = env.stat()["entries"]
        if entries == 0:
            raise ValueError(f"The LMDB {str(self.root)!r} holds no records. Point data.root at an LSUN export.")
        if self.max_images is not None and self.max_images > entries:
            log.warning("lsun: data.max_images=%d but %s holds %d records: using all of them",
                        self.max_images, self.root, entries)
        wanted = entries if self.max_images is None else min(self.max_images, entries)
        cache = self._cache_file(entries)
        keys = self._cached_keys(cache, entries)
        if keys is not None:
            log.info("lsun: %d keys of %s read from %s", entries, self.root, cache)
            return keys[:wanted]
        start = time.perf_counter()
        listed = []
        with env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                listed.append(key)
                if len(listed) == wanted:
                    break
        seconds = time.perf_counter() - start
        log.info("lsun: listed %d keys of %s in %.2f s (%.0f keys/s)", len(listed), self.root, seconds,
                 len(listed) / max(seconds, 1e-9))
        # a fixed-width bytes array drops trailing NUL bytes: such keys (never in the exports) stay objects
        if any(key.endswith(b"\0") for key in listed):
            return np.array(listed, dtype=object)
        keys = np.array(listed, dtype=f"S{max(map(len, listed))}")
        if len(keys) == entries:
            self._write_cache(cache, keys)
        return keys

    @staticmethod
    def _cached_keys(cache: Path, entries: int) -> np.ndarray | None:
        if not cache.is_file():
            return None
        try:
            keys = np.load(cache, allow_pickle=False)
        except (OSError, ValueError) as err:
            log.warning("lsun: ignoring the unreadable key cache %s (%s)", cache, err)
            return None
        return keys if len(keys) == entries and keys.dtype.kind == "S" else None

    @staticmethod
    def _write_cache(cache: Path, keys: np.ndarray) -> None:
        try:
            atomic_write(cache, lambda file: np.save(file, keys))
        except OSError as err:  # a read-only home: the keys are listed again next time, nothing else is lost
            log.warning("lsun: could not cache the key list in %s (%s)", cache, err)

    def verify_records(self, keys: np.ndarray) -> None:
        """Open every record's header (``Image.verify``, no pixel decoding) and report all that fail: raise a
        ValueError, or with ``skip_corrupt`` log them (they are replaced as they load). About 4000 records/s with
        the pages cached (~12 min for bedroom's 3M), longer when the data (43 GB for bedroom) comes from disk; a
        record whose header is sound but whose pixels are truncated passes, and fails when it is loaded."""
        bad = []
        start = time.perf_counter()
        with self._env().begin() as txn:
            for key in keys:
                key = bytes(key)
                try:
                    value = txn.get(key)
                    if value is None:
                        raise KeyError("no record with this key")
                    with Image.open(io.BytesIO(value)) as img:
                        img.verify()
                except Exception as err:  # any failure means the record cannot be trained on
                    bad.append(f"{key_text(key)}: {type(err).__name__}: {err}")
        log.info("lsun: verified %d records of %s in %.1f s, %d unreadable", len(keys), self.root,
                 time.perf_counter() - start, len(bad))
        if not bad:
            return
        listing = (f"{len(bad)} of {len(keys)} records of the LMDB {str(self.root)!r} are not readable images:\n"
                   f"{_listing(bad)}\n")
        if self.skip_corrupt:
            log.warning("lsun: %seach is replaced by the next readable record of its split (data.skip_corrupt=true)",
                        listing)
            return
        raise ValueError(listing + "Remove them from the LMDB, or set data.skip_corrupt=true to replace each by the "
                         "next readable record of its split.")

    # --- splits ----------------------------------------------------------------------------------

    def load_splits(self) -> None:
        keys = self.list_keys()
        if self.verify:
            self.verify_records(keys)
        if self.val_fraction > 0:
            train_idx, val_idx, _ = split_indices(len(keys), self.val_fraction, 0.0, self.seed)
            train_keys, val_keys = (keys[np.sort(np.asarray(idx, dtype=np.int64))] for idx in (train_idx, val_idx))
        else:
            train_keys, val_keys = keys, keys[:0]
        self.keys = keys
        reader = LMDBReader(self.root)
        self.train_set, self.val_set, self.test_set = (
            LSUNRecords(reader, k, self.image_size, self.draft, self.skip_corrupt)
            for k in (train_keys, val_keys, keys[:0])
        )
