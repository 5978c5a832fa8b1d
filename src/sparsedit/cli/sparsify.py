"""``sparsedit sparsify``: convert a DiT checkpoint into a SparseDiT (paper Sec. 3.3 initialisation)."""

from __future__ import annotations

import argparse

from sparsedit.cli.common import add_model_args, check_not_source, load_cli_model, positive_int, rate
from sparsedit.core.blocks import EXTRA_RECOVERY_MODES, UPSAMPLE_MODES
from sparsedit.core.layout import LAYOUT_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sparsify", help="convert a DiT into a SparseDiT",
                       description="Initialise a SparseDiT from a DiT: layer i <- layer i, Q/K dropped in "
                       "poolingformers, W1 = 0, W2 = I, embedders and final layer copied.")
    add_model_args(p, flag="src")
    p.add_argument("--layout", required=True, help=LAYOUT_HELP)
    add_rate_args(p)
    p.add_argument("--num-pieces", type=positive_int, default=None,
                   help="split [T/4, T) into this many equal pieces (default: one piece per distinct grid)")
    p.add_argument("--upsample", choices=UPSAMPLE_MODES, default="nearest", help="dense-recovery upsampling")
    p.add_argument("--recovery-pos-embed", action=argparse.BooleanOptionalAction, default=True,
                   help="re-add the position table in the recovery merge (default: on, as the paper; off: the "
                   "authors' code, docs/official.md)")
    p.add_argument("--extra-recovery", choices=EXTRA_RECOVERY_MODES, default=None,
                   help="the 2nd.. recovery blocks of an SDTM (r > 1): cross-attention to the sparse tokens (cross, "
                   "ours) or the recovery block repeated (repeat, the authors' code); not for Latte")
    p.add_argument("--out", required=True, help="output directory for the SparseDiT checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument("--verbose", action="store_true", help="print the parameter-by-parameter initialisation map")
    p.set_defaults(func=run)


def add_rate_args(p: argparse.ArgumentParser) -> None:
    """--r-min / --r-max; unset means the paper's range for the family (resolved in :func:`_convert`)."""
    p.add_argument("--r-min", type=rate, default=None,
                   help="pruning rate in the final quarter of denoising (default: the paper's, 0.61 for DiT and "
                   "PixArt, 0.80 for Latte)")
    p.add_argument("--r-max", type=rate, default=None,
                   help="pruning rate at the noisiest step (default: the paper's, 0.86 for DiT and PixArt, 0.93 "
                   "for Latte)")


def check_rates(args: argparse.Namespace) -> None:
    """Refuse --r-min > --r-max early (before any slow load)."""
    from sparsedit.errors import SparseditError

    if args.r_min is not None and args.r_max is not None and args.r_min > args.r_max:
        raise SparseditError(f"--r-min {args.r_min} is larger than --r-max {args.r_max}; swap them")


def _convert(src, args: argparse.Namespace, variant: dict | None = None):  # noqa: ANN001, ANN202
    """The sparse model of ``src`` (DiT -> SparseDiT, PixArt -> SparsePixArt, Latte -> SparseLatte).

    ``variant``: the config's variant switches (``recovery_pos_embed``, ``extra_recovery``); None keeps the defaults.
    """
    from sparsedit.families import family_of

    # Unset rates fall back to each family's own default (the paper's range for that family).
    check_rates(args)
    rates = {k: v for k, v in (("r_min", args.r_min), ("r_max", args.r_max)) if v is not None}
    if args.upsample is not None:
        rates["upsample"] = args.upsample
    rates.update(variant or {})
    return family_of(src).sparsify(src, args.layout, args.num_pieces, **rates)


def _token_sets(cfg) -> list[str]:  # noqa: ANN001
    """The distinct sparse token sets a full sampling run can use, fewest tokens first."""
    from sparsedit.families import family_of

    family = family_of(cfg)
    return [family.tokens_label(tokens) for tokens in family.token_sets()]


def run(args: argparse.Namespace) -> int:
    from sparsedit.core.checkpoint import check_output_dir, save_pretrained
    from sparsedit.errors import SparseditError
    from sparsedit.families import family_of

    check_rates(args)
    check_not_source(args.src, args.out)
    check_output_dir(args.out, args.overwrite)  # fail before the (slow) load, creating nothing
    src = load_cli_model(args.src, args)
    variant = {"recovery_pos_embed": args.recovery_pos_embed}
    if args.extra_recovery is not None:
        variant["extra_recovery"] = args.extra_recovery
    model = _convert(src, args, variant)
    if args.extra_recovery is not None and model.config.recovery_blocks < 2:
        raise SparseditError(f"--extra-recovery sets the 2nd.. recovery blocks of an SDTM; layout "
                             f"{model.config.layout.as_string()} has one (r = {model.config.recovery_blocks}): drop it")
    if args.verbose:
        for rule in family_of(model).init_rules(model):
            print(rule.describe())
    out = save_pretrained(model, args.out, overwrite=True)
    cfg = model.config
    dense = cfg.grid
    print(f"wrote {type(model).__name__} {out}: layout {cfg.layout.as_string()} (P,K,g,s,r,d,T), r in "
          f"[{cfg.r_min}, {cfg.r_max}], dense grid {dense[0]}x{dense[1]}, sparse token sets {', '.join(_token_sets(cfg))}")
    return 0
