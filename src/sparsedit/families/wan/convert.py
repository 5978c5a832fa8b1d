"""Reading and writing Wan 2.1 / 2.2 transformer checkpoints.

* diffusers ``WanTransformer3DModel`` directories (single or sharded safetensors), or the pipeline directory holding
  one under ``transformer/`` (a Wan2.2-A14B pipeline: its high-noise expert; load ``transformer_2/`` by its path for the
  low-noise one); written back by :func:`save_wan_diffusers`. Key names from diffusers'
  ``models/transformers/transformer_wan.py`` and ``loaders/single_file_utils.py`` (``convert_wan_transformer_to_diffusers``);
* the original single files of the Wan team (``diffusion_pytorch_model*.safetensors`` of Wan-AI/Wan2.1-T2V-1.3B,
  ComfyUI's copies with ``model.diffusion_model.`` before every key), whose names are ours.

Every loader takes each source key once and fails, naming the key, if anything is missing or left over; the one
exception is ``attn2.norm_added_q.weight``, which some diffusers I2V files hold and no forward uses (diffusers ignores it
on loading too): it is taken and dropped. Models are built on the meta device and take the checkpoint's tensors (a 14 B
model is not initialised first) in the checkpoint's dtype, except that the tensors diffusers keeps in float32 when it
loads a model in a lower precision (:func:`keeps_fp32`) are float32: a bfloat16 file loads as
``WanTransformer3DModel.from_pretrained(..., torch_dtype=torch.bfloat16)`` loads it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedit.core.checkpoint import CONFIG_NAME, check_json_fields, load_state_strict, read_json
from sparsedit.core.formats import Source, diffusers_model_dir, read_diffusers_weights, write_diffusers_model
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.wan.model import QK_NORM, Wan, WanConfig

WAN_DIFFUSERS_CLASS = "WanTransformer3DModel"
ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI's single files
UNUSED_KEY = "attn2.norm_added_q.weight"  # in some diffusers I2V files; read by no forward

# ours (the original release's names) -> diffusers', by module prefix; the rest of a key is kept.
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_BLOCK = {  # inside blocks.i
    **{f"self_attn.{a}": f"attn1.{b}" for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                                                     ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    **{f"cross_attn.{a}": f"attn2.{b}" for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                                                      ("norm_q", "norm_q"), ("norm_k", "norm_k"), ("k_img", "add_k_proj"),
                                                      ("v_img", "add_v_proj"), ("norm_k_img", "norm_added_k"))},
    "norm3": "norm2",  # the cross-attention norm: norm3 in the original, norm2 in diffusers
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
# Diffusers' WanTransformer3DModel._keep_in_fp32_modules (time_embedder, scale_shift_table, norm1 / norm2 / norm3) in
# our names: the timestep MLP, every modulation table, the cross-attention norm and the image embedding's norms.
_KEEP_FP32 = re.compile(r"(time_embedding\..*|head\.modulation|blocks\.\d+\.(modulation|norm3\..*)|img_emb\.proj\.[04]\..*)")


def _renamed(rest: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return None


def diffusers_key(key: str) -> str:
    """Our (the original's) tensor name -> diffusers': ``blocks.3.self_attn.q.weight`` -> ``blocks.3.attn1.to_q.weight``."""
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        found = _renamed(rest, _BLOCK)
        found = None if found is None else f"blocks.{index}.{found}"
    else:
        found = _renamed(key, _TOP)
    if found is None:
        raise SparseditError(f"the diffusers format has no place for {key}; export to sparsedit")
    return found


def keeps_fp32(key: str) -> bool:
    """Whether diffusers keeps the tensor ``key`` (our name) in float32 when it loads a model in a lower precision."""
    return _KEEP_FP32.fullmatch(key) is not None


@torch.no_grad()
def cast_like_diffusers(model: Wan, dtype: torch.dtype) -> Wan:
    """Cast ``model`` in place as ``WanTransformer3DModel.from_pretrained(..., torch_dtype=dtype)`` loads it: every
    float tensor to ``dtype`` except those :func:`keeps_fp32` names, which become float32. Returns the model."""
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model


def _build(config: WanConfig, state: dict[str, Tensor], name: str) -> Wan:
    """A :class:`Wan` holding ``state``'s tensors: built on the meta device (nothing initialised), checked key by key
    and shape by shape (:func:`load_state_strict`), then given the tensors themselves, in the checkpoint's dtype (the
    :func:`keeps_fp32` tensors in float32)."""
    dtypes = {t.dtype for k, t in state.items() if t.is_floating_point() and not keeps_fp32(k)}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    if dtype.itemsize < 2:  # float8 copies of the release: compute in bfloat16
        dtype = torch.bfloat16
    # Each float tensor gets its own memory: safetensors hands out views into one buffer that are not 64-byte aligned,
    # and CPU matmul kernels round differently there (last-bit differences to diffusers, whose parameters are fresh
    # allocations). Non-float tensors stay as they are, so load_state_strict refuses them (they are not weights).
    state = {k: v.to(torch.float32 if keeps_fp32(k) else dtype, copy=True) if v.is_floating_point() else v
             for k, v in state.items()}
    with torch.device("meta"):
        model = Wan(config)
    with warnings.catch_warnings():  # the checks of load_state_strict; its copy into meta tensors is a no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        load_state_strict(model, state, name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _model_keys(config: WanConfig) -> list[str]:
    with torch.device("meta"):
        return list(Wan(config).state_dict())


# --------------------------------------------------------------------------------------------
# diffusers WanTransformer3DModel
# --------------------------------------------------------------------------------------------


def is_wan_diffusers_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("_class_name") == WAN_DIFFUSERS_CLASS


def wan_config_from_diffusers(cfg: dict[str, Any], name: str = "config.json") -> WanConfig:
    """Our config for a diffusers Wan ``config.json`` (defaults: ``WanTransformer3DModel``'s, i.e. a 14B model).

    The frame / image size is not in the file: 480p, 81 frames. ``qk_norm`` is not read: diffusers' attention
    RMS-normalises q and k across heads whatever it says, and so does ours.
    """
    if not is_wan_diffusers_config(cfg):
        raise CheckpointError(f"{name} describes a {cfg.get('_class_name')!r}, not a {WAN_DIFFUSERS_CLASS}")
    check_json_fields(cfg, name, positive_ints=("num_attention_heads", "attention_head_dim", "in_channels",
                                                "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers",
                                                "image_dim", "added_kv_proj_dim", "rope_max_seq_len",
                                                "pos_embed_seq_len"), numbers=("eps",))
    patch = cfg.get("patch_size", [1, 2, 2])
    if not (isinstance(patch, list | tuple) and len(patch) == 3 and all(isinstance(p, int) and p >= 1 for p in patch)
            and patch[1] == patch[2]):
        raise CheckpointError(f"{name}: patch_size must be [t, p, p] (three positive integers, square in space), got "
                              f"{patch!r}; fix the config file")
    norm = cfg.get("cross_attn_norm", True)
    if not isinstance(norm, bool):
        raise CheckpointError(f"{name}: cross_attn_norm must be true or false, got {norm!r}; fix the config file")
    heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
    in_channels = cfg.get("in_channels", 16)
    try:
        return WanConfig(
            patch_frames=patch[0], patch_size=patch[1], in_channels=in_channels,
            out_channels=cfg.get("out_channels") or in_channels, hidden_size=heads * head_dim, num_heads=heads,
            depth=cfg.get("num_layers", 40), ffn_dim=cfg.get("ffn_dim", 13824), caption_channels=cfg.get("text_dim", 4096),
            freq_dim=cfg.get("freq_dim", 256), cross_attn_norm=norm, eps=float(cfg.get("eps", 1e-6)),
            image_dim=cfg.get("image_dim"), added_kv_proj_dim=cfg.get("added_kv_proj_dim"),
            pos_embed_seq_len=cfg.get("pos_embed_seq_len"), rope_max_seq_len=cfg.get("rope_max_seq_len", 1024),
        )
    except SparseditError as err:
        raise CheckpointError(f"{name}: {err}") from None


def wan_state_from_diffusers(config: WanConfig, state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Our state dict from a diffusers one, consuming every key (an error names what is missing or left over)."""
    src = Source(state, name)
    ours = {key: src.take(diffusers_key(key)) for key in _model_keys(config)}
    for i in range(config.depth):
        if src.has(f"blocks.{i}.{UNUSED_KEY}"):
            src.take(f"blocks.{i}.{UNUSED_KEY}")
    src.finish()
    return ours


def wan_from_diffusers(path: str | Path) -> Wan:
    """Load a diffusers Wan transformer directory (or the ``transformer/`` of the pipeline directory above it)."""
    path = diffusers_model_dir(Path(path))
    config = wan_config_from_diffusers(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    state = wan_state_from_diffusers(config, read_diffusers_weights(path), str(path))
    return _build(config, state, str(path))


def diffusers_wan_fields(cfg: WanConfig) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` config of ``cfg`` (also the face's config)."""
    return {
        "patch_size": [cfg.patch_frames, cfg.patch_size, cfg.patch_size], "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "text_dim": cfg.caption_channels, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.depth,
        "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": QK_NORM, "eps": cfg.eps, "image_dim": cfg.image_dim,
        "added_kv_proj_dim": cfg.added_kv_proj_dim, "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": cfg.pos_embed_seq_len,
    }


def check_wan_exportable(model: Wan, target: str) -> None:
    """Refuse what ``target`` cannot hold: another model class (a sparse Wan)."""
    if type(model) is not Wan:
        raise SparseditError(f"only a dense Wan exports to {target}: a {type(model).__name__} has none; save it with "
                             "--to sparsedit")


def save_wan_diffusers(model: Wan, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``WanTransformer3DModel`` directory (the same tensors, in their dtypes)."""
    check_wan_exportable(model, f"diffusers' {WAN_DIFFUSERS_CLASS}")
    state = {diffusers_key(k): v for k, v in model.state_dict().items()}
    return write_diffusers_model(out, state, WAN_DIFFUSERS_CLASS, diffusers_wan_fields(model.config), overwrite)


# --------------------------------------------------------------------------------------------
# the original single files (the Wan team's release, ComfyUI's copies)
# --------------------------------------------------------------------------------------------


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    if state and all(isinstance(k, str) and k.startswith(ORIGINAL_PREFIX) for k in state):
        return {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items()}
    return state


def is_wan_original_state(obj: Any) -> bool:
    """True for a state dict in the original Wan layout (``blocks.0.self_attn.q``, ``head.modulation``)."""
    if not isinstance(obj, dict):
        return False
    keys = set(_strip_prefix({k: None for k in obj}))  # type: ignore[misc]
    return {"head.modulation", "blocks.0.self_attn.q.weight", "patch_embedding.weight"} <= keys


def infer_wan_config(state: dict[str, Tensor], head_dim: int = 128, name: str = "checkpoint") -> WanConfig:
    """Read a Wan config off the original tensor shapes (``state`` without a ComfyUI prefix).

    The head count is not stored: every release has 128 channels per head (``head_dim``).
    """
    try:
        hidden, in_channels, pt, p, _ = state["patch_embedding.weight"].shape
        ffn_dim = state["blocks.0.ffn.0.weight"].shape[0]
        text_dim = state["text_embedding.0.weight"].shape[1]
        freq_dim = state["time_embedding.0.weight"].shape[1]
        out = state["head.head.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(f"{name} is not an original Wan state dict (no patch_embedding / blocks / text_embedding "
                              "/ time_embedding / head)") from None
    image = state.get("img_emb.proj.1.weight")
    pos = state.get("img_emb.emb_pos")
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if hidden % head_dim or out % (pt * p * p):
        raise CheckpointError(f"{name}: hidden size {hidden} is not a multiple of {head_dim} channels per head, or the "
                              f"head's {out} outputs do not fill {pt}x{p}x{p} patches")
    try:
        return WanConfig(
            patch_frames=pt, patch_size=p, in_channels=in_channels, out_channels=out // (pt * p * p),
            hidden_size=hidden, num_heads=hidden // head_dim, depth=max(blocks) + 1, ffn_dim=ffn_dim,
            caption_channels=text_dim, freq_dim=freq_dim, cross_attn_norm="blocks.0.norm3.weight" in state,
            image_dim=None if image is None else image.shape[1], added_kv_proj_dim=None if image is None else hidden,
            pos_embed_seq_len=None if pos is None else pos.shape[1],
        )
    except SparseditError as err:
        raise CheckpointError(f"{name}: {err}") from None


def wan_from_original_state(state: dict[str, Tensor], name: str = "checkpoint", head_dim: int = 128) -> Wan:
    """Build a :class:`Wan` from an original (Wan team or ComfyUI) state dict, consuming every key (``head_dim``: the
    channels per head, not stored in the file; 128 in every release)."""
    state = _strip_prefix(state)
    config = infer_wan_config(state, head_dim, name)
    src = Source(state, name)
    ours = {k: src.take(k) for k in _model_keys(config)}
    src.finish()
    return _build(config, ours, name)


def wan_from_original(path: str | Path, head_dim: int = 128) -> Wan:
    """Load an original Wan transformer file (``.safetensors`` or a ``torch.save`` file)."""
    from sparsedit.core.checkpoint import read_safetensors
    from sparsedit.core.formats import read_torch_file

    path = Path(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if not is_wan_original_state(obj):
        raise CheckpointError(f"{path} is not an original Wan checkpoint (no patch_embedding / blocks.0.self_attn keys)")
    return wan_from_original_state(obj, str(path), head_dim)
