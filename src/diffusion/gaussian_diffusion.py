"""The DDPM forward process, posterior and reverse process (Ho et al. 2020), plain PyTorch.

Conventions:
- ``t`` is a LongTensor of shape (B,) holding 0-based indices in [0, T-1]; paper timestep = index + 1.
  Index 0 is the decoder step: it gets no noise when sampling, and alpha-bar_prev[0] = 1.
- Every coefficient is precomputed in float64 and cast to the data's dtype when gathered.
- Models are called as ``model(x_t, t)`` and predict what the parameterization says (``parameterizations``:
  epsilon, the paper's choice, x0, the posterior mean or v); with a learned variance they return twice the
  data's channels (dim 1). The training loss is the objective's (``objectives``: simple, vlb, hybrid).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from src.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from src.diffusion.noise import SampleNoise
from src.diffusion.objectives import Objective, Simple
from src.diffusion.parameterizations import Eps, Parameterization
from src.utils.progress import track

Model = Callable[[Tensor, Tensor], Tensor]

# Reverse-process variance sigma_t^2 (Ho et al. 2020 §3.2; the reference code's model_var_type). The fixed ones
# bound the reverse entropy from above (beta_t) and below (tilde-beta_t); the learned ones take a second set of C
# output channels from the network.
VARIANCES = {
    "fixed_large": "sigma_t^2 = beta_t, with beta_1 replaced by tilde-beta_2 (the reference code's decoder detail)",
    "fixed_small": "sigma_t^2 = tilde-beta_t, the posterior variance, log clipped at t=1 to log tilde-beta_2",
    "learned": "log sigma_t^2 is the network's second set of C output channels, unconstrained (the paper's "
               "learned diagonal Sigma)",
    "learned_range": "log sigma_t^2 = f log beta_t + (1 - f) log tilde-beta_t with f = (v + 1) / 2 and v the "
                     "network's second set of C output channels (improved DDPM)",
}
LEARNED_VARIANCES = ("learned", "learned_range")


def _check_choice(kind: str, value: str, valid: dict[str, str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r} (diffusion.{kind}): valid values are "
                         + "; ".join(f"{k} ({v})" for k, v in valid.items()))


def _check_object(kind: str, value, base: type):
    if not isinstance(value, base):
        raise TypeError(f"{kind} must be a {base.__module__}.{base.__name__} object, got {value!r} (create_diffusion "
                        "also takes the names of configs written before they were objects)")
    return value


def _precompute(betas: Tensor, variance: str) -> dict[str, Tensor]:
    """Every float64 (T,) array the process needs, from beta_1..beta_T (index 0 = paper step 1)."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # tilde-beta_1 = 0: its log would be -inf, so entry 0 takes entry 1 (reference code).
    posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))

    if variance == "fixed_small":
        model_variance = posterior_variance
        model_log_variance = posterior_log_variance_clipped
    else:
        # beta_t, except at t=1 where tilde-beta_2 gives a better decoder likelihood (reference code).
        # Learned variances do not use these two arrays.
        model_variance = torch.cat([posterior_variance[1:2], betas[1:]])
        model_log_variance = torch.log(model_variance)

    return {
        "betas": betas,
        "log_betas": torch.log(betas),
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        "model_variance": model_variance,
        "model_log_variance": model_log_variance,
    }


class GaussianDiffusion:
    """Precomputed DDPM quantities for a beta schedule, and the operations built on them.

    Args:
        betas: (T,) tensor of beta_1..beta_T, e.g. from ``make_beta_schedule``.
        variance: reverse-process variance, a key of ``VARIANCES`` (``fixed_large``: sigma_t^2 = beta_t;
            ``fixed_small``: sigma_t^2 = tilde-beta_t; ``learned``/``learned_range``: from the network).
        parameterization: what the network predicts, a ``Parameterization`` (``src.diffusion.parameterizations``:
            ``Eps()``, the default, ``X0()``, ``Mean()``, ``V()``).
        objective: the training loss, an ``Objective`` (``src.diffusion.objectives``: ``Simple()``, the default,
            ``Vlb()``, ``Hybrid(weight)``); it refuses variances it cannot train.
    """

    def __init__(self, betas: Tensor, variance: str = "fixed_large", parameterization: Parameterization | None = None,
                 objective: Objective | None = None):
        _check_choice("variance", variance, VARIANCES)
        self.variance = variance
        parameterization = Eps() if parameterization is None else parameterization
        self.parameterization = _check_object("parameterization", parameterization, Parameterization)
        self.objective = _check_object("objective", Simple() if objective is None else objective, Objective)
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D schedule of at least 2 values in (0, 1]")
        self.num_timesteps = int(betas.numel())
        self.buffers: dict[str, Tensor] = _precompute(betas, variance)
        self._device_cache: dict[torch.device, dict[str, Tensor]] = {}
        self.objective.check(self)  # last: a check may look at anything above

    @property
    def learns_variance(self) -> bool:
        return self.variance in LEARNED_VARIANCES

    @property
    def output_channels_factor(self) -> int:
        """The network outputs this many times the data's channels (2 when it also predicts the variance)."""
        return 2 if self.learns_variance else 1

    def __getattr__(self, name: str) -> Tensor:
        # Expose the float64 arrays as attributes (diffusion.alphas_cumprod, ...).
        buffers = self.__dict__.get("buffers", {})
        if name in buffers:
            return buffers[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, variance={self.variance!r}, "
                f"parameterization={self.parameterization!r}, objective={self.objective!r})")

    # ----------------------------------------------------------------- helpers
    def _arrays_on(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._device_cache:
            # MPS has no float64; everything else keeps the reference precision until gathered.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._device_cache[device] = {k: v.to(device=device, dtype=dtype) for k, v in self.buffers.items()}
        return self._device_cache[device]

    def extract(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Gather array ``name`` at indices ``t`` (B,) and shape it (B, 1, ..., 1) to broadcast against x."""
        values = self._arrays_on(t.device)[name][t]
        return values.to(x.dtype).reshape(t.shape[0], *([1] * (x.dim() - 1)))

    def _check_t(self, t: Tensor, batch: int) -> None:
        if t.dtype not in (torch.int64, torch.int32) or t.shape != (batch,):
            raise ValueError(f"t must be an integer tensor of shape ({batch},), got {t.dtype} {tuple(t.shape)}")

    @staticmethod
    def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
        return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    # ------------------------------------------------------- forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Moments of q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I): (mean, variance, log_variance)."""
        mean = self.extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = self.extract("sqrt_one_minus_alphas_cumprod", t, x0) ** 2
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, variance.expand_as(x0), log_variance.expand_as(x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 4)."""
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = self._randn_like(x0, generator)
        return (self.extract("sqrt_alphas_cumprod", t, x0) * x0
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Moments of q(x_{t-1} | x_t, x_0) (eqs. 6-7): (mean, variance, clipped log-variance)."""
        mean = self.extract("posterior_mean_coef1", t, x_t) * x0 + self.extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert the marginal: x0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return ((self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return (self.extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def predict_x0_from_mean(self, x_t: Tensor, t: Tensor, mean: Tensor) -> Tensor:
        """Invert the posterior mean mu = c1 x0 + c2 x_t (c1 = 1, c2 = 0 at index 0)."""
        return ((mean - self.extract("posterior_mean_coef2", t, x_t) * x_t)
                / self.extract("posterior_mean_coef1", t, x_t))

    def training_target(self, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network should output, the parameterization's target (eps, x0, the posterior mean, v, ...)."""
        return self.parameterization.target(self, x0, x_t, t, noise)

    # ------------------------------------------------------- reverse process
    def check_output(self, output: Tensor, x_t: Tensor) -> None:
        """ValueError unless the network output has x_t's shape, or twice its channels (dim 1) with a learned
        variance (images (B, C, H, W) and vectors (B, D) alike)."""
        factor = self.output_channels_factor
        expected = (x_t.shape[0], x_t.shape[1] * factor, *x_t.shape[2:])
        if tuple(output.shape) != expected:
            what = ("twice its input's channels, the second half for the variance,"
                    if factor == 2 else "its input's shape")
            raise ValueError(
                f"the model returned shape {tuple(output.shape)} for input {tuple(x_t.shape)}: with "
                f"diffusion.variance={self.variance} it must return {what} i.e. {expected} (leave "
                "model.out_channels / model.out_dim null to have it set from the data and the variance)")

    def split_output(self, output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the network output into the parameterization's prediction and the variance channels (or None),
        both in x_t's dtype. Channels are dim 1, for images (B, C, H, W) and vectors (B, D) alike."""
        self.check_output(output, x_t)
        output = output.to(x_t.dtype)
        if self.output_channels_factor == 1:
            return output, None
        return output.chunk(2, dim=1)

    def predictions(self, model_out: Tensor, var_out: Tensor | None, x_t: Tensor, t: Tensor,
                    clip_denoised: bool | Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """Moments of p_theta(x_{t-1} | x_t) from the split network output (see ``p_mean_variance``): the
        parameterization gives x0, eps (from the unclipped x0) and the mean (from the clipped one)."""
        kind = self.parameterization
        pred_x0 = kind.to_x0(self, model_out, x_t, t)
        pred_eps = kind.to_eps(self, model_out, pred_x0, x_t, t)
        pred_x0 = apply_x0_rule(pred_x0, clip_denoised)
        mean = kind.to_mean(self, model_out, pred_x0, x_t, t)
        variance, log_variance = self._reverse_variance(var_out, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0,
                "pred_eps": pred_eps, "model_output": model_out}

    def _reverse_variance(self, var_out: Tensor | None, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(variance, log-variance) of p_theta(x_{t-1} | x_t), x_t's shape: fixed, or from the variance channels."""
        if self.variance == "learned":
            log_variance = var_out
        elif self.variance == "learned_range":
            frac = (var_out + 1.0) / 2.0
            log_variance = (frac * self.extract("log_betas", t, x_t)
                            + (1.0 - frac) * self.extract("posterior_log_variance_clipped", t, x_t))
        else:
            log_variance = self.extract("model_log_variance", t, x_t).expand_as(x_t)
        variance = (self.extract("model_variance", t, x_t).expand_as(x_t) if var_out is None
                    else torch.exp(log_variance))
        return variance, log_variance

    def p_mean_variance(self, model: Model, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> dict[str, Tensor]:
        """Moments of p_theta(x_{t-1} | x_t) for any parameterization and variance.

        The mean is the posterior mean at the predicted x0 (clipped to [-1, 1] when ``clip_denoised``);
        for eps without clipping it equals eq. 11, (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
        A mean-predicting network's output is the mean itself. Returns a dict with ``mean``, ``variance``,
        ``log_variance``, ``pred_x0`` (clipped when asked), ``pred_eps`` (from the unclipped prediction) and
        ``model_output`` (the parameterization's part of the output).
        """
        self._check_t(t, x_t.shape[0])
        model_out, var_out = self.split_output(model(x_t, t), x_t)
        return self.predictions(model_out, var_out, x_t, t, clip_denoised)

    def p_sample(self, model: Model, x_t: Tensor, t: Tensor, clip_denoised: bool = True,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One step of Algorithm 2: x_{t-1} = mean + sigma_t z, with z = 0 at index 0."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        noise = self._randn_like(x_t, generator)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

    @torch.no_grad()
    def sample_progressive(self, model: Model, shape: tuple[int, ...], generator: torch.Generator | None = None,
                           device: torch.device | str | None = None, x_T: Tensor | None = None,
                           clip_denoised: bool = True, progress: bool = False,
                           start_t: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Run Algorithm 2 from x_T ~ N(0, I), yielding {"t", "sample", "pred_x0"} after every step.

        With ``start_t=i`` the chain starts at code index i from ``x_T`` (then holding x_{i+1} in paper
        terms, e.g. from ``q_sample(x0, i)``) and runs i+1 reverse steps: decoding in the paper's Fig. 8/9.
        """
        device = torch.device(device) if device is not None else _model_device(model)
        x = x_T.to(device) if x_T is not None else randn(shape, generator=generator, device=device)
        first = self.num_timesteps - 1 if start_t is None else int(start_t)
        if not 0 <= first < self.num_timesteps:
            raise ValueError(f"start_t must be in [0, {self.num_timesteps - 1}], got {start_t}")
        # a with block: a consumer that stops early still closes the progress report
        with track(range(first, -1, -1), desc="sampling", unit="steps", enabled=progress) as indices:
            for i in indices:
                t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
                out = self.p_sample(model, x, t, clip_denoised=clip_denoised, generator=generator)
                x = out["sample"]
                yield {"t": i, "sample": x, "pred_x0": out["pred_x0"]}

    @torch.no_grad()
    def sample(self, model: Model, shape: tuple[int, ...], generator: torch.Generator | None = None,
               progress: bool = False, device: torch.device | str | None = None, x_T: Tensor | None = None,
               clip_denoised: bool = True, pred_x0_every: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Ancestral sampling (Algorithm 2) of a batch of the given shape (B, ...).

        With ``pred_x0_every=k`` also returns the predicted x0 at code indices T-1, and every k-th index
        down to 0, stacked as (K, B, ...) in sampling order (progressive generation, paper Fig. 6).
        """
        snapshots = []
        x = None
        for step in self.sample_progressive(model, shape, generator, device, x_T, clip_denoised, progress):
            x = step["sample"]
            if pred_x0_every and (step["t"] % pred_x0_every == 0 or step["t"] == self.num_timesteps - 1):
                snapshots.append(step["pred_x0"])
        if pred_x0_every:
            return x, torch.stack(snapshots)
        return x

    # ------------------------------------------------------------- training
    def sample_timesteps(self, batch: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """t ~ Uniform{0..T-1} (code indices), as in Algorithm 1."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def training_losses(self, model: Model, x0: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
                        generator: torch.Generator | None = None,
                        return_terms: bool = False) -> Tensor | dict[str, Tensor]:
        """Per-example training loss of the configured objective, shape (B,) (Algorithm 1).

        x0: (B, ...); t: (B,) 0-based indices, drawn uniformly when None; noise: x0's shape, drawn when None.
        The objective (``src.diffusion.objectives``) gets the network's output at x_t = q_sample(x0, t, noise):
        ``Simple`` is the MSE to ``training_target`` (L_simple for eps, eq. 14), ``Vlb`` the bound's term at t
        in bits/dim, ``Hybrid`` the MSE plus weight * T * the bound's term for the variance (improved DDPM).
        With ``return_terms`` returns the objective's dict: ``loss`` and its parts (``mse`` and/or ``vb``).
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = self._randn_like(x0, generator)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t)
        self.check_output(output, x_t)
        terms = self.objective(self, output, x0, x_t, t, noise)
        return terms if return_terms else terms["loss"]

    # --------------------------------------------------- variational bound
    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (B,) (the reference _prior_bpd).

        Computed in x0's dtype; normal_kl's expm1 form keeps even the 6e-10 at x0 = 0 good to ~1e-3 in float32.
        """
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
        return mean_flat(kl) / math.log(2.0)

    def bound_term(self, p: dict[str, Tensor], x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The bound's term at t in bits/dim (B,) given the reverse moments ``p`` of ``predictions`` (see
        ``vb_terms_bpd``)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        # Both are computed for the whole batch and selected per example, so mixed-t batches work.
        return torch.where(t == 0, decoder_nll, kl)

    def vb_terms_bpd(self, model: Model, x0: Tensor, x_t: Tensor, t: Tensor,
                     clip_denoised: bool = True) -> dict[str, Tensor]:
        """One term of the bound in bits/dim at code indices t (B,) (eq. 5; the reference _vb_terms_bpd).

        t > 0: L_t = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), true posterior with the clipped
        log-variance; t == 0: decoder NLL -log p_theta(x_0 | x_1) under the discretized Gaussian (eq. 13).
        Returns ``output`` (B,), and ``pred_x0``, ``pred_eps`` and ``model_output`` (x_t's shape).
        """
        p = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        return {"output": self.bound_term(p, x0, x_t, t), "pred_x0": p["pred_x0"], "pred_eps": p["pred_eps"],
                "model_output": p["model_output"]}

    @torch.no_grad()
    def bits_per_dim(self, model: Model, x0: Tensor, generator: torch.Generator | None = None,
                     progress: bool = False, clip_denoised: bool = True) -> dict[str, Tensor]:
        """The full variational bound per example in bits/dim, as the reference ``calc_bpd_loop``.

        Every index t = T-1..0 gets fresh noise and one model call on x_t ~ q(x_t | x_0), so each term
        is a one-sample Monte Carlo estimate. x0: (B, ...) on the [-1, 1] 8-bit grid.
        Returns ``total`` (B,) = terms.sum(1) + prior, ``prior`` (B,), and ``terms``, ``mse``
        (pred-x0 MSE), ``eps_mse`` (epsilon MSE), each (B, T) with column t holding code index t
        (column 0 is the decoder NLL). As in ``calc_bpd_loop``, ``mse`` and ``eps_mse`` use the x0 clipped when
        ``clip_denoised``, eps recomputed from it (``_predict_eps_from_xstart``), not the network's own eps.
        """
        batch, num = x0.shape[0], self.num_timesteps
        terms = torch.zeros(batch, num, device=x0.device, dtype=x0.dtype)
        mse = torch.zeros_like(terms)
        eps_mse = torch.zeros_like(terms)
        for i in track(range(num - 1, -1, -1), desc="bits/dim", unit="steps", enabled=progress):
            t = torch.full((batch,), i, device=x0.device, dtype=torch.long)
            noise = self._randn_like(x0, generator)
            x_t = self.q_sample(x0, t, noise)
            out = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip_denoised)
            terms[:, i] = out["output"]
            mse[:, i] = mean_flat((out["pred_x0"] - x0) ** 2)
            eps = self.predict_eps_from_x0(x_t, t, out["pred_x0"])
            eps_mse[:, i] = mean_flat((eps - noise) ** 2)
        prior = self.prior_bpd(x0)
        total = terms.sum(dim=1) + prior
        return {"total": total, "prior": prior, "terms": terms, "mse": mse, "eps_mse": eps_mse}


def apply_x0_rule(x0: Tensor, rule: bool | Callable[[Tensor], Tensor]) -> Tensor:
    """A predicted x0 under ``rule``: a callable of its own (e.g. solvers.DynamicThreshold), clipping to [-1, 1]
    (True) or nothing (False)."""
    if callable(rule):
        return rule(x0)
    return x0.clamp(-1.0, 1.0) if rule else x0


def randn(shape: tuple[int, ...], generator: torch.Generator | SampleNoise | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise; draws on the generator's device so a seed gives the same noise on any device.
    ``generator`` may be a ``SampleNoise`` (src.diffusion.noise): each row then comes from its sample's own stream."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, SampleNoise):
        noise = generator.randn(shape, dtype=dtype)
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    target = torch.device(device) if device is not None else noise.device
    if noise.device.type == "cpu" and target.type == "cuda":
        # Pinned memory and non_blocking: a copy from pageable memory synchronizes the stream, so each sampling
        # step would wait for the GPU to finish the previous one before Python could queue the next.
        return noise.pin_memory().to(target, non_blocking=True)
    return noise.to(target).contiguous()


def _model_device(model: Model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")
