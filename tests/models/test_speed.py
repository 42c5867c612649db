"""Speed levers: torch.compile, channels-last, fused/foreach Adam, bf16-mixed training, device-resident data.

Each lever must leave the computation (up to float rounding), the checkpoint format and exact resuming alone.
"""

from __future__ import annotations

import csv
import functools
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from src.bench.sides import FusedEMA, Side
from src.bench.timing import resident_bytes
from src.callbacks import EMA
from src.data import CIFAR10DataModule, DigitsDataModule
from src.data.resident import ResidentBatch
from src.diffusion import create_diffusion
from src.models import TimeMLP, UNet
from src.models.ddpm_module import DDPMModule
from src.models.speed import build_optimizer, choose_fused_foreach, has_fused_kernels, use_channels_last
from tests.helpers import TINY, assert_same_weights_and_ema, run_entry_point, run_whole_and_split, write_fake_cifar10


def tiny_unet(seed: int = 0, dropout: float = 0.0) -> UNet:
    torch.manual_seed(seed)
    return UNet(in_channels=1, resolution=8, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                dropout=dropout, num_groups=4)


def make_module(net: nn.Module, **kwargs) -> DDPMModule:
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    return DDPMModule(net=net, diffusion=create_diffusion("linear", 50), optimizer=optimizer, warmup_steps=0,
                      data_shape=(1, 8, 8), **kwargs)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_tiny(module: DDPMModule, tmp_path, steps: int = 3) -> tuple[list[float], dict]:
    """A few steps on fixed random 8x8 images with the EMA callback; returns the losses and the checkpoint."""
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long)),
                                         batch_size=4)
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder, EMA(decay=0.5)], default_root_dir=tmp_path)
    L.seed_everything(0)
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return recorder.losses, torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ torch.compile
def test_compile_gives_the_same_losses_and_checkpoint_keys(tmp_path):
    """Compiled (aot_eager: AOTAutograd traces forward and backward, no C++ code generation) vs eager: the same
    losses, and checkpoints with the same keys (no ``_orig_mod.``) that load into an uncompiled module."""
    import torch._dynamo

    torch._dynamo.reset()
    eager_losses, eager_ckpt = fit_tiny(make_module(tiny_unet()), tmp_path / "eager")
    compiled = make_module(tiny_unet(), compile=True, compile_options={"backend": "aot_eager"})
    assert compiled.net._compiled_call_impl is not None
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    compiled_losses, compiled_ckpt = fit_tiny(compiled, tmp_path / "compiled")
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before  # dynamo really compiled the backbone

    assert len(eager_losses) == len(compiled_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert list(compiled_ckpt[key]) == list(eager_ckpt[key]), key
        assert not any("_orig_mod" in k for k in compiled_ckpt[key])
        assert all(torch.allclose(compiled_ckpt[key][k], eager_ckpt[key][k], atol=1e-5) for k in eager_ckpt[key])
    fresh = make_module(tiny_unet(seed=1))
    fresh.load_state_dict(compiled_ckpt["state_dict"])  # strict: same keys both ways
    assert torch.equal(fresh.net.conv_in.weight, compiled_ckpt["state_dict"]["net.conv_in.weight"])


def test_compile_options_must_be_a_mapping():
    with pytest.raises(ValueError, match="module.compile_options"):
        make_module(tiny_unet(), compile=True, compile_options=["aot_eager"])
    with pytest.raises(ValueError, match="module.compile must be true or false"):
        make_module(tiny_unet(), compile="yes")


# ------------------------------------------------------------------ channels-last
def test_channels_last_same_outputs_and_state(one_thread):
    contiguous, nhwc = tiny_unet(), tiny_unet()
    assert use_channels_last(nhwc)
    # kernels with several input channels and taps (a 1-channel or 1x1 kernel is both layouts at once)
    kernels = [(a, b) for a, b in zip(contiguous.parameters(), nhwc.parameters(), strict=True)
               if a.dim() == 4 and a.shape[1] > 1 and a.shape[2] * a.shape[3] > 1]
    assert kernels and all(b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
                           and a.is_contiguous() for a, b in kernels)
    x = torch.randn(8, 1, 8, 8)
    t = torch.randint(0, 50, (8,))
    with torch.no_grad():
        ref, out = contiguous.eval()(x, t), nhwc.eval()(x, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    state_a, state_b = contiguous.state_dict(), nhwc.state_dict()
    assert list(state_a) == list(state_b) and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_channels_last_module_trains_and_is_a_noop_for_the_mlp(one_thread):
    module = make_module(tiny_unet(), channels_last=True)
    assert module.channels_last
    optimizer = module.configure_optimizers()["optimizer"]
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    before = module.net.conv_in.weight.detach().clone()
    loss = module.diffusion.training_losses(module.net, x0).mean()
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and not torch.equal(module.net.conv_in.weight, before)
    kernels = [p for p in module.net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)  # layout kept

    mlp = TimeMLP(data_dim=2, hidden_dim=16, num_layers=2, time_embed_dim=8)
    assert not use_channels_last(mlp) and not mlp._forward_pre_hooks
    assert not make_module(mlp, channels_last=True).channels_last


# ------------------------------------------------------------------ fused / foreach Adam
@pytest.mark.parametrize(("fused", "foreach", "fused_by_default", "expected"), [
    (None, None, True, (True, False)),
    (None, None, False, (False, True)),
    (True, None, False, (True, False)),
    (False, None, True, (False, True)),
    (None, True, True, (False, True)),
    (None, False, True, (True, False)),
    (None, False, False, (False, False)),
    (False, False, True, (False, False)),
])
def test_fused_foreach_choice(fused, foreach, fused_by_default, expected):
    assert choose_fused_foreach(fused, foreach, fused_by_default) == expected


def test_fused_kernels_exist_for_cpu_parameters_only_when_floating_point():
    assert has_fused_kernels([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, 3))])
    assert not has_fused_kernels([torch.zeros(2, dtype=torch.long)])
    assert not has_fused_kernels([torch.zeros(2, device="meta")])  # no kernels there: foreach


def test_fused_foreach_bad_values():
    with pytest.raises(ValueError, match="cannot both be true"):
        choose_fused_foreach(True, True, False)
    with pytest.raises(ValueError, match="module.optimizer.fused"):
        choose_fused_foreach("yes", None, False)


def adam_by_hand(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8) -> list[torch.Tensor]:
    """Kingma & Ba's Adam with bias correction, in float64: the reference the optimizers are checked against."""
    b1, b2 = betas
    p = [x.double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for step, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**step), v[i] / (1 - b2**step)
            p[i] = p[i] - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def run_optimizer(module: DDPMModule, grads: list[list[torch.Tensor]]) -> torch.optim.Optimizer:
    optimizer = module.configure_optimizers()["optimizer"]
    for step_grads in grads:
        for p, g in zip(module.net.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize(("override", "expected"), [([], "fused"), (["module.optimizer.foreach=true"], "foreach"),
                                                  (["module.optimizer.fused=false", "module.optimizer.foreach=false"],
                                                   "loop")], ids=["auto", "foreach", "loop"])
def test_adam_from_the_config_matches_adam_by_hand(compose_cfg, override, expected):
    """The config's Adam: auto picks fused on the CPU (torch has the kernels); each choice matches Adam's equations."""
    cfg = compose_cfg(*override)
    net = tiny_unet()
    start = [p.detach().clone() for p in net.parameters()]
    module = DDPMModule(net=net, diffusion=create_diffusion("linear", 50), optimizer=instantiate(cfg.module.optimizer),
                        warmup_steps=0)
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(3)]
    optimizer = run_optimizer(module, grads)
    flags = {"fused": (True, False), "foreach": (False, True), "loop": (False, False)}[expected]
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == flags
    expected = adam_by_hand(start, grads, lr=float(cfg.module.optimizer.lr))
    for p, ref in zip(module.net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=1e-6)


def test_fused_is_refused_with_mixed_precision_and_clipping(tmp_path):
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1.0, logger=False,
                        default_root_dir=tmp_path)
    fused = make_module(tiny_unet())
    fused.optimizer_factory = functools.partial(torch.optim.Adam, lr=1e-3, fused=True)
    fused.trainer = trainer
    with pytest.raises(ValueError, match="module.optimizer.fused=true"):
        fused.configure_optimizers()
    auto = make_module(tiny_unet())
    auto.trainer = trainer
    defaults = auto.configure_optimizers()["optimizer"].defaults
    assert defaults["foreach"] is True and not defaults["fused"]  # auto falls back to foreach here
    plain = L.Trainer(accelerator="cpu", gradient_clip_val=1.0, logger=False, default_root_dir=tmp_path)
    auto.trainer = plain  # 32-true: nothing stands in the way of fused
    assert auto.configure_optimizers()["optimizer"].defaults["fused"] is True


def test_optimizer_without_the_flags():
    """An optimizer that takes no fused/foreach argument gets none; setting one for it is an error."""
    params = [nn.Parameter(torch.zeros(3))]
    unset = functools.partial(torch.optim.LBFGS, lr=0.1, fused=None, foreach=None)
    assert isinstance(build_optimizer(unset, params), torch.optim.LBFGS)
    with pytest.raises(ValueError, match="module.optimizer.fused is set"):
        build_optimizer(functools.partial(torch.optim.LBFGS, lr=0.1, fused=True), params)


# ------------------------------------------------------------------ bf16-mixed through the entry point
def read_losses(run_dir) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


@pytest.mark.slow
def test_bf16_mixed_digits_run(tmp_path):
    """trainer.precision=bf16-mixed on the CPU: autocast on, finite losses, float32 weights in the checkpoint."""
    run_dir = tmp_path / "bf16"
    result = run_entry_point("src.train", *TINY, "trainer.precision=bf16-mixed", "data.batch_size=16",
                             "callbacks.sample_grid.num_samples=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "bfloat16" in result.stdout + result.stderr  # Lightning announces its bf16 autocast
    losses = read_losses(run_dir)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    assert list((run_dir / "samples").glob("final-step=*.png"))


# ------------------------------------------------------------------ device-resident data
def resident_batches(dm, epoch: int = 0, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The device-resident train loader's batches as the training step sees them (after the transfer hook)."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip
    out = []
    for batch in loader:
        assert isinstance(batch, ResidentBatch)
        out.append(dm.on_after_batch_transfer(batch, 0))
    return out


def normal_batches(dm, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resident_digits_batches_equal_the_normal_path():
    normal = DigitsDataModule(batch_size=32)
    resident = DigitsDataModule(batch_size=32, device_resident=True)
    normal.setup()
    resident.setup()
    loader = resident.train_dataloader()
    assert loader.batch_size == 32 and hasattr(loader.sampler, "skip")  # what on_train_start needs to resume
    for epoch in (0, 3):
        assert_same_batches(resident_batches(resident, epoch), normal_batches(normal, epoch))


def test_resident_cifar10_batches_equal_the_normal_path(tmp_path):
    write_fake_cifar10(tmp_path, per_batch=8)
    kwargs = dict(data_dir=tmp_path, batch_size=4, download=False, random_flip=False, verify_checksums=False,
                  val_fraction=0.25)
    normal, resident = CIFAR10DataModule(**kwargs), CIFAR10DataModule(**kwargs, device_resident=True)
    normal.setup()
    resident.setup()
    assert_same_batches(resident_batches(resident, 1), normal_batches(normal, 1))
    images, labels = resident._resident
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32) and labels.shape == (30,)


def test_resident_flips_are_half_per_epoch_and_survive_a_resume():
    plain = DigitsDataModule(batch_size=64)
    dm = DigitsDataModule(batch_size=64, random_flip=True, device_resident=True)
    plain.setup()
    dm.setup()
    base = torch.stack([plain.train_set[i][0] for i in range(len(plain.train_set))])
    asymmetric = (base != base.flip(-1)).flatten(1).any(1)

    def flips(epoch: int) -> torch.Tensor:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        decided = torch.zeros(len(base), dtype=torch.bool)
        for batch in loader:
            x, _ = dm.on_after_batch_transfer(batch, 0)
            same, mirrored = base[batch.index], base[batch.index].flip(-1)
            assert all(torch.equal(a, b) or torch.equal(a, c) for a, b, c in zip(x, same, mirrored, strict=True))
            is_flipped = (x == mirrored).flatten(1).all(1) & asymmetric[batch.index]
            decided[batch.index] = is_flipped
            assert torch.equal(is_flipped, batch.flip & asymmetric[batch.index])
        return decided[asymmetric]

    first, again, other = flips(0), flips(0), flips(1)
    assert 0.4 < first.float().mean() < 0.6  # 1.4k asymmetric images: a fair coin lands within 0.1 of 1/2
    assert torch.equal(first, again) and not torch.equal(first, other)  # one draw per (seed, epoch)
    # a resumed epoch skips its first batches and sees the rest exactly as the unbroken run did
    whole = resident_batches(dm, epoch=2)
    assert_same_batches(resident_batches(dm, epoch=2, skip=3 * 64), whole[3:])


def test_resident_bad_flag():
    with pytest.raises(ValueError, match="data.device_resident"):
        DigitsDataModule(device_resident="yes")


@pytest.mark.slow
def test_resident_data_trains_and_resumes_exactly(tmp_path):
    """Through the entry point, with flips: 4 steps in one run == 2 steps, a restart from last.ckpt, and 2 more
    (the restart lands mid-epoch and the run crosses an epoch): same raw and EMA weights, bit for bit."""
    common = [*TINY, "data.device_resident=true", "+data.random_flip=true", "data.batch_size=8",
              "callbacks.sample_grid=null", "trainer.deterministic=true", "trainer.limit_train_batches=3",
              "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.check_val_every_n_epoch=100"]
    whole, split = run_whole_and_split(tmp_path, common, total=4, split=2)
    assert all(math.isfinite(v) for v in read_losses(tmp_path / "whole"))
    assert whole["global_step"] == 4
    assert whole["ddpm_config"]["data"]["device_resident"] is True
    assert_same_weights_and_ema(split, whole)  # raw and EMA weights, bit for bit


# ------------------------------------------------------------------ bench: per-side memory
def test_resident_bytes_counts_weights_grads_adam_and_ema():
    model = nn.Linear(10, 5)  # 55 float32 parameters
    side = Side("x", model)
    assert resident_bytes(side) == 55 * 4
    side.optimizer = torch.optim.Adam(model.parameters(), foreach=False)
    side.ema = FusedEMA(model, 0.9)
    model(torch.randn(2, 10)).sum().backward()
    side.optimizer.step()
    # weights + grads + Adam's two moments + EMA shadow, plus one float32 step counter per parameter tensor
    assert resident_bytes(side) == 5 * 55 * 4 + 2 * 4


def test_bench_gives_ours_the_levers_only_in_the_defaults_setting(tmp_path):
    from src.bench.report import levers_used
    from src.bench.sides import build_ours
    from tests.helpers import compose_config

    cfg = compose_config(["model.ch=8", "model.num_groups=4", "channels_last=true", "device=cpu"], tmp_path,
                         config_name="bench")
    sizes = {"batch_size": 2, "train_steps": 1, "sample_steps": 2, "ddim_steps": 2, "dpmpp_steps": 2}
    plain = build_ours(cfg, sizes, torch.device("cpu"), "fp32", "no_grad", levers=False)
    tuned = build_ours(cfg, sizes, torch.device("cpu"), "fp32", "inference_mode", levers=True)
    assert levers_used(plain, cfg, False) == {"adam": "torch default", "compile": False, "channels_last": False}
    assert levers_used(tuned, cfg, True) == {"adam": "fused", "compile": False, "channels_last": True}
    assert tuned.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    tuned.runs["train"]()  # a step runs with the levers on
    assert all(torch.isfinite(p).all() for p in tuned.model.parameters())
