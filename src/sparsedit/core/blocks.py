"""SparseDiT's transformer blocks (paper Sec. 3.1).

Every block keeps DiT's adaLN-Zero conditioning and DiT's parameter names, so layer i of a
SparseDiT loads layer i of the source DiT (Sec. 3.3). Shapes: B batch, D hidden size, dense tokens
(B, N, D) on an H x W grid, sparse tokens (B, M, D) on an h x w grid.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsedit.core.layers import DiTBlock, Mlp, adaln_modulation, modulate

Grid = tuple[int, int]
UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")
# How the 2nd.. recovery blocks of an SDTM (r > 1) work: "cross" (ours) cross-attend to the sparse tokens
# without a merge; "repeat" (the authors' code) repeats the whole recovery block, merging again.
EXTRA_RECOVERY_MODES = ("cross", "repeat")


def tokens_to_map(x: Tensor, grid: Grid) -> Tensor:
    """(B, h*w, D) row-major tokens -> (B, D, h, w) feature map."""
    b, _, d = x.shape
    return x.transpose(1, 2).reshape(b, d, *grid)


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, D, h, w) -> (B, h*w, D)."""
    return x.flatten(2).transpose(1, 2)


def pool_tokens(dense: Tensor, dense_grid: Grid, sparse_grid: Grid) -> Tensor:
    """(B, H*W, D) -> (B, h*w, D): adaptive average pooling of the token map to the sparse grid."""
    return map_to_tokens(F.adaptive_avg_pool2d(tokens_to_map(dense, dense_grid), sparse_grid))


def upsample_tokens(sparse: Tensor, sparse_grid: Grid, dense_grid: Grid, mode: str) -> Tensor:
    """(B, h*w, D) -> (B, H*W, D): the sparse token map interpolated back to the dense grid."""
    up = tokens_to_map(sparse, sparse_grid)  # (B, D, h, w)
    if sparse_grid != dense_grid:
        align = None if mode == "nearest" else False  # nearest takes no align_corners
        up = F.interpolate(up, size=dense_grid, mode=mode, align_corners=align)  # (B, D, H, W)
    return map_to_tokens(up)


class RecoveryMerge:
    """Mixin for the recovery blocks of every model family: ``Xm = up(Xs) W1 + X W2 (+ pos)``.

    The linears live on the block itself (``merge_sparse`` = W1, ``merge_dense`` = W2) so checkpoint
    keys stay ``blocks.{i}.merge_*``. Call :meth:`add_merge` in ``__init__`` after the block's layers.
    The position table is added when the model passes one: the paper re-adds it, the authors' code does
    not (the config's ``recovery_pos_embed`` decides; docs/official.md).
    """

    merge_sparse: nn.Linear
    merge_dense: nn.Linear
    upsample: str

    def add_merge(self, hidden_size: int, upsample: str) -> None:
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, not {upsample!r}")
        self.upsample = upsample
        self.merge_sparse = nn.Linear(hidden_size, hidden_size)  # W1
        self.merge_dense = nn.Linear(hidden_size, hidden_size)  # W2
        self.reset_merge()

    def reset_merge(self) -> None:
        """W1 = 0, W2 = I, biases 0 (Sec. 3.3): a converted model starts from the dense path."""
        nn.init.zeros_(self.merge_sparse.weight)
        nn.init.zeros_(self.merge_sparse.bias)
        with torch.no_grad():
            self.merge_dense.weight.copy_(torch.eye(self.merge_dense.weight.shape[0]))
        nn.init.zeros_(self.merge_dense.bias)

    def merge(self, x: Tensor, sparse: Tensor, dense_grid: Grid, sparse_grid: Grid,
              pos_embed: Tensor | None) -> Tensor:
        """x: (B, N, D) dense tokens, sparse: (B, M, D) -> merged (B, N, D); ``pos_embed`` None adds no table."""
        up = upsample_tokens(sparse, sparse_grid, dense_grid, self.upsample)  # (B, N, D)
        merged = self.merge_sparse(up) + self.merge_dense(x)  # (B, N, D)
        return merged if pos_embed is None else merged + pos_embed


def reset_merges(blocks: Iterable[nn.Module]) -> None:
    """W1 = 0, W2 = I again in every recovery block, after a model-wide re-initialisation."""
    for block in blocks:
        if isinstance(block, RecoveryMerge):
            block.reset_merge()


class PoolingAttention(nn.Module):
    """Self-attention with a uniform attention map: every token receives ``proj(mean_n V x_n)``.

    Only the value and output projections exist (queries and keys are dropped). Because V is
    linear, ``mean(V x) = V mean(x)``: we average the tokens first, so the cost is O(N*D) for the
    mean plus O(D^2) once, not O(N*D^2), and no N x N tensor exists.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=1, keepdim=True)  # (B, 1, D)
        return self.proj(self.v(pooled))  # (B, 1, D), broadcast over the N tokens by the caller


class Poolingformer(nn.Module):
    """Bottom-segment block: ``x + gate * proj(mean V)`` broadcast to all tokens, then DiT's MLP."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = PoolingAttention(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class SparseGenerationBlock(DiTBlock):
    """First block of an SDTM: pool the dense tokens to the sparse grid, then cross-attend.

    ``Xs0 = adaptive_avg_pool(X)``; ``Xs = Xs0 + gate * MHA(q=Xs0, k=v=X)``; then the MLP. With
    ``pool=False`` (a second generation block) the incoming sparse tokens are refined the same way.
    """

    def forward(self, x: Tensor, c: Tensor, dense: Tensor, dense_grid: Grid, sparse_grid: Grid, pool: bool = True) -> Tensor:  # type: ignore[override]
        if pool:
            x = pool_tokens(dense, dense_grid, sparse_grid)  # (B, M, D)
        return super().forward(x, c, context=dense)  # (B, M, D)


class DenseRecoveryBlock(RecoveryMerge, DiTBlock):
    """First dense block after the sparse ones: upsample, merge with the SDTM's input, cross-attend.

    ``Xm = up(Xs) W1 + X W2 + pos``; ``X = Xm + gate * MHA(q=Xm, k=v=Xs)``; then the MLP. W1 starts
    at 0 and W2 at the identity (Sec. 3.3) so a converted model starts from the dense path. The
    sine-cosine position embedding is re-added because pooling and the sparse blocks blur positions
    (``pos_embed=None`` leaves it out, as the authors' code does). In the authors' variant of r > 1
    ("repeat") the 2nd.. recovery blocks are this block again, with the previous recovery block's dense
    output in place of ``Xs`` (then ``sparse_grid`` is the dense grid and nothing is resampled).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 mlp_norm_eps: float = 1e-6, upsample: str = "nearest"):
        super().__init__(hidden_size, num_heads, mlp_ratio, norm_eps, mlp_norm_eps)
        self.add_merge(hidden_size, upsample)

    def forward(self, x: Tensor, c: Tensor, sparse: Tensor, dense_grid: Grid, sparse_grid: Grid,  # type: ignore[override]
                pos_embed: Tensor | None) -> Tensor:
        merged = self.merge(x, sparse, dense_grid, sparse_grid, pos_embed)  # (B, N, D)
        return super().forward(merged, c, context=sparse)  # (B, N, D)


class CrossDenseBlock(DiTBlock):
    """A further recovery block (r > 1): dense queries attend to the sparse tokens, no merge."""

    def forward(self, x: Tensor, c: Tensor, sparse: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, c, context=sparse)
