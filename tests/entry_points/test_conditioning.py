"""Class conditioning and classifier-free guidance: backbones, label dropout, guidance, config, entry points."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from src.callbacks.sample_grid import SampleGrid
from src.diffusion import GaussianDiffusion, make_beta_schedule
from src.diffusion.guidance import ClassifierFreeGuidance, conditional_model
from src.models.ddpm_module import DDPMModule
from src.models.mlp import TimeMLP
from src.models.unet import UNet
from src.sample import sample
from src.train import build
from tests.helpers import TINY, compose_config, run_entry_point

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
K = 4  # classes of the small test backbones


def small_unet(num_classes: int | None = K, out_channels: int | None = None, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(in_channels=2, out_channels=out_channels, ch=8, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.0, resolution=8, num_groups=4, num_classes=num_classes)
    # the reference init starts every residual branch and the output at ~0 (gain 1e-5), so labels would barely
    # reach the output; ordinary weights there make the comparisons below meaningful
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.weight.abs().max() < 1e-3:
            nn.init.xavier_uniform_(m.weight)
    return net.eval()


def small_mlp(num_classes: int | None = K, out_dim: int | None = None, seed: int = 0) -> TimeMLP:
    torch.manual_seed(seed)
    net = TimeMLP(data_dim=3, hidden_dim=16, num_layers=2, time_embed_dim=8, out_dim=out_dim,
                  num_classes=num_classes)
    nn.init.normal_(net.output.weight, std=0.5)  # zero-initialised otherwise: every label would give 0
    return net.eval()


def inputs(net: nn.Module, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (batch, 2, 8, 8) if isinstance(net, UNet) else (batch, 3)
    return torch.randn(shape, generator=g), torch.randint(0, 50, (batch,), generator=g)


# ------------------------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("make", [small_unet, small_mlp], ids=["unet", "mlp"])
def test_backbone_shapes_with_and_without_labels(make):
    net = make()
    x, t = inputs(net)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert net(x, t, y).shape == x.shape and net(x, t).shape == x.shape
    plain = make(num_classes=None)
    assert plain(x, t).shape == x.shape


@pytest.mark.parametrize("make", [small_unet, small_mlp], ids=["unet", "mlp"])
def test_null_label_is_no_label_and_labels_matter(make):
    net = make()
    x, t = inputs(net)
    null = torch.full((6,), K)
    assert torch.equal(net(x, t, null), net(x, t))
    out0, out1 = net(x, t, torch.zeros(6, dtype=torch.long)), net(x, t, torch.ones(6, dtype=torch.long))
    assert (out0 - out1).abs().max() > 1e-4  # the label reaches the output


def test_unconditional_parameter_count_and_state_dict_unchanged():
    with torch.device("meta"):
        plain, cond = UNet(), UNet(num_classes=10)
    assert sum(p.numel() for p in plain.parameters()) == 35_746_307
    # one extra table: 10 classes + the null row, each of the time-embedding width 4 * ch = 512
    assert sum(p.numel() for p in cond.parameters()) == 35_746_307 + 11 * 512
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label_emb.weight"}
    assert set(plain.state_dict()) <= set(cond.state_dict())
    # built last: with the same seed every other weight starts as in the unconditional model
    torch.manual_seed(0)
    a = TimeMLP(data_dim=3, hidden_dim=16, num_layers=2, time_embed_dim=8)
    torch.manual_seed(0)
    b = TimeMLP(data_dim=3, hidden_dim=16, num_layers=2, time_embed_dim=8, num_classes=K)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(("y", "match"), [
    (torch.tensor([0.0, 1, 2, 3, 0, 1]), "int64"),
    (torch.tensor([0, 1, 2]), r"shape \(6,\)"),
    (torch.tensor([[0, 1, 2, 3, 0, 1]]), r"shape \(6,\)"),
    (torch.tensor([0, 1, 2, 3, 5, 1]), r"labels must be in \[0, 3\]"),
    (torch.tensor([0, -1, 2, 3, 0, 1]), r"labels must be in \[0, 3\]"),
], ids=["float", "short", "2d", "too-large", "negative"])
@pytest.mark.parametrize("make", [small_unet, small_mlp], ids=["unet", "mlp"])
def test_bad_labels_fail_clearly(make, y, match):
    net = make()
    x, t = inputs(net)
    with pytest.raises(ValueError, match=match):
        net(x, t, y)


@pytest.mark.parametrize("make", [small_unet, small_mlp], ids=["unet", "mlp"])
def test_labels_for_an_unconditional_backbone_fail_clearly(make):
    net = make(num_classes=None)
    x, t = inputs(net)
    with pytest.raises(ValueError, match="unconditional.*conditional=true"):
        net(x, t, torch.zeros(6, dtype=torch.long))


# -------------------------------------------------------------------------------------- label dropout
def small_module(net: nn.Module, label_dropout: float = 0.1, num_timesteps: int = 100) -> DDPMModule:
    diffusion = GaussianDiffusion(make_beta_schedule("linear", num_timesteps), variance="fixed_large")
    return DDPMModule(net, diffusion, optimizer=torch.optim.Adam, warmup_steps=0, data_shape=(3,),
                      clip_denoised=False, label_dropout=label_dropout)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_label_dropout_rate(rate):
    module = small_module(small_mlp(), label_dropout=rate)
    n = 20_000
    labels = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(0))
    batch = (torch.zeros(n, 3), labels)
    torch.manual_seed(0)
    used = module.model_for_batch(batch, train=True).labels
    dropped = used == K
    # binomial standard deviation sqrt(p(1-p)/n) <= 0.0036: a tolerance of 0.015 is > 4 of them
    assert abs(dropped.float().mean().item() - rate) < 0.015
    assert torch.equal(used[~dropped], labels[~dropped])  # the others keep their label
    assert torch.equal(module.model_for_batch(batch, train=False).labels, labels)  # evaluation: none dropped


def test_no_label_dropout_at_zero_and_unconditional_net_is_passed_through():
    module = small_module(small_mlp(), label_dropout=0.0)
    labels = torch.arange(1000) % K
    assert torch.equal(module.model_for_batch((torch.zeros(1000, 3), labels), train=True).labels, labels)
    plain = small_module(small_mlp(num_classes=None))
    assert plain.model_for_batch((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), train=True) is plain.net
    with pytest.raises(ValueError, match="label_dropout"):
        small_module(small_mlp(), label_dropout=1.5)


# -------------------------------------------------------------------------------------------- guidance
class CountingNet(nn.Module):
    """Records the batch size of every forward call of the wrapped net."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.num_classes, self.batches = net, net.num_classes, []

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        return self.net(x, t, y)


@pytest.mark.parametrize("scale", [0.0, 2.0, 3.5])
@pytest.mark.parametrize(("make", "out"), [(small_unet, 2), (small_unet, 4), (small_mlp, 3), (small_mlp, 6)],
                         ids=["unet-C", "unet-2C", "mlp-C", "mlp-2C"])
def test_guidance_is_uncond_plus_scale_times_difference(make, out, scale):
    net = make(**({"out_channels": out} if make is small_unet else {"out_dim": out}))
    x, t = inputs(net)
    channels = x.shape[1]
    y = torch.tensor([3, 0, 1, 2, 3, 1])
    with torch.no_grad():
        cond = net(x, t, y)
        uncond = net(x, t, torch.full((6,), K))
        counting = CountingNet(net)
        guided = ClassifierFreeGuidance(counting, y, scale)(x, t)
    assert counting.batches == [12]  # one forward over the stacked batch
    expected = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    torch.testing.assert_close(guided[:, :channels], expected, rtol=1e-5, atol=1e-5)
    assert guided.shape == cond.shape
    if out > channels:  # learned variance: taken from the conditional pass, unguided
        torch.testing.assert_close(guided[:, channels:], cond[:, channels:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [small_unet, small_mlp], ids=["unet", "mlp"])
def test_guidance_scale_one_is_the_conditional_model(make):
    net = make()
    x, t = inputs(net)
    y = torch.tensor([1, 1, 0, 2, 3, 3])
    with torch.no_grad():
        cond = net(x, t, y)
        torch.testing.assert_close(ClassifierFreeGuidance(net, y, 1.0)(x, t), cond, rtol=1e-5, atol=1e-5)
        assert torch.equal(conditional_model(net, y, 1.0)(x, t), cond)  # one pass, no guidance arithmetic
    with pytest.raises(ValueError, match="guidance_scale"):
        ClassifierFreeGuidance(net, y, -1.0)
    with pytest.raises(ValueError, match="unconditional"):
        ClassifierFreeGuidance(make(num_classes=None), y, 2.0)


def test_module_sample_uses_labels_and_guidance():
    module = small_module(small_mlp())
    net = module.net
    null = torch.full((5,), K)
    y = torch.full((5,), 2)

    def explicit(x, t):  # guidance written out, two separate forward passes
        uncond, cond = net(x, t, null), net(x, t, y)
        return uncond + 2.5 * (cond - uncond)

    ours = module.sample(5, generator=torch.Generator().manual_seed(0), class_labels=2, guidance_scale=2.5)
    reference = module.diffusion.sample(explicit, (5, 3), generator=torch.Generator().manual_seed(0),
                                        clip_denoised=False)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs class labels"):
        module.sample(2, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        module.sample(2, class_labels=K)
    with pytest.raises(ValueError, match="unconditional"):
        small_module(small_mlp(num_classes=None)).sample(2, class_labels=1)


# ------------------------------------------------------------------------------------------ grid layout
class LabelImages:
    """Stands in for a sampler: each sample is a constant image whose value encodes the class it was asked for."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.calls = []

    def __call__(self, model, diffusion, x_T, generator=None, progress=False, clip_denoised=True):
        self.calls.append((x_T.shape[0], model.guidance_scale))
        value = -1 + 2 * model.labels.float() / (self.num_classes - 1)
        return value[:, None, None, None].expand_as(x_T).clone()


def test_sample_grid_has_one_row_per_class(tmp_path):
    sampler = LabelImages(num_classes=5)
    grid_cb = SampleGrid(num_samples=13, dirpath=str(tmp_path), guidance_scale=3.0, sampler=sampler)
    module = SimpleNamespace(net=SimpleNamespace(num_classes=5), diffusion=None, data_shape=(1, 8, 8),
                             clip_denoised=True, device=torch.device("cpu"))
    trainer = SimpleNamespace(global_step=7, loggers=[], datamodule=None, default_root_dir=str(tmp_path))
    grid_cb._write(trainer, module, "g")
    assert sampler.calls == [(15, 3.0)]  # 13 rounded to 3 per class
    image = np.array(Image.open(tmp_path / "g.png"))[::4, ::4]  # the grid is enlarged 4x (32 px tiles)
    assert image.shape[:2] == (1 + 5 * 9, 1 + 3 * 9)  # 5 rows x 3 columns of 8x8 tiles, padding 1
    for row in range(5):
        for col in range(3):
            tile = image[1 + 9 * row: 9 * (row + 1), 1 + 9 * col: 9 * (col + 1)]
            assert (tile == round(255 * row / 4)).all()


# ------------------------------------------------------------------------------------- config and entry
def test_conditional_config_sets_num_classes_from_the_data(compose_cfg):
    objects = build(compose_cfg("experiment=digits_cond"))
    assert objects["module"].net.num_classes == 10 and objects["module"].label_dropout == 0.1
    assert objects["run_config"]["model"]["num_classes"] == 10
    plain = build(compose_cfg("experiment=digits"))
    assert plain["module"].net.num_classes is None and plain["module"].net.label_emb is None


@pytest.mark.parametrize(("overrides", "match"), [
    (["experiment=toy2d", "conditional=true"], "conditional=true needs labelled data"),
    (["model.num_classes=10"], "conditional=false"),
    (["conditional=true", "model.num_classes=7"], "has 10 classes"),
], ids=["toy2d", "num-classes-without-conditional", "wrong-num-classes"])
def test_conditional_config_errors(compose_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(compose_cfg(*overrides))


def test_class_label_on_an_unconditional_checkpoint_fails_clearly(tmp_path):
    cfg = compose_config([*TINY, "experiment=digits"], tmp_path / "run")
    objects = build(cfg)
    path = tmp_path / "plain.ckpt"
    torch.save({"ddpm_config": objects["run_config"], "state_dict": objects["module"].state_dict(),
                "ddpm_data_shape": [1, 8, 8]}, path)
    for override, key in (("class_label=3", "class_label"), ("guidance_scale=2.0", "guidance_scale")):
        cfg = compose_config([f"ckpt_path={path}", override, "num_samples=2", "progress=false"], tmp_path / "s",
                             config_name="sample")
        with pytest.raises(ValueError, match=f"{key}=.*unconditional.*conditional=true"):
            sample(cfg)


@pytest.mark.slow
def test_conditional_train_then_guided_sample_entry_points(tmp_path, one_thread):
    run_dir = tmp_path / "run"
    result = run_entry_point("src.train", *TINY, "experiment=digits_cond", "callbacks.sample_grid.num_samples=10",
                             f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"DDPM_ROOT": str(tmp_path), **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["ddpm_config"]["model"]["num_classes"] == 10 and saved["ddpm_config"]["conditional"] is True
    assert saved["state_dict"]["net.label_emb.weight"].shape == (11, 4 * 32)
    # the final grid: one row per class, one sample each (10 rows of 8x8 tiles, padding 1, enlarged 4x)
    grid = np.array(Image.open(next((run_dir / "samples").glob("final-step=*.png"))))
    assert grid.shape[:2] == (4 * (1 + 10 * 9), 4 * (1 + 9))

    out = tmp_path / "sampled"
    result = run_entry_point("src.sample", f"ckpt_path={ckpt}", "class_label=3", "guidance_scale=2.0",
                             "sampler=ddim", "sampler.steps=5", "num_samples=4", "batch_size=3", "progress=false",
                             f"hydra.run.dir={out}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (4, 8, 8, 1)
        assert f["labels"].tolist() == [3, 3, 3, 3]

    # class_label null: all classes in turn; ancestral sampling works the same way
    cfg = compose_config([f"ckpt_path={ckpt}", "num_samples=12", "batch_size=12", "progress=false", "sampler=ddpm",
                          "sampler.steps=5", "guidance_scale=1.5"], tmp_path / "cycled", config_name="sample")
    with np.load(sample(cfg)) as f:
        assert f["labels"].tolist() == [i % 10 for i in range(12)]
    cfg = compose_config([f"ckpt_path={ckpt}", "class_label=10", "num_samples=2"], tmp_path / "bad",
                         config_name="sample")
    with pytest.raises(ValueError, match=r"class_label=10 .*\[0, 9\]"):
        sample(cfg)

    # src.eval scores guided samples by how often the digits classifier names the requested class
    out = tmp_path / "accuracy"
    result = run_entry_point("src.eval", f"ckpt_path={ckpt}", "metric=class_accuracy", "guidance_scale=3",
                             "sampler=dpmpp_2m", "sampler.steps=5", "sampler.threshold=0.995", "num_samples=10",
                             "progress=false", f"hydra.run.dir={out}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 10 and metrics["guidance_scale"] == 3.0 and metrics["class_label"] is None
    assert 0 <= metrics["class_accuracy"] <= 1 and metrics["class_accuracy_real_digits"] > 0.9
    assert sorted(k for k in metrics if k[-1].isdigit()) == [f"class_accuracy_{k}" for k in range(10)]
    with np.load(out / "samples.npz") as f:
        assert f["labels"].tolist() == list(range(10))
    result = run_entry_point("src.eval", f"ckpt_path={ckpt}", "metric=nll", "guidance_scale=3", "num_batches=1",
                             f"hydra.run.dir={tmp_path / 'nll'}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode != 0 and "guidance_scale=3 applies to the metrics that draw samples" in result.stderr
