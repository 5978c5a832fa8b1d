"""The diffusion process, its samplers and sampling helpers, apart from the models (which know nothing of diffusion)."""

from __future__ import annotations

from sparsedit.diffusion.process import (
    GaussianDiffusion,
    ModelFn,
    approx_standard_normal_cdf,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    mean_flat,
    normal_kl,
    space_timesteps,
)

__all__ = [
    "GaussianDiffusion",
    "ModelFn",
    "approx_standard_normal_cdf",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
