"""sparsedit: token sparsification for Diffusion Transformers (SparseDiT).

Public API::

    import sparsedit
    model = sparsedit.load_model("DiT-XL-2-256x256.pt")        # or a diffusers / sparsedit directory
    sparsedit.save_model(model, "out_dir", fmt="diffusers")     # or "sparsedit"
"""

from __future__ import annotations

from sparsedit import _moved  # noqa: F401  (old import paths keep working, with a DeprecationWarning)
from sparsedit._version import __version__
from sparsedit.core.checkpoint import load_pretrained, save_pretrained
from sparsedit.core.layout import LAYOUTS
from sparsedit.core.schedule import PieceSampler, PruningSchedule
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.dit.model import DIT_PRESETS, DiT, DiTConfig, dit_config
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig
from sparsedit.families.dit.sparsify import sparsify
from sparsedit.loading import load_model, save_model

__all__ = [
    "DIT_PRESETS",
    "CheckpointError",
    "DiT",
    "DiTConfig",
    "LAYOUTS",
    "PieceSampler",
    "PruningSchedule",
    "SparseDiT",
    "SparseDiTConfig",
    "SparseditError",
    "__version__",
    "dit_config",
    "load_model",
    "load_pretrained",
    "save_model",
    "save_pretrained",
    "sparsify",
]
