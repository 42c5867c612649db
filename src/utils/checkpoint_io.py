"""Checkpoint writes that a crash cannot leave half done."""

from __future__ import annotations

import errno
import glob
import logging
import shutil
from pathlib import Path
from typing import IO, Any

import torch
from fsspec.core import url_to_fs
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.utils.files import TEMP_MARK, atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes replace the target in one step, durably.

    The checkpoint is written to ``<path>.tmp-<pid>`` in the target's folder, flushed and fsynced, then renamed
    over ``<path>`` with ``os.replace`` and the folder is fsynced. A process killed at any moment leaves either the
    previous file or the complete new one under the final name. Lightning's own writer stages the file in the system
    temporary folder and moves it: a copy, written in place, when that folder is on another file system (a node's
    local /tmp and a shared checkpoint disk), and never fsynced.

    Remote paths (``s3://`` and the like) go through Lightning's writer unchanged.
    """

    TEMP_MARK = TEMP_MARK

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs, local_path = url_to_fs(str(path))
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "file" not in protocols:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes local files and takes no storage_options")
        target = Path(local_path)
        try:
            atomic_write(target, lambda file: self._write(checkpoint, file))
        except BaseException as err:
            full = _out_of_space(err, target)
            if full is not None:
                raise full from err
            raise
        self._remove_stale_temps(target)

    def _write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        torch.save(checkpoint, file)

    def _remove_stale_temps(self, target: Path) -> None:
        """Delete temporaries of ``target`` left by writers that were killed (only one process writes a path)."""
        for stale in target.parent.glob(f"{glob.escape(target.name)}{self.TEMP_MARK}*"):
            log.info("removing %s, left by an interrupted checkpoint write", stale)
            stale.unlink(missing_ok=True)


def _out_of_space(err: BaseException, target: Path) -> OSError | None:
    """A clear error for a write that failed for lack of room (torch reports it as ``unexpected pos``), else None."""
    chain, cause = [], err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    codes = {getattr(e, "errno", None) for e in chain if isinstance(e, OSError)}
    torn = any("unexpected pos" in str(e) for e in chain)
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = None
    kept = "the previous checkpoint is intact" if target.exists() else "no checkpoint of this name was written"
    if codes & {errno.ENOSPC, errno.EDQUOT} or (torn and free is not None and free < 64 * 2**20):
        room = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return OSError(errno.ENOSPC, f"no space left in {target.parent}{room} while writing {target.name}; {kept}. "
                       "Free some space (older step=*.ckpt files can go; a lower "
                       "callbacks.model_checkpoint.save_top_k keeps fewer), then resume with ckpt_path=last")
    if errno.EFBIG in codes:
        return OSError(errno.EFBIG, f"{target.name} exceeds the file size limit of this process (ulimit -f) or of "
                       f"the file system of {target.parent}; {kept}. Raise the limit or write checkpoints elsewhere "
                       "(callbacks.model_checkpoint.dirpath)")
    return None
