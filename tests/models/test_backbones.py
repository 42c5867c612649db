"""Tests for the denoiser backbones (UNet, TimeMLP) and the timestep embedding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from src.models import TimeMLP, UNet, timestep_embedding
from src.models.unet import AttnBlock, Downsample, ResBlock, Upsample

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, num_groups=8)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides}).eval()


def randomize_zero_init(model: torch.nn.Module) -> None:
    """Give the ~zero-initialised layers ordinary weights so the output depends on the input."""
    for m in model.modules():
        if isinstance(m, ResBlock):
            torch.nn.init.xavier_uniform_(m.conv2.weight)
        elif isinstance(m, AttnBlock):
            torch.nn.init.xavier_uniform_(m.proj_out.weight)
    if isinstance(model, UNet):
        torch.nn.init.xavier_uniform_(model.conv_out.weight)
    if isinstance(model, TimeMLP):
        torch.nn.init.xavier_uniform_(model.output.weight)


# ---------------------------------------------------------------- parameter counts


def test_param_count_cifar10():
    with torch.device("meta"):
        model = UNet()  # defaults are the CIFAR-10 model
    assert n_params(model) == 35_746_307


def test_param_count_256():
    with torch.device("meta"):
        model = UNet(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), resolution=256, dropout=0.0)
    assert n_params(model) == 113_673_219


def test_accepts_omegaconf_lists():
    cfg = OmegaConf.create({"ch_mult": [1, 2], "attn_resolutions": [8]})
    model = UNet(
        ch=32,
        ch_mult=cfg.ch_mult,
        attn_resolutions=cfg.attn_resolutions,
        resolution=16,
        num_res_blocks=1,
        num_groups=8,
    )
    assert model.ch_mult == (1, 2) and model.attn_resolutions == (8,)
    assert n_params(model) == n_params(tiny_unet())


# ---------------------------------------------------------------- shapes


def test_unet_output_shape():
    model = tiny_unet()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 999])).shape == (2, 3, 16, 16)


def test_unet_output_shape_learned_variance_channels():
    model = tiny_unet(out_channels=6)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16), torch.tensor([3, 7])).shape == (2, 6, 16, 16)


def test_unet_one_channel_8x8():
    model = tiny_unet(in_channels=1, resolution=8, attn_resolutions=(4,))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8), torch.tensor([0, 1])).shape == (2, 1, 8, 8)


def test_timemlp_output_shape():
    model = TimeMLP(data_dim=2, hidden_dim=32, num_layers=2, time_embed_dim=16)
    assert model(torch.randn(5, 2), torch.arange(5)).shape == (5, 2)
    assert TimeMLP(data_dim=2, hidden_dim=32, out_dim=4)(torch.randn(5, 2), torch.arange(5)).shape == (5, 4)


def test_attention_placed_at_configured_resolution():
    model = tiny_unet()  # levels at 16 and 8; attention at 8: 1 down + 1 mid + 2 up
    sizes = []
    for m in model.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    assert sizes == [(8, 8)] * 4


# ---------------------------------------------------------------- timestep embedding


def test_timestep_embedding_closed_form():
    dim, half = 8, 4
    emb = timestep_embedding(torch.tensor([0, 1, 7]), dim)
    assert emb.shape == (3, dim) and emb.dtype == torch.float32
    # t = 0: sin half is 0, cos half is 1.
    assert torch.equal(emb[0, :half], torch.zeros(half))
    assert torch.equal(emb[0, half:], torch.ones(half))
    # Frequencies 10000^(-i/(half-1)): first is 1, last is exactly 1e-4 (DDPM divisor half-1).
    for i in range(half):
        f = 10000.0 ** (-i / (half - 1))
        assert emb[2, i].item() == pytest.approx(math.sin(7 * f), abs=1e-6)  # [sin, cos] order
        assert emb[2, half + i].item() == pytest.approx(math.cos(7 * f), abs=1e-6)
    assert emb[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert emb[1, half - 1].item() == pytest.approx(math.sin(1e-4), rel=1e-5)


def test_timestep_embedding_odd_dim_zero_pads():
    emb = timestep_embedding(torch.tensor([3, 500]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[:, -1], torch.zeros(2))
    assert torch.allclose(emb[:, :6], timestep_embedding(torch.tensor([3, 500]), 6))


# ---------------------------------------------------------------- behaviour


def test_zero_init_output_is_near_zero():
    # Reference init: conv_out / res-block conv2 / attention proj_out have scale 1e-10, so a fresh net is ~0.
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, num_groups=8)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 16, 16), torch.tensor([0, 500]))
    assert out.abs().max().item() < 1e-3
    assert out.abs().max().item() > 0  # scale 1e-10 is tiny, not exactly zero
    mlp = TimeMLP(hidden_dim=32)
    assert torch.equal(mlp(torch.randn(4, 2), torch.arange(4)), torch.zeros(4, 2))


def test_output_depends_on_t():
    model = tiny_unet()
    randomize_zero_init(model)
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500]))
    assert out.abs().mean() > 1e-2
    assert (out[0] - out[1]).abs().max() > 1e-3

    mlp = TimeMLP(hidden_dim=32, num_layers=2)
    randomize_zero_init(mlp)
    y = mlp(torch.randn(1, 2).expand(2, -1), torch.tensor([0, 500]))
    assert (y[0] - y[1]).abs().max() > 1e-3


def test_all_parameters_receive_gradients():
    model = tiny_unet().train()
    randomize_zero_init(model)
    model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_attention_matches_manual_softmax():
    torch.manual_seed(0)
    c = 16
    block = AttnBlock(c, lambda n: torch.nn.GroupNorm(4, n, eps=1e-6))
    torch.nn.init.normal_(block.proj_out.weight)
    x = torch.randn(2, c, 4, 4)

    h = block.norm(x)

    def flat(conv):  # (B, C, HW)
        return F.conv2d(h, conv.weight, conv.bias).reshape(2, c, 16)

    q, k, v = flat(block.q), flat(block.k), flat(block.v)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # (B, HWq, HWk)
    attended = torch.einsum("bij,bcj->bci", w, v).reshape(2, c, 4, 4)
    expected = x + F.conv2d(attended, block.proj_out.weight, block.proj_out.bias)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)
        # both kernels (SDPA is what a GPU runs; the test forces it on the CPU) give the same attention
        for attend in (block.attend_sdpa, block.attend_matmul):
            assert torch.allclose(attend(h), attended.reshape(2, c, 16), atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sdpa_attention_is_accepted_by_the_fused_kernel(channels_last):
    """The SDPA path (what a GPU runs) hands SDPA unit-stride q/k/v, which the fused kernels require; with only
    the flash kernel allowed, anything else raises instead of silently taking the slow math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    block = AttnBlock(16, lambda n: torch.nn.GroupNorm(4, n, eps=1e-6))
    h = torch.randn(2, 16, 4, 4)
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
        h = h.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = block.attend_sdpa(h)
    assert torch.allclose(out, block.attend_matmul(h).detach(), atol=1e-5)


def test_attention_kernels_same_gradients():
    torch.manual_seed(0)
    c = 16
    block = AttnBlock(c, lambda n: torch.nn.GroupNorm(4, n, eps=1e-6))
    h = torch.randn(2, c, 4, 4)
    grads = []
    for attend in (block.attend_sdpa, block.attend_matmul):
        block.zero_grad()
        x = h.clone().requires_grad_(True)
        (attend(x) * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in (block.q.weight, block.k.weight, block.v.weight)])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_blocks_gradcheck_float64():
    # ResBlock and AttnBlock add in place onto fresh conv outputs; autograd must still see the true derivative.
    torch.manual_seed(0)
    norm = lambda n: torch.nn.GroupNorm(2, n, eps=1e-6)  # noqa: E731
    res = ResBlock(4, 6, temb_dim=5, dropout=0.0, norm=norm).double()
    attn = AttnBlock(4, norm).double()
    for m in (res.conv2, attn.proj_out):
        torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    temb = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(res, (x, temb))
    assert torch.autograd.gradcheck(attn, (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_is_nearest_neighbour(channels_last):
    torch.manual_seed(0)
    up = Upsample(3)
    x = torch.randn(2, 3, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    seen = []
    up.conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    out = up(x)
    nearest = F.interpolate(x.detach(), scale_factor=2.0, mode="nearest")
    assert torch.equal(seen[0], nearest)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(out, up.conv(nearest), atol=1e-6)
    out.sum().backward()
    # each input pixel feeds a 2x2 block, so its gradient is the sum over that block
    g = torch.autograd.grad(up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")).sum(), x)[0]
    assert torch.allclose(x.grad, g, atol=1e-5)


def test_downsample_pads_bottom_right_only():
    torch.manual_seed(0)
    down = Downsample(4)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = down(x)
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
        symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert out.shape == (2, 4, 4, 4)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, symmetric, atol=1e-3)


def test_channels_last_matches_contiguous():
    model = tiny_unet()
    randomize_zero_init(model)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ref = model(x, t)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 16, 16), r"data has 1 channel but model\.in_channels=3: set model\.in_channels=1"),
        ((3, 8, 8), r"model\.resolution=16.*set model\.resolution to data\.image_size"),
        ((3, 15, 15), r"not divisible by 2\*\*\(len\(ch_mult\)-1\)=2.*data\.image_size"),
        ((3, 16, 8), r"square.*data\.image_size"),
        ((2,), r"UNet expects image data \(C,H,W\) but the data is 2-D points.*model=mlp"),
    ],
)
def test_unet_check_input_shape_errors(shape, match):
    model = tiny_unet()
    model.check_input_shape((3, 16, 16))  # the matching shape passes
    with pytest.raises(ValueError, match=match):
        model.check_input_shape(shape)


def test_unet_check_input_shape_cifar_28():
    with torch.device("meta"):
        model = UNet()
    with pytest.raises(ValueError, match=r"image size 28 is not divisible by .*=8 .*model\.ch_mult"):
        model.check_input_shape((3, 28, 28))


def test_timemlp_check_input_shape_errors():
    model = TimeMLP(data_dim=2, hidden_dim=16)
    model.check_input_shape((2,))
    with pytest.raises(ValueError, match=r"TimeMLP expects vector data \(D,\).*model=unet_small"):
        model.check_input_shape((3, 32, 32))
    with pytest.raises(ValueError, match=r"model\.data_dim=2: set model\.data_dim=3"):
        model.check_input_shape((3,))


@pytest.mark.parametrize("model_kind", ["unet", "mlp"])
@pytest.mark.parametrize(
    ("t", "match"),
    [
        (torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([0, 1, 2]), r"shape \(2,\)"),
        (torch.tensor(5), r"shape \(2,\)"),
        (torch.tensor([[0, 1]]), r"shape \(2,\)"),
    ],
)
def test_bad_timesteps_raise(model_kind, t, match):
    if model_kind == "unet":
        model, x = tiny_unet(), torch.randn(2, 3, 16, 16)
    else:
        model, x = TimeMLP(hidden_dim=16), torch.randn(2, 2)
    with pytest.raises(ValueError, match=match):
        model(x, t)


def test_group_divisibility_error_at_construction():
    with pytest.raises(ValueError, match=r"model\.num_groups=32.*model\.ch=48"):
        UNet(ch=48, ch_mult=(1, 2), resolution=16, num_res_blocks=1, attn_resolutions=())


def test_resolution_not_divisible_error_at_construction():
    with pytest.raises(ValueError, match=r"model\.resolution=28 .*model\.ch_mult"):
        UNet(resolution=28)
