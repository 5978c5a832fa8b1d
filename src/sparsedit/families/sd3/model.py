"""Stable Diffusion 3 / 3.5 (Esser et al., 2024, https://arxiv.org/abs/2403.03206): the dense MMDiT.

An MMDiT keeps two token streams, the image patches and the caption tokens, each with its own weights (adaLN-Zero
regressor, q/k/v, output projection, MLP), and lets them meet in one joint attention: the queries, keys and
values of both streams are concatenated along the sequence and go through a single softmax. The conditioning
vector is a timestep embedding plus an embedding of the pooled CLIP text vector. SD3.5 adds RMS q/k
normalisation and, in its medium model, "MMDiT-X" blocks with a second, image-only self-attention
(``dual_attention_layers``). The last block's caption stream only supplies keys and values ("context pre-only").

Numerics follow diffusers' ``SD3Transformer2DModel`` (``models/transformers/transformer_sd3.py`` with
``JointTransformerBlock``, ``JointAttnProcessor2_0``, ``AdaLayerNormZero``, ``SD35AdaLayerNormZeroX``,
``AdaLayerNormContinuous``, ``RMSNorm``, ``PatchEmbed`` with ``pos_embed_max_size``) op for op; the code is ours
and its module names follow DiT's (``x_embedder``, ``t_embedder``, ``blocks``, ``final_layer``). The weight
mapping lives in :mod:`sparsedit.families.sd3.convert`. Shapes: B batch, N image tokens, L caption tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsedit.core.layers import (
    FinalLayer,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    init_linears_and_patch_embed,
    modulate,
    unpatchify,
)
from sparsedit.encoders.vae import VAE_DOWNSAMPLE
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import GridConfig
from sparsedit.families.pixart.model import pixart_pos_embed

Grid = tuple[int, int]

SD3_HEAD_DIM = 64
SD3_CAPTION_CHANNELS = 4096  # CLIP-L/G hidden states zero-padded to T5-XXL's 4096, and T5's own
SD3_POOLED_CHANNELS = 2048  # pooled CLIP-L (768) + CLIP-G (1280)
# The pipelines' caption: 77 CLIP tokens followed by 256 T5 tokens (max_sequence_length 256), 333 in all.
SD3_TEXT_TOKENS = 77 + 256
QK_NORMS = ("rms_norm",)
# Released transformers (their diffusers transformer/config.json): depth (num_layers) = heads, head dim 64,
# pos_embed_max_size, qk_norm, dual_attention_layers. All take 16 latent channels, patch 2, sample_size 128.
SD3_SIZES: dict[str, tuple[int, int, str | None, tuple[int, ...]]] = {
    "SD3-medium": (24, 192, None, ()),  # stabilityai/stable-diffusion-3-medium-diffusers
    "SD3.5-medium": (24, 384, "rms_norm", tuple(range(13))),  # stabilityai/stable-diffusion-3.5-medium
    "SD3.5-large": (38, 192, "rms_norm", ()),  # stabilityai/stable-diffusion-3.5-large (and -large-turbo)
}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@dataclass
class SD3Config(GridConfig):
    """Everything needed to rebuild an SD3 / SD3.5 transformer; saved as ``config.json`` beside the weights.

    ``input_size`` is the latent size the model is built and measured at (diffusers' ``sample_size``); the model
    runs at any latent size whose token grid fits the stored ``pos_embed_max_size`` square position table.
    ``caption_channels`` / ``pooled_channels`` are diffusers' ``joint_attention_dim`` / ``pooled_projection_dim``;
    the caption projection is always ``hidden_size`` wide (its ``caption_projection_dim``).
    """

    input_size: int | tuple[int, int] = 128  # latent size, H or (H, W)
    patch_size: int = 2
    in_channels: int = 16
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    learn_sigma: bool = False
    caption_channels: int = SD3_CAPTION_CHANNELS
    pooled_channels: int = SD3_POOLED_CHANNELS
    pos_embed_max_size: int = 192
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with SD3.5's second, image-only attention
    data_space: str = "latent"
    model_type: str = field(default="SD3", init=False)

    def __post_init__(self) -> None:
        self.check_input("; pick an image size whose latent is a multiple of the patch size")
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.hidden_size % self.num_heads:
            raise SparseditError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise SparseditError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos position table)")
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise SparseditError(f"qk_norm {self.qk_norm!r} is not supported; use None (SD3) or 'rms_norm' (SD3.5)")
        bad = [i for i in self.dual_attention_layers if not isinstance(i, int) or not 0 <= i < self.depth]
        if bad or len(set(self.dual_attention_layers)) != len(self.dual_attention_layers):
            raise SparseditError(f"dual_attention_layers {list(self.dual_attention_layers)} must be distinct block "
                                 f"indices in [0, {self.depth})")
        h, w = self.grid
        if max(h, w) > self.pos_embed_max_size:
            raise SparseditError(f"token grid {h}x{w} exceeds pos_embed_max_size {self.pos_embed_max_size}; pick a "
                                 f"latent of at most {self.pos_embed_max_size * self.patch_size} per side")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def sd3_config(preset: str, image_size: int = 1024, vae_downsample: int = VAE_DOWNSAMPLE,
               **overrides: Any) -> SD3Config:
    """The released transformer ``preset`` ("SD3-medium", "SD3.5-medium", "SD3.5-large") at ``image_size`` px."""
    if preset not in SD3_SIZES:
        raise SparseditError(f"unknown SD3 preset {preset!r}; choose one of {', '.join(SD3_SIZES)}")
    if image_size % vae_downsample:
        raise SparseditError(f"image size {image_size} is not divisible by the VAE factor {vae_downsample}")
    depth, max_size, qk_norm, dual = SD3_SIZES[preset]
    kwargs: dict[str, Any] = dict(
        input_size=image_size // vae_downsample, hidden_size=depth * SD3_HEAD_DIM, depth=depth, num_heads=depth,
        pos_embed_max_size=max_size, qk_norm=qk_norm, dual_attention_layers=dual,
    )
    kwargs.update(overrides)
    return SD3Config(**kwargs)


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm of the last dim with a learned scale (SD3.5's per-head q/k norm, eps 1e-6).

    The mean square is taken in float32 and the result cast to a half-precision weight's dtype before the scale,
    as diffusers' ``RMSNorm`` does, so bf16 / fp16 runs agree with it too.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    return x.transpose(1, 2).flatten(2)


def _qk_norms(head_dim: int, qk_norm: bool) -> tuple[RMSNorm | None, RMSNorm | None]:
    return (RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm else (None, None)


class SelfAttention(nn.Module):
    """Multi-head attention of one token stream: fused q/k/v (``qkv``: q, k, v stacked), optional RMS norm of each
    head's queries and keys, output projection. On its own it is SD3.5's image-only second attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = _qk_norms(dim // num_heads, qk_norm)

    def heads(self, x: Tensor, source: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) tokens -> q, k, v, each (B, heads, N, d), queries and keys normalised.

        With ``source`` (B, M, D) the keys and values come from it, through the same weights (rows [D, 3D) of
        ``qkv``): SparseSD3's generation and recovery blocks reuse a pretrained self-attention as cross-attention.
        """
        if source is None:
            q, k, v = (split_heads(z, self.num_heads) for z in self.qkv(x).chunk(3, dim=-1))
        else:
            d = x.shape[-1]
            w, b = self.qkv.weight, self.qkv.bias
            q = split_heads(F.linear(x, w[:d], b[:d]), self.num_heads)  # (B, heads, N, d)
            k, v = (split_heads(z, self.num_heads) for z in F.linear(source, w[d:], b[d:]).chunk(2, dim=-1))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        out = F.scaled_dot_product_attention(*self.heads(x, source))  # (B, heads, N, d)
        return self.proj(merge_heads(out))  # (B, N, D)


class JointAttention(SelfAttention):
    """MMDiT attention: image and caption tokens, each with its own projections (and q/k norms), attend in one softmax
    over both sequences (image first, as diffusers concatenates them); each stream has its own output projection.

    With ``context_pre_only`` (the last block) the caption stream ends here: its attention outputs would be thrown
    away, so it supplies only keys and values (``context_kv``) and no caption queries are computed. SD3 computes and
    discards them; their weights are kept as buffers (``unused_context_q_*``) so a checkpoint round-trips unchanged.
    They are no parameters: no optimizer state, and no parameter without a gradient to stop DDP.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, context_pre_only: bool):
        super().__init__(dim, num_heads, qk_norm)
        head_dim = dim // num_heads
        self.context_pre_only = context_pre_only
        if context_pre_only:
            self.context_kv = nn.Linear(dim, 2 * dim)
            self.context_proj = None
            self.context_q_norm = None
            self.context_k_norm = RMSNorm(head_dim) if qk_norm else None
            self.register_buffer("unused_context_q_weight", torch.zeros(dim, dim))
            self.register_buffer("unused_context_q_bias", torch.zeros(dim))
            if qk_norm:
                self.register_buffer("unused_context_q_norm", torch.ones(head_dim))
        else:
            self.context_qkv = nn.Linear(dim, 3 * dim)
            self.context_proj = nn.Linear(dim, dim)
            self.context_q_norm, self.context_k_norm = _qk_norms(head_dim, qk_norm)

    def forward(self, x: Tensor, context: Tensor,  # type: ignore[override]
                source: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D) image tokens, context: (B, L, D) caption tokens -> their attention outputs (None for the
        caption stream of the last block). ``source`` (B, M, D): image keys / values from other tokens than the
        image queries (SparseSD3's cross-attending blocks); None is the dense joint attention."""
        n = x.shape[1]
        q, k, v = self.heads(x, source)  # (B, heads, N, d) queries, (B, heads, N or M, d) keys and values
        if self.context_pre_only:
            ck, cv = (split_heads(z, self.num_heads) for z in self.context_kv(context).chunk(2, dim=-1))
            if self.context_k_norm is not None:
                ck = self.context_k_norm(ck)
            out = F.scaled_dot_product_attention(q, torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2))
            return self.proj(merge_heads(out)), None  # (B, N, D)
        cq, ck, cv = (split_heads(z, self.num_heads) for z in self.context_qkv(context).chunk(3, dim=-1))
        if self.context_q_norm is not None and self.context_k_norm is not None:
            cq, ck = self.context_q_norm(cq), self.context_k_norm(ck)
        out = F.scaled_dot_product_attention(torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2),
                                             torch.cat([v, cv], dim=2))  # (B, heads, N + L, d)
        out = merge_heads(out)  # (B, N + L, D)
        return self.proj(out[:, :n]), self.context_proj(out[:, n:])  # (B, N, D), (B, L, D)


# ------------------------------------------------------------------------------------------------
# the block
# ------------------------------------------------------------------------------------------------


class JointBlock(nn.Module):
    """One MMDiT block: adaLN-Zero on both streams, joint attention, one MLP per stream.

    The image regressor ``adaLN_modulation`` gives (shift, scale, gate) for the attention and for the MLP, as in
    DiT; a ``dual`` block (SD3.5's MMDiT-X, diffusers' ``SD35AdaLayerNormZeroX``) adds (shift, scale, gate) of a
    second, image-only attention ``attn2``, fed from the same normalised tokens and added after the joint one. The
    caption stream has its own regressor ``context_adaLN_modulation``: the same six chunks, or in the
    ``context_pre_only`` last block only (shift, scale) of its keys' and values' input (diffusers'
    ``AdaLayerNormContinuous``; we store the halves in this order, diffusers stores (scale, shift)). Every
    LayerNorm has no affine and eps 1e-6.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, dual: bool = False,
                 context_pre_only: bool = False):
        super().__init__()
        self.dual = dual
        self.context_pre_only = context_pre_only
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # parameter-free: one for every use
        self.adaLN_modulation = adaln_modulation(dim, 9 if dual else 6)
        self.context_adaLN_modulation = adaln_modulation(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, num_heads, qk_norm, context_pre_only)
        self.attn2 = SelfAttention(dim, num_heads, qk_norm) if dual else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.context_mlp = None if context_pre_only else Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor, c: Tensor,
                source: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D), context: (B, L, D), c: (B, D) -> new (x, context); context is None after the last block.

        ``source`` (B, M, D), for SparseSD3: the image keys and values of both attentions come from these tokens,
        normalised and modulated like ``x``, while ``x`` stays the queries and the residual stream (None: the
        dense block, computed op for op as without the argument)."""
        mods = self.adaLN_modulation(c).chunk(9 if self.dual else 6, dim=1)  # each (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = self.norm(x)  # (B, N, D)
        s_norm = None if source is None else self.norm(source)  # (B, M, D)
        context_mods = self.context_adaLN_modulation(c).chunk(2 if self.context_pre_only else 6, dim=1)
        context_in = modulate(self.norm(context), context_mods[0], context_mods[1])  # (B, L, D)
        if s_norm is None:
            attn_x, attn_context = self.attn(modulate(x_norm, shift_msa, scale_msa), context_in)
        else:
            attn_x, attn_context = self.attn(modulate(x_norm, shift_msa, scale_msa), context_in,
                                             modulate(s_norm, shift_msa, scale_msa))
        x = x + gate_msa.unsqueeze(1) * attn_x  # (B, N, D)
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            queries = modulate(x_norm, shift_msa2, scale_msa2)
            attn2 = self.attn2(queries) if s_norm is None else self.attn2(queries, modulate(s_norm, shift_msa2,
                                                                                             scale_msa2))
            x = x + gate_msa2.unsqueeze(1) * attn2
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm(x), shift_mlp, scale_mlp))
        if self.context_mlp is None or attn_context is None:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_mods
        context = context + c_gate_msa.unsqueeze(1) * attn_context  # (B, L, D)
        context = context + c_gate_mlp.unsqueeze(1) * self.context_mlp(modulate(self.norm(context), c_shift_mlp,
                                                                               c_scale_mlp))
        return x, context


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


class SD3(nn.Module):
    """SD3 / SD3.5 transformer: patchify + cropped position table -> N x JointBlock -> final adaLN layer -> unpatchify.

    ``forward(x, t, encoder_hidden_states, pooled_projections)`` maps latents (B, C, H, W), timesteps (B,) in
    [0, 1000] as diffusers' SD3 takes them (flow matching: ``sigma * 1000``), caption embeddings (B, L, C_text)
    and pooled text embeddings (B, C_pooled) to the prediction (B, C_out, H, W). Any latent size works whose token
    grid fits the ``pos_embed_max_size`` square table: its centre crop is the grid's position embedding. SD3 takes
    no caption mask (its pipelines attend to every token, padding included).
    """

    config: SD3Config

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # trade compute for memory in training (see run_block)
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)  # [cos, sin], shift 0: Timesteps(flip_sin_to_cos=True, shift=0)
        self.pooled_embedder = nn.Sequential(nn.Linear(config.pooled_channels, d), nn.SiLU(), nn.Linear(d, d))
        self.context_embedder = nn.Linear(config.caption_channels, d)
        self.blocks = self.build_blocks(config)
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        # The (1, M*M, D) table of an M x M token square, M = pos_embed_max_size. Checkpoints store it (diffusers
        # keeps it as a persistent buffer, not a parameter), so it is loaded, not recomputed.
        self.register_buffer("pos_table", self.initial_position_table())
        self.initialize_weights()

    def build_blocks(self, config: SD3Config) -> nn.ModuleList:
        """The joint blocks; the last one's caption stream is context pre-only (SparseSD3 builds its own kinds)."""
        return nn.ModuleList(
            JointBlock(config.hidden_size, config.num_heads, config.mlp_ratio, qk_norm=config.qk_norm is not None,
                       dual=i in config.dual_attention_layers, context_pre_only=i == config.depth - 1)
            for i in range(config.depth)
        )

    def initial_position_table(self) -> Tensor:
        """diffusers' initial table: 2-D sin-cos over the M x M square at positions ``i / (M / base)``,
        ``base`` the configured token grid's height."""
        m = self.config.pos_embed_max_size
        return pixart_pos_embed(self.config.hidden_size, (m, m), self.config.grid[0], 1.0)[None]

    def initialize_weights(self) -> None:
        """A from-scratch start in DiT's manner: xavier linears, N(0, 0.02) embedders, zeroed adaLN and output."""
        init_linears_and_patch_embed(self, self.x_embedder)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.pooled_embedder[0], self.pooled_embedder[2]):
            nn.init.normal_(m.weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed += [block.adaLN_modulation[-1], block.context_adaLN_modulation[-1]]
        for m in zeroed:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def token_grid(self, x: Tensor) -> Grid:
        cfg = self.config
        p = cfg.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[-2] % p or x.shape[-1] % p:
            raise SparseditError(f"input of shape {tuple(x.shape)} does not fit this model: expected (B, "
                                 f"{cfg.in_channels}, H, W) with H and W multiples of {p}")
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if max(h, w) > cfg.pos_embed_max_size:
            raise SparseditError(f"a {x.shape[-2]}x{x.shape[-1]} latent is a {h}x{w} token grid, larger than the "
                                 f"{cfg.pos_embed_max_size}x{cfg.pos_embed_max_size} position table; use a smaller size")
        return h, w

    def position_embedding(self, grid: Grid) -> Tensor:
        """(1, h*w, D): the centre crop of the stored square table (diffusers' ``cropped_pos_embed``)."""
        m = self.config.pos_embed_max_size
        h, w = grid
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_table.view(1, m, m, -1)[:, top:top + h, left:left + w]  # (1, h, w, D)
        return table.reshape(1, h * w, -1)

    def check_text(self, encoder_hidden_states: Tensor, pooled_projections: Tensor, batch: int) -> None:
        cfg = self.config
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.caption_channels:
            raise SparseditError(f"encoder_hidden_states of shape {tuple(encoder_hidden_states.shape)}: expected "
                                 f"(B, L, {cfg.caption_channels}) caption embeddings")
        if pooled_projections.ndim != 2 or pooled_projections.shape[-1] != cfg.pooled_channels:
            raise SparseditError(f"pooled_projections of shape {tuple(pooled_projections.shape)}: expected "
                                 f"(B, {cfg.pooled_channels}) pooled text embeddings")
        if encoder_hidden_states.shape[0] != batch or pooled_projections.shape[0] != batch:
            raise SparseditError(f"encoder_hidden_states / pooled_projections have batch {encoder_hidden_states.shape[0]}"
                                 f" / {pooled_projections.shape[0]} for {batch} latents; pass one row per latent")

    def run_block(self, block: nn.Module, *args: Any) -> tuple[Tensor, Tensor | None]:
        """Call ``block``, recomputing its activations in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor) -> Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1000], encoder_hidden_states: (B, L, C_text), pooled_projections:
        (B, C_pooled) -> (B, C_out, H, W)."""
        grid = self.token_grid(x)
        batch = x.shape[0]
        t = t.expand(batch) if t.ndim == 0 else t
        self.check_text(encoder_hidden_states, pooled_projections, batch)
        h = self.x_embedder(x) + self.position_embedding(grid)  # (B, N, D)
        c = self.t_embedder(t) + self.pooled_embedder(pooled_projections)  # (B, D)
        context: Tensor | None = self.context_embedder(encoder_hidden_states)  # (B, L, D)
        for block in self.blocks:
            h, context = self.run_block(block, h, context, c)  # (B, N, D), (B, L, D) or None after the last
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(h, grid, self.config.patch_size, self.config.out_channels)  # (B, C_out, H, W)
