"""Compare two class-conditional models so that the comparison cannot flatter either (``sparsedit compare``).

Typical use: a DiT (A) and the SparseDiT made from it (B). The rules, and why (docs/compare.md):

* **Same noise, same labels.** Sample ``i`` of seed ``s`` has label ``i % num_classes``; chunk ``k``
  (samples ``k*B .. (k+1)*B - 1``) is drawn from the generator seed ``shard_seed(s, k)`` of
  :mod:`sparsedit.eval.sample_fid`, for both models. Any difference is the models', not the noise's.
* **Several guidance scales** (default 1, 1.5, 4), shown side by side: guidance trades distribution
  match for class fidelity, and one scale can flatter either model.
* **Several seeds** (default 0, 1, 2): every number comes as per-seed values, mean and sample std,
  and a verdict only calls a difference resolved when it exceeds twice the spread over seeds.
* **A real floor**: real images scored against the same reference with the same function, at the same
  N: the score of a model that reproduced its training data exactly.

Digits models (pixel space, 10 classes, 1 or 3 channels, square side >= 8) are scored with the shipped
digits CNN against the held-out test split of the embedded digits; other models with ADM's Inception
metrics against a user-given reference batch (:mod:`sparsedit.eval.metrics.adm`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from sparsedit.core.checkpoint import atomic_write, openable, write_json, write_safetensors
from sparsedit.core.images import save_image, to_uint8
from sparsedit.diffusion.process import space_timesteps
from sparsedit.diffusion.sampling import generate, to_images
from sparsedit.errors import SparseditError
from sparsedit.eval.flops import schedule_macs
from sparsedit.eval.metrics.stats import feature_stats, frechet_distance
from sparsedit.eval.sample_fid import FidSampling, balanced_labels, manifest_settings, shard_seed, weights_sha256
from sparsedit.train.data import DigitsDataset

__all__ = [
    "CompareSettings",
    "aggregate",
    "blas_threads",
    "check_pair",
    "compare_models",
    "floor_indices",
    "is_digits_model",
    "paired_image",
    "paired_image_size",
    "paired_rmse",
    "prepare_out",
    "render_markdown",
    "results_table",
    "spread",
]

REPORT_FORMAT = 1
CACHE_FORMAT = 1
MODEL_TYPES = ("DiT", "SparseDiT")  # class-conditional image models that `generate` samples
OUTPUT_FILES = ("compare.json", "compare.md")  # plus paired_cfg{scale}.png
FLOOR_SALT = 0x5EED_F100  # mixed into the floor's seed so it is not the sampling seed itself
ADM_BATCH = 64  # images per Inception forward
MAX_PAIR_ROWS = 16  # classes shown in a paired image (all 10 for digits; the first 16 of ImageNet)
PAIR_GAP = 2  # px between A and B of one pair
PAIR_SEP = 8  # px between pairs, rows and borders
LABEL_W = 64  # px of the row-label column ("class 999")
HEADER_H = 44  # px of the header: two text lines and the A/B column marks


@dataclass(frozen=True)
class CompareSettings:
    """What to sample and score; with the two models it determines every number of the report."""

    cfg_scales: tuple[float, ...] = (1.0, 1.5, 4.0)  # 1 = no guidance, 1.5 = DiT's FID scale, 4 = its visual one
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 1000  # per model, per scale, per seed
    sampler: str = "ddim"
    steps: int = 50
    cfg_mode: str = "first3"
    batch_size: int = 250
    per_class: int = 4  # pairs per class in the paired image
    scale: int = 4  # integer (nearest-neighbour) upscaling of the paired image
    sampler_b: str | None = None  # B's own sampler and steps (None: A's), e.g. DiT at 250 DDPM vs SparseDiT at 25 DDIM
    steps_b: int | None = None

    def __post_init__(self) -> None:
        from sparsedit.diffusion.samplers import SAMPLERS
        from sparsedit.families.dit.model import CFG_MODES

        for name in ("cfg_scales", "seeds"):  # a string would be split into characters
            if not isinstance(getattr(self, name), tuple | list):
                raise SparseditError(f"{name} must be a tuple or list, not {getattr(self, name)!r}; e.g. (0, 1, 2)")
        object.__setattr__(self, "cfg_scales", tuple(float(c) for c in self.cfg_scales))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.cfg_scales or len(set(self.cfg_scales)) != len(self.cfg_scales):
            raise SparseditError(f"--cfg-scales must be distinct values, got {list(self.cfg_scales)}; e.g. 1 1.5 4")
        if any(not math.isfinite(c) or c <= 0 for c in self.cfg_scales):
            raise SparseditError(f"--cfg-scales must be finite and > 0, got {list(self.cfg_scales)}; 1 = no guidance")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise SparseditError(f"--seeds must be distinct integers >= 0, got {list(self.seeds)}; e.g. 0 1 2")
        if self.num_samples < 2:
            raise SparseditError(f"--num-samples must be >= 2 (FID needs a covariance), got {self.num_samples}")
        for flag, value in (("--steps", self.steps), ("--steps-b", self.steps_b or 1), ("--batch-size", self.batch_size),
                            ("--per-class", self.per_class), ("--scale", self.scale)):
            if value < 1:
                raise SparseditError(f"{flag} must be >= 1, got {value}")
        for sampler in (self.sampler, self.sampler_b or self.sampler):
            if sampler not in SAMPLERS:
                raise SparseditError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.cfg_mode not in CFG_MODES:
            raise SparseditError(f"unknown cfg mode {self.cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
        for model in ("a", "b"):  # a step count the 1000-step diffusion cannot be respaced to fails now, not later
            self.timesteps(model)

    def timesteps(self, model: str) -> list[int]:
        """The original timesteps model ``"a"`` or ``"b"`` is evaluated at (the MACs count follows them)."""
        sampler, steps = self.sampling(model)
        return space_timesteps(1000, f"ddim{steps}" if sampler == "ddim" else steps)

    def sampling(self, model: str) -> tuple[str, int]:
        """(sampler, steps) of model ``"a"`` or ``"b"``."""
        if model == "b":
            return self.sampler_b or self.sampler, self.steps_b or self.steps
        return self.sampler, self.steps

    @property
    def same_sampling(self) -> bool:
        return self.sampling("a") == self.sampling("b")

    def spec(self, cfg_scale: float, seed: int, model: str = "a") -> FidSampling:
        """The chunk layout, labels and noise seeds of one (scale, seed) set of ``model``: sample-fid's shards.

        Both models share the layout, labels and seeds; with different samplers they still start from the
        same x_T, but a stochastic sampler's later draws (DDPM) no longer line up step for step.
        """
        sampler, steps = self.sampling(model)
        return FidSampling(num_samples=self.num_samples, batch_size=self.batch_size, steps=steps,
                           sampler=sampler, cfg_scale=cfg_scale, cfg_mode=self.cfg_mode, seed=seed)


# --------------------------------------------------------------------------------------------------
# Checks


def is_digits_model(config: Any) -> bool:
    """True for a model the digits CNN can score: pixel space, 10 classes, 1 or 3 channels, square side >= 8."""
    h, w = config.latent_hw
    return (config.data_space == "pixel" and config.num_classes == 10 and config.in_channels in (1, 3)
            and h == w and h >= 8)


def check_pair(a: nn.Module, b: nn.Module, settings: CompareSettings) -> None:
    """Refuse (one line) two models that cannot be compared sample for sample under ``settings``."""
    for name, model in (("A", a), ("B", b)):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if kind not in MODEL_TYPES:
            raise SparseditError(f"model {name} is a {kind}; compare takes class-conditional DiT or SparseDiT models")
        if model.config.num_classes < 1:
            raise SparseditError(f"model {name} is unconditional (num_classes 0); compare takes class-conditional models")
    ca, cb = a.config, b.config
    for field, what in (("num_classes", "class counts"), ("latent_hw", "input sizes"),
                        ("in_channels", "channel counts"), ("data_space", "data spaces")):
        va, vb = getattr(ca, field), getattr(cb, field)
        if va != vb:
            raise SparseditError(f"the models' {what} differ ({field} {va} for A, {vb} for B); compare two models "
                                 "of one task, e.g. a DiT and the SparseDiT sparsified from it")
    guided = [c for c in settings.cfg_scales if c != 1.0]
    for name, cfg in (("A", ca), ("B", cb)):
        if guided and cfg.class_dropout_prob <= 0:
            raise SparseditError(f"model {name} was trained without a null class, so it cannot use CFG scale "
                                 f"{guided[0]:g}; pass --cfg-scales 1")


# --------------------------------------------------------------------------------------------------
# Sampling and the sample cache


def _sample_chunk(model: nn.Module, spec: FidSampling, k: int, device: torch.device) -> torch.Tensor:
    """Chunk ``k`` of a set in the model's space, float32 on the CPU: (n, C, H, W)."""
    start, stop = spec.shard_range(k)
    labels = torch.from_numpy(balanced_labels(start, stop, model.config.num_classes))
    out = generate(model, labels, sampler=spec.sampler, steps=spec.steps, eta=spec.eta, cfg_scale=spec.cfg_scale,
                   cfg_mode=spec.cfg_mode, seed=shard_seed(spec.seed, k), device=device, progress=False)
    return out.float().cpu()  # the copy to the CPU also waits for a GPU, so the timing is complete


def cache_key(model: nn.Module, spec: FidSampling, model_sha256: str, device: torch.device) -> dict[str, Any]:
    """Everything that determines a cached set of samples (the device type too: GPU kernels round differently)."""
    return {**manifest_settings(model, spec, model_sha256), "format": CACHE_FORMAT, "device_type": device.type,
            "content": "model-space samples, float32"}


def cache_path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"samples_{digest[:32]}.safetensors"


def load_cached(path: Path, key: dict[str, Any]) -> torch.Tensor | None:
    """The cached samples if ``path`` holds exactly ``key``'s set; None otherwise (then they are sampled again)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with openable(path) as name, safe_open(name, framework="pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != json.loads(json.dumps(key)):
                return None
            samples = f.get_tensor("samples")
    except Exception:  # unreadable or foreign file: sample again and replace it
        return None
    return samples if samples.shape[0] == key["num_samples"] else None


def _sample_sets(models: dict[str, nn.Module], specs: dict[str, FidSampling], device: torch.device,
                 cache: dict[str, Any], bar: Any) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """One (scale, seed) set of both models; the chunks of A and B alternate, so a machine whose speed
    drifts slows both alike. Returns the samples and the sampling seconds (None for a cached set)."""
    samples: dict[str, torch.Tensor] = {}
    seconds: dict[str, float | None] = {}
    paths: dict[str, tuple[Path, dict[str, Any]]] = {}
    for m, model in models.items():
        if cache["dir"] is not None:
            key = cache_key(model, specs[m], cache["sha"][m], device)
            paths[m] = (cache_path(cache["dir"], key), key)
            hit = load_cached(*paths[m])
            if hit is not None:
                samples[m], seconds[m] = hit, None
                bar.update(specs[m].num_shards)
    pending = [m for m in models if m not in samples]
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in pending}
    spent = dict.fromkeys(pending, 0.0)
    for k in range(specs["a"].num_shards):
        for m in pending:
            start = time.perf_counter()
            chunks[m].append(_sample_chunk(models[m], specs[m], k, device))
            spent[m] += time.perf_counter() - start
            bar.update(1)
    for m in pending:
        samples[m], seconds[m] = torch.cat(chunks[m]), spent[m]  # (N, C, H, W)
        if m in paths:
            path, key = paths[m]
            write_safetensors(path, {"samples": samples[m]}, metadata={"key": json.dumps(key, sort_keys=True)})
    return samples, seconds


# --------------------------------------------------------------------------------------------------
# Scorers: features once per image set, then scores from features (so the reference and the real
# pool are each featurised once, and the floor subsets are rows of the pool's features).

Features = dict[str, np.ndarray]


class DigitsScorer:
    """FID (digits-CNN features), class accuracy and per-class accuracy against the digits test split."""

    kind = "digits"
    metrics = ("fid", "accuracy")

    def __init__(self, side: int, num_classes: int) -> None:
        from sparsedit.eval.metrics.digits import load_digits_classifier

        self.classifier = load_digits_classifier()
        self.num_classes = num_classes
        test = DigitsDataset("test", resolution=side)  # 359 held-out images no model trained on
        self.ref_stats = feature_stats(self.features(test.images)["features"])
        train = DigitsDataset("train", resolution=side)  # 1,438 images: the real pool of the floor
        self.pool = self.features(train.images)
        self.pool_labels: np.ndarray | None = train.labels.numpy()
        self.reference = {"name": "embedded digits, held-out test split (i % 5 == 4)", "num_images": len(test)}
        self.pool_name = "embedded digits, train split (the data the digits models train on)"

    def features(self, images: torch.Tensor) -> Features:
        from sparsedit.eval.metrics.digits import features_and_logits

        feats, logits = features_and_logits(self.classifier.eval(), images.clamp(-1, 1), 256)
        return {"features": feats, "logits": logits.numpy()}

    def score(self, feats: Features, labels: np.ndarray | None) -> dict[str, Any]:
        mu, sigma = feature_stats(feats["features"])
        out: dict[str, Any] = {"fid": max(frechet_distance(mu, sigma, *self.ref_stats), 0.0)}
        if labels is not None:
            hit = feats["logits"].argmax(axis=1) == labels
            out["accuracy"] = float(hit.mean())
            out["per_class"] = [float(hit[labels == c].mean()) if (labels == c).any() else None
                                for c in range(self.num_classes)]
        return out


class AdmScorer:
    """ADM's FID, sFID, Inception Score and precision/recall against a reference batch (``.npz``)."""

    kind = "adm"
    metrics = ("fid", "sfid", "inception_score", "precision", "recall")

    def __init__(self, feature_model: Any, ref: Path, real: Path | None, device: torch.device, progress: bool) -> None:
        from sparsedit.eval.metrics.adm import load_batch_stats

        self.model, self.device, self.progress = feature_model, device, progress
        self.ref_feats = self._file_features(ref)
        stored = load_batch_stats(ref)  # ADM compares with the statistics stored in the batch when present
        self.ref_stats = {
            "pool": (stored["mu"], stored["sigma"]) if stored else feature_stats(self.ref_feats["pool"]),
            "spatial": (stored["mu_s"], stored["sigma_s"]) if stored else feature_stats(self.ref_feats["spatial"]),
        }
        self.reference = {"name": f"{ref.name} (ADM reference batch{', stored statistics' if stored else ''})",
                          "num_images": int(self.ref_feats["pool"].shape[0])}
        self.pool = self._file_features(real) if real is not None else None
        self.pool_labels = None
        self.pool_name = f"{real.name} (real images given with --real)" if real is not None else None

    def _file_features(self, path: Path) -> Features:
        from sparsedit.eval.metrics.adm import compute_features, open_image_batch

        with open_image_batch(path) as reader:
            return compute_features(reader.batches(ADM_BATCH), self.model, ADM_BATCH, self.device, self.progress,
                                    len(reader))

    def features(self, images: torch.Tensor) -> Features:
        from sparsedit.eval.metrics.adm import compute_features

        arr = to_uint8(images)  # (N, H, W, C) uint8
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)  # Inception takes RGB
        return compute_features(arr, self.model, ADM_BATCH, self.device)

    def score(self, feats: Features, labels: np.ndarray | None) -> dict[str, Any]:
        from sparsedit.eval.metrics.adm import inception_score, precision_recall, softmax

        precision, recall = precision_recall(self.ref_feats["pool"], feats["pool"], device=self.device)
        return {
            "fid": frechet_distance(*feature_stats(feats["pool"]), *self.ref_stats["pool"]),
            "sfid": frechet_distance(*feature_stats(feats["spatial"]), *self.ref_stats["spatial"]),
            "inception_score": inception_score(softmax(feats["logits"]))[0],
            "precision": precision,
            "recall": recall,
        }


def _adm_scorer(config: Any, vae: Any, inception_weights: Any, ref: Any, real: Any, feature_model: Any,
                device: torch.device, progress: bool) -> tuple[AdmScorer, nn.Module | None]:
    """Check the files the Inception path needs (one line naming the missing one), then build the scorer."""
    from sparsedit.eval.metrics.adm import open_image_batch
    from sparsedit.eval.metrics.inception import find_inception_weights, load_inception

    if ref is None:
        raise SparseditError(
            "these are not digits models, so compare scores them with ADM's Inception metrics and needs --ref REF.npz, "
            "a reference batch such as VIRTUAL_imagenet256_labeled.npz from guided-diffusion's evaluations (see "
            "docs/metrics.md, 'Files you need')")
    paths = [Path(p) for p in (ref, real) if p is not None]
    for p in paths:
        with open_image_batch(p):  # names a missing or malformed batch before anything slow runs
            pass
    if feature_model is None:
        find_inception_weights(inception_weights)  # names the file and where to download it
    decoder = None
    if config.data_space == "latent":
        from sparsedit.diffusion.vae import load_vae

        decoder = vae if isinstance(vae, nn.Module) else load_vae(vae, device, latent_channels=config.in_channels)
    elif vae is not None:
        raise SparseditError("these models work in pixel space; drop --vae")
    model = feature_model if feature_model is not None else load_inception(inception_weights, device)
    return AdmScorer(model, Path(ref), Path(real) if real is not None else None, device, progress), decoder


# --------------------------------------------------------------------------------------------------
# Aggregation (pure)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Per-seed values, their mean and sample standard deviation (None for a single seed)."""
    vals = [float(v) for v in values]
    return {"per_seed": vals, "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None}


def _ratio(b: float, a: float) -> float | None:
    if a == 0:
        return 1.0 if b == 0 else None
    return b / a


def _resolved(mean: float, std: float | None, null: float) -> bool | None:
    """Whether ``mean`` differs from ``null`` by at least twice the seed spread; None without a spread."""
    if std is None:
        return None
    return mean != null and abs(mean - null) >= 2 * std


def verdict(ratio: dict[str, Any] | None, gap: dict[str, Any] | None) -> str:
    """Plain words for one scale that claim no more than the seeds resolve (two std, a rule of thumb)."""
    if ratio is None:
        return "FID ratio undefined (A's FID is 0)"
    if ratio["std"] is None:
        return "one seed: no spread to judge a difference by (use 2+ seeds)"
    r, s = ratio["mean"], ratio["std"]
    if s == 0 and r == 1:
        words = "same FID on every seed"
    elif _resolved(r, s, 1.0):
        words = f"B {'worse' if r > 1 else 'better'} than A beyond the seed spread (FID)"
    else:
        words = "no FID difference resolved at this N (|ratio-1| < 2 std)"
    if gap is not None:
        g, t = gap["mean"], gap["std"]
        if t == 0 and g == 0:
            words += "; same accuracy"
        elif _resolved(g, t, 0.0):
            words += f"; B {'less' if g < 0 else 'more'} accurate beyond the spread"
        else:
            words += "; no accuracy difference resolved"
    return words


def _mean_per_class(rows: list[list[float | None]]) -> list[float | None]:
    out: list[float | None] = []
    for values in zip(*rows, strict=True):
        present = [v for v in values if v is not None]
        out.append(statistics.fmean(present) if present else None)
    return out


def aggregate(per_seed_a: list[dict[str, Any]], per_seed_b: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise one scale from the per-seed scores of A and B (same seed order, same metric keys).

    Each model's metrics get per-seed values, mean and std; FID ratio B/A and accuracy gap B - A (in
    points) are taken **per seed** (A and B share that seed's noise, so the pair is matched) and then
    summarised; per-class accuracy is averaged over seeds; ``verdict`` says what the spread resolves.
    """
    if len(per_seed_a) != len(per_seed_b) or not per_seed_a:
        raise SparseditError("aggregate needs the same non-zero number of seeds for A and B")
    out: dict[str, Any] = {}
    for name, rows in (("a", per_seed_a), ("b", per_seed_b)):
        summary: dict[str, Any] = {k: spread([r[k] for r in rows]) for k in rows[0] if k not in ("per_class", "seed")}
        if "per_class" in rows[0]:
            summary["per_class"] = _mean_per_class([r["per_class"] for r in rows])
        out[name] = summary
    ratios = [_ratio(b["fid"], a["fid"]) for a, b in zip(per_seed_a, per_seed_b, strict=True)]
    out["fid_ratio"] = spread(ratios) if all(r is not None for r in ratios) else None  # type: ignore[arg-type]
    has_acc = "accuracy" in per_seed_a[0]
    out["accuracy_gap_points"] = spread(
        [100 * (b["accuracy"] - a["accuracy"]) for a, b in zip(per_seed_a, per_seed_b, strict=True)]
    ) if has_acc else None
    out["verdict"] = verdict(out["fid_ratio"], out["accuracy_gap_points"])
    return out


# --------------------------------------------------------------------------------------------------
# Paired image


def paired_image_size(rows: int, per_class: int, h: int, w: int, scale: int) -> tuple[int, int]:
    """(height, width) of :func:`paired_image` for ``rows`` classes of ``per_class`` pairs of h x w images."""
    width = LABEL_W + per_class * (2 * w * scale + PAIR_GAP) + (per_class + 1) * PAIR_SEP
    height = HEADER_H + rows * h * scale + (rows + 1) * PAIR_SEP
    return height, width


def paired_image(images_a: torch.Tensor, images_b: torch.Tensor, labels: np.ndarray, per_class: int, scale: int,
                 header: Sequence[str]) -> np.ndarray:
    """One row per class (the first :data:`MAX_PAIR_ROWS` classes present), ``per_class`` pairs per row:
    A's sample, then B's sample from the same noise and label. (N, C, H, W) images in [-1, 1];
    returns an (H', W', 3) uint8 array; upscaled ``scale`` x by pixel repetition."""
    arr_a, arr_b = to_uint8(images_a), to_uint8(images_b)  # (N, h, w, C)
    if arr_a.shape[-1] == 1:
        arr_a, arr_b = np.repeat(arr_a, 3, axis=-1), np.repeat(arr_b, 3, axis=-1)
    _, h, w, _ = arr_a.shape
    classes = [int(c) for c in np.unique(labels)][:MAX_PAIR_ROWS]
    height, width = paired_image_size(len(classes), per_class, h, w, scale)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, line in enumerate(header[:2]):
        draw.text((PAIR_SEP, 4 + 14 * i), line, fill=(0, 0, 0), font=font)
    cell_w, cell_h = w * scale, h * scale
    pair_w = 2 * cell_w + PAIR_GAP
    for j in range(per_class):  # "A" over the left image of every pair, "B" over the right one
        x0 = LABEL_W + PAIR_SEP + j * (pair_w + PAIR_SEP)
        draw.text((x0, HEADER_H - 14), "A", fill=(0, 0, 160), font=font)
        draw.text((x0 + cell_w + PAIR_GAP, HEADER_H - 14), "B", fill=(160, 0, 0), font=font)
    for r, c in enumerate(classes):
        y0 = HEADER_H + PAIR_SEP + r * (cell_h + PAIR_SEP)
        draw.text((PAIR_SEP, y0 + cell_h // 2 - 6), f"class {c}", fill=(0, 0, 0), font=font)
        for j, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            x0 = LABEL_W + PAIR_SEP + j * (pair_w + PAIR_SEP)
            for dx, arr in ((0, arr_a), (cell_w + PAIR_GAP, arr_b)):
                big = arr[idx].repeat(scale, axis=0).repeat(scale, axis=1)  # nearest neighbour
                canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (x0 + dx, y0))
    return np.asarray(canvas)


def paired_name(cfg_scale: float) -> str:
    return f"paired_cfg{cfg_scale:g}.png"


# --------------------------------------------------------------------------------------------------
# Output folder


def prepare_out(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a non-empty ``out`` without ``overwrite`` (checked before any sampling; creates nothing)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SparseditError(f"--out {path} is a file; choose a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SparseditError(f"{path} is not empty; pass --overwrite (replaces only compare.json, compare.md and "
                             "paired_cfg*.png there, other files are kept) or choose another --out")
    return path


def remove_own_outputs(path: Path) -> None:
    """Delete a previous run's outputs (only compare's own file names), so no stale paired image remains."""
    images = [p for p in path.glob("paired_cfg*.png") if re.fullmatch(r"paired_cfg[-+.0-9e]+\.png", p.name)]
    for own in [*(path / f for f in OUTPUT_FILES), *images]:
        own.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# The comparison


def blas_threads(threads: int) -> contextlib.AbstractContextManager[Any]:
    """Give numpy/scipy's BLAS (the FID matrix square root) the same thread count as torch.

    Its default is every core; on a loaded 2-core machine that made ``scipy.linalg.sqrtm`` of a
    128x128 matrix take about 1 s instead of 5 ms. Uses threadpoolctl when it is installed (it comes
    with scikit-learn); without it the BLAS default stays.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _macs(models: dict[str, nn.Module], s: CompareSettings) -> dict[str, Any]:
    """GMACs per forward (mean under each model's own sampling timesteps) and per sampling run."""
    report, runs, steps_text = {}, {}, {}
    for m, model in models.items():
        sampler, _ = s.sampling(m)
        timesteps = s.timesteps(m)
        report[m] = schedule_macs(model.config, timesteps)
        runs[m] = report[m]["gmacs"] * len(timesteps)
        steps_text[m] = f"{len(timesteps)} {sampler} steps of 1000"
    return {
        "gmacs_per_forward": {m: r["gmacs"] for m, r in report.items()},
        "gmacs_min_max": {m: [r["gmacs_min"], r["gmacs_max"]] for m, r in report.items()},
        "gmacs_per_sample": runs,  # one unguided sampling run; guidance doubles both
        "params": {m: r["params"] for m, r in report.items()},
        "flops_ratio_a_over_b": report["a"]["gmacs"] / report["b"]["gmacs"],
        "run_flops_ratio_a_over_b": runs["a"] / runs["b"],
        "timesteps": steps_text["a"] if s.same_sampling else f"A: {steps_text['a']}; B: {steps_text['b']}",
    }


def paired_rmse(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square difference between A's and B's samples of the same noise and label, in the models'
    data space (pixels clamped to [-1, 1], or latents): 0 when B reproduces A's samples exactly. How far B
    has drifted from A, whatever their FIDs: a drop-in replacement keeps it small."""
    if model.config.data_space == "pixel":
        a, b = a.clamp(-1, 1), b.clamp(-1, 1)
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def _set_features(scorer: Any, model: nn.Module, samples: torch.Tensor, decoder: nn.Module | None, chunk: int,
                  device: torch.device) -> Features:
    """Features of one sampled set, decoded and featurised chunk by chunk (bounded memory for 256 px images)."""
    parts = [scorer.features(to_images(model, x.to(device), decoder).cpu()) for x in samples.split(chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def floor_indices(seed: int, pool_size: int, num_samples: int) -> np.ndarray:
    """The floor's real images for ``seed``: min(N, pool) distinct pool indices, a seeded draw without replacement."""
    n = min(num_samples, pool_size)
    return np.sort(np.random.default_rng([FLOOR_SALT, seed]).choice(pool_size, size=n, replace=False))


def _floor(scorer: Any, s: CompareSettings) -> dict[str, Any]:
    """Real-vs-real: per seed, min(N, pool) distinct real images (seeded draw without replacement)."""
    if scorer.pool is None:
        return {"available": False, "note": "no --real batch given, so no real floor: without it the FIDs have no "
                "real-vs-real scale to be read against (pass --real REAL.npz with real images, e.g. a slice of "
                "ImageNet val, at least N of them)"}
    size = int(next(iter(scorer.pool.values())).shape[0])
    n = min(s.num_samples, size)
    rows = []
    for seed in s.seeds:
        idx = floor_indices(seed, size, s.num_samples)
        labels = scorer.pool_labels[idx] if scorer.pool_labels is not None else None
        rows.append({"seed": seed, **scorer.score({k: v[idx] for k, v in scorer.pool.items()}, labels),
                     "indices_sha256": hashlib.sha256(idx.tobytes()).hexdigest()[:16]})
    summary = {k: spread([r[k] for r in rows]) for k in scorer.metrics if k in rows[0]}
    return {"available": True, "source": scorer.pool_name, "pool_size": size, "num_images": n,
            "capped": n < s.num_samples, "per_seed": rows, **summary}


def compare_models(
    a: nn.Module,
    b: nn.Module,
    settings: CompareSettings | None = None,
    *,
    names: Sequence[str] = ("A", "B"),
    device: str | torch.device = "cpu",
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | nn.Module | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    ref: str | os.PathLike[str] | None = None,
    real: str | os.PathLike[str] | None = None,
    feature_model: Any = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Compare ``a`` and ``b`` under ``settings``; returns the JSON-able report.

    Both models sample identical noise and labels for every (CFG scale, seed); they are put in eval
    mode and moved to ``device``. Digits models are scored with the digits CNN; other models need
    ``ref`` (an ADM reference ``.npz``), Inception weights (``inception_weights`` or where
    :func:`~sparsedit.eval.metrics.inception.find_inception_weights` looks; ``feature_model`` replaces the
    network, as in :func:`sparsedit.eval.metrics.adm.evaluate`), ``vae`` for latent models, and ``real``
    for the floor. ``cache_dir`` reuses sampled sets across runs. With ``out``, writes ``compare.json``,
    ``compare.md`` and ``paired_cfg{scale}.png`` there (see :func:`prepare_out` for ``overwrite``).
    """
    s = settings or CompareSettings()
    wall = time.perf_counter()
    if len(names) != 2 or not all(str(n).strip() for n in names):
        raise SparseditError(f"--names takes two non-empty names, got {list(names)}")
    check_pair(a, b, s)
    dev = torch.device(device)
    digits = is_digits_model(a.config)
    if digits and any(x is not None for x in (vae, inception_weights, ref, real, feature_model)):
        raise SparseditError("these are digits models, scored with the digits CNN against the held-out test split; "
                             "drop --vae/--inception-weights/--ref/--real")
    out_dir = prepare_out(out, overwrite) if out is not None else None
    models = {"a": a.eval().to(dev), "b": b.eval().to(dev)}
    with blas_threads(torch.get_num_threads()):  # scipy's BLAS on as many threads as torch (see blas_threads)
        decoder = None
        if digits:
            scorer: Any = DigitsScorer(a.config.latent_hw[0], a.config.num_classes)
        else:
            scorer, decoder = _adm_scorer(a.config, vae, inception_weights, ref, real, feature_model, dev, progress)
        sha = {m: weights_sha256(model) for m, model in models.items()} if cache_dir is not None else {}
        cache = {"dir": Path(cache_dir) if cache_dir is not None else None, "sha": sha}
        results, pairs, timing = _run_sets(models, scorer, decoder, s, dev, cache, progress)
        floor = _floor(scorer, s)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "settings": asdict(s),
        "names": {"a": str(names[0]), "b": str(names[1])},
        "models": {m: {"class": type(model).__name__, "config": model.config.to_dict(), "sha256": sha.get(m)}
                   for m, model in models.items()},
        "scorer": scorer.kind,
        "reference": scorer.reference,
        "label_rule": "label(i) = i % num_classes",
        "noise_rule": "chunk k of seed s: generator seed shard_seed(s, k) of sparsedit.eval.sample_fid, same for A and B",
        "results": results,
        "floor": floor,
        "cost": _macs(models, s),
        "timing": timing,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                        "threads": torch.get_num_threads(), "device": str(dev)},
        "command": command,
    }
    if out_dir is not None:
        report["outputs"] = [*OUTPUT_FILES, *(paired_name(c) for c in pairs)]
    report["wall_seconds"] = time.perf_counter() - wall
    if out_dir is not None:
        _write_outputs(out_dir, report, pairs)
    return report


def _run_sets(models: dict[str, nn.Module], scorer: Any, decoder: nn.Module | None, s: CompareSettings,
              dev: torch.device, cache: dict[str, Any], progress: bool) -> tuple[list[dict[str, Any]], dict, dict]:
    """Sample and score every (scale, seed) set of both models; returns the per-scale results, the
    first seed's pairs for the paired images, and the timing."""
    from tqdm.auto import tqdm

    num_classes = models["a"].config.num_classes
    labels = balanced_labels(0, s.num_samples, num_classes)  # the same for every set
    keep = np.concatenate([np.flatnonzero(labels == c)[: s.per_class] for c in range(min(num_classes, MAX_PAIR_ROWS))])
    seconds: dict[str, dict[str, float]] = {"a": {}, "b": {}}
    cached_sets = {"a": 0, "b": 0}
    results, pairs = [], {}
    bar = tqdm(total=len(s.cfg_scales) * len(s.seeds) * (2 * s.spec(1.0, 0).num_shards + 2), unit="chunk",
               desc="compare", file=sys.stderr, disable=not progress)
    try:
        for cfg_scale in s.cfg_scales:
            rows: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
            distances = []
            for seed in s.seeds:
                bar.set_postfix_str(f"cfg {cfg_scale:g} seed {seed}: sampling")
                specs = {m: s.spec(cfg_scale, seed, m) for m in ("a", "b")}
                samples, secs = _sample_sets(models, specs, dev, cache, bar)
                bar.set_postfix_str(f"cfg {cfg_scale:g} seed {seed}: scoring")
                distances.append(paired_rmse(models["a"], samples["a"], samples["b"]))
                for m in ("a", "b"):
                    if secs[m] is None:
                        cached_sets[m] += 1
                    else:
                        seconds[m][f"{cfg_scale:g}"] = seconds[m].get(f"{cfg_scale:g}", 0.0) + secs[m]
                    feats = _set_features(scorer, models[m], samples[m], decoder, s.batch_size, dev)
                    rows[m].append({"seed": seed, **scorer.score(feats, labels)})
                    bar.update(1)
                if seed == s.seeds[0]:  # the paired image uses the first seed's samples (no extra sampling)
                    pairs[cfg_scale] = (*(to_images(models[m], samples[m][keep].to(dev), decoder).cpu()
                                          for m in ("a", "b")), labels[keep])
            results.append({"cfg_scale": cfg_scale, "per_seed": rows, **aggregate(rows["a"], rows["b"]),
                            "paired_rmse": spread(distances)})
    finally:
        bar.close()
    timing = {"sampling_seconds": {m: sum(v.values()) for m, v in seconds.items()},
              "sampling_seconds_by_scale": seconds, "cached_sets": cached_sets}
    return results, pairs, timing


def _write_outputs(out_dir: Path, report: dict[str, Any], pairs: dict[float, tuple]) -> None:
    """Paired images, compare.md, then compare.json (last: its presence marks a complete run); all atomic."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_own_outputs(out_dir)
    s, names = report["settings"], report["names"]
    for cfg_scale, (img_a, img_b, labels) in pairs.items():
        header = [f"CFG scale {cfg_scale:g}: each pair is A | B from the same noise and label (seed {s['seeds'][0]})",
                  f"A = {names['a']}    B = {names['b']}"]
        image = paired_image(img_a, img_b, labels, s["per_class"], s["scale"], header)
        save_image(image, out_dir / paired_name(cfg_scale))
    # errors=: a path that is not valid UTF-8 (Linux names are bytes) is written with escapes, not refused
    atomic_write(out_dir / "compare.md", lambda tmp: tmp.write_text(render_markdown(report), errors="backslashreplace"))
    write_json(out_dir / "compare.json", report)


# --------------------------------------------------------------------------------------------------
# Markdown


def _pm(summary: dict[str, Any] | None, digits: int, scale: float = 1.0) -> str:
    if summary is None:
        return "n/a"
    mean = f"{summary['mean'] * scale:.{digits}f}"
    return mean if summary["std"] is None else f"{mean} ± {summary['std'] * scale:.{digits}f}"


def _scale_label(c: float) -> str:
    return f"{c:g} (no guidance)" if c == 1.0 else f"{c:g}"


def results_table(report: dict[str, Any]) -> str:
    """The main table: one row per CFG scale, then the real floor."""
    digits = report["scorer"] == "digits"
    if digits:
        head = ["CFG scale", "FID A", "FID B", "FID ratio B/A", "accuracy A", "accuracy B", "gap B-A (points)",
                "paired RMSE", "verdict"]
    else:
        head = ["CFG scale", "FID A", "FID B", "FID ratio B/A", "sFID A", "sFID B", "IS A", "IS B", "precision A",
                "precision B", "recall A", "recall B", "paired RMSE", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        row = [_scale_label(r["cfg_scale"]), _pm(r["a"]["fid"], 2), _pm(r["b"]["fid"], 2), _pm(r["fid_ratio"], 3)]
        if digits:
            row += [_pm(r["a"]["accuracy"], 3), _pm(r["b"]["accuracy"], 3), _pm(r["accuracy_gap_points"], 1)]
        else:
            for k, d in (("sfid", 2), ("inception_score", 2), ("precision", 3), ("recall", 3)):
                row += [_pm(r["a"][k], d), _pm(r["b"][k], d)]
        lines.append("| " + " | ".join(row + [_pm(r.get("paired_rmse"), 3), r["verdict"]]) + " |")
    f = report["floor"]
    if f["available"]:
        label = f"real floor ({f['num_images']} real images per seed)"
        row = [label, _pm(f["fid"], 2), "", ""]
        if digits:
            row += [_pm(f["accuracy"], 3), "", ""]
        else:
            for k, d in (("sfid", 2), ("inception_score", 2), ("precision", 3), ("recall", 3)):
                row += [_pm(f[k], d), ""]
        lines.append("| " + " | ".join(row + ["", "what a model reproducing real data exactly would score"]) + " |")
    return "\n".join(lines)


def _sampling_text(s: dict[str, Any]) -> str:
    a = f"{s['sampler']} {s['steps']} steps"
    b = f"{s.get('sampler_b') or s['sampler']} {s.get('steps_b') or s['steps']} steps"
    if a == b:
        return a
    return (f"A samples with {a}, B with {b} (same x_T per sample; the samplers' later steps differ, so the pairs "
            "match in noise only at the start)")


def render_markdown(report: dict[str, Any]) -> str:
    """The readable report: settings in words, the table, the floor, per-class accuracy, cost."""
    s, names, f = report["settings"], report["names"], report["floor"]
    digits = report["scorer"] == "digits"
    seeds = ", ".join(str(x) for x in s["seeds"])
    ref = report["reference"]
    parts = [
        f"# Model comparison: A = {names['a']}, B = {names['b']}",
        "",
        f"A: {report['models']['a']['class']}, B: {report['models']['b']['class']}. Both models sample the **same "
        "noise and labels** (sample i has class i % num_classes; chunk k of seed s is drawn from a seed derived from "
        f"(s, k)). N = **{s['num_samples']} samples per model, per CFG scale, per seed**; seeds {seeds}; "
        f"{_sampling_text(s)}, cfg mode {s['cfg_mode']}, batch {s['batch_size']}. Every value is the "
        "mean ± sample std over the seeds; the FID ratio and the accuracy gap are taken per seed (A and B share "
        "that seed's noise), then averaged. All scales are shown side by side: guidance trades distribution match "
        "for class fidelity, and no single scale stands for a model.",
        "",
        f"Reference set: {ref['name']}, {ref['num_images']} images.",
    ]
    if digits:
        parts += [
            "Scores come from the small digits CNN shipped with sparsedit: **FID (digits-CNN features) is not "
            "ImageNet FID**; it is only comparable within this table (same network, reference set and N). Lower FID "
            "is better and it is biased upwards at small N. Accuracy = fraction of samples the CNN assigns to their "
            "intended class.",
        ]
    else:
        parts += ["Scores: ADM's evaluator (InceptionV3; FID and sFID lower is better, IS, precision and recall "
                  "higher). Comparable within this table (same N and reference)."]
    parts += ["", results_table(report), ""]
    if f["available"]:
        cap = (f" (capped: only {f['pool_size']} real images exist, so the floor is at N = {f['num_images']}, not "
               f"{s['num_samples']}; FID is biased upwards at smaller N)" if f["capped"] else "")
        parts.append(
            f"Real floor: per seed, {f['num_images']} distinct images drawn without replacement from {f['source']}, "
            f"scored against the same reference with the same function{cap}. It is what a model that reproduced "
            "its training data exactly would score at this N: model values near it are as good as this measurement "
            "can tell.")
    else:
        parts.append(f"Real floor: {f['note']}.")
    space = "pixels in [-1, 1]" if report["models"]["a"]["config"]["data_space"] == "pixel" else "latents"
    parts += ["", f"Paired RMSE: the root mean square difference between A's and B's samples of the same noise and "
              f"label ({space}); 0 means B reproduces A's samples, whatever the FIDs. It tells a drop-in replacement "
              "(small) from a model that has drifted to other images, better or worse (large)."]
    parts += ["", "Verdicts call a difference resolved only when it exceeds twice the standard deviation over seeds "
              "(a rule of thumb, not a significance test; with few seeds the std itself is rough). Per-seed values "
              "are in compare.json."]
    if digits:
        scales = [r["cfg_scale"] for r in report["results"]]
        head = ["class"] + [f"{m} @ {c:g}" for c in scales for m in ("A", "B")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        num_classes = len(report["results"][0]["a"]["per_class"])
        for k in range(num_classes):
            cells = [str(k)]
            for r in report["results"]:
                for m in ("a", "b"):
                    v = r[m]["per_class"][k]
                    cells.append("n/a" if v is None else f"{v:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        parts += ["", "## Per-class accuracy (mean over seeds)", "", *lines]
    c, t = report["cost"], report["timing"]
    cached = t["cached_sets"]
    parts += [
        "",
        "## Cost",
        "",
        "| | A | B |",
        "|---|---|---|",
        f"| parameters (M) | {c['params']['a'] / 1e6:.2f} | {c['params']['b'] / 1e6:.2f} |",
        f"| GMACs per forward (mean over the {c['timesteps']}) | {c['gmacs_per_forward']['a']:.4f} | "
        f"{c['gmacs_per_forward']['b']:.4f} |",
        f"| sampling wall seconds (all scales and seeds, sets sampled here) | {t['sampling_seconds']['a']:.1f} | "
        f"{t['sampling_seconds']['b']:.1f} |",
        f"| sets taken from the cache (not timed) | {cached['a']} | {cached['b']} |",
        "",
        f"FLOPs ratio A/B: **{c['flops_ratio_a_over_b']:.3f}x** per forward, **{c['run_flops_ratio_a_over_b']:.3f}x** "
        "per sampling run (with guidance both models run each forward on a doubled batch). Wall seconds were "
        "measured in this one process with the chunks of A and B alternating; they depend on the machine and its "
        "load.",
    ]
    images = [paired_name(r["cfg_scale"]) for r in report["results"]]
    env = report["environment"]
    if "outputs" in report:
        parts += ["", f"Paired images: {', '.join(f'`{i}`' for i in images)} (one row per class, each pair A | B "
                  f"from the same noise and label, seed {s['seeds'][0]})."]
    parts += [
        "",
        f"Environment: Python {env['python']}, torch {env['torch']}, {env['platform']}, {env['threads']} threads, "
        f"{env['device']}; {report['wall_seconds']:.0f}s in all.",
    ]
    if report.get("command"):
        parts += ["", "```", report["command"], "```"]
    return "\n".join(parts) + "\n"
