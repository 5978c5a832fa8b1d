"""SparseSD3: SparseDiT's layout (poolingformers, sparse-dense token modules, top blocks) and timestep-wise sparse
image grid on an SD3 / SD3.5 MMDiT, its config, and :func:`sparsify_sd3` with the paper's initialisation.

The caption stream stays dense in every block; the image stream is pruned to an ``h x w`` grid inside each SDTM
(blocks in :mod:`sparsedit.families.sd3.sparse_blocks`; the design and its reasons in docs/mmdit_sd3_sparse.md).
SD3 is a flow-matching model called with ``t = sigma * 1000``; the pruning schedule reads that timestep through
:func:`sparsedit.core.schedule.discrete_timestep`, exactly as SparseDiT does, so the noisiest steps are the sparsest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from sparsedit.core.blocks import reset_merges
from sparsedit.core.layers import unpatchify
from sparsedit.core.layout import Layout, SparseLayoutConfig, block_kinds, layout_fields, parse_layout
from sparsedit.errors import SparseditError
from sparsedit.families.dit.sparse import SparseDiT
from sparsedit.families.dit.sparsify import InitRule, build_sparse, default_rule
from sparsedit.families.sd3.model import SD3, JointBlock, SD3Config
from sparsedit.families.sd3.sparse_blocks import (
    JointCrossDenseBlock,
    JointGenerationBlock,
    JointPoolingformer,
    JointRecoveryBlock,
)

Grid = tuple[int, int]

# The default layout of each released size. 24 blocks: SparseDiT-L's 2 + 4 x (1, 2, 1, 1) + 2; 38 blocks (SD3.5-large):
# 3 + 4 x (1, 5, 1, 1) + 3, the same proportions. Not tuned on SD3 weights (docs/mmdit_sd3_sparse.md says how to).
SPARSE_SD3_LAYOUTS: dict[str, str] = {
    "SD3-medium": "2,4,1,2,1,1,2",
    "SD3.5-medium": "2,4,1,2,1,1,2",
    "SD3.5-large": "3,4,1,5,1,1,3",
}


@dataclass
class SparseSD3Config(SparseLayoutConfig, SD3Config):
    """An SD3 config plus the SparseDiT layout over its joint blocks, the pruning-rate range and the sparse-grid
    options (``SparseLayoutConfig``). The last block must be a top block (T >= 1): its caption stream is context
    pre-only, it gives keys and values but no output, so it cannot be a poolingformer or part of an SDTM."""

    model_type: str = field(default="SparseSD3", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_blocks < 1:
            last = block_kinds(self.layout, self.extra_recovery)[-1]
            raise SparseditError(f"layout {self.layout.as_string()} makes SD3's last block a {last} block, but its "
                                 "caption stream is context pre-only (keys and values only): it must be a top block; "
                                 "use T >= 1, e.g. 2,4,1,2,1,1,2 for 24 blocks")

    @classmethod
    def from_sd3(cls, config: SD3Config, layout: str | Layout, **kwargs: Any) -> SparseSD3Config:
        """The SparseSD3 config of a dense SD3 config, a layout and schedule options."""
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(SD3Config) if f.init}
        return cls(**base, **layout_fields(parse_layout(layout, config.patch_size)), **kwargs)


class SparseSD3(SD3):
    """SD3 with poolingformers, SDTMs over the image tokens and a timestep-wise sparse image grid.

    ``forward(x, t, encoder_hidden_states, pooled_projections, grid=None, keep_ratio=None)``: ``t = sigma * 1000``;
    the sparse grid comes from the schedule at the batch's timesteps (all items must share one grid) unless
    ``grid=(h, w)`` or ``keep_ratio=M/N`` overrides it (:meth:`SparseDiT.sparse_grid`).
    """

    config: SparseSD3Config

    sparse_grid = SparseDiT.sparse_grid  # reads only config.schedule: the same choice as SparseDiT's

    def build_blocks(self, config: SD3Config) -> nn.ModuleList:
        assert isinstance(config, SparseSD3Config)
        self.kinds = block_kinds(config.layout, config.extra_recovery)
        d, heads, ratio, qk = config.hidden_size, config.num_heads, config.mlp_ratio, config.qk_norm is not None
        blocks = []
        for i, kind in enumerate(self.kinds):
            dual = i in config.dual_attention_layers
            if kind == "pool":
                blocks.append(JointPoolingformer(d, heads, ratio, qk_norm=qk, dual=dual))
            elif kind in ("gen", "gen+"):
                blocks.append(JointGenerationBlock(d, heads, ratio, qk_norm=qk, dual=dual))
            elif kind in ("recover", "recover*"):
                blocks.append(JointRecoveryBlock(d, heads, ratio, qk_norm=qk, dual=dual, upsample=config.upsample))
            elif kind == "recover+":
                blocks.append(JointCrossDenseBlock(d, heads, ratio, qk_norm=qk, dual=dual))
            else:  # sparse, dense, top: the dense block (on M or N image tokens); the last one is context pre-only
                blocks.append(JointBlock(d, heads, ratio, qk_norm=qk, dual=dual, context_pre_only=i == config.depth - 1))
        return nn.ModuleList(blocks)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        reset_merges(self.blocks)  # W1 = 0, W2 = I again after the xavier pass

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor,  # type: ignore[override]
                pooled_projections: Tensor, grid: Grid | None = None, keep_ratio: float | None = None) -> Tensor:
        """x: (B, C, H, W), t: (B,) = sigma * 1000, encoder_hidden_states: (B, L, C_text), pooled_projections:
        (B, C_pooled) -> (B, C_out, H, W)."""
        dense_grid = self.token_grid(x)
        batch = x.shape[0]
        t = t.expand(batch) if t.ndim == 0 else t
        self.check_text(encoder_hidden_states, pooled_projections, batch)
        sparse_grid = self.sparse_grid(t, dense_grid, grid, keep_ratio)
        pos = self.position_embedding(dense_grid)  # (1, N, D)
        h = self.x_embedder(x) + pos  # (B, N, D): the only place SD3 adds positions; pooling carries them along
        recovery_pos = pos if self.config.recovery_pos_embed else None  # off: the SparseDiT authors' code
        c = self.t_embedder(t) + self.pooled_embedder(pooled_projections)  # (B, D)
        context: Tensor | None = self.context_embedder(encoder_hidden_states)  # (B, L, D), dense in every block
        dense_in = xs = h
        run = self.run_block
        for block, kind in zip(self.blocks, self.kinds, strict=True):
            if kind == "gen":
                dense_in = h  # kept for the recovery block's merge and the gen+ blocks' keys
                xs, context = run(block, None, context, c, dense_in, dense_grid, sparse_grid, True)  # (B, M, D)
            elif kind == "gen+":
                xs, context = run(block, xs, context, c, dense_in, dense_grid, sparse_grid, False)  # (B, M, D)
            elif kind == "sparse":
                xs, context = run(block, xs, context, c)  # (B, M, D)
            elif kind == "recover":
                h, context = run(block, dense_in, context, c, xs, dense_grid, sparse_grid, recovery_pos)  # (B, N, D)
            elif kind == "recover*":  # merges the SDTM input with the previous recovery output, attends to it
                h, context = run(block, dense_in, context, c, h, dense_grid, dense_grid, recovery_pos)
            elif kind == "recover+":
                h, context = run(block, h, context, c, xs)  # (B, N, D)
            else:  # pool, dense, top (context None after the last block)
                h, context = run(block, h, context, c)  # (B, N, D)
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(h, dense_grid, self.config.patch_size, self.config.out_channels)


# ------------------------------------------------------------------------------------------------
# SD3 -> SparseSD3 (paper Sec. 3.3)
# ------------------------------------------------------------------------------------------------


def sd3_init_rules(config: SparseSD3Config, target_keys: list[str]) -> list[InitRule]:
    """One rule per SparseSD3 state-dict key: layer i <- layer i of the SD3.

    Poolingformers: ``attn.kv`` <- rows [D, 3D) of ``attn.qkv`` (image K and V: the caption queries need the image
    keys), ``attn2.v`` <- rows [2D, 3D) of ``attn2.qkv`` (V); W1 (``merge_sparse``) = 0, W2 (``merge_dense``) = I
    with bias 0; every other tensor (embedders, q/k norms, caption stream, MLPs, adaLN, final layer, position table,
    the last block's unused caption-query buffers) is a copy of the same key.
    """
    d = config.hidden_size
    rules: list[InitRule] = []
    for key in target_keys:
        if ".attn.kv." in key:
            rules.append(InitRule(key, "slice", key.replace(".attn.kv.", ".attn.qkv."), (d, 3 * d), "K, V of qkv"))
        elif ".attn2.v." in key:
            rules.append(InitRule(key, "slice", key.replace(".attn2.v.", ".attn2.qkv."), (2 * d, 3 * d),
                                     "V of qkv"))
        else:
            rules.append(default_rule(key))
    return rules


def dropped_keys(config: SparseSD3Config, kinds: list[str]) -> set[str]:
    """The source tensors a conversion leaves unused: the query norms of the poolingformers' image queries, which
    the uniform map removes (their ``qkv`` Q rows are dropped by the slices above)."""
    if config.qk_norm is None:
        return set()
    out = set()
    for i, kind in enumerate(kinds):
        if kind == "pool":
            out.add(f"blocks.{i}.attn.q_norm.weight")
            if i in config.dual_attention_layers:
                out.update({f"blocks.{i}.attn2.q_norm.weight", f"blocks.{i}.attn2.k_norm.weight"})
    return out


def sparsify_sd3(model: SD3, layout: str | Layout, r_min: float = 0.61, r_max: float = 0.86,
                 **options: Any) -> SparseSD3:
    """SD3 -> SparseSD3 with the paper's initialisation (:func:`sd3_init_rules`); in the source's dtype and device,
    in eval mode. ``options``: ``num_pieces``, ``num_timesteps``, ``upsample``, ``recovery_pos_embed``,
    ``extra_recovery``.
    """
    sparse, _ = sparsify_sd3_with_rules(model, layout, r_min, r_max, **options)
    return sparse


def sparsify_sd3_with_rules(model: SD3, layout: str | Layout, r_min: float = 0.61, r_max: float = 0.86,
                            **options: Any) -> tuple[SparseSD3, list[InitRule]]:
    """:func:`sparsify_sd3`, also returning the tensor-by-tensor initialisation map."""
    if type(model) is not SD3:
        raise SparseditError(f"sparsify_sd3 needs a dense SD3, got {type(model).__name__}; pass the original SD3")
    if layout is None:
        raise SparseditError("sparsifying an SD3 needs a layout 'P,K,g,s,r,d,T', e.g. 2,4,1,2,1,1,2 for 24 blocks")
    config = SparseSD3Config.from_sd3(model.config, layout, r_min=r_min, r_max=r_max, **options)
    return build_sparse(model, SparseSD3, config, sd3_init_rules,  # type: ignore[return-value]
                        lambda sparse: dropped_keys(config, sparse.kinds), "SD3")
