"""Running the real entry points in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.config import ROOT


def run_entry_point(module: str, *args: str, cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run ``python -m <module> args`` in a fresh process (the real entry point) and return the result; a variable
    that ``env`` maps to None is removed."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1", **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
