"""Composing the real Hydra configs as the entry points do, forced onto the CPU and tiny sizes."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "configs")

# Overrides that make any experiment take seconds on a CPU.
TINY = [
    "trainer=cpu",
    "debug=tiny",
    "diffusion.num_timesteps=50",
    "data.num_workers=0",
    "logger=csv",
]


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "train") -> object:
    """Compose ``configs/<config_name>.yaml`` as ``python -m src.<config_name>`` would, with Hydra's runtime set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
