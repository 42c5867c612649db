"""Which checkpoint a training run resumes from, and whether it fits the run, decided before anything is built."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.diffusion.legacy import canonical_diffusion_config
from src.utils.checkpoint import LAST, find_checkpoint, newest_checkpoint, read_checkpoint

log = logging.getLogger(__name__)

def checkpoint_dir(cfg: DictConfig) -> Path | None:
    """The folder the run's ``model_checkpoint`` callback writes to (None without one)."""
    node = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if node is None or node.get("dirpath") is None:
        return None
    return Path(str(node.dirpath))


def run_dir_named() -> bool:
    """Whether the command line chose the run folder (hydra.run.dir / hydra.sweep.dir) rather than a new one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    keys = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.hydra}
    return bool(keys & {"hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"})


def resolve_ckpt_path(ckpt_path: str | None, checkpoints: Path | None, run_dir_named: bool) -> str | None:
    """The checkpoint that ``ckpt_path`` names, checked before training starts.

    ``last`` is the newest checkpoint in THIS run's checkpoint folder (``checkpoints``); since every run gets a new
    folder, it finds one only when the run folder is named (``hydra.run.dir=<old run folder>``). Lightning would
    silently start from scratch when there is none; here that happens only when the folder was named (a job that is
    requeued passes ``ckpt_path=last`` every time, also the first), otherwise it is an error saying how to resume. A
    folder means its newest checkpoint. ``best``, ``hpc`` and ``registry`` go to Lightning as they are.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        if checkpoints is None:
            raise ValueError("ckpt_path=last needs the model_checkpoint callback (callbacks=default); "
                             "pass ckpt_path=<file> instead")
        newest = newest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if newest is not None:
            return str(newest)
        if run_dir_named:
            log.warning("ckpt_path=last: no checkpoint in %s yet, training starts at step 0", checkpoints)
            return None
        raise FileNotFoundError(
            f"ckpt_path=last means last.ckpt in this run's folder, and this run is new ({checkpoints} has none). "
            "Resume an earlier run with ckpt_path=<run folder>/checkpoints/last.ckpt (or ckpt_path=<run folder>), "
            "or continue in its folder with hydra.run.dir=<run folder> ckpt_path=last"
        )
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return ckpt_path
    return str(find_checkpoint(ckpt_path, key="ckpt_path"))


def slurm_requeue_checkpoint(run_dir: Path, checkpoints: Path | None) -> str | None:
    """In a SLURM job that was requeued (time limit or preemption), the newest checkpoint that its earlier attempts
    left in the run folder; otherwise None.

    A requeued submitit job re-runs the same pickled job, so it has the same run folder. There, Lightning's
    auto-requeue wrote ``hpc_ckpt_<n>.ckpt`` on the USR1 signal (configs/hydra/launcher/slurm.yaml), and
    ``checkpoints/last.ckpt`` is the periodic one, also written on SIGTERM. The newer file wins, over ``ckpt_path``
    too: that only said where the first attempt started.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    candidates = list(Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    if checkpoints is not None:
        candidates.append(checkpoints / LAST)
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        log.warning("SLURM job %s was requeued but %s holds no checkpoint: training starts as the first attempt did",
                    os.environ.get("SLURM_JOB_ID"), run_dir)
        return None
    newest = max(existing, key=lambda path: path.stat().st_mtime)
    log.info("SLURM job %s, restart %s: resuming from %s", os.environ.get("SLURM_JOB_ID"),
             os.environ["SLURM_RESTART_COUNT"], newest)
    return str(newest)


# Sections of the run config that decide what the weights mean: a checkpoint of other values cannot continue.
MUST_MATCH = ("model", "diffusion", "conditional")
# Sections a resumed run may change (fine-tuning, another machine); this run's values are used, with a warning.
MAY_DIFFER = ("data", "module")
# Keys that do not change what is computed.
IGNORED = {"data.num_workers", "data.pin_memory", "data.data_dir", "data.root", "data.download",
           "data.verify_checksums", "data.verify"}


def check_resume_checkpoint(path: str, run_config: dict[str, Any]) -> None:
    """Before anything is built: ``path`` must be a training checkpoint of this project whose model and diffusion
    are this run's. Differences in data and module settings are allowed and named in a warning."""
    if "://" in path or not Path(path).is_file():  # remote checkpoints and Lightning's names are checked by Lightning
        return
    ckpt = read_checkpoint(Path(path), header_only=True)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(f"ckpt_path={path} holds weights but no training state (optimizer, step count, data "
                         "position): it cannot be resumed. Sample or evaluate it with `python -m src.sample` / "
                         "`python -m src.eval ckpt_path=...`")
    saved = ckpt["ddpm_config"]
    fatal = _differences(saved, run_config, MUST_MATCH)
    if fatal:
        raise ValueError(
            f"ckpt_path={path} was trained with other settings than this run: {_listing(fatal)}. Resuming needs "
            "the checkpoint's model and diffusion settings (its own config is <run folder>/.hydra/config.yaml, "
            f"its command-line overrides <run folder>/.hydra/overrides.yaml){_overrides_hint(path)}; to train a new "
            "model, leave ckpt_path unset")
    allowed = [d for d in _differences(saved, run_config, MAY_DIFFER) if d[0] not in IGNORED]
    if allowed:
        log.warning("resuming %s with other settings than it was trained with: %s. This run's values are used; the "
                    "continued run is no longer the one the checkpoint would have made", path, _listing(allowed))


def _canonical(section: str, value: Any) -> Any:
    # checkpoints from before parameterizations and objectives were _target_ objects store their names: compare
    # both sides in the new form
    return canonical_diffusion_config(value) if section == "diffusion" else value


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out or {prefix: {}}
    return {prefix: value}


def _differences(saved: dict, current: dict, sections: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    out = []
    for section in sections:
        old, new = (_flatten(_canonical(section, config.get(section)), section) for config in (saved, current))
        for key in sorted(old.keys() | new.keys()):
            if old.get(key, "<unset>") != new.get(key, "<unset>"):
                out.append((key, old.get(key, "<unset>"), new.get(key, "<unset>")))
    return out


def _listing(differences: list[tuple[str, Any, Any]], limit: int = 5) -> str:
    shown = "; ".join(f"{key}: checkpoint {old!r}, this run {new!r}" for key, old, new in differences[:limit])
    more = f"; and {len(differences) - limit} more" if len(differences) > limit else ""
    return shown + more


def _overrides_hint(path: str) -> str:
    for folder in Path(path).resolve().parents[:3]:
        overrides = folder / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            try:
                items = OmegaConf.to_container(OmegaConf.load(overrides))
            except Exception:  # a hint only
                return ""
            kept = [o for o in items if not str(o).startswith(("ckpt_path=", "hydra."))]
            return f". It was started with: {' '.join(map(str, kept)) or '(no overrides)'}"
    return ""
