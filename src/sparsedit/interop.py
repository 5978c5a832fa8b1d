"""Drop sparsedit models into diffusers pipelines with one call.

Each wrapper gives a sparsedit model the face of the diffusers transformer a pipeline expects: the
call signature, the ``config`` attributes the pipeline reads, ``dtype`` / ``device``, and the output
container (``.sample`` or a 1-tuple, holding every output channel: pipelines split off the learned
variance themselves).

* ``DiTPipeline``: :class:`DiffusersDiT` (diffusers' ``DiTTransformer2DModel``) for a DiT or SparseDiT;
* ``PixArtAlphaPipeline``: :class:`DiffusersPixArt` (``PixArtTransformer2DModel``) for a PixArt or
  SparsePixArt;
* ``LattePipeline``: :class:`DiffusersLatte` (``LatteTransformer3DModel``) for a text-conditional Latte
  or SparseLatte.

A sparse model picks its sparse grid from the timestep the scheduler passes: DDPM/DDIM/DPM-Solver
schedulers pass integer training timesteps, flow-matching schedulers ``sigma * 1000``, and
fractional or noise-end timesteps map to the schedule by :func:`sparsedit.schedule.discrete_timestep`::

    pipe = PixArtAlphaPipeline.from_pretrained("path/to/PixArt-XL-2-512x512")    # local directory
    sparsedit.interop.use_in_pipeline(pipe, sparsedit.load_model("path/to/sparse-pixart"))
    image = pipe("a small cactus with a happy face", num_inference_steps=20).images[0]
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedit.dit import DiT
from sparsedit.errors import SparseditError
from sparsedit.latte import Latte
from sparsedit.pixart import PixArt


class DiffusersFace(nn.Module):
    """What every wrapper shares: the wrapped model, a diffusers-style ``config``, ``dtype`` / ``device``,
    timestep batching and the output container.

    Subclasses name the sparsedit ``family`` they wrap, the ``pipelines`` whose transformer they replace,
    the ``checked_keys`` that must agree with the replaced transformer's config, and the config
    attributes beyond ``sample_size`` / ``in_channels`` / ``out_channels`` / ``patch_size`` (``extra_config``).
    """

    family: ClassVar[type[nn.Module]]
    pipelines: ClassVar[tuple[str, ...]]
    checked_keys: ClassVar[tuple[str, ...]] = ("sample_size", "in_channels", "out_channels")

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, self.family):
            raise SparseditError(
                f"{type(self).__name__} wraps a {self.family.__name__} (dense or sparse), not {type(model).__name__}"
            )
        cfg = model.config
        h, w = cfg.latent_hw
        if h != w:
            raise SparseditError(f"diffusers' {self.pipelines[0]} samples square latents; this model is {h}x{w}")
        self.model = model
        self.config = SimpleNamespace(sample_size=h, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                      patch_size=cfg.patch_size, **self.extra_config(model))

    def extra_config(self, model: Any) -> dict[str, Any]:
        return {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def batch_timesteps(timestep: Tensor | float | None, batch: int, device: torch.device) -> Tensor:
        """A Python number, a 0-d / (1,) tensor or a (B,) tensor -> (B,) timesteps on ``device``.

        The dtype is kept: a sparse model maps fractional (flow-matching) timesteps to its schedule itself.
        """
        if timestep is None:
            raise SparseditError("sparsedit models need the timestep; pass timestep= as diffusers pipelines do")
        t = torch.as_tensor(timestep, device=device).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise SparseditError(f"got {t.numel()} timesteps for a batch of {batch}; pass one or one per sample")
        return t

    @staticmethod
    def pack(out: Tensor, return_dict: bool) -> Any:
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


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
                "LattePipeline is text-to-video but this Latte is class-conditional; use sparsedit.latte.generate_latte"
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


FACES: tuple[type[DiffusersFace], ...] = (DiffusersDiT, DiffusersPixArt, DiffusersLatte)


def to_diffusers(model: nn.Module) -> DiffusersFace:
    """Wrap ``model`` for the diffusers pipeline of its family (weights are shared, nothing is copied)."""
    for face in FACES:
        if isinstance(model, face.family):
            return face(model)
    raise SparseditError(f"no diffusers pipeline takes a {type(model).__name__}; pass a DiT, PixArt or Latte model")


def use_in_pipeline(pipe: Any, model: nn.Module) -> Any:
    """Replace ``pipe.transformer`` with ``model`` (one call); returns the pipeline.

    The model must belong to the pipeline's family and agree with the replaced transformer's config
    (sample size, channels, caption width); it is moved to that transformer's device and dtype.
    """
    if not hasattr(pipe, "transformer"):
        raise SparseditError(f"{type(pipe).__name__} has no transformer to replace")
    wrapped = to_diffusers(model)
    pipeline_names = {cls.__name__ for cls in type(pipe).__mro__}
    if not pipeline_names & set(wrapped.pipelines):
        raise SparseditError(
            f"a {type(model).__name__} cannot replace the transformer of a {type(pipe).__name__}; it goes into "
            f"{' or '.join(wrapped.pipelines)} (load the model converted from this pipeline's transformer)"
        )
    old = pipe.transformer
    for key in wrapped.checked_keys:
        theirs, ours = getattr(old.config, key, None), getattr(wrapped.config, key)
        if theirs is not None and theirs != ours:
            raise SparseditError(f"the pipeline's transformer has {key}={theirs} but the sparsedit model has {ours}; "
                                 "use a model converted from this pipeline's transformer")
    # Set the attribute directly: the pipeline's config entry keeps naming the original class, so
    # save_pretrained of the pipeline is not supported with a swapped-in model (save ours separately).
    object.__setattr__(pipe, "transformer", wrapped.to(device=old.device, dtype=old.dtype))
    return pipe
