"""Data sets: the embedded digits, image folders and precomputed VAE latents.

Three sources feed training and evaluation:

* :func:`load_digits_array` / :class:`DigitsDataset` - the UCI handwritten digits (1,797 real 8x8
  grayscale images, 10 classes) that ship inside the package (``assets/digits/digits8x8.npz``),
  upscaled with bilinear interpolation to the requested resolution. No download, no extra dependency.
* :class:`ImageFolderDataset` - ``root/<class name>/**/<image>``; class ids are the sorted
  subfolder names; images are center-cropped and resized with the ADM/DiT recipe.
* :class:`LatentsDataset` / :func:`save_latents` (defined in :mod:`sparsedit.train.latents`) - a directory
  with ``latents.safetensors`` and ``meta.json`` holding VAE latents (or posterior moments, sampled on the fly)
  of images or videos, with class labels and/or T5 caption embeddings (text-to-image / text-to-video models) and,
  for SD3 / FLUX, pooled text vectors.

All image tensors are float32 in [-1, 1], channel-first. Every data set returns ``(x, label)`` with
``label`` a Python ``int``, except a latents directory with captions, whose items are ``(x, cond)``
with ``cond`` a dict of model keyword arguments (:class:`LatentsDataset`). See ``docs/data.md``.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from sparsedit.errors import SparseditError
from sparsedit.train.latents import (
    CAPTION_MASK_KEY,
    CAPTIONS_KEY,
    LATENTS_FILE,
    LATENTS_FORMAT_VERSION,
    META_FILE,
    NULL_CAPTION_KEY,
    NULL_POOLED_KEY,
    POOLED_KEY,
    REQUIRED_META_KEYS,
    LatentsDataset,
    save_latents,
)

__all__ = [
    "CAPTIONS_KEY",
    "CAPTION_MASK_KEY",
    "DIGITS_NUM_CLASSES",
    "DIGITS_TEST_EVERY",
    "IMAGE_EXTENSIONS",
    "LATENTS_FILE",
    "LATENTS_FORMAT_VERSION",
    "META_FILE",
    "NULL_CAPTION_KEY",
    "NULL_POOLED_KEY",
    "POOLED_KEY",
    "REQUIRED_META_KEYS",
    "DigitsDataset",
    "ImageFolderDataset",
    "LatentsDataset",
    "center_crop_arr",
    "digits_split_indices",
    "load_digits_array",
    "load_digits_raw",
    "save_latents",
]

DIGITS_NUM_CLASSES = 10
#: Sample ``i`` of the embedded digits belongs to the test split iff ``i % DIGITS_TEST_EVERY == 4``
#: (the 5th, 10th, 15th ... sample): 359 test and 1,438 train images.
DIGITS_TEST_EVERY = 5

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

Split = Literal["train", "test", "all"]


# --------------------------------------------------------------------------------------------------
# Embedded digits
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_npz() -> tuple[np.ndarray, np.ndarray]:
    asset = resources.files("sparsedit") / "assets" / "digits" / "digits8x8.npz"
    try:
        with resources.as_file(asset) as path, np.load(path) as data:
            images = np.asarray(data["images"], dtype=np.uint8)
            labels = np.asarray(data["labels"], dtype=np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise SparseditError(
            f"embedded digits asset is missing or unreadable ({exc}); reinstall sparsedit or run "
            "`python scripts/make_digits_asset.py`"
        ) from exc
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits as stored: uint8 images (1797, 8, 8) on 0..16 and int64 labels (1797,).

    The arrays are read-only views of a cached copy; call ``.copy()`` before modifying them.
    """
    return _digits_npz()


def digits_split_indices(split: Split = "all") -> np.ndarray:
    """Indices of the embedded digits in ``split``: every 5th sample (``i % 5 == 4``) is test."""
    n = len(_digits_npz()[1])
    idx = np.arange(n)
    if split == "all":
        return idx
    if split == "test":
        return idx[idx % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1]
    if split == "train":
        return idx[idx % DIGITS_TEST_EVERY != DIGITS_TEST_EVERY - 1]
    raise SparseditError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")


def _check_resolution_channels(resolution: int, channels: int) -> None:
    if not isinstance(resolution, int) or resolution < 8:
        raise SparseditError(
            f"digits resolution must be an integer >= 8 (the data are 8x8), got {resolution!r}; "
            "pass resolution=8 or larger"
        )
    if channels not in (1, 3):
        raise SparseditError(f"channels must be 1 or 3, got {channels!r}; pass channels=1 or channels=3")


def load_digits_array(resolution: int = 16, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 embedded digits as tensors.

    Pixel values 0..16 are mapped linearly to [-1, 1] (``v / 8 - 1``), then the 8x8 images are
    upscaled with ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``. With
    ``channels=3`` the gray channel is repeated.

    Returns:
        ``images`` float32 (1797, channels, resolution, resolution) in [-1, 1] and ``labels`` int64
        (1797,) in 0..9.
    """
    _check_resolution_channels(resolution, channels)
    raw, labels = _digits_npz()
    x = torch.from_numpy(raw.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    x = x.clamp_(-1.0, 1.0)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous(), torch.from_numpy(labels.copy())


class DigitsDataset(Dataset):
    """The embedded digits as a map-style data set returning ``(image, label)``.

    Args:
        split: ``"train"`` (1,438 images), ``"test"`` (359 images: every 5th sample, ``i % 5 == 4``)
            or ``"all"`` (1,797). The split is fixed and deterministic.
        resolution: output side length (>= 8), bilinear upscaling from 8x8.
        channels: 1, or 3 (gray repeated).
    """

    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: Split = "all", resolution: int = 16, channels: int = 1) -> None:
        images, labels = load_digits_array(resolution=resolution, channels=channels)
        self.indices = torch.from_numpy(digits_split_indices(split))
        self.split = split
        self.resolution = resolution
        self.channels = channels
        self.images = images[self.indices].contiguous()
        self.labels = labels[self.indices].contiguous()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """Center crop + resize with the ADM/DiT recipe; returns a uint8 (res, res[, C]) array.

    While the shorter side is at least ``2 * resolution`` the image is halved with a BOX filter
    (cheap anti-aliasing), then it is resized with BICUBIC so that the shorter side equals
    ``resolution``, and the central ``resolution x resolution`` square is cut out.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    new_size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
    image = image.resize(new_size, resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


class ImageFolderDataset(Dataset):
    """Images in class subfolders: ``root/<class>/**/<file>``, returning ``(image, label)``.

    Class ids are assigned to the sorted subfolder names (``classes[i]`` is the name of class ``i``).
    Hidden folders/files (names starting with ``.``) are skipped, as are files directly in ``root``.
    Each image is opened with Pillow, converted to RGB (``channels=3``) or L (``channels=1``),
    center-cropped and resized with :func:`center_crop_arr`, and returned as float32 CHW in [-1, 1].

    Args:
        root: the data set folder.
        resolution: output side length.
        channels: 3 (RGB) or 1 (grayscale).
        random_flip: flip horizontally with probability 0.5 (uses the global torch RNG), as DiT does.
        extensions: accepted file suffixes (case-insensitive).

    Raises:
        SparseditError: missing folder, no class subfolders, no images; unreadable images are
            reported (with their path) when they are loaded.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int = 256,
        channels: int = 3,
        random_flip: bool = False,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if channels not in (1, 3):
            raise SparseditError(f"channels must be 1 or 3, got {channels!r}; pass channels=1 or channels=3")
        if not isinstance(resolution, int) or resolution < 1:
            raise SparseditError(f"resolution must be a positive integer, got {resolution!r}")
        if not self.root.is_dir():
            raise SparseditError(f"image folder {str(self.root)!r} does not exist; check the path")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise SparseditError(
                f"image folder {str(self.root)!r} has no class subfolders; put images in "
                "root/<class name>/ (use a single subfolder for unlabelled data)"
            )
        exts = tuple(e.lower() for e in extensions)
        self.classes: list[str] = [p.name for p in class_dirs]
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        samples: list[tuple[Path, int]] = []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(
                p
                for p in class_dir.rglob("*")
                if p.is_file()
                and p.suffix.lower() in exts
                and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            )
            if not files and len(class_dirs) > 1:  # one (unlabelled) folder is checked as a whole below
                raise SparseditError(f"class folder {str(class_dir)!r} holds no images ({', '.join(exts)}); remove it "
                                     "or add images (its class would exist with no example)")
            samples.extend((p, label) for p in files)
        if not samples:
            raise SparseditError(
                f"no images found under {str(self.root)!r} (looked for {', '.join(exts)} in "
                f"{len(class_dirs)} class subfolders); check the path and the file extensions"
            )
        self.samples = samples
        self.resolution = resolution
        self.channels = channels
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """The preprocessed image ``index`` (no flip) as float32 (C, res, res) in [-1, 1]."""
        path, _ = self.samples[index]
        mode = "RGB" if self.channels == 3 else "L"
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: convert() would clip it to white
                    img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
                image = img.convert(mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise SparseditError(f"cannot read image {str(path)!r} ({exc}); remove or replace the file") from exc
        arr = center_crop_arr(image, self.resolution)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1).contiguous()
        return x / 127.5 - 1.0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.load_image(index)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.samples[index][1]
