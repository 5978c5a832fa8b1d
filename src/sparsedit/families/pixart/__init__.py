"""The PixArt-alpha family: PixArt, SparsePixArt, sampling from caption embeddings and their checkpoint formats."""

from __future__ import annotations

from sparsedit.families.pixart.convert import (
    PIXART_DIFFUSERS_CLASSES,
    infer_pixart_config,
    is_pixart_diffusers_config,
    is_pixart_state,
    original_state_dict,
    pick_pixart_state,
    pixart_config_from_diffusers,
    pixart_from_diffusers,
    pixart_from_original,
    pixart_from_original_state,
    save_pixart_diffusers,
)
from sparsedit.families.pixart.layers import (
    CaptionEmbedder,
    PixArtBlock,
    PixArtCond,
    PixArtFinalLayer,
    TextCrossAttention,
    text_attention_mask,
)
from sparsedit.families.pixart.model import (
    CAPTION_TOKENS,
    PIXART_HEAD_DIM,
    PIXART_INTERPOLATION,
    PIXART_XL,
    T5_CHANNELS,
    PixArt,
    PixArtConfig,
    PixArtInputs,
    pixart_config,
    pixart_pos_embed,
    size_conditions,
)
from sparsedit.families.pixart.sampling import (
    generate_pixart,
)
from sparsedit.families.pixart.sparse import (
    PixArtCrossDenseBlock,
    PixArtGenerationBlock,
    PixArtPoolingformer,
    PixArtRecoveryBlock,
    SparsePixArt,
    SparsePixArtConfig,
    sparsify_pixart,
)

__all__ = [
    "CAPTION_TOKENS",
    "CaptionEmbedder",
    "PIXART_DIFFUSERS_CLASSES",
    "PIXART_HEAD_DIM",
    "PIXART_INTERPOLATION",
    "PIXART_XL",
    "PixArt",
    "PixArtBlock",
    "PixArtCond",
    "PixArtConfig",
    "PixArtCrossDenseBlock",
    "PixArtFinalLayer",
    "PixArtGenerationBlock",
    "PixArtInputs",
    "PixArtPoolingformer",
    "PixArtRecoveryBlock",
    "SparsePixArt",
    "SparsePixArtConfig",
    "T5_CHANNELS",
    "TextCrossAttention",
    "generate_pixart",
    "infer_pixart_config",
    "is_pixart_diffusers_config",
    "is_pixart_state",
    "original_state_dict",
    "pick_pixart_state",
    "pixart_config",
    "pixart_config_from_diffusers",
    "pixart_from_diffusers",
    "pixart_from_original",
    "pixart_from_original_state",
    "pixart_pos_embed",
    "save_pixart_diffusers",
    "size_conditions",
    "sparsify_pixart",
    "text_attention_mask",
]
