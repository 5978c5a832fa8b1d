"""SD3 as diffusers' ``SD3Transformer2DModel`` (for :func:`sparsedit.interop.use_in_pipeline`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparsedit.errors import SparseditError
from sparsedit.families.face import DiffusersFace
from sparsedit.families.sd3.model import SD3


class DiffusersSD3(DiffusersFace):
    """A sparsedit SD3 behind diffusers' ``SD3Transformer2DModel`` call signature."""

    family = SD3
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    checked_keys = ("sample_size", "in_channels", "out_channels", "patch_size", "joint_attention_dim",
                    "pooled_projection_dim")

    def extra_config(self, model: Any) -> dict[str, Any]:
        from sparsedit.families.sd3.convert import diffusers_fields

        fields = diffusers_fields(model.config)
        return {k: v for k, v in fields.items() if k not in ("sample_size", "in_channels", "out_channels", "patch_size")}

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                pooled_projections: Tensor | None = None, timestep: Tensor | float | None = None,
                block_controlnet_hidden_states: list[Tensor] | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True,
                skip_layers: list[int] | None = None) -> Any:
        """(B, C, H, W) latents, (B, L, C_text) caption and (B, C_pooled) pooled embeddings, timesteps as the
        pipeline passes them (``sigma * 1000``) -> ``.sample`` (B, C_out, H, W)."""
        if encoder_hidden_states is None or pooled_projections is None:
            raise SparseditError("an SD3 needs encoder_hidden_states and pooled_projections (the prompt's embeddings)")
        # Silently dropping any of these would change the result; the pipelines pass none of them by default.
        if joint_attention_kwargs:
            raise SparseditError(f"sparsedit's SD3 takes no joint_attention_kwargs (got {sorted(joint_attention_kwargs)}"
                                 "); drop the pipeline's joint_attention_kwargs / IP-Adapter / LoRA scale")
        if block_controlnet_hidden_states is not None:
            raise SparseditError("sparsedit's SD3 takes no ControlNet residuals; use diffusers' own transformer for "
                                 "ControlNet pipelines")
        if skip_layers is not None:
            raise SparseditError("sparsedit's SD3 does not skip layers; drop skip_guidance_layers from the pipeline call")
        t = self.batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device)
        out = self.model(hidden_states, t, encoder_hidden_states, pooled_projections)
        return self.pack(out, return_dict)
