"""A training run's config, resolved once: every value that follows from the data or the machine is filled in and
every combination that cannot work is refused before anything is built. Then building is a plain ``instantiate``.

``resolve_run_config`` is the only place that edits a composed config; ``build_module`` is the only place that turns
a resolved config into the LightningModule (used by ``src.train``, by the checkpoint loader and by ``src.convert``).
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# Backbone arguments that follow from the data when the config leaves them null.
_FROM_DATA_SHAPE = {
    "in_channels": lambda shape: shape[0] if len(shape) == 3 else None,
    "resolution": lambda shape: shape[1] if len(shape) == 3 else None,
    "data_dim": lambda shape: shape[0] if len(shape) == 1 else None,
}
# Backbone output size keys: the data's channels (or dimension) times the diffusion's output factor.
_OUTPUT_KEYS = {"out_channels": lambda shape: shape[0] if len(shape) == 3 else None,
                "out_dim": lambda shape: shape[0] if len(shape) == 1 else None}


def resolve_run_config(cfg: DictConfig, datamodule: Any | None = None, machine: bool = True) -> DictConfig:
    """Fill in and check ``cfg`` (a composed ``configs/train.yaml``) in place; returns it.

    From the data: the backbone's input/output sizes, ``model.num_classes`` for ``conditional=true``, no clipping of
    predicted x0 for unbounded data, and the refusal of a discretized-decoder objective on continuous data. With
    ``machine`` (src.train; not src.convert, which writes a config for another machine): ``trainer.precision=auto``,
    a GPU for a GPU trainer, W&B offline where its server is out of reach, the world size and the global batch.
    ``datamodule``: the instantiated ``cfg.data`` when the caller has it (its constructor checks the data settings).
    """
    datamodule = instantiate(cfg.data) if datamodule is None else datamodule
    data_shape = tuple(datamodule.data_shape)
    diffusion = instantiate(cfg.diffusion)  # checks the diffusion settings; cheap (the schedule's arrays)
    fill_model_from_data(cfg.model, data_shape, diffusion.output_channels_factor, diffusion.variance)
    fill_model_num_classes(cfg.model, bool(cfg.get("conditional", False)), datamodule.num_classes, datamodule.name)
    bounded = getattr(datamodule, "value_range", None) is not None
    if not bounded and diffusion.objective.discrete_data:
        raise ValueError(
            f"diffusion.objective={diffusion.objective.name} uses the discretized decoder of 8-bit data on [-1, 1] at "
            f"t=1, but data {datamodule.name} is continuous: use diffusion/objective=simple (with a fixed variance)")
    if not bounded and cfg.module.clip_denoised:
        log.warning("data %s is unbounded: sampling without clipping x0 to [-1, 1] (module.clip_denoised=false)",
                    datamodule.name)
        cfg.module.clip_denoised = False  # so the checkpoint rebuilds the same module
    if machine:
        from src.utils.loggers import fall_back_to_offline_wandb

        resolve_trainer_precision(cfg.trainer)
        check_accelerator(cfg.trainer)
        fall_back_to_offline_wandb(cfg.get("logger"))
        record_world(cfg, getattr(datamodule, "batch_size", None))
    return cfg


def build_module(cfg: DictConfig | dict, data_shape: tuple[int, ...] | list[int] | None) -> Any:
    """The ``DDPMModule`` of a resolved run config (``cfg.model``, ``cfg.diffusion``, ``cfg.module``), holding the
    config as plain containers for its checkpoints (they load with ``weights_only=True``)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    net = instantiate(cfg.model)
    if data_shape is not None and hasattr(net, "check_input_shape"):
        net.check_input_shape(tuple(data_shape))
    module = instantiate(cfg.module, net=net, diffusion=instantiate(cfg.diffusion),
                         data_shape=tuple(data_shape) if data_shape is not None else None)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)  # after instantiate, which would build its targets
    return module


# --------------------------------------------------------------------------- from the data
def fill_model_from_data(model_cfg: DictConfig, data_shape: tuple[int, ...], output_factor: int = 1,
                         variance: str | None = None) -> None:
    """Set null ``model.in_channels``/``model.resolution``/``model.data_dim`` from the data, and null
    ``model.out_channels``/``model.out_dim`` to the data's channels times ``output_factor`` (2 when the
    network also predicts the variance), in place. An explicit output size that does not fit is an error."""
    with open_dict(model_cfg):
        for key, rule in _OUTPUT_KEYS.items():
            if key not in model_cfg or rule(data_shape) is None:
                continue
            wanted = rule(data_shape) * output_factor
            if model_cfg[key] is None:
                model_cfg[key] = wanted
            elif int(model_cfg[key]) != wanted:
                why = f" (diffusion.variance={variance} adds one per data channel)" if output_factor > 1 else ""
                raise ValueError(f"model.{key}={model_cfg[key]} but the network must output {wanted} channels"
                                 f"{why}: leave model.{key} null to have it set")
        for key, rule in _FROM_DATA_SHAPE.items():
            if key in model_cfg and model_cfg[key] is None:
                value = rule(data_shape)
                if value is None:
                    kind = "images (C, H, W)" if key != "data_dim" else "vectors (D,)"
                    raise ValueError(
                        f"model.{key} follows from the data, but the data has shape {data_shape} and this "
                        f"backbone ({model_cfg.get('_target_')}) needs {kind}: pick another model= or data="
                    )
                model_cfg[key] = value


def fill_model_num_classes(model_cfg: DictConfig, conditional: bool, data_num_classes: int | None,
                           data_name: str) -> None:
    """Class conditioning: with ``conditional=true`` set ``model.num_classes`` from the data, in place.

    Raises if the data has no labels, if an explicit ``model.num_classes`` disagrees with the data, or if
    ``model.num_classes`` is set while ``conditional=false``.
    """
    current = model_cfg.get("num_classes")
    if not conditional:
        if current is not None:
            raise ValueError(
                f"model.num_classes={current} makes the model class-conditional, but conditional=false: set "
                "conditional=true (model.num_classes then follows from the data) or model.num_classes=null"
            )
        return
    if data_num_classes is None:
        raise ValueError(
            f"conditional=true needs labelled data, but data {data_name!r} has no class labels: set "
            "conditional=false, or pick labelled data (data=digits, data=cifar10)"
        )
    if current is not None and int(current) != int(data_num_classes):
        raise ValueError(
            f"model.num_classes={current} but data {data_name!r} has {data_num_classes} classes: leave "
            "model.num_classes null with conditional=true, it follows from the data"
        )
    with open_dict(model_cfg):
        model_cfg.num_classes = int(data_num_classes)


# --------------------------------------------------------------------------- from the machine
def resolve_trainer_precision(trainer_cfg: DictConfig) -> None:
    """``trainer.precision=auto``: bf16-mixed when training on CUDA GPUs with bf16 (Ampere on), else 32-true.

    Resolved in the config itself, so the run's config and checkpoints record what actually ran. CPUs train in
    32-true: CPU runs are for small models and tests, where bit-for-bit reproducible fp32 matters more.
    """
    import torch

    from src.utils.device import has_fast_bf16

    if trainer_cfg.get("precision") != "auto":
        return
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    bf16 = on_cuda and has_fast_bf16(torch.device("cuda"))
    trainer_cfg.precision = "bf16-mixed" if bf16 else "32-true"
    log.info("trainer.precision=auto -> %s", trainer_cfg.precision)


def local_processes(trainer_cfg: DictConfig) -> int:
    """Training processes this node runs: one per device (``trainer.devices``; ``auto``: every GPU, else one)."""
    import torch

    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) or str(devices).isdigit():
        return max(1, int(devices))
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return max(1, len(devices))
    on_gpu = str(trainer_cfg.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
    return max(1, torch.cuda.device_count()) if on_gpu and torch.cuda.is_available() else 1


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one: say how to train on the CPU instead of Lightning's backend error."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if accelerator == "cuda" or torch.cuda.is_available() else 0
    if not available and accelerator == "gpu" and torch.backends.mps.is_available():
        available = 1
    devices = trainer_cfg.get("devices", 1)
    wanted = int(devices) if str(devices).isdigit() else 1
    if available >= wanted:
        return
    have = "no GPU" if not available else f"{available} GPU(s)"
    raise RuntimeError(
        f"trainer.accelerator={accelerator} with trainer.devices={devices}, but this machine has {have} "
        f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}). Train on the CPU with trainer=cpu "
        "(or trainer.accelerator=cpu; slow for the paper-size U-Net), or lower trainer.devices")


def record_world(cfg: DictConfig, batch_size: int | None) -> None:
    """Put the process count and the global batch into the run's config (and so into every logger and checkpoint):
    ``data.batch_size`` is per device, the learning rate is not rescaled, EMA decays once per optimizer step."""
    world_size = local_processes(cfg.trainer) * int(cfg.trainer.get("num_nodes", 1) or 1)
    with open_dict(cfg):
        cfg.world_size = world_size
        if batch_size is not None:
            accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
            cfg.global_batch_size = int(batch_size) * world_size * accumulate
