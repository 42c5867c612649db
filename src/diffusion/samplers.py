"""Samplers for a trained epsilon-model: ancestral DDPM (full or respaced chains) and DDIM. Plain PyTorch.

The functions ``ddpm_sample`` / ``ddim_sample`` do the work; the classes ``Ancestral`` and ``DDIM`` are what
configs/sampler/*.yaml select by ``_target_``. Every sampler object is called the same way,
``sampler(model, diffusion, x_T, generator=None, progress=False, clip_denoised=True) -> x_0``, with x_T the
starting noise (its shape, device and dtype are the caller's) and ``generator`` driving every later draw.

Conventions (as in ``gaussian_diffusion``):
- timesteps are 0-based code indices in [0, T-1]; paper timestep = index + 1, index 0 is the decoder step;
- models are called as ``model(x_t, t)`` with ``t`` a LongTensor (B,) of *original* indices and return
  the diffusion's parameterization (eps, x0, mean or v), with twice the channels for a learned variance;
- all noise comes from ``randn`` so that a seeded CPU generator gives the same samples on any device.

References: respacing follows improved DDPM (Nichol & Dhariwal 2021, respace.py), DDIM follows Song et al. 2021 eq. 12.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from src.diffusion.gaussian_diffusion import GaussianDiffusion, Model, _model_device, randn
from src.diffusion.solvers import Denoiser, DynamicThreshold, dpmpp_2m_sample, heun_sample, spaced_indices, unipc_sample
from src.utils.progress import track

__all__ = ["space_timesteps", "respace", "RespacedModel", "ddpm_sample", "ddim_sample", "resolve_timesteps",
           "Sampler", "Ancestral", "DDIM", "DPMSolverPP2M", "DPMSolverPP2MSDE", "UniPC", "Heun"]


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Choose the original 0-based indices in [0, T) that a shortened chain keeps (improved DDPM's respacing).

    ``section_counts`` is a list of counts (or a comma-separated string such as ``"10,15,20"``, or one int):
    [0, T) is split into that many near-equal sections (the first ``T % k`` get one extra index) and each
    section keeps ``count`` evenly strided indices including its first and last one. ``"ddimN"`` instead
    takes ``range(0, T, k)`` for the integer stride k giving exactly N indices (the DDIM paper's spacing).

    Examples: T=1000, "10" -> [0, 111, ..., 888, 999]; T=1000, "ddim50" -> [0, 20, ..., 980].
    Returns the kept indices, sorted increasingly.
    """
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                wanted = int(spec[len("ddim"):])
            except ValueError as err:
                raise ValueError(f"bad step spec {section_counts!r}: expected 'ddimN', N an integer") from err
            # stride T is allowed too, so that "ddim1" keeps index 0 alone
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == wanted:
                    return list(range(0, T, stride))
            raise ValueError(f"cannot take exactly {wanted} steps out of T={T} with an integer stride "
                             f"({spec!r}); pass the count alone ({wanted}) for evenly spread steps instead")
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError as err:
            raise ValueError(f"bad step spec {section_counts!r}: expected an int, 'ddimN' or counts such as "
                             "'10,15,20'") from err
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"step counts must be >= 0 and keep at least one step, got {section_counts!r}")
    if len(counts) > T:
        raise ValueError(f"{len(counts)} sections do not fit into T={T} steps")

    size_per, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps out of a section of {size} (T={T}, counts "
                             f"{counts}); at most {T} steps in all")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # accumulate the fractional stride as improved DDPM does: rounding j*stride instead differs at .5 ties
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def resolve_timesteps(num_timesteps: int, steps: int | str | Sequence[int] | None) -> list[int]:
    """Turn a ``steps`` argument into kept 0-based indices: None = all T; an int or a section string goes
    through ``space_timesteps``; a list is taken as the indices themselves (checked, sorted)."""
    T = int(num_timesteps)
    if steps is None:
        return list(range(T))
    if isinstance(steps, bool):
        raise ValueError(f"steps must be an int, a section string or a list of indices, got {steps!r}")
    if isinstance(steps, int):
        if not 1 <= steps <= T:
            raise ValueError(f"steps={steps} is out of range: the diffusion has T={T} steps, so use 1..{T}")
        return space_timesteps(T, [steps])
    if isinstance(steps, str):
        spec = steps.strip()
        if spec.isdigit():
            return resolve_timesteps(T, int(spec))
        return space_timesteps(T, spec)
    kept = sorted({int(i) for i in steps})
    if not kept or kept[0] < 0 or kept[-1] >= T:
        raise ValueError(f"timesteps must be a non-empty list of indices in [0, {T - 1}], "
                         f"got {list(steps)!r}")
    return kept


class RespacedModel:
    """Wraps a model of the original chain for a respaced one: new index j -> original ``timestep_map[j]``."""

    def __init__(self, model: Model, timestep_map: Tensor):
        self.model = model
        self.timestep_map = timestep_map
        self._maps: dict[torch.device, Tensor] = {}

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        if t.device not in self._maps:
            self._maps[t.device] = self.timestep_map.to(t.device)
        return self.model(x_t, self._maps[t.device][t])


def _check_respaceable(diffusion: GaussianDiffusion, kept: Sequence[int]) -> None:
    """A parameterization tied to one step of the full chain (the mean-predicting model outputs the one-step
    mean) cannot be sampled with longer steps."""
    if not diffusion.parameterization.respaceable and len(kept) < diffusion.num_timesteps:
        name = diffusion.parameterization.name
        raise ValueError(
            f"a mean-predicting model (diffusion.parameterization={name}) outputs something of one step of the full "
            "chain (mean: the one-step mean), which a respaced chain cannot use: sample all T steps "
            "(sampler.steps=null) or use DDIM (sampler=ddim), which recovers x0 from it")


def respace(diffusion: GaussianDiffusion, timesteps: Sequence[int]) -> tuple[GaussianDiffusion, Tensor]:
    """The process that keeps only ``timesteps`` (0-based original indices) of ``diffusion``.

    New betas are 1 - abar_i / abar_prev_kept over the kept indices i (abar_prev_kept starts at 1), so the
    new alpha-bars equal the original ones at the kept indices; every other coefficient (posterior,
    tilde-beta, the fixed_large patch) is rebuilt by a fresh GaussianDiffusion with the same variance name.
    Returns (respaced diffusion, timestep_map) with timestep_map[j] the original index of new index j
    (LongTensor (S,)); wrap the model with ``RespacedModel(model, timestep_map)`` to sample it.
    """
    kept = resolve_timesteps(diffusion.num_timesteps, list(timesteps))
    _check_respaceable(diffusion, kept)
    if len(kept) < 2:
        # GaussianDiffusion needs tilde-beta_2 for its t=1 log-variance
        raise ValueError(f"a respaced ancestral chain needs at least 2 steps, got {len(kept)}; use the DDIM "
                         "sampler for a single step")
    abar = diffusion.alphas_cumprod
    betas = []
    abar_prev = torch.ones((), dtype=torch.float64)
    for i in kept:
        betas.append(1.0 - abar[i] / abar_prev)
        abar_prev = abar[i]
    spaced = GaussianDiffusion(torch.stack(betas), variance=diffusion.variance,
                               parameterization=diffusion.parameterization, objective=diffusion.objective)
    return spaced, torch.tensor(kept, dtype=torch.long)


@torch.no_grad()
def ddpm_sample(diffusion: GaussianDiffusion, model: Model, shape: tuple[int, ...],
                steps: int | str | Sequence[int] | None = None, generator: torch.Generator | None = None,
                progress: bool = False, clip_denoised: bool = True, device: torch.device | str | None = None,
                x_T: Tensor | None = None) -> Tensor:
    """Ancestral sampling (Algorithm 2) of a batch of ``shape`` (B, ...); returns x_0 as (B, ...).

    ``steps``: None runs all T steps; an int count, a section string (``"10,15,20"``, ``"ddim25"``) or a list
    of 0-based indices samples the respaced process (``respace``), whose variance is the same choice
    (fixed_large / fixed_small) rebuilt from the respaced betas. Noise: x_T first, then one draw of ``shape``
    per step (the last one unused), all through ``randn`` and ``generator``.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    kept = resolve_timesteps(diffusion.num_timesteps, steps)
    if len(kept) == diffusion.num_timesteps:
        return diffusion.sample(model, shape, generator=generator, progress=progress, device=device, x_T=x_T,
                                clip_denoised=clip_denoised)
    spaced, timestep_map = respace(diffusion, kept)
    return spaced.sample(RespacedModel(model, timestep_map), shape, generator=generator, progress=progress,
                         device=device, x_T=x_T, clip_denoised=clip_denoised)


@torch.no_grad()
def ddim_sample(diffusion: GaussianDiffusion, model: Model, shape: tuple[int, ...],
                steps: int | str | None = 50, eta: float = 0.0, generator: torch.Generator | None = None,
                progress: bool = False, clip_denoised: bool = True, device: torch.device | str | None = None,
                timesteps: Sequence[int] | None = None, x_T: Tensor | None = None) -> Tensor:
    """DDIM sampling (Song et al. eq. 12) of a batch of ``shape`` (B, ...); returns x_0 as (B, ...).

    Runs over an increasing subsequence tau_1 < ... < tau_S of 0-based indices, from tau_S down to tau_1:
    ``timesteps`` if given, else from ``steps``: an int S takes the DDIM code's uniform stride
    (``"ddimS"``) when an integer stride gives exactly S steps and evenly spread steps otherwise; a string
    goes through ``space_timesteps``; None takes all T. Per step, with abar_prev = 1 for tau_1:

        x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (clipped to [-1, 1] and eps recomputed
                                                                 from it when ``clip_denoised``)
        sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z   (z = 0 at the end)

    eta = 0 is deterministic given x_T; eta = 1 with all T steps is ancestral sampling with fixed_small.
    Noise: x_T first, then one draw of ``shape`` per step whatever eta (the same stream as ``ddpm_sample``).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    T = diffusion.num_timesteps
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: DDIM, 1: DDPM-like noise), got {eta}")
    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps)
    if timesteps is not None:
        kept = resolve_timesteps(T, list(timesteps))
    elif isinstance(steps, int) and not isinstance(steps, bool):
        kept = resolve_timesteps(T, steps)  # range check
        try:
            kept = space_timesteps(T, f"ddim{steps}")
        except ValueError:
            pass  # no integer stride gives exactly `steps`: keep the evenly spread ones
    else:
        kept = resolve_timesteps(T, steps)

    x = x_T.to(device) if x_T is not None else randn(shape, generator=generator, device=device)
    abar = diffusion.alphas_cumprod
    order = list(reversed(kept))
    for n, i in enumerate(track(order, desc="DDIM sampling", unit="steps", enabled=progress)):
        t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
        # x0 and eps from any parameterization; a learned variance is not used by DDIM
        out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        x0, eps = out["pred_x0"], out["pred_eps"]
        if clip_denoised:
            # keep x_prev consistent with the clipped x0 (improved DDPM's ddim_sample)
            eps = diffusion.predict_eps_from_x0(x, t, x0)
        # per-step scalars in float64, as the schedule arrays are
        abar_t = abar[i].item()
        abar_prev = abar[order[n + 1]].item() if n + 1 < len(order) else 1.0
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)) ** 0.5
        # max(): sigma^2 can exceed 1 - abar_prev by rounding when eta = 1
        dir_coef = max(1.0 - abar_prev - sigma**2, 0.0) ** 0.5
        noise = randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x = abar_prev**0.5 * x0 + dir_coef * eps
        if n + 1 < len(order):
            x = x + sigma * noise
    return x



# ------------------------------------------------------------------ sampler objects (configs/sampler/*.yaml)
def _config_steps(steps: int | str | Sequence[int] | None) -> int | str | None:
    """``steps`` as the config means it: a list is section counts, like the string ``"10,15,20"``."""
    if isinstance(steps, Sequence) and not isinstance(steps, str):  # also an OmegaConf ListConfig
        return ",".join(str(int(c)) for c in steps)
    return steps


def _kept_steps(steps: int | str | None, num_timesteps: int) -> list[int]:
    try:
        return resolve_timesteps(num_timesteps, steps)
    except ValueError as err:
        raise ValueError(f"sampler.steps={steps!r} does not fit this checkpoint (T={num_timesteps}): "
                         f"{err}") from err


class Sampler:
    """A sampler: ``sampler(model, diffusion, x_T, generator=None, progress=False, clip_denoised=True) -> x_0``.

    ``model(x_t, t)`` is called with 0-based t as everywhere else; ``x_T`` (B, ...) is the starting noise and
    ``generator`` drives every later noise draw. ``check`` raises a ValueError naming the config key when the
    settings do not fit ``diffusion``; entry points call it right after loading a checkpoint. ``nfe`` is the number
    of network evaluations per sample and ``with_nfe`` a copy that spends (at most) a given number.
    """

    def check(self, diffusion: GaussianDiffusion) -> None:
        """Refuse settings that do not fit ``diffusion`` (nothing to check here)."""

    def nfe(self, diffusion: GaussianDiffusion) -> int:
        """Network evaluations per sample on ``diffusion``."""
        raise NotImplementedError(f"{type(self).__name__} does not say how many network evaluations it makes")

    def with_nfe(self, nfe: int) -> Sampler:
        """A copy that makes ``nfe`` network evaluations (one per step, unless the sampler says otherwise)."""
        return dataclasses.replace(self, steps=int(nfe))

    def x0_rule(self, clip_denoised: bool):
        """What happens to each predicted x0: the sampler's dynamic threshold when it has one (``threshold``, a
        percentile), else clipping to [-1, 1] when ``clip_denoised``."""
        percentile = getattr(self, "threshold", None)
        if percentile is None:
            return clip_denoised
        return DynamicThreshold(percentile, getattr(self, "threshold_max", None))

    def __call__(self, model: Model, diffusion: GaussianDiffusion, x_T: Tensor,
                 generator: torch.Generator | None = None, progress: bool = False,
                 clip_denoised: bool = True) -> Tensor:
        raise NotImplementedError


@dataclass
class Ancestral(Sampler):
    """Ancestral sampling (Algorithm 2) over all T steps (``steps=None``) or the respaced chain of ``steps``
    (an int count or a section string such as ``"10,15,20"`` / ``"ddim25"``; a list is section counts)."""

    steps: int | str | Sequence[int] | None = None
    threshold: float | None = None  # dynamic thresholding of x0 at this percentile (Sampler.x0_rule); null: clip
    threshold_max: float | None = None

    def __post_init__(self) -> None:
        self.steps = _config_steps(self.steps)

    def nfe(self, diffusion: GaussianDiffusion) -> int:
        return len(_kept_steps(self.steps, diffusion.num_timesteps))

    def check(self, diffusion: GaussianDiffusion) -> None:
        self.x0_rule(True)  # checks the threshold settings
        kept = _kept_steps(self.steps, diffusion.num_timesteps)
        if len(kept) < 2:
            raise ValueError(f"sampler.steps={self.steps!r} keeps {len(kept)} step; ancestral sampling needs at "
                             "least 2 (use sampler=ddim for a single step)")
        _check_respaceable(diffusion, kept)

    def __call__(self, model: Model, diffusion: GaussianDiffusion, x_T: Tensor,
                 generator: torch.Generator | None = None, progress: bool = False,
                 clip_denoised: bool = True) -> Tensor:
        self.check(diffusion)
        return ddpm_sample(diffusion, model, tuple(x_T.shape), steps=self.steps, generator=generator,
                           progress=progress, clip_denoised=self.x0_rule(clip_denoised), device=x_T.device, x_T=x_T)


@dataclass
class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. 12) over ``steps`` of the T steps (see ``ddim_sample``); ``eta`` >= 0 scales
    the noise (0: deterministic given x_T, 1 over all T steps: ancestral sampling with fixed_small)."""

    steps: int | str | Sequence[int] | None = 50
    eta: float = 0.0
    # null: the DDIM code's uniform stride (range(0, T, T // steps) when it gives exactly `steps`); or one of
    # solvers.SPACINGS (uniform = trailing, quadratic, logsnr, karras), as for the other ODE solvers
    spacing: str | None = None
    threshold: float | None = None  # dynamic thresholding of x0 at this percentile (Sampler.x0_rule); null: clip
    threshold_max: float | None = None

    def __post_init__(self) -> None:
        self.steps = _config_steps(self.steps)
        self.eta = float(self.eta)

    def _timesteps(self, diffusion: GaussianDiffusion) -> list[int] | None:
        if self.spacing is None:
            return None
        return sorted(spaced_indices(diffusion.alphas_cumprod, _solver_steps(self.steps), self.spacing))

    def nfe(self, diffusion: GaussianDiffusion) -> int:
        timesteps = self._timesteps(diffusion)
        return len(timesteps) if timesteps is not None else len(_kept_steps(self.steps, diffusion.num_timesteps))

    def check(self, diffusion: GaussianDiffusion) -> None:
        self.x0_rule(True)
        if self._timesteps(diffusion) is None:
            _kept_steps(self.steps, diffusion.num_timesteps)
        if not self.eta >= 0:
            raise ValueError(f"sampler.eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {self.eta}")

    def __call__(self, model: Model, diffusion: GaussianDiffusion, x_T: Tensor,
                 generator: torch.Generator | None = None, progress: bool = False,
                 clip_denoised: bool = True) -> Tensor:
        self.check(diffusion)
        return ddim_sample(diffusion, model, tuple(x_T.shape), steps=self.steps, eta=self.eta, generator=generator,
                           progress=progress, clip_denoised=self.x0_rule(clip_denoised), device=x_T.device, x_T=x_T,
                           timesteps=self._timesteps(diffusion))


def _solver_steps(steps) -> int:
    """``sampler.steps`` of a spaced solver: a positive integer (a count of noise levels)."""
    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampler.steps={steps!r} must be a positive integer with a sampler.spacing (the number of "
                         "noise levels); section strings such as '10,15,20' go with spacing=null")
    return steps



# ------------------------------------------------------------------ fast ODE/SDE solvers (src.diffusion.solvers)
@dataclass
class _Spaced(Sampler):
    """A solver over ``steps`` noise levels spread by ``spacing`` (solvers.SPACINGS), then a jump to sigma = 0."""

    steps: int = 20
    spacing: str = "uniform"  # the most robust from 5 to 50 NFE on digits (README, Sampling)
    threshold: float | None = None  # dynamic thresholding of x0 at this percentile (Sampler.x0_rule); null: clip
    threshold_max: float | None = None

    def indices(self, diffusion: GaussianDiffusion) -> list[int]:
        return spaced_indices(diffusion.alphas_cumprod, _solver_steps(self.steps), self.spacing)

    def nfe(self, diffusion: GaussianDiffusion) -> int:
        return len(self.indices(diffusion))

    def check(self, diffusion: GaussianDiffusion) -> None:
        self.x0_rule(True)
        self.indices(diffusion)

    def __call__(self, model: Model, diffusion: GaussianDiffusion, x_T: Tensor,
                 generator: torch.Generator | None = None, progress: bool = False,
                 clip_denoised: bool = True) -> Tensor:
        self.check(diffusion)
        denoise = Denoiser(model, diffusion, self.x0_rule(clip_denoised))
        return self.solve(denoise, diffusion, x_T, self.indices(diffusion), generator, progress)

    def solve(self, denoise: Denoiser, diffusion: GaussianDiffusion, x_T: Tensor, indices: list[int],
              generator: torch.Generator | None, progress: bool) -> Tensor:
        raise NotImplementedError


@dataclass
class DPMSolverPP2M(_Spaced):
    """DPM-Solver++(2M) (Lu et al. 2022b): multistep, second order, data prediction; ``steps`` evaluations."""

    sde: ClassVar[bool] = False

    def solve(self, denoise, diffusion, x_T, indices, generator, progress):
        return dpmpp_2m_sample(denoise, diffusion, x_T, indices, sde=self.sde, generator=generator, progress=progress)


@dataclass
class DPMSolverPP2MSDE(DPMSolverPP2M):
    """DPM-Solver++(2M) SDE (midpoint, eta = 1): the stochastic variant; its noise comes from ``generator``."""

    sde: ClassVar[bool] = True


@dataclass
class UniPC(_Spaced):
    """UniPC-bh2 (Zhao et al. 2023), order 2, predictor-corrector at no extra evaluation; ``steps`` evaluations."""

    def solve(self, denoise, diffusion, x_T, indices, generator, progress):
        return unipc_sample(denoise, diffusion, x_T, indices, progress=progress)


@dataclass
class Heun(_Spaced):
    """EDM's deterministic Heun (Karras et al. 2022, Alg. 1): ``steps`` noise levels, 2 steps - 1 evaluations."""

    steps: int = 10

    def nfe(self, diffusion: GaussianDiffusion) -> int:
        return 2 * len(self.indices(diffusion)) - 1

    def with_nfe(self, nfe: int) -> Sampler:
        return dataclasses.replace(self, steps=max(1, (int(nfe) + 1) // 2))

    def solve(self, denoise, diffusion, x_T, indices, generator, progress):
        return heun_sample(denoise, diffusion, x_T, indices, progress=progress)
