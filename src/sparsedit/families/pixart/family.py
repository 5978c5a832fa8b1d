"""The PixArt-alpha family adapter: PixArt / SparsePixArt behind the :class:`~sparsedit.families.base.Family` interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.families import register
from sparsedit.families.base import Family, Tokens, caption_conditioning
from sparsedit.families.dit.family import refuse_semantic_size
from sparsedit.families.pixart.model import CAPTION_TOKENS, PixArt, PixArtConfig, pixart_config
from sparsedit.families.pixart.sparse import SparsePixArt, SparsePixArtConfig


@register
class PixArtFamily(Family):
    """PixArt-alpha (https://github.com/PixArt-alpha/PixArt-alpha) and SparsePixArt: caption-conditioned images."""

    name = "pixart"
    dense_type = "PixArt"
    sparse_type = "SparsePixArt"
    presets = ("PixArt-XL/2",)
    preset_help = "PixArt-XL/2, SparsePixArt-XL/2"
    diffusers_format = "pixart-diffusers"

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"PixArt": (PixArtConfig, PixArt), "SparsePixArt": (SparsePixArtConfig, SparsePixArt)}

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        if name in ("PixArt-XL/2", "SparsePixArt-XL/2"):
            return pixart_config(image_size), ("SparseDiT-XL" if name.startswith("Sparse") else None)
        return None

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        return SparsePixArtConfig.from_pixart(self.config, layout, **rates)

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        self.refuse_sparse_source()
        from sparsedit.families.pixart.sparse import sparsify_pixart

        return sparsify_pixart(model, layout, num_pieces=num_pieces, **options)  # type: ignore[arg-type]

    @classmethod
    def reads_diffusers(cls, cfg: dict[str, Any]) -> bool:
        from sparsedit.families.pixart.convert import is_pixart_diffusers_config

        return is_pixart_diffusers_config(cfg)

    @classmethod
    def from_diffusers(cls, path: Path) -> nn.Module:
        from sparsedit.families.pixart.convert import pixart_from_diffusers

        return pixart_from_diffusers(path)

    @classmethod
    def reads_file(cls, obj: Any) -> bool:
        from sparsedit.families.pixart.convert import is_pixart_state

        return is_pixart_state(obj)  # original PixArt-alpha: {"state_dict": ...} with t_block / y_embedder keys

    @classmethod
    def from_file(cls, obj: Any, path: Path, preset: str | None, image_size: int | None, use_ema: bool,
                  semantic_size: int | tuple[int, int] | None = None) -> nn.Module:
        from sparsedit.families.pixart.convert import pick_pixart_state, pixart_from_original_state

        refuse_semantic_size(semantic_size, path)
        return pixart_from_original_state(pick_pixart_state(obj, str(path), use_ema), image_size, name=str(path))

    def save_diffusers(self, model: nn.Module, out: str | Path, overwrite: bool, drop_null_caption: bool) -> Path:
        from sparsedit.families.pixart.convert import save_pixart_diffusers

        return save_pixart_diffusers(model, out, overwrite, drop_null_caption)  # type: ignore[arg-type]

    @property
    def text_conditioned(self) -> bool:
        return True

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 **common: Any) -> Tensor:
        from sparsedit.families.pixart.sampling import generate_pixart

        text = text or {}
        return generate_pixart(model, text.get("embeds"), text.get("mask"), text.get("null_embeds"),  # type: ignore[arg-type]
                               null_mask=text.get("null_mask"), **common)

    def added_conditions(self, latent_hw: Sequence[int], batch: int, device: torch.device | str) -> dict[str, Tensor] | None:
        if not self.config.use_additional_conditions:  # only the 1024 px multi-scale models take them
            return None
        from sparsedit.families.pixart.model import size_conditions

        return size_conditions(latent_hw, batch, device)

    def diffusers_face(self, model: nn.Module) -> nn.Module:
        from sparsedit.families.pixart.face import DiffusersPixArt

        return DiffusersPixArt(model)

    def check_guidance(self, name: str) -> None:
        pass  # a caption model always has an unconditional input

    def conditioning(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
        return self._inputs(model, batch, guided, gen, CAPTION_TOKENS)

    def _inputs(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator, length: int) -> dict[str, Tensor]:
        """Random captions of ``length`` tokens, and a 1024 px model's resolution and aspect-ratio conditions."""
        cond = caption_conditioning(model, self.config, batch, guided, gen, length)
        rows = 2 * batch if guided else batch
        return {**cond, **(self.added_conditions(self.config.latent_hw, rows, "cpu") or {})}

    def call(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        added = {k: cond[k] for k in ("resolution", "aspect_ratio") if k in cond} or None
        kwargs = {"grid": tokens} if tokens is not None else {}
        return fn(x, t, cond["encoder_hidden_states"], cond["encoder_attention_mask"], added_cond_kwargs=added,
                  **kwargs)

    # ---- cost counting ------------------------------------------------------------------------------------

    cost_token_inputs = ("encoder_hidden_states",)  # the caption: its projection and attention are token work

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        length = CAPTION_TOKENS if text_len is None else text_len  # padded captions are computed in full
        return self._inputs(model, 1, False, torch.Generator(), length)

    # ---- users' LoRAs (sparsedit.lora) ------------------------------------------------------------------------------

    def diffusers_key_map(self) -> dict[str, list[tuple[str, int, int | None]]]:
        """Every tensor of the dense PixArt -> the rows ``[start, stop)`` of the diffusers ``PixArtTransformer2DModel``
        tensors it is made of, concatenated along dim 0 (``stop`` None: to the end): the converter's own map, fused
        q / k / v (and the text attention's k / v) of width D each. :func:`sparsedit.lora.load_lora` places a LoRA's
        deltas through it."""
        from sparsedit.families.pixart.convert import _key_map

        config = self.dense_config()
        d = config.hidden_size
        return {ours: [(theirs[0], 0, None)] if len(theirs) == 1 else [(t, 0, d) for t in theirs]
                for ours, theirs in _key_map(config).items()}
