"""Reading and writing SD3 / SD3.5 transformers in diffusers' format.

A diffusers ``SD3Transformer2DModel`` directory (or the pipeline directory holding one under ``transformer/``;
single or sharded safetensors) becomes an :class:`~sparsedit.families.sd3.model.SD3` with every tensor consumed
once, and a dense SD3 is written back as such a directory. Key names from diffusers'
``models/transformers/transformer_sd3.py`` (``JointTransformerBlock``, ``Attention`` with ``add_*_proj``,
``FeedForward``), the config fields from its ``__init__``.

The mapping is a renaming except in three places: q, k and v (image and caption) are fused along dim 0; the
two ``AdaLayerNormContinuous`` regressors (``norm_out`` and the last block's ``norm1_context``) store
(scale, shift), ours (shift, scale), so their halves are swapped; the last block's caption query weights, whose
outputs diffusers discards, are kept as buffers (see :class:`~sparsedit.families.sd3.model.JointAttention`).
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
from sparsedit.core.formats import (
    Source,
    diffusers_model_dir,
    diffusers_state,
    read_diffusers_weights,
    write_diffusers_model,
)
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.sd3.model import QK_NORMS, SD3, SD3Config

SD3_DIFFUSERS_CLASS = "SD3Transformer2DModel"
_WB = (".weight", ".bias")

# ours -> diffusers, outside the blocks.
_TOP_MAP: dict[str, str] = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "pooled_embedder.0": "time_text_embed.text_embedder.linear_1",
    "pooled_embedder.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}
# Inside block i; a list means the diffusers tensors are concatenated along dim 0.
_BLOCK_MAP: dict[str, list[str]] = {
    "adaLN_modulation.1": ["norm1.linear"],
    "context_adaLN_modulation.1": ["norm1_context.linear"],
    "attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "attn.proj": ["attn.to_out.0"],
    "mlp.fc1": ["ff.net.0.proj"],
    "mlp.fc2": ["ff.net.2"],
}
_CONTEXT_MAP: dict[str, list[str]] = {  # blocks whose caption stream continues
    "attn.context_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "attn.context_proj": ["attn.to_add_out"],
    "context_mlp.fc1": ["ff_context.net.0.proj"],
    "context_mlp.fc2": ["ff_context.net.2"],
}
_DUAL_MAP: dict[str, list[str]] = {
    "attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
    "attn2.proj": ["attn2.to_out.0"],
}
# q/k norm weights (SD3.5): ours -> diffusers, inside block i.
_NORM_MAP = {"attn.q_norm.weight": "attn.norm_q.weight", "attn.k_norm.weight": "attn.norm_k.weight",
             "attn.context_k_norm.weight": "attn.norm_added_k.weight"}
_DUAL_NORM_MAP = {"attn2.q_norm.weight": "attn2.norm_q.weight", "attn2.k_norm.weight": "attn2.norm_k.weight"}


def _key_map(config: SD3Config) -> dict[str, list[str]]:
    """Every tensor of our state dict -> the diffusers tensors it is made of."""
    out: dict[str, list[str]] = {"pos_table": ["pos_embed.pos_embed"]}
    for ours, theirs in _TOP_MAP.items():
        for s in _WB:
            out[ours + s] = [theirs + s]
    for i in range(config.depth):
        last = i == config.depth - 1
        dual = i in config.dual_attention_layers
        pairs = dict(_BLOCK_MAP, **(_DUAL_MAP if dual else {}))
        if last:
            pairs["attn.context_kv"] = ["attn.add_k_proj", "attn.add_v_proj"]
        else:
            pairs.update(_CONTEXT_MAP)
        for ours, theirs_list in pairs.items():
            for s in _WB:
                out[f"blocks.{i}.{ours}{s}"] = [f"transformer_blocks.{i}.{t}{s}" for t in theirs_list]
        if last:  # the caption queries SD3 computes and discards, kept as buffers
            out[f"blocks.{i}.attn.unused_context_q_weight"] = [f"transformer_blocks.{i}.attn.add_q_proj.weight"]
            out[f"blocks.{i}.attn.unused_context_q_bias"] = [f"transformer_blocks.{i}.attn.add_q_proj.bias"]
        if config.qk_norm is not None:
            norms = dict(_NORM_MAP, **(_DUAL_NORM_MAP if dual else {}))
            norms["attn.unused_context_q_norm" if last else "attn.context_q_norm.weight"] = "attn.norm_added_q.weight"
            for ours, theirs in norms.items():
                out[f"blocks.{i}.{ours}"] = [f"transformer_blocks.{i}.{theirs}"]
    return out


def _swapped(config: SD3Config) -> list[str]:
    """Our (shift, scale) regressors that diffusers stores as (scale, shift)."""
    last = f"blocks.{config.depth - 1}.context_adaLN_modulation.1"
    return [m + s for m in ("final_layer.adaLN_modulation.1", last) for s in _WB]


def _swap_halves(x: Tensor) -> Tensor:
    """(scale, shift) <-> (shift, scale) along dim 0; its own inverse."""
    a, b = x.chunk(2)
    return torch.cat([b, a])


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def is_sd3_diffusers_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("_class_name") == SD3_DIFFUSERS_CLASS


def sd3_config_from_diffusers(cfg: dict[str, Any], name: str = "config.json") -> SD3Config:
    """Our config for a diffusers SD3 ``config.json`` (absent fields: ``SD3Transformer2DModel``'s defaults)."""
    if not is_sd3_diffusers_config(cfg):
        raise CheckpointError(f"{name} describes a {cfg.get('_class_name')!r}, not an {SD3_DIFFUSERS_CLASS}")
    check_json_fields(cfg, name, positive_ints=(*DIFFUSERS_SIZE_FIELDS, "joint_attention_dim", "caption_projection_dim",
                                                "pooled_projection_dim", "pos_embed_max_size"))
    heads, head_dim = cfg.get("num_attention_heads", 18), cfg.get("attention_head_dim", 64)
    hidden = heads * head_dim
    if cfg.get("caption_projection_dim", 1152) != hidden:
        raise CheckpointError(f"{name}: caption_projection_dim {cfg.get('caption_projection_dim', 1152)} differs from "
                              f"the width {hidden} (num_attention_heads x attention_head_dim); the joint attention "
                              "needs them equal")
    if "pos_embed_max_size" in cfg and cfg["pos_embed_max_size"] is None:
        raise CheckpointError(f"{name}: pos_embed_max_size null is not supported (every SD3 release stores a cropped "
                              "position table)")
    qk_norm = cfg.get("qk_norm")
    if qk_norm is not None and qk_norm not in QK_NORMS:
        raise CheckpointError(f"{name}: qk_norm={qk_norm!r} is not supported (only null or 'rms_norm', as released)")
    depth = cfg.get("num_layers", 18)
    dual = cfg.get("dual_attention_layers") or ()
    if not isinstance(dual, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < depth for i in dual):
        raise CheckpointError(f"{name}: dual_attention_layers must list block indices in [0, {depth}), got {dual!r}")
    in_ch = cfg.get("in_channels", 16)
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{name}: out_channels {out_ch} is neither in_channels {in_ch} nor twice it")
    try:
        return SD3Config(
            input_size=cfg.get("sample_size", 128), patch_size=cfg.get("patch_size", 2), in_channels=in_ch,
            hidden_size=hidden, depth=depth, num_heads=heads, learn_sigma=out_ch == 2 * in_ch,
            caption_channels=cfg.get("joint_attention_dim", 4096), pooled_channels=cfg.get("pooled_projection_dim", 2048),
            pos_embed_max_size=cfg.get("pos_embed_max_size", 96), qk_norm=qk_norm, dual_attention_layers=tuple(dual),
        )
    except SparseditError as err:
        raise CheckpointError(f"{name}: {err}") from None


# --------------------------------------------------------------------------------------------
# diffusers SD3Transformer2DModel
# --------------------------------------------------------------------------------------------


def sd3_from_state(state: dict[str, Tensor], config: SD3Config, name: str = "checkpoint") -> SD3:
    """Build an :class:`SD3` from a diffusers-layout state dict, consuming every key (float32 weights)."""
    src = Source(state, name)
    ours = {key: torch.cat([src.take(t) for t in theirs]) if len(theirs) > 1 else src.take(theirs[0])
            for key, theirs in _key_map(config).items()}
    for key in _swapped(config):
        ours[key] = _swap_halves(ours[key])
    # Every tensor, buffers included, comes from the file: skip the random initialisation (billions of values).
    with torch.device("meta"):
        model = SD3(config)
    model = model.to_empty(device="cpu")
    load_state_strict(model, ours, name)
    src.finish()
    return model.eval()


def sd3_from_diffusers(path: str | Path) -> SD3:
    """Load a diffusers ``SD3Transformer2DModel`` directory (or the pipeline directory above it)."""
    path = diffusers_model_dir(Path(path))
    config = sd3_config_from_diffusers(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    return sd3_from_state(read_diffusers_weights(path), config, str(path))


def diffusers_fields(config: SD3Config) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of ``config`` (a square latent: diffusers holds one ``sample_size``)."""
    return {
        "sample_size": config.latent_hw[0], "patch_size": config.patch_size, "in_channels": config.in_channels,
        "num_layers": config.depth, "attention_head_dim": config.head_dim, "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.caption_channels, "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_channels, "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size, "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": config.qk_norm,
    }


def save_sd3_diffusers(model: SD3, out: str | Path, overwrite: bool = False) -> Path:
    """Write a dense ``model`` as a diffusers ``SD3Transformer2DModel`` directory (exact: the same tensors)."""
    if type(model) is not SD3:
        raise SparseditError(f"only a dense SD3 exports to diffusers: a {type(model).__name__} has no diffusers class; "
                             "save it with --to sparsedit")
    cfg = model.config
    h, w = cfg.latent_hw
    if h != w:
        raise SparseditError(f"diffusers' {SD3_DIFFUSERS_CLASS} config holds one square sample_size, not {h}x{w}; "
                             "export a square config (the weights run at any size) or save with --to sparsedit")
    if cfg.mlp_ratio != 4.0:
        raise SparseditError(f"diffusers' {SD3_DIFFUSERS_CLASS} has an MLP ratio of 4, not {cfg.mlp_ratio}; export "
                             "to sparsedit")
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    for key in _swapped(cfg):
        ours[key] = _swap_halves(ours[key])
    return write_diffusers_model(out, diffusers_state(ours, _key_map(cfg)), SD3_DIFFUSERS_CLASS, diffusers_fields(cfg), overwrite)
