"""A CSV logger that keeps what an earlier attempt of the same run wrote, and only that; W&B checks; sending a run's
config, numbers and figures to its loggers."""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf, open_dict
from PIL import Image

from src.utils.files import atomic_write
from src.utils.images import log_image
from src.utils.instantiate import instantiate_loggers

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed run (``ckpt_path=...``, a SLURM requeue)
    writes into the same folder, so this one reads its header and appends instead. Rewrites (a new column, a
    resume) replace the file in one step, so a crash leaves the old or the new file, never half of one."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        rows = self.read_rows()
        self.write_rows(rows, fieldnames)

    def read_rows(self) -> list[dict[str, str]]:
        if not os.path.isfile(self.metrics_file_path):
            return []
        with open(self.metrics_file_path, newline="") as f:
            return list(csv.DictReader(f))

    def write_rows(self, rows: list[dict[str, str]], fieldnames: list[str]) -> None:
        def write(file) -> None:
            text = io.TextIOWrapper(file, newline="", encoding="utf-8")
            writer = csv.DictWriter(text, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            text.flush()
            text.detach()  # the bytes file stays open for atomic_write's fsync

        atomic_write(self.metrics_file_path, write)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume with one row per step: the rows that the stopped attempt
    wrote after its checkpoint are dropped when the run resumes from it (``resume_at``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int, epoch: int) -> None:
        """Keep the rows of the training steps before ``step`` (Lightning logs optimizer step k, 1-based, as row
        k - 1) and drop the epoch aggregates (``*_epoch`` columns) of ``epoch``, which the run resumes in the
        middle of: the stopped attempt wrote them over the part of the epoch it trained, and the resumed run
        writes them again when the epoch ends."""
        writer = self.experiment
        writer.save()
        rows = writer.read_rows()
        if not rows:
            return

        def stale(row: dict[str, str]) -> bool:
            if row.get("step") not in (None, "") and int(float(row["step"])) >= step:
                return True
            partial_epoch = row.get("epoch") not in (None, "") and int(float(row["epoch"])) == epoch
            return partial_epoch and any(value != "" for key, value in row.items() if key.endswith("_epoch"))

        kept = [row for row in rows if not stale(row)]
        if len(kept) < len(rows):
            writer.write_rows(kept, list(rows[0].keys()))
            log.info("metrics.csv: dropped %d rows written after step %d by the attempt that stopped there",
                     len(rows) - len(kept), step)


# --------------------------------------------------------------------------- Weights & Biases
def wandb_online(logger_cfg: Any) -> bool:
    """Whether the logger group holds a W&B logger that would talk to a server."""
    node = (logger_cfg or {}).get("wandb") if logger_cfg is not None else None
    if node is None or node.get("offline") or node.get("mode") in ("offline", "disabled"):
        return False
    return os.environ.get("WANDB_MODE", "").lower() not in ("offline", "dryrun", "disabled")


def wandb_server_unreachable(timeout: float = 5.0) -> str | None:
    """Why the W&B server cannot be reached from here (None if it can): a TCP connection to ``$WANDB_BASE_URL``
    (default https://api.wandb.ai) within ``timeout`` seconds. wandb itself retries for minutes before failing."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port}: {err}"
    return None


def wandb_credentials_present() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def fall_back_to_offline_wandb(logger_cfg: Any) -> None:
    """W&B with credentials but no way to the server: log offline (in place, so the run's config says so) instead
    of stalling for minutes and failing. Without credentials nothing changes: the run stops with what to do."""
    if not wandb_online(logger_cfg) or not wandb_credentials_present():
        return
    reason = wandb_server_unreachable()
    if reason is None:
        return
    with open_dict(logger_cfg):
        logger_cfg.wandb.offline = True
        logger_cfg.wandb.mode = "offline"  # to wandb.init itself: settings a process already holds can not win
    log.warning("W&B server unreachable (%s): logging offline into <run folder>/wandb instead; upload the run "
                "later with `wandb sync <run folder>/wandb/offline-run-*`", reason)


def log_hyperparams(logger: Any, run_config: dict) -> None:
    """Send the resolved config to a logger; a W&B logger without credentials fails here, before training."""
    try:
        logger.log_hyperparams(run_config)
    except Exception as err:
        if type(err).__name__ == "UsageError" and type(err).__module__.startswith("wandb"):
            raise RuntimeError(
                f"W&B cannot start: {err}. Run `wandb login` or set WANDB_API_KEY; or log offline with "
                "WANDB_MODE=offline (sync later with `wandb sync`); or choose another logger (logger=csv)"
            ) from err
        if type(err).__module__.startswith("wandb"):
            raise RuntimeError(
                f"W&B cannot start ({type(err).__name__}: {err}). Log offline with WANDB_MODE=offline (sync later "
                "with `wandb sync`), or choose another logger (logger=csv)") from err
        raise


def record_checkpoint_path(loggers: list, path: str | None) -> None:
    """Put the newest checkpoint's path into the W&B run summary, so a dashboard row leads to its weights."""
    from lightning.pytorch.loggers import WandbLogger

    if not path:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary["checkpoint_path"] = str(path)


def finish_wandb(loggers: list) -> None:
    """Close the W&B run: otherwise the next job of a multirun, in the same process, would log into it."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def send_to_loggers(cfg: Any, summary: dict, out_dir: Path, prefix: str = "eval") -> None:
    """Log ``cfg`` (resolved, as hyperparameters), the numbers of ``summary`` (as ``<prefix>/<name>``) and the figures
    written to ``out_dir`` (``*.png``, as ``<prefix>/<stem>``) to the loggers of ``cfg.logger``, at step 0."""
    loggers = instantiate_loggers(cfg.get("logger"))
    if not loggers:
        return
    numbers = {f"{prefix}/{k}": float(v) for k, v in summary.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and v is not None}
    for logger in loggers:
        log_hyperparams(logger, OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(numbers, step=0)
        for png in sorted(out_dir.glob("*.png")):
            image = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"))).permute(2, 0, 1)
            log_image([logger], f"{prefix}/{png.stem}", image, step=0)
        logger.save()
    finish_wandb(loggers)
