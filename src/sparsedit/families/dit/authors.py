"""Checkpoints of the SparseDiT authors' code (https://github.com/changsn/SparseDiT): import and export.

Their ``models.py`` builds the network of :class:`sparsedit.families.dit.sparse.SparseDiT` under other module names,
with one fixed sparse grid (``semantic_size`` x ``semantic_size``) and two variant choices, which the
imported config records: no position table re-added at recovery (``recovery_pos_embed=False``) and extra
recovery blocks that repeat the whole recovery block (``extra_recovery="repeat"``). Their ``train.py``
saves ``{"model", "ema", "opt", "args"}`` (``args`` an ``argparse.Namespace``); their ``sample_ddp.py``
reads ``ckpt["ema"]`` or a bare state dict.

Their layer names, in forward order, and ours (layer i is ``blocks.{i}``)::

    poolingformer_blocks.{j}                         pool         same tensor names
    dumbbell_blocks.{k}.token_merge_blocks.{j}       gen, gen+    attn.q + attn.kv (rows stacked) = attn.qkv
    dumbbell_blocks.{k}.semantic_blocks.{j}          sparse       same tensor names
    dumbbell_blocks.{k}.token_recover_blocks.{j}     recover(*)   attn.q + attn.kv = attn.qkv;
                                                                  merged_layer1 = merge_sparse (W1),
                                                                  merged_layer2 = merge_dense (W2)
    dumbbell_blocks.{k}.normal_blocks.{j}            dense        same tensor names
    normal_blocks.{j}                                top          same tensor names

The embedders and ``final_layer`` keep DiT's names; ``pos_embed`` is stored and must be the 2-D sin-cos
table. docs/official.md lists every difference between the paper, their code and ours.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedit.core.checkpoint import atomic_write, check_output_file
from sparsedit.core.formats import Source, load_mapped, pick_state_dict
from sparsedit.core.layers import sincos_pos_embed_2d
from sparsedit.core.layout import Layout, layout_fields
from sparsedit.core.schedule import rate_for_grid
from sparsedit.encoders.vae import VAE_DOWNSAMPLE
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.dit.convert import _HEADS_BY_WIDTH
from sparsedit.families.dit.model import DIT_SIZES
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig

AUTHORS_REPO = "https://github.com/changsn/SparseDiT"
# The four parts of their SDTM ("dumbbell"), in the order of their ``dumbbell_group`` = (g, s, r, d).
GROUPS = ("token_merge_blocks", "semantic_blocks", "token_recover_blocks", "normal_blocks")
_BLOCK_PREFIXES = ("poolingformer_blocks.", "dumbbell_blocks.", "normal_blocks.")
# Their train.py's and sample_ddp.py's default, used when a bare state dict does not say (their
# sample.py defaults to 16 instead: a model trained at 8 then runs at another grid).
DEFAULT_SEMANTIC_SIZE = 8
# Kinds whose attention is their CrossAttention: ``attn.q`` (D rows) and ``attn.kv`` (2D rows: k, then v).
_CROSS_KINDS = frozenset({"gen", "gen+", "recover", "recover*"})
_MERGE_NAMES = {"merge_sparse": "merged_layer1", "merge_dense": "merged_layer2"}
# What their models.py fixes: DiT's official numerics and nearest upsampling.
_THEIR_SETTINGS: dict[str, Any] = {"t_freq_shift": 0.0, "norm_eps": 1e-6, "mlp_norm_eps": 1e-6,
                                   "per_block_cond": False, "upsample": "nearest"}

Grid = tuple[int, int]


# --------------------------------------------------------------------------------------------
# recognising and unpacking their files
# --------------------------------------------------------------------------------------------


def is_authors_checkpoint(obj: Any) -> bool:
    """True for a bare state dict or a training dict whose tensors carry the authors' block names."""
    if not isinstance(obj, dict):
        return False
    state = obj.get("ema", obj.get("model", obj))
    return isinstance(state, dict) and any(isinstance(k, str) and k.startswith(_BLOCK_PREFIXES) for k in state)


def authors_state_and_args(obj: dict, name: str, use_ema: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, ``args`` as a plain dict; empty for a bare state dict) of one of their files."""
    state = pick_state_dict(obj, Path(name), use_ema)
    raw = obj.get("args") if ("ema" in obj or "model" in obj) else None
    if raw is None:
        return state, {}
    if isinstance(raw, argparse.Namespace):
        return state, vars(raw)
    if isinstance(raw, dict):
        return state, dict(raw)
    raise CheckpointError(f"{name}: 'args' is a {type(raw).__name__}, not their train.py's argparse.Namespace")


# --------------------------------------------------------------------------------------------
# their config, read off the tensors and args
# --------------------------------------------------------------------------------------------


def _count(state: dict[str, Tensor], prefix: str, name: str) -> int:
    """How many modules ``{prefix}0 .. {prefix}n-1`` the state holds (0 if none)."""
    found = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    if not all(i.isdigit() for i in found):
        raise CheckpointError(f"{name}: keys under {prefix[:-1]} are not numbered modules ({sorted(found)[:4]})")
    indices = sorted(int(i) for i in found)
    if indices != list(range(len(indices))):
        raise CheckpointError(f"{name}: {prefix}{{i}} has indices {indices}, not 0..{len(indices) - 1}; "
                              "the checkpoint is incomplete")
    return len(indices)


def infer_layout(state: dict[str, Tensor], args: dict[str, Any], name: str) -> Layout:
    """P, K, (g, s, r, d), T from the module indices; checked against ``args`` when present."""
    pool = _count(state, "poolingformer_blocks.", name)
    sdtm = _count(state, "dumbbell_blocks.", name)
    top = _count(state, "normal_blocks.", name)
    groups = {tuple(_count(state, f"dumbbell_blocks.{k}.{part}.", name) for part in GROUPS) for k in range(sdtm)}
    if len(groups) > 1:
        raise CheckpointError(f"{name}: the dumbbell blocks differ in their parts {sorted(groups)}; their code "
                              "builds every dumbbell with one dumbbell_group")
    if groups:
        gen, sparse, recovery, dense = groups.pop()
    else:  # without SDTMs the group is not in the tensors; keep args' so that an export writes it back
        given = _as_list(args.get("dumbbell_group"))
        ok = isinstance(given, list) and len(given) == 4 and all(isinstance(v, int) and v >= 0 for v in given)
        gen, sparse, recovery, dense = given if ok else (0, 0, 0, 0)
    found: dict[str, Any] = {"num_poolingformer": pool, "num_dumbbell": sdtm, "num_normal_block": top}
    if sdtm:
        found["dumbbell_group"] = [gen, sparse, recovery, dense]
    for key, value in found.items():
        if key in args and _as_list(args[key]) != _as_list(value):
            raise CheckpointError(f"{name}: args.{key} is {args[key]} but the weights hold {value}; the args "
                                  "belong to another model")
    if sdtm and (gen < 1 or recovery < 1):
        raise CheckpointError(
            f"{name}: dumbbell_group {[gen, sparse, recovery, dense]} has no token-merge or no recovery block; "
            "sparsedit's SDTM needs at least one of each"
        )
    return Layout(pool, sdtm, gen, sparse, recovery, dense, top)


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _num_heads(hidden: int, args: dict[str, Any], preset: str | None, num_heads: int | None, name: str) -> int:
    """Heads are not in the tensors: ``num_heads``, then args (ours), then a preset name, then the released widths."""
    if num_heads is not None:
        return num_heads
    if "num_heads" in args:  # written by our export
        return int(args["num_heads"])
    preset = preset or args.get("model")
    if preset:
        size = str(preset).split("/")[0]
        if size not in DIT_SIZES:
            raise CheckpointError(f"{name}: unknown model preset {preset!r}; name one of {', '.join(DIT_SIZES)} "
                                  "(with /2, /4 or /8)")
        _, width, heads = DIT_SIZES[size]
        if width != hidden:
            raise CheckpointError(f"{name} has hidden size {hidden}, not {preset}'s {width}; name the right preset")
        return heads
    if hidden in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[hidden]
    raise CheckpointError(
        f"{name}: hidden size {hidden} is not a released DiT width ({', '.join(map(str, sorted(_HEADS_BY_WIDTH)))}) "
        "and the file has no args, so the number of heads is unknown; pass num_heads"
    )


def _dense_grid(pos: Tensor | None, hidden: int, side: int | None, patch: int, name: str) -> Grid:
    """The token grid whose 2-D sin-cos table ``pos_embed`` holds (square first: their code runs only squares)."""
    if pos is None or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden:
        raise CheckpointError(f"{name} has no pos_embed of shape (1, N, {hidden}); their models store it, so the "
                              "checkpoint is incomplete")
    if hidden % 4:
        raise CheckpointError(f"{name}: hidden size {hidden} is not a multiple of 4, so no 2-D sin-cos table fits it")
    n = pos.shape[1]
    candidates = sorted(((h, n // h) for h in range(1, n + 1) if n % h == 0), key=lambda g: abs(g[0] - g[1]))
    stored = pos[0].double()
    grid = next((g for g in candidates if torch.allclose(stored, sincos_pos_embed_2d(hidden, *g).double(),
                                                          atol=1e-5)), None)
    if grid is None:
        raise CheckpointError(f"{name}: pos_embed ({n} tokens) is not the 2-D sin-cos table of any grid of {n} "
                              "tokens; the checkpoint was not written by their models.py")
    if side is not None and grid != (side, side):
        raise CheckpointError(f"{name}: pos_embed is a {grid[0]}x{grid[1]} token grid, not the {side}x{side} of the "
                              f"image size ({side * patch * VAE_DOWNSAMPLE} px); pass the right image size")
    return grid


def _sparse_grid(value: Any, dense: Grid, name: str) -> tuple[Grid, float]:
    """Their fixed grid (``semantic_size`` s -> s x s, or (h, w)) and the constant rate that gives it."""
    if isinstance(value, int) and not isinstance(value, bool):
        grid = (value, value)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        grid = (int(value[0]), int(value[1]))
    else:
        raise CheckpointError(f"{name}: semantic_size {value!r} is neither an integer nor a pair (h, w)")
    try:
        return grid, rate_for_grid(grid, dense)
    except SparseditError as err:
        raise CheckpointError(f"{name}: semantic_size {value}: {err}") from None


def _refuse_unsupported(state: dict[str, Tensor], args: dict[str, Any], name: str) -> None:
    """Options of their code that sparsedit does not implement, named instead of a list of stray keys."""
    relat = args.get("attn_relat_pos")
    if relat is not None or any(key.startswith("relative_pos_embedder.") for key in state):
        raise CheckpointError(
            f"{name} was trained with attn_relat_pos={relat or 'relat'!r} (a position bias in the top blocks' "
            "attention), which sparsedit does not implement; only attn_relat_pos=None checkpoints import"
        )
    if args.get("use_longshortcut"):
        raise CheckpointError(f"{name} was trained with use_longshortcut=True, code their released models.py does "
                              "not contain; it cannot be reproduced")


def authors_config(state: dict[str, Tensor], args: dict[str, Any], name: str = "checkpoint", *,
                   preset: str | None = None, image_size: int | None = None,
                   semantic_size: int | tuple[int, int] | None = None, num_heads: int | None = None) -> SparseDiTConfig:
    """The :class:`SparseDiTConfig` that computes their model's forward at their fixed grid.

    Shapes give the width, channels, patch, depth, layout and classes; ``pos_embed`` the token grid;
    ``semantic_size`` (argument, else ``args``, else 8) the sparse grid, stored as the constant rate
    ``r_min = r_max`` that gives it; ``preset`` (``"DiT-XL/2"``) / ``num_heads`` / ``args`` the heads;
    ``image_size`` (pixels) is only checked against ``pos_embed``.
    """
    _refuse_unsupported(state, args, name)
    try:
        hidden, in_ch, patch, _ = state["x_embedder.proj.weight"].shape
        n_out = state["final_layer.linear.weight"].shape[0]
        rows = state["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(f"{name} has the authors' block names but not their x_embedder, final_layer and "
                              "y_embedder tensors; the checkpoint is incomplete") from None
    out_ch = n_out // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{name}: final layer gives {out_ch} channels for {in_ch} inputs; not their model")
    layout = infer_layout(state, args, name)
    fc1 = next((v for k, v in state.items() if k.endswith(".mlp.fc1.weight")), None)
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    size = image_size or args.get("image_size")
    side = None if size is None else int(size) // VAE_DOWNSAMPLE // patch
    dense = _dense_grid(state.get("pos_embed"), hidden, side, patch, name)
    classes = args.get("num_classes", rows - 1)
    if rows not in (classes, classes + 1):
        raise CheckpointError(f"{name}: args.num_classes is {classes} but the label table has {rows} rows")
    sparse, rate = _sparse_grid(semantic_size if semantic_size is not None
                                else args.get("semantic_size", DEFAULT_SEMANTIC_SIZE), dense, name)
    latent = (dense[0] * patch, dense[1] * patch)
    return SparseDiTConfig(
        input_size=latent[0] if latent[0] == latent[1] else latent, patch_size=patch, in_channels=in_ch,
        hidden_size=hidden, depth=layout.depth, num_heads=_num_heads(hidden, args, preset, num_heads, name),
        mlp_ratio=mlp_ratio, num_classes=classes, class_dropout_prob=0.1 if rows == classes + 1 else 0.0,
        learn_sigma=out_ch == 2 * in_ch, **layout_fields(layout), r_min=rate, r_max=rate,
        recovery_pos_embed=False, extra_recovery="repeat",
    )


# --------------------------------------------------------------------------------------------
# the tensor mapping, both ways
# --------------------------------------------------------------------------------------------


def layer_names(layout: Layout) -> list[str]:
    """Their module path of each of our layers ``blocks.{i}``, in forward order."""
    names = [f"poolingformer_blocks.{j}" for j in range(layout.pool)]
    counts = (layout.gen, layout.sparse, layout.recovery, layout.dense)
    for k in range(layout.sdtm):
        for part, n in zip(GROUPS, counts, strict=True):
            names += [f"dumbbell_blocks.{k}.{part}.{j}" for j in range(n)]
    return names + [f"normal_blocks.{j}" for j in range(layout.top)]


def authors_key_map(model: SparseDiT) -> dict[str, list[str]]:
    """Every tensor of ``model`` -> the tensors of theirs it is made of (``attn.qkv`` <- ``attn.q``, ``attn.kv``)."""
    names = layer_names(model.config.layout)
    out: dict[str, list[str]] = {}
    for key in model.state_dict():
        if not key.startswith("blocks."):
            out[key] = [key]  # embedders and final layer: DiT's names
            continue
        _, index, rest = key.split(".", 2)
        layer, kind = names[int(index)], model.kinds[int(index)]
        if kind == "recover+":
            raise SparseditError("extra recovery blocks of kind 'cross' have no counterpart in the authors' code (it "
                                 "repeats the recovery block: extra_recovery='repeat')")
        module, _, suffix = rest.rpartition(".")  # e.g. ("attn.qkv", "weight")
        if kind in _CROSS_KINDS and module == "attn.qkv":
            out[key] = [f"{layer}.attn.q.{suffix}", f"{layer}.attn.kv.{suffix}"]
        else:
            out[key] = [f"{layer}.{_MERGE_NAMES.get(module, module)}.{suffix}"]
    return out


def sparse_dit_from_authors(obj: dict, name: str = "checkpoint", *, use_ema: bool = True, preset: str | None = None,
                            image_size: int | None = None, semantic_size: int | tuple[int, int] | None = None,
                            num_heads: int | None = None) -> SparseDiT:
    """Build the :class:`SparseDiT` of one of their files (training dict or bare state dict), every key consumed.

    Its forward equals theirs at their grid: the config holds the constant rate of that grid,
    ``recovery_pos_embed=False`` and ``extra_recovery="repeat"``. Options as :func:`authors_config`;
    ``use_ema`` picks ``ema`` (default) or ``model`` of a training dict. Returned in eval mode.
    """
    state, args = authors_state_and_args(obj, name, use_ema)
    config = authors_config(state, args, name, preset=preset, image_size=image_size, semantic_size=semantic_size,
                            num_heads=num_heads)
    model = SparseDiT(config)
    src = Source(state, name)
    src.take("pos_embed")  # already checked: it gave the token grid
    return load_mapped(model, src, authors_key_map(model))


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def authors_semantic_size(model: SparseDiT) -> int:
    """Their ``semantic_size`` for ``model``, or a :class:`SparseditError` naming what their code cannot express."""
    if type(model) is not SparseDiT:
        raise SparseditError(f"only a SparseDiT exports to the authors' layout; their code has no "
                             f"{type(model).__name__}: save it with --to sparsedit")
    cfg = model.config
    if cfg.recovery_pos_embed:
        raise SparseditError("this model re-adds the position table at recovery (recovery_pos_embed=true) and the "
                             "authors' code does not, so their forward would differ; only models built with "
                             "recovery_pos_embed=false export")
    if cfg.num_sdtm and cfg.recovery_blocks > 1 and cfg.extra_recovery != "repeat":
        raise SparseditError("this model's extra recovery blocks cross-attend to the sparse tokens "
                             "(extra_recovery='cross'); the authors' code repeats the recovery block instead")
    for key, want in _THEIR_SETTINGS.items():
        if getattr(cfg, key) != want:
            raise SparseditError(f"{key}={getattr(cfg, key)!r} is fixed to {want!r} in the authors' models.py; "
                                 "save this model with --to sparsedit")
    H, W = cfg.grid
    if H != W:
        raise SparseditError(f"the authors' code runs square token grids only, not {H}x{W}; save with --to sparsedit")
    first, last = cfg.schedule.grid(0, (H, W)), cfg.schedule.grid(cfg.num_timesteps - 1, (H, W))
    if first != last:
        raise SparseditError(f"the authors' code runs one fixed sparse grid; this model's schedule uses {last[0]}x"
                             f"{last[1]} .. {first[0]}x{first[1]}: pass --r-min R --r-max R with one rate R")
    return first[0]


def authors_preset(config: SparseDiTConfig) -> str | None:
    """Their ``--model`` name (``DiT-XL/2``, ...) for the size of ``config``, or None when none fits."""
    for size, (depth, hidden, heads) in DIT_SIZES.items():
        if (depth, hidden, heads, config.mlp_ratio) == (config.depth, config.hidden_size, config.num_heads, 4.0) \
                and config.patch_size in (2, 4, 8):
            return f"{size}/{config.patch_size}"
    return None


def authors_args(model: SparseDiT) -> argparse.Namespace:
    """The ``args`` their train.py would have saved for ``model`` (plus ``num_heads``, which their files lack)."""
    cfg = model.config
    lay = cfg.layout
    return argparse.Namespace(
        model=authors_preset(cfg), image_size=cfg.latent_hw[0] * VAE_DOWNSAMPLE, num_classes=cfg.num_classes,
        num_poolingformer=lay.pool, num_dumbbell=lay.sdtm, num_normal_block=lay.top,
        semantic_size=authors_semantic_size(model), dumbbell_group=[lay.gen, lay.sparse, lay.recovery, lay.dense],
        attn_relat_pos=None, temp=1.0, drop_path=0.0, use_checkpoint=False, num_heads=cfg.num_heads,
    )


def authors_state_dict(model: SparseDiT) -> dict[str, Tensor]:
    """``model``'s weights under their names (``attn.qkv`` split into ``attn.q`` and ``attn.kv``; ``pos_embed`` stored)."""
    authors_semantic_size(model)  # refuses what their code cannot express
    d = model.config.hidden_size
    ours = model.state_dict()
    state: dict[str, Tensor] = {}
    for key, theirs in authors_key_map(model).items():
        parts = ours[key].split([d, 2 * d]) if len(theirs) == 2 else (ours[key],)  # q: D rows, kv: 2D rows
        state.update({name: part.detach().clone() for name, part in zip(theirs, parts, strict=True)})
    state["pos_embed"] = model.pos_embed.detach().clone()
    return state


def save_authors(model: SparseDiT, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``{"ema": state dict, "args": Namespace}`` to the ``.pt`` file ``out`` (atomic).

    Their ``sample_ddp.py`` / ``sample.py`` read ``ckpt["ema"]``; ``args`` lets ``load_model`` rebuild
    the model with no flags. An existing file is only replaced with ``overwrite``.
    """
    out = check_output_file(str(out), "output", (".pt", ".pth"), overwrite)  # one .pt file, as their code reads
    if isinstance(model, SparseDiT) and model.config.data_space != "latent":
        # Their code and file hold no data space: a pixel model would come back as a latent one.
        raise SparseditError("the authors' format is for latent models (their code samples through the SD VAE); this "
                             "model works in pixels: save it with --to sparsedit")
    ckpt = {"ema": authors_state_dict(model), "args": authors_args(model)}
    atomic_write(out, lambda tmp: torch.save(ckpt, tmp))
    return out


def authors_sample_command(model: SparseDiT, ckpt: str | Path) -> str:
    """The ``sample_ddp.py`` command line that builds ``model`` in their code and loads ``ckpt``."""
    args = authors_args(model)
    group = " ".join(map(str, args.dumbbell_group))
    return (f"torchrun --nproc_per_node=N sample_ddp.py --ckpt {ckpt} --model {args.model or 'PRESET'} "
            f"--image-size {args.image_size} --num-classes {args.num_classes} --num_poolingformer "
            f"{args.num_poolingformer} --num_dumbbell {args.num_dumbbell} --num_normal_block {args.num_normal_block} "
            f"--semantic_size {args.semantic_size} --dumbbell_group {group}")


def authors_notes(model: SparseDiT) -> list[str]:
    """What a user of their scripts must do besides passing the flags of :func:`authors_sample_command`."""
    cfg = model.config
    notes = ["their DiT.forward reads model.longshortcut, which their __init__ never sets: set "
             "model.longshortcut = False after building the model"]
    if authors_preset(cfg) is None:
        notes.append(f"no DiT_models preset has depth {cfg.depth}, width {cfg.hidden_size}, {cfg.num_heads} heads, "
                     f"MLP ratio {cfg.mlp_ratio:g}: build models.DiT(depth=..., hidden_size=..., num_heads=..., "
                     "patch_size=..., mlp_ratio=...) instead of DiT_models[--model]")
    if cfg.latent_hw[0] * VAE_DOWNSAMPLE not in (256, 512):
        notes.append("their sample_ddp.py accepts --image-size 256 or 512 only")
    if not cfg.learn_sigma:
        notes.append("the model has no learned variance: build it with learn_sigma=False and "
                     "create_diffusion(..., learn_sigma=False)")
    if cfg.class_dropout_prob <= 0:
        notes.append("the label table has no null class: build with class_dropout_prob=0 and sample with "
                     "--cfg-scale 1")
    if cfg.data_space != "latent":
        notes.append("the model denoises pixels, not VAE latents; their scripts decode with the SD VAE")
    return notes
