"""The Stable Diffusion 3 / 3.5 family adapter: the dense SD3 behind the :class:`~sparsedit.families.base.Family`
interface (its sparse model, SparseSD3, is not there yet)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families import register
from sparsedit.families.base import Family, Tokens, refuse_drop_null_caption
from sparsedit.families.sd3.model import SD3, SD3_SIZES, SD3_TEXT_TOKENS, SD3Config, sd3_config


def _not_yet(what: str) -> SparseditError:
    return SparseditError(f"{what} is not yet available for SD3 (SparseSD3 comes later); use the dense SD3")


@register
class SD3Family(Family):
    """Stable Diffusion 3 / 3.5 (https://arxiv.org/abs/2403.03206): MMDiT text-to-image transformers."""

    name = "sd3"
    dense_type = "SD3"
    sparse_type = "SparseSD3"
    presets = tuple(SD3_SIZES)
    preset_help = ", ".join(SD3_SIZES)
    diffusers_format = "sd3-diffusers"

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"SD3": (SD3Config, SD3)}  # SparseSD3 joins when it exists

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        return (sd3_config(name, image_size), None) if name in SD3_SIZES else None

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        raise _not_yet("a sparse layout (--layout)")

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        raise _not_yet("sparsify")

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

    @property
    def text_conditioned(self) -> bool:
        return True

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 **common: Any) -> Tensor:
        raise SparseditError("sparsedit cannot sample an SD3 yet (it needs CLIP + T5 prompts and a flow-matching "
                             "sampler); use sparsedit.interop.use_in_pipeline(StableDiffusion3Pipeline..., model)")

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
        if tokens is not None:
            raise SparseditError(f"a dense SD3 runs on its full token grid, not {tokens}; sparse token sets come with "
                                 "SparseSD3")
        return fn(x, t, cond["encoder_hidden_states"], cond["pooled_projections"])

    def reset_buffers(self, model: nn.Module) -> None:
        """The position table of a fresh model (a loaded one stores its own); the unused caption-query weights of the
        last block are never read."""
        model.pos_table.copy_(model.initial_position_table())  # type: ignore[operator]

    # ---- cost counting ------------------------------------------------------------------------------------

    cost_token_inputs = ("encoder_hidden_states",)  # the caption stream: its projections, MLPs and attention count

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        return self._text(1, False, torch.Generator(), SD3_TEXT_TOKENS if text_len is None else text_len)
