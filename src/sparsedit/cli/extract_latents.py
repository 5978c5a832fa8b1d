"""``sparsedit extract-latents``: encode an image folder with a local VAE into a latents directory.

The output (``latents.safetensors`` + ``meta.json``, see :func:`sparsedit.train.data.save_latents`) is what
``sparsedit train --data DIR`` reads. ``--kind moments`` (default) stores the *unscaled* posterior
mean and log-variance of every image, so training draws a fresh latent sample each epoch;
``--kind latents`` stores one unscaled posterior sample per image (drawn with ``--seed``, as
fast-DiT's ``extract_features.py`` does). The scale factor 0.18215 goes into ``meta.json``.
``--flip`` adds a horizontally flipped copy of every image (DiT's only augmentation), stored after
all the originals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.cli.common import add_device_arg, check_device, non_negative_int, positive_int, seed
from sparsedit.core.checkpoint import check_output_dir
from sparsedit.encoders.vae import (
    VAE_DOWNSAMPLE as TRAIN_VAE_FACTOR,  # what ``sparsedit train --model PRESET`` assumes
)
from sparsedit.errors import SparseditError
from sparsedit.train.data import LATENTS_FILE, META_FILE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract-latents", help="encode an image folder into VAE latents for training",
        description="Encode an image folder (one subfolder per class) with a local diffusers AutoencoderKL and "
        "write a latents directory for `sparsedit train --data DIR`. Images are center-cropped and resized with "
        "the ADM/DiT recipe.")
    p.add_argument("--data", required=True, metavar="IMAGE_FOLDER", help="image folder, class = subfolder")
    p.add_argument("--vae", required=True, metavar="DIR", help="local AutoencoderKL directory (e.g. sd-vae-ft-ema)")
    p.add_argument("--image-size", type=positive_int, default=256, help="pixel resolution (default 256)")
    p.add_argument("--out", required=True, metavar="DIR", help="output latents directory")
    p.add_argument("--kind", choices=("moments", "latents"), default="moments",
                   help="moments: posterior mean + logvar (sampled during training, default); "
                   "latents: one posterior sample per image")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every image")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    p.add_argument("--seed", type=seed, default=None, help="seed of the posterior samples of --kind latents (default 0)")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers that decode images")
    p.add_argument("--overwrite", action="store_true", help="replace a latents directory already at --out (whole)")
    p.add_argument("--no-progress", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=run_extract_latents)


@torch.no_grad()
def encode_batch(vae: nn.Module, images: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """(B, 3, H, W) images in [-1, 1] -> unscaled (B, 2C, h, w) moments or (B, C, h, w) posterior samples."""
    dist = vae.encode(images).latent_dist
    if kind == "moments":
        return torch.cat([dist.mean, dist.logvar], dim=1)
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
    return dist.mean + dist.std * noise




def extract_latents(data: str | Path, vae_path: str | Path, out: str | Path, image_size: int = 256,
                    kind: str = "moments", batch_size: int = 32, flip: bool = False, dtype: torch.dtype = torch.float32,
                    seed: int = 0, device: str | torch.device = "cpu", num_workers: int = 0, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Encode the image folder ``data`` with the VAE in ``vae_path`` and write a latents directory ``out``."""
    from torch.utils.data import DataLoader

    from sparsedit.encoders.vae import LATENT_SCALE, load_vae
    from sparsedit.train.data import ImageFolderDataset, save_latents

    if kind not in ("moments", "latents"):
        raise SparseditError(f"unknown --kind {kind!r}; use 'moments' or 'latents'")
    out = Path(out)
    check_output_dir(out, overwrite, marker=META_FILE, what="latents directory", owned=(LATENTS_FILE, META_FILE))
    dataset = ImageFolderDataset(data, resolution=image_size, channels=3)
    dev = torch.device(device)
    vae = load_vae(vae_path, dev)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # each encoder stage after the first halves the size
    if image_size % factor:
        raise SparseditError(f"--image-size {image_size} is not a multiple of this VAE's downsampling factor {factor}; "
                             f"use e.g. {max(factor, image_size // factor * factor)}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    gen = torch.Generator().manual_seed(seed)
    n = len(dataset)
    copies = 2 if flip else 1
    store: Tensor | None = None  # preallocated (copies * n, C', h, w): originals first, then flipped copies
    labels = torch.empty(copies * n, dtype=torch.int64)
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="extract-latents", unit="img", dynamic_ncols=True)
    start = 0
    for x, y in loader:
        x = x.to(dev)
        for copy in range(copies):
            z = encode_batch(vae, x.flip(-1) if copy else x, kind, gen).to("cpu", dtype)
            if store is None:
                store = torch.empty((copies * n, *z.shape[1:]), dtype=dtype)
            lo = copy * n + start
            store[lo : lo + z.shape[0]] = z
            labels[lo : lo + z.shape[0]] = y
        start += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    assert store is not None  # ImageFolderDataset refuses empty folders
    latent_h = store.shape[-2]
    if image_size != latent_h * TRAIN_VAE_FACTOR:
        print(f"sparsedit extract-latents: warning: this VAE maps {image_size} px to {latent_h} latent px (factor "
              f"{image_size / latent_h:g}); `sparsedit train --model PRESET` assumes factor {TRAIN_VAE_FACTOR}",
              file=sys.stderr)
    meta = {
        "scale_factor": LATENT_SCALE,
        "vae": str(Path(vae_path).resolve()),
        "resolution": image_size,
        "source": str(Path(data).resolve()),
        "classes": dataset.classes,
        "flip": flip,
        "seed": seed if kind == "latents" else None,
    }
    return save_latents(out, store, labels, meta, kind=kind)  # type: ignore[arg-type]


def run_extract_latents(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    if args.seed is not None and args.kind == "moments":
        raise SparseditError("--seed draws the posterior samples of --kind latents; --kind moments stores mean and "
                             "log-variance and draws nothing: drop --seed")
    out = extract_latents(args.data, args.vae, args.out, image_size=args.image_size, kind=args.kind,
                          batch_size=args.batch_size, flip=args.flip, dtype=getattr(torch, args.dtype),
                          seed=args.seed or 0, device=device, num_workers=args.num_workers, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(f"wrote {out}")
    return 0
