"""Gaussian diffusion with the DiT / improved-DDPM recipe.

The recipe: a linear beta schedule over 1000 training steps, a model that predicts the noise epsilon,
and (optionally) a learned variance that interpolates, in log space, between the posterior variance
and beta_t ("learned range"). Training minimises ``mse + vb``: the epsilon MSE plus the variational
bound term for the variance, computed with the predicted mean frozen.

The formulas follow facebookresearch/DiT (``diffusion/gaussian_diffusion.py``, ``respace.py``,
``diffusion_utils.py``: https://github.com/facebookresearch/DiT/tree/main/diffusion), which in turn
follows openai/improved-diffusion. The code here is an independent re-implementation.

The diffusion never sees the network: it works on model outputs, or calls a
``model_fn(x, t, **model_kwargs)`` where ``t`` is a LongTensor of *original* training timestep indices
in ``[0, num_train_timesteps)``. After respacing, index ``i`` of the respaced schedule is passed to the
model as ``timestep_map[i]``, never rescaled. The model output has ``C`` channels (fixed variance) or
``2C`` channels (learned variance: epsilon first, then the interpolation value ``v`` in ``[-1, 1]``).

Schedule constants are kept in float64 on the CPU; they are indexed by ``t`` and then cast to the
dtype and device of the tensor they are combined with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from sparsedit.errors import SparseditError

ModelFn = Callable[..., torch.Tensor]

__all__ = [
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]


# ----------------------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The linear beta schedule of DDPM as used by DiT, in float64.

    The end points are multiplied by ``1000 / num_timesteps`` so that schedules with other lengths keep
    roughly the same total noise (improved-DDPM's ``get_named_beta_schedule("linear")``). For 1000
    steps this is exactly ``linspace(beta_start, beta_end, 1000)``.
    """
    if num_timesteps <= 0:
        raise SparseditError(f"num_timesteps must be positive, got {num_timesteps}; pass e.g. 1000.")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def _valid_ddim_counts(num_timesteps: int) -> list[int]:
    """All step counts reachable with an integer stride ``range(0, num_timesteps, stride)``."""
    return sorted({len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps + 1)})


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """Pick which of the ``num_timesteps`` original steps to keep; returns sorted indices.

    ``spec`` follows improved-DDPM's ``respace.space_timesteps``:

    * ``250`` or ``"250"``: 250 steps spread evenly over ``[0, num_timesteps - 1]`` with a fractional
      stride (the first and the last step are always kept);
    * ``"10,15,20"``: the range is cut into 3 equal sections with 10, 15 and 20 evenly spaced steps;
    * ``"ddim25"``: ``range(0, num_timesteps, stride)`` with the integer stride that gives exactly 25
      steps (``range(0, 1000, 40)``), as used by DDIM.
    """
    if num_timesteps <= 0:
        raise SparseditError(f"num_timesteps must be positive, got {num_timesteps}; pass e.g. 1000.")
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise SparseditError(
            f"timestep spec must be an int or a string, got {spec!r}; pass e.g. 250, '250' or 'ddim50'."
        )
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim") :])
            except ValueError:
                raise SparseditError(
                    f"bad timestep spec {spec!r}: 'ddim' must be followed by a step count; use e.g. 'ddim50'."
                ) from None
            if desired <= 0 or desired > num_timesteps:
                raise SparseditError(f"bad timestep spec {spec!r}: need 1..{num_timesteps} steps; use e.g. 'ddim50'.")
            for stride in range(1, num_timesteps + 1):
                kept = range(0, num_timesteps, stride)
                if len(kept) == desired:
                    return list(kept)
            valid = _valid_ddim_counts(num_timesteps)
            below = max(c for c in valid if c < desired)
            above = min(c for c in valid if c > desired)
            raise SparseditError(
                f"bad timestep spec {spec!r}: no integer stride gives exactly {desired} of {num_timesteps} "
                f"steps; use ddim{below} or ddim{above}, or the evenly spaced spec '{desired}'."
            )
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise SparseditError(
                f"bad timestep spec {spec!r}: expected a step count like '250', section counts like "
                "'10,15,20' or 'ddim50'; fix the spec."
            ) from None
    else:
        counts = [spec]

    if any(c <= 0 for c in counts):
        raise SparseditError(f"bad timestep spec {spec!r}: step counts must be positive; use e.g. '250'.")
    if len(counts) > num_timesteps:
        raise SparseditError(
            f"bad timestep spec {spec!r}: more sections than the {num_timesteps} steps; use fewer sections."
        )
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept_steps: set[int] = set()
    for section, count in enumerate(counts):
        size = size_per + (1 if section < extra else 0)
        if count > size:
            raise SparseditError(
                f"bad timestep spec {spec!r}: cannot take {count} steps from a section of {size} "
                f"(of {num_timesteps} steps in all); ask for at most {size}."
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional position like respace.py does, so the picked steps match DiT.
        position = 0.0
        for _ in range(count):
            kept_steps.add(start + round(position))
            position += stride
        start += size
    return sorted(kept_steps)


# ----------------------------------------------------------------------------------------------------
# Gaussian helpers (log-likelihoods in nats)
# ----------------------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the first (batch) one."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    tensor = next(v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor))
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=tensor.dtype, device=tensor.device)
        for v in (logvar1, logvar2)
    )
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (the one used by improved-DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of data ``x`` in ``[-1, 1]`` quantised to 256 bins of width ``2/255``.

    Each value gets the Gaussian mass of its bin ``[x - 1/255, x + 1/255]``; the two edge bins extend
    to minus and plus infinity, so the 256 bin probabilities sum to one.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------------------------------
# The diffusion
# ----------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Forward process, posterior, model parameterisation and training loss for epsilon prediction.

    Args:
        betas: 1-D noise schedule (any float sequence; stored as float64).
        learn_sigma: ``True`` if the model outputs ``2C`` channels (epsilon, then the learned-range
            value ``v``); ``False`` for ``C`` channels and the "fixed large" variance.
        timestep_map: for each step of this schedule, the original training timestep index passed to
            the model. ``None`` means the identity (an un-respaced schedule).

    All ``t`` arguments of the methods are indices into *this* schedule (``0 .. num_timesteps - 1``).
    """

    def __init__(
        self,
        betas: torch.Tensor | np.ndarray | Sequence[float],
        *,
        learn_sigma: bool = True,
        timestep_map: list[int] | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise SparseditError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}.")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise SparseditError("betas must lie in (0, 1]; use linear_betas() for the DiT schedule.")
        n = betas.numel()
        if timestep_map is None:
            timestep_map = list(range(n))
        if len(timestep_map) != n:
            raise SparseditError(
                f"timestep_map has {len(timestep_map)} entries but the schedule has {n} steps; "
                "pass one original index per step."
            )
        self.learn_sigma = bool(learn_sigma)
        self.timestep_map: list[int] = [int(i) for i in timestep_map]
        self._timestep_map_tensor = torch.tensor(self.timestep_map, dtype=torch.long)

        one = torch.ones(1, dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], zero])

        acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # The posterior variance is 0 at t == 0; its log is clipped by reusing the value at t == 1.
        if n > 1:
            clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            clipped = betas.clone()  # single-step schedule: no t == 1 to borrow from
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * self.alphas.sqrt() / (1.0 - acp)

        # "Fixed large" variance (used when the variance is not learned): beta_t, except at t == 0
        # where the (clipped) posterior variance is used, as in DiT.
        fixed_large = torch.cat([clipped[:1], betas[1:]])
        self.fixed_large_variance = fixed_large
        self.fixed_large_log_variance = torch.log(fixed_large)
        self.log_betas = torch.log(betas)

    # -- basic properties ---------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        """Number of steps of this (possibly respaced) schedule."""
        return int(self.betas.numel())

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map indices of this schedule to the original training indices the model expects."""
        return self._timestep_map_tensor[t.detach().cpu().long()].to(t.device)

    @staticmethod
    def _extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` (float64 on CPU) cast to ``like``'s dtype/device, shaped to broadcast per sample."""
        out = values[t.detach().cpu().long()].to(device=like.device, dtype=like.dtype)
        return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))

    # -- forward process ----------------------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self._extract(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): ``sqrt(acp_t) * x0 + sqrt(1 - acp_t) * noise``."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, xt) * x0 + self._extract(self.posterior_mean_coef2, t, xt) * xt
        )
        variance = self._extract(self.posterior_variance, t, xt).expand_as(xt)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`q_sample`: ``x0 = (x_t - sqrt(1 - acp_t) * eps) / sqrt(acp_t)``."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        )

    def predict_eps_from_xstart(self, xt: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """The epsilon that maps ``pred_xstart`` to ``xt`` at step ``t``."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - pred_xstart) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        )

    # -- reverse process ----------------------------------------------------------------------------

    def split_model_output(
        self, model_output: torch.Tensor, xt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a model output into (epsilon, v); ``v`` is ``None`` when the variance is fixed."""
        channels = xt.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if (
            model_output.shape[0] != xt.shape[0]
            or model_output.shape[1] != expected
            or model_output.shape[2:] != xt.shape[2:]
        ):
            kind = "learned variance (learn_sigma=True)" if self.learn_sigma else "fixed variance (learn_sigma=False)"
            raise SparseditError(
                f"model output has shape {tuple(model_output.shape)} but {kind} needs {expected} channels for "
                f"input {tuple(xt.shape)}; set learn_sigma to match the model."
            )
        if self.learn_sigma:
            eps, v = torch.split(model_output, channels, dim=1)
            return eps, v
        return model_output, None

    def p_mean_variance(
        self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """Parameters of p(x_{t-1} | x_t) given the model output at (x_t, t).

        Learned variance ("learned range"): ``log var = frac * log(beta_t) + (1 - frac) * log(post_var_t)``
        with ``frac = (v + 1) / 2`` and the clipped posterior log-variance. Fixed variance ("fixed
        large", DiT's choice when ``learn_sigma=False``): ``beta_t``, with the posterior variance at
        ``t == 1`` used at ``t == 0``.

        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and ``eps`` (the
        epsilon half of the model output).
        """
        eps, v = self.split_model_output(model_output, xt)
        if v is not None:
            min_log = self._extract(self.posterior_log_variance_clipped, t, xt)
            max_log = self._extract(self.log_betas, t, xt)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            log_variance = self._extract(self.fixed_large_log_variance, t, xt).expand_as(xt)
        pred_xstart = self.predict_xstart_from_eps(xt, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, xt, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # -- training -----------------------------------------------------------------------------------

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample variational bound term in bits per dimension.

        ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the discretised Gaussian
        decoder negative log-likelihood of ``x0`` for ``t == 0``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        mse_weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training losses ``{"loss", "mse", "vb"}`` (each ``(B,)``) and the model ``output``.

        ``mse`` is the epsilon MSE averaged over the non-batch dimensions. With a learned variance,
        ``vb`` is the variational bound term (bits per dim) evaluated with the epsilon half detached,
        so it only trains the variance; it is multiplied by ``num_timesteps / 1000`` (improved-DDPM's
        RESCALED_MSE; a factor of 1 for the usual 1000-step training schedule). Without a learned
        variance ``vb`` is zero. ``loss = mse_weight * mse + vb``, with ``mse_weight`` a per-sample
        weight such as :meth:`min_snr_weight` (1 when None); ``mse`` itself is reported unweighted.

        ``t`` holds indices into this schedule; the model receives ``timestep_map[t]``.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise=noise)
        model_output = model_fn(xt, self.original_timesteps(t), **model_kwargs)
        eps, v = self.split_model_output(model_output, xt)
        mse = mean_flat((noise - eps) ** 2)
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, xt, t) * (self.num_timesteps / 1000.0)
        else:
            vb = torch.zeros_like(mse)
        weighted = mse if mse_weight is None else mse_weight.to(mse) * mse
        return {"loss": weighted + vb, "mse": mse, "vb": vb, "output": model_output}

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weight of the epsilon MSE at indices ``t``: ``min(SNR_t, gamma) / SNR_t``, (B,).

        ``SNR_t = acp_t / (1 - acp_t)``. For epsilon prediction this caps the effective x0-space weight
        at ``gamma`` (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy"): noisy
        steps keep weight 1, nearly clean steps, whose SNR exceeds gamma, are down-weighted.
        """
        if gamma <= 0:
            raise SparseditError(f"the Min-SNR gamma must be > 0, got {gamma}; the authors' training uses 5")
        acp = self.alphas_cumprod[t.detach().cpu().long()]
        snr = acp / (1.0 - acp)
        return (snr.clamp(max=gamma) / snr).float().to(t.device)

    # -- respacing ----------------------------------------------------------------------------------

    def respace(self, use_timesteps: Iterable[int]) -> GaussianDiffusion:
        """A diffusion over the kept steps only (sorted, de-duplicated).

        The new betas are ``1 - acp[i] / acp[previous kept]`` so that the cumulative products at the kept
        steps are unchanged; ``timestep_map`` composes with this diffusion's own map, so the model
        still receives original training indices.
        """
        kept = sorted({int(i) for i in use_timesteps})
        if not kept:
            raise SparseditError("respace() got no timesteps to keep; pass e.g. space_timesteps(1000, 250).")
        if kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise SparseditError(
                f"respace() got timesteps outside [0, {self.num_timesteps}); use space_timesteps() to pick them."
            )
        acp = self.alphas_cumprod
        new_betas = []
        last = torch.tensor(1.0, dtype=torch.float64)
        for i in kept:
            new_betas.append(1.0 - acp[i] / last)
            last = acp[i]
        return GaussianDiffusion(
            torch.stack(new_betas),
            learn_sigma=self.learn_sigma,
            timestep_map=[self.timestep_map[i] for i in kept],
        )

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
            f"original_steps=[{self.timestep_map[0]}..{self.timestep_map[-1]}])"
        )


def create_diffusion(
    steps: str | int | None = None, learn_sigma: bool = True, num_train_timesteps: int = 1000
) -> GaussianDiffusion:
    """The DiT diffusion: linear betas over ``num_train_timesteps``, optionally respaced.

    ``steps`` is a :func:`space_timesteps` spec (``250``, ``"250"``, ``"ddim50"``, ``"10,15,20"``);
    ``None`` or ``""`` keeps all training steps.
    """
    base = GaussianDiffusion(linear_betas(num_train_timesteps), learn_sigma=learn_sigma)
    if steps is None or (isinstance(steps, str) and steps.strip() == ""):
        return base
    return base.respace(space_timesteps(num_train_timesteps, steps))
