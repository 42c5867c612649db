"""Progress display for terminals and log files: every progress report of the project comes from here.

On a terminal (``sys.stderr.isatty()``, or a Jupyter kernel) progress is a bar: tqdm for sampling, bits/dim and
samples over batches, Lightning's Rich bar for training. Elsewhere (``python -m src.train > log 2>&1``, SLURM
logs, CI) a bar's redraws and cursor escapes would fill the file, so progress is plain lines through ``logging``
at a modest rate, each with done/total, rate and ETA. ``DDPM_PROGRESS=bar|lines`` (or ``mode=``) forces one.

A progress report opened while another is open (the sampling steps of each batch under ``samples``) is nested:
as a bar it sits below the outer one and disappears when done; as lines it is silent, the outer one reports.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "DDPM_PROGRESS"
MODES = ("auto", "bar", "lines")
EVERY_SECONDS = 30.0  # lines: at most one per this many seconds ...
EVERY_FRACTION = 0.1  # ... or per this fraction of the total, whichever comes first, plus the final line

_clock = time.monotonic
_open: list[Progress] = []  # reports shown now, outermost first


def resolve_mode(mode: str | None = "auto") -> str:
    """``bar`` or ``lines``: ``mode`` if it is one of them, else ``$DDPM_PROGRESS``, else by the terminal."""
    chosen = str(mode or "auto").lower()
    if chosen == "auto":
        chosen = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if chosen not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {chosen!r}")
    if chosen == "auto":
        return "bar" if _interactive() else "lines"
    return chosen


def _interactive() -> bool:
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
    return "ipykernel" in sys.modules  # notebooks show tqdm's widget, not escape codes


def format_duration(seconds: float) -> str:
    """``42s``, ``5m 03s``, ``18h 02m``, ``2d 03h``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def format_rate(done: float, seconds: float, unit: str) -> str:
    """``12.3 steps/s``, or ``14.2 s each`` when slower than one per 10 s."""
    if seconds <= 0 or done <= 0:
        return f"- {unit}/s"
    rate = done / seconds
    if rate < 0.1:
        return f"{1 / rate:.1f} s each"
    return f"{rate:.3g} {unit}/s" if rate < 1000 else f"{rate:.0f} {unit}/s"


class Progress:
    """What ``track`` returns: iterate over it, or call ``update(n)``; ``close()`` (or a ``with`` block) ends it."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True
        if self in _open:
            _open.remove(self)


class _Bar(Progress):
    def __init__(self, iterable, total, desc, unit) -> None:
        super().__init__(iterable, total, desc, unit)
        from tqdm.auto import tqdm

        depth = len(_open)
        self._redirect = None
        if depth == 0:
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log lines printed while the bar is up go above it instead of breaking it
            self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
            self._redirect.__enter__()
        # nested: below the outer bar, cleared when done
        self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=depth == 0, position=depth, dynamic_ncols=True)
        _open.append(self)

    def update(self, n: int = 1) -> None:
        super().update(n)
        self._tqdm.update(n)

    def close(self) -> None:
        if self.closed:
            return
        self._tqdm.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        super().close()


class _Lines(Progress):
    def __init__(self, iterable, total, desc, unit, every_seconds: float, every_fraction: float) -> None:
        super().__init__(iterable, total, desc, unit)
        self.every_seconds = every_seconds
        self.every_fraction = every_fraction
        self._start = self._last_time = _clock()
        self._last_part = 0
        self._finished = False
        _open.append(self)

    def _part(self) -> int:
        """How many whole ``every_fraction`` parts of the total are done."""
        if not self.total:
            return 0
        return math.floor(self.n / (self.total * self.every_fraction) + 1e-9)

    def update(self, n: int = 1) -> None:
        super().update(n)
        if self._finished:
            return
        now = _clock()
        if self.total and self.n >= self.total:
            self._emit_final(now)
        elif now - self._last_time >= self.every_seconds or self._part() > self._last_part:
            self._emit(now)

    def _emit(self, now: float) -> None:
        elapsed = now - self._start
        rate = format_rate(self.n, elapsed, self.unit)
        if self.total:
            eta = format_duration((self.total - self.n) * elapsed / self.n) if self.n else "-"
            log.info("%s: %d/%d (%.0f%%), %s, ETA %s", self.desc, self.n, self.total, 100 * self.n / self.total,
                     rate, eta)
        else:
            log.info("%s: %d %s, %s", self.desc, self.n, self.unit, rate)
        self._last_time = now
        self._last_part = self._part()

    def _emit_final(self, now: float) -> None:
        self._finished = True
        elapsed = now - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n} {self.unit}"
        stopped = "" if not self.total or self.n >= self.total else " (stopped)"
        log.info("%s: %s done in %s%s, %s", self.desc, done, format_duration(elapsed), stopped,
                 format_rate(self.n, elapsed, self.unit))

    def close(self) -> None:
        if self.closed:
            return
        if not self._finished and self.n > 0:
            self._emit_final(_clock())
        super().close()


def track(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
          enabled: bool = True, mode: str | None = None, every_seconds: float = EVERY_SECONDS,
          every_fraction: float = EVERY_FRACTION) -> Progress:
    """Progress over ``iterable`` (or ``update(n)`` calls up to ``total``): a tqdm bar on a terminal, log lines
    otherwise (see the module docstring). ``unit`` is plural (``steps``); ``enabled=False`` shows nothing."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled:
        return Progress(iterable, total, desc, unit)
    if resolve_mode(mode) == "bar":
        return _Bar(iterable, total, desc, unit)
    if _open:  # an outer report already says how far things are
        return Progress(iterable, total, desc, unit)
    return _Lines(iterable, total, desc, unit, every_seconds, every_fraction)


def training_progress(mode: str | None = "auto", step_metrics: Iterable[str] = ("train/loss",),
                      every_n_steps: int = 50, every_n_seconds: float = EVERY_SECONDS, **bar_kwargs: Any):
    """The training progress callback: ``ThrottledRichProgressBar`` on a terminal, ``TrainingProgressLines``
    otherwise (``mode``: ``auto``, ``bar``, ``lines``). Both read ``step_metrics`` at most every N steps."""
    from src.callbacks.progress import ThrottledRichProgressBar, TrainingProgressLines

    if resolve_mode(mode) == "bar":
        return ThrottledRichProgressBar(step_metrics=step_metrics, every_n_steps=every_n_steps, **bar_kwargs)
    return TrainingProgressLines(step_metrics=step_metrics, every_n_steps=every_n_steps,
                                 every_n_seconds=every_n_seconds)
