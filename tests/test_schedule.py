"""Tests for the timestep-wise pruning schedule (paper Sec. 3.2).

Expected values are derived here independently of the implementation: the rate from the
formula as written in docs/schedule.md (two weighted terms), grid sides from the rounding bound
|h - H*sqrt(1-r)| <= 1/2, pieces by scanning every timestep, and a few numbers worked out by hand in
comments.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import chisquare

from sparsedit.core.schedule import (
    Piece,
    PieceSampler,
    PruningSchedule,
    grid_for_rate,
    pruning_rate,
)
from sparsedit.errors import SparseditError

T = 1000
PAPER = (0.61, 0.86)  # DiT-XL/2 256 px setting of the paper
DENSE = (16, 16)  # 256 px / VAE factor 8 / patch 2


def spec_rate(t: float, r_min: float, r_max: float, T: int = T) -> float:
    """r(t) as written in docs/schedule.md, with the two weighted terms (the implementation uses another form)."""
    if t < T / 4:
        return r_min
    return r_min * (4 * T - 4 * t) / (3 * T) + r_max * (4 * t - T) / (3 * T)


def respaced_timesteps(n: int = 250, T: int = T) -> list[int]:
    return [round(i * (T - 1) / (n - 1)) for i in range(n)]


# ------------------------------------------------------------------------------------------
# r(t)
# ------------------------------------------------------------------------------------------


def test_rate_boundaries_by_hand() -> None:
    r_min, r_max = 0.4, 0.7
    assert pruning_rate(0, r_min, r_max) == 0.4
    assert pruning_rate(249, r_min, r_max) == 0.4  # t < T/4 = 250
    assert pruning_rate(250, r_min, r_max) == pytest.approx(0.4, abs=1e-15)  # line starts at r_min
    # t = 625 is halfway between T/4 = 250 and T = 1000: mean of the two rates
    assert pruning_rate(625, r_min, r_max) == pytest.approx(0.55, abs=1e-12)
    # t = 999: 0.4 * 4/3000 + 0.7 * 2996/3000 = 2098.8 / 3000 = 0.6996, just below r_max
    assert pruning_rate(999, r_min, r_max) == pytest.approx(0.6996, abs=1e-12)
    assert pruning_rate(999, r_min, r_max) < r_max
    # the linear formula itself reaches r_max at t = T
    assert spec_rate(T, r_min, r_max) == pytest.approx(r_max)


@pytest.mark.parametrize("r_min,r_max", [(0.61, 0.86), (0.44, 0.61), (0.0, 0.9), (0.3, 0.3)])
def test_rate_matches_spec_formula_everywhere(r_min: float, r_max: float) -> None:
    schedule = PruningSchedule(r_min, r_max)
    for t in range(T):
        expected = spec_rate(t, r_min, r_max)
        assert pruning_rate(t, r_min, r_max) == pytest.approx(expected, abs=1e-12)
        assert schedule.rate(t) == pytest.approx(expected, abs=1e-12)


def test_rate_monotone_non_decreasing() -> None:
    rates = [pruning_rate(t, *PAPER) for t in range(T)]
    assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[0] == PAPER[0] and PAPER[0] < rates[-1] < PAPER[1]


def test_rate_constant_when_range_collapses() -> None:
    schedule = PruningSchedule.constant(0.75)
    assert schedule.r_min == schedule.r_max == 0.75
    assert {schedule.rate(t) for t in range(T)} == {0.75}
    assert {schedule.grid(t, DENSE) for t in range(T)} == {(8, 8)}  # 16 * sqrt(0.25) = 8
    assert schedule.pieces(DENSE) == [Piece(0, T, (8, 8), 0.75)]


def test_quarter_point_uses_ceil_when_t_not_divisible_by_4() -> None:
    # T = 10: T/4 = 2.5, so t = 2 is on the plateau and t = 3 = ceil(2.5) starts the line.
    r_min, r_max = 0.4, 0.7
    assert PruningSchedule(r_min, r_max, num_timesteps=10).plateau_end == 3
    assert pruning_rate(2, r_min, r_max, num_timesteps=10) == r_min
    # 0.4 * (40 - 12)/30 + 0.7 * (12 - 10)/30 = (11.2 + 1.4) / 30 = 0.42
    assert pruning_rate(3, r_min, r_max, num_timesteps=10) == pytest.approx(0.42, abs=1e-12)


# ------------------------------------------------------------------------------------------
# grids
# ------------------------------------------------------------------------------------------


def test_grid_rounds_half_up_not_to_even() -> None:
    # r = 0.75 halves each side: 5 -> 2.5 and 9 -> 4.5. Half up gives 3 and 5 (round() gives 2, 4).
    assert grid_for_rate(0.75, 5, 9) == (3, 5)
    assert grid_for_rate(0.0, 16, 16) == (16, 16)


def test_paper_setting_grid_endpoints() -> None:
    schedule = PruningSchedule(*PAPER)
    # t = 0: 16 * sqrt(0.39) = 9.99 -> 10;  t = 999: r = 0.8597, 16 * sqrt(0.1403) = 5.99 -> 6
    assert schedule.grid(0, DENSE) == (10, 10)
    assert schedule.grid(999, DENSE) == (6, 6)
    assert schedule.keep_ratio(0, DENSE) == 100 / 256
    assert schedule.keep_ratio(999, DENSE) == 36 / 256


def test_paper_setting_grid_within_rounding_of_formula_for_every_t() -> None:
    schedule = PruningSchedule(*PAPER)
    for t in range(T):
        h, w = schedule.grid(t, DENSE)
        side = 16 * math.sqrt(1 - spec_rate(t, *PAPER))
        assert h == w
        assert abs(h - side) <= 0.5 + 1e-9


def test_paper_setting_distinct_grids_over_250_respaced_steps() -> None:
    schedule = PruningSchedule(*PAPER)
    steps = respaced_timesteps()
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    sampling_order = steps[::-1]  # sampling runs from noise (t = 999) to clean (t = 0)
    per_step = schedule.grids_for_timesteps(sampling_order, DENSE)
    assert len(per_step) == 250
    assert per_step[0] == (6, 6) and per_step[-1] == (10, 10)
    tokens = [h * w for h, w in per_step]
    assert all(a <= b for a, b in zip(tokens, tokens[1:], strict=False))  # never fewer tokens later

    distinct = schedule.distinct_grids(sampling_order, DENSE)
    assert distinct == sorted(set(per_step), key=lambda g: g[0] * g[1])
    assert 2 <= len(distinct) <= 5
    assert all(h == w and 6 <= h <= 10 for h, w in distinct)
    assert distinct[0] == (6, 6) and distinct[-1] == (10, 10)


def test_grids_accept_tensor_timesteps() -> None:
    schedule = PruningSchedule(*PAPER)
    ts = torch.tensor([999, 500, 0])
    assert schedule.grids_for_timesteps(ts, DENSE) == [
        schedule.grid(999, DENSE),
        schedule.grid(500, DENSE),
        schedule.grid(0, DENSE),
    ]


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5, 0.61, 0.75, 0.86, 0.95])
def test_non_square_grid_keeps_aspect_ratio(r: float) -> None:
    H, W = 12, 20
    h, w = grid_for_rate(r, H, W)
    s = math.sqrt(1 - r)
    assert h >= 1 and w >= 1
    assert abs(h - H * s) <= 0.5 + 1e-9 and abs(w - W * s) <= 0.5 + 1e-9
    assert w > h  # the wide grid stays wide
    # aspect ratio within what rounding each side by <= 1/2 allows
    assert abs(h / w - H / W) <= (0.5 * W + 0.5 * H) / (W * max(w - 0.5, 0.5))


def test_extreme_rate_gives_single_token() -> None:
    assert grid_for_rate(0.999999, 12, 20) == (1, 1)
    assert grid_for_rate(0.999999, 16, 16) == (1, 1)
    schedule = PruningSchedule(0.99, 0.999999)
    assert schedule.grid(999, (12, 20)) == (1, 1)


# ------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------


def _check_pieces(schedule: PruningSchedule, dense: tuple[int, int]) -> list[Piece]:
    pieces = schedule.pieces(dense)
    n = schedule.num_timesteps
    assert pieces[0].t_start == 0 and pieces[-1].t_end == n
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a.t_end == b.t_start  # contiguous
        assert a.grid != b.grid  # equal neighbours were merged
    assert sum(p.length for p in pieces) == n
    for p in pieces:
        assert p.length >= 1
        assert grid_for_rate(p.rate, *dense) == p.grid
        for t in range(p.t_start, p.t_end):  # exhaustive: training grid == sampling grid
            assert schedule.grid(t, dense) == p.grid
            assert schedule.piece_at(t, dense) == p
    return pieces


@pytest.mark.parametrize("dense", [(16, 16), (12, 20), (32, 32)])
def test_pieces_without_num_pieces_are_maximal_constant_runs(dense: tuple[int, int]) -> None:
    schedule = PruningSchedule(*PAPER)
    pieces = _check_pieces(schedule, dense)
    # independent: scan every t with the two-term formula and cut where the grid changes
    scan = [grid_for_rate(spec_rate(t, *PAPER), *dense) for t in range(T)]
    cuts = [0] + [t for t in range(1, T) if scan[t] != scan[t - 1]] + [T]
    assert [(p.t_start, p.t_end) for p in pieces] == list(zip(cuts[:-1], cuts[1:], strict=True))
    assert [p.grid for p in pieces] == [scan[c] for c in cuts[:-1]]


def test_pieces_with_four_pieces_by_hand() -> None:
    schedule = PruningSchedule(*PAPER, num_pieces=4)
    pieces = _check_pieces(schedule, DENSE)
    # [250, 1000) in 4 pieces of 187/188 steps: bounds 250, 437, 625, 812, 1000.
    # Midpoint rates 0.641, 0.7035, 0.766, 0.8285 -> sides 16*sqrt(1-r) = 9.59, 8.71, 7.74, 6.63,
    # i.e. grids 10, 9, 8, 7; the first equals the plateau's 10x10 and merges with [0, 250).
    assert [(p.t_start, p.t_end, p.grid) for p in pieces] == [
        (0, 437, (10, 10)),
        (437, 625, (9, 9)),
        (625, 812, (8, 8)),
        (812, 1000, (7, 7)),
    ]
    assert pieces[1].rate == pytest.approx(spec_rate((437 + 624) / 2, *PAPER))


@pytest.mark.parametrize("n", [1, 3, 7, 50])
def test_num_pieces_boundaries_are_equal_splits(n: int) -> None:
    schedule = PruningSchedule(0.2, 0.95, num_timesteps=998, num_pieces=n)
    pieces = _check_pieces(schedule, (12, 20))
    q = 250  # ceil(998 / 4)
    length = 998 - q
    allowed = {0, q} | {q + (i * length) // n for i in range(n + 1)}
    assert {p.t_start for p in pieces} <= allowed
    # each starting point in the linear part is one of the n equal splits (lengths differ <= 1)
    splits = sorted({q + (i * length) // n for i in range(n + 1)})
    sizes = [b - a for a, b in zip(splits, splits[1:], strict=False)]
    assert len(sizes) == n and max(sizes) - min(sizes) <= 1


def test_max_num_pieces_small_t() -> None:
    schedule = PruningSchedule(0.1, 0.9, num_timesteps=10, num_pieces=7)  # ceil(10/4)=3, 7 left
    _check_pieces(schedule, (40, 40))
    with pytest.raises(SparseditError, match="num_pieces"):
        PruningSchedule(0.1, 0.9, num_timesteps=10, num_pieces=8)


def test_pieces_returns_a_copy() -> None:
    schedule = PruningSchedule(*PAPER)
    schedule.pieces(DENSE).clear()
    assert len(schedule.pieces(DENSE)) == 5


# ------------------------------------------------------------------------------------------
# piece sampler
# ------------------------------------------------------------------------------------------


def _sampler(seed: int, schedule: PruningSchedule | None = None) -> PieceSampler:
    gen = torch.Generator().manual_seed(seed)
    return PieceSampler(schedule or PruningSchedule(*PAPER), DENSE, generator=gen)


@pytest.mark.parametrize("num_pieces", [None, 4])
def test_sampler_timesteps_uniform_chi_square(num_pieces: int | None) -> None:
    sampler = _sampler(1234, PruningSchedule(*PAPER, num_pieces=num_pieces))
    steps, batch = 20000, 8
    draws = torch.stack([sampler.sample(batch)[0] for _ in range(steps)])  # [steps, batch]
    # The t of one batch share a piece, so they are not independent; chi-square needs independent
    # samples. Column j holds one t per step, independent across steps, and each has the marginal
    # that must be uniform. Test several columns, then check the pooled histogram is flat too.
    for j in (0, 3, 7):
        counts = torch.bincount(draws[:, j] // 100, minlength=10).tolist()
        assert chisquare(counts).pvalue > 0.001
    pooled = torch.bincount(draws.flatten() // 100, minlength=10).double()
    assert torch.all((pooled / pooled.mean() - 1).abs() < 0.05)


def test_sampler_piece_frequencies_match_lengths() -> None:
    sampler = _sampler(7)
    probs = sampler.piece_probabilities()
    assert probs == pytest.approx([p.length / T for p in sampler.pieces])
    assert sum(probs) == pytest.approx(1.0)
    index = {p: i for i, p in enumerate(sampler.pieces)}
    counts = [0] * len(sampler.pieces)
    steps = 20000
    for _ in range(steps):
        counts[index[sampler.sample(1)[1]]] += 1
    assert all(c > 0 for c in counts)  # every piece gets drawn
    assert chisquare(counts, [p * steps for p in probs]).pvalue > 0.001


def test_sampler_batch_inside_returned_piece() -> None:
    sampler = _sampler(0, PruningSchedule(*PAPER, num_pieces=4))
    seen = set()
    for _ in range(500):
        t, piece = sampler.sample(16, device="cpu")
        assert t.dtype == torch.long and t.shape == (16,)
        assert int(t.min()) >= piece.t_start and int(t.max()) < piece.t_end
        assert all(sampler.schedule.grid(int(x), DENSE) == piece.grid for x in t)
        seen.add(piece)
    assert seen == set(sampler.pieces)


def test_sampler_streams_depend_only_on_seed() -> None:
    a, b, c = _sampler(42), _sampler(42), _sampler(43)
    run_a = [a.sample(8) for _ in range(50)]
    run_b = [b.sample(8) for _ in range(50)]
    run_c = [c.sample(8) for _ in range(50)]
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(run_a, run_b, strict=True))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(run_a, run_c, strict=True))


def test_sampler_rejects_bad_batch_size() -> None:
    with pytest.raises(SparseditError, match="batch_size"):
        _sampler(0).sample(0)


# ------------------------------------------------------------------------------------------
# invalid input and serialisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r_min": 0.8, "r_max": 0.6}, "r_min <= r_max"),
        ({"r_min": 0.5, "r_max": 1.0}, "r_max < 1"),
        ({"r_min": -0.1, "r_max": 0.5}, "0 <= r_min"),
        ({"r_min": float("nan"), "r_max": 0.5}, "0 <= r_min"),
        ({"r_min": 0.5, "r_max": 0.6, "num_pieces": 0}, "num_pieces"),
        ({"r_min": 0.5, "r_max": 0.6, "num_pieces": 2.5}, "num_pieces"),
        ({"r_min": 0.5, "r_max": 0.6, "num_timesteps": 0}, "num_timesteps"),
    ],
)
def test_invalid_schedule_raises_helpful_error(kwargs: dict, match: str) -> None:
    with pytest.raises(SparseditError, match=match) as info:
        PruningSchedule(**kwargs)
    assert "\n" not in str(info.value)


def test_invalid_rate_and_timestep_inputs() -> None:
    with pytest.raises(SparseditError, match="r_min <= r_max"):
        pruning_rate(0, 0.9, 0.1)
    for bad_t in (-1, T):
        with pytest.raises(SparseditError, match=r"outside \[0, 1000\)"):
            pruning_rate(bad_t, *PAPER)
        with pytest.raises(SparseditError, match=r"outside \[0, 1000\)"):
            PruningSchedule(*PAPER).grid(bad_t, DENSE)
    with pytest.raises(SparseditError, match="integer"):
        PruningSchedule(*PAPER).rate(2.5)
    with pytest.raises(SparseditError, match=r"\[0, 1\)"):
        grid_for_rate(1.0, 16, 16)
    with pytest.raises(SparseditError, match=r"\[0, 1\)"):
        grid_for_rate(-0.2, 16, 16)
    with pytest.raises(SparseditError, match="empty"):
        grid_for_rate(0.5, 0, 16)
    with pytest.raises(SparseditError, match="pair of integers"):
        PruningSchedule(*PAPER).pieces((16,))


def test_to_dict_from_dict_round_trip() -> None:
    for schedule in (
        PruningSchedule(*PAPER),
        PruningSchedule(0.9, 0.96, num_timesteps=500, num_pieces=6),
        PruningSchedule.constant(0.5),
    ):
        data = json.loads(json.dumps(schedule.to_dict()))
        restored = PruningSchedule.from_dict(data)
        assert restored == schedule
        assert restored.pieces((12, 20)) == schedule.pieces((12, 20))
    assert PruningSchedule.from_dict({"r_min": 0.6, "r_max": 0.8}) == PruningSchedule(0.6, 0.8, 1000, None)


def test_from_dict_rejects_bad_config() -> None:
    with pytest.raises(SparseditError, match="unknown"):
        PruningSchedule.from_dict({"r_min": 0.6, "r_max": 0.8, "rmax": 0.9})
    with pytest.raises(SparseditError, match="lacks"):
        PruningSchedule.from_dict({"r_min": 0.6})
    with pytest.raises(SparseditError, match="r_min <= r_max"):
        PruningSchedule.from_dict({"r_min": 0.9, "r_max": 0.8})
