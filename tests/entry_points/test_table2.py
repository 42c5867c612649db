"""The paper's Table 2 grid through the real entry point: six rows train, sample and give a bound."""

from __future__ import annotations

import pytest
import torch
import yaml

from src.utils.checkpoint import load_module
from tests.helpers import TINY, run_entry_point

ROWS = {
    "mean_vlb_learned": ("mean", "vlb", "learned"),
    "mean_vlb_fixed": ("mean", "vlb", "fixed_large"),
    "mean_simple_fixed": ("mean", "simple", "fixed_large"),
    "eps_vlb_learned": ("eps", "vlb", "learned"),
    "eps_vlb_fixed": ("eps", "vlb", "fixed_large"),
    "eps_simple_fixed": ("eps", "simple", "fixed_large"),
}


@pytest.mark.slow
def test_table2_sweep_trains_every_row_and_each_samples_and_has_a_bound(tmp_path, one_thread):
    sweep_dir = tmp_path / "table2"
    result = run_entry_point("src.train", "+sweep=table2", *TINY, "callbacks.sample_grid=null", "trainer.max_steps=3",
                             f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = {}
    x0 = torch.round(torch.rand(2, 1, 8, 8) * 255) / 127.5 - 1  # on the 8-bit grid
    for job in range(len(ROWS)):
        folder = sweep_dir / str(job)
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["diffusion"]
        module = load_module(folder / "checkpoints" / "last.ckpt")
        # the run's config selects the objects by _target_; the rebuilt diffusion holds them
        diffusion = module.diffusion
        assert config["parameterization"]["_target_"].endswith("." + type(diffusion.parameterization).__name__)
        seen[(diffusion.parameterization.name, diffusion.objective.name, config["variance"])] = job
        assert module.net.out_channels == (2 if config["variance"] == "learned" else 1)
        samples = module.sample(2, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()
        bpd = module.diffusion.bits_per_dim(module.net, x0, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(bpd["total"]).all() and (bpd["total"] > 0).all()
    assert set(seen) == set(ROWS.values())
