"""Reading and writing DiT checkpoints in the formats users hold.

* official DiT ``.pt`` files (https://github.com/facebookresearch/DiT): a bare EMA state dict as
  released (``DiT-XL-2-256x256.pt``) or a training checkpoint ``{"model", "ema", "opt", "args"}``;
* diffusers ``DiTTransformer2DModel`` directories (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), key names from diffusers'
  ``scripts/convert_dit_to_diffusers.py`` and ``models/transformers/dit_transformer_2d.py``;
* the SparseDiT authors' ``.pt`` files (https://github.com/changsn/SparseDiT; :mod:`sparsedit.authors`);
* sparsedit directories (:mod:`sparsedit.checkpoint`).

Every converter pops each source key it uses and fails, naming the keys, if anything is left over
or anything the model needs is missing (diffusers' own converter silently drops ``pos_embed``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sparsedit.checkpoint import (
    CONFIG_NAME,
    DIFFUSERS_SIZE_FIELDS,
    check_json_fields,
    check_output_dir,
    load_pretrained,
    load_state_strict,
    read_json,
    read_safetensors,
    save_pretrained,
    write_dir,
    write_json,
    write_safetensors,
)
from sparsedit.dit import DIT_SIZES, DiT, DiTConfig, dit_config
from sparsedit.errors import CheckpointError, SparseditError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# save_model's formats: sparsedit directories, diffusers directories, the SparseDiT authors' .pt files.
EXPORT_FORMATS = ("sparsedit", "diffusers", "official-sparsedit")
DIFFUSERS_CLASS = "DiTTransformer2DModel"

ModelT = TypeVar("ModelT", bound=nn.Module)

# hidden size -> number of heads of the released sizes (heads cannot be read off tensor shapes).
_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}


class _Source:
    """A state dict being consumed: ``take`` pops keys, ``finish`` asserts nothing is left."""

    def __init__(self, state: dict[str, Tensor], name: str):
        self.state = dict(state)
        self.name = name

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.name}: missing key {key!r}; the checkpoint is incomplete")
        return self.state.pop(key)

    def has(self, key: str) -> bool:
        return key in self.state

    def finish(self) -> None:
        if self.state:
            keys = sorted(self.state)
            more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
            raise CheckpointError(
                f"{self.name}: {len(keys)} key(s) not used by the model: {', '.join(keys[:6])}{more}; "
                "the checkpoint is a different architecture"
            )


# --------------------------------------------------------------------------------------------
# official DiT
# --------------------------------------------------------------------------------------------


def read_torch_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; argparse.Namespace (DiT's ``args``) is allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; check the path") from None
    # The weights-only unpickler raises assorted errors on non-checkpoint bytes (KeyError, IndexError, ...).
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, KeyError, IndexError, ValueError,
            OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({first[:160]}); the file is truncated, "
            "not a checkpoint, or holds objects that are unsafe to unpickle"
        ) from None


def _pick_state_dict(obj: Any, path: Path, use_ema: bool) -> dict[str, Tensor]:
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = "ema" if use_ema and "ema" in obj else "model"
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (nor a training dict with "
                              "'model'/'ema')")
    odd = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{path} does not hold a state dict: {odd!r} is a {type(obj[odd]).__name__}, not a "
                              "tensor (nor is it a training dict with 'model'/'ema')")
    return obj


def _found(state: dict[str, Tensor]) -> str:
    """The top-level module names of a state dict, for errors that say what a file holds."""
    names = sorted({str(k).split(".")[0] for k in state})
    more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
    return ", ".join(names[:8]) + more if names else "nothing"


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
            f"{name} is not a checkpoint sparsedit reads: its {len(state)} tensors are under {_found(state)}, not an "
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
    src = _Source(state, name)
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


def _read_diffusers_weights(path: Path) -> dict[str, Tensor]:
    single = path / DIFFUSERS_WEIGHTS
    index = path / f"{DIFFUSERS_WEIGHTS}.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():  # sharded: {"weight_map": {key: shard file}}
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of key -> shard file; the index is damaged")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # a shard outside the directory is no part of this checkpoint
                raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file of {path}; the index is "
                                      "damaged")
            state.update(read_safetensors(path / shard))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise CheckpointError(f"{index} lists {', '.join(absent[:3])} but no shard holds it; the checkpoint is "
                                  "incomplete")
        return state
    if (path / "diffusion_pytorch_model.bin").exists():
        return _pick_state_dict(read_torch_file(path / "diffusion_pytorch_model.bin"), path, use_ema=False)
    raise CheckpointError(f"{path} has no {DIFFUSERS_WEIGHTS}; the diffusers directory is incomplete")


def _diffusers_model_dir(path: Path) -> Path:
    """``path`` itself, or its ``transformer/`` folder when ``path`` is a pipeline directory."""
    if (path / "transformer" / CONFIG_NAME).exists() and not (path / CONFIG_NAME).exists():
        return path / "transformer"
    return path


def load_mapped(model: ModelT, src: _Source, key_map: dict[str, list[str]]) -> ModelT:
    """Fill ``model`` from ``src``: ours <- theirs (several: concatenated on dim 0).

    Strict both ways: every model tensor is loaded and every source tensor is used. Returns the model in eval mode.
    """
    state = {ours: torch.cat([src.take(k) for k in theirs]) if len(theirs) > 1 else src.take(theirs[0])
             for ours, theirs in key_map.items()}
    load_state_strict(model, state, src.name)
    src.finish()
    return model.eval()


def _load_diffusers_mapped(model: ModelT, path: Path, key_map: dict[str, list[str]]) -> ModelT:
    """:func:`load_mapped` from the diffusers weights in ``path``."""
    return load_mapped(model, _Source(_read_diffusers_weights(path), str(path)), key_map)


def check_exportable(model: nn.Module, dense_cls: type[nn.Module], diffusers_class: str) -> None:
    """Refuse what no diffusers class can hold: a sparse model, a non-square latent, an MLP ratio other than 4,
    a caption padding bias other than diffusers' -10000 (exact masking exports with a note, see export_differences)."""
    if type(model) is not dense_cls:
        raise SparseditError(
            f"only a dense {dense_cls.__name__} exports to diffusers: a {type(model).__name__} has no diffusers class; "
            "save it with --to sparsedit (or export its dense source)"
        )
    cfg = model.config
    if cfg.latent_hw[0] != cfg.latent_hw[1]:
        raise SparseditError(f"diffusers' {diffusers_class} only supports square inputs; export to sparsedit instead")
    if cfg.mlp_ratio != 4.0:
        raise SparseditError(f"diffusers' {diffusers_class} has an MLP ratio of 4, not {cfg.mlp_ratio}; export to sparsedit")
    bias = getattr(cfg, "text_mask_bias", None)  # PixArt / Latte-T2V
    if bias not in (None, -10000.0):
        raise SparseditError(f"diffusers masks padded caption tokens with -10000, not {bias}; export to sparsedit")


def diffusers_state(ours: dict[str, Tensor], key_map: dict[str, list[str]],
                    dropped: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The inverse of :func:`_load_diffusers_mapped`: split every tensor into the diffusers tensors it is made of.

    A fused tensor (q/k/v) splits into equal parts along dim 0. Every key of ``ours`` must be mapped
    or listed in ``dropped``, so an export never loses a tensor silently.
    """
    left = sorted(set(ours) - set(key_map) - set(dropped))
    if left:
        raise SparseditError(f"the diffusers format has no place for {', '.join(left[:6])}; export to sparsedit")
    return {name: part for key, theirs in key_map.items()
            for name, part in zip(theirs, ours[key].chunk(len(theirs)), strict=True)}


def write_diffusers_model(out: str | Path, state: dict[str, Tensor], class_name: str, fields: dict[str, Any],
                          overwrite: bool = False) -> Path:
    """Write a diffusers model directory: weights, then ``config.json`` (it marks a complete checkpoint).

    All or nothing: the directory is written beside ``out`` and swapped in whole; an existing checkpoint in
    ``out`` is only replaced with ``overwrite``.
    """
    from sparsedit import __version__

    out = check_output_dir(out, overwrite, owned=(CONFIG_NAME, DIFFUSERS_WEIGHTS))

    def write(tmp: Path) -> None:
        write_safetensors(tmp / DIFFUSERS_WEIGHTS, state, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, {"_class_name": class_name, "_diffusers_version": "0.30.0",
                                       "_sparsedit_version": __version__, **fields})

    write_dir(out, write)
    return out


def dit_from_diffusers(path: str | Path) -> DiT:
    """Load a diffusers ``DiTTransformer2DModel`` directory (or its parent pipeline directory)."""
    path = _diffusers_model_dir(Path(path))  # a DiTPipeline directory holds it in transformer/
    name = str(path)
    fields = _diffusers_config(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    src = _Source(_read_diffusers_weights(path), name)
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
    change, which :func:`export_differences` reports.
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


def export_differences(config: Any) -> list[str]:
    """Numerical settings that a diffusers export cannot keep (empty when exact); any model family's config."""
    if not isinstance(config, DiTConfig):  # PixArt / Latte: diffusers masks caption padding with a -10000 bias
        if getattr(config, "text_mask_bias", -10000.0) is None:
            return ["caption padding: excluded exactly -> a -10000 logit bias (diffusers; equal unless logits reach ~1e4)"]
        return []
    notes = []
    if config.t_freq_shift != 1.0:
        notes.append(f"timestep frequency shift {config.t_freq_shift:g} -> 1 (diffusers' Timesteps)")
    if config.norm_eps != 1e-6:
        notes.append(f"attention norm eps {config.norm_eps:g} -> 1e-06")
    return notes


# --------------------------------------------------------------------------------------------
# one entry point
# --------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """"sparsedit", "diffusers", "pixart-diffusers", "latte-diffusers" or "official" for a path, or a CheckpointError saying why not.

    "official" is any single file: a DiT ``.pt`` or a PixArt ``.pth``, told apart by their keys on loading.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a DiT .pt file, a diffusers directory or a sparsedit directory")
    if path.is_dir():
        cfg_path = _diffusers_model_dir(path) / CONFIG_NAME
        if not cfg_path.exists():
            raise CheckpointError(f"{path} has no config.json; it is neither a sparsedit nor a diffusers checkpoint")
        cfg = read_json(cfg_path)
        if "_class_name" in cfg:
            from sparsedit.latte import is_latte_diffusers_config
            from sparsedit.pixart_convert import is_pixart_diffusers_config

            if is_latte_diffusers_config(cfg):
                return "latte-diffusers"
            return "pixart-diffusers" if is_pixart_diffusers_config(cfg) else "diffusers"
        if "model_type" in cfg:
            return "sparsedit"
        raise CheckpointError(f"{cfg_path} names neither a model_type (sparsedit) nor a _class_name (diffusers)")
    if not path.is_file():  # a FIFO or a device would block the reader or stream forever
        raise CheckpointError(f"{path} is not a regular file (a pipe or a device?); pass the checkpoint file itself")
    return "official"


def _load_single_file(path: Path, preset: str | None, image_size: int | None, use_ema: bool,
                      semantic_size: int | tuple[int, int] | None) -> nn.Module:
    """An official DiT, SparseDiT authors' or original PixArt-alpha file, told apart by its keys."""
    from sparsedit.authors import is_authors_checkpoint, sparse_dit_from_authors
    from sparsedit.pixart_convert import is_pixart_state, pick_pixart_state, pixart_from_original_state

    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if is_authors_checkpoint(obj):
        return sparse_dit_from_authors(obj, str(path), use_ema=use_ema, preset=preset, image_size=image_size,
                                       semantic_size=semantic_size)
    if semantic_size is not None:
        raise SparseditError(f"semantic_size (--semantic-size) applies to the SparseDiT authors' .pt files only, and "
                             f"{path} is not one; drop it")
    if is_pixart_state(obj):  # original PixArt-alpha: {"state_dict": ...} with t_block / y_embedder keys
        return pixart_from_original_state(pick_pixart_state(obj, str(path), use_ema), image_size, name=str(path))
    state = obj if path.suffix == ".safetensors" else _pick_state_dict(obj, path, use_ema)
    return dit_from_official_state(state, preset, image_size, str(path))


def load_model(
    path: str | Path,
    model: str | None = None,
    image_size: int | None = None,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    semantic_size: int | tuple[int, int] | None = None,
) -> nn.Module:
    """Load any supported checkpoint and return the model in eval mode.

    ``path``: an official DiT ``.pt`` (bare state dict or training dict, EMA weights by default), a
    SparseDiT authors' ``.pt`` (https://github.com/changsn/SparseDiT: their ``train.py``'s training
    dict or a bare state dict; a :class:`SparseDiT` at their fixed grid, see :mod:`sparsedit.authors`),
    a diffusers ``DiTTransformer2DModel`` directory, an original PixArt-alpha ``.pth``, a diffusers
    ``PixArtTransformer2DModel`` (or PixArt pipeline) directory, a diffusers ``LatteTransformer3DModel``
    (or Latte pipeline) directory, or a sparsedit directory. ``model`` (a preset such
    as ``"DiT-XL/2"``) and ``image_size`` are only needed when the file cannot tell; ``semantic_size``
    sets the SparseDiT authors' sparse grid side (default: their file's ``args``, else 8, their training default).
    """
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise SparseditError(f"load_model takes the path of a checkpoint (a str or Path), not {path!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise SparseditError(f"dtype must be a torch.dtype such as torch.bfloat16, not {dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise SparseditError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    path = Path(path)
    kind = detect_format(path)
    if kind == "official":
        net = _load_single_file(path, model, image_size, use_ema, semantic_size)
    elif semantic_size is not None:
        raise SparseditError(f"semantic_size (--semantic-size) applies to the SparseDiT authors' .pt files only, not "
                             f"to the {kind} directory {path}; drop it")
    elif kind == "sparsedit":
        net = load_pretrained(path)
    elif kind == "diffusers":
        net = dit_from_diffusers(path)
    elif kind == "pixart-diffusers":
        from sparsedit.pixart_convert import pixart_from_diffusers

        net = pixart_from_diffusers(path)
    else:
        from sparsedit.latte import latte_from_diffusers

        net = latte_from_diffusers(path)
    if device is not None or dtype is not None:
        net = net.to(device=device, dtype=dtype)
    return net.eval()


def save_model(model: nn.Module, out: str | Path, fmt: str = "sparsedit", overwrite: bool = False,
               drop_null_caption: bool = False) -> Path:
    """Export ``model`` as ``fmt`` ("sparsedit", "diffusers" or "official-sparsedit").

    diffusers holds dense models only: a DiT (``DiTTransformer2DModel``), a PixArt
    (``PixArtTransformer2DModel``; ``drop_null_caption`` allows dropping an original checkpoint's null
    caption, which diffusers has no slot for) or a text-conditional Latte (``LatteTransformer3DModel``).
    "official-sparsedit" writes a SparseDiT as the authors' ``.pt`` file ``out`` (:func:`sparsedit.authors.save_authors`).
    """
    if fmt == "sparsedit":
        return save_pretrained(model, out, overwrite)
    if fmt == "official-sparsedit":
        from sparsedit.authors import save_authors

        return save_authors(model, out, overwrite)  # type: ignore[arg-type]  # refuses anything but a SparseDiT
    if fmt != "diffusers":
        raise SparseditError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    from sparsedit.latte import Latte, save_latte_diffusers
    from sparsedit.pixart import PixArt
    from sparsedit.pixart_convert import save_pixart_diffusers

    if isinstance(model, PixArt):
        return save_pixart_diffusers(model, out, overwrite, drop_null_caption)
    if drop_null_caption:
        raise SparseditError(f"drop_null_caption (--drop-null-caption) is for PixArt; a {type(model).__name__} has no "
                             "null caption: drop it")
    if isinstance(model, Latte):
        return save_latte_diffusers(model, out, overwrite)
    if isinstance(model, DiT):
        return save_diffusers(model, out, overwrite)
    raise SparseditError(f"a {type(model).__name__} has no diffusers format; use --to sparsedit")
