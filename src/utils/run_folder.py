"""One process per run folder, and no empty folders from runs that never started.

``RunFolderGuard`` is a Hydra callback (``configs/hydra/default.yaml``), so it acts before Hydra writes anything
into the folder: a second run started in a folder that a live run holds stops with an error before it overwrites
``.hydra/config.yaml``; a lock left by a process that no longer runs is taken over with a warning; a run that fails
before it made progress (a bad config, a missing file) leaves no empty folder behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# set by the task once it has produced something worth keeping (src.train: a training step; src.sample: samples)
_progress = {"made": False}


def mark_progress() -> None:
    """Tell the guard that this job's folder holds results: it is kept even if the job fails later."""
    _progress["made"] = True


class RunFolderError(SystemExit):
    """The run cannot use its folder. A SystemExit, because Hydra turns other exceptions raised by its callbacks
    into warnings and runs the job anyway; the message is printed and the process exits with status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Error: {message}")


def _secondary_process() -> bool:
    """True in the processes a distributed launch adds (Lightning's DDP children, srun tasks, torchrun workers):
    they share rank zero's folder, which holds the lock for all of them."""
    for key in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"):
        value = os.environ.get(key, "0") or "0"
        if value.isdigit() and int(value) != 0:
            return True
    return False


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, which also records who holds it.

    The kernel drops the lock when its process dies, whatever the cause (SIGKILL, a lost node's requeued job on
    the same shared disk), so a lock file that can be locked again is stale by construction.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not guarded there
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read_owner(fd))
            os.close(fd)
            raise RunFolderError(
                f"the run folder {self.folder} is in use by {holder}. Two runs in one folder would overwrite each "
                "other's config, checkpoints and metrics: wait for that run to end (or stop it), or choose another "
                "folder (leave hydra.run.dir unset for a new one)"
            ) from None
        previous = _read_owner(fd)
        if previous.get("pid") is not None:
            log.warning("run folder %s: taking over the lock of %s, which is no longer running", self.folder,
                        _describe(previous))
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before closing: nobody can take a lock on a file we still hold
        os.close(self._fd)
        self._fd = None


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "another process"
    return (f"process {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')}: "
            f"{owner.get('command', '?')})")


class RunFolderGuard:
    """Hydra callback: lock the run (or sweep) folder before Hydra writes into it; remove it again when the job
    fails before ``mark_progress``, if the folder was new."""

    def __init__(self) -> None:
        self._locks: dict[Path, FolderLock] = {}
        self._new: set[Path] = set()

    # ------------------------------------------------------------------ Hydra hooks
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(_folder(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(_folder(config, "hydra.sweep.dir"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _progress["made"] = False
        folder = Path(config.hydra.runtime.output_dir)
        if folder not in self._locks and not _run_mode(config):
            self._claim(folder, new=True)  # a sweep's job folder; the sweep folder itself was claimed at its start

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        folder = Path(config.hydra.runtime.output_dir)
        failed = getattr(getattr(job_return, "status", None), "name", "") == "FAILED"
        if failed and folder in self._new and not _progress["made"] and not _secondary_process():
            self._release(folder)
            _remove_unused(folder)
        elif not _run_mode(config):
            self._release(folder)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release_all()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release_all()

    # ------------------------------------------------------------------ helpers
    def _claim(self, folder: Path, new: bool | None = None) -> None:
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(f"the run folder {folder} is an existing file: point hydra.run.dir (or "
                                     "hydra.sweep.dir) at a folder, or leave it unset for a new one")
        if _secondary_process():
            return
        if new is None:
            new = not folder.exists() or not any(folder.iterdir())
        lock = FolderLock(folder)
        lock.acquire()
        self._locks[folder] = lock
        if new:
            self._new.add(folder)

    def _release(self, folder: Path) -> None:
        lock = self._locks.pop(folder, None)
        if lock is not None:
            lock.release()

    def _release_all(self) -> None:
        for folder in list(self._locks):
            self._release(folder)


def _run_mode(config: DictConfig) -> bool:
    mode = OmegaConf.select(config, "hydra.mode")
    return getattr(mode, "name", str(mode)) == "RUN"


def _folder(config: DictConfig, key: str) -> Path:
    return Path(str(OmegaConf.select(config, key))).expanduser().absolute()


def _remove_unused(folder: Path) -> None:
    """Remove the folder of a job that failed before it made progress: it holds Hydra's config and the log of
    the error (which went to the terminal too), nothing else worth keeping."""
    log.info("removing %s: the run failed before its first step", folder)
    # logging handlers still hold the job's log file open; closing is Hydra's business, unlinking is safe
    shutil.rmtree(folder, ignore_errors=True)
