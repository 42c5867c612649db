"""diffusers ``UNet2DModel`` folders read as our U-Net: its config as our ``UNet`` arguments (refusing what ours cannot
reproduce, naming the key), a DDPMScheduler config as our diffusion settings, and every tensor placed by name.
``src.convert`` writes the result as a checkpoint."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"

# UNet2DModel's constructor defaults (diffusers 0.42), used for keys a config.json leaves out.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}

# Settings with the only values our UNet reproduces, and why.
UNET2D_REQUIRED: dict[str, tuple[tuple[Any, ...], str]] = {
    "time_embedding_type": (("positional",), "our timestep embedding is the sinusoidal one"),
    "flip_sin_to_cos": ((False,), "our embedding is laid out [sin, cos] (DDPM), not [cos, sin]"),
    "freq_shift": ((1,), "our embedding divides by half_dim - 1 (DDPM)"),
    "center_input_sample": ((False,), "our U-Net takes data in [-1, 1] as it is"),
    "resnet_time_scale_shift": (("default",), "our res-blocks add the timestep embedding (no scale-shift norm)"),
    "act_fn": (("silu", "swish"), "our U-Net uses SiLU"),
    "downsample_padding": ((0,), "our downsampling pads bottom/right only, as TF 'SAME' does"),
    "downsample_type": (("conv",), "our downsampling is a stride-2 convolution"),
    "upsample_type": (("conv",), "our upsampling is nearest-neighbour then a convolution"),
    "mid_block_type": (("UNetMidBlock2D",), "our middle is res-block, attention, res-block"),
    "mid_block_scale_factor": ((1,), "our middle blocks do not rescale their output"),
    "add_attention": ((True,), "our middle always has attention"),
    "class_embed_type": ((None,), "our U-Net is unconditional"),
    "num_class_embeds": ((None,), "our U-Net is unconditional"),
}
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# DDPMScheduler's constructor defaults (diffusers 0.42), for keys a scheduler_config.json leaves out.
DDPM_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# Inference-time spacing and thresholding parameters: they do not change the trained model.
SCHEDULER_IGNORED = ("timestep_spacing", "steps_offset", "dynamic_thresholding_ratio", "sample_max_value")
# diffusers beta_schedule -> ours (same formula; ours is computed in float64)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "sigmoid": "sigmoid",
                  "squaredcos_cap_v2": "cosine"}
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "fixed_large_log": "fixed_large", "learned_range": "learned_range"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# The paper's process, used when the folder has no scheduler config.
PAPER_DIFFUSION = {"schedule": "linear", "schedule_kwargs": {"beta_start": 1e-4, "beta_end": 0.02},
                   "num_timesteps": 1000, "variance": "fixed_large", "parameterization": "eps", "clip_denoised": True}

_TOP_LEVEL = {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out",
              "time_embedding.linear_1": "temb.dense.0", "time_embedding.linear_2": "temb.dense.1"}
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
                 "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# current diffusers names, then the names of files written before diffusers 0.14
_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_MID = {"resnets.0": "mid.block_1", "attentions.0": "mid.attn_1", "resnets.1": "mid.block_2"}


def _choice_error(source: str, key: str, value: Any, allowed: tuple, why: str) -> str:
    shown = " or ".join(json.dumps(a) for a in allowed)
    return f"{source}: {key}={json.dumps(value)} is not supported ({why}); only {key}={shown} converts"


def read_json(path: Path, expected: str) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file, the line and column, and ``expected``."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                         f"expected {expected}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file ({err.reason} at byte {err.start}): expected {expected}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of settings: expected {expected}")
    return config


UNET_CONFIG = "a diffusers UNet2DModel config.json (as UNet2DModel.save_pretrained writes it)"
SCHEDULER_CONFIG = ("a diffusers DDPMScheduler scheduler_config.json (as DDPMScheduler.save_pretrained writes it); "
                    "without the file the paper's schedule is used")


def _unet2d_config(config: dict[str, Any], src: str) -> dict[str, Any]:
    """A UNet2DModel config.json with diffusers' defaults filled in; ValueError if it is not one."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{src}: _class_name={config['_class_name']!r}; only UNet2DModel weights convert")
    if "block_out_channels" not in config:
        # every UNet2DModel config.json names its level widths; without them this is another model's config
        shown = sorted(config)[:8]
        raise ValueError(f"{src} has no block_out_channels (its keys: {shown}{' ...' if len(config) > 8 else ''}), "
                         f"so it is not {UNET_CONFIG}; from_diffusers must be the folder of the UNet (in a pipeline "
                         "folder: its unet/ subfolder)")
    unknown = sorted(k for k, v in config.items() if not k.startswith("_") and k not in UNET2D_DEFAULTS
                     and v is not None)
    if unknown:
        raise ValueError(f"{src}: unknown UNet2DModel settings {unknown} (diffusers newer than this converter?); "
                         "cannot tell whether our UNet reproduces them")
    return {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _level_problems(cfg: dict[str, Any], src: str) -> list[str]:
    """What keeps the level widths and block types from mapping onto our levels (ValueError for no widths)."""
    channels = cfg["block_out_channels"]
    if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"{src}: block_out_channels={channels} must be a non-empty list of positive ints")
    problems = []
    ch, levels = channels[0], len(channels)
    if any(c % ch for c in channels):
        problems.append(f"{src}: block_out_channels={channels} are not all multiples of the first ({ch}); our "
                        "U-Net's level widths are ch * ch_mult")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    bad_types = [t for t in down if t not in DOWN_BLOCKS] + [t for t in up if t not in UP_BLOCKS]
    if bad_types:
        problems.append(f"{src}: block types {bad_types} in down_block_types/up_block_types are not supported; "
                        f"only {list(DOWN_BLOCKS)} down and {list(UP_BLOCKS)} up convert")
    if len(down) != levels or len(up) != levels:
        problems.append(f"{src}: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                        f"block_out_channels ({levels}) must have the same length")
    return problems


def _attention_levels(cfg: dict[str, Any]) -> list[int]:
    """The levels whose down blocks have attention."""
    return [level for level, t in enumerate(cfg["down_block_types"]) if DOWN_BLOCKS[t]]


def _attention_problems(cfg: dict[str, Any], src: str) -> list[str]:
    """Attention that is not at the same levels on both paths, or not single-head."""
    problems = []
    channels, down, up = cfg["block_out_channels"], list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn_down = _attention_levels(cfg)
    attn_up = [len(channels) - 1 - i for i, t in enumerate(up) if UP_BLOCKS[t]]
    if sorted(attn_up) != attn_down:
        problems.append(f"{src}: down_block_types={down} has attention at levels {attn_down} but "
                        f"up_block_types={up} at levels {sorted(attn_up)}; our U-Net puts attention at the same "
                        "resolutions on both paths")
    head_dim = cfg["attention_head_dim"]
    attn_widths = sorted({channels[level] for level in attn_down} | {channels[-1]})  # the middle has attention
    if head_dim is not None and any(head_dim != c for c in attn_widths):
        heads = [c // head_dim for c in attn_widths] if isinstance(head_dim, int) and head_dim > 0 else "other"
        problems.append(f"{src}: attention_head_dim={json.dumps(head_dim)} gives {heads} heads at widths "
                        f"{attn_widths}; our attention is single-head (scaled by 1/sqrt(C)), so only "
                        "attention_head_dim=null (one head of all channels) converts")
    return problems


def _square_size(sample_size: Any) -> Any:
    """``sample_size`` as one number: a square [n, n] becomes n; other lists None."""
    if isinstance(sample_size, list | tuple):
        return sample_size[0] if len(sample_size) == 2 and sample_size[0] == sample_size[1] else None
    return sample_size


def _layer_problems(cfg: dict[str, Any], src: str) -> list[str]:
    """Group counts, time-embedding width, blocks per level and image size our U-Net cannot take."""
    problems = []
    ch, levels = cfg["block_out_channels"][0], len(cfg["block_out_channels"])
    groups = cfg["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        problems.append(f"{src}: norm_num_groups={json.dumps(groups)} must be a positive int")
    if cfg["attn_norm_num_groups"] not in (None, groups):
        problems.append(f"{src}: attn_norm_num_groups={cfg['attn_norm_num_groups']} differs from "
                        f"norm_num_groups={groups}; our U-Net uses one group count for every GroupNorm")
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        problems.append(f"{src}: time_embedding_dim={cfg['time_embedding_dim']}; our U-Net's is "
                        f"4 * block_out_channels[0] = {4 * ch}")
    layers = cfg["layers_per_block"]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        problems.append(f"{src}: layers_per_block={layers!r} must be one positive int")
    size = _square_size(cfg["sample_size"])
    factor = 2 ** (levels - 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % factor:
        problems.append(f"{src}: sample_size={json.dumps(cfg['sample_size'])} must be one image size divisible "
                        f"by 2**(levels-1) = {factor}; set it to the training image size")
    return problems


def unet_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """Our ``UNet`` arguments for a diffusers ``UNet2DModel`` config.json; ValueError for what it cannot represent."""
    src = "config.json"
    cfg = _unet2d_config(config, src)
    problems = [_choice_error(src, key, cfg[key], allowed, why)
                for key, (allowed, why) in UNET2D_REQUIRED.items() if cfg[key] not in allowed]
    problems += _level_problems(cfg, src)
    if problems:
        raise ValueError("; ".join(problems))
    problems = _attention_problems(cfg, src) + _layer_problems(cfg, src)
    if problems:
        raise ValueError("; ".join(problems))
    channels, size = cfg["block_out_channels"], _square_size(cfg["sample_size"])
    ch = channels[0]
    return {"in_channels": int(cfg["in_channels"]), "out_channels": int(cfg["out_channels"]), "ch": ch,
            "ch_mult": [c // ch for c in channels], "num_res_blocks": cfg["layers_per_block"],
            "attn_resolutions": [size // 2**level for level in _attention_levels(cfg)],
            "dropout": float(cfg["dropout"]), "resolution": size, "num_groups": int(cfg["norm_num_groups"]),
            "norm_eps": float(cfg["norm_eps"])}


def diffusion_settings(scheduler: dict[str, Any] | None) -> dict[str, Any]:
    """Our ``diffusion`` node values and ``clip_denoised`` for a DDPMScheduler config (None: the paper's)."""
    if scheduler is None:
        return dict(PAPER_DIFFUSION)
    src = "scheduler_config.json"
    if scheduler.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise ValueError(f"{src}: _class_name={scheduler['_class_name']!r}; only a DDPMScheduler config converts "
                         "(remove the file to take the paper's schedule)")
    given = {k: v for k, v in scheduler.items() if not k.startswith("_")}
    if given and not set(given) & {*DDPM_SCHEDULER_DEFAULTS, "predict_epsilon"}:
        raise ValueError(f"{src} has none of DDPMScheduler's settings (its keys: {sorted(given)[:8]}), so it is not "
                         f"{SCHEDULER_CONFIG}")
    cfg = {**DDPM_SCHEDULER_DEFAULTS, **given}
    if "predict_epsilon" in scheduler:  # the flag older configs carry instead of prediction_type
        cfg["prediction_type"] = "epsilon" if scheduler["predict_epsilon"] else "sample"
        cfg.pop("predict_epsilon")
    unknown = sorted(set(cfg) - set(DDPM_SCHEDULER_DEFAULTS))
    if unknown:
        log.warning("%s: ignoring settings this converter does not know: %s", src, unknown)
    problems = []
    if cfg["trained_betas"] is not None:
        problems.append(f"{src}: trained_betas is set; only the named schedules {list(BETA_SCHEDULES)} convert")
    for key, table in (("beta_schedule", BETA_SCHEDULES), ("variance_type", VARIANCE_TYPES),
                       ("prediction_type", PREDICTION_TYPES)):
        if cfg[key] not in table:
            problems.append(_choice_error(src, key, cfg[key], tuple(table), "we have no such process"))
    for key, needed, why in (("thresholding", False, "we only clip to [-1, 1]"),
                             ("rescale_betas_zero_snr", False, "we have no zero-terminal-SNR schedule")):
        if cfg[key] != needed:
            problems.append(_choice_error(src, key, cfg[key], (needed,), why))
    if cfg["clip_sample"] and float(cfg["clip_sample_range"]) != 1.0:
        problems.append(_choice_error(src, "clip_sample_range", cfg["clip_sample_range"], (1.0,),
                                      "we clip the predicted x0 to [-1, 1]"))
    timesteps = cfg["num_train_timesteps"]
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 2:
        problems.append(f"{src}: num_train_timesteps={timesteps!r} must be an int >= 2")
    if problems:
        raise ValueError("; ".join(problems))
    log.info("%s: not used (sampling settings): %s", src, {k: cfg[k] for k in SCHEDULER_IGNORED})
    schedule = BETA_SCHEDULES[cfg["beta_schedule"]]
    # diffusers takes beta_start/beta_end as given for every T (ours would rescale by 1000/T without them)
    kwargs = {} if schedule == "cosine" else {"beta_start": float(cfg["beta_start"]),
                                              "beta_end": float(cfg["beta_end"])}
    return {"schedule": schedule, "schedule_kwargs": kwargs, "num_timesteps": timesteps,
            "variance": VARIANCE_TYPES[cfg["variance_type"]],
            "parameterization": PREDICTION_TYPES[cfg["prediction_type"]], "clip_denoised": bool(cfg["clip_sample"])}


def diffusers_to_ours(key: str, num_levels: int) -> str | None:
    """Our UNet's state-dict key for a diffusers UNet2DModel key (None if it has no counterpart).

    diffusers' up_blocks run from the deepest level up; ours are indexed by level, like the down path.
    """
    match = re.fullmatch(r"(.+)\.(weight|bias)", key)
    if not match:
        return None
    module, param = match.groups()
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{param}"
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        side, index, kind, j, part = match.groups()
        if int(index) >= num_levels:
            return None
        level = int(index) if side == "down" else num_levels - 1 - int(index)
        parts = _RESNET_PARTS if kind == "resnets" else _ATTENTION_PARTS
        name = "block" if kind == "resnets" else "attn"
        return f"{side}.{level}.{name}.{j}.{parts[part]}.{param}" if part in parts else None
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv", module):
        side, index, _ = match.groups()
        if int(index) >= num_levels:
            return None
        level = int(index) if side == "down" else num_levels - 1 - int(index)
        return f"{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.conv.{param}"
    if match := re.fullmatch(r"mid_block\.(resnets\.\d+|attentions\.\d+)\.(.+)", module):
        block, part = match.groups()
        parts = _RESNET_PARTS if block.startswith("resnets") else _ATTENTION_PARTS
        return f"{_MID[block]}.{parts[part]}.{param}" if block in _MID and part in parts else None
    return None


def convert_state_dict(theirs: dict[str, Tensor], ours: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Place every diffusers tensor on our key; ValueError listing every key not used exactly once.

    diffusers attention projections are Linear (out, in) where ours are 1x1 convolutions (out, in, 1, 1).
    """
    converted: dict[str, Tensor] = {}
    sources: dict[str, list[str]] = {}
    unmatched, mismatched = [], []
    for key, tensor in theirs.items():
        target = diffusers_to_ours(key, num_levels)
        if target is None or target not in ours:
            unmatched.append(key)
            continue
        sources.setdefault(target, []).append(key)
        if tensor.ndim == 2 and ours[target].ndim == 4 and ours[target].shape[2:] == (1, 1):
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        if tensor.shape != ours[target].shape:
            mismatched.append(f"{key} {tuple(tensor.shape)} -> {target} {tuple(ours[target].shape)}")
        converted[target] = tensor
    missing = sorted(set(ours) - set(sources))
    twice = {k: v for k, v in sources.items() if len(v) > 1}
    problems = []
    for what, items in (("diffusers tensors with no counterpart in our UNet", sorted(unmatched)),
                        ("our UNet tensors no diffusers tensor fills", missing),
                        ("our UNet tensors filled more than once", [f"{k} <- {v}" for k, v in twice.items()]),
                        ("shapes that differ", mismatched)):
        if items:
            shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{what} ({len(items)}): {shown}")
    if problems:
        raise ValueError("the weights do not fit the U-Net their config.json describes: " + "; ".join(problems))
    return converted


def find_files(folder: Path) -> tuple[Path, Path | None]:
    """The UNet folder (with config.json) and the scheduler config (or None) for ``from_diffusers``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"from_diffusers={folder} is not a folder; give the folder holding config.json and "
                                f"{WEIGHTS_SAFETENSORS} (or {WEIGHTS_BIN})")
    unet_dir = folder
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        unet_dir = folder / "unet"  # a pipeline folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in from_diffusers={folder} (nor in its unet/ subfolder)")
    candidates = [unet_dir / "scheduler_config.json", unet_dir.parent / "scheduler" / "scheduler_config.json"]
    return unet_dir, next((p for p in candidates if p.is_file()), None)


def read_weights(unet_dir: Path) -> dict[str, Tensor]:
    """The UNet's tensors from the safetensors file (if the package is installed) or the .bin file."""
    safetensors_file, bin_file = unet_dir / WEIGHTS_SAFETENSORS, unet_dir / WEIGHTS_BIN
    if safetensors_file.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            load_file = None
        if load_file is not None:
            return load_file(str(safetensors_file), device="cpu")
        if not bin_file.is_file():
            raise ImportError(f"{safetensors_file} needs the safetensors package: pip install safetensors")
    if not bin_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN} in {unet_dir} (sharded or variant "
                                "weight files are not supported)")
    state = torch.load(bin_file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{bin_file} is not a state dict of tensors")
    return state
