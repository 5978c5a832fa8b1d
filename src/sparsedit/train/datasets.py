"""What a run trains on: a data set opened by name, the check that a model fits it, and the order of its batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from sparsedit.encoders.vae import VAE_DOWNSAMPLE
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.train.latents import LatentsDataset

__all__ = ["StepBatchSampler", "check_model_fits_data", "describe_latents", "open_dataset", "text_conditioned"]


# --------------------------------------------------------------------------------------------
# data: the order is a pure function of (seed, step) so that resuming needs no loader state
# --------------------------------------------------------------------------------------------


class StepBatchSampler:
    """Yields this rank's index batches from ``start_step`` on: epoch e is ``randperm(n, seed + e)``
    split across ranks; incomplete batches at an epoch's end are dropped."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start_step: int, dataset: Any = None):
        self.per_epoch = n // (batch * world)
        if self.per_epoch == 0:
            raise SparseditError(f"the data set has {n} items, fewer than one global batch of {batch * world}; "
                                 "lower --batch-size or add data")
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start = start_step
        self.dataset = dataset

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)  # fresh posterior samples for latent moments
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            mine = perm[self.rank :: self.world]
            for k in range(offset, self.per_epoch):
                yield mine[k * self.batch : (k + 1) * self.batch].tolist()
            step += self.per_epoch - offset


# --------------------------------------------------------------------------------------------
# what to train on, and what to train
# --------------------------------------------------------------------------------------------


def text_conditioned(config: Any) -> bool:
    """PixArt-alpha and Latte-T2V take T5 caption embeddings; DiT and class/unconditional Latte take labels."""
    return family_of(config).text_conditioned


def open_dataset(spec: str, image_size: int | None = None, channels: int = 1, seed: int = 0) -> tuple[Dataset, dict]:
    """``"digits"`` (embedded), a latents directory (``sparsedit extract-latents``) or an image folder.

    Returns the data set and a description (kind, resolution, channels, classes, data_space).
    """
    import sparsedit.train.data as D

    path = Path(spec)
    if spec == "digits":
        res = image_size or 16
        ds = D.DigitsDataset(split="train", resolution=res, channels=channels)
        info = {"kind": "digits", "resolution": res, "channels": channels, "num_classes": 10, "data_space": "pixel"}
    elif path.is_dir() and (path / D.META_FILE).exists():
        ds = D.LatentsDataset(path, seed=seed, apply_scale_factor=True)
        info = describe_latents(ds)
        if image_size is not None and image_size != info.get("resolution"):
            raise SparseditError(f"--image-size {image_size}: the latents in {path} were made at "
                                 f"{info.get('resolution')} px; drop --image-size or extract latents at that size")
    elif path.is_dir():
        res = image_size or 32
        ds = D.ImageFolderDataset(path, resolution=res, channels=3 if channels == 1 else channels)
        info = {"kind": "folder", "resolution": res, "channels": 3 if channels == 1 else channels,
                "num_classes": len(ds.classes), "data_space": "pixel"}
    else:
        raise SparseditError(f"--data {spec!r} is neither 'digits' nor a directory; pass 'digits', an image folder "
                             "(one subfolder per class) or a latents directory from `sparsedit extract-latents`")
    info["path"] = spec if spec == "digits" else str(path.resolve())
    return ds, info


def describe_latents(ds: LatentsDataset) -> dict[str, Any]:
    """What a latents directory holds, as :func:`open_dataset` records it (frames, captions and pooled text vectors
    only when present)."""
    c, *_, h, w = ds.latent_shape
    info: dict[str, Any] = {"kind": "latents", "resolution": int(ds.meta.get("resolution", h * VAE_DOWNSAMPLE)),
                            "latent_size": [h, w], "channels": c, "num_classes": ds.num_classes, "data_space": "latent"}
    if ds.num_frames is not None:
        info["num_frames"] = ds.num_frames
    if ds.caption_shape is not None:
        info.update(caption_shape=list(ds.caption_shape), labels=ds.labels is not None,
                    null_caption=ds.null_caption is not None)
    if ds.pooled_dim is not None:
        info.update(pooled_dim=ds.pooled_dim, null_pooled=ds.null_pooled is not None)
    return info


def _pooled_problems(config: Any, info: dict) -> list[str]:
    """SD3 / FLUX take a pooled text vector (``pooled_channels`` wide) beside the caption; other models take none."""
    width, data_width = getattr(config, "pooled_channels", None), info.get("pooled_dim")
    name = getattr(config, "model_type", "model")
    if width is None:
        if data_width is None:
            return []
        return [f"this {name} takes no pooled text vector but the data holds {data_width}-wide ones, which it would "
                "ignore (write the directory without save_latents(..., pooled=...))"]
    if data_width is None:
        return [f"this {name} takes a {width}-wide pooled text vector beside the caption, the data has none: write it "
                "with save_latents(..., pooled=...)"]
    if data_width != width:
        return [f"pooled text vector width {width} vs {data_width} in the data"]
    return []


def _conditioning_problems(config: Any, info: dict) -> list[str]:
    """Why the data cannot condition the model: labels for class models, T5 captions for text models, and pooled
    text vectors exactly for the models that take them (SD3, FLUX)."""
    return _caption_problems(config, info) + _pooled_problems(config, info)


def _caption_problems(config: Any, info: dict) -> list[str]:
    """Labels for class models, T5 captions of the model's width (and null caption length) for text models."""
    caption = info.get("caption_shape")
    if not text_conditioned(config):
        if config.num_classes and not info.get("labels", True):
            return ["a class-conditional model vs data without class labels"]
        if config.num_classes < info["num_classes"]:
            return [f"{config.num_classes} classes vs {info['num_classes']} in the data"]
        return []
    if caption is None:
        return ["a text-conditional model vs data without caption embeddings (save_latents(..., captions=...))"]
    if caption[1] != config.caption_channels:
        return [f"caption width {config.caption_channels} vs {caption[1]} in the data"]
    null_length = getattr(config, "null_caption_length", 0)
    if null_length and config.class_dropout_prob and caption[0] != null_length:
        # The model drops captions to its stored null caption, which needs captions of the same length.
        return [f"{null_length} caption tokens (its null caption's length) vs {caption[0]} in the data"]
    return []


def check_model_fits_data(config: Any, info: dict) -> None:
    """A one-line error listing every way ``config`` does not fit the data described by ``info``."""
    size = info.get("latent_size") or [info["resolution"]] * 2
    problems = []
    if config.in_channels != info["channels"]:
        problems.append(f"{config.in_channels} input channels vs {info['channels']} in the data")
    if list(config.latent_hw) != list(size):
        problems.append(f"input size {config.latent_hw} vs {tuple(size)} in the data")
    frames = info.get("num_frames")
    model_frames = family_of(config).frames
    if model_frames is not None and frames != model_frames:
        problems.append(f"{model_frames} frames vs {frames or 'no frames (images)'} in the data")
    elif model_frames is None and frames is not None:
        problems.append(f"an image model vs videos of {frames} frames in the data")
    problems += _conditioning_problems(config, info)
    if config.data_space != info["data_space"]:
        problems.append(f"a {config.data_space}-space model vs {info['data_space']} data")
    if problems:
        raise SparseditError(f"the model does not fit the data: {'; '.join(problems)}; pick matching --data/--image-size")
