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
  spatial blocks only, PixArt's final layer (:mod:`sparsedit.families.pixart.model`). Loaded by
  :func:`latte_from_diffusers`, equal to diffusers' outputs.

SparseLatte (paper Appendix A.3) is described in docs/latte.md and at
:class:`SparseLatte`. Shapes: B batch, F frames, N patches per frame, D hidden, L text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.core.blocks import DenseRecoveryBlock, Poolingformer, SparseGenerationBlock, reset_merges
from sparsedit.core.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    init_linears_and_patch_embed,
    unpatchify,
)
from sparsedit.core.layout import Layout
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import CFG_MODES, DIT_SIZES, DiT, GridConfig, GuidanceMixin
from sparsedit.families.pixart.layers import (
    CaptionEmbedder,
    PixArtBlock,
    PixArtCond,
    PixArtFinalLayer,
    match_batch,
    text_attention_mask,
)
from sparsedit.families.pixart.model import T5_CHANNELS, PixArt, pixart_pos_embed
from sparsedit.families.pixart.sparse import PixArtGenerationBlock, PixArtPoolingformer, PixArtRecoveryBlock

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
    ``"text"`` (see :class:`sparsedit.families.pixart.model.PixArtConfig`).
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
                emb = emb + self.y_embedder(match_batch(y.reshape(-1), batch, "labels"))
            return _Conditions(emb, None)
        if y is None:
            raise SparseditError("this Latte is text-conditional: pass T5 embeddings (B, L, C_text)")
        caption = y.squeeze(1) if y.ndim == 4 else y
        if caption.ndim != 3 or caption.shape[-1] != self.config.caption_channels:
            raise SparseditError(
                f"encoder_hidden_states of shape {tuple(caption.shape)}: expected (B, L, {self.config.caption_channels})"
            )
        text = self.y_embedder(match_batch(caption, batch, "encoder_hidden_states").to(emb.dtype))  # (B, L, D)
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
        :meth:`sparsedit.families.pixart.model.PixArt.forward_with_cfg` semantics (``null_embeds`` required).
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


# ------------------------------------------------------------------------------------------------
# checkpoints: diffusers LatteTransformer3DModel, original release state dicts
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------


