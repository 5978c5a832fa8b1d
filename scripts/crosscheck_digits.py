"""A second opinion on `sparsedit compare` for digits models, with a scorer that shares nothing with ours.

`sparsedit compare` scores digits with the shipped digits CNN. This script re-scores two models on
fresh samples with scikit-learn instead: samples are average-pooled back to the digits' native 8x8
grid; a PCA (20 components) fitted on the 1,438 real train-split digits gives the features of a
Fréchet distance to the held-out test split, and an RBF support-vector classifier trained on the
train split gives the class accuracy. Real test digits are scored the same way as a floor.

Needs scikit-learn and scipy (`pip install -e ".[test]"`). Example (fresh seeds 100-102):

    python scripts/crosscheck_digits.py src/sparsedit/assets/digits_dit runs/demo/finetune/model \\
        --num-samples 1000 --seeds 100 101 102
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.svm import SVC

from sparsedit import load_model
from sparsedit.diffusion.sampling import generate
from sparsedit.train.data import DigitsDataset


def to_native(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) in [-1, 1] -> (N, 64) on the raw digits' 0..16 scale (8x8, average-pooled)."""
    x = F.adaptive_avg_pool2d(images.float().clamp(-1, 1), 8)
    return ((x + 1) * 8).flatten(1).numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root.real))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 4.0])
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    args = p.parse_args()

    train, test = DigitsDataset("train", resolution=16), DigitsDataset("test", resolution=16)
    x_train, x_test = to_native(train.images), to_native(test.images)
    pca = PCA(n_components=20, random_state=0).fit(x_train)
    svc = SVC(kernel="rbf", gamma="scale", C=10.0).fit(x_train, train.labels.numpy())
    ref = pca.transform(x_test)
    floor_acc = (svc.predict(x_test) == test.labels.numpy()).mean()
    floor_fd = frechet(pca.transform(x_train), ref)
    print(f"real floor: train digits vs test digits Frechet {floor_fd:.2f}; SVC test accuracy {floor_acc:.3f}")
    models = {"A": load_model(args.a).eval(), "B": load_model(args.b).eval()}
    labels = torch.arange(args.num_samples) % 10
    print("| CFG | Frechet A | Frechet B | ratio B/A (per seed) | accuracy A | accuracy B |")
    print("|---|---|---|---|---|---|")
    for cfg in args.cfg_scales:
        rows = {"A": [], "B": []}
        for seed in args.seeds:
            for name, model in models.items():
                x = torch.cat([generate(model, labels[i:i + 250], sampler="ddim", steps=args.steps, cfg_scale=cfg,
                                        seed=seed * 1000 + k, progress=False)
                               for k, i in enumerate(range(0, args.num_samples, 250))])
                feats = to_native(x)
                acc = (svc.predict(feats) == labels.numpy()).mean()
                rows[name].append((frechet(pca.transform(feats), ref), acc))
        ratios = [b[0] / a[0] for a, b in zip(rows["A"], rows["B"], strict=True)]

        def ms(values: list[float], d: int = 2) -> str:
            return f"{statistics.fmean(values):.{d}f} ± {statistics.stdev(values) if len(values) > 1 else 0:.{d}f}"

        print(f"| {cfg:g} | {ms([r[0] for r in rows['A']])} | {ms([r[0] for r in rows['B']])} | "
              f"{ms(ratios, 3)} ({', '.join(f'{r:.3f}' for r in ratios)}) | {ms([r[1] for r in rows['A']], 3)} | "
              f"{ms([r[1] for r in rows['B']], 3)} |")


if __name__ == "__main__":
    main()
