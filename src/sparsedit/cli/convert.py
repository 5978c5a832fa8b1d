"""``sparsedit convert``: re-save any supported checkpoint as sparsedit, diffusers or the SparseDiT authors' format."""

from __future__ import annotations

import argparse

from sparsedit.cli.common import add_model_args, check_not_source, load_cli_model, positive_int, rate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to the sparsedit, diffusers or SparseDiT authors' format",
                       description="Load any supported checkpoint (including the SparseDiT authors' .pt files) and "
                       "write it as a sparsedit directory, a diffusers model directory (DiTTransformer2DModel, "
                       "PixArtTransformer2DModel or LatteTransformer3DModel; dense models only: sparse models have no "
                       "diffusers class) or, for a SparseDiT, the authors' .pt file (docs/official.md).")
    add_model_args(p, flag="src")
    p.add_argument("--to", dest="fmt", choices=("diffusers", "sparsedit", "official-sparsedit"), required=True,
                   help="output format; official-sparsedit: one .pt file for github.com/changsn/SparseDiT's scripts")
    p.add_argument("out", metavar="OUT", help="output directory (must be new or empty), or the .pt file for "
                   "official-sparsedit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT")
    p.add_argument("--drop-null-caption", action="store_true",
                   help="PixArt to diffusers: drop the original checkpoint's null caption (diffusers has no slot for it)")
    p.add_argument("--semantic-size", type=positive_int, default=None, metavar="S",
                   help="SparseDiT authors' checkpoints: their sparse grid side (default: the file's args, else 8, "
                   "their training default)")
    p.add_argument("--r-min", type=rate, default=None,
                   help="sparse models: replace the smallest pruning rate (e.g. a timestep-wise range on top of an "
                   "imported constant rate)")
    p.add_argument("--r-max", type=rate, default=None, help="sparse models: replace the largest pruning rate")
    p.set_defaults(func=run)


def set_rates(model, r_min: float | None, r_max: float | None) -> None:  # noqa: ANN001
    """Replace a sparse model's pruning-rate range (None keeps a bound); a dense model is an error."""
    from sparsedit.errors import SparseditError
    from sparsedit.families.presets import is_sparse, with_sparsity

    if r_min is None and r_max is None:
        return
    if not is_sparse(model.config):
        raise SparseditError(f"--r-min/--r-max set a sparse model's pruning rates; this {type(model).__name__} is "
                             "dense: sparsify it first (sparsedit sparsify)")
    # The rates only choose the sparse grid at forward time (config.schedule); no module depends on them.
    model.config = with_sparsity(model.config, None, {"r_min": r_min, "r_max": r_max})


def run(args: argparse.Namespace) -> int:
    from sparsedit.cli.sparsify import check_rates
    from sparsedit.errors import SparseditError
    from sparsedit.loading import export_differences, save_model

    check_rates(args)
    check_not_source(args.src, args.out)
    if args.drop_null_caption and args.fmt != "diffusers":
        raise SparseditError("--drop-null-caption applies to a PixArt exported --to diffusers; drop it")
    model = load_cli_model(args.src, args, semantic_size=args.semantic_size)
    set_rates(model, args.r_min, args.r_max)
    notes = export_differences(model.config) if args.fmt == "diffusers" else []
    out = save_model(model, args.out, fmt=args.fmt, overwrite=args.overwrite, drop_null_caption=args.drop_null_caption)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.fmt} checkpoint {out} ({type(model).__name__}, {n_params / 1e6:.2f}M parameters)")
    for note in notes:
        print(f"note: diffusers cannot keep this model's numerics exactly: {note}")
    from sparsedit.families.presets import is_sparse

    if is_sparse(model.config):  # what it runs
        from sparsedit.cli.sparsify import _token_sets

        cfg = model.config
        switches = f"recovery_pos_embed={str(cfg.recovery_pos_embed).lower()}"
        switches += f", extra_recovery={cfg.extra_recovery}" if hasattr(cfg, "extra_recovery") else ""
        print(f"layout {cfg.layout.as_string()} (P,K,g,s,r,d,T), r in [{cfg.r_min:g}, {cfg.r_max:g}], sparse token "
              f"sets {', '.join(_token_sets(cfg))}, {switches}")
    if args.fmt == "official-sparsedit":
        from sparsedit.families.dit.authors import authors_notes, authors_sample_command

        print(f"sample it in their code with: {authors_sample_command(model, out)}")
        for note in authors_notes(model):
            print(f"note: {note}")
    return 0
