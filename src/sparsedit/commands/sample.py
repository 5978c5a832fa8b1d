"""``sparsedit sample``: generate an image grid from any checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from sparsedit.commands.common import add_device_arg, add_model_args, add_sampling_args, check_device, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample an image grid from a DiT / PixArt / Latte checkpoint (dense or sparse)",
                       description="Sample one image per class label (DiT, class-conditional Latte) or per caption "
                       "(PixArt, text Latte: --prompt-embeds) and save them as a PNG grid; videos are written as "
                       "a PNG strip, one row per video.")
    add_model_args(p)
    p.add_argument("--class-labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                   help="one image per label (default: the 8 classes of the DiT sample grid)")
    add_sampling_args(p, cfg_scale=4.0, cfg_scale_help="classifier-free guidance scale (1 = off)")
    p.add_argument("--prompt-embeds", metavar="FILE", default=None,
                   help="text models: a safetensors file with 'prompt_embeds' (N, L, C) T5 embeddings and optional "
                   "'prompt_mask' (N, L); the T5 encoder is not part of sparsedit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, metavar="PATH", help="local AutoencoderKL directory (latent models only)")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device_arg(p)
    p.set_defaults(func=run)


def _prompt_embeds(path: str | None) -> tuple[Any, Any]:
    from sparsedit.checkpoint import read_safetensors
    from sparsedit.errors import SparseditError

    if path is None:
        raise SparseditError("this is a text-conditional model: pass --prompt-embeds FILE.safetensors holding "
                             "'prompt_embeds' (N, L, C) from its T5 encoder (and optionally 'prompt_mask')")
    tensors = read_safetensors(Path(path))
    if "prompt_embeds" not in tensors:
        raise SparseditError(f"{path} has no 'prompt_embeds' tensor (found {', '.join(sorted(tensors))})")
    return tensors["prompt_embeds"], tensors.get("prompt_mask")


def _decode(model: Any, samples: Any, vae: Any) -> Any:
    """Model-space samples -> images in [-1, 1]; videos (B, C, F, H, W) are decoded frame by frame."""
    from sparsedit.sampling import to_images

    if samples.ndim == 5:
        b, c, f, h, w = samples.shape
        frames = to_images(model, samples.transpose(1, 2).reshape(b * f, c, h, w), vae)
        return frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2)
    return to_images(model, samples, vae)


def run(args: argparse.Namespace) -> int:
    from sparsedit.convert import load_model
    from sparsedit.images import save_grid
    from sparsedit.latte import Latte, generate_latte, save_video_strip
    from sparsedit.pixart import PixArt, generate_pixart
    from sparsedit.sampling import generate
    from sparsedit.vae import load_vae

    device = check_device(args.device)
    model = load_model(args.ckpt, model=args.model, image_size=args.image_size, device=device)
    # Fail on a missing VAE or prompt file before spending minutes sampling.
    vae = load_vae(args.vae, device) if model.config.data_space == "latent" else None
    common = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale, cfg_mode=args.cfg_mode,
                  seed=args.seed, device=device, progress=not args.no_progress)
    start = time.perf_counter()
    if isinstance(model, PixArt):
        embeds, mask = _prompt_embeds(args.prompt_embeds)
        samples = generate_pixart(model, embeds.to(device), None if mask is None else mask.to(device), **common)
    elif isinstance(model, Latte):
        if model.config.conditioning == "text":
            embeds, mask = _prompt_embeds(args.prompt_embeds)
            samples = generate_latte(model, embeds.to(device), text_mask=None if mask is None else mask.to(device),
                                     **common)
        else:
            samples = generate_latte(model, torch.tensor(args.class_labels, device=device), **common)
    else:
        samples = generate(model, args.class_labels, **common)
    images = _decode(model, samples, vae)
    path = save_video_strip(images, args.out) if images.ndim == 5 else save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {path} ({len(images)} {'videos' if images.ndim == 5 else 'images'}, {args.sampler} {args.steps} "
          f"steps, cfg {args.cfg_scale:g}, seed {args.seed}, {time.perf_counter() - start:.1f}s)")
    return 0
