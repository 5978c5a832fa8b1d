"""Latte (Ma et al., 2024): a video DiT of alternating spatial and temporal blocks; SparseLatte.

Layout: a video latent (B, C, F, H, W) is patchified frame by frame into F x N tokens (N = H*W
patches). Block ``2i`` (spatial) attends within each frame over its N tokens; block ``2i+1``
(temporal) attends over the F frames at each spatial location. A 1-D sin-cos embedding of the
frame index is added before the first temporal block. ``depth`` counts blocks (Latte-XL: 28 = 14
spatial/temporal pairs). Inside the model the tokens live either in the *spatial layout*
(B*F, N, D) or in the *temporal layout* (B*N, F, D); :func:`swap_layout` converts between them.

Two conditioning variants, a config field (``conditioning``):

* ``"class"``: the original release (https://github.com/Vchitect/Latte, ``models/latte.py``; facts
  only, the code is ours). Its blocks are DiT blocks with per-block adaLN-Zero, and the class
  embedding is *added to the timestep embedding*: ``c = t_embedder(t) + y_embedder(y)``, used by
  every block and the final layer. ``num_classes=0`` is the release's unconditional model
  (FaceForensics, SkyTimelapse, Taichi-HD); UCF101 uses 101 classes. Module names equal the
  release's (``blocks.i``, ``x_embedder``, ``t_embedder``, ``y_embedder``, ``final_layer``), so its
  state dicts map name for name (:func:`latte_from_original_state`).
* ``"text"``: diffusers' ``LatteTransformer3DModel`` (Latte-T2V): PixArt-alpha blocks with
  adaLN-single (one shared modulation vector), caption projection, text cross-attention in the
  spatial blocks only, PixArt's final layer (:mod:`sparsedit.pixart`). Loaded by
  :func:`latte_from_diffusers`, equal to diffusers' outputs.

SparseLatte (paper Appendix A.3) is described in docs/latte.md and at
:class:`SparseLatte`. Shapes: B batch, F frames, N patches per frame, D hidden, L text tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.blocks import UPSAMPLE_MODES, DenseRecoveryBlock, Poolingformer, SparseGenerationBlock, reset_merges
from sparsedit.checkpoint import (
    CONFIG_NAME,
    DIFFUSERS_SIZE_FIELDS,
    check_json_fields,
    load_state_strict,
    read_json,
    register_model_type,
)
from sparsedit.dit import CFG_MODES, DIT_SIZES, DiT, GridConfig, GuidanceMixin
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    init_linears_and_patch_embed,
    unpatchify,
)
from sparsedit.pixart import (
    T5_CHANNELS,
    CaptionEmbedder,
    PixArt,
    PixArtBlock,
    PixArtCond,
    PixArtFinalLayer,
    PixArtGenerationBlock,
    PixArtPoolingformer,
    PixArtRecoveryBlock,
    _match_batch,
    pixart_pos_embed,
    text_attention_mask,
)
from sparsedit.schedule import PruningSchedule, grid_for_rate
from sparsedit.sparse_dit import Layout, SparseLayoutConfig, layout_fields, parse_layout, timestep_bounds

Grid = tuple[int, int]
CONDITIONINGS = ("class", "text")
# Latte-XL/2 of the paper (Sec. 4.2): 16 frames of 256 px -> 32 x 32 latents, 16 x 16 patches.
LATTE_FRAMES = 16
LATTE_PRESETS = tuple(f"Latte-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8))
# Paper layout for SparseLatte-XL (Appendix A.3: "all other configurations as in DiT"): P=2 (one
# spatial + one temporal poolingformer), K=4 SDTMs of (gen 2, sparse 2, recover 2, dense 0), T=2.
SPARSE_LATTE_LAYOUTS: dict[str, Layout] = {
    "SparseLatte-XL": Layout(pool=2, sdtm=4, gen=2, sparse=2, recovery=2, dense=0, top=2),
}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@dataclass
class LatteConfig(GridConfig):
    """Everything needed to rebuild a Latte; saved as ``config.json`` beside the weights.

    ``depth`` counts blocks, spatial and temporal (even). ``num_frames`` is diffusers'
    ``video_length`` (the frames the model was trained on; other frame counts run too, the temporal
    table is computed for them). The spatial sin-cos table is PixArt's (:func:`pixart_pos_embed`) with
    ``base_size`` = the config's token-grid height and ``interpolation_scale`` (1 in the release;
    diffusers fixes it to ``max(sample_size // 64, 1)``). ``num_classes`` only matters for
    ``conditioning="class"`` (0 = unconditional), ``caption_channels`` / ``text_mask_bias`` only for
    ``"text"`` (see :class:`sparsedit.pixart.PixArtConfig`).
    """

    input_size: int | tuple[int, int] = 32  # latent size per frame, H or (H, W)
    num_frames: int = LATTE_FRAMES
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    conditioning: str = "class"
    num_classes: int = 101
    class_dropout_prob: float = 0.1  # label (or caption) dropout in training, for guidance
    caption_channels: int = T5_CHANNELS
    interpolation_scale: float = 1.0
    norm_eps: float = 1e-6
    text_mask_bias: float | None = None
    data_space: str = "latent"
    model_type: str = field(default="Latte", init=False)

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise SparseditError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, not {self.conditioning!r}")
        if self.depth < 2 or self.depth % 2:
            raise SparseditError(f"depth {self.depth} must be a positive even number (spatial/temporal pairs)")
        if self.num_frames < 1:
            raise SparseditError(f"num_frames must be positive, got {self.num_frames}")
        if self.num_classes < 0:
            raise SparseditError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        self.check_input()
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise SparseditError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads} and by 4"
            )
        if self.interpolation_scale <= 0:
            raise SparseditError(f"interpolation_scale must be positive, got {self.interpolation_scale}")

    @property
    def text(self) -> bool:
        return self.conditioning == "text"


def latte_config(preset: str = "Latte-XL/2", image_size: int = 256, num_frames: int = LATTE_FRAMES,
                 vae_downsample: int = 8, **overrides: Any) -> LatteConfig:
    """Config of a release size (``Latte-XL/2`` ... ``Latte-S/8``, DiT's widths) at ``image_size`` px."""
    size, _, patch = preset.partition("/")
    dit_name = size.replace("Latte", "DiT")
    if dit_name not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise SparseditError(f"unknown Latte preset {preset!r}; choose one of {', '.join(LATTE_PRESETS)}")
    depth, hidden, heads = DIT_SIZES[dit_name]
    kwargs: dict[str, Any] = dict(input_size=image_size // vae_downsample, num_frames=num_frames,
                                  patch_size=int(patch), hidden_size=hidden, depth=depth, num_heads=heads)
    kwargs.update(overrides)
    return LatteConfig(**kwargs)


def temporal_pos_embed(dim: int, frames: int) -> Tensor:
    """1-D sin-cos table of frame indices 0..F-1, (F, dim): ``[sin, cos]``, computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (D/2,)
    out = torch.arange(frames, dtype=torch.float64)[:, None] * omega[None]  # (F, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def swap_layout(x: Tensor, batch: int) -> Tensor:
    """(B*F, N, D) <-> (B*N, F, D): spatial layout to temporal layout and back (self-inverse)."""
    rows, n, d = x.shape
    return x.view(batch, rows // batch, n, d).transpose(1, 2).reshape(batch * n, rows // batch, d)


# ------------------------------------------------------------------------------------------------
# Latte
# ------------------------------------------------------------------------------------------------


class Latte(GuidanceMixin, nn.Module):
    """Latte video DiT; ``forward(x, t, y, encoder_attention_mask=None)`` with x (B, C, F, H, W).

    ``y``: class labels (B,) for ``conditioning="class"`` (ignored / None when ``num_classes=0``), or
    the T5 embeddings (B, L, C_text) for ``"text"`` (also accepted as ``encoder_hidden_states=``),
    with an optional (B, L) keep-mask or diffusers' (B, 1, L) additive bias. Returns (B, C_out, F, H, W).
    """

    config: LatteConfig

    def __init__(self, config: LatteConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)  # [cos, sin], frequency shift 0 (release and diffusers)
        self.y_embedder: nn.Module | None
        if config.text:
            self.t_block = adaln_modulation(d, 6)  # adaLN-single
            self.y_embedder = CaptionEmbedder(config.caption_channels, d, 0, config.class_dropout_prob)
            self.final_layer: nn.Module = PixArtFinalLayer(d, config.patch_size, config.out_channels)
        else:
            self.y_embedder = (LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
                               if config.num_classes else None)
            self.final_layer = FinalLayer(d, config.patch_size, config.out_channels, 1e-6)
        self.blocks = self.build_blocks(config)
        self.register_buffer("pos_embed", self.position_table(config.grid)[None], persistent=False)
        self.register_buffer("temp_embed", temporal_pos_embed(d, config.num_frames)[None], persistent=False)
        self.initialize_weights()

    run_block = DiT.run_block

    # -- construction ------------------------------------------------------------------------------

    def make_block(self, kind: str, spatial: bool) -> nn.Module:
        """One block; ``kind`` as in :func:`latte_block_kinds` ("top" for a dense Latte).

        ``spatial`` tells whether the *source* layer is a spatial one: in the text variant only those
        carry the text cross-attention (diffusers' temporal blocks have none).
        """
        cfg = self.config
        d, heads, ratio, eps = cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps
        upsample = getattr(cfg, "upsample", "nearest")
        if not cfg.text:  # DiT blocks (adaLN-Zero), as in the release
            if kind == "pool":
                return Poolingformer(d, ratio, eps, eps)
            if kind in ("gen_s", "gen_t"):
                return SparseGenerationBlock(d, heads, ratio, eps, eps)
            if kind in ("recover_t", "recover_s"):
                return DenseRecoveryBlock(d, heads, ratio, eps, eps, upsample=upsample)
            return DiTBlock(d, heads, ratio, eps, eps)
        block: PixArtBlock
        if kind == "pool":
            block = PixArtPoolingformer(d, heads, ratio, eps)
        elif kind in ("gen_s", "gen_t"):
            block = PixArtGenerationBlock(d, heads, ratio, eps)
        elif kind in ("recover_t", "recover_s"):
            block = PixArtRecoveryBlock(d, heads, ratio, eps, upsample=upsample)
        else:
            block = PixArtBlock(d, heads, ratio, eps, cross_attention=spatial)
        if not spatial:
            block.cross_attn = None  # temporal source layer: no text attention
        return block

    def build_blocks(self, config: LatteConfig) -> nn.ModuleList:
        return nn.ModuleList(self.make_block("top", i % 2 == 0) for i in range(config.depth))

    def initialize_weights(self) -> None:
        """The release's / PixArt's initialisation: xavier linears, N(0, 0.02) embedders, zero adaLN and output."""
        init_linears_and_patch_embed(self, self.x_embedder)
        normal = [self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight]
        if self.config.text:
            normal += [self.t_block[1].weight, self.y_embedder.y_proj.fc1.weight, self.y_embedder.y_proj.fc2.weight]
        elif self.y_embedder is not None:
            normal.append(self.y_embedder.embedding_table.weight)
        for p in normal:
            nn.init.normal_(p, std=0.02)
        zero: list[nn.Linear] = [self.final_layer.linear]
        for block in [*self.blocks, self.final_layer]:
            if hasattr(block, "adaLN_modulation"):
                zero.append(block.adaLN_modulation[-1])
            if getattr(block, "cross_attn", None) is not None:
                zero.append(block.cross_attn.proj)
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        reset_merges(self.blocks)

    # -- embeddings and conditions -----------------------------------------------------------------

    def position_table(self, grid: Grid) -> Tensor:
        cfg = self.config
        return pixart_pos_embed(cfg.hidden_size, grid, cfg.grid[0], cfg.interpolation_scale)

    def position_embedding(self, grid: Grid) -> Tensor:
        """Spatial table (1, N, D) (another grid than the config's is computed on the fly)."""
        return self.pos_embed if grid == self.config.grid else self.position_table(grid)[None].to(self.pos_embed)

    def temporal_embedding(self, frames: int) -> Tensor:
        """Temporal table (1, F, D); zeros for a single frame (diffusers adds it only when F > 1)."""
        if frames == 1:
            return torch.zeros_like(self.temp_embed[:, :1])
        if frames == self.config.num_frames:
            return self.temp_embed
        return temporal_pos_embed(self.config.hidden_size, frames)[None].to(self.temp_embed)

    def token_grid(self, x: Tensor) -> tuple[Grid, int]:
        """(B, C, F, H, W) -> the patch grid (H/p, W/p) and the frame count F."""
        p, c = self.config.patch_size, self.config.in_channels
        if x.ndim != 5 or x.shape[1] != c or x.shape[-2] % p or x.shape[-1] % p:
            raise SparseditError(
                f"input of shape {tuple(x.shape)} does not fit this Latte: expected (B, {c}, F, H, W) "
                f"(diffusers' layout) with H and W multiples of {p}"
            )
        return (x.shape[-2] // p, x.shape[-1] // p), x.shape[2]

    def embed(self, x: Tensor, grid: Grid) -> Tensor:
        """(B, C, F, H, W) -> (B*F, N, D) tokens in the spatial layout, spatial table added."""
        b, c, f, hh, ww = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, hh, ww)  # (B*F, C, H, W)
        return self.x_embedder(frames) + self.position_embedding(grid)  # (B*F, N, D)

    def conditions(self, t: Tensor, y: Tensor | None, mask: Tensor | None) -> _Conditions:
        """The per-sample condition, expanded per row on demand (:class:`_Conditions`)."""
        batch = t.shape[0]
        emb = self.t_embedder(t)  # (B, D)
        if not self.config.text:
            if self.y_embedder is not None:
                if y is None:
                    raise SparseditError("this Latte is class-conditional: pass class labels y of shape (B,)")
                emb = emb + self.y_embedder(_match_batch(y.reshape(-1), batch, "labels"))
            return _Conditions(emb, None)
        if y is None:
            raise SparseditError("this Latte is text-conditional: pass T5 embeddings (B, L, C_text)")
        caption = y.squeeze(1) if y.ndim == 4 else y
        if caption.ndim != 3 or caption.shape[-1] != self.config.caption_channels:
            raise SparseditError(
                f"encoder_hidden_states of shape {tuple(caption.shape)}: expected (B, L, {self.config.caption_channels})"
            )
        text = self.y_embedder(_match_batch(caption, batch, "encoder_hidden_states").to(emb.dtype))  # (B, L, D)
        attn_mask = text_attention_mask(mask, batch, text.shape[1], self.config.text_mask_bias, text.dtype)
        return _Conditions(emb, PixArtCond(t0=self.t_block(emb), emb=emb, text=text, mask=attn_mask))

    def head(self, h: Tensor, conds: _Conditions, grid: Grid, batch: int) -> Tensor:
        """(B*F, N, D) -> (B, C_out, F, H, W)."""
        frames = h.shape[0] // batch
        c = conds.final(frames)  # (B*F, D)
        out = unpatchify(self.final_layer(h, c), grid, self.config.patch_size, self.config.out_channels)
        return out.view(batch, frames, *out.shape[1:]).transpose(1, 2).contiguous()  # (B, C_out, F, H, W)

    def _inputs(self, x: Tensor, t: Tensor, y: Tensor | None, encoder_hidden_states: Tensor | None,
                added_cond_kwargs: dict[str, Tensor] | None) -> tuple[Tensor, Tensor | None]:
        if added_cond_kwargs and any(v is not None for v in added_cond_kwargs.values()):
            raise SparseditError("Latte has no resolution / aspect-ratio conditions; drop added_cond_kwargs")
        if encoder_hidden_states is not None:
            if y is not None:
                raise SparseditError("pass the caption embeddings once: as y or as encoder_hidden_states")
            y = encoder_hidden_states
        return (t.expand(x.shape[0]) if t.ndim == 0 else t), y

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                added_cond_kwargs: dict[str, Tensor] | None = None, *,
                encoder_hidden_states: Tensor | None = None) -> Tensor:
        """x: (B, C, F, H, W), t: (B,), y: labels (B,) or captions (B, L, C_text) -> (B, C_out, F, H, W)."""
        grid, frames = self.token_grid(x)
        t, y = self._inputs(x, t, y, encoder_hidden_states, added_cond_kwargs)
        batch, n = x.shape[0], grid[0] * grid[1]
        conds = self.conditions(t, y, encoder_attention_mask)
        h = self.embed(x, grid)  # (B*F, N, D)
        for i, block in enumerate(self.blocks):
            if i % 2 == 0:  # spatial: attention within each frame
                h = self.run_block(block, h, conds.rows(frames, text=True))  # (B*F, N, D)
                continue
            ht = swap_layout(h, batch)  # (B*N, F, D)
            if i == 1:
                ht = ht + self.temporal_embedding(frames)
            ht = self.run_block(block, ht, conds.rows(n, text=False))  # (B*N, F, D): attention over frames
            h = swap_layout(ht, batch)  # (B*F, N, D)
        return self.head(h, conds, grid, batch)

    def block_axis(self, layer: int) -> str:
        """The row layout of block ``layer``'s output: "s" (B*F, N, D) on spatial layers, "t" (B*N, F, D)."""
        return "s" if layer % 2 == 0 else "t"

    def block_tokens(self, layer: int, output: Tensor, batch: int) -> Tensor:
        """Block ``layer``'s output as (B, F*N, D), frame-major, whatever its row layout."""
        h = output if self.block_axis(layer) == "s" else swap_layout(output, batch)  # (B*F, N, D)
        return h.reshape(batch, -1, h.shape[-1])

    def null_caption(self, batch: int) -> Tensor:
        raise SparseditError(
            "Latte-T2V (diffusers) stores no null caption for guidance: give the T5 embedding of the negative prompt "
            "(null_embeds; in the CLI --prompt with --negative-prompt, or 'negative_embeds' in --prompt-embeds) or use "
            "no guidance (cfg_scale 1)"
        )

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, cfg_mode: str = "all",
                         **kwargs: Any) -> Tensor:
        """Classifier-free guidance on a doubled batch (first half used for both halves).

        Class variant: ``y`` holds the B labels of the conditional half (or 2B labels as in DiT, the
        second half being the null class); the null class is ``num_classes``. Text variant:
        :meth:`sparsedit.pixart.PixArt.forward_with_cfg` semantics (``null_embeds`` required).
        ``cfg_mode`` defaults to "all": the Latte release guides all 4 latent channels.
        """
        if cfg_mode not in CFG_MODES:
            raise SparseditError(f"unknown cfg mode {cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
        if self.config.text:
            return PixArt.forward_with_cfg(self, x, t, y, cfg_scale, cfg_mode=cfg_mode, **kwargs)  # type: ignore[arg-type]
        if self.y_embedder is None:
            raise SparseditError("an unconditional Latte (num_classes=0) has nothing to guide; use cfg_scale=1")
        b = x.shape[0] // 2
        if y.shape[0] == b:
            y = torch.cat([y, torch.full_like(y, self.config.num_classes)])
        return GuidanceMixin.forward_with_cfg(self, x, t, y, cfg_scale, cfg_mode, **kwargs)


class _Conditions:
    """A forward's condition, repeated per row of the current token layout and cached.

    Spatial layout rows are frames (the condition of sample b repeated F times, b-major), temporal
    layout rows are spatial locations. Class variant: DiT's ``c`` (B, D) -> (B*rows, D), so every
    block computes its adaLN per row, as the release does. Text variant: a :class:`PixArtCond`
    whose ``t0`` / ``emb`` / text / mask are repeated (``text=False``: without the caption, for
    blocks that have no text attention).
    """

    def __init__(self, emb: Tensor, cond: PixArtCond | None):
        self.emb = emb
        self.cond = cond
        self._cache: dict[tuple[int, bool], Any] = {}

    def rows(self, per_sample: int, text: bool) -> Any:
        key = (per_sample, text and self.cond is not None)
        if key not in self._cache:
            def rep(z: Tensor | None) -> Tensor | None:
                return None if z is None else z.repeat_interleave(per_sample, dim=0)

            if self.cond is None:
                self._cache[key] = rep(self.emb)  # (B*rows, D)
            else:
                c = self.cond
                self._cache[key] = PixArtCond(
                    t0=rep(c.t0), emb=rep(c.emb), text=rep(c.text) if key[1] else None,
                    mask=rep(c.mask) if key[1] else None,
                )
        return self._cache[key]

    def final(self, frames: int) -> Tensor:
        """What the final layer takes per frame: DiT's ``c`` or PixArt's embedded timestep, (B*F, D)."""
        return self.emb.repeat_interleave(frames, dim=0)


# ------------------------------------------------------------------------------------------------
# SparseLatte
# ------------------------------------------------------------------------------------------------


def latte_block_kinds(layout: Layout) -> list[str]:
    """Kind of every SparseLatte layer: pool, gen_s, gen_t, sparse, recover_t, recover_s, dense, top.

    The video SDTM (paper A.3): ``gen_s`` (prune space), ``gen_t`` (prune time), ``s`` sparse blocks,
    ``recover_t`` (restore frames), ``recover_s`` (restore space), ``d`` dense blocks.
    """
    if layout.sdtm and (layout.gen != 2 or layout.recovery != 2):
        raise SparseditError(
            f"a video SDTM has exactly 2 generation blocks (space, then time) and 2 recovery blocks (time, then "
            f"space); layout {layout.as_string()} has g={layout.gen}, r={layout.recovery}"
        )
    if layout.pool % 2 or (layout.sparse + layout.dense) % 2:
        raise SparseditError(
            f"layout {layout.as_string()}: P and s+d must be even so that every SDTM starts at a spatial layer "
            "(its space-pruning block) and layer i keeps its source's spatial/temporal role"
        )
    sdtm = ["gen_s", "gen_t"] + ["sparse"] * layout.sparse + ["recover_t", "recover_s"] + ["dense"] * layout.dense
    return ["pool"] * layout.pool + sdtm * layout.sdtm + ["top"] * layout.top


def latte_block_axes(kinds: list[str]) -> list[str]:
    """Attention axis of every layer: "s" (within frames) or "t" (over frames).

    Source parity (even = spatial), except the SDTM ends, whose axis is what they prune or restore:
    ``gen_s``/``recover_s`` spatial, ``gen_t``/``recover_t`` temporal. With the SDTM starting at a
    spatial layer, only the recovery pair differs from its source layer (``recover_t`` sits on a
    spatial layer, ``recover_s`` on a temporal one; see docs/latte.md).
    """
    fixed = {"gen_s": "s", "recover_s": "s", "gen_t": "t", "recover_t": "t"}
    return [fixed.get(k, "s" if i % 2 == 0 else "t") for i, k in enumerate(kinds)]


def split_keep_ratio(keep: float, dense_grid: Grid, frames: int, temporal_share: float) -> tuple[Grid, int]:
    """Sparse (grid, frames) for a total keep ratio ``keep = 1 - r`` of the F x H x W token set.

    ``keep`` is split in log space: frames keep ``keep ** temporal_share``, space keeps
    ``keep ** (1 - temporal_share)`` (grid from :func:`sparsedit.schedule.grid_for_rate`, which keeps
    the aspect ratio). ``temporal_share = 1/3`` shrinks all three axes by the same factor.
    ``f = max(1, round_half_up(F * keep ** temporal_share))``.
    """
    if not 0 < keep <= 1:
        raise SparseditError(f"keep ratio must be in (0, 1], got {keep}")
    grid = grid_for_rate(1.0 - keep ** (1.0 - temporal_share), *dense_grid)
    return grid, max(1, math.floor(frames * keep**temporal_share + 0.5))


@dataclass
class SparseLatteConfig(LatteConfig):
    """A Latte config plus the SparseDiT layout, the rate range, its space/time split and upsampling.

    The pruning rate r(t) of :mod:`sparsedit.schedule` applies to the whole F x N token set; ``temporal_share``
    splits it (:func:`split_keep_ratio`). Rates come from the formula at every timestep (no training
    pieces: video piece sampling is not implemented). ``recovery_pos_embed`` (as in SparseDiT,
    docs/official.md): the recovery merges re-add the temporal / spatial table (True, the paper) or not.
    A video SDTM's two recovery blocks restore time, then space, so SparseDiT's ``extra_recovery``
    (what a 2nd.. recovery block of the same axis does) has no counterpart here.
    """

    pool_blocks: int = 2
    num_sdtm: int = 4
    gen_blocks: int = 2
    sparse_blocks: int = 2
    recovery_blocks: int = 2
    dense_blocks: int = 0
    top_blocks: int = 2
    r_min: float = 0.80
    r_max: float = 0.93
    temporal_share: float = 1.0 / 3.0
    num_timesteps: int = 1000
    upsample: str = "nearest"
    recovery_pos_embed: bool = True
    model_type: str = field(default="SparseLatte", init=False)

    # A config.json may lack only this field (written before it existed; the default is that behaviour).
    OPTIONAL_FIELDS = frozenset({"recovery_pos_embed"})

    layout = SparseLayoutConfig.layout

    def __post_init__(self) -> None:
        super().__post_init__()
        latte_block_kinds(self.layout)  # validates g, r and parity
        if self.layout.depth != self.depth:
            raise SparseditError(
                f"layout {self.layout.as_string()} has {self.layout.depth} blocks but the model has depth {self.depth}"
            )
        if not 0.0 <= self.temporal_share <= 1.0:
            raise SparseditError(f"temporal_share must be in [0, 1], got {self.temporal_share}")
        if self.upsample not in UPSAMPLE_MODES:
            raise SparseditError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {self.upsample!r}")
        if not isinstance(self.recovery_pos_embed, bool):
            raise SparseditError(f"recovery_pos_embed must be true or false, not {self.recovery_pos_embed!r}")
        self.schedule  # validates the rates  # noqa: B018

    @property
    def schedule(self) -> PruningSchedule:
        return PruningSchedule(self.r_min, self.r_max, self.num_timesteps)

    def tokens_at(self, t: int, dense_grid: Grid | None = None, frames: int | None = None) -> tuple[Grid, int]:
        """Sparse (grid, frames) at timestep ``t``: r(t) of the schedule, split by ``temporal_share``."""
        dense_grid = self.grid if dense_grid is None else dense_grid
        frames = self.num_frames if frames is None else frames
        return split_keep_ratio(1.0 - self.schedule.rate(t), dense_grid, frames, self.temporal_share)

    @classmethod
    def from_latte(cls, config: LatteConfig, layout: str | Layout, **kwargs: Any) -> SparseLatteConfig:
        name = layout.split("/")[0] if isinstance(layout, str) else None
        lay = SPARSE_LATTE_LAYOUTS[name] if name in SPARSE_LATTE_LAYOUTS else parse_layout(layout)
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(LatteConfig) if f.init}
        return cls(**base, **layout_fields(lay), **kwargs)


class SparseLatte(Latte):
    """Latte with poolingformers, video SDTMs and a timestep-wise sparse token set.

    Token sets: dense X (B*F, N, D); after ``gen_s`` the spatially sparse set (B*F, M, D), M = h*w
    (each frame's H x W grid adaptively average-pooled to h x w; cross-attention q = sparse, k/v =
    dense, within the frame); after ``gen_t`` the sparse set (B*M, f, D) (the F frames of every sparse
    location pooled to f; cross-attention over time). Sparse blocks alternate spatial (B*f, M, D)
    and temporal (B*M, f, D). ``recover_t`` restores frames: ``Xm = up_t(Xs) W1 + X_t W2 + temporal
    table``, X_t = the input of ``gen_t`` (B*M, F, D); cross-attention q = Xm over the f sparse
    frames. ``recover_s`` restores space the same way from the input of ``gen_s`` with the spatial
    table (B*F, N, D). Poolingformers average V over the frame (spatial layers) or over the frames
    (temporal layers).

    ``forward(..., grid=None, frames=None, keep_ratio=None)``: the sparse (grid, frames) comes from
    the schedule at the batch's timesteps unless given (``grid``/``frames`` each, or ``keep_ratio``).
    """

    config: SparseLatteConfig

    def build_blocks(self, config: LatteConfig) -> nn.ModuleList:
        assert isinstance(config, SparseLatteConfig)
        self.kinds = latte_block_kinds(config.layout)
        self.axes = latte_block_axes(self.kinds)
        return nn.ModuleList(self.make_block(kind, i % 2 == 0) for i, kind in enumerate(self.kinds))

    def block_axis(self, layer: int) -> str:
        # Dense-token layers keep the source's parity; recover_s ends in the spatial layout (latte_block_axes).
        return self.axes[layer]

    def sparse_tokens(self, t: Tensor, dense_grid: Grid, frames: int, grid: Grid | None = None,
                      sparse_frames: int | None = None, keep_ratio: float | None = None) -> tuple[Grid, int]:
        """The sparse (grid, frames) of a batch: explicit values, else ``keep_ratio``, else the schedule at ``t``."""
        cfg = self.config
        H, W = dense_grid
        if keep_ratio is not None:
            auto = split_keep_ratio(keep_ratio, dense_grid, frames, cfg.temporal_share)
        elif grid is None or sparse_frames is None:
            lo, hi = timestep_bounds(t, cfg.num_timesteps)
            auto = cfg.tokens_at(lo, dense_grid, frames)
            if cfg.tokens_at(hi, dense_grid, frames) != auto:
                raise SparseditError(
                    f"this batch mixes timesteps {lo} and {hi}, which use different sparse token sets; give a batch "
                    "one timestep range or pass grid=(h, w) and frames=f"
                )
        else:
            auto = ((H, W), frames)
        hw = auto[0] if grid is None else (int(grid[0]), int(grid[1]))
        f = auto[1] if sparse_frames is None else int(sparse_frames)
        if not (1 <= hw[0] <= H and 1 <= hw[1] <= W and 1 <= f <= frames):
            raise SparseditError(f"sparse tokens {hw[0]}x{hw[1]} x {f} frames must lie within {H}x{W} x {frames}")
        return hw, f

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None,  # type: ignore[override]
                encoder_attention_mask: Tensor | None = None, added_cond_kwargs: dict[str, Tensor] | None = None, *,
                encoder_hidden_states: Tensor | None = None, grid: Grid | None = None, frames: int | None = None,
                keep_ratio: float | None = None) -> Tensor:
        """x: (B, C, F, H, W), t: (B,), y: labels or captions -> (B, C_out, F, H, W)."""
        dense_grid, nf = self.token_grid(x)
        t, y = self._inputs(x, t, y, encoder_hidden_states, added_cond_kwargs)
        sgrid, sf = self.sparse_tokens(t, dense_grid, nf, grid, frames, keep_ratio)
        b, n, m = x.shape[0], dense_grid[0] * dense_grid[1], sgrid[0] * sgrid[1]
        conds = self.conditions(t, y, encoder_attention_mask)
        tpos = self.temporal_embedding(nf)  # (1, F, D)
        # The tables the recovery merges re-add (None: off, as in the SparseDiT authors' code).
        readd = self.config.recovery_pos_embed
        recovery_tpos = tpos if readd else None
        recovery_spos = self.position_embedding(dense_grid) if readd else None
        run = self.run_block

        def to(z: Tensor, axis: str, want: str) -> Tensor:
            return z if axis == want else swap_layout(z, b)

        h, h_axis = self.embed(x, dense_grid), "s"  # dense tokens, (B*F, N, D)
        xs, xs_axis = h, "s"  # current sparse tokens
        dense_s = dense_t = h  # inputs of gen_s / gen_t, kept for recovery
        for i, (block, kind, axis) in enumerate(zip(self.blocks, self.kinds, self.axes, strict=True)):
            text = i % 2 == 0  # the source layer is spatial (text variant: it has text attention)
            if kind == "gen_s":
                dense_s = to(h, h_axis, "s")  # (B*F, N, D)
                xs = run(block, None, conds.rows(nf, text), dense_s, dense_grid, sgrid)  # (B*F, M, D)
                xs_axis = "s"
            elif kind == "gen_t":
                dense_t = to(xs, xs_axis, "t")  # (B*M, F, D)
                if i == 1:  # no poolingformers: the temporal table goes in before the first temporal layer
                    dense_t = dense_t + tpos
                xs = run(block, None, conds.rows(m, text), dense_t, (nf, 1), (sf, 1))  # (B*M, f, D)
                xs_axis = "t"
            elif kind == "sparse":
                xs, xs_axis = to(xs, xs_axis, axis), axis  # (B*f, M, D) or (B*M, f, D)
                xs = run(block, xs, conds.rows(sf if axis == "s" else m, text))
            elif kind == "recover_t":
                sparse = to(xs, xs_axis, "t")  # (B*M, f, D)
                xs = run(block, dense_t, conds.rows(m, text), sparse, (nf, 1), (sf, 1), recovery_tpos)  # (B*M, F, D)
                xs_axis = "t"
            elif kind == "recover_s":
                sparse = to(xs, xs_axis, "s")  # (B*F, M, D)
                h = run(block, dense_s, conds.rows(nf, text), sparse, dense_grid, sgrid, recovery_spos)  # (B*F, N, D)
                h_axis = "s"
            else:  # pool, dense, top: dense tokens
                h, h_axis = to(h, h_axis, axis), axis
                if i == 1:
                    h = h + tpos
                h = run(block, h, conds.rows(nf if axis == "s" else n, text))  # (B*F, N, D) or (B*N, F, D)
        return self.head(to(h, h_axis, "s"), conds, dense_grid, b)


def sparsify_latte(model: Latte, layout: str | Layout = "SparseLatte-XL", r_min: float = 0.80, r_max: float = 0.93,
                   **options: Any) -> SparseLatte:
    """Latte -> SparseLatte with the paper's initialisation (Sec. 3.3; :func:`sparsedit.sparsify.init_rules`).

    Layer i <- layer i; poolingformers keep V (rows [2D, 3D) of ``qkv``) and drop Q/K; generation and
    recovery blocks reuse the source q/k/v/proj as cross-attention; W1 = 0, W2 = I; embedders and final
    layer copied. ``options``: ``temporal_share``, ``num_timesteps``, ``upsample``.
    """
    from sparsedit.sparsify import apply_init_rules, init_rules, pooled_qkv_keys

    if type(model) is not Latte:
        raise SparseditError(f"sparsify_latte needs a dense Latte, got {type(model).__name__}")
    config = SparseLatteConfig.from_latte(model.config, layout, r_min=r_min, r_max=r_max, **options)
    sparse = SparseLatte(config)
    rules = init_rules(config, list(sparse.state_dict()))  # type: ignore[arg-type]  # only reads hidden_size
    apply_init_rules(model.state_dict(), sparse, rules, pooled_qkv_keys(sparse.kinds))
    return sparse.to(next(model.parameters()).dtype).eval()


# ------------------------------------------------------------------------------------------------
# checkpoints: diffusers LatteTransformer3DModel, original release state dicts
# ------------------------------------------------------------------------------------------------

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
    from sparsedit.pixart_convert import _BLOCK_MAP, _TOP_MAP, _WB

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
    from sparsedit.convert import _diffusers_model_dir, _load_diffusers_mapped

    path = _diffusers_model_dir(Path(path))
    config = latte_config_from_diffusers(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    return _load_diffusers_mapped(Latte(config), path, _latte_key_map(config))


def save_latte_diffusers(model: Latte, out: str | Path, overwrite: bool = False) -> Path:
    """Write a dense text-conditional Latte as a diffusers ``LatteTransformer3DModel`` directory.

    The inverse of :func:`latte_from_diffusers`. diffusers' class is Latte-T2V only (a class-conditional
    Latte has no diffusers class) and fixes the spatial interpolation scale to ``max(sample_size // 64, 1)``;
    a model with exact caption masking (``text_mask_bias=None``) exports with diffusers' -10000 bias
    (:func:`sparsedit.convert.export_differences`).
    """
    from sparsedit.convert import check_exportable, diffusers_state, write_diffusers_model

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
    from sparsedit.convert import _Source

    src = _Source(state, name)
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


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_latte(
    model: Latte,
    labels_or_text_embeds: Tensor | None,
    *,
    num_videos: int | None = None,
    text_mask: Tensor | None = None,
    null_embeds: Tensor | None = None,
    num_frames: int | None = None,
    sampler: str = "ddpm",
    steps: int = 250,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    cfg_mode: str = "all",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Sample videos; returns (B, C, F, H, W) latents (pixels for a ``data_space="pixel"`` model).

    ``labels_or_text_embeds``: class labels (B,), T5 embeddings (B, L, C_text) (with ``text_mask``),
    or None for an unconditional model (then ``num_videos``). Guidance (``cfg_scale != 1``) uses the
    null class, or ``null_embeds`` for text; ``cfg_mode`` "all" guides every latent channel as the
    Latte release does. Runs :func:`sparsedit.samplers.sample` (a SparseLatte picks its token set per
    step from the original timesteps); all noise comes from a CPU generator seeded with ``seed``.
    The release samples with 250 DDPM steps.
    """
    from sparsedit.sampling import sample_batch

    cfg = model.config
    cond = labels_or_text_embeds
    n = num_videos if cond is None else cond.shape[0]
    if n is None:
        raise SparseditError("pass labels / text embeddings, or num_videos for an unconditional Latte")
    kwargs: dict[str, Any] = {"y": None if cond is None else cond.to(device)}
    if text_mask is not None:
        kwargs["encoder_attention_mask"] = text_mask.to(device)
    if cfg_scale != 1.0 and cfg.text:
        kwargs["null_embeds"] = None if null_embeds is None else null_embeds.to(device)
    h, w = cfg.latent_hw
    frames = cfg.num_frames if num_frames is None else num_frames
    return sample_batch(
        model, (n, cfg.in_channels, frames, h, w), kwargs, sampler=sampler, steps=steps, eta=eta,
        cfg_scale=cfg_scale, cfg_mode=cfg_mode, seed=seed, device=device, progress=progress,
    )


def save_video_strip(videos: Tensor, path: str | Path) -> Path:
    """Write (B, C, F, H, W) videos in [-1, 1] (C = 1 or 3) as one PNG: one row per video, frames left to right."""
    from sparsedit.images import save_grid

    b, c, f, hh, ww = videos.shape
    frames = videos.transpose(1, 2).reshape(b * f, c, hh, ww)  # (B*F, C, H, W), video-major
    return save_grid(frames, path, nrow=f)


def save_video_gif(videos: Tensor, path: str | Path, fps: int = 8, nrow: int | None = None) -> Path:
    """Write a (C, F, H, W) video or (B, C, F, H, W) videos in [-1, 1] as one animated GIF (Pillow), atomically.

    Several videos play side by side: each GIF frame is the grid (``nrow`` per row) of the videos' frame.
    """
    from PIL import Image

    from sparsedit.checkpoint import atomic_write
    from sparsedit.images import make_grid

    if videos.ndim == 4:
        videos = videos[None]
    padding = 0 if videos.shape[0] == 1 else 2
    grids = [make_grid(videos[:, :, f], nrow, padding) for f in range(videos.shape[2])]  # F x (H', W', C)
    frames = [Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g) for g in grids]
    path = Path(path)
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=max(1, round(1000 / fps)), loop=0))
    return path


register_model_type("Latte", LatteConfig, Latte)
register_model_type("SparseLatte", SparseLatteConfig, SparseLatte)
