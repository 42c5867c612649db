"""torch-fidelity's Inception-v3 weights: where they come from, whether a file is them, and a random stand-in.

The weights (``weights-inception-2015-12-05-6726825d.pth``) come from ``fid.weights_path``, else the
environment variable ``FID_INCEPTION_WEIGHTS``, else torch's hub cache, downloaded there if missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

log = logging.getLogger(__name__)

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = URL_INCEPTION_V3  # ends in INCEPTION_FILENAME
OFFICIAL_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its sha256 prefix
WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
WEIGHTS_KEY = "fid.weights_path"
# keys of torch-fidelity's Inception-v3 state dict, first and last layers, with their shapes
INCEPTION_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                  "fc.weight": (1008, 2048), "fc.bias": (1008,)}
_CHECKED: set[tuple[str, int, int]] = set()
_TAGS: dict[tuple[str, int, int], str] = {}


def how_to_set_weights(key: str = WEIGHTS_KEY) -> str:
    return (f"download {INCEPTION_URL} on a machine with internet access and set {key}=<path to "
            f"{INCEPTION_FILENAME}> or the environment variable {WEIGHTS_ENV}=<path>")


def _configured_weights(weights_path: str | os.PathLike | None, key: str) -> tuple[str | None, str]:
    """The configured weights file (or None) and the setting that named it (``key`` or ``$FID_INCEPTION_WEIGHTS``)."""
    source = key
    if weights_path in (None, ""):
        weights_path, source = os.environ.get(WEIGHTS_ENV) or None, WEIGHTS_ENV
    if weights_path is None:
        return None, source
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {str(path)!r} (from {source}) does not exist: "
                                + how_to_set_weights(key))
    return str(path), source


def resolve_inception_weights(weights_path: str | os.PathLike | None, key: str = WEIGHTS_KEY) -> str | None:
    """The config value if set, else ``$FID_INCEPTION_WEIGHTS``, else None (the library downloads them)."""
    return _configured_weights(weights_path, key)[0]


def _file_version(path: str | os.PathLike) -> tuple[str, int, int]:
    """(resolved path, size, mtime): memo key of a file's contents."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def check_inception_weights(path: str | os.PathLike, source: str) -> None:
    """ValueError naming ``source`` unless ``path`` loads as a state dict of torch-fidelity's Inception-v3.

    torch-fidelity and torchmetrics would otherwise fail deep inside, with errors that name neither the setting nor
    the file. Loaded on the CPU with ``weights_only=True``; memoised per file version.
    """
    memo = _file_version(path)
    if memo in _CHECKED:
        return
    expected = (f"{source} must be torch-fidelity's {INCEPTION_FILENAME} (a state dict of its Inception-v3, from "
                f"{INCEPTION_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip and EOF errors of every kind: the file is not a torch file
        raise ValueError(f"{source}={path} cannot be read as PyTorch weights ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): {expected}") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}={path} holds a {type(state).__name__}, not a state dict of tensors: {expected}")
    missing = [k for k in INCEPTION_KEYS if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} instead of {shape}" for k, shape in INCEPTION_KEYS.items()
             if k in state and tuple(state[k].shape) != shape]
    if missing or wrong:
        found = sorted(state)[:5]
        what = f"lacks {missing} (its keys begin {found})" if missing else f"has {'; '.join(wrong)}"
        raise ValueError(f"{source}={path} is not the Inception-v3 FID needs: it {what}. {expected}")
    _CHECKED.add(memo)


def inception_weights_file(weights_path: str | os.PathLike | None = None, key: str = WEIGHTS_KEY) -> str:
    """A weights file that exists: the configured one (checked with ``check_inception_weights``), or the
    official one in torch's hub cache.

    Downloads the official file into ``<torch hub dir>/checkpoints`` (where torch-fidelity and torchmetrics
    look too) when it is missing there; raises RuntimeError saying how to provide it if that fails.
    """
    resolved, source = _configured_weights(weights_path, key)
    if resolved is not None:
        check_inception_weights(resolved, source)
        return resolved
    target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME
    if target.is_file():
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), hash_prefix=OFFICIAL_SHA256_PREFIX,
                                       progress=False)
    except Exception as err:  # URLError, HTTPError, hash mismatch, disk errors: all mean "no weights"
        raise RuntimeError(f"Inception weights for FID/IS/KID are not available: {key} and {WEIGHTS_ENV} "
                           f"are unset and downloading {INCEPTION_FILENAME} failed ({type(err).__name__}: "
                           f"{err}). To fix: " + how_to_set_weights(key)) from err
    return str(target)


def weights_tag(path: str | os.PathLike) -> str:
    """First 8 hex digits of the file's sha256 (``6726825d`` for the official weights); memoised."""
    key = _file_version(path)
    if key not in _TAGS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _TAGS[key] = digest.hexdigest()[:8]
    return _TAGS[key]


def warn_if_unofficial(path: str | os.PathLike) -> str:
    """Log a warning when ``path`` is not the official Inception file; returns its tag."""
    tag = weights_tag(path)
    if tag != OFFICIAL_SHA256_PREFIX:
        log.warning("Inception weights %s are not %s (sha256 %s... instead of %s...): scores are NOT "
                    "comparable with published ones", path, INCEPTION_FILENAME, tag, OFFICIAL_SHA256_PREFIX)
    return tag


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write torch-fidelity's Inception-v3 with RANDOM weights to ``path``: scores from it are meaningless.

    For tests and offline dry runs of the plumbing only. Convolutions get Kaiming-normal weights because
    PyTorch's default init makes the deep features collapse (every FID ~0).
    """
    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # keep the fresh parameters
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same file for the same seed, without touching the caller's RNG
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)  # the constructor insists on loading a file
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path
