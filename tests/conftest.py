"""Fixtures every test gets or asks for; shared helpers are in tests/helpers/."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra

from tests.helpers.config import TINY, compose_config


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("DDPM_ROOT", str(tmp_path))


@pytest.fixture(autouse=True)
def _restore_global_rank():
    """A Trainer sets Lightning's process-wide rank (e.g. 3 under simulated SLURM variables), which would turn
    later rank-zero-only work (sample grids, files) into no-ops in the same pytest process."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    before = getattr(rank_zero_only, "rank", 0)
    yield
    rank_zero_only.rank = before


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(*overrides: str, tiny: bool = True):
        return compose_config([*(TINY if tiny else []), *overrides], tmp_path / "run")
    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many small sequential ops: two threads on two cores shared with
    other processes spin against each other and run several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
