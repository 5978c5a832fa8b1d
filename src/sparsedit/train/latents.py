"""Precomputed VAE latents: :func:`save_latents` writes a latents directory and :class:`LatentsDataset` reads it.

A latents directory holds ``latents.safetensors`` and ``meta.json``: VAE latents (or posterior moments, sampled on
the fly) of images or videos, with class labels and/or T5 caption embeddings (text-to-image / text-to-video models),
and for the flow-matching families (SD3, FLUX) a pooled text vector per caption.
:mod:`sparsedit.train.data` re-exports everything here; see ``docs/data.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsedit.core.checkpoint import atomic_write, openable, write_dir, write_safetensors
from sparsedit.errors import SparseditError

__all__ = [
    "CAPTIONS_KEY",
    "CAPTION_MASK_KEY",
    "LATENTS_FILE",
    "LATENTS_FORMAT_VERSION",
    "META_FILE",
    "NULL_CAPTION_KEY",
    "NULL_POOLED_KEY",
    "POOLED_KEY",
    "REQUIRED_META_KEYS",
    "LatentsDataset",
    "save_latents",
]

LATENTS_FILE = "latents.safetensors"
META_FILE = "meta.json"
LATENTS_FORMAT_VERSION = 1
REQUIRED_META_KEYS = ("scale_factor", "vae", "resolution")
# Optional tensors of a latents file for text-conditional models (PixArt-alpha, Latte-T2V).
CAPTIONS_KEY = "captions"  # (N, L, D) T5 embeddings
CAPTION_MASK_KEY = "caption_mask"  # (N, L) int64, 1 = real token, 0 = padding
NULL_CAPTION_KEY = "null_caption"  # (L, D) T5 embedding of the empty prompt
# Optional tensors beside the captions for the flow-matching families (SD3: CLIP-L + CLIP-G, 2048; FLUX: CLIP-L, 768).
POOLED_KEY = "pooled"  # (N, P) pooled text vectors
NULL_POOLED_KEY = "null_pooled"  # (P,) pooled vector of the empty prompt
_LOGVAR_RANGE = (-30.0, 20.0)  # the clamp diffusers' DiagonalGaussianDistribution applies


def _float_tensor(x: Any, name: str, shape_text: str, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.dtype not in (torch.float16, torch.float32):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise SparseditError(f"{name} must be a float16/float32 tensor {shape_text}, got {got}; cast with .half()")
    return x.detach().cpu().contiguous()


def _caption_tensors(
    captions: torch.Tensor, caption_mask: torch.Tensor | None, null_caption: torch.Tensor | None, n: int
) -> dict[str, torch.Tensor]:
    """Validated caption tensors for :func:`save_latents`: captions as given, the mask as int64."""
    captions = _float_tensor(captions, "captions", f"(N={n}, L, D) of T5 embeddings", 3)
    if captions.shape[0] != n:
        raise SparseditError(f"captions hold {captions.shape[0]} rows for {n} latents; pass one caption per latent")
    length = captions.shape[1]
    if caption_mask is None:
        mask = torch.ones(n, length, dtype=torch.int64)  # every token is real
    else:
        mask = torch.as_tensor(caption_mask)
        if mask.shape != (n, length) or mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
            raise SparseditError(
                f"caption_mask must be a 0/1 integer or bool tensor ({n}, {length}), got {mask.dtype} "
                f"{tuple(mask.shape)}; pass the tokenizer's attention mask"
            )
    tensors = {CAPTIONS_KEY: captions, CAPTION_MASK_KEY: mask.detach().cpu().to(torch.int64).contiguous()}
    if null_caption is not None:
        null = _float_tensor(null_caption, "null_caption", f"(L={length}, D={captions.shape[2]})", 2)
        if null.shape != captions.shape[1:]:
            raise SparseditError(
                f"null_caption has shape {tuple(null.shape)} but captions are {tuple(captions.shape[1:])}; encode "
                "the empty prompt with the same tokenizer length"
            )
        tensors[NULL_CAPTION_KEY] = null
    return tensors


def _pooled_tensors(pooled: Any, null_pooled: Any, n: int, null_caption: bool) -> dict[str, torch.Tensor]:
    """Validated pooled text vectors for :func:`save_latents` (the captions are given and checked already)."""
    pooled = _float_tensor(pooled, "pooled", f"(N={n}, P) of pooled text vectors", 2)
    if pooled.shape[0] != n:
        raise SparseditError(f"pooled holds {pooled.shape[0]} rows for {n} latents; pass one pooled vector per caption")
    tensors = {POOLED_KEY: pooled}
    if null_pooled is None:
        if null_caption:
            raise SparseditError("null_caption was given with pooled vectors but no null_pooled; pass the empty "
                                 "prompt's pooled vector too (null_pooled=...)")
        return tensors
    if not null_caption:
        raise SparseditError("null_pooled was given without null_caption; pass the empty prompt's caption "
                             "embedding too (null_caption=...)")
    null = _float_tensor(null_pooled, "null_pooled", f"(P={pooled.shape[1]},)", 1)
    if null.shape != pooled.shape[1:]:
        raise SparseditError(f"null_pooled has shape {tuple(null.shape)} but the pooled vectors are "
                             f"{tuple(pooled.shape[1:])}; encode the empty prompt with the same text encoders")
    tensors[NULL_POOLED_KEY] = null
    return tensors


def _shift_factor(meta: Mapping[str, Any], where: str) -> float:
    """``meta["shift_factor"]`` (SD3 / FLUX VAEs) as a float; 0 when absent or None (diffusers' null)."""
    shift = meta.get("shift_factor")
    if shift is None:
        return 0.0
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise SparseditError(f"shift_factor in {where} must be a finite number, got {shift!r}; use the VAE "
                             "config's shift_factor (SD3 0.0609, FLUX 0.1159) or leave it out")
    return float(shift)


def _channel_stats(meta: Mapping[str, Any], where: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``meta["latents_mean"]`` / ``["latents_std"]`` (the Wan VAE's per-channel normalisation) as (C,) tensors, or None
    when the meta has neither."""
    mean, std = meta.get("latents_mean"), meta.get("latents_std")
    if mean is None and std is None:
        return None
    ok = [isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             and math.isfinite(x) for x in v) for v in (mean, std)]
    if not all(ok) or len(mean) != len(std) or any(x <= 0 for x in std):
        raise SparseditError(f"latents_mean / latents_std in {where} must be two lists of finite numbers of the same "
                             "length (std > 0): copy them from the VAE's config.json (AutoencoderKLWan)")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def save_latents(
    directory: str | os.PathLike[str],
    latents_or_moments: torch.Tensor,
    labels: torch.Tensor | None,
    meta: Mapping[str, Any],
    kind: Literal["moments", "latents"] = "moments",
    *,
    captions: torch.Tensor | None = None,
    caption_mask: torch.Tensor | None = None,
    null_caption: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
    null_pooled: torch.Tensor | None = None,
) -> Path:
    """Write a latents directory readable by :class:`LatentsDataset`.

    Args:
        directory: created if missing.
        latents_or_moments: images (N, C, h, w), or videos (N, F, C, h, w) (frames encoded one by one,
            as Latte does). ``kind="latents"``: latents; ``kind="moments"``: 2C channels, the posterior
            mean (first C) and log-variance (last C). float16 or float32, stored as given. Store
            *unscaled* VAE outputs; the scale factor goes into ``meta``.
        labels: (N,) integer class ids, stored as int64; may be None when ``captions`` are given.
        meta: JSON-serialisable; must contain ``scale_factor`` (e.g. 0.18215), ``vae`` (name or
            path of the VAE) and ``resolution`` (image side length). ``kind``, ``num_samples``,
            ``latent_shape`` (the shape of one item, (C, h, w) or (C, F, h, w)), ``format_version``
            and, when given, ``num_frames``, ``caption_shape`` ([L, D]) and ``pooled_dim`` (P) are added.
            Optional ``shift_factor`` (the VAE config's, SD3 0.0609, FLUX 0.1159): a finite number or None,
            subtracted before scaling by :class:`LatentsDataset` (``apply_scale_factor=True``). Optional
            ``latents_mean`` / ``latents_std`` (per-channel lists, the Wan VAE's config values): the dataset then
            returns ``(x - mean) / std * scale_factor`` per channel (use scale_factor 1 for Wan).
        captions: (N, L, D) float16/float32 T5 embeddings (text-conditional models), stored as given.
        caption_mask: (N, L) 0/1 keep-mask of ``captions`` (the tokenizer's attention mask); all ones
            when None.
        null_caption: (L, D) embedding of the empty prompt, for caption dropout of models that store
            no null caption themselves (Latte-T2V, diffusers PixArt checkpoints).
        pooled: (N, P) float16/float32 pooled text vectors beside the captions (one per latent), the
            ``pooled_projections`` of SD3 (CLIP-L + CLIP-G, P = 2048) and FLUX (CLIP-L, P = 768); needs captions.
        null_pooled: (P,) pooled vector of the empty prompt; needs ``pooled`` and ``null_caption`` (and a
            ``null_caption`` beside ``pooled`` needs it: the empty prompt is both).

    The directory is written beside ``directory`` and swapped in whole (an old latents directory there is
    replaced, never mixed with the new files), so a reader never sees a half-written one. Returns its path.
    """
    if kind not in ("moments", "latents"):
        raise SparseditError(f"unknown latents kind {kind!r}; use 'moments' or 'latents'")
    x = latents_or_moments
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        raise SparseditError(
            f"{kind} must be a 4-d tensor (N, C, h, w) of images or a 5-d tensor (N, F, C, h, w) of videos, got "
            f"{getattr(x, 'shape', type(x))}; reshape it"
        )
    if x.dtype not in (torch.float16, torch.float32):
        raise SparseditError(f"{kind} dtype must be float16 or float32, got {x.dtype}; cast with .float()")
    channels = x.shape[-3]
    if kind == "moments" and channels % 2:
        raise SparseditError(
            f"moments need an even channel count (mean and logvar), got {channels}; "
            "pass kind='latents' for sampled latents"
        )
    n = int(x.shape[0])
    tensors = {kind: x.detach().cpu().contiguous()}
    if labels is not None or captions is None:
        labels = torch.as_tensor(labels) if labels is not None else None
        if labels is None or labels.ndim != 1 or labels.shape[0] != n or labels.is_floating_point():
            got = "None" if labels is None else f"{labels.dtype} {tuple(labels.shape)}"
            raise SparseditError(
                f"labels must be a 1-d integer tensor with {n} entries, got {got}; pass one class id per latent "
                "(labels may be None only with captions)"
            )
        tensors["labels"] = labels.detach().cpu().to(torch.int64).contiguous()
    if captions is not None:
        tensors.update(_caption_tensors(captions, caption_mask, null_caption, n))
    elif caption_mask is not None or null_caption is not None:
        raise SparseditError("caption_mask / null_caption were given without captions; pass captions too")
    elif pooled is not None:
        raise SparseditError("pooled was given without captions; the pooled text vector sits beside the caption: "
                             "pass captions too")
    if pooled is not None:
        tensors.update(_pooled_tensors(pooled, null_pooled, n, null_caption is not None))
    elif null_pooled is not None:
        raise SparseditError("null_pooled was given without pooled; pass the pooled vectors too (pooled=...)")
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise SparseditError(f"meta lacks {', '.join(missing)}; add them (e.g. scale_factor=0.18215)")
    _shift_factor(meta, "meta")
    stats = _channel_stats(meta, "meta")
    if stats is not None and len(stats[0]) != x.shape[-3] // (2 if kind == "moments" else 1):
        raise SparseditError(f"latents_mean has {len(stats[0])} channels, the latents {x.shape[-3]}; copy the VAE's own")
    c = channels // 2 if kind == "moments" else channels
    item_shape = [int(c), *x.shape[1:-3], int(x.shape[-2]), int(x.shape[-1])]  # (C, h, w) or (C, F, h, w)
    full_meta = dict(meta)
    full_meta.update(kind=kind, num_samples=n, latent_shape=item_shape, format_version=LATENTS_FORMAT_VERSION)
    if x.ndim == 5:
        full_meta["num_frames"] = int(x.shape[1])
    if captions is not None:
        full_meta["caption_shape"] = [int(v) for v in captions.shape[1:]]
    if pooled is not None:
        full_meta["pooled_dim"] = int(tensors[POOLED_KEY].shape[1])
    try:
        meta_text = json.dumps(full_meta, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise SparseditError(f"meta is not JSON-serialisable ({exc}); use plain numbers and strings") from exc

    out = Path(directory)

    def write(tmp: Path) -> None:
        write_safetensors(tmp / LATENTS_FILE, tensors, metadata={"kind": kind})
        atomic_write(tmp / META_FILE, lambda p: Path(p).write_text(meta_text + "\n"))

    write_dir(out, write)  # a latents directory already at out is replaced whole, never file by file
    return out


class LatentsDataset(Dataset):
    """Precomputed VAE latents (see :func:`save_latents`) of images or videos.

    Items are ``(latent, label)``, or ``(latent, cond)`` when the directory holds captions: ``cond``
    is a dict of model keyword arguments, ``encoder_hidden_states`` float32 (L, D),
    ``encoder_attention_mask`` int64 (L,), when the directory also has pooled text vectors (SD3, FLUX)
    ``pooled_projections`` float32 (P,) and, when it also has labels, ``y`` (an int).

    ``latent`` is float32 (C, h, w) for images and (C, F, h, w) for videos (stored (F, C, h, w) per
    item, returned in Latte's / diffusers' channel-first video layout). With ``kind="latents"`` it is
    the stored tensor. With ``kind="moments"`` each access draws a fresh posterior sample
    ``mean + exp(0.5 * logvar) * noise`` (logvar clamped to [-30, 20] like diffusers), where
    ``noise`` comes from a CPU ``torch.Generator`` seeded from ``(seed, epoch, index)``: the same item
    in the same epoch gives the same latent, a new epoch (:meth:`set_epoch`) gives a new one. Call
    ``set_epoch`` before creating the epoch's DataLoader iterator (non-persistent workers copy the
    data set then).

    The latents are returned unscaled unless ``apply_scale_factor=True``, which returns
    ``(x - meta["shift_factor"]) * meta["scale_factor"]`` (the value DiT / SD3 / FLUX training wants; no
    ``shift_factor`` (or None) means 0, i.e. ``x * scale_factor``). The file is memory-mapped and read
    one item at a time, so data sets larger than RAM work.

    Attributes: ``latent_shape`` (one item's shape), ``num_frames`` (None for images),
    ``caption_shape`` ((L, D) or None), ``labels`` ((N,) int64 or None), ``num_classes`` (0 without
    labels), ``null_caption`` ((L, D) float32 or None), ``pooled_dim`` (P or None), ``null_pooled``
    ((P,) float32 or None) and ``shift_factor`` (0.0 when the meta has none).
    """

    def __init__(self, directory: str | os.PathLike[str], seed: int = 0, apply_scale_factor: bool = False) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SparseditError(f"latents directory {str(self.directory)!r} does not exist; check the path")
        meta_path = self.directory / META_FILE
        self.path = self.directory / LATENTS_FILE
        for p in (self.path, meta_path):
            if not p.is_file():
                raise SparseditError(
                    f"{str(p)!r} is missing; a latents directory needs {LATENTS_FILE} and {META_FILE} "
                    "(write them with sparsedit.train.data.save_latents)"
                )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SparseditError(f"{str(meta_path)!r} is not valid JSON ({exc}); rewrite it with save_latents") from exc
        if not isinstance(self.meta, dict):
            raise SparseditError(f"{str(meta_path)!r} must hold a JSON object; rewrite it with save_latents")

        self._handle: Any = None
        handle = self._open()
        keys = set(handle.keys())
        kinds = keys & {"latents", "moments"}
        if len(kinds) != 1 or not keys & {"labels", CAPTIONS_KEY}:
            raise SparseditError(
                f"{str(self.path)!r} must hold exactly one of 'latents'/'moments' and 'labels' and/or "
                f"'{CAPTIONS_KEY}', found {sorted(keys)}; rewrite it with save_latents"
            )
        self.kind: str = kinds.pop()
        data_slice = handle.get_slice(self.kind)
        shape = list(data_slice.get_shape())
        dtype = data_slice.get_dtype()
        if len(shape) not in (4, 5) or dtype not in ("F16", "F32") or (self.kind == "moments" and shape[-3] % 2):
            raise SparseditError(
                f"{self.kind!r} in {str(self.path)!r} has shape {shape} dtype {dtype}; expected (N, C, h, w) or "
                "(N, F, C, h, w) float16/float32 (even C for moments); rewrite it with save_latents"
            )
        self.num_samples = int(shape[0])
        self.labels: torch.Tensor | None = None
        if "labels" in keys:
            self.labels = handle.get_tensor("labels")
            labels_dtype = handle.get_slice("labels").get_dtype()
            if labels_dtype != "I64" or list(self.labels.shape) != [shape[0]]:
                raise SparseditError(
                    f"'labels' in {str(self.path)!r} must be int64 of shape [{shape[0]}], got "
                    f"{labels_dtype} {list(self.labels.shape)}; rewrite it with save_latents"
                )
        self._read_captions(handle, keys)
        self._read_pooled(handle, keys)
        meta_kind = self.meta.get("kind", self.kind)
        if meta_kind != self.kind:
            raise SparseditError(
                f"{META_FILE} says kind={meta_kind!r} but the tensor file holds {self.kind!r}; "
                "rewrite the directory with save_latents"
            )
        c = shape[-3] // 2 if self.kind == "moments" else shape[-3]
        self.num_frames: int | None = shape[1] if len(shape) == 5 else None
        frames = () if self.num_frames is None else (self.num_frames,)
        self.latent_shape: tuple[int, ...] = (c, *frames, shape[-2], shape[-1])
        self.seed = int(seed)
        self.epoch = 0
        self.apply_scale_factor = apply_scale_factor
        if apply_scale_factor and not isinstance(self.meta.get("scale_factor"), (int, float)):
            raise SparseditError(f"{META_FILE} has no numeric scale_factor; add it or pass apply_scale_factor=False")
        self.scale_factor = float(self.meta.get("scale_factor", 1.0))
        self.shift_factor = _shift_factor(self.meta, repr(str(meta_path)))
        self.channel_stats = _channel_stats(self.meta, repr(str(meta_path)))
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None and self.num_samples else 0
        self._check_meta_agrees()

    def _check_meta_agrees(self) -> None:
        """meta.json describes the tensors; a directory where the two disagree was edited or mixed up."""
        fix = "rewrite the directory with save_latents"
        if self.meta.get("num_samples", self.num_samples) != self.num_samples:
            raise SparseditError(f"{META_FILE} says {self.meta['num_samples']} samples but {str(self.path)!r} holds "
                                 f"{self.num_samples}; {fix}")
        classes = self.meta.get("classes")
        if self.labels is not None and self.num_samples and (int(self.labels.min()) < 0 or (
                isinstance(classes, list) and classes and self.num_classes > len(classes))):
            raise SparseditError(f"the labels of {str(self.path)!r} run from {int(self.labels.min())} to "
                                 f"{self.num_classes - 1}, but {META_FILE} names {len(classes or [])} classes; {fix}")
        if self.meta.get("pooled_dim", self.pooled_dim) != self.pooled_dim:
            raise SparseditError(f"{META_FILE} says pooled_dim {self.meta['pooled_dim']} but {str(self.path)!r} holds "
                                 f"{'no' if self.pooled_dim is None else f'{self.pooled_dim}-wide'} pooled vectors; {fix}")

    def _read_captions(self, handle: Any, keys: set[str]) -> None:
        """Check the caption tensors' shapes; keep the (small) mask and null caption in memory."""
        self.caption_shape: tuple[int, int] | None = None
        self.caption_mask: torch.Tensor | None = None
        self.null_caption: torch.Tensor | None = None
        if CAPTIONS_KEY not in keys:
            extra = sorted(keys & {CAPTION_MASK_KEY, NULL_CAPTION_KEY})
            if extra:
                raise SparseditError(f"{str(self.path)!r} holds {', '.join(extra)} but no '{CAPTIONS_KEY}'; "
                                     "rewrite it with save_latents")
            return
        caption_slice = handle.get_slice(CAPTIONS_KEY)
        shape = list(caption_slice.get_shape())
        length, dim = shape[1:] if len(shape) == 3 else (-1, -1)
        mask_shape = list(handle.get_slice(CAPTION_MASK_KEY).get_shape()) if CAPTION_MASK_KEY in keys else None
        null_shape = list(handle.get_slice(NULL_CAPTION_KEY).get_shape()) if NULL_CAPTION_KEY in keys else None
        if (shape[:1] != [self.num_samples] or length < 0 or caption_slice.get_dtype() not in ("F16", "F32")
                or mask_shape != [self.num_samples, length] or null_shape not in (None, [length, dim])):
            raise SparseditError(
                f"captions in {str(self.path)!r} do not fit: '{CAPTIONS_KEY}' {shape}, "
                f"'{CAPTION_MASK_KEY}' {mask_shape}, '{NULL_CAPTION_KEY}' {null_shape} for {self.num_samples} "
                "latents; expected (N, L, D) float, (N, L) and optionally (L, D): rewrite it with save_latents"
            )
        self.caption_shape = (length, dim)
        self.caption_mask = handle.get_tensor(CAPTION_MASK_KEY).to(torch.int64)
        if null_shape is not None:
            self.null_caption = handle.get_tensor(NULL_CAPTION_KEY).float()

    def _read_pooled(self, handle: Any, keys: set[str]) -> None:
        """Check the pooled text vectors (SD3, FLUX) against the captions; keep the null pooled vector in memory."""
        self.pooled_dim: int | None = None
        self.null_pooled: torch.Tensor | None = None
        if not keys & {POOLED_KEY, NULL_POOLED_KEY}:
            return
        fix = "rewrite it with save_latents"
        if POOLED_KEY not in keys or self.caption_shape is None:
            raise SparseditError(f"{str(self.path)!r} holds {', '.join(sorted(keys & {POOLED_KEY, NULL_POOLED_KEY}))} "
                                 f"without '{POOLED_KEY}' and '{CAPTIONS_KEY}' (pooled vectors sit beside captions); {fix}")
        pooled_slice = handle.get_slice(POOLED_KEY)
        shape = list(pooled_slice.get_shape())
        null_shape = list(handle.get_slice(NULL_POOLED_KEY).get_shape()) if NULL_POOLED_KEY in keys else None
        if (len(shape) != 2 or shape[0] != self.num_samples or pooled_slice.get_dtype() not in ("F16", "F32")
                or null_shape not in (None, shape[1:]) or (null_shape is None) != (self.null_caption is None)):
            raise SparseditError(
                f"pooled vectors in {str(self.path)!r} do not fit: '{POOLED_KEY}' {shape}, '{NULL_POOLED_KEY}' "
                f"{null_shape} (with{'out' if self.null_caption is None else ''} '{NULL_CAPTION_KEY}') for "
                f"{self.num_samples} latents; expected (N, P) float and (P,) exactly when there is a null caption: {fix}"
            )
        self.pooled_dim = int(shape[1])
        if null_shape is not None:
            self.null_pooled = handle.get_tensor(NULL_POOLED_KEY).float()

    # The safetensors handle is opened lazily per process and never pickled (DataLoader workers).
    def _open(self) -> Any:
        if self._handle is None:
            from safetensors import safe_open

            try:
                with openable(self.path) as name:  # the handle maps the file: it outlives the descriptor
                    self._handle = safe_open(name, framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                raise SparseditError(
                    f"cannot read {str(self.path)!r} ({exc}); the file is corrupt or not safetensors: "
                    "recompute it with save_latents"
                ) from exc
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the noise of epoch ``epoch`` for moment sampling."""
        self.epoch = int(epoch)

    def item_seed(self, index: int) -> int:
        """The generator seed used for item ``index`` in the current epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2, dtype=np.uint32)
        return int(state[0]) << 31 | int(state[1]) >> 1

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | dict[str, Any]]:
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} latents")
        x = self._open().get_slice(self.kind)[index : index + 1][0].float()  # (C', h, w) or (F, C', h, w)
        if self.kind == "moments":
            mean, logvar = x.chunk(2, dim=-3)
            gen = torch.Generator().manual_seed(self.item_seed(index))
            noise = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
            x = mean + torch.exp(0.5 * logvar.clamp(*_LOGVAR_RANGE)) * noise
        if self.apply_scale_factor and self.channel_stats is not None:
            # the Wan VAE's per-channel normalisation, as WanPipeline applies it: (z - mean) / std, channel by channel
            mean, std = self.channel_stats
            shape = (-1, 1, 1) if x.ndim == 3 else (1, -1, 1, 1)  # (C, h, w) or (F, C, h, w)
            x = (x - mean.view(shape)) / std.view(shape) * self.scale_factor
        elif self.apply_scale_factor:
            # diffusers' SD3 / FLUX training scripts: (x - shift_factor) * scaling_factor; no shift: x * scale as before
            x = (x - self.shift_factor) * self.scale_factor if self.shift_factor else x * self.scale_factor
        if x.ndim == 4:
            x = x.transpose(0, 1).contiguous()  # (F, C, h, w) -> (C, F, h, w)
        if self.caption_shape is None:
            assert self.labels is not None  # a file without captions has labels
            return x, int(self.labels[index])
        assert self.caption_mask is not None
        caption = self._open().get_slice(CAPTIONS_KEY)[index : index + 1][0].float()  # (L, D)
        cond: dict[str, Any] = {"encoder_hidden_states": caption, "encoder_attention_mask": self.caption_mask[index]}
        if self.pooled_dim is not None:
            cond["pooled_projections"] = self._open().get_slice(POOLED_KEY)[index : index + 1][0].float()  # (P,)
        if self.labels is not None:
            cond["y"] = int(self.labels[index])
        return x, cond
