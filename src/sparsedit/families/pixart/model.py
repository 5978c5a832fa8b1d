"""PixArt-alpha (Chen et al., 2023) and SparsePixArt: text-to-image DiTs with adaLN-single.

A PixArt block is a DiT block whose per-block adaLN regressor is replaced by a learned
``scale_shift_table`` [6, D] added to one shared modulation vector ``t0 = t_block(t_emb)``
("adaLN-single"), plus an un-gated, un-normalised cross-attention to the projected T5 caption
tokens between self-attention and the MLP. Module names follow the original release
(https://github.com/PixArt-alpha/PixArt-alpha, ``diffusion/model/nets/PixArt.py``, ``PixArtMS.py``,
``PixArt_blocks.py``) so its ``.pth`` state dicts load name for name; numerics were checked against
diffusers' ``PixArtTransformer2DModel`` / ``BasicTransformerBlock(norm_type="ada_norm_single")``.
The code is our own.

SparsePixArt sparsifies the self-attention token set only: poolingformers, SDTMs
(generation / sparse / recovery / dense blocks) and top blocks as in :mod:`sparsedit.families.dit.sparse`;
the text cross-attention of every block works on whatever tokens the block holds.

Both models reuse DiT's forward template: they provide the hooks ``token_grid``,
``position_embedding``, ``conditions``, ``run_block`` and ``head`` and pass a :class:`PixArtCond`
as the per-block condition ``c``, so :meth:`DiT.forward` and :meth:`SparseDiT.forward` (the
schedule-driven block loop) run unchanged. Shapes: B batch, N image tokens, L text tokens, D hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsedit.core.layers import (
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    init_linears_and_patch_embed,
    unpatchify,
)
from sparsedit.encoders.text import CAPTION_TOKENS
from sparsedit.encoders.vae import VAE_DOWNSAMPLE
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import CFG_MODES, DiT, GridConfig, GuidanceMixin
from sparsedit.families.pixart.layers import (
    CaptionEmbedder,
    PixArtBlock,
    PixArtCond,
    PixArtFinalLayer,
    match_batch,
    text_attention_mask,
)

Grid = tuple[int, int]

# PixArt-XL/2 (the only released size): depth, hidden size, heads (head dim 72).
PIXART_XL = (28, 1152, 16)
PIXART_HEAD_DIM = 72
# Position-embedding interpolation scale ("lewei_scale") per training resolution, as the original
# inference script uses it (PixArt-alpha scripts/inference.py; diffusers' PixArt converter copies it).
PIXART_INTERPOLATION = {256: 0.5, 512: 1.0, 1024: 2.0}
T5_CHANNELS = 4096


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@dataclass
class PixArtConfig(GridConfig):
    """Everything needed to rebuild a PixArt-alpha; saved as ``config.json`` beside the weights.

    ``interpolation_scale`` and ``base_size`` define the sin-cos position table: token (i, j) of an
    h x w grid sits at ``(i / (h / base), j / (w / base)) / interpolation_scale`` with ``base``
    = ``base_size`` or, when None, the config's token-grid height (diffusers' ``PatchEmbed`` and the
    original ``get_2d_sincos_pos_embed``). The originals train 256/512/1024 px with scales
    0.5/1/2; diffusers' config default when its field is null is ``max(sample_size // 64, 1)``,
    which is 1 (not 0.5) at 256 px: the loaders read the value each format actually uses.
    ``text_mask_bias`` names the one masking difference between the two writers (see the field).
    ``null_caption_length`` > 0 stores the original's learned null caption ``y_embedding``
    [L, caption_channels] (diffusers drops it; guidance then needs explicit null embeddings).
    """

    input_size: int | tuple[int, int] = 64  # latent size, H or (H, W)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    caption_channels: int = T5_CHANNELS
    null_caption_length: int = CAPTION_TOKENS
    class_dropout_prob: float = 0.1  # caption dropout (to the null caption) in training
    use_additional_conditions: bool = False  # 1024-MS: resolution + aspect-ratio embeddings
    interpolation_scale: float = 1.0
    base_size: int | None = None
    norm_eps: float = 1e-6  # block LayerNorms (diffusers' norm_eps); the final norm is always 1e-6
    # How padded caption tokens are masked: None = excluded exactly (boolean SDPA mask; the original's
    # xformers block-diagonal attention), a number = added to their logits (diffusers: -10000, which
    # only masks while logit spreads stay well below 1e4, as they do with trained weights).
    text_mask_bias: float | None = None
    data_space: str = "latent"
    model_type: str = field(default="PixArt", init=False)

    def __post_init__(self) -> None:
        self.check_input()
        if self.hidden_size % self.num_heads:
            raise SparseditError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise SparseditError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)")
        if self.use_additional_conditions and self.hidden_size % 3:
            raise SparseditError(
                f"use_additional_conditions needs hidden_size divisible by 3 (two size embeddings of D/3 "
                f"and one aspect-ratio embedding of D/3), got {self.hidden_size}"
            )
        if self.interpolation_scale <= 0:
            raise SparseditError(f"interpolation_scale must be positive, got {self.interpolation_scale}")

    @property
    def pos_base_size(self) -> int:
        return self.base_size if self.base_size is not None else self.grid[0]


def pixart_config(image_size: int = 512, vae_downsample: int = 8, **overrides: Any) -> PixArtConfig:
    """PixArt-XL/2 at ``image_size`` px (256, 512 or 1024; 1024 adds the size/aspect-ratio embeddings)."""
    if image_size not in PIXART_INTERPOLATION:
        raise SparseditError(f"PixArt-alpha was released at {sorted(PIXART_INTERPOLATION)} px, not {image_size}")
    depth, hidden, heads = PIXART_XL
    kwargs: dict[str, Any] = dict(
        input_size=image_size // vae_downsample, hidden_size=hidden, depth=depth, num_heads=heads,
        interpolation_scale=PIXART_INTERPOLATION[image_size], use_additional_conditions=image_size == 1024,
    )
    kwargs.update(overrides)
    return PixArtConfig(**kwargs)


def size_conditions(latent_hw: Sequence[int], batch: int, device: str | torch.device = "cpu",
                    vae_downsample: int = VAE_DOWNSAMPLE) -> dict[str, Tensor]:
    """PixArt-1024-MS's ``added_cond_kwargs`` for latents of ``latent_hw``: the image height / width in
    pixels (B, 2) and the aspect ratio h / w (B, 1), as its pipelines pass them."""
    h, w = (int(s) * vae_downsample for s in latent_hw)
    return {"resolution": torch.tensor([[h, w]], dtype=torch.float32, device=device).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32, device=device).repeat(batch, 1)}


def pixart_pos_embed(dim: int, grid: Grid, base_size: int, interpolation_scale: float) -> Tensor:
    """PixArt's 2-D sin-cos table, (h*w, dim), row-major tokens.

    The layout of :func:`sparsedit.core.layers.sincos_pos_embed_2d` (first half of the channels: column,
    second half: row; ``[sin, cos]`` each) at fractional positions ``arange(n) / (n / base) / scale``,
    computed in float32 like both writers, then embedded in float64 and cast to float32.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    h, w = grid

    def coords(n: int) -> Tensor:
        return (torch.arange(n, dtype=torch.float32) / (n / base_size) / interpolation_scale).double()

    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos[:, None] * omega[None]  # (N, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows = coords(h).repeat_interleave(w)  # (N,)
    cols = coords(w).repeat(h)  # (N,)
    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


# ------------------------------------------------------------------------------------------------
# conditioning
# ------------------------------------------------------------------------------------------------


@dataclass
class PixArtInputs:
    """The raw text-side inputs of one forward, passed where DiT passes its labels ``y``."""

    encoder_hidden_states: Tensor
    encoder_attention_mask: Tensor | None = None
    added_cond_kwargs: dict[str, Tensor] | None = None


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# PixArt
# ------------------------------------------------------------------------------------------------


class PixArt(nn.Module):
    """PixArt-alpha: patchify -> N x PixArtBlock (adaLN-single, text cross-attention) -> final layer.

    ``forward(x, t, encoder_hidden_states, encoder_attention_mask=None, added_cond_kwargs=None)``
    maps latents (B, C, H, W), timesteps (B,) and T5 embeddings (B, L, 4096) (or the original's
    (B, 1, L, 4096)) with a (B, L) keep-mask to (B, C_out, H, W). ``added_cond_kwargs`` (1024-MS
    models): ``{"resolution": (B, 2) image height/width in px, "aspect_ratio": (B, 1)}``.
    """

    config: PixArtConfig

    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)  # [cos, sin], frequency shift 0 (both writers)
        self.t_block = adaln_modulation(d, 6)  # adaLN-single: SiLU -> Linear(D, 6D), shared by all blocks
        self.y_embedder = CaptionEmbedder(config.caption_channels, d, config.null_caption_length,
                                          config.class_dropout_prob)
        if config.use_additional_conditions:
            self.csize_embedder = TimestepEmbedder(d // 3)  # image height and width, D/3 each
            self.ar_embedder = TimestepEmbedder(d // 3)  # aspect ratio
        self.blocks = self.build_blocks(config)
        self.final_layer = PixArtFinalLayer(d, config.patch_size, config.out_channels)
        self.register_buffer("pos_embed", self.position_table(config.grid)[None], persistent=False)
        self.initialize_weights()

    # DiT's forward template and helpers, reused as is (see the module docstring).
    token_grid = DiT.token_grid
    run_block = DiT.run_block
    _blocks_forward = DiT.forward

    def build_blocks(self, config: PixArtConfig) -> nn.ModuleList:
        return nn.ModuleList(
            PixArtBlock(config.hidden_size, config.num_heads, config.mlp_ratio, config.norm_eps)
            for _ in range(config.depth)
        )

    def initialize_weights(self) -> None:
        """The original's initialisation: xavier linears, N(0, 0.02) embedders, zero text proj and output."""
        init_linears_and_patch_embed(self, self.x_embedder)
        embed_mlps = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.y_embedder.y_proj.fc1,
                      self.y_embedder.y_proj.fc2]
        if self.config.use_additional_conditions:
            embed_mlps += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2], self.ar_embedder.mlp[0],
                           self.ar_embedder.mlp[2]]
        for m in embed_mlps:
            nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def position_table(self, grid: Grid) -> Tensor:
        cfg = self.config
        return pixart_pos_embed(cfg.hidden_size, grid, cfg.pos_base_size, cfg.interpolation_scale)

    def position_embedding(self, grid: Grid) -> Tensor:
        """(1, H*W, D); another grid than the config's (multi-aspect sampling) is computed on the fly."""
        if grid == self.config.grid:
            return self.pos_embed
        return self.position_table(grid)[None].to(self.pos_embed)

    def embed_timestep(self, t: Tensor, added_cond_kwargs: dict[str, Tensor] | None, batch: int) -> Tensor:
        """(B,) timesteps (+ size conditions) -> (B, D) embedded timestep."""
        emb = self.t_embedder(t)  # (B, D)
        if not self.config.use_additional_conditions:
            return emb
        if not added_cond_kwargs or "resolution" not in added_cond_kwargs or "aspect_ratio" not in added_cond_kwargs:
            raise SparseditError(
                "this PixArt was trained with size conditions: pass added_cond_kwargs={'resolution': (B, 2) "
                "height/width in px, 'aspect_ratio': (B, 1)}"
            )
        sizes = []
        for embedder, key in ((self.csize_embedder, "resolution"), (self.ar_embedder, "aspect_ratio")):
            s = torch.as_tensor(added_cond_kwargs[key], device=t.device)
            s = match_batch(s.reshape(s.shape[0], -1), batch, key)  # (B, k)
            sizes.append(embedder(s.flatten()).reshape(batch, -1))  # (B, k * D/3)
        return emb + torch.cat(sizes, dim=1)  # (B, D)

    def conditions(self, t: Tensor, inputs: PixArtInputs) -> list[PixArtCond]:
        """One shared :class:`PixArtCond` per block (adaLN-single: no per-block regressor)."""
        batch = t.shape[0]
        emb = self.embed_timestep(t, inputs.added_cond_kwargs, batch)  # (B, D)
        caption = inputs.encoder_hidden_states
        if caption.ndim == 4:  # the original's (B, 1, L, C)
            caption = caption.squeeze(1)
        if caption.ndim != 3 or caption.shape[-1] != self.config.caption_channels:
            raise SparseditError(
                f"encoder_hidden_states of shape {tuple(caption.shape)}: expected (B, L, "
                f"{self.config.caption_channels}) T5 embeddings"
            )
        caption = match_batch(caption, batch, "encoder_hidden_states")
        text = self.y_embedder(caption.to(emb.dtype))  # (B, L, D)
        mask = text_attention_mask(inputs.encoder_attention_mask, batch, text.shape[1], self.config.text_mask_bias,
                                   text.dtype)
        cond = PixArtCond(t0=self.t_block(emb), emb=emb, text=text, mask=mask)
        return [cond] * len(self.blocks)

    block_tokens = DiT.block_tokens  # hidden states are (B, N, D) as in DiT

    def head(self, h: Tensor, c: PixArtCond, grid: Grid) -> Tensor:
        h = self.final_layer(h, c.emb)  # (B, N, p*p*C_out)
        return unpatchify(h, grid, self.config.patch_size, self.config.out_channels)  # (B, C_out, H, W)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor | None = None,
                added_cond_kwargs: dict[str, Tensor] | None = None) -> Tensor:
        """x: (B, C, H, W), t: (B,), encoder_hidden_states: (B, L, C_text) -> (B, C_out, H, W)."""
        inputs = PixArtInputs(encoder_hidden_states, encoder_attention_mask, added_cond_kwargs)
        return self._blocks_forward(x, t, inputs)

    def null_caption(self, batch: int) -> Tensor:
        """The stored null caption, (batch, L, C_text); an error if the checkpoint has none."""
        if self.y_embedder.y_embedding is None:
            raise SparseditError(
                "this PixArt has no stored null caption for guidance (diffusers checkpoints drop y_embedding): give the "
                "T5 embedding of the negative prompt (null_embeds; in the CLI --prompt with --negative-prompt, or "
                "'negative_embeds' in --prompt-embeds) or use no guidance (cfg_scale 1)"
            )
        return self.y_embedder.y_embedding[None].expand(batch, -1, -1)

    def forward_with_cfg(
        self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, cfg_scale: float,
        encoder_attention_mask: Tensor | None = None, null_embeds: Tensor | None = None,
        null_attention_mask: Tensor | None = None, added_cond_kwargs: dict[str, Tensor] | None = None,
        cfg_mode: str = "first3",
    ) -> Tensor:
        """Classifier-free guidance on a doubled batch ``x`` (2B; the first half is used for both).

        ``encoder_hidden_states`` / ``encoder_attention_mask`` are the B conditional captions. The
        unconditional half uses ``null_embeds`` (B or 1 rows) or, when None, the model's stored null
        caption ``y_embedding``. ``null_attention_mask`` defaults to the caption mask when the lengths
        agree (the original PixArt applies the prompt's mask to the null caption as well) and to
        all-ones otherwise; shorter sequences are zero-padded with masked tokens. Guided as in
        :meth:`GuidanceMixin.forward_with_cfg` (``cfg_mode`` "first3" as the originals, or "all").
        """
        if cfg_mode not in CFG_MODES:
            raise SparseditError(f"unknown cfg mode {cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
        if encoder_hidden_states.ndim == 4:
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        b = x.shape[0] // 2
        cond = match_batch(encoder_hidden_states, b, "encoder_hidden_states")
        null = self.null_caption(b) if null_embeds is None else match_batch(null_embeds, b, "null_embeds")
        null = null.to(cond)
        ones = torch.ones(b, cond.shape[1], device=cond.device)
        cond_mask = ones if encoder_attention_mask is None else match_batch(encoder_attention_mask, b, "mask").float()
        if null_attention_mask is not None:
            null_mask = match_batch(null_attention_mask, b, "null_attention_mask").float()
        elif null.shape[1] == cond.shape[1]:
            null_mask = cond_mask
        else:
            null_mask = torch.ones(b, null.shape[1], device=cond.device)
        length = max(cond.shape[1], null.shape[1])

        def pad(z: Tensor) -> Tensor:
            return F.pad(z, (0, 0, 0, length - z.shape[1])) if z.ndim == 3 else F.pad(z, (0, length - z.shape[1]))

        captions = torch.cat([pad(cond), pad(null)])  # (2B, L, C_text)
        masks = torch.cat([pad(cond_mask), pad(null_mask)])  # (2B, L)
        return GuidanceMixin.forward_with_cfg(
            self, x, t, captions, cfg_scale, cfg_mode, encoder_attention_mask=masks,
            added_cond_kwargs=added_cond_kwargs,
        )


# ------------------------------------------------------------------------------------------------
# SparsePixArt
# ------------------------------------------------------------------------------------------------


