"""Timestep-wise pruning schedule of SparseDiT (paper Sec. 3.2).

The pruning rate ``r = 1 - M/N`` (N dense tokens on an ``H x W`` grid, M sparse tokens on an
``h x w`` grid) depends on the diffusion timestep ``t`` (``t = T-1`` is pure noise, ``t = 0`` is
clean)::

    r(t) = r_min                                              if t <  T/4
    r(t) = r_min * (4T - 4t)/(3T) + r_max * (4t - T)/(3T)     if T/4 <= t < T

so noisy steps use few tokens and the last quarter of denoising uses the most.

This module turns rates into token grids and splits ``[0, T)`` into *pieces* (runs of timesteps
that share one grid). Training draws one piece per step so a batch shares one token count while
``t`` stays uniform on ``[0, T)``; sampling uses the grid of each step's timestep. Training and
sampling read their grids from the same :class:`PruningSchedule`, so they always agree.

Conventions fixed here:

* ``T/4`` for integer timesteps is ``ceil(T/4)``: ``t < T/4`` holds exactly for the integers
  ``t < ceil(T/4)``, so this is the formula itself, not a choice that changes it.
* Grid sides are rounded half up (``floor(x + 0.5)``), not with Python's ``round`` (which rounds
  half to even), so a side of exactly ``k + 0.5`` always becomes ``k + 1``.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sparsedit.errors import SparseditError

__all__ = [
    "Piece",
    "PieceSampler",
    "PruningSchedule",
    "discrete_timestep",
    "grid_for_rate",
    "pruning_rate",
    "rate_for_grid",
]

Grid = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_rates(r_min: object, r_max: object) -> None:
    if not _is_real(r_min) or not _is_real(r_max):
        raise SparseditError(
            f"pruning rates must be numbers, got r_min={r_min!r}, r_max={r_max!r}; "
            "pass floats such as r_min=0.61, r_max=0.86"
        )
    if not 0.0 <= r_min <= r_max < 1.0:  # also rejects NaN
        raise SparseditError(
            f"invalid pruning-rate range r_min={r_min}, r_max={r_max}; "
            "need 0 <= r_min <= r_max < 1 (e.g. r_min=0.61, r_max=0.86)"
        )


def _check_num_timesteps(num_timesteps: object) -> int:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise SparseditError(
            f"num_timesteps must be a positive integer, got {num_timesteps!r}; "
            "use the diffusion training horizon, e.g. 1000"
        )
    return num_timesteps


def _check_dense_grid(dense_grid: object) -> Grid:
    try:
        H, W = dense_grid  # type: ignore[misc]
        H, W = operator.index(H), operator.index(W)
    except (TypeError, ValueError):
        raise SparseditError(
            f"dense_grid must be a pair of integers (H, W), got {dense_grid!r}; "
            "pass the patch grid, e.g. (16, 16) for DiT-XL/2 at 256 px"
        ) from None
    if H < 1 or W < 1:
        raise SparseditError(
            f"dense grid {H}x{W} is empty; pass positive sides, e.g. (16, 16) for DiT-XL/2 at 256 px"
        )
    return H, W


def _check_timestep(t: object, num_timesteps: int) -> int:
    """Return ``t`` as a Python int; accepts ints, numpy integers and 0-d integer tensors."""
    try:
        ti = operator.index(t)  # type: ignore[arg-type]
    except TypeError:
        raise SparseditError(
            f"timestep must be an integer, got {t!r}; map continuous time to an integer in "
            f"[0, {num_timesteps}) first"
        ) from None
    if not 0 <= ti < num_timesteps:
        raise SparseditError(
            f"timestep {ti} is outside [0, {num_timesteps}); pass 0 <= t < num_timesteps "
            "(t = 0 is clean, t = num_timesteps - 1 is pure noise)"
        )
    return ti


def discrete_timestep(t: float, num_timesteps: int = 1000) -> int:
    """The integer timestep whose sparse grid a possibly fractional timestep ``t`` uses.

    The schedule lives on the integers ``[0, T)``, but schedulers also pass fractional ``t``
    (Euler / Karras spacing) and flow-matching schedulers pass ``t = sigma * T`` in ``(0, T]``, where
    ``T`` itself is pure noise. ``t`` is rounded half up (as grid sides are) and the noise end ``T``
    maps to ``T - 1``; anything that does not round into ``[0, T]`` is an error, never clamped.
    """
    T = _check_num_timesteps(num_timesteps)
    ti = _round_half_up(t) if _is_real(t) and math.isfinite(t) else None
    if ti is None or not 0 <= ti <= T:
        raise SparseditError(
            f"timestep {t!r} is outside [0, {T}]; pass DDPM-style timesteps 0 <= t < {T} or flow-matching "
            f"timesteps sigma * {T}"
        )
    return min(ti, T - 1)


def _plateau_end(num_timesteps: int) -> int:
    """``ceil(T/4)``: the first integer timestep of the linear part of r(t)."""
    return -(-num_timesteps // 4)


# ---------------------------------------------------------------------------------------------
# the formula and the grid rule
# ---------------------------------------------------------------------------------------------


def _rate_unchecked(t: float, r_min: float, r_max: float, num_timesteps: int) -> float:
    T = num_timesteps
    if t < T / 4:
        return float(r_min)
    # Equal to r_min*(4T-4t)/(3T) + r_max*(4t-T)/(3T) (the two weights sum to 1). Written as
    # r_min + (r_max - r_min) * w it is exactly r_min at t = T/4, exactly constant when
    # r_min == r_max, and monotone in t even in floating point.
    return r_min + (r_max - r_min) * ((4 * t - T) / (3 * T))


def pruning_rate(t: float, r_min: float, r_max: float, num_timesteps: int = 1000) -> float:
    """Pruning rate ``r(t)`` of the timestep-wise schedule at timestep ``t``.

    ``r_min`` for ``t < T/4``, then linear from ``r_min`` at ``t = T/4`` towards ``r_max`` at
    ``t = T`` (so ``r(T-1)`` is slightly below ``r_max``).

    Args:
        t: diffusion timestep in ``[0, T)``; may be fractional.
        r_min: rate of the clean end (most tokens kept).
        r_max: rate the line reaches at ``t = T`` (fewest tokens kept).
        num_timesteps: ``T``.

    Raises:
        SparseditError: if not ``0 <= r_min <= r_max < 1`` or ``t`` is outside ``[0, T)``.
    """
    _check_rates(r_min, r_max)
    T = _check_num_timesteps(num_timesteps)
    if not _is_real(t) or not 0 <= t < T:
        raise SparseditError(
            f"timestep {t!r} is outside [0, {T}); pass 0 <= t < num_timesteps "
            "(t = 0 is clean, t = num_timesteps - 1 is pure noise)"
        )
    return _rate_unchecked(t, r_min, r_max, T)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def grid_for_rate(r: float, H: int, W: int) -> Grid:
    """Sparse token grid ``(h, w)`` for pruning rate ``r`` on a dense ``H x W`` grid.

    ``h = max(1, round_half_up(H * sqrt(1 - r)))`` and likewise ``w`` from ``W``: both sides
    shrink by the same factor, so the grid keeps the dense grid's aspect ratio and
    ``h*w / (H*W)`` is close to ``1 - r``. Rounding is half up (``floor(x + 0.5)``), not Python's
    half-to-even ``round``.

    Raises:
        SparseditError: if ``r`` is not in ``[0, 1)`` or a side is not a positive integer.
    """
    if not _is_real(r) or not 0.0 <= r < 1.0:
        raise SparseditError(f"pruning rate {r!r} is outside [0, 1); pass 0 <= r < 1, e.g. 0.75")
    H, W = _check_dense_grid((H, W))
    scale = math.sqrt(1.0 - r)
    return max(1, _round_half_up(H * scale)), max(1, _round_half_up(W * scale))


def rate_for_grid(grid: Grid, dense_grid: Grid) -> float:
    """A pruning rate ``r`` with ``grid_for_rate(r, H, W) == grid``: the constant rate that runs a model at ``grid``.

    ``round_half_up(H * k) == h`` holds for ``k = sqrt(1 - r)`` in ``[(h - 0.5)/H, (h + 0.5)/H)``; the
    rate takes the middle of that interval intersected with ``w``'s, far from either rounding edge
    (``8`` of ``16`` gives ``k = 0.5``, ``r = 0.75``; ``6`` of ``16`` gives ``r = 1 - (6/16)^2``).

    Raises:
        SparseditError: if no rate gives ``grid``: it is larger than the dense grid, or its sides do
            not shrink by one common factor (rate grids keep the dense grid's aspect ratio).
    """
    H, W = _check_dense_grid(dense_grid)
    try:
        h, w = (operator.index(v) for v in grid)
    except (TypeError, ValueError):
        raise SparseditError(f"sparse grid must be a pair of integers (h, w), got {grid!r}") from None
    if (h, w) == (H, W):
        return 0.0
    lo = max((h - 0.5) / H, (w - 0.5) / W)
    hi = min((h + 0.5) / H, (w + 0.5) / W, 1.0)
    if not (1 <= h <= H and 1 <= w <= W) or lo >= hi:
        raise SparseditError(
            f"no pruning rate gives the sparse grid {h}x{w} on the dense grid {H}x{W}: sparsedit's grids keep the "
            "dense grid's aspect ratio and lie within it; pick such a grid"
        )
    k = (lo + hi) / 2
    rate = 1.0 - k * k
    if grid_for_rate(rate, H, W) != (h, w):  # cannot happen away from the edges; guards float surprises
        raise SparseditError(f"no pruning rate reproduces the sparse grid {h}x{w} on {H}x{W} exactly")
    return rate


# ---------------------------------------------------------------------------------------------
# pieces and the schedule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A run of integer timesteps ``[t_start, t_end)`` that share one sparse token grid.

    ``rate`` is r(t) at the piece's midpoint ``(t_start + t_end - 1) / 2``;
    ``grid == grid_for_rate(rate, H, W)`` always holds.
    """

    t_start: int
    t_end: int
    grid: Grid
    rate: float

    @property
    def length(self) -> int:
        """Number of integer timesteps in the piece."""
        return self.t_end - self.t_start

    @property
    def num_tokens(self) -> int:
        """Sparse tokens per sample, ``h * w``."""
        return self.grid[0] * self.grid[1]

    @property
    def label(self) -> str:
        """How logs name the piece's token set: ``5x5``."""
        return f"{self.grid[0]}x{self.grid[1]}"

    def __contains__(self, t: object) -> bool:
        return self.t_start <= t < self.t_end  # type: ignore[operator]


_CONFIG_KEYS = ("r_min", "r_max", "num_timesteps", "num_pieces")


@dataclass(frozen=True)
class PruningSchedule:
    """Timestep-wise pruning schedule: rate, token grid and training pieces for every timestep.

    Two modes, both with training and sampling using identical grids:

    * ``num_pieces=None`` (default): ``grid(t) = grid_for_rate(rate(t))`` for every timestep; the
      pieces are the maximal runs of timesteps over which that grid is constant.
    * ``num_pieces=n``: ``[ceil(T/4), T)`` is split into ``n`` integer pieces whose lengths differ
      by at most one, plus the piece ``[0, ceil(T/4))`` at ``r_min``. Each piece uses the grid of
      the rate at its midpoint and ``grid(t)`` is the grid of the piece containing ``t``.

    In both modes adjacent pieces with equal grids are merged.

    Methods that take ``dense_grid`` want the dense patch grid ``(H, W)``, e.g. ``(16, 16)`` for
    DiT-XL/2 at 256 px. Timesteps are integers in ``[0, num_timesteps)``.
    """

    r_min: float
    r_max: float
    num_timesteps: int = 1000
    num_pieces: int | None = None

    def __post_init__(self) -> None:
        _check_rates(self.r_min, self.r_max)
        T = _check_num_timesteps(self.num_timesteps)
        object.__setattr__(self, "r_min", float(self.r_min))
        object.__setattr__(self, "r_max", float(self.r_max))
        n = self.num_pieces
        if n is None:
            return
        linear_len = T - _plateau_end(T)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SparseditError(
                f"num_pieces must be a positive integer or None, got {n!r}; "
                "use e.g. num_pieces=4, or None for one piece per distinct grid"
            )
        if n > linear_len:
            raise SparseditError(
                f"num_pieces={n} exceeds the {linear_len} timesteps of [ceil(T/4), T) for T={T}; "
                f"use at most {linear_len} pieces, or None"
            )

    @classmethod
    def constant(cls, rate: float, num_timesteps: int = 1000) -> PruningSchedule:
        """A schedule with the same rate at every timestep (``r_min = r_max = rate``)."""
        return cls(r_min=rate, r_max=rate, num_timesteps=num_timesteps)

    @property
    def plateau_end(self) -> int:
        """``ceil(T/4)``: timesteps below it use ``r_min``; the linear part starts here."""
        return _plateau_end(self.num_timesteps)

    # -- per timestep ----------------------------------------------------------------------

    def rate(self, t: int) -> float:
        """Pruning rate r(t) from the formula (independent of ``num_pieces``)."""
        t = _check_timestep(t, self.num_timesteps)
        return _rate_unchecked(t, self.r_min, self.r_max, self.num_timesteps)

    def grid(self, t: int, dense_grid: Grid) -> Grid:
        """Sparse grid ``(h, w)`` used at timestep ``t``, in training and in sampling."""
        t = _check_timestep(t, self.num_timesteps)
        H, W = _check_dense_grid(dense_grid)
        if self.num_pieces is None:
            return grid_for_rate(_rate_unchecked(t, self.r_min, self.r_max, self.num_timesteps), H, W)
        return self.piece_at(t, (H, W)).grid

    def keep_ratio(self, t: int, dense_grid: Grid) -> float:
        """Fraction ``M/N`` of tokens actually kept at timestep ``t`` (after grid rounding)."""
        H, W = _check_dense_grid(dense_grid)
        h, w = self.grid(t, (H, W))
        return (h * w) / (H * W)

    # -- pieces ----------------------------------------------------------------------------

    def pieces(self, dense_grid: Grid) -> list[Piece]:
        """Pieces covering ``[0, T)`` contiguously in increasing ``t``; neighbours differ in grid."""
        return list(self._pieces(_check_dense_grid(dense_grid)))

    def piece_at(self, t: int, dense_grid: Grid) -> Piece:
        """The piece that contains timestep ``t``."""
        t = _check_timestep(t, self.num_timesteps)
        pieces = self._pieces(_check_dense_grid(dense_grid))
        index = bisect.bisect_right([p.t_start for p in pieces], t) - 1
        return pieces[index]

    @functools.lru_cache(maxsize=16)  # noqa: B019 - the schedule is a small frozen value
    def _pieces(self, dense_grid: Grid) -> tuple[Piece, ...]:
        H, W = dense_grid
        T = self.num_timesteps
        if self.num_pieces is None:
            # one raw piece per timestep; merging below turns them into maximal constant runs
            bounds = list(range(T + 1))
        else:
            q, n = self.plateau_end, self.num_pieces
            # q >= 1 and n <= T - q, so these bounds are strictly increasing
            bounds = [0] + [q + (i * (T - q)) // n for i in range(n + 1)]
        # grid of each raw piece = grid of the rate at its midpoint
        raw: list[tuple[int, int, Grid]] = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            mid_rate = _rate_unchecked((a + b - 1) / 2, self.r_min, self.r_max, T)
            raw.append((a, b, grid_for_rate(mid_rate, H, W)))
        merged: list[list[Any]] = []
        for a, b, g in raw:
            if merged and merged[-1][2] == g:
                merged[-1][1] = b
            else:
                merged.append([a, b, g])
        # The rate at a merged piece's midpoint lies between the rates of its first and last raw
        # pieces (r is monotone), so it maps to the same grid (grid_for_rate is monotone).
        return tuple(
            Piece(a, b, g, _rate_unchecked((a + b - 1) / 2, self.r_min, self.r_max, T)) for a, b, g in merged
        )

    # -- sampling helpers ------------------------------------------------------------------

    def grids_for_timesteps(self, timesteps: Iterable[int], dense_grid: Grid) -> list[Grid]:
        """Grid of each sampling step, in the order of ``timesteps``."""
        H, W = _check_dense_grid(dense_grid)
        return [self.grid(t, (H, W)) for t in timesteps]

    def distinct_grids(self, timesteps: Iterable[int], dense_grid: Grid) -> list[Grid]:
        """The distinct grids a sampling run over ``timesteps`` uses, sorted by token count.

        Ties in token count are broken by ``(h, w)`` so the order is deterministic. A compiled or
        CUDA-graph sampling path needs one graph per entry.
        """
        grids = set(self.grids_for_timesteps(timesteps, dense_grid))
        return sorted(grids, key=lambda g: (g[0] * g[1], g[0], g[1]))

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict for a model's ``config.json``."""
        return {
            "r_min": self.r_min,
            "r_max": self.r_max,
            "num_timesteps": self.num_timesteps,
            "num_pieces": self.num_pieces,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningSchedule:
        """Inverse of :meth:`to_dict`; ``num_timesteps`` and ``num_pieces`` may be omitted."""
        if not isinstance(data, Mapping):
            raise SparseditError(
                f"pruning schedule config must be a mapping, got {type(data).__name__}; "
                "pass a dict such as {'r_min': 0.61, 'r_max': 0.86}"
            )
        unknown = sorted(set(data) - set(_CONFIG_KEYS))
        if unknown:
            raise SparseditError(
                f"unknown pruning schedule keys {unknown}; allowed keys are {list(_CONFIG_KEYS)}"
            )
        missing = [k for k in ("r_min", "r_max") if k not in data]
        if missing:
            raise SparseditError(
                f"pruning schedule config lacks {missing}; add them, e.g. 'r_min': 0.61, 'r_max': 0.86"
            )
        return cls(**dict(data))


# ---------------------------------------------------------------------------------------------
# training: one piece per step, t uniform inside it
# ---------------------------------------------------------------------------------------------


class PieceSampler:
    """Draws training timesteps so that a batch shares one token grid and ``t`` stays uniform.

    Each :meth:`sample` call draws one piece with probability ``length / T`` (by drawing one
    uniform integer in ``[0, T)`` and taking the piece that contains it), then draws every
    timestep of the batch uniformly from the integers of that piece. Averaged over steps,
    ``P(t) = (length / T) * (1 / length) = 1 / T``: ``t`` is uniform on ``[0, T)``.

    All randomness comes from ``generator`` (torch's global generator when ``None``).

    Distributed data parallelism: every rank owns its own ``PieceSampler`` with its own
    generator seeded differently per rank (e.g. ``seed + rank``). Ranks then draw independent
    pieces, each rank's batch shares one grid, and the global timestep distribution stays
    uniform. No communication is needed.
    """

    def __init__(
        self,
        schedule: PruningSchedule,
        dense_grid: Grid,
        generator: torch.Generator | None = None,
    ) -> None:
        self.schedule = schedule
        self.dense_grid = _check_dense_grid(dense_grid)
        self.generator = generator
        self.pieces: list[Piece] = schedule.pieces(self.dense_grid)
        self._starts = [p.t_start for p in self.pieces]

    def piece_probabilities(self) -> list[float]:
        """Probability of drawing each piece (same order as ``self.pieces``); sums to 1."""
        T = self.schedule.num_timesteps
        return [p.length / T for p in self.pieces]

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, Piece]:
        """Draw one piece and ``batch_size`` timesteps inside it.

        Returns:
            ``(t, piece)``: ``t`` is a ``long`` tensor of shape ``[batch_size]`` with
            ``piece.t_start <= t < piece.t_end``, on ``device`` (CPU by default).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SparseditError(f"batch_size must be a positive integer, got {batch_size!r}")
        gen = self.generator
        rng_device = gen.device if gen is not None else torch.device("cpu")
        T = self.schedule.num_timesteps
        u = int(torch.randint(0, T, (1,), generator=gen, device=rng_device).item())
        piece = self.pieces[bisect.bisect_right(self._starts, u) - 1]
        t = torch.randint(
            piece.t_start, piece.t_end, (batch_size,), generator=gen, device=rng_device, dtype=torch.long
        )
        if device is not None:
            t = t.to(device)
        return t, piece
