"""Samplers for the DiT diffusion: ancestral DDPM, DDIM and DPM-Solver++ (2nd order).

Every sampler calls ``model_fn(x, t, **model_kwargs)`` once per step with a batch in which all items
share one timestep, and ``t`` always holds *original* training indices in ``[0, num_train_timesteps)``.
A model may therefore choose per-call behaviour (e.g. its token grid) from ``t[0]``.

All randomness (initial noise and per-step noise) comes from ``generator``: two runs with equally seeded
generators give bitwise-identical results on the CPU.

DDPM and DDIM follow facebookresearch/DiT (``p_sample`` / ``ddim_sample`` in
https://github.com/facebookresearch/DiT/blob/main/diffusion/gaussian_diffusion.py), re-implemented here;
DPM-Solver++ is diffusers' ``DPMSolverMultistepScheduler``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from sparsedit.diffusion.process import GaussianDiffusion, ModelFn, create_diffusion, space_timesteps
from sparsedit.errors import SparseditError

SAMPLERS = ("ddpm", "ddim", "dpm++")

Callback = Callable[[int, int, torch.Tensor], None]

__all__ = ["SAMPLERS", "sample"]


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (on the generator's device), then moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def _call_model(model_fn: ModelFn, x: torch.Tensor, t_original: int, model_kwargs: dict) -> torch.Tensor:
    t = torch.full((x.shape[0],), t_original, dtype=torch.long, device=x.device)
    return model_fn(x, t, **model_kwargs).to(x.dtype)


def _ddpm_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    index: int,
    generator: torch.Generator | None,
    clip_denoised: bool,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1}; no noise is added at the last step (``index == 0``)."""
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    if index == 0:
        return out["mean"]
    noise = _randn(x.shape, generator, x.device, x.dtype)
    return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise


def _ddim_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    index: int,
    eta: float,
    generator: torch.Generator | None,
    clip_denoised: bool,
) -> torch.Tensor:
    """One DDIM step; ``eta = 0`` is deterministic, ``eta = 1`` matches DDPM's posterior variance."""
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    # Re-derive epsilon from the (possibly clipped) x0 prediction, as DiT does.
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    acp = diffusion._extract(diffusion.alphas_cumprod, t, x)
    acp_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1.0 - acp_prev) / (1.0 - acp)) * torch.sqrt(1.0 - acp / acp_prev)
    mean = out["pred_xstart"] * torch.sqrt(acp_prev) + torch.sqrt(1.0 - acp_prev - sigma**2) * eps
    if index == 0 or eta == 0:
        return mean
    return mean + sigma * _randn(x.shape, generator, x.device, x.dtype)


def _is_full_schedule(diffusion: GaussianDiffusion) -> bool:
    return diffusion.timestep_map == list(range(diffusion.num_timesteps))


def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int = 250,
    eta: float = 0.0,
    diffusion: GaussianDiffusion | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    model_kwargs: dict | None = None,
    progress: bool = True,
    num_train_timesteps: int = 1000,
    learn_sigma: bool = True,
    clip_denoised: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Generate samples of ``shape`` (``(B, C, ...)``) by running the reverse diffusion.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)``; ``t`` is a LongTensor of original indices, all equal.
        shape: shape of the sample batch; channel dimension is ``shape[1]``.
        sampler: ``"ddpm"`` (ancestral, ``steps`` evenly respaced steps), ``"ddim"`` (respaced with
            ``"ddim{steps}"``, noise scale ``eta``) or ``"dpm++"`` (diffusers' DPM-Solver++ 2M).
        steps: number of sampling steps.
        eta: DDIM noise scale (``0`` = deterministic); the other samplers refuse a non-zero one.
        diffusion: the training diffusion (full schedule). Defaults to
            ``create_diffusion(None, learn_sigma, num_train_timesteps)``. When given, its ``learn_sigma``
            is used and ``learn_sigma`` / ``num_train_timesteps`` are ignored. DDPM/DDIM respace it to
            ``steps``; DPM++ needs it un-respaced.
        noise: initial ``x_T``; drawn from ``generator`` when ``None``.
        generator: source of all randomness.
        device: where sampling runs; defaults to ``noise.device`` or the CPU.
        model_kwargs: extra keyword arguments for ``model_fn`` (e.g. class labels).
        progress: show a tqdm progress bar.
        clip_denoised: clamp the x0 prediction to ``[-1, 1]`` (DDPM/DDIM only; DiT samples latents
            and does not clip).
        callback: ``callback(step_index, t_original, x)`` called after each step with the updated ``x``.

    Returns:
        The final sample ``x_0`` (float32 unless ``noise`` has another dtype).
    """
    if sampler not in SAMPLERS:
        raise SparseditError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise SparseditError(f"steps must be a positive integer, got {steps!r}; use e.g. 50 or 250.")
    if eta < 0:
        raise SparseditError(f"eta must be >= 0, got {eta}; use 0 for deterministic DDIM or 1 for DDPM-like noise.")
    if eta and sampler != "ddim":
        raise SparseditError(f"eta (--eta) is the DDIM noise scale; the {sampler} sampler has none: drop it or use "
                             "--sampler ddim")
    if model_kwargs is None:
        model_kwargs = {}
    if diffusion is None:
        diffusion = create_diffusion(None, learn_sigma=learn_sigma, num_train_timesteps=num_train_timesteps)
    if device is None:
        device = noise.device if noise is not None else torch.device("cpu")
    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise SparseditError(f"sample shape must be (batch, channels, ...), got {shape}; add the missing dims.")

    if noise is None:
        x = _randn(shape, generator, device, torch.float32)
    else:
        if tuple(noise.shape) != shape:
            raise SparseditError(f"noise has shape {tuple(noise.shape)} but shape is {shape}; make them match.")
        x = noise.to(device)

    if sampler == "dpm++":
        return _sample_dpmpp(model_fn, x, diffusion, steps, generator, model_kwargs, progress, callback)

    spec = f"ddim{steps}" if sampler == "ddim" else steps
    respaced = diffusion.respace(space_timesteps(diffusion.num_timesteps, spec))
    indices = list(range(respaced.num_timesteps))[::-1]
    with torch.no_grad():
        for step_index, index in enumerate(tqdm(indices, desc=sampler, disable=not progress)):
            t_original = respaced.timestep_map[index]
            t = torch.full((shape[0],), index, dtype=torch.long)
            model_output = _call_model(model_fn, x, t_original, model_kwargs)
            if sampler == "ddpm":
                x = _ddpm_step(respaced, model_output, x, t, index, generator, clip_denoised)
            else:
                x = _ddim_step(respaced, model_output, x, t, index, eta, generator, clip_denoised)
            if callback is not None:
                callback(step_index, t_original, x)
    return x


def _sample_dpmpp(
    model_fn: ModelFn,
    x: torch.Tensor,
    diffusion: GaussianDiffusion,
    steps: int,
    generator: torch.Generator | None,
    model_kwargs: dict,
    progress: bool,
    callback: Callback | None,
) -> torch.Tensor:
    """DPM-Solver++ (2M) through diffusers, fed with the epsilon half of the model output."""
    from diffusers import DPMSolverMultistepScheduler  # slow import, only needed here

    if not _is_full_schedule(diffusion):
        raise SparseditError(
            "dpm++ needs the full training schedule but got a respaced diffusion; pass create_diffusion() "
            "and choose the count with steps=."
        )
    if steps > diffusion.num_timesteps:
        raise SparseditError(
            f"steps={steps} exceeds the {diffusion.num_timesteps} training steps; use at most that many."
        )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps,
        beta_schedule="linear",
        trained_betas=diffusion.betas.tolist(),  # for the default schedule: linspace(1e-4, 0.02, 1000)
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for step_index, timestep in enumerate(tqdm(scheduler.timesteps, desc="dpm++", disable=not progress)):
            t_original = int(timestep)
            model_output = _call_model(model_fn, x, t_original, model_kwargs)
            eps, _ = diffusion.split_model_output(model_output, x)
            x = scheduler.step(eps, timestep, x, generator=generator).prev_sample
            if callback is not None:
                callback(step_index, t_original, x)
    return x
