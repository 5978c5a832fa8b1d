"""A small digits CNN and the "FID (digits-CNN features)" score built on it.

The embedded digits (:mod:`sparsedit.train.data`) let every part of the library be trained and measured on
a laptop. To score generated digits we need a feature network that knows what digits look like:
:class:`DigitsClassifier` is a 3-conv + 2-linear CNN trained on the train split of the embedded
digits; its 128-d penultimate layer (before the ReLU) provides the features, its last layer the class
logits. The shipped weights live in ``sparsedit/assets/digits_cnn`` (safetensors + config.json).

:func:`digits_score` reports the Fréchet distance between the Gaussians fitted to the features of the
samples and of a reference set, and the fraction of samples the CNN assigns to their intended class.
This is **not** ImageNet FID: the numbers are only comparable with other digits-CNN scores computed
with the same weights, resolution and reference set.

Retrain the shipped weights with::

    python -m sparsedit.eval.metrics.digits train --out src/sparsedit/assets/digits_cnn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsedit.core.checkpoint import atomic_write, openable
from sparsedit.errors import SparseditError
from sparsedit.eval.metrics.stats import feature_stats, frechet_distance
from sparsedit.train.data import DIGITS_NUM_CLASSES, DigitsDataset, load_digits_array

__all__ = [
    "DigitsClassifier",
    "digits_score",
    "features_and_logits",
    "load_digits_classifier",
    "train_digits_classifier",
]

ARCH = "digits_cnn_v1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_EPOCHS = 30


class DigitsClassifier(nn.Module):
    """Digits CNN: three 3x3 conv layers (two 2x max-pools), a 128-d feature layer and 10 logits.

    Inputs are images in [-1, 1] of shape (N, 1 or 3, H, W) with H, W >= 8; 3-channel inputs are
    averaged over channels, and any size other than ``resolution`` is resized to it with bilinear
    interpolation (``align_corners=False``, no antialias).

    Args:
        resolution: the input side length the network works at (must be divisible by 4).
        widths: channels of the three conv layers.
        feature_dim: width of the penultimate (feature) layer.
        num_classes: number of logits.
    """

    def __init__(
        self,
        resolution: int = 16,
        widths: tuple[int, int, int] = (16, 32, 64),
        feature_dim: int = 128,
        num_classes: int = DIGITS_NUM_CLASSES,
    ) -> None:
        super().__init__()
        if resolution < 8 or resolution % 4:
            raise SparseditError(
                f"classifier resolution must be >= 8 and divisible by 4, got {resolution}; use 16 or 32"
            )
        self.config: dict[str, Any] = {
            "arch": ARCH,
            "resolution": int(resolution),
            "widths": [int(w) for w in widths],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
        }
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.fc1 = nn.Linear(w3 * (resolution // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    @property
    def resolution(self) -> int:
        """The side length inputs are resized to."""
        return int(self.config["resolution"])

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`features`."""
        return int(self.config["feature_dim"])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Validate ``x``, average 3 channels to 1 and resize to :attr:`resolution`."""
        if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[-2:]) < 8:
            raise SparseditError(
                f"digits classifier expects (N, 1|3, H, W) images with H, W >= 8, got {tuple(x.shape)}; "
                "pass image batches in [-1, 1]"
            )
        p = next(self.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=False
            )
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, feature_dim) penultimate-layer activations (before the ReLU)."""
        x = self.preprocess(x)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc1(x.flatten(1))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from :meth:`features` output."""
        return self.fc2(self.dropout(F.relu(features)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, num_classes) class logits."""
        return self.logits_from_features(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


# --------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------


def _build_from_config(config: dict[str, Any]) -> DigitsClassifier:
    if config.get("arch") != ARCH:
        raise SparseditError(f"classifier config has arch {config.get('arch')!r}, expected {ARCH!r}")
    model = DigitsClassifier(
        resolution=int(config["resolution"]),
        widths=tuple(int(w) for w in config["widths"]),  # type: ignore[arg-type]
        feature_dim=int(config["feature_dim"]),
        num_classes=int(config["num_classes"]),
    )
    model.config.update({k: v for k, v in config.items() if k not in model.config})
    return model


def _load_from_dir(directory: Path) -> DigitsClassifier:
    from safetensors.torch import load_file

    weights, config_path = directory / MODEL_FILE, directory / CONFIG_FILE
    for p in (weights, config_path):
        if not p.is_file():
            raise SparseditError(
                f"digits classifier file {str(p)!r} is missing; pass a directory with {MODEL_FILE} and "
                f"{CONFIG_FILE} (train one with `python -m sparsedit.eval.metrics.digits train --out DIR`)"
            )
    try:
        config = json.loads(config_path.read_text())
        model = _build_from_config(config)
        with openable(weights) as name:
            state = load_file(name)
        model.load_state_dict(state, strict=True)
    except SparseditError:
        raise
    except Exception as exc:  # corrupt JSON/safetensors, missing keys, shape mismatches
        raise SparseditError(
            f"cannot load the digits classifier from {str(directory)!r} ({exc}); retrain it with "
            "`python -m sparsedit.eval.metrics.digits train --out DIR`"
        ) from exc
    return model.eval()


def load_digits_classifier(path: str | os.PathLike[str] | None = None) -> DigitsClassifier:
    """Load a :class:`DigitsClassifier` in eval mode on the CPU.

    Args:
        path: a directory with ``model.safetensors`` and ``config.json``, or the ``.safetensors``
            file itself (``config.json`` next to it). ``None`` loads the weights shipped with
            sparsedit (trained at 16x16).
    """
    if path is None:
        asset = resources.files("sparsedit") / "assets" / "digits_cnn"
        with resources.as_file(asset) as directory:
            return _load_from_dir(Path(directory))
    p = Path(path)
    if p.is_file() or p.suffix == ".safetensors":
        p = p.parent
    if not p.exists():
        raise SparseditError(f"digits classifier path {str(path)!r} does not exist; check the path")
    return _load_from_dir(p)


# --------------------------------------------------------------------------------------------------
# Score
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def features_and_logits(
    classifier: DigitsClassifier, x: torch.Tensor, batch_size: int
) -> tuple[np.ndarray, torch.Tensor]:
    feats, logits = [], []
    for start in range(0, x.shape[0], batch_size):
        f = classifier.features(x[start : start + batch_size])
        feats.append(f.double().cpu())
        logits.append(classifier.logits_from_features(f).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits)


def digits_score(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    reference: torch.Tensor | None = None,
    classifier: DigitsClassifier | None = None,
    batch_size: int = 256,
) -> dict[str, float | int]:
    """FID (digits-CNN features) and class accuracy of a batch of generated digits.

    Args:
        samples: (N, 1|3, H, W) images in [-1, 1], N >= 2, H = W >= 8.
        labels: (N,) intended class of each sample, or ``None`` (then no ``class_accuracy``).
        reference: real images to compare with; default: all 1,797 embedded digits upscaled to the
            samples' resolution (:func:`sparsedit.train.data.load_digits_array`).
        classifier: feature network; default: :func:`load_digits_classifier` (shipped weights).
        batch_size: images per forward pass.

    Returns:
        ``{"fid_digits_cnn": float, "class_accuracy": float, "num_samples": int}``;
        ``class_accuracy`` (fraction of samples whose arg-max class equals their label) is present only
        when ``labels`` is given. The FID is the Fréchet distance between Gaussians fitted to the
        128-d features; it depends on N (small N biases it upwards), so compare scores at equal N.
    """
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise SparseditError(
            f"samples must be an (N, 1|3, H, W) tensor, got {getattr(samples, 'shape', type(samples))}; "
            "stack the generated images into one batch"
        )
    n = int(samples.shape[0])
    if n < 2:
        raise SparseditError(f"digits_score needs at least 2 samples, got {n}; generate more samples")
    if batch_size < 1:
        raise SparseditError(f"batch_size must be >= 1, got {batch_size}")
    if labels is not None and tuple(torch.as_tensor(labels).shape) != (n,):
        raise SparseditError(
            f"labels must have shape ({n},), got {tuple(torch.as_tensor(labels).shape)}; "
            "pass one intended class per sample or labels=None"
        )
    if classifier is None:
        classifier = load_digits_classifier()
    if reference is None:
        if samples.shape[-1] != samples.shape[-2] or samples.shape[-1] < 8:
            raise SparseditError(
                f"default reference needs square samples of side >= 8, got {tuple(samples.shape[-2:])}; "
                "pass reference= explicitly"
            )
        reference, _ = load_digits_array(resolution=int(samples.shape[-1]), channels=1)

    was_training = classifier.training
    classifier.eval()
    try:
        feats, logits = features_and_logits(classifier, samples, batch_size)
        ref_feats, _ = features_and_logits(classifier, reference, batch_size)
    finally:
        classifier.train(was_training)
    if not (np.isfinite(feats).all() and np.isfinite(ref_feats).all()):
        raise SparseditError("digits-CNN features are not finite; the samples contain NaN/inf values")
    mu1, sigma1 = feature_stats(feats)
    mu2, sigma2 = feature_stats(ref_feats)
    result: dict[str, float | int] = {
        "fid_digits_cnn": max(frechet_distance(mu1, sigma1, mu2, sigma2), 0.0),
        "num_samples": n,
    }
    if labels is not None:
        target = torch.as_tensor(labels).to(torch.int64).cpu()
        result["class_accuracy"] = float((logits.argmax(dim=1) == target).float().mean())
    return result


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


@torch.inference_mode()
def _accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model.logits(x[s : s + 512]).argmax(1) for s in range(0, len(x), 512)])
    return float((pred == y).float().mean())


def _fit(
    resolution: int, epochs: int, seed: int, batch_size: int, lr: float, max_shift: int
) -> tuple[DigitsClassifier, DigitsDataset, DigitsDataset]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = DigitsDataset("train", resolution=resolution, channels=1)
    test = DigitsDataset("test", resolution=resolution, channels=1)
    model = DigitsClassifier(resolution=resolution)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for s in range(0, len(train), batch_size):
            idx = perm[s : s + batch_size]
            x = _random_shift(train.images[idx], max_shift, gen)
            loss = F.cross_entropy(model.logits(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), train, test


def train_digits_classifier(
    out_dir: str | os.PathLike[str],
    resolution: int = 16,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int | None = None,
) -> dict[str, Any]:
    """Train a :class:`DigitsClassifier` on the train split of the embedded digits and save it.

    Adam (lr with cosine decay to 0), cross-entropy, batch 64, augmentation: random integer shifts of
    up to ``max_shift`` pixels (default ``resolution // 8``, i.e. one pixel of the original 8x8 grid)
    with background fill. Writes ``model.safetensors``, ``config.json`` (with the test accuracy) and
    ``TRAINING.md`` (command, seed, wall time, accuracy) into ``out_dir``; returns the config.
    Runs in well under a minute on a CPU at 16x16.
    """
    from safetensors.torch import save_file

    start_time = time.perf_counter()
    if max_shift is None:
        max_shift = max(1, resolution // 8)
    previous_threads = torch.get_num_threads()
    # One thread: these tiny convolutions are faster single-threaded (much faster on a busy machine).
    torch.set_num_threads(1)
    try:
        model, train, test = _fit(resolution, epochs, seed, batch_size, lr, max_shift)
    finally:
        torch.set_num_threads(previous_threads)
    model.eval()
    train_acc = _accuracy(model, train.images, train.labels)
    test_acc = _accuracy(model, test.images, test.labels)
    wall = time.perf_counter() - start_time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(model.config)
    training = {
        "data": "embedded UCI digits, train split (i % 5 != 4), 1438 images",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_shift": max_shift,
        "seed": seed,
        "train_accuracy": round(train_acc, 5),
        "test_accuracy": round(test_acc, 5),
        "test_samples": len(test),
        "wall_time_s": round(wall, 1),
        "torch": torch.__version__,
    }
    config["training"] = training
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / MODEL_FILE, lambda p: save_file(state, str(p), metadata={"arch": ARCH}))
    atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    command = (
        f"python -m sparsedit.eval.metrics.digits train --out {out_dir} --resolution {resolution} "
        f"--epochs {epochs} --seed {seed}"
    )
    notes = f"""# Digits CNN: how these weights were trained

Command (from the repository root, CPU only):

    {command}

| | |
|---|---|
| architecture | {ARCH}: conv3x3 {config["widths"]} (ReLU, 2x max-pool after conv 2 and 3), \
fc {config["feature_dim"]} (features), fc {config["num_classes"]} |
| input | {resolution}x{resolution}x1 in [-1, 1] (3 channels are averaged, other sizes resized bilinearly) |
| data | embedded UCI digits, train split (sample i with i % 5 != 4, {len(train)} images) |
| augmentation | random integer shifts of up to {max_shift} px, background fill |
| optimiser | Adam lr {lr}, cosine decay, batch {batch_size}, {epochs} epochs |
| seed | {seed} |
| train accuracy | {train_acc:.4f} |
| **test accuracy** | **{test_acc:.4f}** ({len(test)} images, i % 5 == 4) |
| wall time | {wall:.1f} s on {platform.machine()} CPU, 1 thread, torch \
{torch.__version__}, Python {platform.python_version()} |

Results can differ in the last digits across machines and torch versions (floating-point
non-determinism of CPU kernels); the seed fixes initialisation, shuffling and augmentation.
"""
    atomic_write(out / "TRAINING.md", lambda p: Path(p).write_text(notes))
    return config


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsedit.eval.metrics.digits", description="Train or evaluate the digits CNN."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a digits CNN and write it to --out")
    tr.add_argument("--out", required=True, help="output directory")
    tr.add_argument("--resolution", type=int, default=16)
    tr.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    tr.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="report the test-split accuracy of a digits CNN")
    ev.add_argument("--weights", default=None, help="directory or .safetensors (default: shipped)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            config = train_digits_classifier(args.out, args.resolution, args.epochs, args.seed)
            t = config["training"]
            print(f"test accuracy {t['test_accuracy']:.4f}, wall time {t['wall_time_s']:.1f} s -> {args.out}")
        else:
            model = load_digits_classifier(args.weights)
            test = DigitsDataset("test", resolution=model.resolution, channels=1)
            print(f"test accuracy {_accuracy(model, test.images, test.labels):.4f} ({len(test)} images)")
    except SparseditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
