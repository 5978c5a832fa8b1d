"""The Stable Diffusion 3 / 3.5 family: the dense MMDiT (SD3), its diffusers format and its diffusers face.

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

__all__ = [
    "SD3",
    "SD3_CAPTION_CHANNELS",
    "SD3_DIFFUSERS_CLASS",
    "SD3_HEAD_DIM",
    "SD3_POOLED_CHANNELS",
    "SD3_SIZES",
    "SD3_TEXT_TOKENS",
    "DiffusersSD3",
    "JointAttention",
    "JointBlock",
    "RMSNorm",
    "SD3Config",
    "SelfAttention",
    "diffusers_fields",
    "is_sd3_diffusers_config",
    "save_sd3_diffusers",
    "sd3_config",
    "sd3_config_from_diffusers",
    "sd3_from_diffusers",
    "sd3_from_state",
]
