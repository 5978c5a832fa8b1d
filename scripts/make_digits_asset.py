"""Regenerate the embedded digits data set ``src/sparsedit/assets/digits/digits8x8.npz``.

Reads the UCI handwritten digits that ship inside scikit-learn (no network access) and writes them as
``images`` (uint8, (1797, 8, 8), values 0..16) and ``labels`` (int64, (1797,)), plus a LICENSE.md
that records the source and licences. scikit-learn is needed only to run this script; the package
itself reads the npz with numpy.

Usage::

    python scripts/make_digits_asset.py [--out src/sparsedit/assets/digits]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "sparsedit" / "assets" / "digits"

LICENSE_TEXT = """# Embedded digits data set: source and licence

`digits8x8.npz` holds the 1,797 8x8 grayscale images (pixel values 0..16) and their labels (0..9)
of the **UCI ML "Optical Recognition of Handwritten Digits"** data set, test portion, as
distributed with scikit-learn (`sklearn.datasets.load_digits()`).

- Original data: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits",
  UCI Machine Learning Repository, 1998. https://doi.org/10.24432/C50P49
  Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
  https://creativecommons.org/licenses/by/4.0/
- Copy read from: scikit-learn {sklearn_version} (`sklearn/datasets/data/digits.csv.gz`),
  BSD-3-Clause licence, https://scikit-learn.org

Changes: none to the pixel values or labels; stored as `images` (uint8, shape (1797, 8, 8)) and
`labels` (int64, shape (1797,)) in a compressed numpy archive by `scripts/make_digits_asset.py`.
"""


def build(out_dir: Path) -> Path:
    """Write ``digits8x8.npz`` and ``LICENSE.md`` into ``out_dir``; return the npz path."""
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)
    if images.min() < 0 or images.max() > 16 or not np.array_equal(images, np.round(images)):
        raise RuntimeError("unexpected pixel values in sklearn digits; expected integers 0..16")
    images_u8 = images.astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "digits8x8.npz"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images_u8, labels=labels)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    (out_dir / "LICENSE.md").write_text(LICENSE_TEXT.format(sklearn_version=sklearn.__version__))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args()
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
