"""Wan as diffusers' ``WanTransformer3DModel`` (for :func:`sparsedit.interop.use_in_pipeline`), and both experts of a
Wan2.2-A14B pipeline at once (:func:`use_wan_experts`).

The Wan pipelines pass the (B, C, F, H, W) latents as they are, the scheduler's timestep (``sigma * 1000``, our scale)
and the umT5 embeddings (plus CLIP image embeddings in WanImageToVideoPipeline): the face hands them to the model
unchanged, so the numbers are diffusers'. Casting the face (``face.to(dtype)``, which ``use_in_pipeline`` does) keeps
the tensors diffusers keeps in float32 in float32, as ``WanPipeline.from_pretrained(..., torch_dtype=...)`` holds its
transformer; ``model.to(dtype)`` casts every tensor, as diffusers' ``.to`` does. Wan2.2 TI2V's per-token timesteps (``expand_timesteps``) are accepted when
every token of a sample has the same one (text-to-video) and refused otherwise (its image conditioning).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families.face import DiffusersFace
from sparsedit.families.wan.convert import cast_like_diffusers, diffusers_wan_fields
from sparsedit.families.wan.model import Wan


class DiffusersWan(DiffusersFace):
    """A sparsedit Wan behind diffusers' ``WanTransformer3DModel`` call signature (any frame count and size)."""

    family = Wan
    pipelines = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")
    checked_keys = ("in_channels", "out_channels", "text_dim", "image_dim", "added_kv_proj_dim", "num_layers",
                    "num_attention_heads", "attention_head_dim", "ffn_dim")

    def __init__(self, model: nn.Module):
        nn.Module.__init__(self)  # not DiffusersFace.__init__: it refuses non-square latents, which Wan's 480p are
        if not isinstance(model, self.family):
            raise SparseditError(f"{type(self).__name__} wraps a Wan, not {type(model).__name__}")
        self.model = model
        self.config = SimpleNamespace(**diffusers_wan_fields(model.config))

    def to(self, *args: Any, **kwargs: Any) -> DiffusersWan:
        """``nn.Module.to``, except that a cast keeps the tensors diffusers keeps in float32 in float32, as the
        transformer it replaces holds them when the pipeline was loaded with ``torch_dtype=`` (so
        ``use_in_pipeline``, which casts the face to that transformer's dtype, gives the transformer's numbers)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        super().to(device=device, non_blocking=non_blocking)
        if dtype is not None:
            cast_like_diffusers(self.model, dtype)  # type: ignore[arg-type]
        return self

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """The Wan pipelines wrap each call in ``transformer.cache_context(...)`` (diffusers' step caches): none here."""
        yield

    def timesteps(self, timestep: Tensor | float | None, batch: int, device: torch.device) -> Tensor:
        """(B,) timesteps from a number, (B,) or Wan2.2 TI2V's (B, N) per-token timesteps (equal within a sample)."""
        if isinstance(timestep, Tensor) and timestep.ndim == 2:
            if not bool((timestep == timestep[:, :1]).all()):
                raise SparseditError("per-token timesteps that differ within a sample (Wan2.2 TI2V's image "
                                     "conditioning) are not supported; sparsedit's Wan takes one timestep per sample")
            timestep = timestep[:, 0]
        return self.batch_timesteps(timestep, batch, device)

    def forward(self, hidden_states: Tensor, timestep: Tensor | float | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_hidden_states_image: Tensor | None = None,
                return_dict: bool = True, attention_kwargs: dict[str, Any] | None = None) -> Any:
        """(B, C_in, F, H, W) latents, timesteps in [0, 1000], (B, L, 4096) umT5 and (B, 257, 1280) CLIP embeddings
        -> ``.sample`` (B, C_out, F, H, W)."""
        if encoder_hidden_states is None:
            raise SparseditError("a Wan needs encoder_hidden_states (the umT5 embeddings of the prompt)")
        if attention_kwargs:  # a LoRA scale or attention processor options would be dropped silently
            raise SparseditError(f"sparsedit's Wan supports no attention_kwargs, got {sorted(attention_kwargs)}")
        t = self.timesteps(timestep, hidden_states.shape[0], hidden_states.device)
        out = self.model(hidden_states, t, encoder_hidden_states, encoder_hidden_states_image)
        return self.pack(out, return_dict)


def use_wan_experts(pipe: Any, high: nn.Module, low: nn.Module) -> Any:
    """Put two sparsedit Wan models into a Wan2.2-A14B pipeline: ``high`` as its ``transformer`` (the steps with
    ``t >= boundary_ratio * 1000``), ``low`` as its ``transformer_2`` (the rest). Each must agree with the transformer
    it replaces (the checks of :func:`sparsedit.interop.use_in_pipeline`) and takes its device and dtype. Returns
    the pipeline."""
    if getattr(getattr(pipe, "config", None), "boundary_ratio", None) is None:
        raise SparseditError(f"{type(pipe).__name__} has no boundary_ratio: it runs one transformer; use "
                             "sparsedit.interop.use_in_pipeline(pipe, model)")
    for slot, model in (("transformer", high), ("transformer_2", low)):
        old = getattr(pipe, slot, None)
        if old is None:
            raise SparseditError(f"the pipeline has no {slot} to replace; load the Wan2.2-A14B pipeline with both experts")
        face = DiffusersWan(model)
        for key in face.checked_keys:
            theirs, ours = getattr(old.config, key, None), getattr(face.config, key)
            if theirs is not None and theirs != ours:
                raise SparseditError(f"the pipeline's {slot} has {key}={theirs} but the sparsedit model has {ours}; use "
                                     f"a model converted from {slot}/")
        object.__setattr__(pipe, slot, face.to(device=old.device, dtype=old.dtype))  # as use_in_pipeline sets it
    return pipe
