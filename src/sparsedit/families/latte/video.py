"""Sampling a Latte / SparseLatte (its videos are written by :mod:`sparsedit.core.video`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparsedit.core.video import save_video_gif, save_video_strip  # noqa: F401  # their old home; users import them here
from sparsedit.errors import SparseditError
from sparsedit.families.latte.model import Latte


@torch.no_grad()
def generate_latte(
    model: Latte,
    labels_or_text_embeds: Tensor | None,
    *,
    num_videos: int | None = None,
    text_mask: Tensor | None = None,
    null_embeds: Tensor | None = None,
    num_frames: int | None = None,
    sampler: str = "ddpm",
    steps: int = 250,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    cfg_mode: str = "all",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Sample videos; returns (B, C, F, H, W) latents (pixels for a ``data_space="pixel"`` model).

    ``labels_or_text_embeds``: class labels (B,), T5 embeddings (B, L, C_text) (with ``text_mask``),
    or None for an unconditional model (then ``num_videos``). Guidance (``cfg_scale != 1``) uses the
    null class, or ``null_embeds`` for text; ``cfg_mode`` "all" guides every latent channel as the
    Latte release does. Runs :func:`sparsedit.diffusion.samplers.sample` (a SparseLatte picks its token set per
    step from the original timesteps); all noise comes from a CPU generator seeded with ``seed``.
    The release samples with 250 DDPM steps.
    """
    from sparsedit.diffusion.sampling import sample_batch

    cfg = model.config
    cond = labels_or_text_embeds
    n = num_videos if cond is None else cond.shape[0]
    if n is None:
        raise SparseditError("pass labels / text embeddings, or num_videos for an unconditional Latte")
    kwargs: dict[str, Any] = {"y": None if cond is None else cond.to(device)}
    if text_mask is not None:
        kwargs["encoder_attention_mask"] = text_mask.to(device)
    if cfg_scale != 1.0 and cfg.text:
        kwargs["null_embeds"] = None if null_embeds is None else null_embeds.to(device)
    h, w = cfg.latent_hw
    frames = cfg.num_frames if num_frames is None else num_frames
    return sample_batch(
        model, (n, cfg.in_channels, frames, h, w), kwargs, sampler=sampler, steps=steps, eta=eta,
        cfg_scale=cfg_scale, cfg_mode=cfg_mode, seed=seed, device=device, progress=progress,
    )
