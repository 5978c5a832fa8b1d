"""SparseDiT: a DiT whose layers are split into poolingformers, sparse-dense token modules (SDTMs)
and standard top blocks, with a timestep-wise sparse token grid (paper Sec. 3).

Layer i of the SparseDiT sits at ``blocks.{i}`` and is initialised from layer i of the source DiT
(:mod:`sparsedit.families.dit.sparsify`). The model picks its sparse grid from the timesteps of the batch via the
pruning schedule saved in its config, so a checkpoint samples with no extra flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from sparsedit.core.blocks import (
    CrossDenseBlock,
    DenseRecoveryBlock,
    Poolingformer,
    SparseGenerationBlock,
    reset_merges,
)
from sparsedit.core.layers import DiTBlock
from sparsedit.core.layout import Layout, SparseLayoutConfig, block_kinds, layout_fields, parse_layout, timestep_bounds
from sparsedit.core.schedule import grid_for_rate
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import DiT, DiTConfig

Grid = tuple[int, int]


@dataclass
class SparseDiTConfig(SparseLayoutConfig, DiTConfig):
    """A DiT config plus the SparseDiT layout, the pruning-rate range and the sparse-grid options."""

    model_type: str = field(default="SparseDiT", init=False)

    @classmethod
    def from_dit(cls, config: DiTConfig, layout: str | Layout, **kwargs: Any) -> SparseDiTConfig:
        """The SparseDiT config for a source DiT config, a layout and schedule options."""
        base = {k: v for k, v in config.to_dict().items() if k != "model_type"}
        return cls(**base, **layout_fields(parse_layout(layout, config.patch_size)), **kwargs)


class SparseDiT(DiT):
    """DiT with poolingformers, SDTMs and a timestep-wise sparse grid.

    ``forward(x, t, y)`` takes the sparse grid from the schedule for the batch's timesteps (all items
    must map to one grid); ``grid=(h, w)`` or ``keep_ratio=M/N`` override it.
    """

    config: SparseDiTConfig

    def build_blocks(self, config: DiTConfig) -> nn.ModuleList:
        assert isinstance(config, SparseDiTConfig)
        self.kinds = block_kinds(config.layout, config.extra_recovery)
        args = (config.hidden_size, config.num_heads, config.mlp_ratio, config.norm_eps, config.mlp_norm_eps)
        make = {
            "pool": lambda: Poolingformer(config.hidden_size, config.mlp_ratio, config.norm_eps, config.mlp_norm_eps),
            "gen": lambda: SparseGenerationBlock(*args),
            "gen+": lambda: SparseGenerationBlock(*args),
            "sparse": lambda: DiTBlock(*args),
            "recover": lambda: DenseRecoveryBlock(*args, upsample=config.upsample),
            "recover+": lambda: CrossDenseBlock(*args),
            "recover*": lambda: DenseRecoveryBlock(*args, upsample=config.upsample),
            "dense": lambda: DiTBlock(*args),
            "top": lambda: DiTBlock(*args),
        }
        return nn.ModuleList(make[kind]() for kind in self.kinds)

    def initialize_weights(self, gain: float = 1.0) -> None:
        super().initialize_weights(gain)
        reset_merges(self.blocks)

    def sparse_grid(
        self, t: Tensor, dense_grid: Grid, grid: Grid | None = None, keep_ratio: float | None = None
    ) -> Grid:
        """The sparse grid for a batch: explicit ``grid``, else ``keep_ratio``, else the schedule at ``t``."""
        H, W = dense_grid
        if grid is not None:
            h, w = int(grid[0]), int(grid[1])
            if not (1 <= h <= H and 1 <= w <= W):
                raise SparseditError(f"sparse grid {h}x{w} must lie within 1x1 .. {H}x{W} (the dense token grid)")
            return h, w
        if keep_ratio is not None:
            if not 0 < keep_ratio <= 1:
                raise SparseditError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
            return grid_for_rate(1.0 - keep_ratio, H, W)
        schedule = self.config.schedule
        # r(t) is monotone, so the extreme timesteps decide whether the batch shares one grid.
        lo, hi = timestep_bounds(t, schedule.num_timesteps)
        g_lo, g_hi = schedule.grid(lo, dense_grid), schedule.grid(hi, dense_grid)
        if g_lo != g_hi:
            raise SparseditError(
                f"this batch mixes timesteps {lo} and {hi}, which use sparse grids {g_lo} and {g_hi}; draw a batch's "
                "timesteps from one schedule piece (schedule.PieceSampler) or pass grid=(h, w)"
            )
        return g_lo

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, grid: Grid | None = None, keep_ratio: float | None = None
    ) -> Tensor:
        """x: (B, C, H, W), t: (B,), y: (B,) -> (B, C_out, H, W)."""
        dense_grid = self.token_grid(x)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        sparse_grid = self.sparse_grid(t, dense_grid, grid, keep_ratio)
        pos = self.position_embedding(dense_grid)  # (1, N, D)
        h = self.x_embedder(x) + pos  # (B, N, D)
        recovery_pos = pos if self.config.recovery_pos_embed else None  # off: the authors' code
        cs = self.conditions(t, y)
        dense_in = xs = h
        run = self.run_block
        for block, c, kind in zip(self.blocks, cs, self.kinds, strict=True):
            if kind == "gen":
                dense_in = h  # kept for the recovery block
                xs = run(block, None, c, dense_in, dense_grid, sparse_grid, pool=True)  # (B, M, D)
            elif kind == "gen+":
                xs = run(block, xs, c, dense_in, dense_grid, sparse_grid, pool=False)  # (B, M, D)
            elif kind == "sparse":
                xs = run(block, xs, c)  # (B, M, D)
            elif kind == "recover":
                h = run(block, dense_in, c, xs, dense_grid, sparse_grid, recovery_pos)  # (B, N, D)
            elif kind == "recover*":  # merges the SDTM input with the previous recovery output, attends to it
                h = run(block, dense_in, c, h, dense_grid, dense_grid, recovery_pos)  # (B, N, D)
            elif kind == "recover+":
                h = run(block, h, c, xs)  # (B, N, D)
            else:  # pool, dense, top
                h = run(block, h, c)  # (B, N, D)
        return self.head(h, cs[0], dense_grid)


