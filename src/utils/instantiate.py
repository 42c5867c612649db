"""Building the callbacks and loggers of a run from their config groups."""

from __future__ import annotations

import logging

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)

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
