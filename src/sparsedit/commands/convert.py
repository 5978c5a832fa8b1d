"""``sparsedit convert``: re-save any supported checkpoint as diffusers or sparsedit."""

from __future__ import annotations

import argparse

from sparsedit.commands.common import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a DiT, PixArt or Latte checkpoint to the diffusers or sparsedit format",
                       description="Load any supported checkpoint and write it as a sparsedit directory or a diffusers "
                       "model directory (DiTTransformer2DModel, PixArtTransformer2DModel or LatteTransformer3DModel; "
                       "dense models only: sparse models have no diffusers class).")
    add_model_args(p, flag="src")
    p.add_argument("--to", dest="fmt", choices=("diffusers", "sparsedit"), required=True, help="output format")
    p.add_argument("out", metavar="OUT", help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT")
    p.add_argument("--drop-null-caption", action="store_true",
                   help="PixArt to diffusers: drop the original checkpoint's null caption (diffusers has no slot for it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparsedit.convert import export_differences, load_model, save_model

    model = load_model(args.src, model=args.model, image_size=args.image_size)
    notes = export_differences(model.config) if args.fmt == "diffusers" else []
    out = save_model(model, args.out, fmt=args.fmt, overwrite=args.overwrite, drop_null_caption=args.drop_null_caption)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.fmt} checkpoint {out} ({type(model).__name__}, {n_params / 1e6:.2f}M parameters)")
    for note in notes:
        print(f"note: diffusers cannot keep this model's numerics exactly: {note}")
    return 0
