"""Feature statistics shared by every Fréchet-style score.

The Fréchet distance between N(mu1, S1) and N(mu2, S2) is
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. We follow the numerical recipe of the
guided-diffusion ("ADM") evaluator (https://github.com/openai/guided-diffusion, evaluations/):
float64, ``scipy.linalg.sqrtm``, an eps-shifted retry when the product is singular, and dropping a
negligible imaginary part.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from sparsedit.errors import SparseditError


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an (N, D) feature matrix, in float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise SparseditError(
            f"need an (N, D) feature matrix with N >= 2, got shape {feats.shape}; pass more samples"
        )
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between two Gaussians given by mean vectors and covariance matrices."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SparseditError(
            f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}; compute both with the same feature network"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below, not reported as SciPy's warning
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            # Singular product: shift both covariances by eps * I, as the ADM evaluator does.
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise SparseditError(
                f"matrix square root has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g}); "
                "the feature covariances are degenerate: use more samples"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
