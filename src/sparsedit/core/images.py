"""Saving image tensors: grids and strips as PNG, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sparsedit.core.checkpoint import atomic_write


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 (C = 1 or 3)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (H', W', C) uint8 array, ``nrow`` images per row."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    return grid


def save_image(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, C) uint8 array as PNG (atomically)."""
    path = Path(path)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_image(make_grid(images, nrow), path)
