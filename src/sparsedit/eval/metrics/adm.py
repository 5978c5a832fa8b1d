"""FID, sFID, Inception Score and precision/recall computed the way ADM's evaluator computes them.

Reference: guided-diffusion's ``evaluations/evaluator.py``
(https://github.com/openai/guided-diffusion/blob/main/evaluations/evaluator.py). What matches it:

* features: ``pool_3`` (2048-d) for FID and precision/recall, the first 7 channels of
  ``mixed_6/conv`` flattened NHWC (2023-d) for sFID, ``softmax(pool_3 @ W)`` without the bias for IS
  (see :mod:`sparsedit.eval.metrics.inception`);
* FID / sFID: Fréchet distance of (mean, unbiased covariance), with the reference batch's stored
  ``mu``/``sigma``/``mu_s``/``sigma_s`` used when the ``.npz`` has them (as ADM's ``read_statistics``);
* IS: consecutive splits of 5000 predictions (a shorter last split is kept), per split
  ``exp(mean_i KL(p_i || mean p))``, mean over splits (we also report the std);
* precision/recall: ADM's ``ManifoldEstimator`` with k = 3 — a point's radius is the k-th smallest
  squared distance in its own set *counting itself* (i.e. the 3rd nearest other point), a point is
  covered when its distance to some point of the other set is ``<=`` that point's radius; precision
  is the fraction of samples covered by the reference manifold, recall the fraction of references
  covered by the sample manifold.

Deliberate differences (documented in docs/metrics.md): ADM evaluates the pairwise-distance block in
float16 (falling back to float32 on overflow); we use float32 (or float64 if asked), which can flip
points lying within fp16 rounding of a radius. The IS term uses ``0 * log 0 = 0`` where ADM would
produce NaN; for strictly positive softmax outputs both are identical.
"""

from __future__ import annotations

import math
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from sparsedit.core.checkpoint import atomic_write
from sparsedit.errors import SparseditError
from sparsedit.eval.metrics.stats import feature_stats, frechet_distance

IS_SPLIT_SIZE = 5000
PR_K = 3
# Rows per pairwise-distance block (ADM uses 10000; the value does not change the result). The radius
# pass holds a (PR_BATCH x N) block: 1024 x 50000 float32 is 200 MB.
PR_BATCH = 1024
FEATURE_KEYS = ("pool", "spatial", "logits")
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")

FeatureModel = Callable[[torch.Tensor], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# ADM .npz batches


class ImageBatchReader:
    """Streams ``arr_0`` of an ADM-style ``.npz`` (N, H, W, 3 uint8) without loading it all."""

    def __init__(self, path: Path, stream: IO[bytes] | None, array: np.ndarray | None, shape, dtype) -> None:
        self.path = path
        self._stream = stream
        self._array = array
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise SparseditError(f"batch size must be >= 1, got {batch_size}")
        per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        for start in range(0, self.shape[0], batch_size):
            count = min(batch_size, self.shape[0] - start)
            if self._array is not None:
                yield self._array[start : start + count]
                continue
            assert self._stream is not None
            want = count * per_image
            chunks: list[bytes] = []
            got = 0
            while got < want:
                try:
                    chunk = self._stream.read(want - got)
                except (zipfile.BadZipFile, OSError, zlib.error) as err:
                    raise _corrupt(self.path, err) from err
                if not chunk:
                    raise SparseditError(
                        f"{self.path}: arr_0 is truncated after {start + got // per_image} of "
                        f"{self.shape[0]} images; regenerate or re-download the file"
                    )
                chunks.append(chunk)
                got += len(chunk)
            yield np.frombuffer(b"".join(chunks), dtype=self.dtype).reshape((count, *self.shape[1:]))


def _check_image_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8:
        raise SparseditError(
            f"{path}: arr_0 has dtype {dtype}, expected uint8 images in [0, 255]; save samples with "
            "sparsedit.eval.metrics.adm.save_sample_batch"
        )
    if len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise SparseditError(
            f"{path}: arr_0 has shape {tuple(shape)}, expected (N, H, W, 3) NHWC images with N >= 1"
        )


def _corrupt(path: Path, err: BaseException) -> SparseditError:
    return SparseditError(f"{path}: arr_0 is corrupt ({err}); regenerate or re-download the file")


@contextmanager
def open_image_batch(path: str | os.PathLike[str]) -> Iterator[ImageBatchReader]:
    """Open an ADM sample/reference ``.npz`` and check ``arr_0`` is (N, H, W, 3) uint8."""
    p = Path(path)
    if p.is_dir():
        raise SparseditError(f"batch file {p} is a directory; give the .npz file (sparsedit sample-fid writes "
                             "DIR/samples_N.npz)")
    if not p.is_file():
        raise SparseditError(f"batch file {p} does not exist; check the path (an ADM-style .npz is expected)")
    try:
        archive = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as err:
        raise SparseditError(f"{p} is not a readable .npz archive ({err}); regenerate or re-download it") from err
    with archive:
        if "arr_0.npy" not in archive.namelist():
            raise SparseditError(f"{p} has no arr_0 array; ADM batches store the images as arr_0")
        header = None
        try:
            member = archive.open("arr_0.npy")
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(member)
        except (ValueError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
            raise _corrupt(p, err) from err
        with member:
            if header is not None and not header[1] and not header[2].hasobject:
                shape, _, dtype = header
                _check_image_array(p, shape, dtype)
                yield ImageBatchReader(p, member, None, shape, dtype)
                return
    # Uncommon layouts (Fortran order, newer header versions): load into memory.
    try:
        with np.load(p, allow_pickle=False) as data:
            array = np.ascontiguousarray(data["arr_0"])
    except (ValueError, OSError, zipfile.BadZipFile, zlib.error) as err:
        raise _corrupt(p, err) from err
    _check_image_array(p, array.shape, array.dtype)
    yield ImageBatchReader(p, None, array, array.shape, array.dtype)


def load_batch_stats(path: str | os.PathLike[str]) -> dict[str, np.ndarray] | None:
    """Precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` stored in an ADM ``.npz``, or ``None``."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            if "mu" not in data.files:
                return None
            missing = [k for k in STATS_KEYS if k not in data.files]
            if missing:
                raise SparseditError(
                    f"{p} has 'mu' but lacks {missing}; ADM batches store mu, sigma, mu_s and sigma_s together"
                )
            return {k: np.asarray(data[k], dtype=np.float64) for k in STATS_KEYS}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise SparseditError(f"{p}: cannot read statistics ({err}); regenerate or re-download the file") from err


def save_sample_batch(
    path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray | None = None
) -> Path:
    """Write samples as ADM does (``arr_0`` images, optional ``arr_1`` labels), atomically.

    ``images`` must be (N, H, W, 3) uint8. The file is written next to ``path`` under a temporary
    name and moved into place with ``os.replace``, so readers never see a half-written batch.
    """
    p = Path(path)
    arr = np.asarray(images)
    _check_image_array(p, arr.shape, arr.dtype)
    arrays = [np.ascontiguousarray(arr)]
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (arr.shape[0],):
            raise SparseditError(
                f"labels have shape {lab.shape}, expected ({arr.shape[0]},): one class index per image"
            )
        arrays.append(lab)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, *arrays)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(p, write)
    return p


# --------------------------------------------------------------------------------------------------
# Features


def _iter_batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
    else:
        yield from images


def compute_features(
    images: np.ndarray | Iterable[np.ndarray],
    model: FeatureModel,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` over NHWC images in [0, 255]; returns float32 ``pool``, ``spatial``, ``logits``.

    ``images`` is an (N, H, W, 3) array or an iterable of such batches (e.g.
    :meth:`ImageBatchReader.batches`). ``model`` maps an (B, 3, H, W) tensor to a dict with the three
    keys, as :class:`~sparsedit.eval.metrics.inception.InceptionV3` does.
    """
    if batch_size < 1:
        raise SparseditError(f"batch size must be >= 1, got {batch_size}")
    if total is None and isinstance(images, np.ndarray):
        total = images.shape[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="inception", file=sys.stderr)
    out: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
    try:
        with torch.inference_mode():
            for batch in _iter_batches(images, batch_size):
                arr = np.asarray(batch)
                if arr.ndim != 4 or arr.shape[-1] != 3:
                    raise SparseditError(f"expected (N, H, W, 3) images, got a batch of shape {arr.shape}")
                if not arr.flags.writeable or not arr.flags.c_contiguous:  # e.g. streamed from a file
                    arr = np.array(arr, copy=True, order="C")
                x = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2)
                feats = model(x)
                for key in FEATURE_KEYS:
                    value = feats[key].detach().to("cpu", torch.float32)
                    out[key].append(value.reshape(value.shape[0], -1).numpy())
                if bar is not None:
                    bar.update(arr.shape[0])
    finally:
        if bar is not None:
            bar.close()
    if not out["pool"]:
        raise SparseditError("no images to evaluate; the batch is empty")
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Scores without Inception


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) over splits of ``exp(E_x KL(p(y|x) || p(y)))``, splits of ``split_size`` rows.

    ADM uses consecutive chunks of 5000 (the last one may be shorter) and reports the mean.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise SparseditError(f"need an (N, classes) probability matrix, got shape {p.shape}")
    if split_size < 1:
        raise SparseditError(f"split size must be >= 1, got {split_size}")
    if (p < 0).any() or not np.isfinite(p).all():
        raise SparseditError("class probabilities must be finite and non-negative; pass softmax outputs")
    scores = []
    for start in range(0, p.shape[0], split_size):
        part = p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(math.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _as_tensor(feats: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats)
    if t.dim() != 2:
        raise SparseditError(f"need an (N, D) feature matrix, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # ||u||^2 - 2 u.v + ||v||^2, clamped at 0: the formula of ADM's _batch_pairwise_distances.
    nu = (u * u).sum(dim=1, keepdim=True)
    nv = (v * v).sum(dim=1).unsqueeze(0)
    return (u @ v.t()).mul_(-2.0).add_(nu).add_(nv).clamp_min_(0.0)


def manifold_radii(
    feats: np.ndarray | torch.Tensor,
    k: int = PR_K,
    batch_size: int = PR_BATCH,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Squared k-NN radius of every point: the k-th smallest (0-based) squared distance in its row.

    The row includes the point itself (distance 0), so this is the distance to the k-th nearest
    *other* point, as in ADM. Memory is O(batch_size x N).
    """
    x = _as_tensor(feats, torch.device(device), dtype)
    n = x.shape[0]
    if n <= k:
        raise SparseditError(f"precision/recall with k={k} needs more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=dtype, device=x.device)
    for start in range(0, n, batch_size):
        block = _sq_distances(x[start : start + batch_size], x)
        radii[start : start + block.shape[0]] = torch.topk(block, k + 1, dim=1, largest=False).values[:, k]
    return radii


def precision_recall(
    ref_feats: np.ndarray | torch.Tensor,
    sample_feats: np.ndarray | torch.Tensor,
    k: int = PR_K,
    batch_size: int = PR_BATCH,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) exactly as ADM evaluates them.

    precision = fraction of samples within some reference point's k-NN ball;
    recall = fraction of reference points within some sample's k-NN ball.
    Distances are computed in (batch_size x batch_size) blocks.
    """
    dev = torch.device(device)
    ref = _as_tensor(ref_feats, dev, dtype)
    smp = _as_tensor(sample_feats, dev, dtype)
    if ref.shape[1] != smp.shape[1]:
        raise SparseditError(
            f"feature sizes differ: reference {ref.shape[1]} vs samples {smp.shape[1]}; use one feature network"
        )
    ref_r = manifold_radii(ref, k, batch_size, dev, dtype)
    smp_r = manifold_radii(smp, k, batch_size, dev, dtype)
    ref_covered = torch.zeros(ref.shape[0], dtype=torch.bool, device=dev)
    smp_covered = torch.zeros(smp.shape[0], dtype=torch.bool, device=dev)
    for i in range(0, ref.shape[0], batch_size):
        r_blk, r_rad = ref[i : i + batch_size], ref_r[i : i + batch_size]
        for j in range(0, smp.shape[0], batch_size):
            d = _sq_distances(r_blk, smp[j : j + batch_size])  # (refs, samples)
            ref_covered[i : i + batch_size] |= (d <= smp_r[j : j + batch_size].unsqueeze(0)).any(dim=1)
            smp_covered[j : j + batch_size] |= (d <= r_rad.unsqueeze(1)).any(dim=0)
    return float(smp_covered.double().mean()), float(ref_covered.double().mean())


# --------------------------------------------------------------------------------------------------
# End to end


def _features_of(
    path: Path, model: FeatureModel, batch_size: int, device: str | torch.device, progress: bool
) -> dict[str, np.ndarray]:
    with open_image_batch(path) as reader:
        return compute_features(reader.batches(batch_size), model, batch_size, device, progress, len(reader))


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SparseditError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SparseditError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def evaluate(
    sample_npz: str | os.PathLike[str],
    ref_npz: str | os.PathLike[str],
    inception_weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    model: FeatureModel | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """ADM's evaluation of a sample batch against a reference batch.

    Returns ``fid``, ``sfid``, ``inception_score`` (mean over 5000-image splits),
    ``inception_score_std``, ``precision``, ``recall`` (k=3), ``num_samples``, ``num_ref``.
    ``model`` overrides the InceptionV3 (any callable returning ``pool``/``spatial``/``logits``);
    otherwise the weights are found with
    :func:`~sparsedit.eval.metrics.inception.find_inception_weights`.
    """
    dev = _resolve_device(device)
    sample_path, ref_path = Path(sample_npz), Path(ref_npz)
    # Fail on unreadable inputs before the (slow) network is built.
    for p in (sample_path, ref_path):
        with open_image_batch(p):
            pass
    if model is None:
        from sparsedit.eval.metrics.inception import load_inception

        model = load_inception(inception_weights, dev)
    ref = _features_of(ref_path, model, batch_size, dev, progress)
    smp = _features_of(sample_path, model, batch_size, dev, progress)

    def stats(path: Path, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stored = load_batch_stats(path)  # ADM prefers statistics stored in the file
        if stored is not None:
            return stored
        mu, sigma = feature_stats(feats["pool"])
        mu_s, sigma_s = feature_stats(feats["spatial"])
        return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}

    rs, ss = stats(ref_path, ref), stats(sample_path, smp)
    is_mean, is_std = inception_score(softmax(smp["logits"]))
    precision, recall = precision_recall(ref["pool"], smp["pool"], device=dev)
    return {
        "fid": frechet_distance(ss["mu"], ss["sigma"], rs["mu"], rs["sigma"]),
        "sfid": frechet_distance(ss["mu_s"], ss["sigma_s"], rs["mu_s"], rs["sigma_s"]),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "precision": precision,
        "recall": recall,
        "num_samples": int(smp["pool"].shape[0]),
        "num_ref": int(ref["pool"].shape[0]),
    }
