"""a text-conditional Latte / SparseLatte as diffusers' ``LatteTransformer3DModel`` (for :func:`sparsedit.interop.use_in_pipeline`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparsedit.errors import SparseditError
from sparsedit.families.face import DiffusersFace
from sparsedit.families.latte.model import Latte


class DiffusersLatte(DiffusersFace):
    """A text-conditional sparsedit Latte / SparseLatte behind diffusers' ``LatteTransformer3DModel`` signature.

    Latents are (B, C, F, H, W) in both libraries, so they pass through unchanged.
    """

    family = Latte
    pipelines = ("LattePipeline",)
    checked_keys = ("sample_size", "in_channels", "out_channels", "caption_channels")

    def extra_config(self, model: Any) -> dict[str, Any]:
        cfg = model.config
        if not cfg.text:
            raise SparseditError(
                "LattePipeline is text-to-video but this Latte is class-conditional; use sparsedit.families.latte.model.generate_latte"
            )
        return {"caption_channels": cfg.caption_channels, "video_length": cfg.num_frames}

    def forward(self, hidden_states: Tensor, timestep: Tensor | float | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                enable_temporal_attentions: bool = True, return_dict: bool = True) -> Any:
        """(B, C, F, H, W) latents, (B, L, C_text) T5 embeddings -> ``.sample`` (B, C_out, F, H, W)."""
        if encoder_hidden_states is None:
            raise SparseditError("a text-conditional Latte needs encoder_hidden_states (T5 embeddings of the prompt)")
        if not enable_temporal_attentions:
            raise SparseditError("sparsedit's Latte always runs its temporal blocks; drop enable_temporal_attentions=False")
        t = self.batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device)
        out = self.model(hidden_states, t, encoder_hidden_states, encoder_attention_mask)
        return self.pack(out, return_dict)
