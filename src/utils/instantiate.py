"""Building run objects from the Hydra config."""

from __future__ import annotations

import logging

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

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


def instantiate_callbacks(callbacks_cfg: DictConfig | None, always: list[L.Callback] = ()) -> list[L.Callback]:
    """Build the callbacks of the config group plus ``always``, keeping weight averaging (EMA) after every other
    callback.

    Lightning calls callback hooks in list order; the EMA callback swaps the raw weights back at the end of
    validation, so callbacks that sample at that hook must run before it to see the averaged weights.
    """
    callbacks = [*_instantiate_group(callbacks_cfg, "callbacks"), *always]
    return sorted(callbacks, key=lambda cb: isinstance(cb, WeightAveraging))


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_group(logger_cfg, "logger")


def _instantiate_group(group_cfg: DictConfig | None, group: str) -> list:
    """Instantiate each entry of a dict-like config group; entries set to null are skipped, and so are settings
    without a ``_target_`` that an experiment made for an entry the chosen group value does not have (the
    experiments tune ``callbacks.model_checkpoint``; with ``callbacks=none`` there is none to tune)."""
    objects = []
    for name, entry in (group_cfg or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig):
            raise ValueError(f"{group}.{name} must be a config with a _target_ (or null to disable it), got {entry!r}")
        if "_target_" not in entry:
            log.warning("%s.%s has settings but no _target_: the chosen %s group has no such entry, so they are "
                        "ignored", group, name, group)
            continue
        objects.append(instantiate(entry))
    return objects
