"""``sparsedit compare A B``: two class-conditional models, same noise, several CFG scales and seeds, a real floor.

Writes OUT/compare.json, OUT/compare.md and OUT/paired_cfg{scale}.png and prints the table; see
docs/compare.md and :mod:`sparsedit.eval.compare`.
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

DEFAULTS = CompareSettings()


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sparsedit.diffusion.samplers import SAMPLERS
    from sparsedit.families.dit.model import CFG_MODES

    p = sub.add_parser(
        "compare", help="compare two models honestly: same noise, several CFG scales and seeds, real floor",
        description=("Sample both models with identical noise and class-balanced labels at several CFG scales and "
                     "seeds, score them (digits CNN for digits models, ADM Inception metrics otherwise) next to a "
                     "real-vs-real floor, and report means, seed spreads, FID ratios, cost and paired images."),
    )
    p.add_argument("a", metavar="A", help="checkpoint of model A (e.g. the DiT): anything `sparsedit sample` loads")
    p.add_argument("b", metavar="B", help="checkpoint of model B (e.g. the SparseDiT made from A)")
    p.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"), default=None,
                   help="names in the report (default: the checkpoint folder names)")
    p.add_argument("--cfg-scales", nargs="+", type=positive_float, default=list(DEFAULTS.cfg_scales), metavar="S",
                   help="guidance scales, all reported side by side (default 1 1.5 4; 1 = no guidance)")
    p.add_argument("--seeds", nargs="+", type=seed, default=list(DEFAULTS.seeds), metavar="SEED",
                   help="seeds; the spread over them decides what a difference means (default 0 1 2)")
    p.add_argument("--num-samples", type=positive_int, default=DEFAULTS.num_samples, metavar="N",
                   help=f"samples per model, per scale, per seed (default {DEFAULTS.num_samples})")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS.sampler)
    p.add_argument("--steps", type=positive_int, default=DEFAULTS.steps, help=f"(default {DEFAULTS.steps})")
    p.add_argument("--sampler-b", choices=SAMPLERS, default=None,
                   help="B's own sampler (default: --sampler), e.g. a SparseDiT at 25 DDIM steps vs the DiT at 250 DDPM")
    p.add_argument("--steps-b", type=positive_int, default=None, help="B's own step count (default: --steps)")
    p.add_argument("--cfg-mode", choices=CFG_MODES, default=None,
                   help="guide the first 3 latent channels (official DiT) or all channels")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                   help=f"images per sampling chunk; part of the noise layout (default {DEFAULTS.batch_size})")
    p.add_argument("--per-class", type=positive_int, default=DEFAULTS.per_class,
                   help=f"A|B pairs per class in the paired images (default {DEFAULTS.per_class})")
    p.add_argument("--scale", type=positive_int, default=DEFAULTS.scale,
                   help=f"integer upscaling of the paired images (default {DEFAULTS.scale}; use 1 for 256 px models)")
    p.add_argument("--out", default="runs/compare", metavar="DIR", help="output folder (default runs/compare)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (replaces only compare's own files; others are kept)")
    p.add_argument("--threads", type=threads, default=None,
                   help="torch (and BLAS) threads (default: all CPUs minus the current load average, at least 1)")
    add_device_arg(p)
    p.add_argument("--vae", default=None, metavar="DIR", help="local AutoencoderKL directory (latent models)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="InceptionV3 weights for non-digits models (see docs/metrics.md)")
    p.add_argument("--ref", default=None, metavar="REF.npz", help="ADM reference batch for non-digits models")
    p.add_argument("--real", default=None, metavar="REAL.npz",
                   help="real images (ADM .npz, at least N) for the real floor of non-digits models")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="reuse sampled sets across runs (keyed by weights SHA-256 and every sampling setting)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _default_names(a: str, b: str) -> list[str]:
    from pathlib import Path

    na, nb = Path(a).name or a, Path(b).name or b
    return [na, nb] if na != nb else [f"A: {a}", f"B: {b}"]


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    from pathlib import Path

    import torch

    from sparsedit.cli.common import check_device, command_line, default_threads
    from sparsedit.errors import SparseditError
    from sparsedit.eval.compare import compare_models, prepare_out, results_table
    from sparsedit.loading import load_model

    settings = CompareSettings(
        cfg_scales=tuple(args.cfg_scales), seeds=tuple(args.seeds), num_samples=args.num_samples,
        sampler=args.sampler, steps=args.steps, cfg_mode=args.cfg_mode, batch_size=args.batch_size,
        per_class=args.per_class, scale=args.scale, sampler_b=args.sampler_b, steps_b=args.steps_b,
    )
    if args.names is not None and (args.names[0] == args.names[1] or any(set(n) & set("|\n\r") or not n.strip()
                                                                         for n in args.names)):
        raise SparseditError(f"--names {args.names[0]!r} {args.names[1]!r}: give two different, non-empty names "
                             "without '|' or line breaks (they head the report's table)")
    if args.cache_dir is not None and (os.path.lexists(args.cache_dir) and not Path(args.cache_dir).is_dir()):
        raise SparseditError(f"--cache-dir {args.cache_dir} is not a directory; give a directory for the cached samples")
    device = check_device(args.device)
    prepare_out(args.out, args.overwrite)  # refuse a non-empty --out before loading anything
    torch.set_num_threads(args.threads or default_threads())
    a, b = load_model(args.a), load_model(args.b)
    report = compare_models(
        a, b, settings, names=args.names or _default_names(args.a, args.b), device=device,
        progress=not args.no_progress, cache_dir=args.cache_dir, vae=args.vae, inception_weights=args.inception_weights,
        ref=args.ref, real=args.real, out=args.out, overwrite=args.overwrite, command=command_line(sys.argv[1:]),
    )
    print(results_table(report))
    print(f"\nwrote {args.out}/compare.md, compare.json and {len(report['results'])} paired images "
          f"({report['wall_seconds']:.0f}s)")
    return 0
