"""``sparsedit eval``: ADM-compatible FID, sFID, Inception Score and precision/recall.

Compares a sample batch with a reference batch, both ADM-style ``.npz`` files (``arr_0`` holding
(N, H, W, 3) uint8 images), using the TF-compatible InceptionV3; see docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sparsedit.cli.common import check_device, positive_int
from sparsedit.eval.metrics.inception import POOL_DIM, WEIGHTS_ENV, WEIGHTS_FILENAME


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="FID / sFID / IS / precision / recall of a sample batch vs an ADM reference batch",
        description=(
            "Evaluate a sample batch against a reference batch the way guided-diffusion's evaluator "
            "does (InceptionV3 pool_3 / mixed_6/conv features, IS splits of 5000, k=3 precision/recall)."
        ),
    )
    parser.add_argument("--samples", required=True, metavar="S.npz", help="sample batch (arr_0: N,H,W,3 uint8)")
    parser.add_argument(
        "--ref", required=True, metavar="REF.npz", help="reference batch, e.g. VIRTUAL_imagenet256_labeled.npz"
    )
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help=f"{WEIGHTS_FILENAME} (default: ${WEIGHTS_ENV}, then the torch hub cache)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per Inception forward (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)
    return parser


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("FID", f"{result['fid']:.4f}"),
        ("sFID", f"{result['sfid']:.4f}"),
        ("Inception Score", f"{result['inception_score']:.4f} (std {result['inception_score_std']:.4f})"),
        ("Precision", f"{result['precision']:.4f}"),
        ("Recall", f"{result['recall']:.4f}"),
        ("samples", str(result["num_samples"])),
        ("reference images", str(result["num_ref"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    from sparsedit.eval.metrics.adm import evaluate

    result = evaluate(
        args.samples,
        args.ref,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        device=check_device(args.device),
        progress=sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_table(result))
    if min(result["num_samples"], result["num_ref"]) <= POOL_DIM:
        print(f"note: with {min(result['num_samples'], result['num_ref'])} images (<= {POOL_DIM} features) the "
              "covariances are singular and FID / sFID are not meaningful; use thousands of images (the papers: 50,000)",
              file=sys.stderr)
    return 0
