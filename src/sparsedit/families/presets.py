"""Named model presets of every family, as configs: ``DiT-XL/2``, ``SparseDiT-XL/2``, ``PixArt-XL/2``,
``SparsePixArt-XL/2``, ``Latte-XL/2``, ``SparseLatte-XL/2`` (and the smaller DiT / Latte sizes).

``sparsedit flops`` and ``sparsedit bench`` resolve their ``--model`` / ``--a`` / ``--b`` names here,
so a name means the same model everywhere. A sparse preset is its dense model plus the paper's
layout for that family (:data:`sparsedit.core.layout.LAYOUTS`, :data:`sparsedit.families.latte.model.SPARSE_LATTE_LAYOUTS`).
Each family resolves its own names (:meth:`sparsedit.families.base.Family.resolve_preset`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparsedit.errors import SparseditError
from sparsedit.families import families, family_of

__all__ = ["PRESET_HELP", "dense_config", "is_sparse", "preset_config", "resolve_preset", "with_sparsity"]


PRESET_HELP = ", ".join(cls.preset_help for cls in families())


def is_sparse(config: Any) -> bool:
    """True for a SparseDiT / SparsePixArt / SparseLatte config."""
    try:
        return family_of(config).sparse
    except SparseditError:
        return False


def dense_config(config: Any) -> Any:
    """The dense model a sparse config was derived from (same fields, no layout); a dense config as is."""
    return family_of(config).dense_config()


def resolve_preset(name: str, image_size: int = 256) -> tuple[Any, str | None]:
    """(dense config, the preset's layout or None) of a preset name at ``image_size`` pixels.

    ``SparseDiT-XL/2`` is DiT-XL/2 with the paper's XL layout; ``SparsePixArt-XL/2`` is PixArt-alpha
    (XL/2) with the same layout; ``SparseLatte-XL/2`` is Latte-XL/2 with the paper's video layout.
    """
    from sparsedit.encoders.vae import VAE_DOWNSAMPLE

    if image_size % VAE_DOWNSAMPLE:  # every preset is a latent model of the SD VAE
        raise SparseditError(f"image size {image_size} is not a multiple of the VAE factor {VAE_DOWNSAMPLE}; pick e.g. "
                             f"{max(VAE_DOWNSAMPLE, image_size // VAE_DOWNSAMPLE * VAE_DOWNSAMPLE)}")
    for cls in families():
        found = cls.resolve_preset(name, image_size)
        if found is not None:
            return found
    raise SparseditError(f"{name!r} is neither an existing checkpoint path nor a preset; pass a path or {PRESET_HELP}")


def with_sparsity(config: Any, layout: str | None, rates: dict[str, Any]) -> Any:
    """Apply a layout and ``r_min`` / ``r_max`` / ``num_pieces`` (None = keep) to a dense or sparse config.

    A dense config with a layout becomes the family's sparse config; a sparse config gets the new
    layout / rates; rates without a layout on a dense config are an error (they would be ignored).
    """
    from sparsedit.core.layout import layout_fields, parse_layout

    family = family_of(config)
    family.check_rates(rates)
    given = {k: v for k, v in rates.items() if v is not None}
    if family.sparse:
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
    return family.sparse_config(layout, **given)


def preset_config(name: str, image_size: int = 256, **rates: float | int | None) -> Any:
    """The config a preset name stands for, sparse presets with their layout and the given rates.

    ``rates``: ``r_min`` / ``r_max`` / ``num_pieces``; None keeps the model's default. Rates given
    for a dense preset are ignored (so one pair of flags can serve a dense and a sparse model).
    """
    config, layout = resolve_preset(name, image_size)
    return with_sparsity(config, layout, rates) if layout is not None else config
