"""``sparsedit sample``: generate an image grid (or videos) from any checkpoint.

Text models take prompts through a local T5 (``--prompt ... --t5 DIR``, :mod:`sparsedit.encoders.text`) or
precomputed embeddings (``--prompt-embeds FILE``). Videos go to a PNG strip, or an animated GIF when
``--out`` ends in ``.gif``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sparsedit.cli.common import (
    add_device_arg,
    add_model_args,
    add_sampling_args,
    check_device,
    load_cli_model,
    positive_int,
    seed,
    vae_for,
)
from sparsedit.core.checkpoint import check_output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample an image grid from a DiT / PixArt / Latte checkpoint (dense or sparse)",
                       description="Sample one image per class label (DiT, class-conditional Latte) or per caption "
                       "(PixArt, text Latte: --prompt with a local --t5, or --prompt-embeds) and save them as a PNG "
                       "grid; videos are written as a PNG strip (one row per video) or, with --out *.gif, as an "
                       "animated GIF playing the videos side by side.")
    add_model_args(p)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="one image per label (default: for 1000-class models the 8 classes of the DiT sample grid, "
                        "otherwise the model's first 8 classes)")
    add_sampling_args(p, cfg_scale=4.0, cfg_scale_help="classifier-free guidance scale (1 = off)")
    p.add_argument("--prompt", nargs="+", default=None, metavar="TEXT",
                   help="text models: one image / video per prompt, encoded with the local T5 given by --t5")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="with --prompt and guidance: the unconditional caption when the model stores no null "
                   "caption (default: the empty prompt, as diffusers' PixArtAlphaPipeline)")
    p.add_argument("--t5", metavar="DIR", default=None,
                   help="local T5 for --prompt: a diffusers PixArt pipeline directory (text_encoder/ + tokenizer/) "
                   "or a T5EncoderModel directory with its tokenizer; sparsedit downloads nothing")
    p.add_argument("--prompt-embeds", metavar="FILE", default=None,
                   help="text models, instead of --prompt: a safetensors file with 'prompt_embeds' (N, L, C) T5 "
                   "embeddings, optional 'prompt_mask' (N, L) and, for guidance with a model that stores no null "
                   "caption, 'negative_embeds' (1 or N, L, C) / 'negative_mask'")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--vae", default=None, metavar="PATH", help="local AutoencoderKL directory (latent models only)")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
    p.add_argument("--out", default="samples.png",
                   help="output PNG (default samples.png); for videos a .gif name writes an animated GIF")
    p.add_argument("--fps", type=positive_int, default=None, help="frames per second of a GIF (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device_arg(p)
    p.set_defaults(func=run)


Captions = tuple[Any, Any, Any, Any]  # (embeds, mask, negative embeds or None, negative mask or None)


def _captions(args: argparse.Namespace, model: Any, device: Any) -> Captions:
    """The text conditioning of a text model, from --prompt + --t5 or from --prompt-embeds."""
    from sparsedit.core.checkpoint import read_safetensors
    from sparsedit.errors import SparseditError

    if args.prompt is not None and args.prompt_embeds is not None:
        raise SparseditError("give --prompt (with --t5) or --prompt-embeds, not both")
    if args.prompt is not None:
        from sparsedit.encoders.text import T5Encoder

        if args.t5 is None:
            raise SparseditError("--prompt needs a local T5 encoder: add --t5 DIR (a diffusers PixArt pipeline "
                                 "directory or a T5 model directory), or pass --prompt-embeds")
        t5 = T5Encoder(args.t5, device)
        if t5.channels != model.config.caption_channels:
            raise SparseditError(f"the T5 at {args.t5} gives {t5.channels}-wide embeddings but the model takes "
                                 f"{model.config.caption_channels}; use the T5 the model was trained with")
        embeds, mask = t5(args.prompt)
        neg, neg_mask = None, None
        if args.cfg_scale != 1.0 and getattr(model.y_embedder, "y_embedding", None) is None:
            neg, neg_mask = t5([args.negative_prompt or ""], embeds.shape[1])
        return embeds, mask, neg, neg_mask
    if args.prompt_embeds is None:
        raise SparseditError("this is a text-conditional model: pass --prompt TEXT ... with --t5 DIR, or "
                             "--prompt-embeds FILE.safetensors holding 'prompt_embeds' (N, L, C)")
    tensors = read_safetensors(Path(args.prompt_embeds))
    if "prompt_embeds" not in tensors:
        raise SparseditError(f"{args.prompt_embeds} has no 'prompt_embeds' tensor (found {', '.join(sorted(tensors))})")
    embeds = tensors["prompt_embeds"]
    _check_embeds(args.prompt_embeds, "prompt_embeds", embeds, model.config.caption_channels)
    n, length = embeds.shape[:2]
    neg = tensors.get("negative_embeds")
    if neg is not None:
        _check_embeds(args.prompt_embeds, "negative_embeds", neg, model.config.caption_channels)
    for key, like in (("prompt_mask", embeds), ("negative_mask", neg)):
        mask = tensors.get(key)
        if mask is not None and (like is None or tuple(mask.shape) != tuple(like.shape[:2]) or mask.is_complex()
                                 or not ((mask == 0) | (mask == 1)).all() or not (mask == 1).any(dim=1).all()):
            raise SparseditError(f"{args.prompt_embeds}: '{key}' must be an (N, L) keep-mask of 0s and 1s matching its "
                                 f"embeddings, with at least one token kept per caption; got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
    unknown = sorted(set(tensors) - {"prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"})
    if unknown:
        raise SparseditError(f"{args.prompt_embeds} holds tensors sparsedit does not read ({', '.join(unknown)}); the "
                             "file takes prompt_embeds, prompt_mask, negative_embeds and negative_mask")
    if neg is not None and args.cfg_scale == 1:
        raise SparseditError(f"{args.prompt_embeds} holds negative_embeds, which only guidance uses; set --cfg-scale or "
                             "drop them")
    return embeds, tensors.get("prompt_mask"), neg, tensors.get("negative_mask")


def _check_embeds(path: str, key: str, embeds: Any, channels: int) -> None:
    """Caption embeddings are (N >= 1, L >= 1, channels) floats: anything else fails deep inside the model."""
    from sparsedit.errors import SparseditError

    if (embeds.ndim != 3 or embeds.shape[0] < 1 or embeds.shape[1] < 1 or embeds.shape[2] != channels
            or not embeds.is_floating_point()):
        raise SparseditError(f"{path}: '{key}' must be float (N, L, {channels}) T5 embeddings with N, L >= 1, got "
                             f"{embeds.dtype} {tuple(embeds.shape)}")


def _decode(model: Any, samples: Any, vae: Any) -> Any:
    """Model-space samples -> images in [-1, 1]; videos (B, C, F, H, W) are decoded frame by frame."""
    from sparsedit.diffusion.sampling import to_images

    if samples.ndim == 5:
        b, c, f, h, w = samples.shape
        frames = to_images(model, samples.transpose(1, 2).reshape(b * f, c, h, w), vae)
        return frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2)
    return to_images(model, samples, vae)


def run(args: argparse.Namespace) -> int:
    from sparsedit.diffusion.sampling import parse_labels
    from sparsedit.errors import SparseditError
    from sparsedit.eval.analyze import default_labels
    from sparsedit.families import family_of

    # Refuse a path we would clobber or mislabel before spending minutes sampling.
    out = check_output_file(args.out, "--out", (".png", ".gif"), args.overwrite)
    device = check_device(args.device)
    model = load_cli_model(args.ckpt, args, device=device)
    family = family_of(model)
    if out.suffix.lower() not in family.sample_suffixes:
        raise SparseditError(f"--out {out}: a GIF is for video models and this {type(model).__name__} makes images; "
                             "use a .png name")
    # Fail on a missing or needless VAE before spending minutes sampling.
    vae = vae_for(model, args.vae, device)
    common = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale, cfg_mode=args.cfg_mode,
                  seed=args.seed, device=device, progress=not args.no_progress)
    start = time.perf_counter()
    text = family.text_conditioned
    text_flags = [flag for flag, value in (("--prompt", args.prompt), ("--prompt-embeds", args.prompt_embeds),
                                           ("--negative-prompt", args.negative_prompt), ("--t5", args.t5))
                  if value is not None]
    if not text and text_flags:
        raise SparseditError(f"this {type(model).__name__} is class-conditional: drop {' / '.join(text_flags)} "
                             "and pass --class-labels")
    if text and args.class_labels is not None:
        raise SparseditError(f"this {type(model).__name__} is text-conditional: drop --class-labels and pass --prompt "
                             "or --prompt-embeds")
    prompt_only = [flag for flag, value in (("--negative-prompt", args.negative_prompt), ("--t5", args.t5))
                   if value is not None]
    if text and args.prompt is None and prompt_only:
        raise SparseditError(f"{' / '.join(prompt_only)} go(es) with --prompt (the T5 encodes the prompts); with "
                             "--prompt-embeds put 'negative_embeds' in the file instead")
    if args.fps is not None and out.suffix.lower() != ".gif":
        raise SparseditError(f"--fps sets the frame rate of a GIF; --out {out} is a PNG: drop --fps or write a .gif")
    if not text:
        if args.class_labels is None:
            args.class_labels = default_labels(getattr(model.config, "num_classes", 0), count=8)
        if model.config.num_classes:  # out of range: refused before sampling (not an IndexError inside it)
            parse_labels(args.class_labels, model.config.num_classes)
    if text:
        names = ("embeds", "mask", "null_embeds", "null_mask")
        captions = dict(zip(names, (None if v is None else v.to(device) for v in _captions(args, model, device)),
                            strict=True))
        samples = family.generate(model, text=captions, **common)
    else:
        samples = family.generate(model, labels=args.class_labels, **common)
    images = _decode(model, samples, vae)
    path = family.write_samples(images, out, args.nrow, args.fps)
    print(f"wrote {path} ({len(images)} {'videos' if images.ndim == 5 else 'images'}, {args.sampler} {args.steps} "
          f"steps, cfg {args.cfg_scale:g}, seed {args.seed}, {time.perf_counter() - start:.1f}s)")
    return 0
