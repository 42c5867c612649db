"""`python -m src.bench`: compose configs/bench.yaml, run the benchmark, write bench.json into the run folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .report import format_table
from .run import bench

log = logging.getLogger(__name__)


# config_path is relative to this file (src/bench/), whose configs are the project's
@hydra.main(version_base="1.3", config_path="../../configs", config_name="bench.yaml")
def main(cfg: DictConfig) -> Path:
    records = bench(cfg)
    out = Path(cfg.paths.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2, default=str))
    log.info("\n%s", format_table(records))
    log.info("records written to %s", out)
    return out


if __name__ == "__main__":
    main()
