"""Checkpoints: writing small ones quickly, reading them, comparing them bit for bit."""

from __future__ import annotations

from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

from tests.helpers.config import TINY, compose_config
from tests.helpers.processes import run_entry_point


def write_untrained_checkpoint(run_dir: Path, *overrides: str) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` of an untrained tiny model, laid out as src.train writes it, in seconds:
    for tests of what the entry points accept, not of what a model learns."""
    import torch

    from src.train import build

    cfg = compose_config([*TINY, *overrides], run_dir)
    try:
        objects = build(cfg)
    finally:
        GlobalHydra.instance().clear()
    module = objects["module"]
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "ddpm_config": objects["run_config"],
                "ddpm_data_shape": list(module.data_shape)}, path)
    return path



def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)



def assert_same_weights_and_ema(got: dict, want: dict) -> None:
    """Two checkpoints hold bit-identical raw and EMA weights at the same step and EMA update count."""
    import torch

    assert got["global_step"] == want["global_step"]
    for key in ("state_dict", "current_model_state"):  # the EMA and the raw weights
        assert got[key].keys() == want[key].keys()
        different = [k for k in want[key] if not torch.equal(got[key][k], want[key][k])]
        assert not different, f"{key}: {different[:5]}"
    assert int(got["averaging_state"]["n_averaged"]) == int(want["averaging_state"]["n_averaged"])



def run_whole_and_split(tmp_path: Path, common: list[str], total: int, split: int) -> tuple[dict, dict]:
    """Train ``total`` steps in one run, and ``split`` steps + a restart from last.ckpt + the rest in another,
    through the entry point; returns both final last.ckpt contents (whole, split)."""
    runs = {"whole": [[f"trainer.max_steps={total}"]],
            "split": [[f"trainer.max_steps={split}"], [f"trainer.max_steps={total}", "ckpt_path=last"]]}
    ckpts = {}
    for name, parts in runs.items():
        for extra in parts:
            # two separate runs compute alike only with the same CPU thread count (a run's own resume keeps its
            # count by itself, see src.utils.threads.keep_threads_of_run)
            result = run_entry_point("src.train", *common, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path,
                                     env={"OMP_NUM_THREADS": "1"})
            assert result.returncode == 0, result.stderr[-3000:]
        ckpts[name] = load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")
    return ckpts["whole"], ckpts["split"]
