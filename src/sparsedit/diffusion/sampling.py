"""Class-conditional generation with any sparsedit model: noise -> samples -> images.

Glue between a model (``forward``/``forward_with_cfg``), the samplers (:mod:`sparsedit.diffusion.samplers`)
and decoding (:mod:`sparsedit.encoders.vae`). All randomness comes from one CPU generator seeded with
``seed``, so a run is bit-reproducible on CPU and the initial noise is the same on every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.diffusion.samplers import sample
from sparsedit.errors import SparseditError


def parse_labels(labels: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    y = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels, dtype=torch.long)
    if y.ndim != 1 or len(y) == 0:
        raise SparseditError("give at least one class label, e.g. --class-labels 207 360 387")
    bad = [int(v) for v in y if not 0 <= int(v) < num_classes]
    if bad:
        raise SparseditError(f"class label(s) {bad} outside [0, {num_classes}); this model has {num_classes} classes")
    return y


def sample_batch(
    model: nn.Module,
    shape: Sequence[int],
    model_kwargs: dict[str, Any],
    *,
    sampler: str,
    steps: int,
    eta: float,
    cfg_scale: float,
    cfg_mode: str,
    seed: int,
    device: str | torch.device,
    progress: bool,
) -> Tensor:
    """One sampling run of ``model`` from seeded noise of ``shape`` (n, C, ...); returns n samples.

    The set-up every ``generate*`` shares. The noise comes from a CPU generator seeded with ``seed``
    (the same on every device) that also drives the sampler. With guidance (``cfg_scale != 1``) the
    batch is doubled with shared noise and the model runs through ``forward_with_cfg``: the caller
    puts the 2n conditions (or the null-condition kwargs) into ``model_kwargs``. A low-precision
    model sees its own dtype while the sampler state stays float32.
    """
    n = shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(*shape, generator=gen).to(device)  # (n, C, ...)
    model_fn: Any = model
    guided = cfg_scale != 1.0
    if guided:
        z = torch.cat([z, z])  # both halves share noise; forward_with_cfg uses the first half
        model_fn = partial(model.forward_with_cfg, cfg_scale=cfg_scale, cfg_mode=cfg_mode)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:  # the sampler state stays float32; the model sees its own dtype
        low_precision_fn = model_fn
        model_fn = lambda x, t, **kw: low_precision_fn(x.to(dtype), t, **kw).float()  # noqa: E731
    out = sample(
        model_fn, tuple(z.shape), sampler=sampler, steps=steps, eta=eta, noise=z, generator=gen, device=device,
        model_kwargs=model_kwargs, progress=progress, learn_sigma=model.config.learn_sigma,
    )
    if not torch.isfinite(out).all():  # weights with NaN/inf, or a diverged fine-tune: never a silent garbage image
        raise SparseditError("the samples hold NaN or infinite values: the model's weights are not finite (a diverged "
                             "fine-tune?); sample an earlier checkpoint")
    return out[:n] if guided else out


@torch.no_grad()
def generate(
    model: nn.Module,
    labels: Sequence[int] | Tensor,
    *,
    sampler: str = "ddpm",
    steps: int = 250,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    cfg_mode: str = "first3",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Tensor:
    """Sample one latent (or image) per label; returns (B, C, H, W) in the model's data space."""
    cfg = model.config
    y = parse_labels(labels, cfg.num_classes).to(device)
    n = len(y)
    if cfg_scale != 1.0:
        if cfg.class_dropout_prob <= 0:
            raise SparseditError("this model was trained without a null class, so --cfg-scale must be 1")
        y = torch.cat([y, torch.full_like(y, cfg.num_classes)])  # the second half gets the null class
    h, w = cfg.latent_hw
    return sample_batch(
        model, (n, cfg.in_channels, h, w), {"y": y}, sampler=sampler, steps=steps, eta=eta, cfg_scale=cfg_scale,
        cfg_mode=cfg_mode, seed=seed, device=device, progress=progress,
    )


def to_images(model: nn.Module, samples: Tensor, vae: nn.Module | None = None,
              scaling: tuple[float, float] | None = None) -> Tensor:
    """Model-space samples -> images in [-1, 1] (decoded with ``vae`` for latent models; ``scaling``: the model's
    (scale, shift) of the VAE's latents, default the SD VAE's 0.18215 and no shift)."""
    if model.config.data_space == "pixel":
        return samples.clamp(-1, 1)
    from sparsedit.encoders.vae import LATENT_SCALE, decode_latents, load_vae

    scale, shift = scaling or (LATENT_SCALE, 0.0)
    return decode_latents(vae if vae is not None else load_vae(None), samples, scale=scale, shift=shift)
