"""The LightningModule and its callbacks: EMA seen by sampling, warm-up, loss logging, NaN handling."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from src.callbacks import SampleGrid
from src.diffusion import create_diffusion
from src.models.ddpm_module import DDPMModule, linear_warmup
from src.train import build
from src.utils.instantiate import instantiate_callbacks


def net_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


class RecordingSampleGrid(SampleGrid):
    """Records the weights at the moments that matter instead of only drawing grids."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.after_first_step = self.at_validation_start = self.seen_when_sampling = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.after_first_step = net_state(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.at_validation_start = net_state(pl_module)

    def _write(self, trainer, pl_module, name):
        if self.seen_when_sampling is None:
            self.seen_when_sampling = net_state(pl_module)
        super()._write(trainer, pl_module, name)


def test_sampling_callback_sees_the_ema_weights(compose_cfg, tmp_path):
    # decay 1.0: the average stays at its first value, the weights after the first optimizer step
    objects = build(compose_cfg("trainer.max_steps=6", "trainer.limit_train_batches=3"))
    callbacks = instantiate_callbacks(OmegaConf.create({
        "ema": {"_target_": "src.callbacks.EMA", "decay": 1.0},
        "grid": {"_target_": "tests.models.test_ddpm_module.RecordingSampleGrid", "num_samples": 2,
                 "dirpath": str(tmp_path)},
    }))
    assert [type(c).__name__ for c in callbacks] == ["RecordingSampleGrid", "EMA"]
    trainer = L.Trainer(max_steps=6, limit_train_batches=3, limit_val_batches=1, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(objects["module"], datamodule=objects["datamodule"])
    spy = callbacks[0]
    first, raw, seen = spy.after_first_step, spy.at_validation_start, spy.seen_when_sampling
    assert all(torch.equal(seen[k], first[k]) for k in first)
    assert any(not torch.equal(raw[k], first[k]) for k in first)
    # after fitting, the module keeps the average
    assert all(torch.equal(objects["module"].net.state_dict()[k], first[k]) for k in first)
    assert len(list(tmp_path.glob("*.png"))) >= 2


def test_linear_warmup_matches_the_paper():
    assert linear_warmup(0, 5000) == 0.0
    assert linear_warmup(2500, 5000) == 0.5
    assert linear_warmup(5000, 5000) == 1.0 and linear_warmup(10**6, 5000) == 1.0
    assert linear_warmup(0, 0) == 1.0


class TinyEps(nn.Module):
    def __init__(self, value: float | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.value = value

    def forward(self, x, t):
        out = self.scale * x * 0.1
        return out * float("nan") if self.value is not None else out


def make_module(net, **kwargs):
    return DDPMModule(net, create_diffusion("linear", 100, "fixed_large"),
                      functools.partial(torch.optim.Adam, lr=2e-4), data_shape=(1, 4, 4), **kwargs)


def test_learning_rate_follows_warmup():
    module = make_module(TinyEps(), warmup_steps=10)
    opt_conf = module.configure_optimizers()
    opt, sched = opt_conf["optimizer"], opt_conf["lr_scheduler"]["scheduler"]
    assert opt_conf["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-4) and lrs[10] == pytest.approx(2e-4)
    assert lrs[11] == pytest.approx(2e-4)


def test_nan_loss_stops_with_the_step_named():
    module = make_module(TinyEps(value=float("nan")))
    batch = (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    module.training_step(batch, 0)  # noted on the device; the first host check is at step 99
    with pytest.raises(FloatingPointError, match="at step 0"):
        module.check_finite_loss()
    # checking every step raises in the step itself
    module = make_module(TinyEps(value=float("nan")), nan_check_every_n_steps=1)
    with pytest.raises(FloatingPointError, match="at step 0"):
        module.training_step(batch, 0)


def test_sample_shape_and_eval_mode_restored():
    module = make_module(TinyEps())
    module.train()
    x = module.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 4, 4) and module.net.training


class PoisonWeights(L.Callback):
    """Turns the weights into NaN after a given optimizer step, as a diverging run would."""

    def __init__(self, after_step: int):
        self.after_step = after_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.after_step:
            with torch.no_grad():
                for p in pl_module.net.parameters():
                    p.fill_(float("nan"))


def test_nan_loss_keeps_the_last_good_checkpoint(compose_cfg, tmp_path):
    cfg = compose_cfg("trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=2",
                      "callbacks.sample_grid=null")
    objects = build(cfg)
    trainer = objects["trainer"]
    trainer.callbacks.insert(0, PoisonWeights(after_step=5))
    with pytest.raises(FloatingPointError, match="at step 5"):
        trainer.fit(objects["module"], datamodule=objects["datamodule"])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_loss_bins_are_weighted_means_without_host_checks():
    from src.models.ddpm_module import WeightedMean

    metric = WeightedMean()
    losses = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])]
    weights = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0])]
    for value, weight in zip(losses, weights, strict=True):
        metric.update(value, weight)
    # the mean of the selected entries 1, 3 and 5
    assert metric.compute().item() == pytest.approx(3.0)
