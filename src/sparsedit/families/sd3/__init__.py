"""The Stable Diffusion 3 / 3.5 family: the dense MMDiT (SD3), SparseSD3 (SparseDiT on its image tokens), the
diffusers format and the diffusers face.

The adapter (:mod:`sparsedit.families.sd3.family`) registers the family when imported; this package does not
import it, so importing the model alone changes no registry.
"""

from __future__ import annotations

from sparsedit.families.sd3.convert import (
    SD3_DIFFUSERS_CLASS,
    diffusers_fields,
    is_sd3_diffusers_config,
    save_sd3_diffusers,
    sd3_config_from_diffusers,
    sd3_from_diffusers,
    sd3_from_state,
)
from sparsedit.families.sd3.face import DiffusersSD3
from sparsedit.families.sd3.model import (
    SD3,
    SD3_CAPTION_CHANNELS,
    SD3_HEAD_DIM,
    SD3_POOLED_CHANNELS,
    SD3_SIZES,
    SD3_TEXT_TOKENS,
    JointAttention,
    JointBlock,
    RMSNorm,
    SD3Config,
    SelfAttention,
    sd3_config,
)
from sparsedit.families.sd3.sparse import (
    SPARSE_SD3_LAYOUTS,
    SparseSD3,
    SparseSD3Config,
    sd3_init_rules,
    sparsify_sd3,
    sparsify_sd3_with_rules,
)
from sparsedit.families.sd3.sparse_blocks import (
    JointCrossDenseBlock,
    JointGenerationBlock,
    JointPoolingAttention,
    JointPoolingformer,
    JointRecoveryBlock,
)

__all__ = [
    "SD3",
    "SD3_CAPTION_CHANNELS",
    "SD3_DIFFUSERS_CLASS",
    "SD3_HEAD_DIM",
    "SD3_POOLED_CHANNELS",
    "SD3_SIZES",
    "SD3_TEXT_TOKENS",
    "SPARSE_SD3_LAYOUTS",
    "DiffusersSD3",
    "JointAttention",
    "JointBlock",
    "JointCrossDenseBlock",
    "JointGenerationBlock",
    "JointPoolingAttention",
    "JointPoolingformer",
    "JointRecoveryBlock",
    "RMSNorm",
    "SD3Config",
    "SelfAttention",
    "SparseSD3",
    "SparseSD3Config",
    "diffusers_fields",
    "is_sd3_diffusers_config",
    "save_sd3_diffusers",
    "sd3_config",
    "sd3_config_from_diffusers",
    "sd3_from_diffusers",
    "sd3_from_state",
    "sd3_init_rules",
    "sparsify_sd3",
    "sparsify_sd3_with_rules",
]
