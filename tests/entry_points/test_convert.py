"""src.convert: diffusers UNet2DModel weights into our U-Net, checked against diffusers' own forward pass."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from src.convert import convert
from src.diffusion import create_diffusion
from src.models.from_diffusers import DDPM_SCHEDULER_DEFAULTS, UNET2D_DEFAULTS, diffusion_settings
from src.utils.checkpoint import load_module
from tests.helpers import compose_config, run_entry_point, write_fake_cifar10

diffusers = pytest.importorskip("diffusers")
# one intra-op thread: on a small shared CPU, more spin against other work (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# google/ddpm-cifar10-32's config.json and scheduler_config.json as published
CIFAR10_UNET = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "dropout": 0.1, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3,
    "resnet_time_scale_shift": "default", "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR10_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                     "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                     "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}
# the same layout, small: two levels (32, 16), attention at 16x16, one res-block per level
TINY_UNET = {**CIFAR10_UNET, "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8}
TIMESTEPS = [0, 1, 500, 999]


def make_diffusers_unet(config: dict, seed: int = 0):
    """A UNet2DModel with every parameter perturbed, so that no output layer is near zero."""
    accepted = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{k: v for k, v in config.items() if k in accepted}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


def assert_same_outputs(ours: torch.nn.Module, theirs: torch.nn.Module, timesteps: list[int], shape) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(timesteps), *shape, generator=g)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours.eval()(x, t)
    scale = expected.abs().max().item()
    assert expected.std().item() > 0.1  # a meaningful comparison, not of two near-zero outputs
    assert (got - expected).abs().max().item() < 1e-5 * max(scale, 1.0)


def convert_in_process(folder: Path, tmp_path: Path, *overrides: str) -> Path:
    cfg = compose_config([f"from_diffusers={folder}", f"out={tmp_path / 'converted.ckpt'}", *overrides],
                         tmp_path / "run", config_name="convert")
    try:
        return convert(cfg)
    finally:
        GlobalHydra.instance().clear()


def write_config(folder: Path, unet: dict, scheduler: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(unet))
    if scheduler is not None:
        (folder / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


# ------------------------------------------------------------------ the CIFAR-10 model, through the entry point
@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """google/ddpm-cifar10-32's architecture with random weights, saved as a pipeline folder and converted once."""
    root = tmp_path_factory.mktemp("convert")
    unet = make_diffusers_unet(CIFAR10_UNET)
    unet.save_pretrained(root / "pipeline" / "unet", safe_serialization=True)
    scheduler_dir = root / "pipeline" / "scheduler"  # beside unet/, as a saved pipeline has it
    scheduler_dir.mkdir()
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(CIFAR10_SCHEDULER))
    ckpt = root / "cifar10.ckpt"
    result = run_entry_point("src.convert", f"from_diffusers={root / 'pipeline' / 'unet'}", f"out={ckpt}",
                             cwd=root, env={"DDPM_ROOT": str(root), **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-4000:]
    return {"unet": unet, "ckpt": ckpt, "root": root}


@pytest.mark.slow
def test_converted_cifar10_unet_matches_diffusers(cifar10):
    module = load_module(cifar10["ckpt"])
    assert sum(p.numel() for p in module.net.parameters()) == 35_746_307
    # one batch holding every timestep of interest, each with its own input
    assert_same_outputs(module.net, cifar10["unet"], TIMESTEPS, (3, 32, 32))


@pytest.mark.slow
def test_converted_cifar10_checkpoint_config(cifar10):
    ckpt = torch.load(cifar10["ckpt"], map_location="cpu", weights_only=True)
    model, diffusion = ckpt["ddpm_config"]["model"], ckpt["ddpm_config"]["diffusion"]
    assert ckpt["ddpm_data_shape"] == [3, 32, 32]
    assert {k: model[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "dropout",
                                  "num_groups", "norm_eps")} == {
        "ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "resolution": 32,
        "dropout": 0.1, "num_groups": 32, "norm_eps": 1e-6}
    assert ckpt["ddpm_config"]["data"]["_target_"] == "src.data.CIFAR10DataModule"
    assert (diffusion["schedule"], diffusion["num_timesteps"], diffusion["variance"]) == ("linear", 1000,
                                                                                         "fixed_large")
    assert ckpt["ddpm_config"]["module"]["clip_denoised"] is True
    assert all(k.startswith("net.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_sampling_the_converted_checkpoint(cifar10, tmp_path):
    from src.sample import sample

    out = tmp_path / "samples"
    cfg = compose_config([f"ckpt_path={cifar10['ckpt']}", "num_samples=2", "batch_size=2", "sampler=ddim",
                          "sampler.steps=2", "progress=false", "device=cpu"], out, config_name="sample")
    try:
        npz = sample(cfg)
    finally:
        GlobalHydra.instance().clear()
    with np.load(npz) as f:
        assert f["samples"].shape == (2, 32, 32, 3) and f["samples"].dtype == np.uint8


# ------------------------------------------------------------------ small models, in process
def test_legacy_attention_names_in_bin_file_convert_with_paper_defaults(tmp_path):
    """Files written before diffusers 0.14 name attention query/key/value/proj_attn; no scheduler: the paper's."""
    unet = make_diffusers_unet(TINY_UNET, seed=3)
    legacy = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    state = {}
    for key, tensor in unet.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f".{new}", f".{old}")
        state[key] = tensor.clone()
    assert any(".query." in k for k in state)
    folder = write_config(tmp_path / "unet", TINY_UNET)
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    module = load_module(convert_in_process(folder, tmp_path))
    assert_same_outputs(module.net, unet, TIMESTEPS, (3, 32, 32))
    diffusion = module.run_config["diffusion"]
    assert (diffusion["schedule"], diffusion["num_timesteps"], diffusion["variance"]) == ("linear", 1000,
                                                                                         "fixed_large")
    assert diffusion["schedule_kwargs"] == {"beta_start": 1e-4, "beta_end": 0.02} and module.clip_denoised


def test_attention_at_several_levels_converts(tmp_path):
    config = {**TINY_UNET, "block_out_channels": [32, 32, 64], "layers_per_block": 2,
              "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"]}
    unet = make_diffusers_unet(config, seed=5)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    module = load_module(convert_in_process(tmp_path / "unet", tmp_path))
    assert list(module.run_config["model"]["attn_resolutions"]) == [32, 8]
    assert_same_outputs(module.net, unet, [0, 999], (3, 32, 32))


def test_missing_and_extra_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "unet"
    make_diffusers_unet(TINY_UNET).save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["down_blocks.1.attentions.0.to_k.bias"]
    state["down_blocks.1.attentions.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(ValueError) as err:
        convert_in_process(folder, tmp_path)
    assert "down_blocks.1.attentions.0.extra.weight" in str(err.value)  # theirs, unused
    assert "down.1.attn.0.k.bias" in str(err.value)  # ours, unfilled
    assert not (tmp_path / "converted.ckpt").exists()


def test_shape_mismatch_is_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "unet"
    make_diffusers_unet(TINY_UNET).save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_out.weight"] = state["conv_out.weight"][:, :16].contiguous()
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"shapes that differ.*conv_out\.weight \(3, 16, 3, 3\)"):
        convert_in_process(folder, tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos=true is not supported"),
    ({"freq_shift": 0}, "freq_shift=0 is not supported"),
    ({"attention_head_dim": 8}, "attention_head_dim=8 gives"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift=\"scale_shift\" is not supported"),
    ({"downsample_padding": 1}, "downsample_padding=1 is not supported"),
    ({"block_out_channels": [32, 48]}, "not all multiples of the first"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "up_block_types=.* at levels \\[0\\]"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"class_embed_type": "timestep"}, "class_embed_type=\"timestep\" is not supported"),
    ({"sample_size": [32, 16]}, "sample_size=\\[32, 16\\]"),
    ({"out_channels": 6}, "out_channels=6"),
    ({"some_new_feature": 2}, "unknown UNet2DModel settings \\['some_new_feature'\\]"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name='UNet2DConditionModel'"),
])
def test_unsupported_unet_settings_name_the_key(tmp_path, change, message):
    folder = write_config(tmp_path / "unet", {**TINY_UNET, **change})
    with pytest.raises(ValueError, match=message):
        convert_in_process(folder, tmp_path)


def test_absent_keys_take_diffusers_defaults(tmp_path):
    """config.json without freq_shift means diffusers' default 0, which our embedding is not."""
    folder = write_config(tmp_path / "unet", {k: v for k, v in TINY_UNET.items() if k != "freq_shift"})
    with pytest.raises(ValueError, match="freq_shift=0"):
        convert_in_process(folder, tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    ('{"block_out_channels": [32, 64],\n "layers_per_block": 1,,}',
     r"Expecting property name .* at line 2, column 24\)"),
    ("", r"Expecting value at line 1, column 1\)"),
    ("\xff\xfe", "is not a text file"),
])
def test_malformed_config_json_names_the_file_and_the_place(tmp_path, text, message):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"config\.json .*{message}.*expected a diffusers UNet2DModel config\.json"):
        convert_in_process(folder, tmp_path)


@pytest.mark.parametrize(("config", "message"), [
    ([1, 2], "holds a JSON list, not an object of settings: expected a diffusers UNet2DModel config.json"),
    ({"num_train_timesteps": 1000, "beta_schedule": "linear"},
     r"config.json has no block_out_channels \(its keys: \['beta_schedule', 'num_train_timesteps'\]\), so it is "
     "not a diffusers UNet2DModel config.json"),
    ({}, "config.json has no block_out_channels"),
])
def test_config_json_of_another_kind_says_what_is_expected(tmp_path, config, message):
    folder = write_config(tmp_path / "unet", config)
    with pytest.raises(ValueError, match=message):
        convert_in_process(folder, tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    ('{"beta_schedule": "linear"', r"scheduler_config\.json is not valid JSON \(Expecting ',' delimiter at line 1, "
                                   r"column 27\): expected a diffusers DDPMScheduler scheduler_config\.json"),
    ('{"sample_size": 32, "in_channels": 3}', "scheduler_config.json has none of DDPMScheduler's settings"),
])
def test_malformed_scheduler_config_names_the_file(tmp_path, text, message):
    folder = write_config(tmp_path / "unet", TINY_UNET)
    (folder / "scheduler_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        convert_in_process(folder, tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    ({"beta_schedule": "laplace"}, "beta_schedule=\"laplace\" is not supported"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas is set"),
    ({"variance_type": "learned"}, "variance_type=\"learned\" is not supported"),
    ({"thresholding": True}, "thresholding=true is not supported"),
    ({"clip_sample_range": 2.0}, "clip_sample_range=2.0 is not supported"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=true"),
    ({"_class_name": "EulerDiscreteScheduler"}, "only a DDPMScheduler config converts"),
])
def test_unsupported_scheduler_settings_name_the_key(tmp_path, change, message):
    folder = write_config(tmp_path / "unet", TINY_UNET, {**CIFAR10_SCHEDULER, **change})
    with pytest.raises(ValueError, match=message):
        convert_in_process(folder, tmp_path)


@pytest.mark.parametrize("scheduler", [
    {"beta_schedule": "linear", "num_train_timesteps": 20},
    {"beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.05, "num_train_timesteps": 300},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "sigmoid", "num_train_timesteps": 500},
    {"beta_schedule": "squaredcos_cap_v2"},
])
def test_schedules_match_diffusers_scheduler(scheduler):
    settings = diffusion_settings({"_class_name": "DDPMScheduler", **scheduler})
    ours = create_diffusion(schedule=settings["schedule"], num_timesteps=settings["num_timesteps"],
                            schedule_kwargs=settings["schedule_kwargs"]).buffers["betas"]
    theirs = diffusers.DDPMScheduler(**scheduler).betas.double()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)  # theirs are float32


@pytest.mark.parametrize(("variance_type", "prediction_type", "clip", "expected"), [
    ("fixed_small", "epsilon", False, ("fixed_small", "eps", False)),
    ("fixed_large_log", "v_prediction", True, ("fixed_large", "v", True)),
    ("fixed_small_log", "sample", True, ("fixed_small", "x0", True)),
])
def test_scheduler_variance_prediction_and_clipping(variance_type, prediction_type, clip, expected):
    settings = diffusion_settings({"variance_type": variance_type, "prediction_type": prediction_type,
                                   "clip_sample": clip})
    assert (settings["variance"], settings["parameterization"], settings["clip_denoised"]) == expected


def test_learned_range_variance_converts_with_twice_the_channels(tmp_path):
    unet = make_diffusers_unet({**TINY_UNET, "out_channels": 6})
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    (tmp_path / "unet" / "scheduler_config.json").write_text(json.dumps({**CIFAR10_SCHEDULER,
                                                                          "variance_type": "learned_range"}))
    module = load_module(convert_in_process(tmp_path / "unet", tmp_path))
    assert (module.diffusion.variance, module.diffusion.objective.name) == ("learned_range", "hybrid")
    assert_same_outputs(module.net, unet, [3, 700], (3, 32, 32))


def test_defaults_tables_match_installed_diffusers():
    """Keys a config file leaves out take diffusers' constructor defaults, which the converter records."""
    for cls, table in ((diffusers.UNet2DModel, UNET2D_DEFAULTS), (diffusers.DDPMScheduler, DDPM_SCHEDULER_DEFAULTS)):
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: p.default for k, p in params.items() if k != "self"}
        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        assert defaults == table, cls.__name__


def test_train_overrides_cannot_change_the_model(tmp_path):
    folder = write_config(tmp_path / "unet", TINY_UNET)
    with pytest.raises(ValueError, match="come from the diffusers files"):
        convert_in_process(folder, tmp_path, 'train_overrides=["model.ch=64"]')


def test_data_of_another_shape_needs_matching_data(tmp_path):
    unet = make_diffusers_unet({**TINY_UNET, "sample_size": 16})
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    with pytest.raises(ValueError, match="data=image_folder"):
        convert_in_process(tmp_path / "unet", tmp_path)
    data = f'train_overrides=["data=image_folder","data.root={tmp_path / "images"}","data.image_size=16"]'
    module = load_module(convert_in_process(tmp_path / "unet", tmp_path, data))
    assert module.data_shape == (3, 16, 16) and module.run_config["data"]["image_size"] == 16
    assert_same_outputs(module.net, unet, [5, 50], (3, 16, 16))


def test_eval_nll_on_converted_checkpoint(tmp_path):
    from src.eval import evaluate

    unet = make_diffusers_unet(TINY_UNET)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    (tmp_path / "unet" / "scheduler_config.json").write_text(json.dumps({**CIFAR10_SCHEDULER,
                                                                          "num_train_timesteps": 10}))
    ckpt = convert_in_process(tmp_path / "unet", tmp_path)
    write_fake_cifar10(tmp_path / "data", per_batch=4)
    cfg = compose_config([f"ckpt_path={ckpt}", "metric=nll", "batch_size=2", "num_batches=1", "device=cpu",
                          "progress=false", f"+data_overrides.data_dir={tmp_path / 'data'}",
                          "+data_overrides.download=false", "+data_overrides.verify_checksums=false",
                          "+data_overrides.num_workers=0", "+data_overrides.pin_memory=false"],
                         tmp_path / "eval", config_name="eval")
    try:
        summary = evaluate(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert summary["num_images"] == 2 and np.isfinite(summary["nll_bpd"]) and summary["nll_bpd"] > 0
