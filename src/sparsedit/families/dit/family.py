"""The DiT family adapter: class-conditional DiT / SparseDiT behind the :class:`~sparsedit.families.base.Family` interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.core.layers import Attention, sincos_pos_embed_2d
from sparsedit.core.layout import LAYOUTS
from sparsedit.errors import SparseditError
from sparsedit.families import register
from sparsedit.families.base import Family, Tokens, label_conditioning, refuse_drop_null_caption
from sparsedit.families.dit.model import DIT_PRESETS, DiT, DiTConfig, dit_config
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig


def refuse_semantic_size(semantic_size: object, path: Path) -> None:
    if semantic_size is not None:
        raise SparseditError(f"semantic_size (--semantic-size) applies to the SparseDiT authors' .pt files only, and "
                             f"{path} is not one; drop it")


@register
class DiTFamily(Family):
    """Class-conditional DiT (https://github.com/facebookresearch/DiT) and SparseDiT."""

    name = "dit"
    dense_type = "DiT"
    sparse_type = "SparseDiT"
    presets = DIT_PRESETS
    preset_help = "a DiT preset (DiT-XL/2, DiT-B/2, ...), a SparseDiT preset (SparseDiT-XL/2, SparseDiT-B/2, ...)"
    diffusers_format = "diffusers"
    catch_all = True  # an official DiT file is a bare state dict, and DiTTransformer2DModel the plain diffusers class:
    # tried after the other families, its loaders name what a file holds when it is not a DiT either

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"DiT": (DiTConfig, DiT), "SparseDiT": (SparseDiTConfig, SparseDiT)}

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        if name.startswith("SparseDiT-"):
            dit_name = "DiT-" + name[len("SparseDiT-"):]
            if dit_name not in DIT_PRESETS:
                raise SparseditError(
                    f"unknown SparseDiT preset {name!r}; choose one of {', '.join(k + '/2' for k in LAYOUTS)} "
                    "(or /4, /8), or a DiT preset with --layout"
                )
            return dit_config(dit_name, image_size), name
        if name in DIT_PRESETS:
            return dit_config(name, image_size), None
        return None

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        return SparseDiTConfig.from_dit(self.config, layout, **rates)

    # ---- sparsify ------------------------------------------------------------------------------

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        from sparsedit.families.dit.sparsify import sparsify_with_rules

        return sparsify_with_rules(model, layout=layout, num_pieces=num_pieces, **options)[0]  # type: ignore[arg-type]

    # ---- checkpoint formats -----------------------------------------------------------------------

    @classmethod
    def reads_diffusers(cls, cfg: dict[str, Any]) -> bool:
        return True  # the catch-all diffusers class: DiTTransformer2DModel (its loader names anything else)

    @classmethod
    def from_diffusers(cls, path: Path) -> nn.Module:
        from sparsedit.families.dit.convert import dit_from_diffusers

        return dit_from_diffusers(path)

    @classmethod
    def reads_file(cls, obj: Any) -> bool:
        return True

    @classmethod
    def from_file(cls, obj: Any, path: Path, preset: str | None, image_size: int | None, use_ema: bool,
                  semantic_size: int | tuple[int, int] | None = None) -> nn.Module:
        from sparsedit.core.formats import pick_state_dict
        from sparsedit.families.dit.authors import is_authors_checkpoint, sparse_dit_from_authors
        from sparsedit.families.dit.convert import dit_from_official_state

        if is_authors_checkpoint(obj):
            return sparse_dit_from_authors(obj, str(path), use_ema=use_ema, preset=preset, image_size=image_size,
                                           semantic_size=semantic_size)
        refuse_semantic_size(semantic_size, path)
        state = obj if path.suffix == ".safetensors" else pick_state_dict(obj, path, use_ema)
        return dit_from_official_state(state, preset, image_size, str(path))

    def save_diffusers(self, model: nn.Module, out: str | Path, overwrite: bool, drop_null_caption: bool) -> Path:
        from sparsedit.families.dit.convert import save_diffusers

        refuse_drop_null_caption(model, drop_null_caption)
        return save_diffusers(model, out, overwrite)  # type: ignore[arg-type]  # refuses a SparseDiT

    def export_differences(self) -> list[str]:
        notes = []
        if self.config.t_freq_shift != 1.0:
            notes.append(f"timestep frequency shift {self.config.t_freq_shift:g} -> 1 (diffusers' Timesteps)")
        if self.config.norm_eps != 1e-6:
            notes.append(f"attention norm eps {self.config.norm_eps:g} -> 1e-06")
        return notes

    # ---- conditioning and sampling ----------------------------------------------------------------

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 **common: Any) -> Tensor:
        from sparsedit.diffusion.sampling import generate

        return generate(model, labels, **common)  # type: ignore[arg-type]

    def draws_training_grids(self) -> bool:
        return True

    def diffusers_face(self, model: nn.Module) -> nn.Module:
        from sparsedit.families.dit.face import DiffusersDiT

        return DiffusersDiT(model)

    def attention_layers(self, model: nn.Module) -> list[nn.Module]:
        if self.sparse:
            super().attention_layers(model)  # refuses
        mods = [getattr(block, "attn", None) for block in model.blocks]
        if not all(isinstance(m, Attention) for m in mods):
            raise SparseditError("every block of the model must have a self-attention (blocks.i.attn)")
        return mods  # type: ignore[return-value]

    # ---- one model evaluation ------------------------------------------------------------------------

    def conditioning(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
        return label_conditioning(self.config.num_classes, batch, guided, gen)

    def call(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        return fn(x, t, cond["y"], **({"grid": tokens} if tokens is not None else {}))

    def reset_buffers(self, model: nn.Module) -> None:
        if hasattr(model, "pos_embed"):
            model.pos_embed.copy_(sincos_pos_embed_2d(self.config.hidden_size, *self.config.grid)[None])
