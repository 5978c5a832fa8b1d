"""``sparsedit compare A B``: two models, same noise, several guidance values and seeds, a floor.

Class-conditional models (DiT, SparseDiT): scored next to a real floor (:mod:`sparsedit.eval.compare`). Caption models
(SD3, FLUX.1, PixArt) with ``--prompt-embeds``: B's images against A's on the same prompts and noise, next to A
against A with other noise (:mod:`sparsedit.eval.compare_text`). Video models (Latte / SparseLatte: class, unconditional
or, with ``--prompt-embeds``, text-to-video; Wan): B's videos against A's the same way, with FVDs given ``--i3d``
(:mod:`sparsedit.eval.compare_video`). Writes OUT/compare.json, OUT/compare.md and OUT/paired_*.png (videos: and
OUT/paired_*.gif) and prints the table; see docs/compare.md.
"""

from __future__ import annotations

import argparse

from sparsedit.cli.common import (
    add_device_arg,
    positive_float,
    positive_int,
    seed,
    threads,
)
from sparsedit.eval.compare import CompareSettings
from sparsedit.eval.compare_text import TextCompareSettings
from sparsedit.eval.compare_video_settings import DEFAULT_NUM_VIDEOS, VideoCompareSettings

DEFAULTS = CompareSettings()
TEXT_DEFAULTS = TextCompareSettings()
VIDEO_DEFAULTS = VideoCompareSettings()
# The class models' default scales, as one object: `args.cfg_scales is CLASS_SCALES` when --cfg-scales is not given
# (caption models then take their family's defaults).
CLASS_SCALES = list(DEFAULTS.cfg_scales)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sparsedit.diffusion.samplers import SAMPLERS
    from sparsedit.families.dit.model import CFG_MODES

    p = sub.add_parser(
        "compare", help="compare two models honestly: same noise, several guidance values and seeds, a floor",
        description=("Sample both models with identical noise at several guidance values and seeds. Class models "
                     "(DiT, SparseDiT): class-balanced labels, scored with the digits CNN or ADM's Inception metrics "
                     "next to a real-vs-real floor. Caption models (SD3, FLUX.1, PixArt) with --prompt-embeds: B's "
                     "images against A's on the same prompts and noise (PSNR, RMSE), next to the floor A vs A with "
                     "other noise. Video models (Latte, SparseLatte, Wan): B's videos against A's the same way (per-frame "
                     "PSNR, RMSE; FVD with --i3d). Reports means, seed spreads, cost and paired images or videos."),
    )
    p.add_argument("a", metavar="A", help="checkpoint of model A (e.g. the dense model): anything `sparsedit sample` loads")
    p.add_argument("b", metavar="B", help="checkpoint of model B (e.g. the sparse model made from A)")
    p.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"), default=None,
                   help="names in the report (default: the checkpoint folder names)")
    p.add_argument("--cfg-scales", nargs="+", type=positive_float, default=CLASS_SCALES, metavar="S",
                   help="classifier-free guidance scales, all reported side by side (class models: default 1 1.5 4; "
                        "SD3: 3.5 7; PixArt: 2 4; FLUX.1: 1 only; Latte: 1 4, text-to-video 2 4; Wan: 2.5 5; "
                        "1 = no guidance)")
    p.add_argument("--seeds", nargs="+", type=seed, default=list(DEFAULTS.seeds), metavar="SEED",
                   help="seeds; the spread over them decides what a difference means (default 0 1 2)")
    p.add_argument("--num-samples", type=positive_int, default=None, metavar="N",
                   help=f"class models: samples per model, per scale, per seed (default {DEFAULTS.num_samples}; class "
                        f"and unconditional video models: videos, default {DEFAULT_NUM_VIDEOS})")
    p.add_argument("--sampler", choices=(*SAMPLERS, "euler"), default=None,
                   help=f"(class models: default {DEFAULTS.sampler}; caption and video models: the family's, SD3 / "
                        "FLUX.1 / Wan euler, Latte ddpm)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"(class models: default {DEFAULTS.steps}; caption and video models: the family's, SD3 28, "
                        "FLUX.1-dev 28, schnell 4, Latte 250, Wan 50)")
    p.add_argument("--sampler-b", choices=SAMPLERS, default=None,
                   help="class models: B's own sampler (default: --sampler), e.g. a SparseDiT at 25 DDIM steps vs the "
                        "DiT at 250 DDPM")
    p.add_argument("--steps-b", type=positive_int, default=None, help="class models: B's own step count")
    p.add_argument("--cfg-mode", choices=CFG_MODES, default=None,
                   help="DiT, PixArt and Latte: guide the first 3 latent channels (official DiT / PixArt) or all "
                        "channels (Latte's default)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per model call (class models: part of the noise layout, default {DEFAULTS.batch_size};"
                        f" caption models: default {TEXT_DEFAULTS.batch_size}; video models: videos per call and per "
                        f"I3D batch, default {VIDEO_DEFAULTS.batch_size}; the noise of these does not depend on it)")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help=f"class models: A|B pairs per class in the paired images (default {DEFAULTS.per_class})")
    p.add_argument("--scale", type=positive_int, default=None,
                   help=f"integer upscaling of the paired images (class models: default {DEFAULTS.scale}, use 1 for "
                        "256 px models; caption and video models: default 1)")
    p.add_argument("--out", default="runs/compare", metavar="DIR", help="output folder (default runs/compare)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (replaces only compare's own files; others are kept)")
    p.add_argument("--threads", type=threads, default=None,
                   help="torch (and BLAS) threads (default: all CPUs minus the current load average, at least 1)")
    add_device_arg(p)
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="local AutoencoderKL directory (latent models; video models are decoded frame by frame)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="InceptionV3 weights: class models that are not digits models need them; for caption models "
                        "they add the optional Fréchet distances (see docs/metrics.md)")
    p.add_argument("--ref", default=None, metavar="REF.npz", help="class models: ADM reference batch (non-digits)")
    p.add_argument("--real", default=None, metavar="REAL.npz",
                   help="class models: real images (ADM .npz, at least N) for the real floor (non-digits)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="class models: reuse sampled sets across runs (keyed by weights SHA-256 and every setting)")
    t = p.add_argument_group("caption models (SD3, FLUX.1, PixArt; text-to-video Latte, Wan)")
    t.add_argument("--prompt-embeds", default=None, metavar="FILE",
                   help="prompt-embeddings file (`sparsedit encode-prompts` writes one): compare the models on its "
                        "prompts")
    t.add_argument("--pipeline", default=None, metavar="DIR",
                   help="SD3 / FLUX.1: the local diffusers pipeline folder whose vae/ decodes the latents (or --vae; "
                        "without either the latents are compared)")
    t.add_argument("--guidance", nargs="+", type=positive_float, default=None, metavar="G",
                   help="FLUX.1-dev: values of its distilled guidance embedding, reported side by side (default 2.5 3.5)")
    t.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                   help="SD3 / FLUX.1 / Wan: sample both models at this resolution (they run at any size; Wan: 480 "
                        "-> 480x832; default: their own, or the sparse model's when the two differ)")
    t.add_argument("--num-prompts", type=positive_int, default=None, metavar="N",
                   help="compare on the first N prompts of the file (default: all)")
    t.add_argument("--rows", type=positive_int, default=None, metavar="N",
                   help=f"prompts shown in each paired image (default {TEXT_DEFAULTS.rows}); video models: videos shown "
                        f"in each paired GIF and frame strip (default {VIDEO_DEFAULTS.rows})")
    v = p.add_argument_group("video models (Latte, SparseLatte, Wan)")
    v.add_argument("--i3d", default=None, metavar="PATH",
                   help="piergiaj's rgb_imagenet.pt (I3D weights, see docs/metrics.md): add the FVD of B's videos "
                        "against A's next to FVD(A', A); needs decoded videos of at least 16 frames")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _default_names(a: str, b: str) -> list[str]:
    from pathlib import Path

    na, nb = Path(a).name or a, Path(b).name or b
    return [na, nb] if na != nb else [f"A: {a}", f"B: {b}"]


def _refuse(args: argparse.Namespace, flags: dict[str, str], why: str) -> None:
    from sparsedit.errors import SparseditError

    given = [flag for flag, attr in flags.items() if getattr(args, attr) is not None]
    if given:
        raise SparseditError(f"{' / '.join(given)} {'is' if len(given) == 1 else 'are'} {why}; drop "
                             f"{'it' if len(given) == 1 else 'them'}")


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    from pathlib import Path

    import torch

    from sparsedit.cli.common import check_device, command_line, default_threads
    from sparsedit.errors import SparseditError
    from sparsedit.eval.compare import compare_models, prepare_out, results_table
    from sparsedit.eval.compare_video_settings import is_video_model
    from sparsedit.loading import load_model

    if args.names is not None and (args.names[0] == args.names[1] or any(set(n) & set("|\n\r") or not n.strip()
                                                                         for n in args.names)):
        raise SparseditError(f"--names {args.names[0]!r} {args.names[1]!r}: give two different, non-empty names "
                             "without '|' or line breaks (they head the report's table)")
    VideoCompareSettings(cfg_scales=None if args.cfg_scales is CLASS_SCALES else tuple(args.cfg_scales),
                         seeds=tuple(args.seeds))  # values every mode checks alike, refused before anything is loaded
    text = args.prompt_embeds is not None
    if text:  # the flags no caption model takes, image or video, are refused before anything is loaded
        _refuse(args, {"--num-samples": "num_samples", "--sampler-b": "sampler_b", "--steps-b": "steps_b",
                       "--per-class": "per_class", "--ref": "ref", "--real": "real",
                       "--cache-dir": "cache_dir"}, "for class models, not with --prompt-embeds")
        if not Path(args.prompt_embeds).is_file():
            raise SparseditError(f"prompt embeddings file {args.prompt_embeds} does not exist; write one with "
                                 "`sparsedit encode-prompts`")
    else:
        _refuse(args, {"--pipeline": "pipeline", "--guidance": "guidance", "--num-prompts": "num_prompts",
                       "--image-size": "image_size"}, "for caption models and go with --prompt-embeds FILE")
    if args.cache_dir is not None and (os.path.lexists(args.cache_dir) and not Path(args.cache_dir).is_dir()):
        raise SparseditError(f"--cache-dir {args.cache_dir} is not a directory; give a directory for the cached samples")
    device = check_device(args.device)
    prepare_out(args.out, args.overwrite)  # refuse a non-empty --out before loading anything
    torch.set_num_threads(args.threads or default_threads())
    a, b = load_model(args.a), load_model(args.b)
    names = args.names or _default_names(args.a, args.b)
    command = command_line(sys.argv[1:])
    if is_video_model(a) or is_video_model(b):
        return _run_video(args, a, b, names, device, command)
    _refuse(args, {"--i3d": "i3d"}, f"for video models (Latte, Wan), and A is a {type(a).__name__}")
    if text:
        from sparsedit.eval.compare_text import compare_text_models
        from sparsedit.eval.compare_text_report import text_results_table

        settings = TextCompareSettings(
            cfg_scales=None if args.cfg_scales is CLASS_SCALES else args.cfg_scales, guidance=args.guidance,
            seeds=tuple(args.seeds), sampler=args.sampler, steps=args.steps, num_prompts=args.num_prompts,
            batch_size=args.batch_size or TEXT_DEFAULTS.batch_size, rows=args.rows or TEXT_DEFAULTS.rows,
            scale=args.scale or TEXT_DEFAULTS.scale, cfg_mode=args.cfg_mode or TEXT_DEFAULTS.cfg_mode)
        pipeline = args.pipeline
        if pipeline is None and args.vae is None:  # a pipeline folder given as A or B holds the VAE too
            pipeline = next((p for p in (args.a, args.b) if (Path(p) / "model_index.json").is_file()), None)
        report = compare_text_models(
            a, b, args.prompt_embeds, settings, names=names, device=device, progress=not args.no_progress,
            vae=args.vae, pipeline=pipeline, image_size=args.image_size, inception_weights=args.inception_weights,
            out=args.out, overwrite=args.overwrite, command=command)
        print(text_results_table(report))
        if report["size"]["note"]:
            print(f"\n{report['size']['note']}")
        if report["space"] == "latents":
            print("\nno VAE (--vae / --pipeline): the models were compared in latent space, without PSNR")
    else:
        _refuse(args, {"--rows": "rows"}, "for caption models (--prompt-embeds) and video models")
        class_settings = CompareSettings(
            cfg_scales=tuple(args.cfg_scales), seeds=tuple(args.seeds),
            num_samples=args.num_samples or DEFAULTS.num_samples, sampler=args.sampler or DEFAULTS.sampler,
            steps=args.steps or DEFAULTS.steps, cfg_mode=args.cfg_mode or DEFAULTS.cfg_mode,
            batch_size=args.batch_size or DEFAULTS.batch_size, per_class=args.per_class or DEFAULTS.per_class,
            scale=args.scale or DEFAULTS.scale, sampler_b=args.sampler_b, steps_b=args.steps_b,
        )
        report = compare_models(
            a, b, class_settings, names=names, device=device,
            progress=not args.no_progress, cache_dir=args.cache_dir, vae=args.vae,
            inception_weights=args.inception_weights, ref=args.ref, real=args.real, out=args.out,
            overwrite=args.overwrite, command=command,
        )
        print(results_table(report))
    print(f"\nwrote {args.out}/compare.md, compare.json and {len(report['results'])} paired images "
          f"({report['wall_seconds']:.0f}s)")
    return 0


def _run_video(args: argparse.Namespace, a: object, b: object, names: list[str], device: object, command: str) -> int:
    """Video models (Latte, SparseLatte, Wan): refuse the image-only flags, compare, print the table and caveats."""
    from sparsedit.eval.compare_video import compare_video_models
    from sparsedit.eval.compare_video_report import video_results_table

    _refuse(args, {"--sampler-b": "sampler_b", "--steps-b": "steps_b", "--per-class": "per_class", "--ref": "ref",
                   "--real": "real", "--cache-dir": "cache_dir", "--inception-weights": "inception_weights",
                   "--guidance": "guidance"},
            f"not for video models (A is a {type(a).__name__}; B's videos are scored against A's, FVD with --i3d)")
    settings = VideoCompareSettings(
        cfg_scales=None if args.cfg_scales is CLASS_SCALES else tuple(args.cfg_scales), seeds=tuple(args.seeds),
        sampler=args.sampler, steps=args.steps, num_samples=args.num_samples, num_prompts=args.num_prompts,
        batch_size=args.batch_size or VIDEO_DEFAULTS.batch_size, rows=args.rows or VIDEO_DEFAULTS.rows,
        scale=args.scale or VIDEO_DEFAULTS.scale, cfg_mode=args.cfg_mode)
    report = compare_video_models(
        a, b, settings, prompt_embeds=args.prompt_embeds, names=names, device=device,  # type: ignore[arg-type]
        progress=not args.no_progress, vae=args.vae, pipeline=_video_pipeline(args, a), i3d=args.i3d,
        image_size=args.image_size, out=args.out, overwrite=args.overwrite, command=command)
    print(video_results_table(report))
    if report["size"]["note"]:
        print(f"\n{report['size']['note']}")
    if report["space"] == "latents":
        print("\nno VAE (--vae): the videos were compared in latent space, without PSNR or FVD")
    if report["fvd"]["available"]:
        print(f"\n{report['fvd']['note']}")
    print(f"\nwrote {args.out}/compare.md, compare.json and {len(report['results'])} paired videos (paired_*.gif, "
          f"with frame strips paired_*.png) ({report['wall_seconds']:.0f}s)")
    return 0


def _video_pipeline(args: argparse.Namespace, a: object) -> str | None:
    """--pipeline, else a pipeline folder given as A or B whose VAE the family reads (Wan's vae/; Latte reads none)."""
    from pathlib import Path

    from sparsedit.errors import SparseditError
    from sparsedit.families import family_of

    if args.pipeline is not None or args.vae is not None:
        return args.pipeline
    for p in (args.a, args.b):
        if (Path(p) / "model_index.json").is_file():
            try:
                if family_of(a).default_vae_dir(p) is not None:
                    return p
            except SparseditError:  # not the family's pipeline, or no vae/ in it: compare the latents
                pass
    return None
