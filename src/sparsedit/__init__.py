"""sparsedit: token sparsification for Diffusion Transformers (SparseDiT).

Public API::

    import sparsedit
    model = sparsedit.load_model("DiT-XL-2-256x256.pt")        # or a diffusers / sparsedit directory
    sparsedit.save_model(model, "out_dir", fmt="diffusers")     # or "sparsedit"
"""

from __future__ import annotations

__version__ = "0.1.0"

from sparsedit.checkpoint import load_pretrained, save_pretrained
from sparsedit.convert import load_model, save_model
from sparsedit.dit import DIT_PRESETS, DiT, DiTConfig, dit_config
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.schedule import PieceSampler, PruningSchedule
from sparsedit.sparse_dit import LAYOUTS, SparseDiT, SparseDiTConfig
from sparsedit.sparsify import sparsify

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
