"""The FLUX.1 family adapter: FLUX and SparseFLUX behind the :class:`~sparsedit.families.base.Family` interface
(presets, sparsify, formats, flow-matching timesteps, one evaluation with explicit sparse tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families import register
from sparsedit.families.base import Tokens, refuse_drop_null_caption
from sparsedit.families.flow import FlowFamily
from sparsedit.families.flux.model import DEFAULT_GUIDANCE, FLUX_TEXT_TOKENS, Flux, FluxConfig, flux_config
from sparsedit.families.flux.sparse import SPARSE_FLUX_LAYOUTS, SparseFlux, SparseFluxConfig


def flux_conditioning(config: FluxConfig, batch: int, gen: torch.Generator, length: int) -> dict[str, Tensor]:
    """Random T5 embeddings (``length`` tokens), pooled CLIP embeddings and, for a guidance-distilled model, the
    default guidance scale: the inputs of one unguided evaluation with ``batch`` rows."""
    cond = {"encoder_hidden_states": torch.randn(batch, length, config.caption_channels, generator=gen),
            "pooled_projections": torch.randn(batch, config.pooled_channels, generator=gen)}
    if config.guidance_embeds:
        cond["guidance"] = torch.full((batch,), DEFAULT_GUIDANCE)
    return cond


@register
class FluxFamily(FlowFamily):
    """FLUX.1-dev / FLUX.1-schnell (https://github.com/black-forest-labs/flux) and SparseFLUX: caption-conditioned
    images."""

    name = "flux"
    dense_type = "FLUX"
    sparse_type = "SparseFLUX"
    presets = tuple(FLUX_TEXT_TOKENS)
    preset_help = ", ".join([*FLUX_TEXT_TOKENS, *(f"Sparse{name}" for name in SPARSE_FLUX_LAYOUTS)])
    diffusers_format = "flux-diffusers"
    pipeline_class = "FluxPipeline"

    @property
    def default_sampling(self) -> tuple[str, int]:  # type: ignore[override]  # per model, not per class
        """The run `sparsedit flops` measures: FluxPipeline's default 28 steps for a guidance-distilled model (dev),
        4 for schnell (distilled for 4 steps: FluxPipeline's example and the original CLI's default)."""
        return "euler", 28 if self.config.guidance_embeds else 4

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"FLUX": (FluxConfig, Flux), "SparseFLUX": (SparseFluxConfig, SparseFlux)}

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        """``FLUX.1-dev`` -> (its config, None); ``SparseFLUX.1-dev`` -> (the same config, its default layout)."""
        if name in FLUX_TEXT_TOKENS:
            return flux_config(name, image_size), None
        dense = name[len("Sparse"):] if name.startswith("Sparse") else None
        if dense in SPARSE_FLUX_LAYOUTS:
            return flux_config(dense, image_size), SPARSE_FLUX_LAYOUTS[dense]
        return None

    # ---- sparsify ---------------------------------------------------------------------------------

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        return SparseFluxConfig.from_flux(self.config, layout, **rates)

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        """The SparseFLUX of a dense FLUX. ``recovery_pos_embed`` is dropped: `sparsedit sparsify` always passes the
        paper's default (True), and FLUX has no position table for it to re-add (its config fixes it to False)."""
        self.refuse_sparse_source()
        from sparsedit.families.flux.sparse import sparsify_flux

        options.pop("recovery_pos_embed", None)
        return sparsify_flux(model, layout, num_pieces=num_pieces, **options)  # type: ignore[arg-type]

    def init_rules(self, model: nn.Module) -> list[Any]:
        """The tensor-by-tensor initialisation map of a SparseFLUX (what ``sparsedit sparsify --verbose`` should print;
        DiT's ``init_rules`` does not know the double-stream poolingformers' ``img_attn.kv`` slices)."""
        from sparsedit.families.flux.sparse import flux_init_rules

        return flux_init_rules(model.config, list(model.state_dict()))  # type: ignore[arg-type]

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
        from sparsedit.families.flux.convert import save_flux_diffusers  # refuses a SparseFLUX: no diffusers class

        refuse_drop_null_caption(model, drop_null_caption)
        return save_flux_diffusers(model, out, overwrite)  # type: ignore[arg-type]

    # ---- conditioning and sampling ----------------------------------------------------------------

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 *, steps: int | None = None, cfg_scale: float = 1.0, seed: int = 0,
                 device: str | torch.device = "cpu", noise: Tensor | None = None, progress: bool = False,
                 **unused: Any) -> Tensor:
        """Latents (B, C, H, W) of a FLUX run as FluxPipeline samples them: Euler over linspace(1, 1/steps) shifted by
        the resolution's mu, FLUX.1-dev's guidance embedding (``text['guidance']``, default 3.5), no classifier-free
        guidance. ``text``: ``embeds`` (B, L, 4096), ``pooled`` (B, 768); ``noise`` or a draw from ``seed``."""
        from sparsedit.diffusion.flow import euler_sample, start_noise

        if cfg_scale != 1.0:
            self.check_guidance("this FLUX")
        embeds, pooled = (text or {}).get("embeds"), (text or {}).get("pooled")
        if embeds is None or pooled is None:
            raise SparseditError("a FLUX samples from caption embeddings: pass text={'embeds': (B, L, 4096), "
                                 "'pooled': (B, 768)} (the pipeline's prompt_embeds and pooled_prompt_embeds)")
        b = embeds.shape[0]
        guidance = None
        if self.config.guidance_embeds:
            value = (text or {}).get("guidance")
            guidance = torch.full((b,), DEFAULT_GUIDANCE) if value is None else torch.as_tensor(value).expand(b)
            guidance = guidance.to(device=embeds.device, dtype=torch.float32)
        if noise is None:
            noise = start_noise((b, self.config.in_channels, *self.config.latent_hw), seed, device)
        grid = (noise.shape[-2] // self.config.patch_size, noise.shape[-1] // self.config.patch_size)
        sigmas = self.run_sigmas(steps or self.default_sampling[1], grid)
        return euler_sample(lambda x, t: model(x, t, embeds, pooled, guidance), noise, sigmas, self.progress_bar(progress))

    def training_kwargs(self, cond: dict[str, Any], caption: Tensor, device: torch.device) -> dict[str, Any]:
        kwargs = super().training_kwargs(cond, caption, device)
        if self.config.guidance_embeds:  # FLUX.1-dev: the distilled guidance scale, FluxPipeline's default unless given
            guidance = cond.get("guidance")
            kwargs["guidance"] = (torch.full((caption.shape[0],), DEFAULT_GUIDANCE) if guidance is None
                                  else torch.as_tensor(guidance)).to(device=device, dtype=caption.dtype)
        return kwargs

    @classmethod
    def config_from_diffusers(cls, cfg: dict[str, Any], name: str) -> Any:
        from sparsedit.families.flux.convert import flux_config_from_diffusers

        return flux_config_from_diffusers(cfg, name)

    def pipeline_encode(self, pipe: Any, prompts: list[str], negative: str | None, guided: bool,
                        device: torch.device) -> dict[str, Tensor]:
        if guided:
            self.check_guidance("this FLUX")
        if negative is not None:
            raise SparseditError("FLUX.1 takes no negative prompt (no classifier-free guidance); drop --negative-prompt")
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=self.config.max_sequence_length)
        return {"embeds": embeds, "pooled": pooled}

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
        args = (x, t, cond["encoder_hidden_states"], cond["pooled_projections"], cond.get("guidance"))
        if tokens is None:
            return fn(*args)
        if not self.sparse:
            raise SparseditError(f"a dense FLUX runs on its whole token grid; got sparse tokens {tokens}")
        return fn(*args, grid=tokens)

    def run_sigmas(self, steps: int, grid: tuple[int, int] | None = None) -> Tensor:
        """FluxPipeline's run on ``grid`` (default: the config's): ``linspace(1, 1 / steps, steps)`` shifted for dev by
        the resolution's ``mu`` (0.5 at 256 image tokens to 1.15 at 4096); schnell's scheduler does not shift
        (``mu`` = 0 is the identity), as the original CLI's ``get_schedule(..., shift=name != "flux-schnell")``."""
        from sparsedit.diffusion.flow import euler_sigmas, resolution_mu

        h, w = self.config.grid if grid is None else grid
        return euler_sigmas(steps, mu=resolution_mu(h * w) if self.config.guidance_embeds else 0.0)

    def reset_buffers(self, model: nn.Module) -> None:
        pass  # no buffers: the RoPE table is computed from the grid on every forward

    # ---- cost counting ------------------------------------------------------------------------------------

    cost_token_inputs = ("encoder_hidden_states",)  # the T5 caption: its projection and both streams are token work

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        length = self.config.max_sequence_length if text_len is None else text_len
        return flux_conditioning(self.config, 1, torch.Generator(), length)

    # ---- users' LoRAs (sparsedit.lora) ------------------------------------------------------------------------------

    def diffusers_key_map(self) -> dict[str, list[tuple[str, int, int | None]]]:
        """Every tensor of the dense FLUX -> the rows ``[start, stop)`` of the diffusers ``FluxTransformer2DModel``
        tensors it is made of, concatenated along dim 0 (``stop`` None: to the end). The converter's own map (fused
        q / k / v and the single blocks' q / k / v / MLP-in with their row counts), the final adaLN's halves swapped.
        :func:`sparsedit.lora.load_lora` places a LoRA's deltas through it."""
        from sparsedit.families.flux.convert import _FINAL_MOD, _WB, _key_map

        config = self.dense_config()
        d = config.hidden_size
        out = {ours: [(t, 0, None if n < 0 else n) for t, n in theirs] for ours, theirs in _key_map(config).items()}
        for s in _WB:  # ours (shift, scale) <- diffusers' (scale, shift)
            out[_FINAL_MOD[0] + s] = [(_FINAL_MOD[1] + s, d, 2 * d), (_FINAL_MOD[1] + s, 0, d)]
        return out
