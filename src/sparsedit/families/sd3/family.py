"""The Stable Diffusion 3 / 3.5 family adapter: SD3 and SparseSD3 behind the :class:`~sparsedit.families.base.Family`
interface (presets, sparsify, formats, flow-matching timesteps, one evaluation with explicit sparse tokens)."""

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
from sparsedit.families.sd3.model import SD3, SD3_SIZES, SD3_TEXT_TOKENS, SD3Config, sd3_config
from sparsedit.families.sd3.sparse import SPARSE_SD3_LAYOUTS, SparseSD3, SparseSD3Config

SD3_SHIFT = 3.0  # the released SD3 / SD3.5 schedulers' static shift (FlowMatchEulerDiscreteScheduler(shift=3.0))
SD3_STEPS = 28  # the pipelines' default number of steps


@register
class SD3Family(FlowFamily):
    """Stable Diffusion 3 / 3.5 (https://arxiv.org/abs/2403.03206): MMDiT text-to-image transformers."""

    name = "sd3"
    dense_type = "SD3"
    sparse_type = "SparseSD3"
    presets = tuple(SD3_SIZES)
    preset_help = ", ".join([*SD3_SIZES, *(f"Sparse{name}" for name in SD3_SIZES)])
    diffusers_format = "sd3-diffusers"
    # Flow matching: `sparsedit flops` measures the pipelines' 28-step Euler run (t = sigma * 1000) by default.
    default_sampling = ("euler", SD3_STEPS)
    default_cfg_scale = 7.0  # StableDiffusion3Pipeline's guidance_scale
    pipeline_class = "StableDiffusion3Pipeline"

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"SD3": (SD3Config, SD3), "SparseSD3": (SparseSD3Config, SparseSD3)}

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        """``SD3.5-medium`` -> (its config, None); ``SparseSD3.5-medium`` -> (the same config, its default layout)."""
        if name in SD3_SIZES:
            return sd3_config(name, image_size), None
        dense = name[len("Sparse"):] if name.startswith("Sparse") else None
        if dense in SPARSE_SD3_LAYOUTS:
            return sd3_config(dense, image_size), SPARSE_SD3_LAYOUTS[dense]
        return None

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        return SparseSD3Config.from_sd3(self.config, layout, **rates)

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        self.refuse_sparse_source()
        from sparsedit.families.sd3.sparse import sparsify_sd3

        return sparsify_sd3(model, layout, num_pieces=num_pieces, **options)  # type: ignore[arg-type]

    def init_rules(self, model: nn.Module) -> list[Any]:
        """The tensor-by-tensor initialisation map of a SparseSD3 (what ``sparsedit sparsify --verbose`` should print;
        DiT's ``init_rules`` does not know the poolingformers' ``attn.kv`` / ``attn2.v`` slices)."""
        from sparsedit.families.sd3.sparse import sd3_init_rules

        return sd3_init_rules(model.config, list(model.state_dict()))  # type: ignore[arg-type]

    # ---- checkpoint formats ----------------------------------------------------------------------------

    @classmethod
    def reads_diffusers(cls, cfg: dict[str, Any]) -> bool:
        from sparsedit.families.sd3.convert import is_sd3_diffusers_config

        return is_sd3_diffusers_config(cfg)

    @classmethod
    def from_diffusers(cls, path: Path) -> nn.Module:
        from sparsedit.families.sd3.convert import sd3_from_diffusers

        return sd3_from_diffusers(path)

    def save_diffusers(self, model: nn.Module, out: str | Path, overwrite: bool, drop_null_caption: bool) -> Path:
        from sparsedit.families.sd3.convert import save_sd3_diffusers

        refuse_drop_null_caption(model, drop_null_caption)
        return save_sd3_diffusers(model, out, overwrite)  # type: ignore[arg-type]

    def export_differences(self) -> list[str]:
        return []  # the same tensors under diffusers' names

    # ---- conditioning and sampling -----------------------------------------------------------------------

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 *, steps: int = 28, cfg_scale: float = 7.0, seed: int = 0, device: str | torch.device = "cpu",
                 noise: Tensor | None = None, progress: bool = False, **unused: Any) -> Tensor:
        """Latents of an SD3 run as StableDiffusion3Pipeline samples them: Euler over the shift-3 sigmas, guidance
        against ``null_embeds`` / ``null_pooled`` (zeros when absent). ``text``: ``embeds`` (B, L, 4096), ``pooled``
        (B, 2048); ``noise`` (B, C, H, W) or a draw from ``seed``."""
        from sparsedit.diffusion.flow import euler_sample, guided, start_noise

        embeds, pooled = (text or {}).get("embeds"), (text or {}).get("pooled")
        if embeds is None or pooled is None:
            raise SparseditError("an SD3 samples from caption embeddings: pass text={'embeds': (B, L, 4096), "
                                 "'pooled': (B, 2048)} (the pipeline's prompt_embeds and pooled_prompt_embeds)")
        null = (text or {}).get("null_embeds")
        null_pooled = (text or {}).get("null_pooled")
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": torch.zeros_like(embeds) if null is None else null,
                  "pooled_projections": torch.zeros_like(pooled) if null_pooled is None else null_pooled}
        if noise is None:
            noise = start_noise((embeds.shape[0], self.config.in_channels, *self.config.latent_hw), seed, device)
        return euler_sample(guided(model, cfg_scale, cond, uncond), noise, self.run_sigmas(steps),
                            self.progress_bar(progress))

    @classmethod
    def config_from_diffusers(cls, cfg: dict[str, Any], name: str) -> Any:
        from sparsedit.families.sd3.convert import sd3_config_from_diffusers

        return sd3_config_from_diffusers(cfg, name)

    def pipeline_encode(self, pipe: Any, prompts: list[str], negative: str | None, guided: bool,
                        device: torch.device) -> dict[str, Tensor]:
        # Two CLIPs and the T5 (SD3_TEXT_TOKENS - 77 tokens), the negative prompt (default "") under guidance.
        embeds, null, pooled, null_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=guided,
            negative_prompt=negative or "", max_sequence_length=SD3_TEXT_TOKENS - 77)
        text = {"embeds": embeds, "pooled": pooled}
        if guided:
            text.update(null_embeds=null, null_pooled=null_pooled)
        return text

    def diffusers_face(self, model: nn.Module) -> nn.Module:
        from sparsedit.families.sd3.face import DiffusersSD3

        return DiffusersSD3(model)

    # ---- one model evaluation, as bench and flops run it -----------------------------------------------

    def check_guidance(self, name: str) -> None:
        pass  # a caption model always has an unconditional input (the empty prompt)

    def conditioning(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
        return self._text(batch, guided, gen, SD3_TEXT_TOKENS)

    def _text(self, batch: int, guided: bool, gen: torch.Generator, length: int) -> dict[str, Tensor]:
        """Random caption (``length`` tokens) and pooled embeddings; under guidance the second half is zeros, standing
        in for the empty prompt's embeddings (a forward's cost and speed do not depend on the values)."""
        cfg = self.config
        text = torch.randn(batch, length, cfg.caption_channels, generator=gen)
        pooled = torch.randn(batch, cfg.pooled_channels, generator=gen)
        if guided:
            text, pooled = torch.cat([text, torch.zeros_like(text)]), torch.cat([pooled, torch.zeros_like(pooled)])
        return {"encoder_hidden_states": text, "pooled_projections": pooled}

    def call(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        if tokens is None:
            return fn(x, t, cond["encoder_hidden_states"], cond["pooled_projections"])
        if not self.sparse:
            raise SparseditError(f"a dense SD3 runs on its full token grid, not {tokens}; sparse token sets come with "
                                 "SparseSD3")
        return fn(x, t, cond["encoder_hidden_states"], cond["pooled_projections"], grid=tokens)

    def run_sigmas(self, steps: int) -> Tensor:
        """The pipelines' run: Euler over the static shift-3 sigmas."""
        from sparsedit.diffusion.flow import euler_sigmas

        return euler_sigmas(steps, shift=SD3_SHIFT)

    def reset_buffers(self, model: nn.Module) -> None:
        """The position table of a fresh model (a loaded one stores its own); the unused caption-query weights of the
        last block are never read."""
        model.pos_table.copy_(model.initial_position_table())  # type: ignore[operator]

    # ---- cost counting ------------------------------------------------------------------------------------

    cost_token_inputs = ("encoder_hidden_states",)  # the caption stream: its projections, MLPs and attention count

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        return self._text(1, False, torch.Generator(), SD3_TEXT_TOKENS if text_len is None else text_len)

    # ---- users' LoRAs (sparsedit.lora) ------------------------------------------------------------------------------

    def diffusers_key_map(self) -> dict[str, list[tuple[str, int, int | None]]]:
        """Every tensor of the dense SD3 -> the rows ``[start, stop)`` of the diffusers ``SD3Transformer2DModel``
        tensors it is made of, concatenated along dim 0 (``stop`` None: to the end). The converter's own map: fused
        q / k / v of width D each, the two (scale, shift) regressors' halves swapped. :func:`sparsedit.lora.load_lora`
        places a LoRA's deltas through it."""
        from sparsedit.families.sd3.convert import _key_map, _swapped

        config = self.dense_config()
        d, swapped = config.hidden_size, set(_swapped(config))
        out: dict[str, list[tuple[str, int, int | None]]] = {}
        for ours, theirs in _key_map(config).items():
            if ours in swapped:
                out[ours] = [(theirs[0], d, 2 * d), (theirs[0], 0, d)]
            else:
                out[ours] = [(theirs[0], 0, None)] if len(theirs) == 1 else [(t, 0, d) for t in theirs]
        return out
