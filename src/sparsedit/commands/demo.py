"""``sparsedit demo``: the main job on the embedded default (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from sparsedit.demo import DemoSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the embedded digits (DiT vs SparseDiT report)",
                       description="Load the shipped digits DiT, sparsify it, fine-tune briefly with the piece "
                       "sampler, sample both with the same seeds and write a side-by-side report.")
    for f in fields(DemoSettings):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default})")
    p.add_argument("--dit", default=None, help="use this DiT checkpoint instead of the shipped one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from sparsedit.commands.common import command_line
    from sparsedit.demo import run_demo
    from sparsedit.errors import SparseditError

    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})
    out = Path(settings.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite and not (out / "report.json").exists():
            raise SparseditError(f"{out} is not empty and holds no demo report; choose another --out")
        if not args.overwrite:
            raise SparseditError(f"{out} already holds a demo report; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    run_demo(settings, dit_path=args.dit, progress=not args.no_progress, command=command_line(sys.argv[1:]))
    return 0
