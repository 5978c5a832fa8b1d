"""SparseWan's blocks: SparseDiT's poolingformer, generation, recovery and extra recovery blocks on Wan's block, and
the video token sets they move between (3-D adaptive average pooling, upsampling, RoPE positions of pooled tokens).
docs/wan.md, "SparseWan".

A token set is ``((h, w), f)``: ``f`` token frames of an ``h x w`` grid, flattened frame-major then row-major as the
Conv3d patch embedding flattens the dense tokens. Only the video tokens change set; the caption (and the I2V image
tokens) are keys / values of the cross-attention, which runs on whatever tokens a block holds. Every block keeps the
parameter names of the Wan block it replaces, so layer i loads layer i of the source Wan.

A cross-attending block takes its queries (and residual stream) from one token set and its self-attention keys /
values from another, each through the block's own ``norm1`` and time modulation and rotated by its own RoPE table;
the text cross-attention and the FFN then run per query token, as in the dense block. With the same tokens and the
same table on both sides it is the Wan block op for op (bit-identical).

Shapes: B batch, N = F * H * W dense and M = f * h * w sparse tokens, D hidden, H heads, Dh head channels,
L context tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsedit.core.blocks import RecoveryMerge
from sparsedit.families.flux.sparse import pooled_coordinates
from sparsedit.families.wan.model import Rope, WanBlock, apply_rope, attention, fp32_norm, rope_table

Grid = tuple[int, int]
TokenSet = tuple[Grid, int]  # ((h, w), frames)


# ------------------------------------------------------------------------------------------------
# token sets: pooling, upsampling, positions
# ------------------------------------------------------------------------------------------------


def to_volume(x: Tensor, tokens: TokenSet) -> Tensor:
    """(B, f*h*w, D) frame-major tokens -> (B, D, f, h, w)."""
    (h, w), f = tokens
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], f, h, w)


def from_volume(v: Tensor) -> Tensor:
    """(B, D, f, h, w) -> (B, f*h*w, D)."""
    return v.flatten(2).transpose(1, 2)


def pool_video(x: Tensor, dense: TokenSet, sparse: TokenSet) -> Tensor:
    """(B, N, D) -> (B, M, D): 3-D adaptive average pooling of the token volume (cells [floor(i F / f),
    ceil((i + 1) F / f)) per axis; the identity when the sets are equal)."""
    (h, w), f = sparse
    return from_volume(F.adaptive_avg_pool3d(to_volume(x, dense), (f, h, w)))


def upsample_video(x: Tensor, sparse: TokenSet, dense: TokenSet, mode: str) -> Tensor:
    """(B, M, D) -> (B, N, D): the sparse volume interpolated back to the dense set. ``nearest`` repeats cells in all
    three axes; ``bilinear`` is trilinear (linear in time too); ``bicubic`` is bicubic within each frame, then linear
    in time. The identity when the sets are equal."""
    if sparse == dense:
        return x
    (H, W), nf = dense
    v = to_volume(x, sparse)  # (B, D, f, h, w)
    if mode == "nearest":
        return from_volume(F.interpolate(v, size=(nf, H, W), mode="nearest"))
    if mode == "bilinear":
        return from_volume(F.interpolate(v, size=(nf, H, W), mode="trilinear", align_corners=False))
    b, d, f, h, w = v.shape
    frames = v.transpose(1, 2).reshape(b * f, d, h, w)  # (B*f, D, h, w)
    frames = F.interpolate(frames, size=(H, W), mode=mode, align_corners=False)  # (B*f, D, H, W)
    v = frames.reshape(b, f, d, H, W).transpose(1, 2)  # (B, D, f, H, W)
    return from_volume(F.interpolate(v, size=(nf, H, W), mode="trilinear", align_corners=False))


def pooled_positions(dense: TokenSet, sparse: TokenSet, device: torch.device | str | None = None) -> Tensor:
    """(M, 3) RoPE positions (frame, row, column) of the pooled tokens: the mean coordinates of the dense cells each
    one averages (cell [a, b) -> (a + b - 1) / 2 per axis: whole or half-whole numbers), in the order the tokens are
    flattened. float64 (float32 on MPS) as :func:`~sparsedit.families.wan.model.token_positions`, which equal sets
    give exactly."""
    ((H, W), nf), ((h, w), f) = dense, sparse
    dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    axes = [torch.tensor(pooled_coordinates(n, m), dtype=dtype, device=device) for n, m in ((nf, f), (H, h), (W, w))]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def pooled_rope(dense: TokenSet, sparse: TokenSet, axes: tuple[int, int, int], device: torch.device) -> Rope:
    """(cos, sin), each (M, Dh / 2), of the pooled tokens, by the dense model's own :func:`rope_table`."""
    return rope_table(pooled_positions(dense, sparse, device), axes)


# ------------------------------------------------------------------------------------------------
# the Wan block with queries and keys from different token sets
# ------------------------------------------------------------------------------------------------


def modulated(block: WanBlock, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``norm1`` in float32, shifted and scaled by the time modulation, back in x's dtype: the self-attention input."""
    return (fp32_norm(block.norm1, x) * (1 + scale) + shift).type_as(x)


def finish(block: WanBlock, x: Tensor, context: Tensor, image_tokens: int, mods: tuple[Tensor, ...]) -> Tensor:
    """The rest of a Wan block after its self-attention residual: cross-attention to the context (plain residual
    after ``norm3``) and the modulated, gated FFN, per token of ``x`` (B, S, D) -> (B, S, D)."""
    shift2, scale2, gate2 = mods[3:]
    h = (x.float() if block.norm3 is None else fp32_norm(block.norm3, x)).type_as(x)
    x = x + block.cross_attn(h, context, image_tokens)  # (B, S, D)
    h = (fp32_norm(block.norm2, x) * (1 + scale2) + shift2).type_as(x)
    return (x.float() + block.ffn(h).float() * gate2).type_as(x)


class WanCross(WanBlock):
    """A Wan block whose self-attention queries and keys / values are different token sets."""

    def cross(self, x: Tensor, source: Tensor, context: Tensor, image_tokens: int, e: Tensor, rope_q: Rope,
              rope_k: Rope) -> Tensor:
        """x: (B, Sq, D) queries and residual stream, source: (B, Sk, D) keys / values (the same ``norm1`` and
        modulation), rope_q: (Sq, Dh/2) tables, rope_k: (Sk, Dh/2) -> (B, Sq, D)."""
        mods = (self.modulation + e.float()).chunk(6, dim=1)  # 6 x (B, 1, D), float32
        shift1, scale1, gate1 = mods[:3]
        h = modulated(self, x, shift1, scale1)  # (B, Sq, D)
        s = h if source is x else modulated(self, source, shift1, scale1)  # (B, Sk, D)
        attn, heads = self.self_attn, (self.self_attn.num_heads, -1)
        q = attn.norm_q(attn.q(h)).unflatten(2, heads)  # (B, Sq, H, Dh)
        k = attn.norm_k(attn.k(s)).unflatten(2, heads)  # (B, Sk, H, Dh)
        v = attn.v(s).unflatten(2, heads)
        out = attn.o(attention(apply_rope(q, rope_q), apply_rope(k, rope_k), v))  # (B, Sq, D)
        x = (x.float() + out * gate1).type_as(x)
        return finish(self, x, context, image_tokens, mods)


# ------------------------------------------------------------------------------------------------
# the block kinds
# ------------------------------------------------------------------------------------------------


class PooledSelfAttention(nn.Module):
    """The self-attention weights a poolingformer keeps: the value and output projections (``self_attn.v``,
    ``self_attn.o``). The q / k projections and their RMS norms are dropped: the uniform map needs no scores."""

    def __init__(self, dim: int):
        super().__init__()
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        """(B, N, D) modulated tokens -> (B, 1, D): ``o(mean_n v(h_n))``, computed mean-first as ``o(v(mean_n h_n))``
        (v is affine), so the cost is O(N D) plus O(D^2) once and no N x N map exists."""
        pooled = h.float().mean(dim=1, keepdim=True).type_as(h)  # (B, 1, D)
        return self.o(self.v(pooled))


class WanPoolingformer(WanBlock):
    """Bottom-segment block: every video token's self-attention output is the uniform map's, the mean of V over all
    N tokens (one (B, 1, D) vector per sample, gated and broadcast by the residual add); then the cross-attention to
    the context and the FFN per token, unchanged."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, cross_attn_norm: bool, image: bool):
        super().__init__(dim, num_heads, ffn_dim, eps, cross_attn_norm, image)
        self.self_attn = PooledSelfAttention(dim)  # type: ignore[assignment]

    def forward(self, x: Tensor, context: Tensor, image_tokens: int, e: Tensor, rope: Rope) -> Tensor:
        """x (B, N, D), context (B, L, D), e (B, 6, D); ``rope`` unused (no scores) -> (B, N, D)."""
        mods = (self.modulation + e.float()).chunk(6, dim=1)
        shift1, scale1, gate1 = mods[:3]
        attn = self.self_attn(modulated(self, x, shift1, scale1))  # (B, 1, D)
        x = (x.float() + attn * gate1).type_as(x)  # (B, N, D)
        return finish(self, x, context, image_tokens, mods)


class WanGenerationBlock(WanCross):
    """First block of an SDTM: ``Xs0 = pool(X)`` to the sparse set; the M pooled tokens are the queries and the
    residual stream (at the pooled cells' mean positions, ``rope_q``), the N dense tokens ``X`` the keys / values (at
    their grid positions, ``rope_k``); then cross-attention and FFN on the M tokens. ``pool=False`` (``gen+``): the
    incoming sparse tokens are the queries, no re-pooling. At a sparse set equal to the dense one it is the Wan block."""

    def forward(self, x: Tensor | None, context: Tensor, image_tokens: int, e: Tensor, dense: Tensor,
                dense_set: TokenSet, sparse_set: TokenSet, pool: bool, rope_q: Rope, rope_k: Rope) -> Tensor:
        if pool or x is None:
            x = pool_video(dense, dense_set, sparse_set)  # (B, M, D)
        return self.cross(x, dense, context, image_tokens, e, rope_q, rope_k)  # (B, M, D)


class WanRecoveryBlock(RecoveryMerge, WanCross):
    """First dense block after the sparse ones: ``Xm = up(Xs) W1 + X W2`` (X: the dense tokens that entered the
    SDTM; W1 = 0, W2 = I at conversion; no position table to re-add: Wan's positions are RoPE), then the Wan block
    with the N merged tokens as queries (dense positions) and the M sparse tokens as keys / values (pooled positions).
    ``recover*`` (``extra_recovery="repeat"``) is this block again, merging the previous recovery output at the dense
    set and attending to it."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, cross_attn_norm: bool, image: bool,
                 upsample: str = "nearest"):
        super().__init__(dim, num_heads, ffn_dim, eps, cross_attn_norm, image)  # type: ignore[call-arg]
        self.add_merge(dim, upsample)

    def forward(self, x: Tensor, context: Tensor, image_tokens: int, e: Tensor, sparse: Tensor, dense_set: TokenSet,
                sparse_set: TokenSet, rope_q: Rope, rope_k: Rope) -> Tensor:
        up = upsample_video(sparse, sparse_set, dense_set, self.upsample)  # (B, N, D)
        merged = self.merge_sparse(up) + self.merge_dense(x)  # (B, N, D)
        return self.cross(merged, sparse, context, image_tokens, e, rope_q, rope_k)  # (B, N, D)


class WanCrossDenseBlock(WanCross):
    """A further recovery block (r > 1, ``extra_recovery="cross"``): the dense tokens attend to the final sparse
    tokens, no merge."""

    def forward(self, x: Tensor, context: Tensor, image_tokens: int, e: Tensor, sparse: Tensor, rope_q: Rope,
                rope_k: Rope) -> Tensor:
        return self.cross(x, sparse, context, image_tokens, e, rope_q, rope_k)  # (B, N, D)


# kind -> block class; "sparse", "dense" and "top" are the Wan block itself.
BLOCKS: dict[str, type[WanBlock]] = {
    "pool": WanPoolingformer,
    "gen": WanGenerationBlock,
    "gen+": WanGenerationBlock,
    "sparse": WanBlock,
    "recover": WanRecoveryBlock,
    "recover*": WanRecoveryBlock,
    "recover+": WanCrossDenseBlock,
    "dense": WanBlock,
    "top": WanBlock,
}
