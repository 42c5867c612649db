"""Files that a crash cannot leave half written, and where caches live."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` so that a reader, or a crash at any moment, sees the old file or the
    complete new one: a temporary file in the same folder (``<name>.tmp-<pid>``, never on another file system),
    flushed and fsynced, renamed over ``path``, and the folder fsynced so that the rename is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode()))


# marks the temporaries of atomic_write (checkpoint writers clear stale ones a killed process left)
TEMP_MARK = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def cache_dir(*parts: str) -> Path:
    """Where computed things that can be rebuilt are kept (classifier weights, reference statistics):
    ``$DDPM_CACHE_DIR``, else ``~/.cache/ddpm``, with ``parts`` below it."""
    env = os.environ.get("DDPM_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "ddpm"
    return root.joinpath(*parts)
