"""The Latte family adapter: Latte / SparseLatte video DiTs behind the :class:`~sparsedit.families.base.Family` interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families import register
from sparsedit.families.base import Family, Tokens, caption_conditioning, label_conditioning, refuse_drop_null_caption
from sparsedit.families.latte.model import LATTE_PRESETS, Latte, LatteConfig, latte_config, temporal_pos_embed
from sparsedit.families.latte.sparse import SparseLatte, SparseLatteConfig
from sparsedit.families.pixart.model import CAPTION_TOKENS


@register
class LatteFamily(Family):
    """Latte (https://github.com/Vchitect/Latte) and SparseLatte on (B, C, F, H, W) video latents; class labels,
    nothing (unconditional) or caption embeddings by the config's ``conditioning``."""

    name = "latte"
    dense_type = "Latte"
    sparse_type = "SparseLatte"
    presets = LATTE_PRESETS
    preset_help = "a Latte preset (Latte-XL/2, ...) or SparseLatte-XL/2"
    diffusers_format = "latte-diffusers"
    default_rates = (0.80, 0.93)
    sample_suffixes = (".png", ".gif", ".mp4")
    video_fps = 8

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"Latte": (LatteConfig, Latte), "SparseLatte": (SparseLatteConfig, SparseLatte)}

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        if name.startswith("SparseLatte-") and name[len("Sparse"):] in LATTE_PRESETS:
            return latte_config(name[len("Sparse"):], image_size), "SparseLatte-XL"
        if name in LATTE_PRESETS:
            return latte_config(name, image_size), None
        return None

    def check_rates(self, rates: dict[str, Any]) -> None:
        if rates.get("num_pieces") is not None:
            raise SparseditError("--num-pieces does not apply to Latte: its schedule is continuous (no training "
                                 "pieces); drop it")

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        return SparseLatteConfig.from_latte(self.config, layout, **rates)

    def block_kinds(self) -> list[str]:
        from sparsedit.families.latte.sparse import latte_block_kinds

        return latte_block_kinds(self.config.layout) if self.sparse else ["top"] * self.config.depth

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        self.refuse_sparse_source()
        from sparsedit.families.latte.sparse import sparsify_latte

        if num_pieces is not None:
            raise SparseditError("--num-pieces is not supported for Latte (its schedule is continuous); drop it")
        if options.pop("extra_recovery", None) is not None:
            raise SparseditError("--extra-recovery does not apply to Latte: a video SDTM's two recovery blocks restore "
                                 "time, then space; drop it")
        return sparsify_latte(model, layout, **options)  # type: ignore[arg-type]

    def token_sets(self) -> list[Tokens]:
        sets = {self.config.tokens_at(t) for t in range(self.config.num_timesteps)}
        return sorted(sets, key=lambda s: s[0][0] * s[0][1] * s[1])

    @classmethod
    def reads_diffusers(cls, cfg: dict[str, Any]) -> bool:
        from sparsedit.families.latte.convert import is_latte_diffusers_config

        return is_latte_diffusers_config(cfg)

    @classmethod
    def from_diffusers(cls, path: Path) -> nn.Module:
        from sparsedit.families.latte.convert import latte_from_diffusers

        return latte_from_diffusers(path)

    def save_diffusers(self, model: nn.Module, out: str | Path, overwrite: bool, drop_null_caption: bool) -> Path:
        from sparsedit.families.latte.convert import save_latte_diffusers

        refuse_drop_null_caption(model, drop_null_caption)
        return save_latte_diffusers(model, out, overwrite)  # type: ignore[arg-type]

    @property
    def text_conditioned(self) -> bool:
        return self.config.text

    @property
    def frames(self) -> int | None:
        return self.config.num_frames

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 **common: Any) -> Tensor:
        from sparsedit.families.latte.video import generate_latte

        if text is not None:
            return generate_latte(model, text.get("embeds"), text_mask=text.get("mask"),  # type: ignore[arg-type]
                                  null_embeds=text.get("null_embeds"), **common)
        return generate_latte(model, torch.tensor(labels, device=common.get("device")), **common)  # type: ignore[arg-type]

    def timestep_sampler(self, generator: torch.Generator) -> Any:
        from sparsedit.families.latte.sparse import VideoPieceSampler

        return VideoPieceSampler(self.config, generator) if self.sparse else None

    def diffusers_face(self, model: nn.Module) -> nn.Module:
        from sparsedit.families.latte.face import DiffusersLatte

        return DiffusersLatte(model)

    def check_guidance(self, name: str) -> None:
        if self.config.text:
            return  # a caption model always has an unconditional input
        if self.config.num_classes == 0:
            raise SparseditError(f"{name} is unconditional (num_classes=0): nothing to guide, so --cfg-scale must be 1")
        super().check_guidance(name)

    def sample_shape(self, rows: int) -> tuple[int, ...]:
        c = self.config
        return (rows, c.in_channels, c.num_frames, *c.latent_hw)

    def conditioning(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
        if self.config.text:
            return caption_conditioning(model, self.config, batch, guided, gen, CAPTION_TOKENS)
        if self.config.num_classes == 0:
            return {}
        return label_conditioning(self.config.num_classes, batch, guided, gen)

    def call(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        kwargs: dict[str, Any] = {}
        if tokens is not None:
            kwargs.update(grid=tokens[0], frames=tokens[1])
        if self.config.text:
            return fn(x, t, None, cond["encoder_attention_mask"], encoder_hidden_states=cond["encoder_hidden_states"],
                      **kwargs)
        return fn(x, t, cond.get("y"), **kwargs)

    def tokens_at(self, t: int) -> Tokens:
        return self.config.tokens_at(int(t)) if self.sparse else None

    def describe(self, tokens: Tokens) -> dict[str, Any]:
        grid, frames = (self.config.grid, self.config.num_frames) if tokens is None else tokens
        return {"forward_grid": list(grid), "forward_frames": frames}

    def reset_buffers(self, model: nn.Module) -> None:
        super().reset_buffers(model)
        model.temp_embed.copy_(temporal_pos_embed(self.config.hidden_size, self.config.num_frames)[None])

    # ---- cost counting ------------------------------------------------------------------------------------

    cost_token_inputs = ("encoder_hidden_states",)  # the caption of the text variant
    cost_schedule_fields = (*Family.cost_schedule_fields, "temporal_share")  # splits a rate into space and time

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        if not self.config.text:
            return super().cost_conditioning(model, text_len)
        length = CAPTION_TOKENS if text_len is None else text_len
        return caption_conditioning(model, self.config, 1, False, torch.Generator(), length)

    def cost_size_fields(self, frames: int | None) -> dict[str, Any]:
        return {} if frames is None else {"num_frames": frames}

    def split_tokens(self, tokens: Tokens) -> tuple[Any, int | None]:
        return (None, None) if tokens is None else (tokens[0], tokens[1])
