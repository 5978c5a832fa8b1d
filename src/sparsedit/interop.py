"""Drop sparsedit models into diffusers pipelines.

``DiTPipeline`` calls ``transformer(latents, timestep=t, class_labels=y).sample`` and reads
``transformer.config.{sample_size, in_channels, out_channels}``; :class:`DiffusersDiT` gives a
DiT or SparseDiT exactly that face. A SparseDiT picks its sparse grid from the timestep the
scheduler passes (diffusers' DDPM/DDIM/DPM-Solver schedulers pass the original training timestep),
so any of them drives the per-step grid::

    pipe = DiTPipeline.from_pretrained("path/to/DiT-XL-2-256")    # local directory
    sparsedit.interop.use_in_pipeline(pipe, sparsedit.load_model("path/to/sparse"))
    images = pipe(class_labels=[207, 360], num_inference_steps=25).images
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.dit import DiT
from sparsedit.errors import SparseditError


class DiffusersDiT(nn.Module):
    """A sparsedit :class:`DiT` / ``SparseDiT`` behind diffusers' ``DiTTransformer2DModel`` call signature."""

    def __init__(self, model: DiT):
        super().__init__()
        if not isinstance(model, DiT):
            raise SparseditError(f"expected a DiT or SparseDiT, got {type(model).__name__}")
        h, w = model.config.latent_hw
        if h != w:
            raise SparseditError("diffusers' DiTPipeline samples square latents; this model is not square")
        self.model = model
        self.config = SimpleNamespace(
            sample_size=h, in_channels=model.config.in_channels, out_channels=model.config.out_channels,
            patch_size=model.config.patch_size, num_embeds_ada_norm=model.config.num_classes,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, hidden_states: Tensor, timestep: Tensor | float | None = None,
                class_labels: Tensor | None = None, return_dict: bool = True, **_: Any) -> Any:
        """(B, C, H, W) latents, (B,) or scalar timesteps, (B,) labels -> ``.sample`` (B, C_out, H, W)."""
        if timestep is None or class_labels is None:
            raise SparseditError("a class-conditional DiT needs both timestep and class_labels")
        t = torch.as_tensor(timestep, device=hidden_states.device)
        t = t.expand(hidden_states.shape[0]) if t.ndim == 0 else t
        out = self.model(hidden_states, t, class_labels)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def to_diffusers(model: DiT) -> DiffusersDiT:
    """Wrap ``model`` for diffusers pipelines (weights are shared, nothing is copied)."""
    return DiffusersDiT(model)


def use_in_pipeline(pipe: Any, model: DiT) -> Any:
    """Replace ``pipe.transformer`` with ``model`` (one call); returns the pipeline."""
    if not hasattr(pipe, "transformer"):
        raise SparseditError(f"{type(pipe).__name__} has no transformer to replace")
    old = pipe.transformer
    wrapped = to_diffusers(model)
    for key in ("sample_size", "in_channels"):
        theirs, ours = getattr(old.config, key, None), getattr(wrapped.config, key)
        if theirs is not None and theirs != ours:
            raise SparseditError(f"the pipeline's transformer has {key}={theirs} but the sparsedit model has {ours}; "
                                 "use a model converted from this pipeline's transformer")
    # Set the attribute directly: the pipeline's config entry keeps naming the original class, so
    # save_pretrained of the pipeline is not supported with a swapped-in model (save ours separately).
    object.__setattr__(pipe, "transformer", wrapped.to(old.device))
    return pipe
