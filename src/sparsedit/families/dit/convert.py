"""Reading and writing DiT checkpoints in the formats users hold.

* official DiT ``.pt`` files (https://github.com/facebookresearch/DiT): a bare EMA state dict as
  released (``DiT-XL-2-256x256.pt``) or a training checkpoint ``{"model", "ema", "opt", "args"}``;
* diffusers ``DiTTransformer2DModel`` directories (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), key names from diffusers'
  ``scripts/convert_dit_to_diffusers.py`` and ``models/transformers/dit_transformer_2d.py``;
* the SparseDiT authors' ``.pt`` files (https://github.com/changsn/SparseDiT; :mod:`sparsedit.families.dit.authors`);
* sparsedit directories (:mod:`sparsedit.core.checkpoint`).

Every converter pops each source key it uses and fails, naming the keys, if anything is left over
or anything the model needs is missing (diffusers' own converter silently drops ``pos_embed``).
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
    describe_keys,
    diffusers_model_dir,
    read_diffusers_weights,
    write_diffusers_model,
)
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.dit.model import DIT_SIZES, DiT, DiTConfig, dit_config

DIFFUSERS_CLASS = "DiTTransformer2DModel"


# hidden size -> number of heads of the released sizes (heads cannot be read off tensor shapes).
_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}


# --------------------------------------------------------------------------------------------
# official DiT
# --------------------------------------------------------------------------------------------


def infer_dit_config(
    state: dict[str, Tensor], preset: str | None = None, image_size: int | None = None, name: str = "checkpoint"
) -> DiTConfig:
    """Read a DiT config off official tensor shapes; ``preset``/``image_size`` fill what shapes cannot say."""
    try:
        hidden, in_ch, p, _ = state["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        n_out = state["final_layer.linear.weight"].shape[0]
        table_rows = state["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(
            f"{name} is not a checkpoint sparsedit reads: its {len(state)} tensors are under {describe_keys(state)}, not an "
            "official DiT's x_embedder/blocks/final_layer, the SparseDiT authors' poolingformer_blocks/dumbbell_blocks/"
            "normal_blocks or PixArt-alpha's; pass one of those, a diffusers directory or a sparsedit directory"
        ) from None
    out_ch = n_out // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{name}: final layer gives {out_ch} channels for {in_ch} inputs; not a DiT")
    if preset is not None:
        cfg = dit_config(preset, image_size or 256)
        if (cfg.hidden_size, cfg.depth, cfg.patch_size) != (hidden, depth, p):
            raise CheckpointError(
                f"{name} has hidden size {hidden}, depth {depth}, patch {p}, which is not {preset}; "
                "drop --model to infer it or name the right preset"
            )
        heads = cfg.num_heads
    elif hidden in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[hidden]
    else:
        raise CheckpointError(
            f"{name}: hidden size {hidden} is not a released DiT width ({', '.join(map(str, sorted(_HEADS_BY_WIDTH)))}), "
            "so the number of heads is unknown; convert it to a sparsedit directory (config.json names num_heads)"
        )
    if "pos_embed" in state:
        n_tok = state["pos_embed"].shape[1]
        side = round(n_tok**0.5)
        if side * side != n_tok:
            raise CheckpointError(f"{name}: pos_embed has {n_tok} tokens, not a square grid; pass --image-size")
        latent = side * p
        if image_size is not None and image_size // 8 != latent:
            raise CheckpointError(
                f"{name} was trained at {latent * 8} px (latent {latent}), not {image_size} px; "
                f"pass --image-size {latent * 8} or omit it"
            )
    elif image_size is not None:
        latent = image_size // 8
    else:
        raise CheckpointError(f"{name} has no pos_embed to infer the image size from; pass --image-size")
    return DiTConfig(
        input_size=latent, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth, num_heads=heads,
        num_classes=table_rows - 1, class_dropout_prob=0.1, learn_sigma=out_ch == 2 * in_ch,
    )


def dit_from_official_state(
    state: dict[str, Tensor], preset: str | None = None, image_size: int | None = None, name: str = "checkpoint"
) -> DiT:
    """Build a :class:`DiT` from an official state dict, consuming every key."""
    config = infer_dit_config(state, preset, image_size, name)
    model = DiT(config)
    src = Source(state, name)
    pos = src.take("pos_embed") if src.has("pos_embed") else None
    if pos is not None and not torch.allclose(pos.float(), model.pos_embed, atol=1e-5):
        raise CheckpointError(f"{name}: stored pos_embed is not the standard 2-D sin-cos table for its grid")
    target = model.state_dict()
    load_state_strict(model, {k: src.take(k) for k in target}, name)
    src.finish()
    return model


def official_state_dict(model: DiT) -> dict[str, Tensor]:
    """The official key layout (``pos_embed`` stored as in the release)."""
    if model.config.per_block_cond:
        raise SparseditError("this model has per-block embedders (diffusers layout), which the official format cannot hold")
    state = dict(model.state_dict())
    state["pos_embed"] = model.pos_embed.clone()
    return state


# --------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel
# --------------------------------------------------------------------------------------------

_DIFFUSERS_BLOCK_MAP = {  # ours -> diffusers, inside block i
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_DIFFUSERS_EMBED_MAP = {  # ours -> diffusers, relative to a block's norm1.emb
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
}


def _diffusers_config(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    if cfg.get("_class_name") != DIFFUSERS_CLASS:
        raise CheckpointError(f"{name} describes a {cfg.get('_class_name')!r}, not a {DIFFUSERS_CLASS}")
    unsupported = {
        "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
        "attention_bias": True, "upcast_attention": False,
    }
    for key, want in unsupported.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{name}: {key}={cfg[key]!r} is not supported (only {want!r}); not a standard DiT")
    check_json_fields(cfg, name, positive_ints=(*DIFFUSERS_SIZE_FIELDS, "num_embeds_ada_norm"), numbers=("norm_eps",))
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{name}: out_channels {out_ch} is neither in_channels nor twice it")
    return dict(
        input_size=cfg.get("sample_size", 32), patch_size=cfg.get("patch_size", 2), in_channels=in_ch,
        hidden_size=cfg.get("num_attention_heads", 16) * cfg.get("attention_head_dim", 72),
        depth=cfg.get("num_layers", 28), num_heads=cfg.get("num_attention_heads", 16),
        num_classes=cfg.get("num_embeds_ada_norm", 1000), learn_sigma=out_ch == 2 * in_ch,
        # diffusers' numerics (see DiTConfig): Timesteps(downscale_freq_shift=1), MLP norm eps from config.
        t_freq_shift=1.0, norm_eps=1e-6, mlp_norm_eps=cfg.get("norm_eps", 1e-5),
    )


def dit_from_diffusers(path: str | Path) -> DiT:
    """Load a diffusers ``DiTTransformer2DModel`` directory (or its parent pipeline directory)."""
    path = diffusers_model_dir(Path(path))  # a DiTPipeline directory holds it in transformer/
    name = str(path)
    fields = _diffusers_config(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    src = Source(read_diffusers_weights(path), name)
    depth = fields["depth"]

    def embedder_state(i: int) -> dict[str, Tensor]:
        pre = f"transformer_blocks.{i}.norm1.emb."
        out: dict[str, Tensor] = {}
        for ours, theirs in _DIFFUSERS_EMBED_MAP.items():
            for suffix in (".weight", ".bias"):
                out[ours + suffix] = src.take(pre + theirs + suffix)
        out["y_embedder.embedding_table.weight"] = src.take(pre + "class_embedder.embedding_table.weight")
        return out

    embedders = [embedder_state(i) for i in range(depth)]
    shared = all(torch.equal(e[k], embedders[0][k]) for e in embedders[1:] for k in e)
    rows = embedders[0]["y_embedder.embedding_table.weight"].shape[0]
    class_dropout = 0.1 if rows == fields["num_classes"] + 1 else 0.0
    config = DiTConfig(**fields, class_dropout_prob=class_dropout, per_block_cond=not shared)
    model = DiT(config)

    state: dict[str, Tensor] = {
        "x_embedder.proj.weight": src.take("pos_embed.proj.weight"),
        "x_embedder.proj.bias": src.take("pos_embed.proj.bias"),
        "final_layer.adaLN_modulation.1.weight": src.take("proj_out_1.weight"),
        "final_layer.adaLN_modulation.1.bias": src.take("proj_out_1.bias"),
        "final_layer.linear.weight": src.take("proj_out_2.weight"),
        "final_layer.linear.bias": src.take("proj_out_2.bias"),
    }
    state.update(embedders[0])
    if not shared:
        for i in range(1, depth):
            state.update({f"block_cond.{i - 1}.{k}": v for k, v in embedders[i].items()})
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        for suffix in (".weight", ".bias"):
            qkv = [src.take(f"{pre}attn1.to_{n}{suffix}") for n in "qkv"]
            state[f"blocks.{i}.attn.qkv{suffix}"] = torch.cat(qkv, dim=0)
            for ours, theirs in _DIFFUSERS_BLOCK_MAP.items():
                state[f"blocks.{i}.{ours}{suffix}"] = src.take(pre + theirs + suffix)
    load_state_strict(model, state, name)
    src.finish()
    return model


def save_diffusers(model: DiT, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``DiTTransformer2DModel`` directory.

    diffusers always uses ``downscale_freq_shift=1`` and eps 1e-6 in its attention norm: a model
    with other values (e.g. loaded from an official checkpoint) exports with that small numerical
    change, which :func:`sparsedit.loading.export_differences` reports.
    """
    check_exportable(model, DiT, DIFFUSERS_CLASS)
    cfg = model.config
    if cfg.class_dropout_prob <= 0:
        raise SparseditError("diffusers' DiT always has a null-class row; this model has none (class_dropout_prob=0)")
    ours = model.state_dict()
    state: dict[str, Tensor] = {
        "pos_embed.proj.weight": ours["x_embedder.proj.weight"],
        "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
        "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": ours["final_layer.linear.weight"],
        "proj_out_2.bias": ours["final_layer.linear.bias"],
    }
    d = cfg.hidden_size
    for i in range(cfg.depth):
        pre = f"transformer_blocks.{i}."
        emb_prefix = "" if i == 0 or not cfg.per_block_cond else f"block_cond.{i - 1}."
        for suffix in (".weight", ".bias"):
            qkv = ours[f"blocks.{i}.attn.qkv{suffix}"]
            for j, n in enumerate("qkv"):
                state[f"{pre}attn1.to_{n}{suffix}"] = qkv[j * d : (j + 1) * d]
            for o, theirs in _DIFFUSERS_BLOCK_MAP.items():
                state[pre + theirs + suffix] = ours[f"blocks.{i}.{o}{suffix}"]
            for o, theirs in _DIFFUSERS_EMBED_MAP.items():
                state[f"{pre}norm1.emb.{theirs}{suffix}"] = ours[f"{emb_prefix}{o}{suffix}"]
        state[f"{pre}norm1.emb.class_embedder.embedding_table.weight"] = ours[
            f"{emb_prefix}y_embedder.embedding_table.weight"
        ]
    return write_diffusers_model(out, state, DIFFUSERS_CLASS, {
        "num_attention_heads": cfg.num_heads, "attention_head_dim": d // cfg.num_heads,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth,
        "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": cfg.latent_hw[0],
        "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": cfg.num_classes,
        "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": cfg.mlp_norm_eps,
    }, overwrite)


# --------------------------------------------------------------------------------------------
# one entry point
# --------------------------------------------------------------------------------------------


