"""Sampling a Latte / SparseLatte and writing its videos: a frame strip (PNG) or an animated GIF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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


def save_video_strip(videos: Tensor, path: str | Path) -> Path:
    """Write (B, C, F, H, W) videos in [-1, 1] (C = 1 or 3) as one PNG: one row per video, frames left to right."""
    from sparsedit.core.images import save_grid

    b, c, f, hh, ww = videos.shape
    frames = videos.transpose(1, 2).reshape(b * f, c, hh, ww)  # (B*F, C, H, W), video-major
    return save_grid(frames, path, nrow=f)


def save_video_gif(videos: Tensor, path: str | Path, fps: int = 8, nrow: int | None = None) -> Path:
    """Write a (C, F, H, W) video or (B, C, F, H, W) videos in [-1, 1] as one animated GIF (Pillow), atomically.

    Several videos play side by side: each GIF frame is the grid (``nrow`` per row) of the videos' frame.
    """
    from PIL import Image

    from sparsedit.core.checkpoint import atomic_write
    from sparsedit.core.images import make_grid

    if videos.ndim == 4:
        videos = videos[None]
    padding = 0 if videos.shape[0] == 1 else 2
    grids = [make_grid(videos[:, :, f], nrow, padding) for f in range(videos.shape[2])]  # F x (H', W', C)
    frames = [Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g) for g in grids]
    path = Path(path)
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=max(1, round(1000 / fps)), loop=0))
    return path
