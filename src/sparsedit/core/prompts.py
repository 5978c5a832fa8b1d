"""A prompt-embeddings file: encoded prompts saved once, read by ``sparsedit sample`` and data-free training.

A safetensors file with these tensors (``sparsedit encode-prompts`` writes it; any tool may):

=========================  ============  ==========================================================================
key                        shape         what
=========================  ============  ==========================================================================
``prompt_embeds``          (N, L, C)     caption embeddings, one row per prompt (required)
``prompt_mask``            (N, L)        0/1 keep-mask of the caption tokens (T5 models: PixArt, Latte)
``pooled_embeds``          (N, P)        pooled text vector (SD3: 2048 = CLIP-L + CLIP-G, FLUX.1: 768 = CLIP-L)
``negative_embeds``        (1 or N, L, C) the negative / empty prompt, for classifier-free guidance
``negative_mask``          (1 or N, L)   its keep-mask
``negative_pooled_embeds`` (1 or N, P)   its pooled vector
=========================  ============  ==========================================================================

The prompts themselves are kept in the file's metadata (``"prompts"``, a JSON list) when known. Read back with
:func:`read_prompt_embeds`, the tensors come as the ``text`` dict of ``Family.generate`` (``embeds``, ``mask``,
``pooled``, ``null_embeds``, ``null_mask``, ``null_pooled``), negatives repeated to N rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sparsedit.core.checkpoint import read_safetensors, write_safetensors
from sparsedit.errors import SparseditError

__all__ = ["FILE_KEYS", "prompt_list", "read_prompt_embeds", "select_prompts", "write_prompt_embeds"]

#: key in the file -> key of the ``text`` dict that ``Family.generate`` takes
FILE_KEYS = {"prompt_embeds": "embeds", "prompt_mask": "mask", "pooled_embeds": "pooled",
             "negative_embeds": "null_embeds", "negative_mask": "null_mask", "negative_pooled_embeds": "null_pooled"}
_TEXT_KEYS = {v: k for k, v in FILE_KEYS.items()}


def write_prompt_embeds(path: str | Path, text: dict[str, Tensor | None], prompts: Sequence[str] | None = None) -> Path:
    """Write ``text`` (the dict :func:`read_prompt_embeds` returns; None values skipped) to ``path``, all-or-nothing."""
    unknown = sorted(set(text) - set(_TEXT_KEYS))
    if unknown:
        raise SparseditError(f"unknown prompt tensors {unknown}; use {sorted(_TEXT_KEYS)}")
    tensors = {_TEXT_KEYS[k]: v.detach().cpu() for k, v in text.items() if v is not None}
    metadata = {"prompts": json.dumps(list(prompts))} if prompts is not None else {"format": "pt"}
    out = Path(path)
    write_safetensors(out, tensors, metadata=metadata)
    return out


def prompt_list(path: str | Path) -> list[str] | None:
    """The prompts recorded in the file's metadata, or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("prompts")
    try:
        names = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        return None
    return names if isinstance(names, list) else None


def _check(path: Path, key: str, x: Tensor, shape: tuple[int | None, ...], what: str) -> None:
    """``x`` has ``shape`` (None: any size >= 1); the error names the sizes as N (rows), L (tokens) and the widths."""
    ok = x.ndim == len(shape) and all(want is None or got == want for got, want in zip(x.shape, shape, strict=True))
    if not ok or any(n < 1 for n in x.shape):
        names = [*["N", "L"][: len(shape) - 1], str(shape[-1])]
        raise SparseditError(f"{path}: '{key}' must be {what} ({', '.join(names)}) with {' and '.join(names[:-1])} >= 1"
                             f"{'' if shape[0] is None else f' (N = {shape[0]})'}, got {x.dtype} {tuple(x.shape)}")


def _check_mask(path: Path, key: str, mask: Tensor, like: Tensor) -> None:
    if (tuple(mask.shape) != tuple(like.shape[:2]) or mask.is_complex() or not ((mask == 0) | (mask == 1)).all()
            or not (mask == 1).any(dim=1).all()):
        raise SparseditError(f"{path}: '{key}' must be an (N, L) keep-mask of 0s and 1s matching its embeddings, with at "
                             f"least one token kept per caption; got {mask.dtype} {tuple(mask.shape)}")


def read_prompt_embeds(path: str | Path, caption_channels: int, pooled_channels: int | None) -> dict[str, Tensor]:
    """The validated tensors of a prompt-embeddings file for a model taking ``caption_channels``-wide captions and,
    when ``pooled_channels`` is not None, a pooled vector of that width (required then, refused otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise SparseditError(f"prompt embeddings file {path} does not exist; write one with `sparsedit encode-prompts`")
    tensors = read_safetensors(path)
    unknown = sorted(set(tensors) - set(FILE_KEYS))
    if unknown:
        raise SparseditError(f"{path} holds tensors sparsedit does not read ({', '.join(unknown)}); the file takes "
                             f"{', '.join(FILE_KEYS)}")
    if "prompt_embeds" not in tensors:
        raise SparseditError(f"{path} has no 'prompt_embeds' tensor (found {', '.join(sorted(tensors)) or 'none'}); "
                             "write it with `sparsedit encode-prompts`")
    embeds = tensors["prompt_embeds"]
    floats = [k for k in ("prompt_embeds", "pooled_embeds", "negative_embeds", "negative_pooled_embeds")
              if k in tensors and not tensors[k].is_floating_point()]
    if floats:
        raise SparseditError(f"{path}: {', '.join(floats)} must be float tensors")
    _check(path, "prompt_embeds", embeds, (None, None, caption_channels), "float caption embeddings")
    n, length = embeds.shape[:2]
    pooled_keys = [k for k in ("pooled_embeds", "negative_pooled_embeds") if k in tensors]
    if pooled_channels is None and pooled_keys:
        raise SparseditError(f"{path} holds {', '.join(pooled_keys)}, but this model takes no pooled text vector; "
                             "encode the prompts for this model")
    if pooled_channels is not None and "pooled_embeds" not in tensors:
        raise SparseditError(f"{path} has no 'pooled_embeds': this model also takes the pooled text vector "
                             f"({pooled_channels} wide); encode the prompts with `sparsedit encode-prompts --pipeline`")
    neg = tensors.get("negative_embeds")
    rows = neg.shape[0] if neg is not None and neg.ndim == 3 else 1
    if neg is not None:
        if rows not in (1, n):
            raise SparseditError(f"{path}: 'negative_embeds' has {rows} rows for {n} prompts; give 1 or {n}")
        _check(path, "negative_embeds", neg, (rows, length, caption_channels), "float caption embeddings")
    elif "negative_mask" in tensors or "negative_pooled_embeds" in tensors:
        raise SparseditError(f"{path}: a negative mask or pooled vector without 'negative_embeds'; add it or drop them")
    if pooled_channels is not None:
        _check(path, "pooled_embeds", tensors["pooled_embeds"], (n, pooled_channels), "float pooled vectors")
        if neg is not None:
            if "negative_pooled_embeds" not in tensors:
                raise SparseditError(f"{path}: 'negative_embeds' without 'negative_pooled_embeds'; this model needs both")
            _check(path, "negative_pooled_embeds", tensors["negative_pooled_embeds"], (rows, pooled_channels),
                   "float pooled vectors")
    for key, like in (("prompt_mask", embeds), ("negative_mask", neg)):
        if key in tensors:
            assert like is not None  # checked above: a negative mask needs negative embeddings
            _check_mask(path, key, tensors[key], like)
    text = {FILE_KEYS[k]: v for k, v in tensors.items()}
    for key in ("null_embeds", "null_mask", "null_pooled"):
        if key in text and text[key].shape[0] == 1 and n > 1:
            text[key] = text[key].expand(n, *text[key].shape[1:]).contiguous()
    return text


def select_prompts(text: dict[str, Tensor], index: Tensor | Sequence[int]) -> dict[str, Tensor]:
    """The rows ``index`` of every tensor of a :func:`read_prompt_embeds` dict."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return {k: v[idx] for k, v in text.items()}
