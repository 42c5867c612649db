"""Convert diffusers ``UNet2DModel`` weights into a checkpoint of this project.

`python -m src.convert from_diffusers=<folder with config.json and weights> out=<file.ckpt>`

The folder is what ``UNet2DModel.save_pretrained`` writes (e.g. google/ddpm-cifar10-32): ``config.json`` and
``diffusion_pytorch_model.safetensors`` (read with the ``safetensors`` package) or ``.bin``. diffusers itself is
not needed. The config must describe the DDPM U-Net (sinusoidal embedding with the DDPM layout, one attention head,
TF-style "SAME" downsampling, ...); anything our ``UNet`` cannot reproduce exactly is an error naming the key.
Every tensor is placed by name (``diffusers_to_ours``), and both sides must be used exactly once with equal
shapes. The schedule comes from a DDPMScheduler ``scheduler_config.json`` when there is one.

The checkpoint holds the weights as ``state_dict`` (published weights are already the EMA ones), the training
config of ``train_experiment`` with the model and diffusion nodes set from the diffusers files as
``ddpm_config``, and ``ddpm_data_shape``: what ``src.utils.checkpoint.load_module`` reads. The mapping itself is
``src/models/from_diffusers.py``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from src.config import build_module, resolve_run_config
from src.models.from_diffusers import (
    PAPER_DIFFUSION,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    convert_state_dict,
    diffusion_settings,
    find_files,
    read_json,
    read_weights,
    unet_arguments,
)
from src.utils.checkpoint_io import AtomicCheckpointIO

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
def compose_run_config(overrides: list[str]) -> DictConfig:
    """configs/train.yaml composed with ``overrides`` (inside a running Hydra app or on its own)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="train", overrides=overrides)


def run_config_for(model_args: dict[str, Any], diffusion: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The training config of ``cfg.train_experiment`` with the model and diffusion nodes of the converted net."""
    extra = [str(o) for o in cfg.get("train_overrides") or []]
    owned = [o for o in extra if re.match(r"[+~]*(model|diffusion|module\.clip_denoised)\b", o)]
    if owned:
        raise ValueError(f"train_overrides={owned}: the model, diffusion and clip settings come from the diffusers "
                         "files; pass only other settings (data, trainer, ...)")
    learned = diffusion["variance"] == "learned_range"
    overrides = [f"experiment={cfg.train_experiment}", "model=unet_ddpm",
                 f"diffusion/schedule={diffusion['schedule']}", f"diffusion/variance={diffusion['variance']}",
                 f"diffusion/parameterization={diffusion['parameterization']}",
                 # a learned variance trains with improved DDPM's hybrid loss (it only matters for fine-tuning)
                 *(["diffusion/objective=hybrid"] if learned else []), *extra]
    run_cfg = compose_run_config(overrides)
    with open_dict(run_cfg):
        run_cfg.model.update(model_args)
        run_cfg.diffusion.num_timesteps = diffusion["num_timesteps"]
        run_cfg.diffusion.schedule_kwargs = diffusion["schedule_kwargs"]
        run_cfg.module.clip_denoised = diffusion["clip_denoised"]
    return run_cfg


def convert(cfg: DictConfig) -> Path:
    """Read ``cfg.from_diffusers``, write the checkpoint ``cfg.out``; returns its path."""
    out = Path(str(cfg.out))
    if out.exists() and not cfg.get("overwrite", False):
        raise FileExistsError(f"out={out} exists; choose another path or pass overwrite=true")
    unet_dir, scheduler_file = find_files(Path(str(cfg.from_diffusers)))
    unet_config = read_json(unet_dir / "config.json", UNET_CONFIG)
    scheduler_config = read_json(scheduler_file, SCHEDULER_CONFIG) if scheduler_file else None
    if scheduler_file is None:
        log.info("no scheduler_config.json beside %s (nor in ../scheduler/): the paper's diffusion %s", unet_dir,
                 PAPER_DIFFUSION)
    model_args = unet_arguments(unet_config)
    diffusion = diffusion_settings(scheduler_config)
    channels = model_args["in_channels"]
    expected_out = channels * (2 if diffusion["variance"] == "learned_range" else 1)
    if model_args["out_channels"] != expected_out:
        raise ValueError(f"config.json: out_channels={model_args['out_channels']} with in_channels={channels} and "
                         f"variance {diffusion['variance']}: our diffusion reads {expected_out} output channels "
                         "(twice the input's only with a learned variance, variance_type=learned_range)")
    data_shape = (channels, model_args["resolution"], model_args["resolution"])

    run_cfg = run_config_for(model_args, diffusion, cfg)
    datamodule = instantiate(run_cfg.data)
    data_shape_of_config = tuple(datamodule.data_shape)
    if data_shape_of_config != data_shape:
        raise ValueError(f"the diffusers model takes images of shape {list(data_shape)} but the data of "
                         f"train_experiment={cfg.train_experiment} (data={run_cfg.data._target_}) has shape "
                         f"{list(data_shape_of_config)}: choose matching data with train_overrides, e.g. "
                         "'train_overrides=[\"data=image_folder\",\"data.root=<images>\","
                         f"\"data.image_size={data_shape[1]}\",\"data.channels={channels}\"]'")
    resolve_run_config(run_cfg, datamodule, machine=False)  # the converting machine's GPU is not the user's
    module = build_module(run_cfg, data_shape)
    net = module.net
    weights = convert_state_dict(read_weights(unet_dir), net.state_dict(), len(model_args["ch_mult"]))
    net.load_state_dict(weights, strict=True)

    checkpoint = {
        "state_dict": module.state_dict(),
        "ddpm_config": module.run_config,
        "ddpm_data_shape": list(data_shape),
        "ddpm_converted_from": {"unet_config": unet_config, "scheduler_config": scheduler_config},
    }
    AtomicCheckpointIO().save_checkpoint(checkpoint, out)  # a kill mid-write leaves no torn file under `out`
    log.info("converted %d tensors (%s parameters) from %s: model %s; diffusion %s; written to %s", len(weights),
             f"{sum(p.numel() for p in net.parameters()):,}", unet_dir, model_args, diffusion, out)
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="convert.yaml")
def main(cfg: DictConfig) -> Path:
    return convert(cfg)


if __name__ == "__main__":
    main()
