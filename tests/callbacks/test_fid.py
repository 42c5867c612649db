"""FIDCallback in a tiny fit: val/fid from EMA samples, real features once, Inception kept off the module."""

from __future__ import annotations

import functools
import math
import socket

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from src.callbacks.fid import FIDCallback
from src.data.base import BaseDataModule
from src.diffusion import create_diffusion
from src.metrics.fidelity import WEIGHTS_ENV, make_random_inception_weights
from src.models.ddpm_module import DDPMModule
from src.models.unet import UNet
from src.utils.instantiate import instantiate_callbacks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(make_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth"))


class Blobs(BaseDataModule):
    """16 RGB images 16x16 in [-1, 1]: colour ramps with a random tint each, so they have structure."""

    def __init__(self):
        super().__init__(batch_size=4)
        g = torch.Generator().manual_seed(0)
        ramp = torch.linspace(-1, 1, 16)
        tint = torch.rand(16, 3, 1, 1, generator=g) * 2 - 1
        self.x = (0.5 * ramp.view(1, 1, 1, 16) + 0.5 * tint).clamp(-1, 1).expand(16, 3, 16, 16).contiguous()

    @property
    def name(self) -> str:
        return "blobs"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3, 16, 16)

    def setup(self, stage: str | None = None) -> None:
        y = torch.zeros(16, dtype=torch.long)
        self.train_set = self.val_set = TensorDataset(self.x, y)


def make_module(data_shape=(3, 16, 16)) -> DDPMModule:
    net = UNet(in_channels=data_shape[0], ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               dropout=0.0, resolution=data_shape[-1], num_groups=4)
    return DDPMModule(net, create_diffusion("cosine", 20), functools.partial(torch.optim.Adam, lr=1e-3),
                      warmup_steps=0, data_shape=data_shape)


def net_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


class RecordingFID(FIDCallback):
    """Records the weights before validation (raw) and when sampling (should be the EMA ones)."""

    def on_validation_epoch_start(self, trainer, pl_module):
        self.raw = net_state(pl_module)

    def compute(self, trainer, pl_module):
        self.seen = net_state(pl_module)
        return super().compute(trainer, pl_module)


def test_fid_is_logged_from_ema_samples_with_inception_outside_the_module(weights, tmp_path):
    module = make_module()
    n_params = sum(p.numel() for p in module.parameters())
    # listed after the EMA on purpose: src.train's ordering must put weight averaging last
    callbacks = instantiate_callbacks(OmegaConf.create({
        "ema": {"_target_": "src.callbacks.EMA", "decay": 0.9},
        "fid": {"_target_": "tests.callbacks.test_fid.RecordingFID", "every_n_epochs": 1, "num_samples": 8,
                "batch_size": 8, "weights_path": weights, "feature": 64},
    }))
    fid = callbacks[0]
    assert isinstance(fid, RecordingFID)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        accelerator="cpu", default_root_dir=tmp_path, num_sanity_val_steps=1)
    trainer.fit(module, datamodule=Blobs())

    logged = trainer.callback_metrics["val/fid"]
    assert math.isfinite(float(logged)) and float(logged) == pytest.approx(fid.last_fid)
    assert fid.real_feature_passes == 1 and int(fid.metric.real_features_num_samples) == 8
    assert int(fid.metric.fake_features_num_samples) == 0  # reset after each evaluation
    # the Inception network stays on the callback
    assert not [name for name, _ in module.named_parameters() if "inception" in name.lower()]
    assert sum(p.numel() for p in module.parameters()) == n_params
    # sampled with the EMA weights (which the module keeps after fitting), not the raw ones
    final = net_state(module)
    assert all(torch.equal(fid.seen[k], final[k]) for k in final)
    assert any(not torch.equal(fid.raw[k], final[k]) for k in final)


def test_setup_rejects_points_and_missing_weights(tmp_path, monkeypatch):
    points = DDPMModule(torch.nn.Identity(), create_diffusion("cosine", 20), torch.optim.Adam,
                        data_shape=(2,))
    with pytest.raises(ValueError, match="need images.*sliced-Wasserstein.*digits"):
        FIDCallback().setup(None, points, "fit")
    with pytest.raises(FileNotFoundError, match=rf"callbacks\.fid\.weights_path.*{WEIGHTS_ENV}"):
        FIDCallback(weights_path=str(tmp_path / "missing.pth")).setup(None, make_module(), "fit")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(RuntimeError, match=rf"callbacks\.fid\.weights_path.*{WEIGHTS_ENV}"):
        FIDCallback().setup(None, make_module(), "fit")


def test_fid_samples_are_the_modules_own_samples_batch_by_batch():
    """The callback draws through src.utils.sampling: with the same per-sample noise, the batches ``module.sample``
    gives."""
    from src.diffusion.noise import SampleNoise
    from src.utils.sampling import draw_batches

    module = make_module((3, 8, 8))
    for p in module.net.parameters():  # away from the near-zero output init, so the network matters
        p.data.add_(0.05 * torch.randn_like(p))
    module.train()  # as at on_fit_end: sampling switches dropout off and restores the mode
    want = [module.sample(n, generator=SampleNoise(4, range(start, start + n)))
            for start, n in ((0, 2), (2, 2), (4, 1))]
    got = list(draw_batches(module, FIDCallback().sampler, 5, 2, 4, module.device))
    assert [x.shape[0] for x in got] == [2, 2, 1] and module.net.training
    assert all(torch.equal(a, b.clamp(-1, 1)) for a, b in zip(got, want, strict=True))
