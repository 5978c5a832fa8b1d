"""Argument helpers shared by several sub-commands."""

from __future__ import annotations

import argparse

import torch

from sparsedit.errors import SparseditError


def add_model_args(parser: argparse.ArgumentParser, flag: str = "--ckpt") -> None:
    kw = {"required": True} if flag.startswith("-") else {}
    parser.add_argument(flag, **kw, metavar="PATH",
                        help="official DiT .pt, diffusers DiTTransformer2DModel directory, or sparsedit directory")
    parser.add_argument("--model", default=None, metavar="PRESET",
                        help="preset such as DiT-XL/2, only when the checkpoint cannot tell")
    parser.add_argument("--image-size", type=int, default=None, help="image size in pixels, only when the checkpoint cannot tell")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparseditError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparseditError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    return device


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
