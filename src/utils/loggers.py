"""A CSV logger that keeps what an earlier attempt of the same run wrote, and only that."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

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
        path = Path(self.metrics_file_path)
        temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(temp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)


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
