"""``sparsedit demo``: the main job on the embedded default (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from sparsedit.cli.common import (
    positive_float,
    positive_int,
    rate,
    seed,
    threads,
    unit_float,
)
from sparsedit.eval.demo import DemoSettings

HELP = {
    "recipe": "recovery recipe of the fine-tuning (see `sparsedit train --help` and docs/quality.md)",
    "num_samples": "samples per model, per guidance scale, per seed",
    "threads": "torch threads; 0 = all CPUs minus the current load average (two threads on a busy 2-core machine "
               "can run 10x slower than one)",
    "ema_decay": "EMA decay, reached after the warm-up min(decay, (1+n)/(10+n))",
}

# Parsing of each number, so that nan, 0 steps or a decay of 2 are refused before anything runs; fields not
# listed are parsed by their default's type (int, str).
PARSE = {
    "r_min": rate, "r_max": rate, "lr": positive_float, "ema_decay": unit_float, "cfg_scales": positive_float,
    "finetune_steps": positive_int, "batch_size": positive_int, "num_samples": positive_int,
    "sample_steps": positive_int, "per_class": positive_int, "image_scale": positive_int, "threads": threads,
    "seeds": seed, "seed": seed,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the embedded digits (DiT vs SparseDiT report)",
                       description="Load the shipped digits DiT, sparsify it, fine-tune it briefly with a recovery "
                       "recipe, then compare the two honestly (same noise, CFG 1 / 1.5 / 4, three seeds, a real "
                       "floor, paired images) and write a report.")
    for f in fields(DemoSettings):
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP.get(f.name, '')} (default: {f.default})".strip()
        if isinstance(f.default, tuple):  # --seeds 0 1 2, --cfg-scales 1 1.5 4
            p.add_argument(flag, type=PARSE.get(f.name, type(f.default[0])), nargs="+", default=list(f.default),
                           help=text)
        else:
            p.add_argument(flag, type=PARSE.get(f.name, type(f.default)), default=f.default, help=text)
    p.add_argument("--dit", default=None, help="use this DiT checkpoint instead of the shipped one")
    p.add_argument("--overwrite", action="store_true", help="replace the report of an earlier demo in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import re
    from pathlib import Path

    from sparsedit.cli.common import command_line, default_threads
    from sparsedit.core.checkpoint import write_dir
    from sparsedit.errors import SparseditError
    from sparsedit.eval.compare import OUTPUT_FILES
    from sparsedit.eval.demo import FINETUNE_DIR, REPORT_FILES, run_demo

    values = {f.name: getattr(args, f.name) for f in fields(DemoSettings)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    settings = DemoSettings(**values)
    settings.validate()
    if not settings.threads:
        settings.threads = default_threads()
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise SparseditError(f"--out {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()):
        # Only a directory holding an earlier demo's report is replaced, and only with --overwrite.
        if not any((out / name).exists() for name in REPORT_FILES):
            raise SparseditError(f"{out} is not empty and holds no demo report; choose another --out")
        if not args.overwrite:
            raise SparseditError(f"{out} already holds a demo report; pass --overwrite or choose another --out")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (*REPORT_FILES, FINETUNE_DIR, *OUTPUT_FILES)
                         and not re.fullmatch(r"paired_cfg[-+.0-9e]+\.png", p.name))
        if foreign:
            raise SparseditError(f"{out} holds files the demo did not write ({', '.join(foreign[:3])}), which "
                                 "replacing it would delete; move them out or choose another --out")
    # The whole demo is written beside --out and swapped in at the end: an earlier report stays whole until then.
    write_dir(out, lambda tmp: run_demo(settings, dit_path=args.dit, progress=not args.no_progress,
                                        command=command_line(sys.argv[1:]), workdir=tmp))
    return 0
