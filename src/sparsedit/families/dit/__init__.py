"""The DiT family: class-conditional DiT, SparseDiT, the paper's sparsification and their checkpoint formats."""

from __future__ import annotations

from sparsedit.families.dit.convert import (
    DIFFUSERS_CLASS,
    dit_from_diffusers,
    dit_from_official_state,
    infer_dit_config,
    official_state_dict,
    save_diffusers,
)
from sparsedit.families.dit.model import (
    CFG_MODES,
    DIT_PRESETS,
    DIT_SIZES,
    ClassCondEmbedder,
    DiT,
    DiTConfig,
    GridConfig,
    GuidanceMixin,
    dit_config,
)
from sparsedit.families.dit.sparse import (
    SparseDiT,
    SparseDiTConfig,
)
from sparsedit.families.dit.sparsify import (
    InitRule,
    apply_init_rules,
    init_rules,
    pooled_qkv_keys,
    sparsify,
    sparsify_with_rules,
)

__all__ = [
    "CFG_MODES",
    "ClassCondEmbedder",
    "DIFFUSERS_CLASS",
    "DIT_PRESETS",
    "DIT_SIZES",
    "DiT",
    "DiTConfig",
    "GridConfig",
    "GuidanceMixin",
    "InitRule",
    "SparseDiT",
    "SparseDiTConfig",
    "apply_init_rules",
    "dit_config",
    "dit_from_diffusers",
    "dit_from_official_state",
    "infer_dit_config",
    "init_rules",
    "official_state_dict",
    "pooled_qkv_keys",
    "save_diffusers",
    "sparsify",
    "sparsify_with_rules",
]
