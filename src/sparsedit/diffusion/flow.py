"""Flow matching (rectified flow), the process of SD3 and FLUX: noising, the velocity loss, training-time sigma
sampling and the Euler sampler with a static or resolution-dependent shift.

Conventions (those of diffusers' ``FlowMatchEulerDiscreteScheduler`` and the SD3 paper, Esser et al. 2024):
``x_sigma = (1 - sigma) * x_0 + sigma * noise`` with sigma in [0, 1] (1 = pure noise); the model predicts the
velocity ``noise - x_0``; a model is called with ``t = sigma * 1000`` (:data:`T_SCALE`), the scale on which the
SparseDiT pruning schedule reads timesteps, so the noisiest steps are the sparsest ones as for DDPM models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparsedit.errors import SparseditError

T_SCALE = 1000.0  # model timestep = sigma * T_SCALE
SIGMA_SCHEMES = ("uniform", "logit-normal")


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ..., 1)


def noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The point at ``sigma`` (B,) on the straight path from the data ``x0`` to ``noise``."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """What the model is trained to predict: d x_sigma / d sigma = noise - x0."""
    return noise - x0


def flow_loss(prediction: Tensor, x0: Tensor, noise: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error of the predicted velocity (B,), optionally weighted per sample."""
    err = (prediction.float() - velocity(x0, noise).float()).pow(2).flatten(1).mean(1)
    return err if weight is None else err * weight.float()


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The static shift ``shift * s / (1 + (shift - 1) * s)`` (SD3: 3.0): more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def exponential_shift(sigmas: Tensor, mu: float) -> Tensor:
    """The resolution-dependent shift ``e^mu / (e^mu + (1 / s - 1))`` (FLUX)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def resolution_mu(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """FLUX's ``mu``: linear in the number of image tokens, ``base_shift`` at 256 tokens, ``max_shift`` at 4096."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def sample_sigmas(n: int, generator: torch.Generator | None = None, scheme: str = "logit-normal", mean: float = 0.0,
                  std: float = 1.0, shift: float = 1.0, mu: float | None = None) -> Tensor:
    """Training sigmas (n,) in (0, 1): ``uniform`` or ``logit-normal`` (SD3's default, sigmoid of N(mean, std)),
    then an optional static ``shift`` or resolution-dependent ``mu`` (FLUX trains on shifted sigmas)."""
    if scheme not in SIGMA_SCHEMES:
        raise SparseditError(f"unknown sigma sampling {scheme!r}; choose one of {', '.join(SIGMA_SCHEMES)}")
    if scheme == "uniform":
        sigmas = torch.rand(n, generator=generator)
    else:
        sigmas = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    sigmas = sigmas.clamp(1e-6, 1 - 1e-6)  # the shifts divide by s; both ends are measure-zero for training
    if mu is not None:
        return exponential_shift(sigmas, mu)
    return shift_sigmas(sigmas, shift) if shift != 1.0 else sigmas


def euler_sigmas(steps: int, shift: float = 1.0, mu: float | None = None, num_train_timesteps: int = 1000) -> Tensor:
    """The ``steps + 1`` sigmas (ending at 0) of a sampling run, as the diffusers pipelines set them.

    With ``mu`` (FLUX): ``linspace(1, 1 / steps, steps)`` shifted by :func:`exponential_shift`. Without (SD3, static
    ``shift``): ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``, i.e. the training sigmas' range
    (whose low end is already shifted) spaced evenly and shifted again, which is what SD3 pipelines sample with.
    """
    if steps < 1:
        raise SparseditError(f"a sampling run needs at least one step, not {steps}")
    if mu is not None:
        sigmas = exponential_shift(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), mu)
    else:
        n = num_train_timesteps
        lowest = shift_sigmas(torch.tensor(1.0 / n, dtype=torch.float64), shift)  # the scheduler's sigma_min
        sigmas = shift_sigmas(torch.linspace(1.0, float(lowest), steps, dtype=torch.float64), shift)
    return torch.cat([sigmas.float(), torch.zeros(1)])


@torch.no_grad()
def euler_sample(model_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, sigmas: Sequence[float] | Tensor,
                 progress: Callable[[range], range] | None = None) -> Tensor:
    """Integrate from ``noise`` (sigma = sigmas[0]) to the data with Euler steps; ``model_fn(x, t)`` returns the
    velocity at model timesteps ``t = sigma * 1000`` (B,). The state is kept in fp32 between steps and the step
    ``dt * v`` in the model's dtype, as diffusers' scheduler does, so a bf16 run matches a pipeline's."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    x = noise
    steps = range(len(sigmas) - 1)
    for i in progress(steps) if progress else steps:
        t = torch.full((x.shape[0],), float(sigmas[i]) * T_SCALE, device=x.device)
        v = model_fn(x, t)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]).to(v.device) * v).to(v.dtype)
    return x


def logit_normal_density(sigmas: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """The density of the logit-normal distribution at ``sigmas`` (0 at the ends, where the logit is infinite)."""
    s = sigmas.double().clamp(0, 1)
    inside = (s > 0) & (s < 1)
    s_in = torch.where(inside, s, torch.full_like(s, 0.5))
    logit = torch.log(s_in / (1 - s_in))
    dens = torch.exp(-((logit - mean) ** 2) / (2 * std * std)) / (std * math.sqrt(2 * math.pi) * s_in * (1 - s_in))
    return torch.where(inside, dens, torch.zeros_like(dens)).to(sigmas.dtype)


class FlowProcess:
    """Flow matching behind the training interface of :class:`sparsedit.diffusion.process.GaussianDiffusion`.

    The trainer draws integer steps ``t`` in ``[0, num_timesteps)`` (uniformly, or from the pruning schedule's pieces
    so that a batch shares one token grid); step ``t`` is ``sigma = t / num_timesteps`` and the model sees ``t``
    itself (``sigma * 1000``), so the grid the model picks is the grid the piece sampler chose. SD3's logit-normal
    sigma sampling enters as a loss weight instead of a sampling distribution: with ``weighting="logit-normal"``
    each sample's loss is multiplied by the logit-normal density at its sigma, whose mean under uniform sigmas is 1.
    The expected gradient is then exactly that of sampling sigmas logit-normally (the SD3 paper presents its
    timestep sampling as this weighting); only its variance differs.
    """

    learns_sigma = False

    def __init__(self, num_timesteps: int = 1000, weighting: str = "logit-normal", mean: float = 0.0, std: float = 1.0):
        if weighting not in ("uniform", "logit-normal"):
            raise SparseditError(f"unknown flow loss weighting {weighting!r}; choose uniform or logit-normal")
        self.num_timesteps = num_timesteps
        self.weighting, self.mean, self.std = weighting, mean, std

    def sigmas(self, t: Tensor) -> Tensor:
        return t.float() / self.num_timesteps

    def original_timesteps(self, t: Tensor) -> Tensor:
        """The model timesteps of steps ``t``: the steps themselves (sigma * 1000 on a 1000-step schedule)."""
        return t.float() * (T_SCALE / self.num_timesteps)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        return noised(x0, torch.randn_like(x0) if noise is None else noise, self.sigmas(t))

    def weight(self, t: Tensor) -> Tensor | None:
        if self.weighting == "uniform":
            return None
        return logit_normal_density(self.sigmas(t), self.mean, self.std)

    def min_snr_weight(self, t: Tensor, gamma: float) -> Tensor:
        raise SparseditError("Min-SNR weighting is for DDPM models; a flow-matching model weights its loss by "
                             "sigma instead: drop --min-snr-gamma (or use the paper recipe)")

    def training_losses(self, model_fn: Callable[..., Tensor], x0: Tensor, t: Tensor, model_kwargs: dict | None = None,
                        noise: Tensor | None = None, mse_weight: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "mse", "vb"}`` (``vb`` is zero) and the model ``output``, as GaussianDiffusion's.

        ``mse`` is the unweighted velocity MSE; ``loss`` multiplies it by the sigma weighting and ``mse_weight``.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        out = model_fn(self.q_sample(x0, t, noise), self.original_timesteps(t), **(model_kwargs or {}))
        mse = flow_loss(out, x0, noise)
        weight = self.weight(t)
        loss = mse if weight is None else mse * weight.to(mse)
        if mse_weight is not None:
            loss = loss * mse_weight.to(mse)
        return {"loss": loss, "mse": mse, "vb": torch.zeros_like(mse), "output": out}


def start_noise(shape: Sequence[int], seed: int, device: str | torch.device) -> Tensor:
    """The run's starting noise: one seeded draw (a pipeline given the same tensor as ``latents`` starts there too)."""
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, device=device)


def guided(model_fn: Callable[..., Tensor], cfg_scale: float, cond: dict[str, Tensor],
           uncond: dict[str, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The velocity under classifier-free guidance: one model call on [unconditional; conditional], as the diffusers
    pipelines batch it, then ``u + cfg_scale * (c - u)``; without guidance (scale 1) a plain conditional call."""
    if cfg_scale == 1.0:
        return lambda x, t: model_fn(x, t, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def fn(x: Tensor, t: Tensor) -> Tensor:
        u, c = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return u + cfg_scale * (c - u)

    return fn
