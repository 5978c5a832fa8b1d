"""SparsePixArt: PixArt-alpha with the SparseDiT layout (poolingformers, SDTMs, top blocks), its blocks and
config, and :func:`sparsify_pixart`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from sparsedit.core.blocks import PoolingAttention, RecoveryMerge, pool_tokens, reset_merges
from sparsedit.core.layout import Layout, SparseLayoutConfig, block_kinds, layout_fields, parse_layout
from sparsedit.errors import SparseditError
from sparsedit.families.dit.sparse import SparseDiT
from sparsedit.families.dit.sparsify import initialise_from_dense
from sparsedit.families.pixart.layers import PixArtBlock, PixArtCond
from sparsedit.families.pixart.model import Grid, PixArt, PixArtConfig, PixArtInputs


class PixArtPoolingformer(PixArtBlock):
    """Bottom-segment block: mean-V attention (no Q/K), then the text cross-attention and the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__(hidden_size, num_heads, mlp_ratio, norm_eps)
        self.attn = PoolingAttention(hidden_size)  # keys attn.v / attn.proj (V = rows [2D, 3D) of qkv)


class PixArtGenerationBlock(PixArtBlock):
    """SDTM's first block: ``Xs0 = pool(X)``; ``Xs = Xs0 + gate * MHA(q=Xs0, k=v=X)``; text attn; MLP."""

    def forward(self, x: Tensor | None, c: PixArtCond, dense: Tensor, dense_grid: Grid,  # type: ignore[override]
                sparse_grid: Grid, pool: bool = True) -> Tensor:
        if pool or x is None:
            x = pool_tokens(dense, dense_grid, sparse_grid)  # (B, M, D)
        return super().forward(x, c, context=dense)  # (B, M, D)


class PixArtRecoveryBlock(RecoveryMerge, PixArtBlock):
    """First dense block after the sparse ones: ``Xm = up(Xs) W1 + X W2 + pos``; ``MHA(q=Xm, k=v=Xs)``.

    Then the text cross-attention (on the N dense tokens) and the MLP. W1 = 0, W2 = I at init.
    ``pos_embed=None`` leaves the table out; ``extra_recovery="repeat"`` repeats this block (as
    :class:`sparsedit.core.blocks.DenseRecoveryBlock`).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 upsample: str = "nearest"):
        super().__init__(hidden_size, num_heads, mlp_ratio, norm_eps)
        self.add_merge(hidden_size, upsample)

    def forward(self, x: Tensor, c: PixArtCond, sparse: Tensor, dense_grid: Grid,  # type: ignore[override]
                sparse_grid: Grid, pos_embed: Tensor | None) -> Tensor:
        merged = self.merge(x, sparse, dense_grid, sparse_grid, pos_embed)  # (B, N, D)
        return super().forward(merged, c, context=sparse)  # (B, N, D)


class PixArtCrossDenseBlock(PixArtBlock):
    """A further recovery block (r > 1): dense queries attend to the sparse tokens, no merge."""

    def forward(self, x: Tensor, c: PixArtCond, sparse: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, c, context=sparse)


@dataclass
class SparsePixArtConfig(SparseLayoutConfig, PixArtConfig):
    """A PixArt config plus the SparseDiT layout, the pruning-rate range and the sparse-grid options."""

    model_type: str = field(default="SparsePixArt", init=False)

    @classmethod
    def from_pixart(cls, config: PixArtConfig, layout: str | Layout, **kwargs: Any) -> SparsePixArtConfig:
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(PixArtConfig) if f.init}
        return cls(**base, **layout_fields(parse_layout(layout, config.patch_size)), **kwargs)


class SparsePixArt(PixArt):
    """PixArt with poolingformers, SDTMs and a timestep-wise sparse grid (self-attention tokens only).

    ``forward(x, t, encoder_hidden_states, encoder_attention_mask=None, added_cond_kwargs=None,
    grid=None, keep_ratio=None)``: the sparse grid comes from the schedule at the batch's timesteps
    unless ``grid=(h, w)`` or ``keep_ratio=M/N`` overrides it (:meth:`SparseDiT.sparse_grid`).
    """

    config: SparsePixArtConfig

    # The sparse grid choice and SparseDiT's block loop, reused as is (they only use the hooks above
    # and config.schedule).
    sparse_grid = SparseDiT.sparse_grid
    _sparse_forward = SparseDiT.forward

    def build_blocks(self, config: PixArtConfig) -> nn.ModuleList:
        assert isinstance(config, SparsePixArtConfig)
        self.kinds = block_kinds(config.layout, config.extra_recovery)
        args = (config.hidden_size, config.num_heads, config.mlp_ratio, config.norm_eps)
        make = {
            "pool": lambda: PixArtPoolingformer(*args),
            "gen": lambda: PixArtGenerationBlock(*args),
            "gen+": lambda: PixArtGenerationBlock(*args),
            "recover": lambda: PixArtRecoveryBlock(*args, upsample=config.upsample),
            "recover+": lambda: PixArtCrossDenseBlock(*args),
            "recover*": lambda: PixArtRecoveryBlock(*args, upsample=config.upsample),
        }
        return nn.ModuleList(make.get(kind, lambda: PixArtBlock(*args))() for kind in self.kinds)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        reset_merges(self.blocks)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor,  # type: ignore[override]
                encoder_attention_mask: Tensor | None = None, added_cond_kwargs: dict[str, Tensor] | None = None,
                grid: Grid | None = None, keep_ratio: float | None = None) -> Tensor:
        """x: (B, C, H, W), t: (B,), encoder_hidden_states: (B, L, C_text) -> (B, C_out, H, W)."""
        inputs = PixArtInputs(encoder_hidden_states, encoder_attention_mask, added_cond_kwargs)
        return self._sparse_forward(x, t, inputs, grid=grid, keep_ratio=keep_ratio)


def sparsify_pixart(model: PixArt, layout: str | Layout, r_min: float = 0.61, r_max: float = 0.86,
                    **options: Any) -> SparsePixArt:
    """PixArt -> SparsePixArt with the paper's initialisation (Sec. 3.3; :func:`sparsedit.families.dit.sparsify.init_rules`).

    Layer i <- layer i (self-attention, text cross-attention, MLP, ``scale_shift_table``);
    poolingformers keep V (rows [2D, 3D) of ``qkv``) and drop Q/K; W1 = 0, W2 = I; embedders, null
    caption and final layer are copied. ``options``: ``num_pieces``, ``num_timesteps``, ``upsample``.
    """
    if type(model) is not PixArt:
        raise SparseditError(f"sparsify_pixart needs a dense PixArt, got {type(model).__name__}")
    config = SparsePixArtConfig.from_pixart(model.config, layout, r_min=r_min, r_max=r_max, **options)
    sparse = SparsePixArt(config)
    initialise_from_dense(model, sparse)
    return sparse
