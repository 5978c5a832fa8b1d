"""InceptionV3 as in TensorFlow's 2015-12-05 graph, the network behind FID, sFID, IS and P/R.

The guided-diffusion ("ADM") evaluator (https://github.com/openai/guided-diffusion,
``evaluations/evaluator.py``) runs the frozen graph ``classify_image_graph_def.pb`` from
``inception-2015-12-05.tgz``. This module rebuilds that graph in PyTorch so it can load the
converted weights that torch-fidelity publishes
(https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth).
Module attribute names follow torch-fidelity's ``feature_extractor_inceptionv3.py`` because they
define the state-dict keys of that file (472 tensors: 94 conv/batch-norm units x 5 + ``fc``). The
TF-scope-to-key mapping is in torch-fidelity's ``utils/util_convert_inception_weights.py``.

Facts about the 2015 graph reproduced here (sources: torch-fidelity and mseitzer/pytorch-fid, both
compared against TF there; the graph's node list was checked in a public dump of its op names):

* input pipeline ``ExpandDims -> ResizeBilinear(299, 299) -> Sub 128 -> Mul 1/128``. ADM feeds
  float32 NHWC images in [0, 255] at ``ExpandDims:0``, so the TF1 bilinear resize
  (``align_corners=False``, *no* half-pixel offset) is part of the measurement; see
  :func:`resize_bilinear_tf1`.
* every conv unit is ``Conv2D -> BatchNormWithGlobalNormalization(eps=1e-3) -> ReLU``; the ReLU op
  carries the bare scope name (``mixed_6/conv`` is the op after ``mixed_6/conv/batchnorm``).
* the average pools inside the Inception blocks exclude the zero padding from the mean; the
  pool branch of the last block (``mixed_10``) is a *max* pool.
* ``pool_3`` averages the final 8x8 map into the 2048-d FID feature; ``softmax/logits`` multiplies it
  by a 2048x1008 matrix. ADM's Inception Score uses ``softmax(pool_3 @ W)`` *without* the bias
  (``_create_softmax_graph`` takes only the ``MatMul`` weight), so ``logits`` here are unbiased.

The sFID feature ``mixed_6/conv:0``: TF's ``mixed_6`` is the seventh Inception block, i.e. torch
``Mixed_6d`` (``mixed``=5b, ``mixed_1``=5c, ``mixed_2``=5d, ``mixed_3``=6a, ``mixed_4``=6b,
``mixed_5``=6c, ``mixed_6``=6d), and its ``conv`` scope is the 1x1 branch (torch-fidelity's converter
maps ``mixed_6/conv/conv2d_params`` to ``Mixed_6d.branch1x1.conv``). The tensor ``mixed_6/conv:0``
is that branch's ReLU output, shape (N, 17, 17, 192) in NHWC. ADM keeps ``[..., :7]`` and flattens
each image in NHWC order, giving 17 * 17 * 7 = 2023 features; :func:`spatial_features_nhwc` does the
same from our NCHW tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsedit.errors import SparseditError

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
)
WEIGHTS_ENV = "SPARSEDIT_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]
POOL_DIM = 2048
NUM_LOGITS = 1008


# --------------------------------------------------------------------------------------------------
# TF1 bilinear resize


def _tf1_source_coords(in_size: int, out_size: int, device: torch.device):
    """Per-output-index (lower, upper, fraction) of TF1 ``ResizeBilinear`` with align_corners=False.

    TF1 maps output index ``i`` to source coordinate ``i * (in / out)`` (computed in float32, no
    half-pixel shift), interpolates between ``floor`` and ``ceil`` of it, and clamps ``ceil`` to the
    last row/column. See tensorflow/core/kernels/resize_bilinear_op.cc (TF 1.x) and
    torch-fidelity's interpolate_compat_tensorflow.py, which reproduces it.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)
    lower = torch.floor(src)
    frac = src - lower
    lower_i = lower.long().clamp(0, in_size - 1)
    upper_i = torch.ceil(src).long().clamp(0, in_size - 1)
    return lower_i, upper_i, frac


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float NCHW images like TF1 ``tf.image.resize_bilinear(align_corners=False)``.

    This is not ``F.interpolate(mode="bilinear")``: PyTorch samples at half-pixel centres, TF1 at
    ``dst * in / out``, so the two differ by up to a pixel shift when resampling.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    out_h, out_w = size
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return images
    y0, y1, fy = _tf1_source_coords(in_h, out_h, images.device)
    x0, x1, fx = _tf1_source_coords(in_w, out_w, images.device)
    fx = fx.to(images.dtype).view(1, 1, 1, out_w)
    fy = fy.to(images.dtype).view(1, 1, out_h, 1)
    rows_top = images.index_select(2, y0)
    rows_bottom = images.index_select(2, y1)
    # Same evaluation order as the TF kernel: horizontal lerp on both rows, then vertical lerp.
    top_l, top_r = rows_top.index_select(3, x0), rows_top.index_select(3, x1)
    bot_l, bot_r = rows_bottom.index_select(3, x0), rows_bottom.index_select(3, x1)
    top = top_l + (top_r - top_l) * fx
    bottom = bot_l + (bot_r - bot_l) * fx
    return top + (bottom - top) * fy


def spatial_features_nhwc(feature_map: torch.Tensor, channels: int = SPATIAL_CHANNELS) -> torch.Tensor:
    """ADM's sFID vector from an NCHW map: first ``channels`` channels, flattened in (H, W, C) order."""
    if feature_map.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) feature map, got shape {tuple(feature_map.shape)}")
    kept = feature_map[:, :channels].permute(0, 2, 3, 1)
    return kept.reshape(kept.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# Network


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm with exactly the four tensors the converted TF weights provide.

    Unlike ``nn.BatchNorm2d`` it has no ``num_batches_tracked`` buffer, so the state dict has the
    same keys as torch-fidelity's weights file. TF's BatchNormWithGlobalNormalization used 1e-3.
    """

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvUnit(nn.Module):
    """Conv (no bias) -> batch norm -> ReLU; attributes ``conv``/``bn`` fix the key names."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


# Stride-1 "SAME" convolutions with odd kernels pad symmetrically, so plain padding reproduces them.
def _same(kernel: tuple[int, int]) -> tuple[int, int]:
    return kernel[0] // 2, kernel[1] // 2


def _unit(cin: int, cout: int, kernel: tuple[int, int] = (1, 1), stride: int = 1) -> ConvUnit:
    padding = _same(kernel) if stride == 1 else (0, 0)  # the stride-2 convs are "VALID" in the graph
    return ConvUnit(cin, cout, kernel, stride=stride, padding=padding)


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TF "SAME" average pooling divides by the number of *valid* inputs under the window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _max_pool_valid_s2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=2)


class BlockA(nn.Module):
    """35x35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = _unit(cin, 64)
        self.branch5x5_1 = _unit(cin, 48)
        self.branch5x5_2 = _unit(48, 64, (5, 5))
        self.branch3x3dbl_1 = _unit(cin, 64)
        self.branch3x3dbl_2 = _unit(64, 96, (3, 3))
        self.branch3x3dbl_3 = _unit(96, 96, (3, 3))
        self.branch_pool = _unit(cin, pool_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], dim=1)


class ReductionA(nn.Module):
    """35 -> 17 reduction (TF ``mixed_3``)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _unit(cin, 384, (3, 3), stride=2)
        self.branch3x3dbl_1 = _unit(cin, 64)
        self.branch3x3dbl_2 = _unit(64, 96, (3, 3))
        self.branch3x3dbl_3 = _unit(96, 96, (3, 3), stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, _max_pool_valid_s2(x)], dim=1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF ``mixed_4`` .. ``mixed_7``)."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        self.branch1x1 = _unit(cin, 192)
        self.branch7x7_1 = _unit(cin, mid)
        self.branch7x7_2 = _unit(mid, mid, (1, 7))
        self.branch7x7_3 = _unit(mid, 192, (7, 1))
        self.branch7x7dbl_1 = _unit(cin, mid)
        self.branch7x7dbl_2 = _unit(mid, mid, (7, 1))
        self.branch7x7dbl_3 = _unit(mid, mid, (1, 7))
        self.branch7x7dbl_4 = _unit(mid, mid, (7, 1))
        self.branch7x7dbl_5 = _unit(mid, 192, (1, 7))
        self.branch_pool = _unit(cin, 192)

    def forward_with_1x1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block output and its 1x1 branch (for ``Mixed_6d`` that branch is TF ``mixed_6/conv``)."""
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for unit in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            c = unit(c)
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], dim=1), a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_1x1(x)[0]


class ReductionB(nn.Module):
    """17 -> 8 reduction (TF ``mixed_8``)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _unit(cin, 192)
        self.branch3x3_2 = _unit(192, 320, (3, 3), stride=2)
        self.branch7x7x3_1 = _unit(cin, 192)
        self.branch7x7x3_2 = _unit(192, 192, (1, 7))
        self.branch7x7x3_3 = _unit(192, 192, (7, 1))
        self.branch7x7x3_4 = _unit(192, 192, (3, 3), stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, _max_pool_valid_s2(x)], dim=1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 heads (TF ``mixed_9``, ``mixed_10``).

    ``max_pool`` selects the pool branch: the 2015 graph's last block (``mixed_10``) max-pools.
    """

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _unit(cin, 320)
        self.branch3x3_1 = _unit(cin, 384)
        self.branch3x3_2a = _unit(384, 384, (1, 3))
        self.branch3x3_2b = _unit(384, 384, (3, 1))
        self.branch3x3dbl_1 = _unit(cin, 448)
        self.branch3x3dbl_2 = _unit(448, 384, (3, 3))
        self.branch3x3dbl_3a = _unit(384, 384, (1, 3))
        self.branch3x3dbl_3b = _unit(384, 384, (3, 1))
        self.branch_pool = _unit(cin, 192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], dim=1)
        u = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(u), self.branch3x3dbl_3b(u)], dim=1)
        pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], dim=1)


class InceptionV3(nn.Module):
    """The 2015-12-05 TF InceptionV3 returning ADM's three feature sets.

    ``forward(images)`` takes (N, 3, H, W) uint8 or float images with values in [0, 255] (any H, W;
    they are resized to 299x299 the TF1 way) and returns a dict of float32 tensors:

    * ``pool``: (N, 2048) ``pool_3`` features (FID, precision/recall),
    * ``logits``: (N, 1008) unbiased logits ``pool @ fc.weight.T`` (ADM's IS softmax input),
    * ``spatial``: (N, 2023) first 7 channels of ``mixed_6/conv`` flattened in NHWC order (sFID).

    Weights start as placeholders; use :func:`load_inception` for the real ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _unit(3, 32, (3, 3), stride=2)
        self.Conv2d_2a_3x3 = ConvUnit(32, 32, 3)  # "VALID"
        self.Conv2d_2b_3x3 = _unit(32, 64, (3, 3))
        self.Conv2d_3b_1x1 = _unit(64, 80)
        self.Conv2d_4a_3x3 = ConvUnit(80, 192, 3)  # "VALID"
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = ReductionA(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = ReductionB(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """[0, 255] NCHW images -> 299x299 float32 input in [-1, 1], as the TF graph does."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise SparseditError(
                f"InceptionV3 expects (N, 3, H, W) images, got shape {tuple(images.shape)}; "
                "convert NHWC arrays with .permute(0, 3, 1, 2)"
            )
        x = images.to(torch.float32)
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_valid_s2(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool_valid_s2(x)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, mixed_6_conv = self.Mixed_6d.forward_with_1x1(x)
        x = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 "VALID" average pool over the 8x8 map
        logits = pool @ self.fc.weight.t()
        return {"pool": pool, "logits": logits, "spatial": spatial_features_nhwc(mixed_6_conv)}


# --------------------------------------------------------------------------------------------------
# Weights


def _default_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def find_inception_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the converted InceptionV3 weights.

    Order: the explicit ``path`` (``--inception-weights``), then ``$SPARSEDIT_INCEPTION_WEIGHTS``,
    then the torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``, where torch-fidelity
    downloads it). Nothing is downloaded.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise SparseditError(
                f"InceptionV3 weights not found at {explicit}; pass the path of {WEIGHTS_FILENAME} "
                f"(download: {WEIGHTS_URL})"
            )
        return explicit
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        from_env = Path(env).expanduser()
        if not from_env.is_file():
            raise SparseditError(
                f"{WEIGHTS_ENV}={env} does not point to a file; set it to the path of {WEIGHTS_FILENAME} "
                f"(download: {WEIGHTS_URL})"
            )
        return from_env
    cached = _default_cache_path()
    if cached.is_file():
        return cached
    raise SparseditError(
        f"InceptionV3 weights {WEIGHTS_FILENAME} not found; download {WEIGHTS_URL} and pass "
        f"--inception-weights PATH, set {WEIGHTS_ENV}, or place it at {cached}"
    )


def read_weights(path: Path, fix: str) -> Any:
    """A weights file's contents: ``.safetensors``, else ``torch.load(weights_only=True)`` (no pickled code runs);
    anything unreadable is a one-line error ending in ``fix``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            from sparsedit.core.checkpoint import openable

            with openable(path) as name:
                return load_file(name, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, or a pickle that needs more than tensors
        raise SparseditError(f"cannot read {path} ({type(err).__name__}); {fix}") from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = read_weights(path, f"re-download the InceptionV3 weights: {WEIGHTS_URL}")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SparseditError(f"{path} is not a state dict of tensors; re-download {WEIGHTS_URL}")
    # A state dict saved from a module built with nn.BatchNorm2d also carries these counters.
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def load_inception(
    weights: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> InceptionV3:
    """Build :class:`InceptionV3` and load torch-fidelity's converted TF weights into it."""
    path = find_inception_weights(weights)
    state = _read_state_dict(path)
    with torch.device("meta"):  # skip the random initialisation; every tensor comes from the file
        model = InceptionV3()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SparseditError(
            f"{path} does not match the InceptionV3 layout ({len(missing)} missing keys, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); use {WEIGHTS_FILENAME}"
        )
    bad = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise SparseditError(
            f"{path}: tensor shapes differ from InceptionV3 for {len(bad)} keys (e.g. {bad[0]}: "
            f"{tuple(state[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}); use {WEIGHTS_FILENAME}"
        )
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.requires_grad_(False).eval().to(device)
