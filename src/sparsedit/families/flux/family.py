"""The FLUX.1 family adapter: the dense FLUX behind the :class:`~sparsedit.families.base.Family` interface.

The sparse model (``SparseFLUX``) is not written yet: its model type is reserved, and sparsifying says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families import register
from sparsedit.families.base import Family, Tokens, refuse_drop_null_caption
from sparsedit.families.flux.model import DEFAULT_GUIDANCE, FLUX_TEXT_TOKENS, Flux, FluxConfig, flux_config


def flux_conditioning(config: FluxConfig, batch: int, gen: torch.Generator, length: int) -> dict[str, Tensor]:
    """Random T5 embeddings (``length`` tokens), pooled CLIP embeddings and, for a guidance-distilled model, the
    default guidance scale: the inputs of one unguided evaluation with ``batch`` rows."""
    cond = {"encoder_hidden_states": torch.randn(batch, length, config.caption_channels, generator=gen),
            "pooled_projections": torch.randn(batch, config.pooled_channels, generator=gen)}
    if config.guidance_embeds:
        cond["guidance"] = torch.full((batch,), DEFAULT_GUIDANCE)
    return cond


@register
class FluxFamily(Family):
    """FLUX.1-dev / FLUX.1-schnell (https://github.com/black-forest-labs/flux): caption-conditioned images."""

    name = "flux"
    dense_type = "FLUX"
    sparse_type = "SparseFLUX"
    presets = tuple(FLUX_TEXT_TOKENS)
    preset_help = "FLUX.1-dev, FLUX.1-schnell"
    diffusers_format = "flux-diffusers"
    samplers = ("euler",)  # flow matching: t = sigma * 1000

    @property
    def default_sampling(self) -> tuple[str, int]:  # type: ignore[override]  # per model, not per class
        """The run `sparsedit flops` measures: FluxPipeline's default 28 steps for a guidance-distilled model (dev),
        4 for schnell (distilled for 4 steps: FluxPipeline's example and the original CLI's default)."""
        return "euler", 28 if self.config.guidance_embeds else 4

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"FLUX": (FluxConfig, Flux)}  # SparseFLUX: not yet

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        return (flux_config(name, image_size), None) if name in FLUX_TEXT_TOKENS else None

    # ---- sparsify: not yet ---------------------------------------------------------------------

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        raise SparseditError("a sparse FLUX (SparseFLUX) is not yet implemented; use the dense FLUX")

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        raise SparseditError("sparsifying FLUX is not yet implemented; use the dense FLUX")

    # ---- checkpoint formats ------------------------------------------------------------------------

    @classmethod
    def reads_diffusers(cls, cfg: dict[str, Any]) -> bool:
        from sparsedit.families.flux.convert import is_flux_diffusers_config

        return is_flux_diffusers_config(cfg)

    @classmethod
    def from_diffusers(cls, path: Path) -> nn.Module:
        from sparsedit.families.flux.convert import flux_from_diffusers

        return flux_from_diffusers(path)

    @classmethod
    def reads_file(cls, obj: Any) -> bool:
        from sparsedit.families.flux.convert import is_flux_original_state

        return is_flux_original_state(obj)  # flux1-dev.safetensors: img_in, double_blocks.i.img_attn.qkv, ...

    @classmethod
    def from_file(cls, obj: Any, path: Path, preset: str | None, image_size: int | None, use_ema: bool,
                  semantic_size: int | tuple[int, int] | None = None) -> nn.Module:
        from sparsedit.families.dit.family import refuse_semantic_size
        from sparsedit.families.flux.convert import flux_from_original_state

        refuse_semantic_size(semantic_size, path)
        return flux_from_original_state(obj, image_size, name=str(path))

    def save_diffusers(self, model: nn.Module, out: str | Path, overwrite: bool, drop_null_caption: bool) -> Path:
        from sparsedit.families.flux.convert import save_flux_diffusers

        refuse_drop_null_caption(model, drop_null_caption)
        return save_flux_diffusers(model, out, overwrite)  # type: ignore[arg-type]

    # ---- conditioning and sampling ----------------------------------------------------------------

    @property
    def text_conditioned(self) -> bool:
        return True

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 **common: Any) -> Tensor:
        raise SparseditError("sparsedit does not sample FLUX itself yet; run it in diffusers' FluxPipeline with "
                             "sparsedit.interop.use_in_pipeline(pipe, model)")

    def diffusers_face(self, model: nn.Module) -> nn.Module:
        from sparsedit.families.flux.face import DiffusersFlux

        return DiffusersFlux(model)

    # ---- one model evaluation, as bench and flops run it --------------------------------------------

    def check_guidance(self, name: str) -> None:
        if self.config.guidance_embeds:
            raise SparseditError(f"{name} is guidance-distilled (FLUX.1-dev): it takes no classifier-free guidance, so "
                                 f"--cfg-scale must be 1; its guidance embedding (default {DEFAULT_GUIDANCE}) sets the strength")
        raise SparseditError(f"{name} (FLUX.1-schnell style) is distilled without guidance: --cfg-scale must be 1")

    def conditioning(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
        if guided:
            self.check_guidance("FLUX")
        return flux_conditioning(self.config, batch, gen, self.config.max_sequence_length)

    def call(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        if tokens is not None:
            raise SparseditError(f"a dense FLUX runs on its whole token grid; got sparse tokens {tokens}")
        return fn(x, t, cond["encoder_hidden_states"], cond["pooled_projections"], cond.get("guidance"))

    def sampling_timesteps(self, sampler: str, steps: int) -> list[float]:
        """The model timesteps ``sigma * 1000`` of a ``steps``-step Euler run, in increasing order (the final sigma 0
        is no model call). FluxPipeline passes ``linspace(1, 1 / steps, steps)``; FLUX.1-dev's scheduler shifts them
        by the resolution's ``mu`` (0.5 at 256 image tokens to 1.15 at 4096), schnell's does not (``mu`` = 0 is the
        identity), as the original CLI's ``get_schedule(..., shift=name != "flux-schnell")``."""
        from sparsedit.diffusion.flow import T_SCALE, euler_sigmas, resolution_mu

        if sampler not in self.samplers:
            raise SparseditError(f"a FLUX is a flow-matching model: it samples with euler (sigmas x 1000), not "
                                 f"{sampler}; use --sampler euler")
        h, w = self.config.grid
        mu = resolution_mu(h * w) if self.config.guidance_embeds else 0.0
        return sorted(float(s) * T_SCALE for s in euler_sigmas(steps, mu=mu)[:-1])

    def reset_buffers(self, model: nn.Module) -> None:
        pass  # no buffers: the RoPE table is computed from the grid on every forward

    # ---- cost counting ------------------------------------------------------------------------------------

    cost_token_inputs = ("encoder_hidden_states",)  # the T5 caption: its projection and both streams are token work

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        length = self.config.max_sequence_length if text_len is None else text_len
        return flux_conditioning(self.config, 1, torch.Generator(), length)
