"""``load_model`` / ``save_model``: any checkpoint of any family, in and out, through the family registry.

A path is recognised (:func:`detect_format`) as a sparsedit directory, a diffusers directory of one of the
families, or a single file (official DiT ``.pt``, SparseDiT authors' ``.pt``, original PixArt ``.pth``), which
the families tell apart by its keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsedit.core.checkpoint import CONFIG_NAME, load_pretrained, read_json, read_safetensors, save_pretrained
from sparsedit.core.formats import diffusers_model_dir, read_torch_file
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families import Family, families, family_of

# save_model's formats: sparsedit directories, diffusers directories, the SparseDiT authors' .pt files.
EXPORT_FORMATS = ("sparsedit", "diffusers", "official-sparsedit")


def detect_format(path: str | Path) -> str:
    """"sparsedit", "diffusers", "pixart-diffusers", "latte-diffusers" or "official" for a path, or a CheckpointError saying why not.

    "official" is any single file: a DiT ``.pt`` or a PixArt ``.pth``, told apart by their keys on loading.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a DiT .pt file, a diffusers directory or a sparsedit directory")
    if path.is_dir():
        cfg_path = diffusers_model_dir(path) / CONFIG_NAME
        if not cfg_path.exists():
            raise CheckpointError(f"{path} has no config.json; it is neither a sparsedit nor a diffusers checkpoint")
        cfg = read_json(cfg_path)
        if "_class_name" in cfg:
            return _diffusers_family(cfg).diffusers_format  # type: ignore[return-value]
        if "model_type" in cfg:
            return "sparsedit"
        raise CheckpointError(f"{cfg_path} names neither a model_type (sparsedit) nor a _class_name (diffusers)")
    if not path.is_file():  # a FIFO or a device would block the reader or stream forever
        raise CheckpointError(f"{path} is not a regular file (a pipe or a device?); pass the checkpoint file itself")
    return "official"


def _by_specificity() -> list[type[Family]]:
    """The families, those that recognise their files by name first and the catch-all (DiT) last."""
    return sorted(families(), key=lambda cls: cls.catch_all)


def _diffusers_family(cfg: dict[str, Any]) -> type[Family]:
    return next(cls for cls in _by_specificity() if cls.reads_diffusers(cfg))


def _load_single_file(path: Path, preset: str | None, image_size: int | None, use_ema: bool,
                      semantic_size: int | tuple[int, int] | None) -> nn.Module:
    """An official DiT, SparseDiT authors' or original PixArt-alpha file, told apart by its keys."""
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    family = next(cls for cls in _by_specificity() if cls.reads_file(obj))
    return family.from_file(obj, path, preset, image_size, use_ema, semantic_size=semantic_size)


def load_model(
    path: str | Path,
    model: str | None = None,
    image_size: int | None = None,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    semantic_size: int | tuple[int, int] | None = None,
) -> nn.Module:
    """Load any supported checkpoint and return the model in eval mode.

    ``path``: an official DiT ``.pt`` (bare state dict or training dict, EMA weights by default), a
    SparseDiT authors' ``.pt`` (https://github.com/changsn/SparseDiT: their ``train.py``'s training
    dict or a bare state dict; a :class:`SparseDiT` at their fixed grid, see :mod:`sparsedit.families.dit.authors`),
    a diffusers ``DiTTransformer2DModel`` directory, an original PixArt-alpha ``.pth``, a diffusers
    ``PixArtTransformer2DModel`` (or PixArt pipeline) directory, a diffusers ``LatteTransformer3DModel``
    (or Latte pipeline) directory, or a sparsedit directory. ``model`` (a preset such
    as ``"DiT-XL/2"``) and ``image_size`` are only needed when the file cannot tell; ``semantic_size``
    sets the SparseDiT authors' sparse grid side (default: their file's ``args``, else 8, their training default).
    """
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise SparseditError(f"load_model takes the path of a checkpoint (a str or Path), not {path!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise SparseditError(f"dtype must be a torch.dtype such as torch.bfloat16, not {dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise SparseditError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    path = Path(path)
    kind = detect_format(path)
    if kind == "official":
        net = _load_single_file(path, model, image_size, use_ema, semantic_size)
    elif semantic_size is not None:
        raise SparseditError(f"semantic_size (--semantic-size) applies to the SparseDiT authors' .pt files only, not "
                             f"to the {kind} directory {path}; drop it")
    elif kind == "sparsedit":
        net = load_pretrained(path)
    else:  # a diffusers directory: detect_format named the family that reads it
        net = next(cls for cls in families() if cls.diffusers_format == kind).from_diffusers(path)
    if image_size is not None and kind != "official":
        family_of(net).set_image_size(net, image_size)  # SD3 / FLUX.1 run at any size; the rest refuse elsewhere
    if device is not None or dtype is not None:
        net = net.to(device=device, dtype=dtype)
    return net.eval()


def save_model(model: nn.Module, out: str | Path, fmt: str = "sparsedit", overwrite: bool = False,
               drop_null_caption: bool = False) -> Path:
    """Export ``model`` as ``fmt`` ("sparsedit", "diffusers" or "official-sparsedit").

    diffusers holds dense models only: a DiT (``DiTTransformer2DModel``), a PixArt
    (``PixArtTransformer2DModel``; ``drop_null_caption`` allows dropping an original checkpoint's null
    caption, which diffusers has no slot for) or a text-conditional Latte (``LatteTransformer3DModel``).
    "official-sparsedit" writes a SparseDiT as the authors' ``.pt`` file ``out`` (:func:`sparsedit.families.dit.authors.save_authors`).
    """
    if fmt == "sparsedit":
        return save_pretrained(model, out, overwrite)
    if fmt == "official-sparsedit":
        from sparsedit.families.dit.authors import save_authors

        return save_authors(model, out, overwrite)  # type: ignore[arg-type]  # refuses anything but a SparseDiT
    if fmt != "diffusers":
        raise SparseditError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    try:
        family = family_of(model)
    except SparseditError:
        raise SparseditError(f"a {type(model).__name__} has no diffusers format; use --to sparsedit") from None
    return family.save_diffusers(model, out, overwrite, drop_null_caption)


def export_differences(config: Any) -> list[str]:
    """Numerical settings that a diffusers export of a model with ``config`` cannot keep (empty when exact)."""
    return family_of(config).export_differences()
