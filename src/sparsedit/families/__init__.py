"""Model families and their registry: ``family_of(model or config)`` answers every family-specific question.

Each family lives in its own folder (``dit``, ``pixart``, ``latte``): model, sparse model, checkpoint formats and a
:class:`~sparsedit.families.base.Family` adapter registered here under the ``model_type`` names its configs write
into ``config.json``.
"""

from __future__ import annotations

import importlib
from typing import Any

from sparsedit.errors import SparseditError
from sparsedit.families.base import Family

__all__ = ["BUILTIN", "Family", "families", "family_class", "family_of", "register"]

# The adapter modules of the families that ship with sparsedit, in the order help texts list them.
BUILTIN = ("sparsedit.families.dit.family", "sparsedit.families.pixart.family", "sparsedit.families.latte.family",
           "sparsedit.families.sd3.family", "sparsedit.families.flux.family", "sparsedit.families.wan.family")

_FAMILIES: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family (its dense and sparse model types) to the registry."""
    from sparsedit.core.checkpoint import register_model_type

    if cls not in _FAMILIES:
        _FAMILIES.append(cls)
    for model_type, (config_cls, model_cls) in cls.model_types().items():
        register_model_type(model_type, config_cls, model_cls)
    return cls


def families() -> list[type[Family]]:
    """Every registered family, in registration order."""
    for name in BUILTIN:
        importlib.import_module(name)
    return list(_FAMILIES)


def family_class(model_type: str) -> type[Family]:
    """The family whose dense or sparse model is ``model_type`` ("DiT", "SparsePixArt", ...)."""
    for cls in families():
        if model_type in (cls.dense_type, cls.sparse_type):
            return cls
    known = ", ".join(t for cls in families() for t in (cls.dense_type, cls.sparse_type))
    raise SparseditError(f"unknown model_type {model_type!r}; sparsedit knows {known}")


def family_of(obj: Any) -> Family:
    """The :class:`Family` adapter of a model (anything with a ``config``) or of a config, bound to that config."""
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise SparseditError(f"a {type(obj).__name__} is not a sparsedit model or config; pass a DiT, PixArt or "
                             "Latte model (dense or sparse)")
    return family_class(model_type)(config)
