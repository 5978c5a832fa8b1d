"""Sampling a PixArt / SparsePixArt from caption embeddings (guidance against the null caption).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparsedit.families.pixart.model import PixArt, size_conditions


@torch.no_grad()
def generate_pixart(
    model: PixArt,
    prompt_embeds: Tensor,
    prompt_mask: Tensor | None = None,
    null_embeds: Tensor | None = None,
    *,
    null_mask: Tensor | None = None,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    sampler: str = "ddpm",
    steps: int = 100,
    eta: float = 0.0,
    cfg_scale: float = 4.5,
    cfg_mode: str = "first3",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Sample one latent per caption from precomputed T5 embeddings; returns (B, C, H, W) latents.

    ``prompt_embeds`` (B, L, 4096) and ``prompt_mask`` (B, L) come from the T5 encoder (not part of
    sparsedit). Guidance (``cfg_scale != 1``) uses ``null_embeds`` or the model's stored null
    caption (:meth:`PixArt.forward_with_cfg`). A 1024-MS model without ``added_cond_kwargs`` gets the
    size conditions of its own latent size (:func:`size_conditions`). Sampling runs :func:`sparsedit.diffusion.samplers.sample`, whose
    model calls receive the original timesteps, so a SparsePixArt picks its sparse grid per step.
    All noise comes from a CPU generator seeded with ``seed``.
    """
    from sparsedit.diffusion.sampling import sample_batch

    cfg = model.config
    if cfg.use_additional_conditions and added_cond_kwargs is None:
        added_cond_kwargs = size_conditions(cfg.latent_hw, prompt_embeds.shape[0], device)
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": prompt_embeds.to(device),
        "encoder_attention_mask": None if prompt_mask is None else prompt_mask.to(device),
        "added_cond_kwargs": added_cond_kwargs,
    }
    if cfg_scale != 1.0:
        kwargs["null_embeds"] = None if null_embeds is None else null_embeds.to(device)
        kwargs["null_attention_mask"] = None if null_mask is None else null_mask.to(device)
    h, w = cfg.latent_hw
    return sample_batch(
        model, (prompt_embeds.shape[0], cfg.in_channels, h, w), kwargs, sampler=sampler, steps=steps, eta=eta,
        cfg_scale=cfg_scale, cfg_mode=cfg_mode, seed=seed, device=device, progress=progress,
    )
