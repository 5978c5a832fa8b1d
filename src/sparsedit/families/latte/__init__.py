"""The Latte family: Latte, SparseLatte, video sampling and writing, and their checkpoint formats."""

from __future__ import annotations

from sparsedit.families.latte.convert import (
    LATTE_DIFFUSERS_CLASS,
    is_latte_diffusers_config,
    latte_config_from_diffusers,
    latte_from_diffusers,
    latte_from_original_state,
    save_latte_diffusers,
)
from sparsedit.families.latte.model import (
    CONDITIONINGS,
    LATTE_FRAMES,
    LATTE_PRESETS,
    SPARSE_LATTE_LAYOUTS,
    Latte,
    LatteConfig,
    latte_config,
    swap_layout,
    temporal_pos_embed,
)
from sparsedit.families.latte.sparse import (
    SparseLatte,
    SparseLatteConfig,
    VideoPiece,
    VideoPieceSampler,
    latte_block_axes,
    latte_block_kinds,
    sparsify_latte,
    split_keep_ratio,
    video_pieces,
)
from sparsedit.families.latte.video import (
    generate_latte,
    save_video_gif,
    save_video_strip,
)

__all__ = [
    "CONDITIONINGS",
    "LATTE_DIFFUSERS_CLASS",
    "LATTE_FRAMES",
    "LATTE_PRESETS",
    "Latte",
    "LatteConfig",
    "SPARSE_LATTE_LAYOUTS",
    "SparseLatte",
    "SparseLatteConfig",
    "VideoPiece",
    "VideoPieceSampler",
    "generate_latte",
    "is_latte_diffusers_config",
    "latte_block_axes",
    "latte_block_kinds",
    "latte_config",
    "latte_config_from_diffusers",
    "latte_from_diffusers",
    "latte_from_original_state",
    "save_latte_diffusers",
    "save_video_gif",
    "save_video_strip",
    "sparsify_latte",
    "split_keep_ratio",
    "swap_layout",
    "temporal_pos_embed",
    "video_pieces",
]
