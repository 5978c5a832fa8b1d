"""Latte checkpoints in the formats users hold: diffusers ``LatteTransformer3DModel`` directories (read and
written) and the original release's state dicts (https://github.com/Vchitect/Latte; key names only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedit.core.checkpoint import (
    CONFIG_NAME,
    DIFFUSERS_SIZE_FIELDS,
    check_json_fields,
    load_state_strict,
    read_json,
)
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.dit.model import DIT_SIZES
from sparsedit.families.latte.model import Latte, LatteConfig

LATTE_DIFFUSERS_CLASS = "LatteTransformer3DModel"


def latte_config_from_diffusers(cfg: dict[str, Any], name: str = "config.json") -> LatteConfig:
    """Our config for a diffusers ``LatteTransformer3DModel`` ``config.json``."""
    if cfg.get("_class_name") != LATTE_DIFFUSERS_CLASS:
        raise CheckpointError(f"{name} describes a {cfg.get('_class_name')!r}, not a {LATTE_DIFFUSERS_CLASS}")
    # Every released Latte uses these; diffusers' constructor defaults differ, so they must be explicit.
    required = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False}
    for key, want in required.items():
        if cfg.get(key) != want:
            raise CheckpointError(f"{name}: {key}={cfg.get(key)!r} is not supported (only {want!r})")
    check_json_fields(cfg, name, positive_ints=(*DIFFUSERS_SIZE_FIELDS, "caption_channels", "cross_attention_dim",
                                                "video_length"), numbers=("norm_eps",))
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 88)
    hidden = heads * head_dim
    if cfg.get("caption_channels") is None:
        raise CheckpointError(f"{name}: caption_channels is null; Latte-T2V projects T5 embeddings")
    if cfg.get("cross_attention_dim") != hidden:
        raise CheckpointError(f"{name}: cross_attention_dim {cfg.get('cross_attention_dim')} differs from the width {hidden}")
    sample, patch = cfg.get("sample_size", 64), cfg.get("patch_size")
    if patch is None:
        raise CheckpointError(f"{name}: patch_size is null")
    in_ch = cfg.get("in_channels")
    out_ch = cfg.get("out_channels") or in_ch
    if in_ch is None or out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{name}: out_channels {out_ch} is neither in_channels ({in_ch}) nor twice it")
    return LatteConfig(
        input_size=sample, num_frames=cfg.get("video_length", 16), patch_size=patch, in_channels=in_ch,
        hidden_size=hidden, depth=2 * cfg.get("num_layers", 1), num_heads=heads, learn_sigma=out_ch == 2 * in_ch,
        conditioning="text", caption_channels=cfg["caption_channels"],
        interpolation_scale=float(max(sample // 64, 1)),  # fixed in LatteTransformer3DModel.__init__
        norm_eps=cfg.get("norm_eps", 1e-5), text_mask_bias=-10000.0,
    )


def _latte_key_map(config: LatteConfig) -> dict[str, list[str]]:
    """Every tensor of a text Latte -> the diffusers tensors it is made of (q/k/v concatenated)."""
    from sparsedit.families.pixart.convert import _BLOCK_MAP, _TOP_MAP, _WB

    out = {ours + s: [theirs + s] for ours, theirs in _TOP_MAP.items() for s in _WB}
    out["final_layer.scale_shift_table"] = ["scale_shift_table"]
    for i in range(config.depth):
        prefix = f"transformer_blocks.{i // 2}" if i % 2 == 0 else f"temporal_transformer_blocks.{i // 2}"
        for ours, theirs in _BLOCK_MAP.items():
            if i % 2 and ours.startswith("cross_attn."):
                continue  # temporal blocks have no text attention (attn2)
            for s in _WB:
                out[f"blocks.{i}.{ours}{s}"] = [f"{prefix}.{t}{s}" for t in theirs]
        out[f"blocks.{i}.scale_shift_table"] = [f"{prefix}.scale_shift_table"]
    return out


def is_latte_diffusers_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("_class_name") == LATTE_DIFFUSERS_CLASS


def latte_from_diffusers(path: str | Path) -> Latte:
    """Load a diffusers ``LatteTransformer3DModel`` directory (or the pipeline directory above it)."""
    from sparsedit.core.formats import diffusers_model_dir, load_diffusers_mapped

    path = diffusers_model_dir(Path(path))
    config = latte_config_from_diffusers(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    return load_diffusers_mapped(Latte(config), path, _latte_key_map(config))


def save_latte_diffusers(model: Latte, out: str | Path, overwrite: bool = False) -> Path:
    """Write a dense text-conditional Latte as a diffusers ``LatteTransformer3DModel`` directory.

    The inverse of :func:`latte_from_diffusers`. diffusers' class is Latte-T2V only (a class-conditional
    Latte has no diffusers class) and fixes the spatial interpolation scale to ``max(sample_size // 64, 1)``;
    a model with exact caption masking (``text_mask_bias=None``) exports with diffusers' -10000 bias
    (:func:`sparsedit.loading.export_differences`).
    """
    from sparsedit.core.formats import check_exportable, diffusers_state, write_diffusers_model

    check_exportable(model, Latte, LATTE_DIFFUSERS_CLASS)
    cfg = model.config
    if not cfg.text:
        raise SparseditError(
            f"diffusers' {LATTE_DIFFUSERS_CLASS} is text-to-video; a class-conditional Latte saves as sparsedit only"
        )
    sample = cfg.latent_hw[0]
    if cfg.interpolation_scale != max(sample // 64, 1):
        raise SparseditError(
            f"diffusers fixes a Latte's position interpolation scale to {max(sample // 64, 1)} at sample_size {sample}; "
            f"this model uses {cfg.interpolation_scale:g}: export to sparsedit"
        )
    d = cfg.hidden_size
    return write_diffusers_model(out, diffusers_state(model.state_dict(), _latte_key_map(cfg)), LATTE_DIFFUSERS_CLASS, {
        "num_attention_heads": cfg.num_heads, "attention_head_dim": d // cfg.num_heads, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.depth // 2, "dropout": 0.0, "cross_attention_dim": d,
        "attention_bias": True, "sample_size": sample, "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps, "caption_channels": cfg.caption_channels,
        "video_length": cfg.num_frames,
    }, overwrite)


def latte_from_original_state(state: dict[str, Tensor], num_heads: int | None = None,
                              name: str = "checkpoint") -> Latte:
    """A class-conditional / unconditional Latte from a release state dict (``models/latte.py`` keys).

    Shapes give the config; the stored ``pos_embed`` / ``temp_embed`` tables give the grid and frame
    count and are checked against ours. Heads come from DiT's width -> heads table unless given.
    Every key is consumed. (The release's ``extras=78`` CLIP-text variant is not supported.)
    """
    from sparsedit.core.formats import Source

    src = Source(state, name)
    try:
        hidden, in_ch, p, _ = state["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_ch = state["final_layer.linear.weight"].shape[0] // (p * p)
        pos, temp = state["pos_embed"], state["temp_embed"]
    except (KeyError, ValueError):
        raise CheckpointError(f"{name} is not a Latte release state dict (x_embedder/blocks/final_layer/pos_embed)") from None
    if "text_embedding_projection.1.weight" in state:
        raise CheckpointError(f"{name}: the CLIP-text (extras=78) Latte variant is not supported")
    heads = num_heads or {w: h for _, w, h in DIT_SIZES.values()}.get(hidden)
    if heads is None:
        raise CheckpointError(f"{name}: width {hidden} is not a release size; pass num_heads")
    side = round(pos.shape[1] ** 0.5)
    table = state.get("y_embedder.embedding_table.weight")
    config = LatteConfig(
        input_size=side * p, num_frames=temp.shape[1], patch_size=p, in_channels=in_ch, hidden_size=hidden,
        depth=depth, num_heads=heads, learn_sigma=out_ch == 2 * in_ch, conditioning="class",
        num_classes=0 if table is None else table.shape[0] - 1,
    )
    model = Latte(config)
    for key, ours in (("pos_embed", model.pos_embed), ("temp_embed", model.temp_embed)):
        if src.take(key).shape != ours.shape or not torch.allclose(state[key].float(), ours, atol=1e-4):
            raise CheckpointError(f"{name}: stored {key} is not the sin-cos table of a {side}x{side} x {temp.shape[1]} model")
    load_state_strict(model, {k: src.take(k) for k in model.state_dict()}, name)
    src.finish()
    return model.eval()
