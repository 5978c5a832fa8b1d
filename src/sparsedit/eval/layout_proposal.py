"""A SparseDiT layout and pruning-rate range for a compute budget, proposed from the attention analysis of
:mod:`sparsedit.eval.analyze` (:func:`propose`; the rule in :class:`ProposeRule` and docs/analyze.md).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsedit.core.layout import Layout, block_kinds
from sparsedit.errors import SparseditError
from sparsedit.eval.attention_maps import ConstantMapResult, VarianceResult
from sparsedit.families import family_of
from sparsedit.families.dit.model import DiTConfig
from sparsedit.families.dit.sparse import SparseDiTConfig

__all__ = ["PAPER_R_MAX", "PAPER_R_MIN", "Proposal", "ProposeRule", "budget_gmacs", "propose", "sparsify_command"]

# The paper's rate range: r in [0.61, 0.86]; its keep-ratio ratio bounds our spread.
PAPER_R_MIN, PAPER_R_MAX = 0.61, 0.86


# ------------------------------------------------------------------------------------------------
# proposal: layout + rate range for a budget
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProposeRule:
    """Parameters of the :func:`propose` rule (docs/analyze.md).

    * ``var_threshold``: a bottom layer counts as "global" when its mean normalised variance (over
      steps) is at most ``var_threshold`` x the median over all layers.
    * ``diff_tolerance``: the constant-map experiment must keep ``rel_l2`` at ``k = P`` at most this.
    * ``min_pool`` / ``max_pool``: bounds on P; ``max_pool`` None = ``max(1, L // 12)`` (the paper's
      2 of 28 layers for DiT-XL, 1 of 12 for DiT-B). ``min_pool`` = 1 because 0 poolingformers
      diverged in the paper's Table 6.
    * ``top``: top dense blocks, None = ``max(1, L // 12)`` (paper: 2 for XL, 1 for B).
    * ``max_sdtm``: at most this many SDTMs (paper: 4; "diminishing returns beyond four").
    * ``rate_spread``: fixed ``r_max - r_min``; None derives the range from the variance trend.
    * ``rate_step``: resolution of the rate search (rates are printed with this precision).
    """

    var_threshold: float = 0.5
    diff_tolerance: float = 0.25
    min_pool: int = 1
    max_pool: int | None = None
    top: int | None = None
    max_sdtm: int = 4
    rate_spread: float | None = None
    rate_step: float = 0.01


@dataclass
class Proposal:
    """A proposed SparseDiT: layout, rate range, expected cost, and why."""

    layout: Layout
    r_min: float
    r_max: float
    expected_gmacs: float
    dense_gmacs: float
    target_gmacs: float
    timesteps: list[int]
    kinds: list[str]
    rationale: list[str]
    num_pieces: int | None = None
    grids: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.expected_gmacs / self.dense_gmacs

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.as_string(), "r_min": self.r_min, "r_max": self.r_max,
            "num_pieces": self.num_pieces, "expected_gmacs": self.expected_gmacs, "dense_gmacs": self.dense_gmacs,
            "target_gmacs": self.target_gmacs, "expected_ratio": self.ratio, "grids": self.grids,
            "cost_timesteps": self.timesteps, "kinds": self.kinds, "rationale": self.rationale,
        }


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _choose_pool(scores: list[float], constant: ConstantMapResult | None, rule: ProposeRule, cap: int,
                 why: list[str]) -> int:
    depth = len(scores)
    med = _median(scores)
    limit = rule.var_threshold * med
    prefix = 0
    while prefix < depth and scores[prefix] <= limit:
        prefix += 1
    why.append(f"layer mean variance: median {med:.4g}; 'global' threshold {rule.var_threshold:g} x median = "
               f"{limit:.4g}; the first {prefix} layer(s) are below it")
    pool = min(prefix, cap)
    if prefix > cap:
        why.append(f"P capped at {cap} (max(1, L // 12), as the paper's presets; 3 poolingformers hurt in its Table 6)")
    if constant is not None:
        while pool > 0:
            rel = constant.rel_l2_at(pool)
            if rel is not None and rel <= rule.diff_tolerance:
                why.append(f"constant maps in blocks 0..{pool - 1}: relative sample difference {rel:.3g} <= "
                           f"tolerance {rule.diff_tolerance:g}")
                break
            reason = "not measured (raise --max-k)" if rel is None else f"{rel:.3g} > tolerance {rule.diff_tolerance:g}"
            why.append(f"constant maps in blocks 0..{pool - 1}: relative sample difference {reason}; P reduced")
            pool -= 1
    if pool < rule.min_pool:
        why.append(f"P raised to {rule.min_pool}: the paper's SparseDiT-XL diverged with 0 poolingformers (Table 6)")
        pool = rule.min_pool
    return pool


def _alignment(layout: Layout, scores: list[float]) -> float:
    """Mean variance of the middle layers kept dense minus that of the sparse ones (higher = better fit)."""
    dense, sparse = [], []
    for kind, s in zip(block_kinds(layout), scores, strict=True):
        if kind in ("recover", "recover+", "dense"):
            dense.append(s)
        elif kind in ("gen", "gen+", "sparse"):
            sparse.append(s)
    if not dense or not sparse:
        return 0.0
    return sum(dense) / len(dense) - sum(sparse) / len(sparse)


def _candidates(depth: int, pool: int, top: int, max_sdtm: int, scores: list[float]) -> list[Layout]:
    """Layouts P, K x (1, s, 1, d), T' with T' >= top, in the rule's order of preference.

    More SDTMs first (up to ``max_sdtm``; the paper's Table 4), then the fewest extra top blocks,
    then the best variance alignment (local layers dense, global layers sparse), then fewer dense
    blocks. ``1 <= d <= s`` keeps sparse blocks the majority.
    """
    middle = depth - pool - top
    found: list[tuple[tuple[float, ...], Layout]] = []
    for k in range(1, max_sdtm + 1):
        for length in range(4, middle // k + 1):
            extra = middle - k * length
            if extra >= k:  # a longer SDTM would fit: leftover layers must be fewer than K
                continue
            for d in range(1, length - 2):
                s = length - 2 - d
                if s < d:
                    continue
                lay = Layout(pool, k, 1, s, 1, d, top + extra)
                found.append(((-k, extra, -_alignment(lay, scores), d), lay))
    found.sort(key=lambda item: item[0])
    return [lay for _, lay in found]


def _keep_ratio_spread(variance: VarianceResult, layout: Layout, num_timesteps: int, why: list[str]) -> float:
    """(1 - r_max) / (1 - r_min) from the variance trend of the middle layers over the steps."""
    paper = (1 - PAPER_R_MAX) / (1 - PAPER_R_MIN)
    mid = range(layout.pool, variance.num_layers - layout.top)
    rows = [variance.variance[layer] for layer in mid] or variance.variance
    per_step = [sum(r[s] for r in rows) / len(rows) for s in range(len(variance.timesteps))]
    T = num_timesteps
    late = [v for v, t in zip(per_step, variance.timesteps, strict=True) if t < T / 4]
    early = [v for v, t in zip(per_step, variance.timesteps, strict=True) if t >= 3 * T / 4]
    if not late or not early or sum(late) <= 0:
        why.append("too few steps to read a trend over denoising; constant rate (r_min = r_max)")
        return 1.0
    v_late, v_early = sum(late) / len(late), sum(early) / len(early)
    ratio = min(1.0, max(paper, v_early / v_late))
    why.append(f"middle-layer variance: {v_early:.4g} at the noisiest quarter (t >= 3T/4) vs {v_late:.4g} in the "
               f"last quarter (t < T/4); keep-ratio (1-r_max)/(1-r_min) = clip({v_early / v_late:.3g}, "
               f"{paper:.3g} (paper's 0.61..0.86), 1) = {ratio:.3g}")
    return ratio


def _search_rates(dit_config: DiTConfig, layout: Layout, timesteps: list[int], target: float, keep_ratio: float,
                  spread: float | None, step: float) -> tuple[float, float, dict[str, Any]] | None:
    """Smallest r_min (multiple of ``step``) whose schedule meets ``target`` GMACs, or None.

    ``r_max`` follows from ``r_min`` (fixed ``spread``, else fixed keep-ratio ``keep_ratio``); both
    grow with ``r_min``, so the mean cost falls monotonically and a bisection finds the smallest.
    """
    from sparsedit.eval.flops import schedule_macs

    digits = max(0, -int(math.floor(math.log10(step))))
    top = round(1 - step, digits)

    def rates(i: int) -> tuple[float, float]:
        r_min = round(i * step, digits)
        r_max = round(r_min + spread, digits) if spread is not None else round(1 - keep_ratio * (1 - r_min), digits)
        return r_min, min(max(r_max, r_min), top)

    def cost(i: int) -> dict[str, Any]:
        r_min, r_max = rates(i)
        return schedule_macs(SparseDiTConfig.from_dit(dit_config, layout, r_min=r_min, r_max=r_max), timesteps)

    lo, hi = 0, int(round(1 / step)) - 1  # r_min in [0, 1 - step]
    if cost(hi)["gmacs"] > target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid)["gmacs"] <= target:
            hi = mid
        else:
            lo = mid + 1
    return (*rates(lo), cost(lo))


def budget_gmacs(config: Any, target_gmacs: float | None = None, target_ratio: float | None = None) -> tuple[float, float]:
    """(dense GMACs per forward, the budget in GMACs): exactly one of ``target_gmacs`` / ``target_ratio``, below the
    dense cost (a budget at or above it asks for no sparsity). Cheap: call it before sampling to fail early."""
    if (target_gmacs is None) == (target_ratio is None):
        raise SparseditError("give exactly one budget: --target-gmacs G or --target-ratio R")
    from sparsedit.eval.flops import dit_macs

    dense = dit_macs(config).gmacs
    if target_ratio is not None:
        if not 0 < target_ratio < 1:
            raise SparseditError(f"--target-ratio is sparse / dense MACs, in (0, 1), got {target_ratio}; e.g. 0.6")
        return dense, target_ratio * dense
    assert target_gmacs is not None
    if not 0 < target_gmacs < dense:
        raise SparseditError(f"--target-gmacs must be in (0, {dense:.4g}), the dense model's GMACs per forward; got "
                             f"{target_gmacs:g}")
    return dense, float(target_gmacs)


def propose(
    config: DiTConfig,
    variance: VarianceResult,
    constant: ConstantMapResult | None = None,
    *,
    target_gmacs: float | None = None,
    target_ratio: float | None = None,
    timesteps: Sequence[int] | None = None,
    rule: ProposeRule | None = None,
) -> Proposal:
    """Propose a SparseDiT layout and pruning-rate range for ``config`` from the analysis.

    Exactly one of ``target_gmacs`` (mean GMACs per forward over the sampling steps) and
    ``target_ratio`` (fraction of the dense DiT's GMACs) sets the budget. ``timesteps`` (default:
    those of the variance run) are the sampling steps the cost is averaged over.
    """
    rule = rule or ProposeRule()
    if family_of(config).sparse:
        raise SparseditError("propose needs the dense DiT's config")
    depth = config.depth
    if variance.num_layers != depth:
        raise SparseditError(f"the variance has {variance.num_layers} layers but the model has {depth}")
    dense, target = budget_gmacs(config, target_gmacs, target_ratio)
    steps = [int(t) for t in (timesteps if timesteps is not None else variance.timesteps)]
    scores = variance.layer_mean
    why: list[str] = [f"dense DiT: {depth} layers, {dense:.4g} GMACs per forward; budget {target:.4g} GMACs "
                      f"({target / dense:.3g} x dense), mean over {len(steps)} sampling steps"]
    cap = rule.max_pool if rule.max_pool is not None else max(1, depth // 12)
    pool = _choose_pool(scores, constant, rule, cap, why)
    top = rule.top if rule.top is not None else max(1, depth // 12)
    if depth - pool - top < 4:
        raise SparseditError(
            f"a {depth}-layer DiT leaves {depth - pool - top} layers between {pool} poolingformer(s) and {top} top "
            "block(s); an SDTM needs at least 4 (gen, sparse, recovery, dense)"
        )
    why.append(f"top segment: at least {top} dense block(s) (max(1, L // 12), as the paper's presets)")
    candidates = _candidates(depth, pool, top, rule.max_sdtm, scores)
    for lay in candidates:
        keep = 1.0 if rule.rate_spread is not None else _keep_ratio_spread(variance, lay, 1000, [])
        found = _search_rates(config, lay, steps, target, keep, rule.rate_spread, rule.rate_step)
        if found is None:
            why.append(f"layout {lay.as_string()} cannot meet the budget at any rate; next candidate")
            continue
        r_min, r_max, cost = found
        k_sdtm, length = lay.sdtm, lay.gen + lay.sparse + lay.recovery + lay.dense
        start = lay.pool
        spans = [f"{start + i * length}-{start + (i + 1) * length - 1}" for i in range(k_sdtm)]
        why.append(f"middle: {k_sdtm} SDTM(s) of (g, s, r, d) = (1, {lay.sparse}, 1, {lay.dense}) at layers "
                   f"{', '.join(spans)}: the most SDTMs (<= {rule.max_sdtm}, paper Table 4) that tile the middle, "
                   f"split chosen by variance alignment {_alignment(lay, scores):+.4g} (mean variance of dense "
                   "minus sparse layers)")
        if lay.top > top:
            why.append(f"{lay.top - top} leftover layer(s) added to the top segment (T = {lay.top})")
        if rule.rate_spread is not None:
            why.append(f"rate spread fixed at r_max - r_min = {rule.rate_spread:g}")
        else:
            _keep_ratio_spread(variance, lay, 1000, why)
        why.append(f"rates: the smallest r_min (step {rule.rate_step:g}) meeting the budget: r in [{r_min:g}, "
                   f"{r_max:g}] -> {cost['gmacs']:.4g} GMACs ({cost['gmacs'] / dense:.3g} x dense)")
        return Proposal(lay, r_min, r_max, cost["gmacs"], dense, target, steps, block_kinds(lay), why,
                        grids=cost["grids"])
    raise SparseditError(
        f"no layout meets {target:.4g} GMACs ({target / dense:.3g} x dense) even at r = {1 - rule.rate_step:g}; "
        "raise the budget"
    )


def sparsify_command(proposal: Proposal, src: str | Path, out: str | Path, model: str | None = None,
                     image_size: int | None = None) -> str:
    """The ``sparsedit sparsify`` command line that builds the proposed SparseDiT from ``src``."""
    parts = ["sparsedit", "sparsify", str(src)]
    if model is not None:
        parts += ["--model", model]
    if image_size is not None:
        parts += ["--image-size", str(image_size)]
    parts += ["--layout", proposal.layout.as_string(), "--r-min", f"{proposal.r_min:g}", "--r-max",
              f"{proposal.r_max:g}"]
    if proposal.num_pieces is not None:
        parts += ["--num-pieces", str(proposal.num_pieces)]
    parts += ["--out", str(out)]
    return shlex.join(parts)
