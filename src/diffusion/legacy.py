"""Back-compat only: the NAMES of parameterizations and objectives, mapped to their classes.

Configs and checkpoints written before parameterizations and objectives became ``_target_`` objects store names
(``ddpm_config.diffusion.parameterization: eps``, ``objective: hybrid`` with a top-level ``hybrid_weight``);
``create_diffusion`` turns them into objects here, and ``canonical_diffusion_config`` rewrites such a config node
in the new form so that ``src.utils.resume`` compares an old checkpoint with a new run. New configs select the
classes by ``_target_``: a new parameterization or objective needs no entry in these tables.
"""

from __future__ import annotations

from typing import Any

from src.diffusion.objectives import Hybrid, Objective, Simple, Vlb
from src.diffusion.parameterizations import X0, Eps, Mean, Parameterization, V

__all__ = ["PARAMETERIZATIONS", "OBJECTIVES", "parameterization_from", "objective_from", "canonical_diffusion_config"]

PARAMETERIZATIONS: dict[str, type[Parameterization]] = {"eps": Eps, "x0": X0, "mean": Mean, "v": V}
OBJECTIVES: dict[str, type[Objective]] = {"simple": Simple, "vlb": Vlb, "hybrid": Hybrid}


def _resolve(kind: str, value: Any, table: dict[str, type], base: type) -> str:
    """``value``'s name in ``table``; ValueError naming the config key for anything else."""
    if isinstance(value, str) and value in table:
        return value
    what = f"unknown {kind} {value!r}" if isinstance(value, str) else f"{kind} {value!r} of type {type(value).__name__}"
    raise ValueError(f"{what} (diffusion.{kind}): valid values are {', '.join(table)} (configs/diffusion/{kind}/), "
                     f"or a config node whose _target_ names a subclass of {base.__module__}.{base.__name__}")


def parameterization_from(value: Parameterization | str) -> Parameterization:
    """``value`` itself if it is a Parameterization, else the one its old name stands for."""
    if isinstance(value, Parameterization):
        return value
    return PARAMETERIZATIONS[_resolve("parameterization", value, PARAMETERIZATIONS, Parameterization)]()


def _objective_kwargs(name: str, hybrid_weight: float) -> dict[str, Any]:
    # an old config's lambda sat beside the name, as diffusion.hybrid_weight
    return {"weight": hybrid_weight} if name == "hybrid" else {}


def objective_from(value: Objective | str, hybrid_weight: float = 0.001) -> Objective:
    """``value`` itself if it is an Objective, else the one its old name stands for (hybrid: with ``hybrid_weight``)."""
    if isinstance(value, Objective):
        return value
    name = _resolve("objective", value, OBJECTIVES, Objective)
    return OBJECTIVES[name](**_objective_kwargs(name, hybrid_weight))


def _target(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical_diffusion_config(node: Any) -> Any:
    """A ``diffusion`` config section (plain containers) with old names written as the ``_target_`` nodes of the
    same objects, e.g. ``parameterization: eps`` -> ``{_target_: src.diffusion.parameterizations.Eps}`` and
    ``objective: hybrid`` -> ``{_target_: ...Hybrid, weight: <hybrid_weight>}``; anything else is left as it is."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if isinstance(out.get("parameterization"), str) and out["parameterization"] in PARAMETERIZATIONS:
        out["parameterization"] = {"_target_": _target(PARAMETERIZATIONS[out["parameterization"]])}
    name = out.get("objective")
    if isinstance(name, str) and name in OBJECTIVES:
        kwargs = _objective_kwargs(name, out.get("hybrid_weight", Hybrid.weight))
        out["objective"] = {"_target_": _target(OBJECTIVES[name]), **kwargs}
    return out
