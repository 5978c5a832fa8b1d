"""Reading and writing FLUX.1 checkpoints.

* diffusers ``FluxTransformer2DModel`` directories (single or sharded safetensors), or the pipeline directory
  holding one under ``transformer/``; written back by :func:`save_flux_diffusers`. Key names from diffusers'
  ``models/transformers/transformer_flux.py`` and ``loaders/single_file_utils.py``
  (``convert_flux_transformer_checkpoint_to_diffusers``);
* the original single files of Black Forest Labs (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``;
  ComfyUI's copies prefix every key with ``model.diffusion_model.``), whose names are ours but for the two block
  lists: ``double_blocks.i`` is our ``blocks.i``, ``single_blocks.j`` our ``blocks.{depth_double + j}``.

Every loader takes each source key once and fails, naming the keys, if anything is missing or left over. Models
are built on the meta device and take a copy of the checkpoint's tensors in the checkpoint's dtype (a 12 B model is
not initialised first): a bfloat16 release loads as a bfloat16 model (``load_model(..., dtype=...)`` casts).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedit.core.checkpoint import CONFIG_NAME, check_json_fields, load_state_strict, read_json
from sparsedit.core.formats import Source, diffusers_model_dir, read_diffusers_weights, write_diffusers_model
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.flux.model import FLUX_AXES, FLUX_TEXT_TOKENS, Flux, FluxConfig

FLUX_DIFFUSERS_CLASS = "FluxTransformer2DModel"
ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI's single files
_WB = (".weight", ".bias")

# ours -> diffusers, per Linear (weight and bias); a list is concatenated along dim 0 (fused projections).
_TOP_MAP: dict[str, list[str]] = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
}
_GUIDANCE_MAP: dict[str, list[str]] = {
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
}
_DOUBLE_MAP: dict[str, list[str]] = {  # inside double block i: transformer_blocks.i
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                 "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                 "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                 "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_SINGLE_MAP: dict[str, list[str]] = {  # inside single block j: single_transformer_blocks.j
    "modulation.lin": ["norm.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
# The final adaLN: ours (and the original's) chunk (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift).
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _key_map(config: FluxConfig) -> dict[str, list[tuple[str, int]]]:
    """Every tensor of our state dict but the final adaLN -> the diffusers tensors it is made of, with their rows."""
    d, f = config.hidden_size, config.mlp_hidden
    rows = {"linear1": [d, d, d, f], "img_attn.qkv": [d] * 3, "txt_attn.qkv": [d] * 3}
    out: dict[str, list[tuple[str, int]]] = {}

    def add(ours: str, theirs: list[str], sizes: list[int] | None) -> None:
        for s in _WB:
            out[ours + s] = [(t + s, n) for t, n in zip(theirs, sizes or [-1] * len(theirs), strict=True)]

    for ours, theirs in {**_TOP_MAP, **(_GUIDANCE_MAP if config.guidance_embeds else {})}.items():
        add(ours, theirs, None)
    for i in range(config.depth_double):
        for ours, theirs in _DOUBLE_MAP.items():
            add(f"blocks.{i}.{ours}", [f"transformer_blocks.{i}.{t}" for t in theirs], rows.get(ours))
        for ours, theirs_norm in _DOUBLE_NORMS.items():
            out[f"blocks.{i}.{ours}"] = [(f"transformer_blocks.{i}.{theirs_norm}", -1)]
    for j in range(config.depth_single):
        i = config.depth_double + j
        for ours, theirs in _SINGLE_MAP.items():
            add(f"blocks.{i}.{ours}", [f"single_transformer_blocks.{j}.{t}" for t in theirs], rows.get(ours))
        for ours, theirs_norm in _SINGLE_NORMS.items():
            out[f"blocks.{i}.{ours}"] = [(f"single_transformer_blocks.{j}.{theirs_norm}", -1)]
    return out


def _swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) of an adaLN Linear's weight or bias."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _build(config: FluxConfig, state: dict[str, Tensor], name: str) -> Flux:
    """A :class:`Flux` holding ``state``'s tensors: built on the meta device (nothing initialised), checked key by
    key and shape by shape (:func:`load_state_strict`), then given the tensors themselves, in one dtype."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    if dtype.itemsize < 2:  # float8 copies of the release: compute in bfloat16
        dtype = torch.bfloat16
    # Each float tensor gets its own memory: safetensors hands out views into one buffer that are not 64-byte
    # aligned, and CPU matmul kernels round differently there (last-bit differences to diffusers, whose parameters
    # are fresh allocations). Non-float tensors stay as they are, so load_state_strict refuses them (not weights).
    state = {k: v.to(dtype, copy=True) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = Flux(config)
    with warnings.catch_warnings():  # the checks of load_state_strict; its copy into meta tensors is a no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        load_state_strict(model, state, name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# diffusers FluxTransformer2DModel
# --------------------------------------------------------------------------------------------


def is_flux_diffusers_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("_class_name") == FLUX_DIFFUSERS_CLASS


def flux_config_from_diffusers(cfg: dict[str, Any], name: str = "config.json") -> FluxConfig:
    """Our config for a diffusers FLUX ``config.json`` (defaults: ``FluxTransformer2DModel``'s, FLUX.1's sizes).

    FLUX pipelines pack 2x2 latent patches themselves, so diffusers' ``patch_size`` is 1 and its ``in_channels``
    the packed 64; ours are 2 and 16. The caption length (not in the file) is 512 for a guidance-distilled model
    (dev) and 256 otherwise (schnell), as the original CLI pads them.
    """
    if not is_flux_diffusers_config(cfg):
        raise CheckpointError(f"{name} describes a {cfg.get('_class_name')!r}, not a {FLUX_DIFFUSERS_CLASS}")
    check_json_fields(cfg, name, positive_ints=("patch_size", "in_channels", "out_channels", "num_layers",
                                                "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                                "pooled_projection_dim"))
    if cfg.get("patch_size", 1) != 1:
        raise CheckpointError(f"{name}: patch_size {cfg['patch_size']} is not supported (FLUX.1 pipelines pack 2x2 "
                              "latent patches and use 1)")
    packed = cfg.get("in_channels", 64)
    if packed % 4:
        raise CheckpointError(f"{name}: in_channels {packed} is not 4 x latent channels (2x2 packed latents)")
    if cfg.get("out_channels") not in (None, packed):
        raise CheckpointError(f"{name}: out_channels {cfg['out_channels']} differs from in_channels {packed} (FLUX.1 "
                              "Fill / Depth / Canny take extra input channels); only text-to-image FLUX is supported")
    single = cfg.get("num_single_layers", 38)
    if not isinstance(single, int) or isinstance(single, bool) or single < 0:
        raise CheckpointError(f"{name}: num_single_layers must be an integer >= 0, got {single!r}; fix the config file")
    guidance = cfg.get("guidance_embeds", False)
    if not isinstance(guidance, bool):
        raise CheckpointError(f"{name}: guidance_embeds must be true or false, got {guidance!r}; fix the config file")
    axes = cfg.get("axes_dims_rope", list(FLUX_AXES))
    if not isinstance(axes, list | tuple) or len(axes) != 3 or not all(isinstance(a, int) for a in axes):
        raise CheckpointError(f"{name}: axes_dims_rope must be three integers, got {axes!r}; fix the config file")
    heads, head_dim = cfg.get("num_attention_heads", 24), cfg.get("attention_head_dim", 128)
    try:
        return FluxConfig(
            in_channels=packed // 4, hidden_size=heads * head_dim, depth_double=cfg.get("num_layers", 19),
            depth_single=single, num_heads=heads, caption_channels=cfg.get("joint_attention_dim", 4096),
            pooled_channels=cfg.get("pooled_projection_dim", 768), guidance_embeds=guidance,
            axes_dims_rope=tuple(axes),  # type: ignore[arg-type]
            max_sequence_length=FLUX_TEXT_TOKENS["FLUX.1-dev" if guidance else "FLUX.1-schnell"],
        )
    except SparseditError as err:
        raise CheckpointError(f"{name}: {err}") from None


def flux_state_from_diffusers(config: FluxConfig, state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Our state dict from a diffusers one, consuming every key (an error names what is missing or left over)."""
    src = Source(state, name)
    ours = {key: torch.cat([src.take(k) for k, _ in theirs]) if len(theirs) > 1 else src.take(theirs[0][0])
            for key, theirs in _key_map(config).items()}
    for s in _WB:
        ours[_FINAL_MOD[0] + s] = _swap_halves(src.take(_FINAL_MOD[1] + s))
    src.finish()
    return ours


def flux_from_diffusers(path: str | Path) -> Flux:
    """Load a diffusers FLUX transformer directory (or the pipeline directory above it)."""
    path = diffusers_model_dir(Path(path))
    config = flux_config_from_diffusers(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    state = flux_state_from_diffusers(config, read_diffusers_weights(path), str(path))
    return _build(config, state, str(path))


def check_flux_exportable(model: Flux, target: str) -> None:
    """Refuse what ``target`` cannot hold: another model class or a setting the diffusers class fixes."""
    if type(model) is not Flux:
        raise SparseditError(f"only a dense FLUX exports to {target}: a {type(model).__name__} has none; save it with "
                             "--to sparsedit")
    cfg = model.config
    fixed = {"patch_size": (cfg.patch_size, 2), "mlp_ratio": (cfg.mlp_ratio, 4.0), "rope_theta": (cfg.rope_theta, 10000.0)}
    for key, (value, want) in fixed.items():
        if value != want:
            raise SparseditError(f"{target} fixes {key} at {want}, this FLUX has {value}; export to sparsedit instead")


def diffusers_flux_fields(cfg: FluxConfig) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config of ``cfg`` (also the face's config)."""
    return {
        "patch_size": 1, "in_channels": cfg.in_channels * cfg.patch_size ** 2, "out_channels": None,
        "num_layers": cfg.depth_double, "num_single_layers": cfg.depth_single, "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.caption_channels,
        "pooled_projection_dim": cfg.pooled_channels, "guidance_embeds": cfg.guidance_embeds,
        "axes_dims_rope": list(cfg.axes_dims_rope),
    }


def save_flux_diffusers(model: Flux, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``FluxTransformer2DModel`` directory (exact: same tensors, same numerics)."""
    check_flux_exportable(model, f"diffusers' {FLUX_DIFFUSERS_CLASS}")
    ours = model.state_dict()
    state: dict[str, Tensor] = {}
    for key, theirs in _key_map(model.config).items():
        parts = ours[key].split([n for _, n in theirs]) if len(theirs) > 1 else [ours[key]]
        state.update({k: part.contiguous() for (k, _), part in zip(theirs, parts, strict=True)})
    for s in _WB:
        state[_FINAL_MOD[1] + s] = _swap_halves(ours[_FINAL_MOD[0] + s])
    left = sorted(set(ours) - set(_key_map(model.config)) - {_FINAL_MOD[0] + s for s in _WB})
    if left:  # a tensor the format has no place for must not be dropped silently
        raise SparseditError(f"the diffusers format has no place for {', '.join(left[:6])}; export to sparsedit")
    return write_diffusers_model(out, state, FLUX_DIFFUSERS_CLASS, diffusers_flux_fields(model.config), overwrite)


# --------------------------------------------------------------------------------------------
# the original single files (Black Forest Labs)
# --------------------------------------------------------------------------------------------


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    if state and all(k.startswith(ORIGINAL_PREFIX) for k in state):
        return {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items()}
    return state


def is_flux_original_state(obj: Any) -> bool:
    """True for a state dict in the original FLUX.1 layout (``double_blocks.i.img_attn.qkv``, ``img_in``)."""
    if not isinstance(obj, dict):
        return False
    keys = {k[len(ORIGINAL_PREFIX):] if isinstance(k, str) and k.startswith(ORIGINAL_PREFIX) else k for k in obj}
    return "img_in.weight" in keys and "double_blocks.0.img_attn.qkv.weight" in keys


def _block_count(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(k.split(".")[1]) for k in state if k.startswith(prefix) and k.split(".")[1].isdigit()}
    return max(found) + 1 if found else 0


def infer_flux_config(state: dict[str, Tensor], image_size: int | None = None,
                      axes_dims_rope: tuple[int, int, int] | None = None, name: str = "checkpoint") -> FluxConfig:
    """Read a FLUX config off the original tensor shapes (``state`` without a ComfyUI prefix).

    The head dim is the QK-norm scale's length; the RoPE split is not stored: FLUX.1's (16, 56, 56) for a head
    dim of 128, else ``axes_dims_rope`` must be given.
    """
    try:
        hidden, packed = state["img_in.weight"].shape
        head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = state["double_blocks.0.img_mlp.0.weight"].shape[0]
        caption = state["txt_in.weight"].shape[1]
        pooled = state["vector_in.in_layer.weight"].shape[1]
        out = state["final_layer.linear.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(f"{name} is not an original FLUX.1 state dict (no img_in / double_blocks / txt_in / "
                              "vector_in / final_layer)") from None
    if packed % 4 or out != packed:
        raise CheckpointError(f"{name}: {packed} input and {out} output channels; only text-to-image FLUX.1 (2x2 packed "
                              "latents in and out) is supported")
    if axes_dims_rope is None:
        if head_dim != sum(FLUX_AXES):
            raise CheckpointError(f"{name}: head dim {head_dim} is not FLUX.1's 128, so the RoPE split is unknown; call "
                                  "sparsedit.families.flux.convert.flux_from_original(path, axes_dims_rope=(...))")
        axes_dims_rope = FLUX_AXES
    guidance = "guidance_in.in_layer.weight" in state
    try:
        return FluxConfig(
            input_size=128 if image_size is None else image_size // 8, in_channels=packed // 4, hidden_size=hidden,
            depth_double=_block_count(state, "double_blocks."), depth_single=_block_count(state, "single_blocks."),
            num_heads=hidden // head_dim, mlp_ratio=mlp_hidden / hidden, caption_channels=caption,
            pooled_channels=pooled, guidance_embeds=guidance, axes_dims_rope=axes_dims_rope,
            max_sequence_length=FLUX_TEXT_TOKENS["FLUX.1-dev" if guidance else "FLUX.1-schnell"],
        )
    except SparseditError as err:
        raise CheckpointError(f"{name}: {err}") from None


def _original_name(key: str, depth_double: int) -> str:
    """Our key -> the original's: ``blocks.i`` -> ``double_blocks.i`` / ``single_blocks.{i - depth_double}``."""
    if not key.startswith("blocks."):
        return key
    _, index, rest = key.split(".", 2)
    i = int(index)
    return f"double_blocks.{i}.{rest}" if i < depth_double else f"single_blocks.{i - depth_double}.{rest}"


def flux_from_original_state(state: dict[str, Tensor], image_size: int | None = None,
                             axes_dims_rope: tuple[int, int, int] | None = None, name: str = "checkpoint") -> Flux:
    """Build a :class:`Flux` from an original (Black Forest Labs or ComfyUI) state dict, consuming every key."""
    state = _strip_prefix(state)
    config = infer_flux_config(state, image_size, axes_dims_rope, name)
    with torch.device("meta"):
        keys = list(Flux(config).state_dict())
    src = Source(state, name)
    ours = {k: src.take(_original_name(k, config.depth_double)) for k in keys}
    src.finish()
    return _build(config, ours, name)


def flux_from_original(path: str | Path, image_size: int | None = None,
                       axes_dims_rope: tuple[int, int, int] | None = None) -> Flux:
    """Load an original FLUX.1 single file (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``)."""
    from sparsedit.core.checkpoint import read_safetensors
    from sparsedit.core.formats import read_torch_file

    path = Path(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if not is_flux_original_state(obj):
        raise CheckpointError(f"{path} is not an original FLUX.1 checkpoint (no img_in / double_blocks keys)")
    return flux_from_original_state(obj, image_size, axes_dims_rope, str(path))


def original_state_dict(model: Flux) -> dict[str, Tensor]:
    """The original key layout (``double_blocks`` / ``single_blocks``), as Black Forest Labs' files hold it."""
    check_flux_exportable(model, "the original FLUX.1 layout")
    return {_original_name(k, model.config.depth_double): v for k, v in model.state_dict().items()}
