"""The sampling precision switch: bf16 autocast runs the network only, the samples stay float32 and close."""

from __future__ import annotations

import functools

import pytest
import torch

from src.diffusion import DDIM, create_diffusion
from src.models.ddpm_module import DDPMModule
from src.models.unet import UNet
from src.utils.device import has_fast_bf16
from src.utils.precision import network_precision, resolve_precision
from src.utils.sampling import draw


def test_names_and_auto():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if has_fast_bf16(cpu) else "fp32")
    with pytest.raises(ValueError, match="choose one of fp32, bf16, auto"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_network_runs_in_the_chosen_precision(precision, dtype):
    layer = torch.nn.Linear(4, 4)
    with network_precision(precision, torch.device("cpu")) as resolved:
        assert resolved == precision
        assert layer(torch.randn(2, 4)).dtype == dtype


def test_bf16_samples_are_float32_and_close_to_fp32(one_thread):
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
               num_groups=8, dropout=0.0)
    for p in net.parameters():  # away from the near-zero output init, so the network matters
        p.data.add_(0.05 * torch.randn_like(p))
    module = DDPMModule(net, create_diffusion("linear", 100), functools.partial(torch.optim.Adam), data_shape=(1, 8, 8))
    sampler = DDIM(steps=10)
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = draw(module.eval(), sampler, 8, 4, 3, torch.device("cpu"), precision=precision)
    assert out["bf16"].dtype == torch.float32
    diff = (out["bf16"] - out["fp32"]).abs()
    # bf16 keeps 8 mantissa bits: visibly different numbers, but the same samples
    assert 0 < diff.max() and diff.mean() < 0.05
