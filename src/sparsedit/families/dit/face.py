"""DiT / SparseDiT as diffusers' ``DiTTransformer2DModel`` (for :func:`sparsedit.interop.use_in_pipeline`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import DiT
from sparsedit.families.face import DiffusersFace


class DiffusersDiT(DiffusersFace):
    """A sparsedit DiT / SparseDiT behind diffusers' ``DiTTransformer2DModel`` call signature."""

    family = DiT
    pipelines = ("DiTPipeline",)
    checked_keys = ("sample_size", "in_channels")

    def extra_config(self, model: Any) -> dict[str, Any]:
        return {"num_embeds_ada_norm": model.config.num_classes}

    def forward(self, hidden_states: Tensor, timestep: Tensor | float | None = None,
                class_labels: Tensor | None = None, return_dict: bool = True, **_: Any) -> Any:
        """(B, C, H, W) latents, (B,) or scalar timesteps, (B,) labels -> ``.sample`` (B, C_out, H, W)."""
        if class_labels is None:
            raise SparseditError("a class-conditional DiT needs class_labels")
        t = self.batch_timesteps(timestep, hidden_states.shape[0], hidden_states.device)
        return self.pack(self.model(hidden_states, t, class_labels), return_dict)
