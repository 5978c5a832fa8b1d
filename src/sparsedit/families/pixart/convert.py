"""Reading and writing PixArt-alpha checkpoints.

* original ``.pth`` files (https://github.com/PixArt-alpha/PixArt-alpha): ``{"state_dict": ...}``
  (training files may add ``state_dict_ema``) whose keys are our module names
  (``blocks.i.attn.qkv``, ``blocks.i.cross_attn.q_linear`` / ``kv_linear`` / ``proj``,
  ``blocks.i.scale_shift_table``, ``t_block.1``, ``y_embedder.y_proj.fc{1,2}``,
  ``y_embedder.y_embedding``, ``final_layer.*``, ``csize_embedder`` / ``ar_embedder`` at 1024 px)
  plus the stored sin-cos ``pos_embed``, which we check and use to tell the interpolation scale;
* diffusers ``PixArtTransformer2DModel`` directories (older releases name the class
  ``Transformer2DModel`` with ``norm_type="ada_norm_single"``), or the pipeline directory holding
  one under ``transformer/``. Key names from diffusers' ``scripts/convert_pixart_alpha_to_diffusers.py``
  and ``models/transformers/pixart_transformer_2d.py``.

Every loader pops each source key it uses and fails, naming the keys, if anything is left over.
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
    check_exportable,
    diffusers_model_dir,
    diffusers_state,
    load_diffusers_mapped,
    write_diffusers_model,
)
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.pixart.model import PIXART_HEAD_DIM, PixArt, PixArtConfig, pixart_pos_embed

PIXART_DIFFUSERS_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")
_WB = (".weight", ".bias")

# ours -> diffusers; a list means the diffusers tensors are concatenated along dim 0 (fused q/k/v).
_TOP_MAP: dict[str, str] = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_SIZE_MAP: dict[str, str] = {
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
_BLOCK_MAP: dict[str, list[str]] = {  # inside block i
    "attn.qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"],
    "attn.proj": ["attn1.to_out.0"],
    "cross_attn.q_linear": ["attn2.to_q"],
    "cross_attn.kv_linear": ["attn2.to_k", "attn2.to_v"],
    "cross_attn.proj": ["attn2.to_out.0"],
    "mlp.fc1": ["ff.net.0.proj"],
    "mlp.fc2": ["ff.net.2"],
}


def _key_map(config: PixArtConfig) -> dict[str, list[str]]:
    """Every tensor of our state dict (but the null caption) -> the diffusers tensors it is made of."""
    out: dict[str, list[str]] = {}
    pairs = dict(_TOP_MAP, **(_SIZE_MAP if config.use_additional_conditions else {}))
    for ours, theirs in pairs.items():
        for s in _WB:
            out[ours + s] = [theirs + s]
    for i in range(config.depth):
        for ours, theirs_list in _BLOCK_MAP.items():
            for s in _WB:
                out[f"blocks.{i}.{ours}{s}"] = [f"transformer_blocks.{i}.{t}{s}" for t in theirs_list]
        out[f"blocks.{i}.scale_shift_table"] = [f"transformer_blocks.{i}.scale_shift_table"]
    out["final_layer.scale_shift_table"] = ["scale_shift_table"]
    return out


# --------------------------------------------------------------------------------------------
# diffusers PixArtTransformer2DModel
# --------------------------------------------------------------------------------------------


def is_pixart_diffusers_config(cfg: dict[str, Any]) -> bool:
    name = cfg.get("_class_name")
    if name == "PixArtTransformer2DModel":
        return True
    return name == "Transformer2DModel" and cfg.get("norm_type") == "ada_norm_single"


def pixart_config_from_diffusers(cfg: dict[str, Any], name: str = "config.json") -> PixArtConfig:
    """Our config for a diffusers PixArt ``config.json`` (defaults: ``PixArtTransformer2DModel``'s)."""
    if not is_pixart_diffusers_config(cfg):
        raise CheckpointError(f"{name} describes a {cfg.get('_class_name')!r}, not a PixArtTransformer2DModel")
    required = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False, "attention_type": "default"}
    for key, want in required.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{name}: {key}={cfg[key]!r} is not supported (only {want!r})")
    check_json_fields(cfg, name, positive_ints=(*DIFFUSERS_SIZE_FIELDS, "caption_channels", "cross_attention_dim"),
                      numbers=("norm_eps", "interpolation_scale"))
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    hidden = heads * head_dim
    if cfg.get("caption_channels") is None:
        raise CheckpointError(f"{name}: caption_channels is null; a PixArt projects T5 embeddings (4096)")
    if cfg.get("cross_attention_dim", hidden) != hidden:
        raise CheckpointError(f"{name}: cross_attention_dim {cfg['cross_attention_dim']} differs from the width {hidden}")
    sample = cfg.get("sample_size", 128)
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{name}: out_channels {out_ch} is neither in_channels nor twice it")
    use_add = cfg.get("use_additional_conditions")
    scale = cfg.get("interpolation_scale")
    return PixArtConfig(
        input_size=sample, patch_size=cfg.get("patch_size", 2), in_channels=in_ch, hidden_size=hidden,
        depth=cfg.get("num_layers", 28), num_heads=heads, learn_sigma=out_ch == 2 * in_ch,
        caption_channels=cfg["caption_channels"], null_caption_length=0,
        # diffusers' own defaults for null fields (PixArtTransformer2DModel.__init__).
        use_additional_conditions=sample == 128 if use_add is None else bool(use_add),
        interpolation_scale=float(max(sample // 64, 1) if scale is None else scale),
        norm_eps=cfg.get("norm_eps", 1e-6), text_mask_bias=-10000.0,  # diffusers' mask -> bias conversion
    )


def pixart_from_diffusers(path: str | Path) -> PixArt:
    """Load a diffusers PixArt transformer directory (or the pipeline directory above it)."""
    path = diffusers_model_dir(Path(path))
    config = pixart_config_from_diffusers(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    return load_diffusers_mapped(PixArt(config), path, _key_map(config))


def save_pixart_diffusers(model: PixArt, out: str | Path, overwrite: bool = False,
                          drop_null_caption: bool = False) -> Path:
    """Write ``model`` as a diffusers ``PixArtTransformer2DModel`` directory.

    diffusers has no slot for the original's null caption ``y_embedding``: a model holding one is
    only exported with ``drop_null_caption=True`` (its pipelines encode the empty prompt instead).
    diffusers always masks padded caption tokens with a -10000 logit bias; a model with exact
    masking (``text_mask_bias=None``) exports with that change (equal unless logits reach ~1e4).
    """
    check_exportable(model, PixArt, "PixArtTransformer2DModel")
    cfg = model.config
    if cfg.base_size not in (None, cfg.grid[0]):
        raise SparseditError(f"base_size {cfg.base_size} cannot be expressed in diffusers (always sample_size // patch)")
    if model.y_embedder.y_embedding is not None and not drop_null_caption:
        raise SparseditError("this PixArt stores a null caption, which diffusers cannot hold; pass drop_null_caption=True "
                             "(sparsedit convert: --drop-null-caption)")
    d = cfg.hidden_size
    state = diffusers_state(model.state_dict(), _key_map(cfg), dropped=("y_embedder.y_embedding",))
    return write_diffusers_model(out, state, "PixArtTransformer2DModel", {
        "num_attention_heads": cfg.num_heads, "attention_head_dim": d // cfg.num_heads, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.depth, "dropout": 0.0, "norm_num_groups": 32,
        "cross_attention_dim": d, "attention_bias": True, "sample_size": cfg.latent_hw[0],
        "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
        "upcast_attention": False, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
        "norm_eps": cfg.norm_eps, "interpolation_scale": cfg.interpolation_scale,
        "use_additional_conditions": cfg.use_additional_conditions, "caption_channels": cfg.caption_channels,
        "attention_type": "default",
    }, overwrite)


# --------------------------------------------------------------------------------------------
# original PixArt .pth
# --------------------------------------------------------------------------------------------


def is_pixart_state(obj: Any) -> bool:
    """True for an original PixArt checkpoint object (wrapped or bare state dict)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return isinstance(obj, dict) and "t_block.1.weight" in obj


def pick_pixart_state(obj: Any, name: str, use_ema: bool = True) -> dict[str, Tensor]:
    """The state dict inside ``{"state_dict": ..., "state_dict_ema": ...}`` (EMA if present and asked)."""
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict_ema"] if use_ema and isinstance(obj.get("state_dict_ema"), dict) else obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{name} does not hold a PixArt state dict ({{'state_dict': ...}})")
    return obj


def infer_pixart_config(state: dict[str, Tensor], image_size: int | None = None, num_heads: int | None = None,
                        name: str = "checkpoint") -> PixArtConfig:
    """Read a PixArt config off the original tensor shapes and its stored position table."""
    try:
        hidden, in_ch, p, _ = state["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_ch = state["final_layer.linear.weight"].shape[0] // (p * p)
        caption_channels = state["y_embedder.y_proj.fc1.weight"].shape[1]
    except (KeyError, ValueError):
        raise CheckpointError(f"{name} is not an original PixArt state dict (no x_embedder/blocks/final_layer/y_embedder)") from None
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{name}: final layer gives {out_ch} channels for {in_ch} inputs; not a PixArt")
    if num_heads is None:
        if hidden % PIXART_HEAD_DIM:
            raise CheckpointError(
                f"{name}: width {hidden} is not a multiple of PixArt's head size {PIXART_HEAD_DIM}, so the number of "
                "heads is unknown; call sparsedit.families.pixart.convert.pixart_from_original(path, num_heads=...)"
            )
        num_heads = hidden // PIXART_HEAD_DIM
    null = state.get("y_embedder.y_embedding")
    base = dict(patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth, num_heads=num_heads,
                learn_sigma=out_ch == 2 * in_ch, caption_channels=caption_channels,
                null_caption_length=0 if null is None else null.shape[0],
                use_additional_conditions="csize_embedder.mlp.0.weight" in state)
    pos = state.get("pos_embed")
    if pos is None:
        if image_size is None:
            raise CheckpointError(f"{name} has no pos_embed to infer the image size from; pass image_size")
        latent = image_size // 8
        return PixArtConfig(input_size=latent, interpolation_scale=latent * 8 / 512, **base)
    side = round(pos.shape[1] ** 0.5)
    if side * side != pos.shape[1]:
        raise CheckpointError(f"{name}: pos_embed has {pos.shape[1]} tokens, not a square grid")
    latent = side * p
    if image_size is not None and image_size // 8 != latent:
        raise CheckpointError(f"{name} was trained at {latent * 8} px (latent {latent}), not {image_size} px")
    # The originals scale positions by image_size / 512 (0.5, 1, 2); diffusers' default is max(latent // 64, 1).
    for scale in dict.fromkeys((latent * 8 / 512, 0.5, 1.0, 2.0, 4.0, float(max(latent // 64, 1)))):
        table = pixart_pos_embed(hidden, (side, side), side, scale)
        if torch.allclose(pos[0].float(), table, atol=1e-3):
            return PixArtConfig(input_size=latent, interpolation_scale=scale, **base)
    raise CheckpointError(f"{name}: stored pos_embed is not PixArt's sin-cos table at any known interpolation scale")


def pixart_from_original_state(state: dict[str, Tensor], image_size: int | None = None, num_heads: int | None = None,
                               name: str = "checkpoint") -> PixArt:
    """Build a :class:`PixArt` from an original state dict, consuming every key."""
    config = infer_pixart_config(state, image_size, num_heads, name)
    model = PixArt(config)
    src = Source(state, name)
    if src.has("pos_embed"):
        src.take("pos_embed")  # checked against our table by infer_pixart_config
    load_state_strict(model, {k: src.take(k) for k in model.state_dict()}, name)
    src.finish()
    return model.eval()


def pixart_from_original(path: str | Path, image_size: int | None = None, num_heads: int | None = None,
                         use_ema: bool = True) -> PixArt:
    """Load an original PixArt ``.pth`` (or a ``.safetensors`` holding the same keys)."""
    from sparsedit.core.checkpoint import read_safetensors
    from sparsedit.core.formats import read_torch_file

    path = Path(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    return pixart_from_original_state(pick_pixart_state(obj, str(path), use_ema), image_size, num_heads, str(path))


def original_state_dict(model: PixArt) -> dict[str, Tensor]:
    """The original key layout (``pos_embed`` stored, as in the release)."""
    if type(model) is not PixArt:
        raise SparseditError(f"only a dense PixArt has the original layout, not {type(model).__name__}")
    state = dict(model.state_dict())
    state["pos_embed"] = model.pos_embed.clone()
    return state
