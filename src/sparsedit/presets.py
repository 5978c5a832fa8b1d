"""Named model presets of every family, as configs: ``DiT-XL/2``, ``SparseDiT-XL/2``, ``PixArt-XL/2``,
``SparsePixArt-XL/2``, ``Latte-XL/2``, ``SparseLatte-XL/2`` (and the smaller DiT / Latte sizes).

``sparsedit flops`` and ``sparsedit bench`` resolve their ``--model`` / ``--a`` / ``--b`` names here,
so a name means the same model everywhere. A sparse preset is its dense model plus the paper's
layout for that family (:data:`sparsedit.sparse_dit.LAYOUTS`, :data:`sparsedit.latte.SPARSE_LATTE_LAYOUTS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparsedit.dit import DIT_PRESETS, DiTConfig, dit_config
from sparsedit.errors import SparseditError
from sparsedit.latte import LATTE_PRESETS, LatteConfig, SparseLatteConfig, latte_config
from sparsedit.pixart import PixArtConfig, SparsePixArtConfig, pixart_config
from sparsedit.sparse_dit import LAYOUTS, SparseDiTConfig, layout_fields, parse_layout

__all__ = ["PRESET_HELP", "dense_config", "is_sparse", "preset_config", "resolve_preset", "with_sparsity"]

PRESET_HELP = ("a DiT preset (DiT-XL/2, DiT-B/2, ...), a SparseDiT preset (SparseDiT-XL/2, SparseDiT-B/2, ...), "
               "PixArt-XL/2, SparsePixArt-XL/2, a Latte preset (Latte-XL/2, ...) or SparseLatte-XL/2")

# Sparse config class -> the dense config class it extends.
_DENSE_OF: dict[type, type] = {SparseDiTConfig: DiTConfig, SparsePixArtConfig: PixArtConfig,
                               SparseLatteConfig: LatteConfig}


def is_sparse(config: Any) -> bool:
    """True for a SparseDiT / SparsePixArt / SparseLatte config."""
    return type(config) in _DENSE_OF


def dense_config(config: Any) -> Any:
    """The dense model a sparse config was derived from (same fields, no layout); a dense config as is."""
    dense_cls = _DENSE_OF.get(type(config))
    if dense_cls is None:
        return config
    return dense_cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(dense_cls) if f.init})


def resolve_preset(name: str, image_size: int = 256) -> tuple[Any, str | None]:
    """(dense config, the preset's layout or None) of a preset name at ``image_size`` pixels.

    ``SparseDiT-XL/2`` is DiT-XL/2 with the paper's XL layout; ``SparsePixArt-XL/2`` is PixArt-alpha
    (XL/2) with the same layout; ``SparseLatte-XL/2`` is Latte-XL/2 with the paper's video layout.
    """
    from sparsedit.vae import VAE_DOWNSAMPLE

    if image_size % VAE_DOWNSAMPLE:  # every preset is a latent model of the SD VAE
        raise SparseditError(f"image size {image_size} is not a multiple of the VAE factor {VAE_DOWNSAMPLE}; pick e.g. "
                             f"{max(VAE_DOWNSAMPLE, image_size // VAE_DOWNSAMPLE * VAE_DOWNSAMPLE)}")
    if name in ("PixArt-XL/2", "SparsePixArt-XL/2"):
        return pixart_config(image_size), ("SparseDiT-XL" if name.startswith("Sparse") else None)
    if name.startswith("SparseLatte-") and name[len("Sparse"):] in LATTE_PRESETS:
        return latte_config(name[len("Sparse"):], image_size), "SparseLatte-XL"
    if name in LATTE_PRESETS:
        return latte_config(name, image_size), None
    if name.startswith("SparseDiT-"):
        dit_name = "DiT-" + name[len("SparseDiT-"):]
        if dit_name not in DIT_PRESETS:
            raise SparseditError(
                f"unknown SparseDiT preset {name!r}; choose one of {', '.join(k + '/2' for k in LAYOUTS)} "
                "(or /4, /8), or a DiT preset with --layout"
            )
        return dit_config(dit_name, image_size), name
    if name in DIT_PRESETS:
        return dit_config(name, image_size), None
    raise SparseditError(f"{name!r} is neither an existing checkpoint path nor a preset; pass a path or {PRESET_HELP}")


def with_sparsity(config: Any, layout: str | None, rates: dict[str, Any]) -> Any:
    """Apply a layout and ``r_min`` / ``r_max`` / ``num_pieces`` (None = keep) to a dense or sparse config.

    A dense config with a layout becomes the family's sparse config; a sparse config gets the new
    layout / rates; rates without a layout on a dense config are an error (they would be ignored).
    """
    given = {k: v for k, v in rates.items() if v is not None}
    if isinstance(config, LatteConfig) and given.pop("num_pieces", None) is not None:
        raise SparseditError("--num-pieces does not apply to Latte: its schedule is continuous (no training pieces); "
                             "drop it")
    if is_sparse(config):
        fields: dict[str, Any] = dict(given)
        if layout is not None:
            fields.update(layout_fields(parse_layout(layout)))
        return dataclasses.replace(config, **fields) if fields else config
    if layout is None:
        if given:
            raise SparseditError(
                "--r-min/--r-max/--num-pieces apply to a sparse model; add --layout, or pass a sparse preset "
                "such as SparseDiT-XL/2"
            )
        return config
    if isinstance(config, LatteConfig):
        return SparseLatteConfig.from_latte(config, layout, **given)
    if isinstance(config, PixArtConfig):
        return SparsePixArtConfig.from_pixart(config, layout, **given)
    return SparseDiTConfig.from_dit(config, layout, **given)


def preset_config(name: str, image_size: int = 256, **rates: float | int | None) -> Any:
    """The config a preset name stands for, sparse presets with their layout and the given rates.

    ``rates``: ``r_min`` / ``r_max`` / ``num_pieces``; None keeps the model's default. Rates given
    for a dense preset are ignored (so one pair of flags can serve a dense and a sparse model).
    """
    config, layout = resolve_preset(name, image_size)
    return with_sparsity(config, layout, rates) if layout is not None else config
