"""PixArt / SparsePixArt as diffusers' ``PixArtTransformer2DModel`` (for :func:`sparsedit.interop.use_in_pipeline`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparsedit.errors import SparseditError
from sparsedit.families.face import DiffusersFace
from sparsedit.families.pixart.model import PixArt


class DiffusersPixArt(DiffusersFace):
    """A sparsedit PixArt / SparsePixArt behind diffusers' ``PixArtTransformer2DModel`` call signature."""

    family = PixArt
    pipelines = ("PixArtAlphaPipeline",)
    checked_keys = ("sample_size", "in_channels", "out_channels", "caption_channels")

    def extra_config(self, model: Any) -> dict[str, Any]:
        cfg = model.config
        return {"caption_channels": cfg.caption_channels, "use_additional_conditions": cfg.use_additional_conditions,
                "interpolation_scale": cfg.interpolation_scale}

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                timestep: Tensor | float | None = None, added_cond_kwargs: dict[str, Tensor] | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, attention_mask: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None, return_dict: bool = True) -> Any:
        """(B, C, H, W) latents, (B, L, C_text) T5 embeddings, (B, L) mask -> ``.sample`` (B, C_out, H, W)."""
        if encoder_hidden_states is None:
            raise SparseditError("a PixArt needs encoder_hidden_states (T5 embeddings of the prompt)")
        if cross_attention_kwargs or attention_mask is not None:
            # Silently dropping them would change the result; PixArtAlphaPipeline passes neither.
            raise SparseditError("sparsedit's PixArt supports neither cross_attention_kwargs nor an image attention_mask")
        if self.model.config.use_additional_conditions and (
            not added_cond_kwargs or any(added_cond_kwargs.get(k) is None for k in ("resolution", "aspect_ratio"))
        ):
            raise SparseditError(
                "this PixArt needs added_cond_kwargs resolution and aspect_ratio; PixArtAlphaPipeline passes them only "
                "for sample_size 128 (1024 px) models"
            )
        t = self.batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device)
        out = self.model(hidden_states, t, encoder_hidden_states, encoder_attention_mask, added_cond_kwargs)
        return self.pack(out, return_dict)
