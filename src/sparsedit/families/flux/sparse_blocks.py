"""SparseFLUX's blocks: SparseDiT's poolingformer, generation, recovery and extra recovery blocks for both of FLUX's
block types, the double-stream block (separate image / text weights, one joint attention) and the single-stream
block (one fused projection over the joint sequence, attention and MLP in parallel). docs/mmdit_flux_sparse.md.

The text tokens stay dense and take part in every block; only the image tokens change between the dense grid (N
tokens) and the sparse grid (M tokens). Each block keeps the parameter names of the FLUX block it replaces, so layer
i loads layer i of the source FLUX. A cross-attending block takes its image *queries* (and residual stream) from one
token set and its image *keys / values* from another, each with its own RoPE table: text queries and keys sit at
(0, 0, 0), image tokens at their (possibly fractional, pooled) grid coordinates. Queries are [text; image queries],
keys and values [text; image sources], so text queries attend over text + the source image tokens.

Shapes: B batch, L text tokens, N dense and M sparse image tokens, D hidden, H heads, Dh head channels, F MLP width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsedit.core.blocks import RecoveryMerge, pool_tokens
from sparsedit.core.layers import modulate
from sparsedit.families.flux.model import (
    DoubleStreamBlock,
    RMSNorm,
    SingleStreamBlock,
    apply_rope,
    clip_fp16,
)

Grid = tuple[int, int]
Rope = tuple[Tensor, Tensor]  # (cos, sin), each (S, Dh)


def to_heads(z: Tensor, num_heads: int) -> Tensor:
    """(B, S, D) -> (B, H, S, Dh)."""
    b, s, _ = z.shape
    return z.reshape(b, s, num_heads, -1).transpose(1, 2)


def from_heads(z: Tensor) -> Tensor:
    """(B, H, S, Dh) -> (B, S, D)."""
    return z.transpose(1, 2).flatten(2)


def rows(linear: nn.Linear, x: Tensor, start: int, stop: int) -> Tensor:
    """``linear`` restricted to output rows [start, stop) (q, k/v or the MLP input of a fused projection): a row
    slice of the weight is a contiguous view, so no projection nobody reads is computed and nothing is copied."""
    bias = None if linear.bias is None else linear.bias[start:stop]
    return F.linear(x, linear.weight[start:stop], bias)


def cross_attention(q: Tensor, k: Tensor, v: Tensor, rope_q: Rope, rope_k: Rope) -> Tensor:
    """(B, H, Sq, Dh) queries and (B, H, Sk, Dh) keys / values, each rotated by its own table -> (B, Sq, D).

    With equal tables and token sets this is :func:`~sparsedit.families.flux.model.joint_attention`."""
    return from_heads(F.scaled_dot_product_attention(apply_rope(q, rope_q), apply_rope(k, rope_k), v))


def text_rope(rope: Rope, length: int) -> Rope:
    """The first ``length`` rows of a [text; image] table: the text tokens' (0, 0, 0) rotation."""
    return rope[0][:length], rope[1][:length]


# ------------------------------------------------------------------------------------------------
# double-stream blocks
# ------------------------------------------------------------------------------------------------


def _double_update(block: DoubleStreamBlock, img: Tensor, txt: Tensor, img_attn: Tensor, txt_attn: Tensor,
                   img_mods: tuple[Tensor, ...], txt_mods: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """A double-stream block after its attention: gated output projections, then each stream's MLP, as the dense
    block does (``img_attn`` may be (B, 1, D): a poolingformer's one vector, broadcast by the residual add)."""
    _, _, img_gate1, img_shift2, img_scale2, img_gate2 = img_mods
    _, _, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mods
    img = img + img_gate1.unsqueeze(1) * block.img_attn.proj(img_attn)  # (B, Nq, D)
    img = img + img_gate2.unsqueeze(1) * block.img_mlp(modulate(block.img_norm2(img), img_shift2, img_scale2))
    txt = txt + txt_gate1.unsqueeze(1) * block.txt_attn.proj(txt_attn)  # (B, L, D)
    txt = txt + txt_gate2.unsqueeze(1) * block.txt_mlp(modulate(block.txt_norm2(txt), txt_shift2, txt_scale2))
    return img, clip_fp16(txt)


class DoubleCross(DoubleStreamBlock):
    """A double-stream block whose image queries and image keys / values are different token sets."""

    def cross(self, img: Tensor, txt: Tensor, vec: Tensor, source: Tensor, rope_q: Rope,
              rope_k: Rope) -> tuple[Tensor, Tensor]:
        """img: (B, Nq, D) image queries and residual stream, source: (B, Nk, D) image keys / values (both through
        the image stream's norm, modulation and ``qkv``: rows [0, D) for queries, [D, 3D) for keys / values),
        rope_q: (L + Nq, Dh) tables, rope_k: (L + Nk, Dh) -> (img (B, Nq, D), txt (B, L, D))."""
        img_mods, txt_mods = self.img_mod(vec), self.txt_mod(vec)  # 6 x (B, D) each
        d, heads, attn = img.shape[-1], self.img_attn.num_heads, self.img_attn
        img_q = attn.norm.query_norm(to_heads(rows(attn.qkv, modulate(self.img_norm1(img), *img_mods[:2]), 0, d),
                                              heads))  # (B, H, Nq, Dh)
        src_k, src_v = rows(attn.qkv, modulate(self.img_norm1(source), *img_mods[:2]), d, 3 * d).chunk(2, dim=-1)
        src_k, src_v = attn.norm.key_norm(to_heads(src_k, heads)), to_heads(src_v, heads)  # (B, H, Nk, Dh)
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(self.txt_norm1(txt), *txt_mods[:2]))  # (B, H, L, Dh)
        joint = cross_attention(torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, src_k], dim=2),
                                torch.cat([txt_v, src_v], dim=2), rope_q, rope_k)  # (B, L + Nq, D)
        length = txt.shape[1]
        return _double_update(self, img, txt, joint[:, length:].contiguous(), joint[:, :length].contiguous(),
                              img_mods, txt_mods)


class KeyNorm(nn.Module):
    """The key half of FLUX's ``QKNorm`` (``norm.key_norm.scale``): a poolingformer's image stream has no queries."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.key_norm = RMSNorm(head_dim)


class PooledStreamAttention(nn.Module):
    """The image stream's attention weights in a double-stream poolingformer: keys and values (``kv``, rows
    [D, 3D) of the source ``qkv``), their key norm and the output projection. The query rows and the query norm are
    dropped: the uniform map needs no image queries, while the text queries still need the image keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm = KeyNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class DoublePoolingformer(DoubleStreamBlock):
    """Bottom-segment double-stream block: every image query gets the uniform attention map over all L + N joint
    keys, so its attention output is the mean of V over the L text and N image tokens (one (B, 1, D) vector,
    broadcast); the text queries keep the exact softmax over text + image keys (the text carries the prompt, and
    with L << N its exact attention costs only L * (L + N) scores). Then both MLPs, as in the dense block."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__(dim, num_heads, mlp_hidden)
        self.img_attn = PooledStreamAttention(dim, num_heads)  # type: ignore[assignment]

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """img: (B, N, D), txt: (B, L, D), vec: (B, D), rope: (L + N, Dh) tables -> (img, txt)."""
        img_mods, txt_mods = self.img_mod(vec), self.txt_mod(vec)
        heads = self.img_attn.num_heads
        img_k, img_v = self.img_attn.kv(modulate(self.img_norm1(img), *img_mods[:2])).chunk(2, dim=-1)
        img_k = self.img_attn.norm.key_norm(to_heads(img_k, heads))  # (B, H, N, Dh)
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(self.txt_norm1(txt), *txt_mods[:2]))  # (B, H, L, Dh)
        values = torch.cat([txt_v, to_heads(img_v, heads)], dim=2)  # (B, H, L + N, Dh)
        length = txt.shape[1]
        txt_attn = cross_attention(txt_q, torch.cat([txt_k, img_k], dim=2), values, text_rope(rope, length),
                                   rope)  # (B, L, D): the exact softmax
        # Equal scores give every joint token the weight 1 / (L + N) in every head: the mean of V, never a map.
        img_attn = from_heads(values.mean(dim=2, keepdim=True))  # (B, 1, D)
        return _double_update(self, img, txt, img_attn, txt_attn, img_mods, txt_mods)


# ------------------------------------------------------------------------------------------------
# single-stream blocks
# ------------------------------------------------------------------------------------------------


class SingleCross(SingleStreamBlock):
    """A single-stream block whose image queries and image keys / values are different token sets."""

    def cross(self, img: Tensor, txt: Tensor, vec: Tensor, source: Tensor, rope_q: Rope,
              rope_k: Rope) -> tuple[Tensor, Tensor]:
        """Queries and the residual stream are [txt; img] (B, L + Nq, D); keys / values [txt; source]
        (B, L + Nk, D), both through the same norm and modulation. ``linear1``'s rows: q [0, D) and the MLP input
        [3D, 3D + F) for the queries (the MLP runs per query token, in parallel), k / v [D, 3D) for the keys."""
        length, d, heads = txt.shape[1], img.shape[-1], self.num_heads
        shift, scale, gate = self.modulation(vec)  # 3 x (B, D)
        x = torch.cat([txt, img], dim=1)  # (B, L + Nq, D)
        x_in = modulate(self.pre_norm(x), shift, scale)
        kv_in = torch.cat([x_in[:, :length], modulate(self.pre_norm(source), shift, scale)], dim=1)  # (B, L + Nk, D)
        q = self.norm.query_norm(to_heads(rows(self.linear1, x_in, 0, d), heads))  # (B, H, L + Nq, Dh)
        k, v = rows(self.linear1, kv_in, d, 3 * d).chunk(2, dim=-1)
        k, v = self.norm.key_norm(to_heads(k, heads)), to_heads(v, heads)  # (B, H, L + Nk, Dh)
        hidden = rows(self.linear1, x_in, 3 * d, 3 * d + self.mlp_hidden)  # (B, L + Nq, F)
        attn = cross_attention(q, k, v, rope_q, rope_k)  # (B, L + Nq, D)
        x = clip_fp16(x + gate.unsqueeze(1) * self.linear2(torch.cat([attn, self.mlp_act(hidden)], dim=2)))
        return x[:, length:], x[:, :length]


class SinglePoolingformer(SingleStreamBlock):
    """Bottom-segment single-stream block: image queries get the uniform map over all L + N joint keys (their
    attention output is the mean of V), text queries the exact softmax over text + image keys; the parallel MLP
    runs on every token as in the dense block. No weight is dropped: text and image share ``linear1``, and the text
    queries need its query rows and query norm.

    ``linear2`` maps [attention; GELU(MLP)] back; for the image tokens the attention half is one vector, so it is
    applied once (columns [0, D) of ``linear2``) and broadcast, the MLP half per token (columns [D, D + F))."""

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """img: (B, N, D), txt: (B, L, D), vec: (B, D), rope: (L + N, Dh) tables -> (img, txt)."""
        length, d, heads = txt.shape[1], img.shape[-1], self.num_heads
        shift, scale, gate = self.modulation(vec)  # 3 x (B, D)
        x = torch.cat([txt, img], dim=1)  # (B, L + N, D)
        x_in = modulate(self.pre_norm(x), shift, scale)
        txt_q = self.norm.query_norm(to_heads(rows(self.linear1, x_in[:, :length], 0, d), heads))  # (B, H, L, Dh)
        k, v, hidden = rows(self.linear1, x_in, d, 3 * d + self.mlp_hidden).split([d, d, self.mlp_hidden], dim=-1)
        k, v = self.norm.key_norm(to_heads(k, heads)), to_heads(v, heads)  # (B, H, L + N, Dh)
        hidden = self.mlp_act(hidden)  # (B, L + N, F)
        txt_attn = cross_attention(txt_q, k, v, text_rope(rope, length), rope)  # (B, L, D): the exact softmax
        img_attn = from_heads(v.mean(dim=2, keepdim=True))  # (B, 1, D): the uniform map's mean of V
        w, b = self.linear2.weight, self.linear2.bias
        txt_out = self.linear2(torch.cat([txt_attn, hidden[:, :length]], dim=2))  # (B, L, D)
        img_out = F.linear(img_attn, w[:, :d]) + F.linear(hidden[:, length:], w[:, d:], b)  # (B, N, D)
        x = clip_fp16(x + gate.unsqueeze(1) * torch.cat([txt_out, img_out], dim=1))
        return x[:, length:], x[:, :length]


# ------------------------------------------------------------------------------------------------
# the SDTM roles, for either block type
# ------------------------------------------------------------------------------------------------


class Generation:
    """First block of an SDTM: ``Xs0 = adaptive_avg_pool(X)`` to the sparse grid; the M pooled tokens are the image
    queries (at the pooled cells' mean coordinates, ``rope_q``) and the residual stream, the text and the N dense
    image tokens ``X`` (at their grid coordinates, ``rope_k``) the keys and values; outputs M sparse image tokens and
    the text. ``pool=False`` (``gen+``): the incoming sparse tokens are the queries, no re-pooling. At a sparse grid
    equal to the dense one pooling is the identity, the tables are equal and the block is the dense block."""

    cross: Callable[..., tuple[Tensor, Tensor]]  # DoubleCross.cross or SingleCross.cross

    def forward(self, x: Tensor | None, txt: Tensor, vec: Tensor, dense: Tensor, dense_grid: Grid, sparse_grid: Grid,
                pool: bool, rope_q: Rope, rope_k: Rope) -> tuple[Tensor, Tensor]:
        if pool or x is None:
            x = pool_tokens(dense, dense_grid, sparse_grid)  # (B, M, D)
        return self.cross(x, txt, vec, dense, rope_q, rope_k)  # (B, M, D), (B, L, D)


class Recovery(RecoveryMerge):
    """First dense block after the sparse ones: ``Xm = up(Xs) W1 + X W2`` (X: the dense image tokens that entered
    the SDTM; W1 = 0, W2 = I at conversion; no position table: FLUX has none, its positions are RoPE), then the block
    with the N merged tokens as image queries (dense positions) and the M sparse tokens as image keys / values
    (pooled positions). With ``extra_recovery="repeat"`` the 2nd.. recovery blocks are this block again, merging the
    previous recovery output at the dense grid."""

    cross: Callable[..., tuple[Tensor, Tensor]]

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, upsample: str = "nearest"):
        super().__init__(dim, num_heads, mlp_hidden)  # type: ignore[call-arg]  # the FLUX block's
        self.add_merge(dim, upsample)

    def forward(self, x: Tensor, txt: Tensor, vec: Tensor, sparse: Tensor, dense_grid: Grid, sparse_grid: Grid,
                rope_q: Rope, rope_k: Rope) -> tuple[Tensor, Tensor]:
        merged = self.merge(x, sparse, dense_grid, sparse_grid, None)  # (B, N, D)
        return self.cross(merged, txt, vec, sparse, rope_q, rope_k)


class CrossDense:
    """A further recovery block (r > 1, ``extra_recovery="cross"``): dense image queries attend to the text and the
    final sparse image tokens, no merge."""

    cross: Callable[..., tuple[Tensor, Tensor]]

    def forward(self, x: Tensor, txt: Tensor, vec: Tensor, sparse: Tensor, rope_q: Rope,
                rope_k: Rope) -> tuple[Tensor, Tensor]:
        return self.cross(x, txt, vec, sparse, rope_q, rope_k)


class DoubleGenerationBlock(Generation, DoubleCross):
    """:class:`Generation` on a double-stream block."""


class SingleGenerationBlock(Generation, SingleCross):
    """:class:`Generation` on a single-stream block."""


class DoubleRecoveryBlock(Recovery, DoubleCross):
    """:class:`Recovery` on a double-stream block."""


class SingleRecoveryBlock(Recovery, SingleCross):
    """:class:`Recovery` on a single-stream block."""


class DoubleCrossDenseBlock(CrossDense, DoubleCross):
    """:class:`CrossDense` on a double-stream block."""


class SingleCrossDenseBlock(CrossDense, SingleCross):
    """:class:`CrossDense` on a single-stream block."""


# kind -> (double-stream class, single-stream class); "sparse", "dense" and "top" are the FLUX blocks themselves.
BLOCKS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "pool": (DoublePoolingformer, SinglePoolingformer),
    "gen": (DoubleGenerationBlock, SingleGenerationBlock),
    "gen+": (DoubleGenerationBlock, SingleGenerationBlock),
    "recover": (DoubleRecoveryBlock, SingleRecoveryBlock),
    "recover*": (DoubleRecoveryBlock, SingleRecoveryBlock),
    "recover+": (DoubleCrossDenseBlock, SingleCrossDenseBlock),
    "sparse": (DoubleStreamBlock, SingleStreamBlock),
    "dense": (DoubleStreamBlock, SingleStreamBlock),
    "top": (DoubleStreamBlock, SingleStreamBlock),
}
