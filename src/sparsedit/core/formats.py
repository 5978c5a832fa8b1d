"""What every family's converters share: consuming a foreign state dict key by key (:class:`Source`), reading
``torch.load`` files without running pickles, and reading / writing diffusers model directories.

Every converter pops each source key it uses and fails, naming the keys, if anything is left over or anything
the model needs is missing.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sparsedit.core.checkpoint import (
    CONFIG_NAME,
    check_output_dir,
    load_state_strict,
    read_json,
    read_safetensors,
    write_dir,
    write_json,
    write_safetensors,
)
from sparsedit.errors import CheckpointError, SparseditError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


ModelT = TypeVar("ModelT", bound=nn.Module)


class Source:
    """A state dict being consumed: ``take`` pops keys, ``finish`` asserts nothing is left."""

    def __init__(self, state: dict[str, Tensor], name: str):
        self.state = dict(state)
        self.name = name

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.name}: missing key {key!r}; the checkpoint is incomplete")
        return self.state.pop(key)

    def has(self, key: str) -> bool:
        return key in self.state

    def finish(self) -> None:
        if self.state:
            keys = sorted(self.state)
            more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
            raise CheckpointError(
                f"{self.name}: {len(keys)} key(s) not used by the model: {', '.join(keys[:6])}{more}; "
                "the checkpoint is a different architecture"
            )


def read_torch_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; argparse.Namespace (DiT's ``args``) is allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; check the path") from None
    # The weights-only unpickler raises assorted errors on non-checkpoint bytes (KeyError, IndexError, ...).
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, KeyError, IndexError, ValueError,
            OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({first[:160]}); the file is truncated, "
            "not a checkpoint, or holds objects that are unsafe to unpickle"
        ) from None


def pick_state_dict(obj: Any, path: Path, use_ema: bool) -> dict[str, Tensor]:
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = "ema" if use_ema and "ema" in obj else "model"
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (nor a training dict with "
                              "'model'/'ema')")
    odd = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{path} does not hold a state dict: {odd!r} is a {type(obj[odd]).__name__}, not a "
                              "tensor (nor is it a training dict with 'model'/'ema')")
    return obj


def describe_keys(state: dict[str, Tensor]) -> str:
    """The top-level module names of a state dict, for errors that say what a file holds."""
    names = sorted({str(k).split(".")[0] for k in state})
    more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
    return ", ".join(names[:8]) + more if names else "nothing"


def read_diffusers_weights(path: Path) -> dict[str, Tensor]:
    single = path / DIFFUSERS_WEIGHTS
    index = path / f"{DIFFUSERS_WEIGHTS}.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():  # sharded: {"weight_map": {key: shard file}}
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of key -> shard file; the index is damaged")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # a shard outside the directory is no part of this checkpoint
                raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file of {path}; the index is "
                                      "damaged")
            state.update(read_safetensors(path / shard))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise CheckpointError(f"{index} lists {', '.join(absent[:3])} but no shard holds it; the checkpoint is "
                                  "incomplete")
        return state
    if (path / "diffusion_pytorch_model.bin").exists():
        return pick_state_dict(read_torch_file(path / "diffusion_pytorch_model.bin"), path, use_ema=False)
    raise CheckpointError(f"{path} has no {DIFFUSERS_WEIGHTS}; the diffusers directory is incomplete")


def diffusers_model_dir(path: Path) -> Path:
    """``path`` itself, or its ``transformer/`` folder when ``path`` is a pipeline directory."""
    if (path / "transformer" / CONFIG_NAME).exists() and not (path / CONFIG_NAME).exists():
        return path / "transformer"
    return path


def load_mapped(model: ModelT, src: Source, key_map: dict[str, list[str]]) -> ModelT:
    """Fill ``model`` from ``src``: ours <- theirs (several: concatenated on dim 0).

    Strict both ways: every model tensor is loaded and every source tensor is used. Returns the model in eval mode.
    """
    state = {ours: torch.cat([src.take(k) for k in theirs]) if len(theirs) > 1 else src.take(theirs[0])
             for ours, theirs in key_map.items()}
    load_state_strict(model, state, src.name)
    src.finish()
    return model.eval()


def load_diffusers_mapped(model: ModelT, path: Path, key_map: dict[str, list[str]]) -> ModelT:
    """:func:`load_mapped` from the diffusers weights in ``path``."""
    return load_mapped(model, Source(read_diffusers_weights(path), str(path)), key_map)


def check_exportable(model: nn.Module, dense_cls: type[nn.Module], diffusers_class: str) -> None:
    """Refuse what no diffusers class can hold: a sparse model, a non-square latent, an MLP ratio other than 4,
    a caption padding bias other than diffusers' -10000 (exact masking exports with a note, see sparsedit.loading.export_differences)."""
    if type(model) is not dense_cls:
        raise SparseditError(
            f"only a dense {dense_cls.__name__} exports to diffusers: a {type(model).__name__} has no diffusers class; "
            "save it with --to sparsedit (or export its dense source)"
        )
    cfg = model.config
    if cfg.latent_hw[0] != cfg.latent_hw[1]:
        raise SparseditError(f"diffusers' {diffusers_class} only supports square inputs; export to sparsedit instead")
    if cfg.mlp_ratio != 4.0:
        raise SparseditError(f"diffusers' {diffusers_class} has an MLP ratio of 4, not {cfg.mlp_ratio}; export to sparsedit")
    bias = getattr(cfg, "text_mask_bias", None)  # PixArt / Latte-T2V
    if bias not in (None, -10000.0):
        raise SparseditError(f"diffusers masks padded caption tokens with -10000, not {bias}; export to sparsedit")


def diffusers_state(ours: dict[str, Tensor], key_map: dict[str, list[str]],
                    dropped: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The inverse of :func:`load_diffusers_mapped`: split every tensor into the diffusers tensors it is made of.

    A fused tensor (q/k/v) splits into equal parts along dim 0. Every key of ``ours`` must be mapped
    or listed in ``dropped``, so an export never loses a tensor silently.
    """
    left = sorted(set(ours) - set(key_map) - set(dropped))
    if left:
        raise SparseditError(f"the diffusers format has no place for {', '.join(left[:6])}; export to sparsedit")
    return {name: part for key, theirs in key_map.items()
            for name, part in zip(theirs, ours[key].chunk(len(theirs)), strict=True)}


def write_diffusers_model(out: str | Path, state: dict[str, Tensor], class_name: str, fields: dict[str, Any],
                          overwrite: bool = False) -> Path:
    """Write a diffusers model directory: weights, then ``config.json`` (it marks a complete checkpoint).

    All or nothing: the directory is written beside ``out`` and swapped in whole; an existing checkpoint in
    ``out`` is only replaced with ``overwrite``.
    """
    from sparsedit._version import __version__

    out = check_output_dir(out, overwrite, owned=(CONFIG_NAME, DIFFUSERS_WEIGHTS))

    def write(tmp: Path) -> None:
        write_safetensors(tmp / DIFFUSERS_WEIGHTS, state, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, {"_class_name": class_name, "_diffusers_version": "0.30.0",
                                       "_sparsedit_version": __version__, **fields})

    write_dir(out, write)
    return out
