"""SparseDiT: a DiT whose layers are split into poolingformers, sparse-dense token modules (SDTMs)
and standard top blocks, with a timestep-wise sparse token grid (paper Sec. 3).

Layer i of the SparseDiT sits at ``blocks.{i}`` and is initialised from layer i of the source DiT
(:mod:`sparsedit.sparsify`). The model picks its sparse grid from the timesteps of the batch via the
pruning schedule saved in its config, so a checkpoint samples with no extra flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparsedit.blocks import (
    EXTRA_RECOVERY_MODES,
    UPSAMPLE_MODES,
    CrossDenseBlock,
    DenseRecoveryBlock,
    Poolingformer,
    SparseGenerationBlock,
    reset_merges,
)
from sparsedit.checkpoint import register_model_type
from sparsedit.dit import DiT, DiTConfig
from sparsedit.errors import SparseditError
from sparsedit.layers import DiTBlock
from sparsedit.schedule import PruningSchedule, discrete_timestep, grid_for_rate

Grid = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """Block counts: P poolingformers, K SDTMs of (g gen, s sparse, r recovery, d dense), T top blocks."""

    pool: int
    sdtm: int
    gen: int
    sparse: int
    recovery: int
    dense: int
    top: int

    @property
    def depth(self) -> int:
        return self.pool + self.sdtm * (self.gen + self.sparse + self.recovery + self.dense) + self.top

    def feature_layers(self) -> list[int]:
        """Layers whose output is the whole dense token set, as in the source's same layer: the last block
        of every SDTM and the last block (the input of the final layer). Feature distillation taps these."""
        ends = [self.pool + k * (self.gen + self.sparse + self.recovery + self.dense) - 1 for k in range(1, self.sdtm + 1)]
        return sorted({*ends, self.depth - 1})

    def as_string(self) -> str:
        return ",".join(str(v) for v in (self.pool, self.sdtm, self.gen, self.sparse, self.recovery, self.dense, self.top))


# The paper's layouts (Sec. 4.1) plus our choices for the sizes it does not cover (S shares B's
# depth; L: 24 layers as 2 + 4 x (1, 2, 1, 1) + 2).
LAYOUTS: dict[str, Layout] = {
    "SparseDiT-XL": Layout(pool=2, sdtm=4, gen=1, sparse=3, recovery=1, dense=1, top=2),
    "SparseDiT-L": Layout(pool=2, sdtm=4, gen=1, sparse=2, recovery=1, dense=1, top=2),
    "SparseDiT-B": Layout(pool=1, sdtm=2, gen=1, sparse=2, recovery=1, dense=1, top=1),
    "SparseDiT-S": Layout(pool=1, sdtm=2, gen=1, sparse=2, recovery=1, dense=1, top=1),
}
LAYOUT_HELP = "a preset (" + ", ".join(f"{k}/2" for k in LAYOUTS) + ") or 7 counts 'P,K,g,s,r,d,T' such as 2,4,1,3,1,1,2"


def parse_layout(spec: str | Layout, patch_size: int | None = None) -> Layout:
    """``"SparseDiT-XL/2"`` (the patch suffix is optional) or ``"P,K,g,s,r,d,T"`` -> :class:`Layout`.

    A patch suffix must be the model's ``patch_size`` when that is given: ``SparseDiT-B/4`` names another model.
    """
    if isinstance(spec, Layout):
        return spec
    if not isinstance(spec, str):
        raise SparseditError(f"a layout is a preset name or 'P,K,g,s,r,d,T', not a {type(spec).__name__}; use "
                             f"{LAYOUT_HELP}")
    name, _, patch = spec.partition("/")
    if patch and (not patch.isdigit() or (patch_size is not None and int(patch) != patch_size)):
        raise SparseditError(f"layout {spec!r} is for patch size {patch}, but the model's patch size is {patch_size}; "
                             f"write {name}/{patch_size} or {name}")
    if name in LAYOUTS:
        return LAYOUTS[name]
    parts = spec.replace(" ", "").split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 7 or min(values) < 0:
        raise SparseditError(f"unknown layout {spec!r}; use {LAYOUT_HELP}")
    return Layout(*values)


def layout_fields(layout: Layout) -> dict[str, int]:
    """A :class:`Layout` as the config fields that store it (``pool_blocks=P``, ``num_sdtm=K``, ...)."""
    return dict(pool_blocks=layout.pool, num_sdtm=layout.sdtm, gen_blocks=layout.gen, sparse_blocks=layout.sparse,
                recovery_blocks=layout.recovery, dense_blocks=layout.dense, top_blocks=layout.top)


@dataclass
class SparseLayoutConfig:
    """Mixin: the SparseDiT layout, pruning-rate range and sparse-grid fields, with their validation.

    Put it before a dense config class (``class SparseXConfig(SparseLayoutConfig, XConfig)``): its
    fields then follow the dense ones and ``__post_init__`` validates the dense fields first. Shared by
    SparseDiT and SparsePixArt, whose sparse fields mean the same.

    Variant switches (docs/official.md): ``recovery_pos_embed`` re-adds the position table in every
    recovery merge (the paper; False = the authors' code); ``extra_recovery`` says what the 2nd..
    recovery blocks of an SDTM are: "cross" (ours: cross-attention to the sparse tokens, no merge) or
    "repeat" (the authors' code: the recovery block again, merging its own W1/W2 and attending to the
    dense tokens). Their defaults are what sparsedit computed before the switches existed.
    """

    if TYPE_CHECKING:  # provided by the dense config (not fields of the mixin)
        depth: int

    # Fields that checkpoints written before they existed lack; their defaults are that older behaviour.
    # Every other field must be in a config.json (see checkpoint.config_from_dict).
    OPTIONAL_FIELDS = frozenset({"recovery_pos_embed", "extra_recovery"})

    pool_blocks: int = 2
    num_sdtm: int = 4
    gen_blocks: int = 1
    sparse_blocks: int = 3
    recovery_blocks: int = 1
    dense_blocks: int = 1
    top_blocks: int = 2
    r_min: float = 0.61
    r_max: float = 0.86
    num_pieces: int | None = None
    num_timesteps: int = 1000
    upsample: str = "nearest"
    recovery_pos_embed: bool = True
    extra_recovery: str = "cross"

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # the dense config's checks
        layout = self.layout
        if layout.sdtm and (layout.gen < 1 or layout.recovery < 1):
            raise SparseditError("an SDTM needs at least one generation and one recovery block (g >= 1, r >= 1)")
        if layout.depth != self.depth:
            raise SparseditError(
                f"layout {layout.as_string()} has {layout.depth} blocks but the model has depth {self.depth}; "
                "make P + K*(g+s+r+d) + T equal the source depth"
            )
        if self.upsample not in UPSAMPLE_MODES:
            raise SparseditError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {self.upsample!r}")
        if self.extra_recovery not in EXTRA_RECOVERY_MODES:
            raise SparseditError(f"extra_recovery must be one of {', '.join(EXTRA_RECOVERY_MODES)}, "
                                 f"not {self.extra_recovery!r}")
        if not isinstance(self.recovery_pos_embed, bool):
            raise SparseditError(f"recovery_pos_embed must be true or false, not {self.recovery_pos_embed!r}")
        self.schedule  # validates the rates  # noqa: B018

    @property
    def layout(self) -> Layout:
        return Layout(self.pool_blocks, self.num_sdtm, self.gen_blocks, self.sparse_blocks, self.recovery_blocks,
                      self.dense_blocks, self.top_blocks)

    @property
    def schedule(self) -> PruningSchedule:
        return PruningSchedule(self.r_min, self.r_max, self.num_timesteps, self.num_pieces)


@dataclass
class SparseDiTConfig(SparseLayoutConfig, DiTConfig):
    """A DiT config plus the SparseDiT layout, the pruning-rate range and the sparse-grid options."""

    model_type: str = field(default="SparseDiT", init=False)

    @classmethod
    def from_dit(cls, config: DiTConfig, layout: str | Layout, **kwargs: Any) -> SparseDiTConfig:
        """The SparseDiT config for a source DiT config, a layout and schedule options."""
        base = {k: v for k, v in config.to_dict().items() if k != "model_type"}
        return cls(**base, **layout_fields(parse_layout(layout, config.patch_size)), **kwargs)


def timestep_bounds(t: Tensor, num_timesteps: int) -> tuple[int, int]:
    """(min, max) of a batch's timesteps as schedule timesteps, read with one device -> host transfer.

    Reading ``t`` on a GPU waits for all queued work; one read per forward instead of two halves
    those stalls (the grid decides tensor shapes, so the host must know it). Fractional and
    flow-matching timesteps map to integers by :func:`sparsedit.schedule.discrete_timestep`.
    """
    lo, hi = torch.stack([t.min(), t.max()]).tolist()
    return discrete_timestep(lo, num_timesteps), discrete_timestep(hi, num_timesteps)


def block_kinds(layout: Layout, extra_recovery: str = "cross") -> list[str]:
    """Kind of every layer, in order: pool, gen, gen+, sparse, recover, recover+ / recover*, dense, top.

    ``gen+`` is a 2nd.. generation block of an SDTM: it cross-attends without pooling again. The
    2nd.. recovery blocks are ``recover+`` (``extra_recovery="cross"``: cross-attention to the sparse
    tokens, no merge) or ``recover*`` (``"repeat"``: a full recovery block whose "sparse" input is the
    previous recovery block's dense output).
    """
    extra = "recover+" if extra_recovery == "cross" else "recover*"
    sdtm = (["gen"] + ["gen+"] * (layout.gen - 1) + ["sparse"] * layout.sparse
            + ["recover"] + [extra] * (layout.recovery - 1) + ["dense"] * layout.dense)
    return ["pool"] * layout.pool + sdtm * layout.sdtm + ["top"] * layout.top


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


register_model_type("SparseDiT", SparseDiTConfig, SparseDiT)
