"""Latents <-> images with a local Stable Diffusion VAE (diffusers ``AutoencoderKL``).

DiT was trained on latents of ``stabilityai/sd-vae-ft-ema`` (or ``-mse``) scaled by 0.18215.
Nothing is downloaded: the user passes a local directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError, quiet_logs

LATENT_SCALE = 0.18215
#: Image pixels per latent pixel of the SD VAE (also PixArt's and Latte's): 256 px <-> 32 latent px.
VAE_DOWNSAMPLE = 8
VAE_HELP = (
    "download stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse) once, e.g. "
    "`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema`, then pass --vae sd-vae-ft-ema"
)


def load_vae(path: str | Path | None, device: str | torch.device = "cpu", latent_channels: int | None = None,
             vae_class: str = "AutoencoderKL", help_text: str = VAE_HELP) -> nn.Module:
    """Load a diffusers VAE (``vae_class``: ``AutoencoderKL``, or ``AutoencoderKLWan`` for Wan) from a local directory
    (``config.json`` + weights).

    ``latent_channels``: what the model that uses it takes; another VAE is refused here rather than failing
    inside a convolution after sampling.
    """
    if path is None:
        raise SparseditError(f"this model works on VAE latents and needs --vae PATH; {help_text}")
    path = Path(path)
    if not (path / "config.json").exists():
        raise SparseditError(f"{path} is not a VAE directory (no config.json); {help_text}")
    import diffusers

    try:
        from diffusers.utils import logging as diffusers_logging

        with quiet_logs(diffusers_logging):  # its advice to install accelerate is noise on every load
            vae = getattr(diffusers, vae_class).from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise SparseditError(f"cannot load the VAE in {path} ({str(err).splitlines()[0][:160]}); {help_text}") from None
    made = getattr(vae.config, "latent_channels", None) or getattr(vae.config, "z_dim", None)  # AutoencoderKLWan: z_dim
    if latent_channels is not None and made != latent_channels:
        raise SparseditError(f"the VAE in {path} makes {made}-channel latents, the model takes {latent_channels}; pass "
                             "the VAE the model was trained with")
    return vae.to(device).eval()


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor, batch_size: int = 8, scale: float = LATENT_SCALE,
                   shift: float = 0.0) -> Tensor:
    """(B, C, h, w) model latents ``(VAE latent - shift) * scale`` -> (B, 3, 8h, 8w) images in [-1, 1]."""
    vae_dtype = next(vae.parameters()).dtype
    outs = [vae.decode((z / scale + shift).to(vae_dtype)).sample.float() for z in latents.split(batch_size)]
    return torch.cat(outs).clamp(-1, 1)


@torch.no_grad()
def encode_images(vae: nn.Module, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """(B, 3, H, W) images in [-1, 1] -> scaled latents (the posterior mean unless ``sample``)."""
    dist = vae.encode(images).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * LATENT_SCALE
