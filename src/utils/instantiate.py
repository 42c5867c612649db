"""Building run objects from the Hydra config."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

# Backbone arguments that follow from the data when the config leaves them null.
_FROM_DATA_SHAPE = {
    "in_channels": lambda shape: shape[0] if len(shape) == 3 else None,
    "resolution": lambda shape: shape[1] if len(shape) == 3 else None,
    "data_dim": lambda shape: shape[0] if len(shape) == 1 else None,
}


def fill_model_from_data(model_cfg: DictConfig, data_shape: tuple[int, ...]) -> None:
    """Set null ``model.in_channels``/``model.resolution``/``model.data_dim`` from the data, in place."""
    with open_dict(model_cfg):
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


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[L.Callback]:
    """Build the callbacks, keeping weight averaging (EMA) after every other callback.

    Lightning calls callback hooks in list order; the EMA callback swaps the raw weights back at the end of
    validation, so callbacks that sample at that hook must run before it to see the averaged weights.
    """
    callbacks = _instantiate_group(callbacks_cfg, "callbacks")
    return sorted(callbacks, key=lambda cb: isinstance(cb, WeightAveraging))


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_group(logger_cfg, "logger")


def _instantiate_group(group_cfg: DictConfig | None, group: str) -> list:
    """Instantiate each entry of a dict-like config group; entries set to null are skipped."""
    objects = []
    for name, entry in (group_cfg or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{group}.{name} needs a _target_ (or null to disable it)")
        objects.append(instantiate(entry))
    return objects
