"""SparseLatte (paper Appendix A.3): Latte with poolingformers and video SDTMs whose sparse token set is a
(grid, frames) pair from the pruning schedule; its config and :func:`sparsify_latte`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.core.blocks import UPSAMPLE_MODES
from sparsedit.core.layout import Layout, SparseLayoutConfig, layout_fields, parse_layout, timestep_bounds
from sparsedit.core.schedule import Piece, PieceSampler, PruningSchedule, grid_for_rate, pruning_rate
from sparsedit.errors import SparseditError
from sparsedit.families.latte.model import SPARSE_LATTE_LAYOUTS, Grid, Latte, LatteConfig, swap_layout


def latte_block_kinds(layout: Layout) -> list[str]:
    """Kind of every SparseLatte layer: pool, gen_s, gen_t, sparse, recover_t, recover_s, dense, top.

    The video SDTM (paper A.3): ``gen_s`` (prune space), ``gen_t`` (prune time), ``s`` sparse blocks,
    ``recover_t`` (restore frames), ``recover_s`` (restore space), ``d`` dense blocks.
    """
    if layout.sdtm and (layout.gen != 2 or layout.recovery != 2):
        raise SparseditError(
            f"a video SDTM has exactly 2 generation blocks (space, then time) and 2 recovery blocks (time, then "
            f"space); layout {layout.as_string()} has g={layout.gen}, r={layout.recovery}"
        )
    if layout.pool % 2 or (layout.sparse + layout.dense) % 2:
        raise SparseditError(
            f"layout {layout.as_string()}: P and s+d must be even so that every SDTM starts at a spatial layer "
            "(its space-pruning block) and layer i keeps its source's spatial/temporal role"
        )
    sdtm = ["gen_s", "gen_t"] + ["sparse"] * layout.sparse + ["recover_t", "recover_s"] + ["dense"] * layout.dense
    return ["pool"] * layout.pool + sdtm * layout.sdtm + ["top"] * layout.top


def latte_block_axes(kinds: list[str]) -> list[str]:
    """Attention axis of every layer: "s" (within frames) or "t" (over frames).

    Source parity (even = spatial), except the SDTM ends, whose axis is what they prune or restore:
    ``gen_s``/``recover_s`` spatial, ``gen_t``/``recover_t`` temporal. With the SDTM starting at a
    spatial layer, only the recovery pair differs from its source layer (``recover_t`` sits on a
    spatial layer, ``recover_s`` on a temporal one; see docs/latte.md).
    """
    fixed = {"gen_s": "s", "recover_s": "s", "gen_t": "t", "recover_t": "t"}
    return [fixed.get(k, "s" if i % 2 == 0 else "t") for i, k in enumerate(kinds)]


def split_keep_ratio(keep: float, dense_grid: Grid, frames: int, temporal_share: float) -> tuple[Grid, int]:
    """Sparse (grid, frames) for a total keep ratio ``keep = 1 - r`` of the F x H x W token set.

    ``keep`` is split in log space: frames keep ``keep ** temporal_share``, space keeps
    ``keep ** (1 - temporal_share)`` (grid from :func:`sparsedit.core.schedule.grid_for_rate`, which keeps
    the aspect ratio). ``temporal_share = 1/3`` shrinks all three axes by the same factor.
    ``f = max(1, round_half_up(F * keep ** temporal_share))``.
    """
    if not 0 < keep <= 1:
        raise SparseditError(f"keep ratio must be in (0, 1], got {keep}")
    grid = grid_for_rate(1.0 - keep ** (1.0 - temporal_share), *dense_grid)
    return grid, max(1, math.floor(frames * keep**temporal_share + 0.5))


@dataclass
class SparseLatteConfig(LatteConfig):
    """A Latte config plus the SparseDiT layout, the rate range, its space/time split and upsampling.

    The pruning rate r(t) of :mod:`sparsedit.core.schedule` applies to the whole F x N token set; ``temporal_share``
    splits it (:func:`split_keep_ratio`). Rates come from the formula at every timestep (no training
    pieces: video piece sampling is not implemented). ``recovery_pos_embed`` (as in SparseDiT,
    docs/official.md): the recovery merges re-add the temporal / spatial table (True, the paper) or not.
    A video SDTM's two recovery blocks restore time, then space, so SparseDiT's ``extra_recovery``
    (what a 2nd.. recovery block of the same axis does) has no counterpart here.
    """

    pool_blocks: int = 2
    num_sdtm: int = 4
    gen_blocks: int = 2
    sparse_blocks: int = 2
    recovery_blocks: int = 2
    dense_blocks: int = 0
    top_blocks: int = 2
    r_min: float = 0.80
    r_max: float = 0.93
    temporal_share: float = 1.0 / 3.0
    num_timesteps: int = 1000
    upsample: str = "nearest"
    recovery_pos_embed: bool = True
    model_type: str = field(default="SparseLatte", init=False)

    # A config.json may lack only this field (written before it existed; the default is that behaviour).
    OPTIONAL_FIELDS = frozenset({"recovery_pos_embed"})

    layout = SparseLayoutConfig.layout

    def __post_init__(self) -> None:
        super().__post_init__()
        latte_block_kinds(self.layout)  # validates g, r and parity
        if self.layout.depth != self.depth:
            raise SparseditError(
                f"layout {self.layout.as_string()} has {self.layout.depth} blocks but the model has depth {self.depth}"
            )
        if not 0.0 <= self.temporal_share <= 1.0:
            raise SparseditError(f"temporal_share must be in [0, 1], got {self.temporal_share}")
        if self.upsample not in UPSAMPLE_MODES:
            raise SparseditError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {self.upsample!r}")
        if not isinstance(self.recovery_pos_embed, bool):
            raise SparseditError(f"recovery_pos_embed must be true or false, not {self.recovery_pos_embed!r}")
        self.schedule  # validates the rates  # noqa: B018

    @property
    def schedule(self) -> PruningSchedule:
        return PruningSchedule(self.r_min, self.r_max, self.num_timesteps)

    def tokens_at(self, t: int, dense_grid: Grid | None = None, frames: int | None = None) -> tuple[Grid, int]:
        """Sparse (grid, frames) at timestep ``t``: r(t) of the schedule, split by ``temporal_share``."""
        dense_grid = self.grid if dense_grid is None else dense_grid
        frames = self.num_frames if frames is None else frames
        return split_keep_ratio(1.0 - self.schedule.rate(t), dense_grid, frames, self.temporal_share)

    @classmethod
    def from_latte(cls, config: LatteConfig, layout: str | Layout, **kwargs: Any) -> SparseLatteConfig:
        name = layout.split("/")[0] if isinstance(layout, str) else None
        lay = SPARSE_LATTE_LAYOUTS[name] if name in SPARSE_LATTE_LAYOUTS else parse_layout(layout)
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(LatteConfig) if f.init}
        return cls(**base, **layout_fields(lay), **kwargs)


class SparseLatte(Latte):
    """Latte with poolingformers, video SDTMs and a timestep-wise sparse token set.

    Token sets: dense X (B*F, N, D); after ``gen_s`` the spatially sparse set (B*F, M, D), M = h*w
    (each frame's H x W grid adaptively average-pooled to h x w; cross-attention q = sparse, k/v =
    dense, within the frame); after ``gen_t`` the sparse set (B*M, f, D) (the F frames of every sparse
    location pooled to f; cross-attention over time). Sparse blocks alternate spatial (B*f, M, D)
    and temporal (B*M, f, D). ``recover_t`` restores frames: ``Xm = up_t(Xs) W1 + X_t W2 + temporal
    table``, X_t = the input of ``gen_t`` (B*M, F, D); cross-attention q = Xm over the f sparse
    frames. ``recover_s`` restores space the same way from the input of ``gen_s`` with the spatial
    table (B*F, N, D). Poolingformers average V over the frame (spatial layers) or over the frames
    (temporal layers).

    ``forward(..., grid=None, frames=None, keep_ratio=None)``: the sparse (grid, frames) comes from
    the schedule at the batch's timesteps unless given (``grid``/``frames`` each, or ``keep_ratio``).
    """

    config: SparseLatteConfig

    def build_blocks(self, config: LatteConfig) -> nn.ModuleList:
        assert isinstance(config, SparseLatteConfig)
        self.kinds = latte_block_kinds(config.layout)
        self.axes = latte_block_axes(self.kinds)
        return nn.ModuleList(self.make_block(kind, i % 2 == 0) for i, kind in enumerate(self.kinds))

    def block_axis(self, layer: int) -> str:
        # Dense-token layers keep the source's parity; recover_s ends in the spatial layout (latte_block_axes).
        return self.axes[layer]

    def sparse_tokens(self, t: Tensor, dense_grid: Grid, frames: int, grid: Grid | None = None,
                      sparse_frames: int | None = None, keep_ratio: float | None = None) -> tuple[Grid, int]:
        """The sparse (grid, frames) of a batch: explicit values, else ``keep_ratio``, else the schedule at ``t``."""
        cfg = self.config
        H, W = dense_grid
        if keep_ratio is not None:
            auto = split_keep_ratio(keep_ratio, dense_grid, frames, cfg.temporal_share)
        elif grid is None or sparse_frames is None:
            lo, hi = timestep_bounds(t, cfg.num_timesteps)
            auto = cfg.tokens_at(lo, dense_grid, frames)
            if cfg.tokens_at(hi, dense_grid, frames) != auto:
                raise SparseditError(
                    f"this batch mixes timesteps {lo} and {hi}, which use different sparse token sets; give a batch "
                    "one timestep range or pass grid=(h, w) and frames=f"
                )
        else:
            auto = ((H, W), frames)
        hw = auto[0] if grid is None else (int(grid[0]), int(grid[1]))
        f = auto[1] if sparse_frames is None else int(sparse_frames)
        if not (1 <= hw[0] <= H and 1 <= hw[1] <= W and 1 <= f <= frames):
            raise SparseditError(f"sparse tokens {hw[0]}x{hw[1]} x {f} frames must lie within {H}x{W} x {frames}")
        return hw, f

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None,  # type: ignore[override]
                encoder_attention_mask: Tensor | None = None, added_cond_kwargs: dict[str, Tensor] | None = None, *,
                encoder_hidden_states: Tensor | None = None, grid: Grid | None = None, frames: int | None = None,
                keep_ratio: float | None = None) -> Tensor:
        """x: (B, C, F, H, W), t: (B,), y: labels or captions -> (B, C_out, F, H, W)."""
        dense_grid, nf = self.token_grid(x)
        t, y = self._inputs(x, t, y, encoder_hidden_states, added_cond_kwargs)
        sgrid, sf = self.sparse_tokens(t, dense_grid, nf, grid, frames, keep_ratio)
        b, n, m = x.shape[0], dense_grid[0] * dense_grid[1], sgrid[0] * sgrid[1]
        conds = self.conditions(t, y, encoder_attention_mask)
        tpos = self.temporal_embedding(nf)  # (1, F, D)
        # The tables the recovery merges re-add (None: off, as in the SparseDiT authors' code).
        readd = self.config.recovery_pos_embed
        recovery_tpos = tpos if readd else None
        recovery_spos = self.position_embedding(dense_grid) if readd else None
        run = self.run_block

        def to(z: Tensor, axis: str, want: str) -> Tensor:
            return z if axis == want else swap_layout(z, b)

        h, h_axis = self.embed(x, dense_grid), "s"  # dense tokens, (B*F, N, D)
        xs, xs_axis = h, "s"  # current sparse tokens
        dense_s = dense_t = h  # inputs of gen_s / gen_t, kept for recovery
        for i, (block, kind, axis) in enumerate(zip(self.blocks, self.kinds, self.axes, strict=True)):
            text = i % 2 == 0  # the source layer is spatial (text variant: it has text attention)
            if kind == "gen_s":
                dense_s = to(h, h_axis, "s")  # (B*F, N, D)
                xs = run(block, None, conds.rows(nf, text), dense_s, dense_grid, sgrid)  # (B*F, M, D)
                xs_axis = "s"
            elif kind == "gen_t":
                dense_t = to(xs, xs_axis, "t")  # (B*M, F, D)
                if i == 1:  # no poolingformers: the temporal table goes in before the first temporal layer
                    dense_t = dense_t + tpos
                xs = run(block, None, conds.rows(m, text), dense_t, (nf, 1), (sf, 1))  # (B*M, f, D)
                xs_axis = "t"
            elif kind == "sparse":
                xs, xs_axis = to(xs, xs_axis, axis), axis  # (B*f, M, D) or (B*M, f, D)
                xs = run(block, xs, conds.rows(sf if axis == "s" else m, text))
            elif kind == "recover_t":
                sparse = to(xs, xs_axis, "t")  # (B*M, f, D)
                xs = run(block, dense_t, conds.rows(m, text), sparse, (nf, 1), (sf, 1), recovery_tpos)  # (B*M, F, D)
                xs_axis = "t"
            elif kind == "recover_s":
                sparse = to(xs, xs_axis, "s")  # (B*F, M, D)
                h = run(block, dense_s, conds.rows(nf, text), sparse, dense_grid, sgrid, recovery_spos)  # (B*F, N, D)
                h_axis = "s"
            else:  # pool, dense, top: dense tokens
                h, h_axis = to(h, h_axis, axis), axis
                if i == 1:
                    h = h + tpos
                h = run(block, h, conds.rows(nf if axis == "s" else n, text))  # (B*F, N, D) or (B*N, F, D)
        return self.head(to(h, h_axis, "s"), conds, dense_grid, b)


def sparsify_latte(model: Latte, layout: str | Layout = "SparseLatte-XL", r_min: float = 0.80, r_max: float = 0.93,
                   **options: Any) -> SparseLatte:
    """Latte -> SparseLatte with the paper's initialisation (Sec. 3.3; :func:`sparsedit.families.dit.sparsify.init_rules`).

    Layer i <- layer i; poolingformers keep V (rows [2D, 3D) of ``qkv``) and drop Q/K; generation and
    recovery blocks reuse the source q/k/v/proj as cross-attention; W1 = 0, W2 = I; embedders and final
    layer copied. ``options``: ``temporal_share``, ``num_timesteps``, ``upsample``.
    """
    from sparsedit.families.dit.sparsify import initialise_from_dense

    if type(model) is not Latte:
        raise SparseditError(f"sparsify_latte needs a dense Latte, got {type(model).__name__}")
    config = SparseLatteConfig.from_latte(model.config, layout, r_min=r_min, r_max=r_max, **options)
    sparse = SparseLatte(config)
    initialise_from_dense(model, sparse)
    return sparse


@dataclass(frozen=True)
class VideoPiece(Piece):
    """A run of timesteps sharing one SparseLatte token set: ``grid`` (h, w) per frame and ``frames`` f.

    ``rate`` is r(t) of the whole F x H x W token set at the midpoint; the set splits it between
    space and time (:func:`sparsedit.families.latte.model.split_keep_ratio`), so ``grid`` is not ``grid_for_rate(rate)``.
    """

    frames: int

    @property
    def label(self) -> str:
        """How logs name the piece's token set: ``4x4x2f`` (grid x frames)."""
        return f"{self.grid[0]}x{self.grid[1]}x{self.frames}f"


def video_pieces(config: SparseLatteConfig) -> list[VideoPiece]:
    """The maximal runs of timesteps over which ``config.tokens_at(t)`` is constant, in increasing t."""
    T = config.num_timesteps
    sets = [config.tokens_at(t) for t in range(T)]  # ((h, w), f) per timestep
    starts = [0] + [t for t in range(1, T) if sets[t] != sets[t - 1]]
    return [VideoPiece(a, b, sets[a][0], pruning_rate((a + b - 1) / 2, config.r_min, config.r_max, T), sets[a][1])
            for a, b in zip(starts, [*starts[1:], T], strict=True)]


class VideoPieceSampler(PieceSampler):
    """:class:`PieceSampler` over SparseLatte's token sets: one piece with probability length / T, then
    every t of the batch uniform inside it, so a batch shares one (grid, frames) and t stays uniform.

    SparseLatte takes its token set from r(t) at every timestep (no grid pieces in its config), so the
    pieces are the runs of timesteps with one token set (:func:`video_pieces`).
    """

    def __init__(self, config: SparseLatteConfig, generator: torch.Generator | None = None):
        super().__init__(config.schedule, config.grid, generator)
        self.pieces: list[Piece] = list(video_pieces(config))
        self._starts = [p.t_start for p in self.pieces]
