"""``sparsedit sample``: generate an image grid (or videos) from any checkpoint.

Text models take prompts through their local text encoders (``--prompt ... --t5 DIR`` for PixArt / Latte,
``--pipeline DIR`` for SD3 / FLUX.1; ``Family.encode_prompts``) or precomputed embeddings (``--prompt-embeds FILE``,
:mod:`sparsedit.core.prompts`). Videos go to a PNG strip, an animated GIF
(``--out *.gif``) or an MP4 (``--out *.mp4``, with PyAV).
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
    positive_float,
    positive_int,
    seed,
    vae_for,
)
from sparsedit.core.checkpoint import check_output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample an image grid from a DiT / PixArt / Latte / SD3 / FLUX checkpoint "
                       "(dense or sparse)",
                       description="Sample one image per class label (DiT, class-conditional Latte) or per caption "
                       "(PixArt, text Latte: --prompt with a local --t5; SD3, FLUX.1: --prompt with the local --pipeline "
                       "folder, whose text encoders and VAE are used; or --prompt-embeds) and save them as a PNG "
                       "grid; videos are written as a PNG strip (one row per video) or, with --out *.gif / *.mp4, as an "
                       "animated GIF / H.264 MP4 playing the videos side by side.")
    add_model_args(p)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="one image per label (default: for 1000-class models the 8 classes of the DiT sample grid, "
                        "otherwise the model's first 8 classes)")
    add_sampling_args(p, cfg_scale=None, family_defaults=True,
                      cfg_scale_help="classifier-free guidance scale (1 = off; default 4, SD3 7, FLUX.1 1)")
    p.add_argument("--guidance", type=positive_float, default=None,
                   help="FLUX.1-dev: the distilled guidance scale fed to its guidance embedding (default 3.5)")
    p.add_argument("--prompt", nargs="+", default=None, metavar="TEXT",
                   help="text models: one image / video per prompt, encoded by --t5 (PixArt, Latte) or --pipeline "
                   "(SD3, FLUX.1)")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="with --prompt and guidance: the unconditional caption when the model stores no null "
                   "caption (default: the empty prompt, as diffusers' pipelines)")
    p.add_argument("--t5", metavar="DIR", default=None,
                   help="PixArt / Latte: local T5 for --prompt: a diffusers PixArt pipeline directory (text_encoder/ + "
                   "tokenizer/) or a T5EncoderModel directory with its tokenizer; sparsedit downloads nothing")
    p.add_argument("--pipeline", metavar="DIR", default=None,
                   help="SD3 / FLUX.1: the model's local diffusers pipeline folder; its text encoders encode --prompt "
                   "and its vae/ decodes (unless --vae). Default: the checkpoint itself when it is a pipeline folder")
    p.add_argument("--prompt-embeds", metavar="FILE", default=None,
                   help="text models, instead of --prompt: a safetensors file of encoded prompts (`sparsedit "
                   "encode-prompts` writes one): 'prompt_embeds' (N, L, C), optional 'prompt_mask' (N, L), "
                   "'pooled_embeds' (N, P) for SD3 / FLUX.1 and, for guidance, 'negative_embeds' (1 or N, L, C) / "
                   "'negative_mask' / 'negative_pooled_embeds'")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--vae", default=None, metavar="PATH", help="local AutoencoderKL directory (latent models only)")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
    p.add_argument("--out", default="samples.png",
                   help="output PNG (default samples.png); for videos a .gif name writes an animated GIF and a .mp4 "
                   "name an H.264 video (needs PyAV: pip install av)")
    p.add_argument("--fps", type=positive_int, default=None,
                   help="frames per second of a GIF / MP4 (default: the model's, 8 for Latte)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device_arg(p)
    p.set_defaults(func=run)


def encoder_path(args: argparse.Namespace, family: Any) -> str | None:
    """Where the family's text encoder is: ``--t5`` or ``--pipeline`` (whichever the family reads; the other is
    refused), for ``--pipeline`` defaulting to the checkpoint when that is a pipeline folder."""
    from sparsedit.errors import SparseditError

    flags = {"--t5": args.t5, "--pipeline": args.pipeline}
    other = [flag for flag, value in flags.items() if value is not None and flag != family.prompt_flag]
    if other:
        raise SparseditError(f"{other[0]} is not read by this model; its prompts are encoded by {family.prompt_flag} DIR")
    path = flags[family.prompt_flag]
    if path is None and family.prompt_flag == "--pipeline" and (Path(args.ckpt) / "model_index.json").is_file():
        path = args.ckpt
    return path


def _captions(args: argparse.Namespace, model: Any, family: Any, path: str | None, device: Any) -> dict[str, Any]:
    """The ``text`` dict of ``family.generate``: prompts encoded by the local encoder ``path``, or --prompt-embeds."""
    from sparsedit.core.prompts import read_prompt_embeds
    from sparsedit.errors import SparseditError

    if args.prompt is not None and args.prompt_embeds is not None:
        raise SparseditError(f"give --prompt (with {family.prompt_flag}) or --prompt-embeds, not both")
    guided = args.cfg_scale != 1.0
    if args.prompt is not None:
        if path is None:
            what, where = (("T5 encoder", "a diffusers PixArt pipeline directory or a T5 model directory")
                           if family.prompt_flag == "--t5" else ("pipeline", "the model's diffusers pipeline folder"))
            raise SparseditError(f"--prompt needs a local {what}: add {family.prompt_flag} DIR ({where}), or pass "
                                 "--prompt-embeds")
        return family.encode_prompts(model, path, args.prompt, args.negative_prompt, guided, device)
    if args.prompt_embeds is None:
        raise SparseditError(f"this is a text-conditional model: pass --prompt TEXT ... with {family.prompt_flag} DIR, "
                             "or --prompt-embeds FILE.safetensors (`sparsedit encode-prompts` writes one)")
    text = read_prompt_embeds(args.prompt_embeds, model.config.caption_channels,
                              model.config.pooled_channels if family.pooled_text else None)
    if "null_embeds" in text and not guided:
        raise SparseditError(f"{args.prompt_embeds} holds negative_embeds, which only guidance uses; set --cfg-scale or "
                             "drop them")
    return text


def run(args: argparse.Namespace) -> int:
    from sparsedit.diffusion.sampling import parse_labels
    from sparsedit.errors import SparseditError
    from sparsedit.eval.analyze import default_labels
    from sparsedit.families import family_of

    # Refuse a path we would clobber or mislabel before spending minutes sampling.
    out = check_output_file(args.out, "--out", (".png", ".gif", ".mp4"), args.overwrite)
    device = check_device(args.device)
    model = load_cli_model(args.ckpt, args, device=device)
    family = family_of(model)
    if out.suffix.lower() not in family.sample_suffixes:
        raise SparseditError(f"--out {out}: {out.suffix.lower()} is for video models and this {type(model).__name__} "
                             "makes images; use a .png name")
    args.sampler = args.sampler or family.default_sampling[0]
    args.steps = args.steps or family.default_sampling[1]
    args.cfg_scale = family.default_cfg_scale if args.cfg_scale is None else args.cfg_scale
    flow = "euler" in family.samplers
    if flow and args.sampler != "euler":
        raise SparseditError(f"a {type(model).__name__} is a flow-matching model: it samples with euler; drop --sampler "
                             f"{args.sampler}")
    if not flow and args.sampler == "euler":
        raise SparseditError(f"--sampler euler is the flow-matching sampler of SD3 / FLUX.1; a {type(model).__name__} samples with "
                             "ddpm, ddim or dpm++")
    text = family.text_conditioned
    text_flags = [flag for flag, value in (("--prompt", args.prompt), ("--prompt-embeds", args.prompt_embeds),
                                           ("--negative-prompt", args.negative_prompt), ("--t5", args.t5),
                                           ("--pipeline", args.pipeline)) if value is not None]
    if not text and text_flags:
        raise SparseditError(f"this {type(model).__name__} is class-conditional: drop {' / '.join(text_flags)} "
                             "and pass --class-labels")
    if text and args.class_labels is not None:
        raise SparseditError(f"this {type(model).__name__} is text-conditional: drop --class-labels and pass --prompt "
                             "or --prompt-embeds")
    if args.guidance is not None and not getattr(model.config, "guidance_embeds", False):
        raise SparseditError(f"--guidance feeds FLUX.1-dev's guidance embedding; this {type(model).__name__} has none: "
                             "drop it (use --cfg-scale)")
    path = encoder_path(args, family) if text else None
    if text and args.prompt is None and (args.negative_prompt is not None or args.t5 is not None):
        raise SparseditError(f"--negative-prompt / {family.prompt_flag} go with --prompt (the encoder encodes the "
                             "prompts); with --prompt-embeds put 'negative_embeds' in the file instead")
    if args.fps is not None and out.suffix.lower() not in (".gif", ".mp4"):
        raise SparseditError(f"--fps sets the frame rate of a GIF or MP4; --out {out} is a PNG: drop --fps or write a "
                             ".gif / .mp4")
    if out.suffix.lower() == ".mp4":
        from sparsedit.core.video import MP4_HELP

        try:  # refused before minutes of sampling, not after
            import av  # noqa: F401
        except ImportError:
            raise SparseditError(MP4_HELP) from None
    if args.cfg_scale != 1.0:
        family.check_guidance(f"this {type(model).__name__}")
    # Fail on a missing or needless VAE before spending minutes sampling.
    vae_path = args.vae if args.vae is not None else family.default_vae_dir(path)
    vae = vae_for(model, None if vae_path is None else str(vae_path), device)
    common = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale, cfg_mode=args.cfg_mode,
                  seed=args.seed, device=device, progress=not args.no_progress)
    start = time.perf_counter()
    if not text:
        if args.class_labels is None:
            args.class_labels = default_labels(getattr(model.config, "num_classes", 0), count=8)
        if model.config.num_classes:  # out of range: refused before sampling (not an IndexError inside it)
            parse_labels(args.class_labels, model.config.num_classes)
        samples = family.generate(model, labels=args.class_labels, **common)
    else:
        captions = {k: v.to(device) for k, v in _captions(args, model, family, path, device).items()}
        if args.guidance is not None:
            captions["guidance"] = args.guidance
        samples = family.generate(model, text=captions, **common)
    images = family.decode_samples(model, samples, vae)  # in [-1, 1]
    path_out = family.write_samples(images, out, args.nrow, args.fps)
    print(f"wrote {path_out} ({len(images)} {'videos' if images.ndim == 5 else 'images'}, {args.sampler} {args.steps} "
          f"steps, cfg {args.cfg_scale:g}, seed {args.seed}, {time.perf_counter() - start:.1f}s)")
    return 0
