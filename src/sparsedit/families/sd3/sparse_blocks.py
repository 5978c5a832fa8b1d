"""SparseSD3's joint blocks: the SparseDiT poolingformer, generation, recovery and extra recovery blocks for an MMDiT,
whose image tokens share one softmax with the caption tokens (docs/mmdit_sd3_sparse.md).

The caption tokens stay dense and take part in every block; only the image tokens change between the dense grid
(N tokens) and the sparse grid (M tokens). Every block keeps :class:`~sparsedit.families.sd3.model.JointBlock`'s
parameter names, so layer i loads layer i of the source SD3. The generation and recovery blocks are the dense
block with its image queries and image keys / values taken from different token sets (``JointBlock(...,
source=...)``); the poolingformer replaces the image queries' attention map by the uniform one. Shapes: B batch,
N dense image tokens, M sparse image tokens, L caption tokens, D hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsedit.core.blocks import PoolingAttention, RecoveryMerge, pool_tokens
from sparsedit.families.sd3.model import JointBlock, RMSNorm, merge_heads, split_heads

Grid = tuple[int, int]


class JointPoolingAttention(nn.Module):
    """Joint attention whose image queries see the uniform attention map over all L + N joint keys.

    The image output is ``proj(mean of V over the L caption and N image tokens)``, one (B, 1, D) vector that the
    block's residual add broadcasts to every image token; the caption queries keep the exact softmax over caption
    + image keys. So the image queries (and their q norm) are gone, while the image keys and values stay: the
    caption carries the prompt, and with L << N its exact attention costs only L * (L + N) scores.

    Parameters: ``kv`` (image K and V, rows [D, 3D) of the source ``qkv``), ``proj``, ``k_norm``, and the caption
    stream's ``context_qkv``, ``context_proj``, ``context_q_norm``, ``context_k_norm`` as in ``JointAttention``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.context_qkv = nn.Linear(dim, 3 * dim)
        self.context_proj = nn.Linear(dim, dim)
        self.context_q_norm = RMSNorm(head_dim) if qk_norm else None
        self.context_k_norm = RMSNorm(head_dim) if qk_norm else None

    def forward(self, x: Tensor, context: Tensor, source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, N, D) image tokens, context: (B, L, D) caption tokens -> ((B, 1, D) image output, broadcast by the
        caller, (B, L, D) caption output). ``source`` is not taken: a poolingformer runs on the dense tokens."""
        if source is not None:
            raise ValueError("a joint poolingformer attends among its own tokens; it takes no source tokens")
        k, v = (split_heads(z, self.num_heads) for z in self.kv(x).chunk(2, dim=-1))  # (B, heads, N, d)
        cq, ck, cv = (split_heads(z, self.num_heads) for z in self.context_qkv(context).chunk(3, dim=-1))
        if self.k_norm is not None and self.context_q_norm is not None and self.context_k_norm is not None:
            k, cq, ck = self.k_norm(k), self.context_q_norm(cq), self.context_k_norm(ck)
        keys, values = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)  # (B, heads, N + L, d), image first
        # Equal scores give softmax weights 1 / (N + L): the output is the mean of the joint values, for every
        # head and every image query alike (a mean, never an N x (N + L) map). Text queries: the exact softmax.
        image = merge_heads(values.mean(dim=2, keepdim=True))  # (B, 1, D)
        text = merge_heads(F.scaled_dot_product_attention(cq, keys, values))  # (B, L, D)
        return self.proj(image), self.context_proj(text)


class JointPoolingformer(JointBlock):
    """Bottom-segment block: the joint attention with uniform image queries (:class:`JointPoolingAttention`), the
    image-only second attention of an SD3.5 MMDiT-X block (``dual``) with the uniform map over the N image tokens
    (``PoolingAttention``: V and proj only, DiT's poolingformer), then both MLPs as in the dense block.

    ``JointBlock.forward`` runs it unchanged: the (B, 1, D) attention outputs broadcast in the residual adds.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, dual: bool = False):
        super().__init__(dim, num_heads, mlp_ratio, qk_norm=qk_norm, dual=dual)
        self.attn = JointPoolingAttention(dim, num_heads, qk_norm)  # type: ignore[assignment]
        if dual:
            self.attn2 = PoolingAttention(dim)  # type: ignore[assignment]  # keys attn2.v / attn2.proj


class JointGenerationBlock(JointBlock):
    """First block of an SDTM: ``Xs0 = adaptive_avg_pool(X)`` to the sparse grid; the M pooled image tokens are the
    image queries and the residual stream, the caption tokens and the N dense image tokens ``X`` the keys and values
    (caption queries too attend over caption + dense image keys); outputs M sparse image tokens and the caption.

    ``pool=False`` (a 2nd.. generation block, ``gen+``): the incoming sparse tokens are the queries, no re-pooling.
    At a sparse grid equal to the dense one, pooling is the identity and the block is the dense block.
    """

    def forward(self, x: Tensor | None, context: Tensor, c: Tensor, dense: Tensor,  # type: ignore[override]
                dense_grid: Grid, sparse_grid: Grid, pool: bool = True) -> tuple[Tensor, Tensor | None]:
        if pool or x is None:
            x = pool_tokens(dense, dense_grid, sparse_grid)  # (B, M, D): positions average-pooled along
        return super().forward(x, context, c, source=dense)  # (B, M, D), (B, L, D)


class JointRecoveryBlock(RecoveryMerge, JointBlock):
    """First dense block after the sparse ones: ``Xm = up(Xs) W1 + X W2 + pos`` (X: the dense image tokens that
    entered the SDTM; W1 = 0, W2 = I at conversion), then the joint block with the N merged tokens as image queries
    and the M sparse tokens as image keys / values; caption queries attend over caption + sparse keys.

    ``pos_embed=None`` leaves the position table out (the SparseDiT authors' code). With
    ``extra_recovery="repeat"`` the 2nd.. recovery blocks are this block again, merging the previous recovery
    output in place of ``Xs`` at the dense grid (as :class:`sparsedit.core.blocks.DenseRecoveryBlock`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, dual: bool = False,
                 upsample: str = "nearest"):
        super().__init__(dim, num_heads, mlp_ratio, qk_norm=qk_norm, dual=dual)
        self.add_merge(dim, upsample)

    def forward(self, x: Tensor, context: Tensor, c: Tensor, sparse: Tensor,  # type: ignore[override]
                dense_grid: Grid, sparse_grid: Grid, pos_embed: Tensor | None) -> tuple[Tensor, Tensor | None]:
        merged = self.merge(x, sparse, dense_grid, sparse_grid, pos_embed)  # (B, N, D)
        return super().forward(merged, context, c, source=sparse)  # (B, N, D), (B, L, D)


class JointCrossDenseBlock(JointBlock):
    """A further recovery block (r > 1, ``extra_recovery="cross"``): dense image queries attend to the caption and
    the final sparse image tokens, no merge."""

    def forward(self, x: Tensor, context: Tensor, c: Tensor,  # type: ignore[override]
                sparse: Tensor) -> tuple[Tensor, Tensor | None]:
        return super().forward(x, context, c, source=sparse)
