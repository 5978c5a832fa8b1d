"""How :mod:`sparsedit.eval.compare` scores sampled sets: the digits and ADM scorers, and the summary over seeds."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsedit.core.images import to_uint8
from sparsedit.errors import SparseditError
from sparsedit.eval.metrics.stats import feature_stats, frechet_distance
from sparsedit.train.data import DigitsDataset

__all__ = ["ADM_BATCH", "AdmScorer", "DigitsScorer", "Features", "aggregate", "blas_threads", "spread", "verdict"]

ADM_BATCH = 64  # images per Inception forward


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
