"""Attention analysis of a DiT (paper Fig. 1b and Fig. 3) and a data-driven SparseDiT proposal.

Three pieces, all usable from Python and through ``sparsedit analyze``:

* :func:`attention_variance`: the **normalised variance of the attention maps** of every layer at
  every sampling step (paper Fig. 1b). For one query row ``p`` (a probability distribution over the
  ``N`` keys) the variance over keys is ``var(p) = (1/N) sum_j p_j^2 - 1/N^2``; it is 0 for a uniform
  row and largest, ``(N-1)/N^2``, for a one-hot row. We divide by that maximum::

      v(p) = var(p) / ((N-1)/N^2) = (N * sum_j p_j^2 - 1) / (N - 1)      in [0, 1]

  (``1 / sum_j p_j^2`` is the effective number of keys a query attends to, so ``v`` is 0 for
  global pooling and 1 for attention to a single token.) A layer's value at a step is the mean of
  ``v`` over query rows, heads and the batch (classes x seeds). Only ``sum_j p_j^2`` per row is
  needed, so the statistic is computed inside the block's swapped ``attn_fn`` from
  ``softmax(Q K^T / sqrt(d))`` in chunks of query rows; no ``N x N`` map outlives its block. The
  model's output is computed by the original ``attn_fn``, so sampling is not changed.
* :func:`constant_map_experiment`: the paper's Fig. 3 "full-one attention map" experiment: the
  attention of blocks ``0..k-1`` is replaced by a constant (uniform after normalisation) map, whose
  output is the mean of V over the keys, and samples from the same noise are compared with the
  unmodified model (``k = 0``).
* :func:`propose`: turns both into a SparseDiT layout and a pruning-rate range for a compute budget
  (rule in :class:`ProposeRule` and docs/analyze.md), ready for ``sparsedit sparsify``.
"""

from __future__ import annotations

import csv
import math
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsedit.core.layers import Attention, AttentionFn
from sparsedit.core.layout import Layout, block_kinds
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.base import not_analyzable
from sparsedit.families.dit.model import DiTConfig
from sparsedit.families.dit.sparse import SparseDiTConfig

__all__ = [
    "VARIANCE_DEFINITION",
    "ConstantMapResult",
    "Proposal",
    "ProposeRule",
    "VarianceRecorder",
    "VarianceResult",
    "attention_row_sum_sq",
    "attention_variance",
    "constant_attention",
    "constant_map_experiment",
    "default_labels",
    "normalized_variance",
    "normalized_variance_from_sum_sq",
    "plot_constant_map",
    "plot_variance",
    "propose",
    "sparsify_command",
    "uniform_attention",
    "write_csv",
]

VARIANCE_DEFINITION = (
    "normalised attention variance: for each query row p over N keys, var(p) = sum_j p_j^2 / N - 1/N^2 divided "
    "by its one-hot maximum (N-1)/N^2, i.e. v = (N * sum_j p_j^2 - 1) / (N - 1) in [0, 1] (0 = uniform map, "
    "1 = one-hot rows); averaged over query rows, heads and samples"
)
# The paper's rate range: r in [0.61, 0.86]; its keep-ratio ratio bounds our spread.
PAPER_R_MIN, PAPER_R_MAX = 0.61, 0.86
# Elements of one chunk of attention probabilities (B x heads x rows x N, float32): 2^24 = 64 MiB.
CHUNK_ELEMENTS = 1 << 24
IMAGENET_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample-grid classes


# ------------------------------------------------------------------------------------------------
# the statistic
# ------------------------------------------------------------------------------------------------


def normalized_variance_from_sum_sq(sum_sq: Tensor, n: int) -> Tensor:
    """``(N * sum_j p_j^2 - 1) / (N - 1)`` from the per-row sums of squared probabilities (0 for N = 1)."""
    if n <= 1:
        return torch.zeros_like(sum_sq)
    return (n * sum_sq - 1.0) / (n - 1)


def normalized_variance(attn: Tensor) -> Tensor:
    """Normalised variance of each row of attention maps ``(..., Nq, N)`` (rows sum to 1) -> ``(..., Nq)``."""
    return normalized_variance_from_sum_sq(attn.float().pow(2).sum(-1), attn.shape[-1])


def attention_row_sum_sq(q: Tensor, k: Tensor, scale: float | None = None, max_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``sum_j p_ij^2`` of ``p = softmax(q k^T * scale)`` per query row: (B, h, Nq, d), (B, h, N, d) -> (B, h, Nq).

    Computed in float32 over chunks of query rows of at most ``max_elements`` probabilities, so the
    full ``Nq x N`` map is never held at once. ``scale`` defaults to ``1/sqrt(d)`` (as SDPA).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, h, nq, _ = q.shape
    rows = max(1, max_elements // max(1, b * h * k.shape[-2]))
    kf = k.float()
    out = [torch.softmax(torch.matmul(q[..., i : i + rows, :].float(), kf.transpose(-1, -2)) * scale, dim=-1)
           .pow(2).sum(-1) for i in range(0, nq, rows)]
    return torch.cat(out, dim=-1)


def _attention_modules(model: nn.Module) -> list[Attention]:
    """The self-attention of every block of a dense DiT (its family refuses other models)."""
    try:
        family = family_of(model)
    except SparseditError:
        raise not_analyzable(model) from None
    return family.attention_layers(model)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# recording per layer and per sampling step
# ------------------------------------------------------------------------------------------------


class VarianceRecorder:
    """Context manager that records the normalised attention variance of every block per forward call.

    While active, each block's ``attn_fn`` computes its output with the original function and adds
    the mean normalised variance of its rows to an accumulator; a forward hook on the model closes
    the call and appends ``(t, [v_layer0, ..., v_layerL-1])`` to :attr:`records` (``t`` = the
    batch's first timestep). Accumulators stay on the model's device until the call ends (one
    device sync per forward).
    """

    def __init__(self, model: nn.Module, max_elements: int = CHUNK_ELEMENTS):
        self.model = model
        self.attns = _attention_modules(model)
        self.max_elements = max_elements
        self.records: list[tuple[int, list[float]]] = []
        self._sums: list[Tensor | None] = [None] * len(self.attns)
        self._t: int | None = None
        self._saved: list[AttentionFn] = []
        self._hooks: list[Any] = []

    def _make_fn(self, index: int, original: AttentionFn) -> AttentionFn:
        def attn_fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out = original(q, k, v)
            with torch.no_grad():
                sum_sq = attention_row_sum_sq(q.detach(), k.detach(), max_elements=self.max_elements)
                value = normalized_variance_from_sum_sq(sum_sq, k.shape[-2]).mean()
            prev = self._sums[index]
            self._sums[index] = value if prev is None else prev + value
            return out

        return attn_fn

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("t")
        self._t = int(torch.as_tensor(t).reshape(-1)[0]) if t is not None else -1
        self._sums = [None] * len(self.attns)

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if any(s is None for s in self._sums):
            return
        values = torch.stack([s for s in self._sums if s is not None]).float().cpu().tolist()
        self.records.append((self._t if self._t is not None else -1, values))

    def __enter__(self) -> VarianceRecorder:
        self._saved = [m.attn_fn for m in self.attns]
        for i, m in enumerate(self.attns):
            m.attn_fn = self._make_fn(i, m.attn_fn)
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.model.register_forward_hook(self._post_hook, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for m, fn in zip(self.attns, self._saved, strict=True):
            m.attn_fn = fn
        for h in self._hooks:
            h.remove()
        self._hooks = []


@dataclass
class VarianceResult:
    """Normalised attention variance per layer and sampling step (paper Fig. 1b).

    ``variance[l][s]`` is layer ``l`` at sampling step ``s`` (step 0 = the noisiest); ``timesteps[s]``
    is the original diffusion timestep of step ``s``. Means over classes x seeds.
    """

    variance: list[list[float]]
    timesteps: list[int]
    sampler: str
    steps: int
    labels: list[int]
    seeds: list[int]
    cfg_scale: float = 1.0
    definition: str = VARIANCE_DEFINITION

    @property
    def num_layers(self) -> int:
        return len(self.variance)

    @property
    def layer_mean(self) -> list[float]:
        return [sum(row) / len(row) for row in self.variance]

    @property
    def step_mean(self) -> list[float]:
        return [sum(row[s] for row in self.variance) / self.num_layers for s in range(len(self.timesteps))]

    def rows(self) -> list[dict[str, Any]]:
        """CSV rows, one per (layer, step): layer, step, t, variance."""
        return [{"layer": layer, "step": s, "t": t, "variance": row[s]}
                for layer, row in enumerate(self.variance) for s, t in enumerate(self.timesteps)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "definition": self.definition, "sampler": self.sampler, "steps": self.steps, "labels": self.labels,
            "seeds": self.seeds, "cfg_scale": self.cfg_scale, "timesteps": self.timesteps,
            "variance": self.variance, "layer_mean": self.layer_mean, "step_mean": self.step_mean,
        }


def default_labels(num_classes: int, count: int = 4) -> list[int]:
    """DiT's sample-grid classes for a 1000-class model, else the first ``count`` classes."""
    if num_classes == 1000:
        return list(IMAGENET_LABELS[:count])
    return list(range(min(count, num_classes)))


def _generate(model: nn.Module, labels: Sequence[int], seed: int, sampler: str, steps: int, cfg_scale: float,
              device: str | torch.device) -> Tensor:
    from sparsedit.diffusion.sampling import generate

    return generate(model, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed, device=device,
                    progress=False)


@torch.no_grad()
def attention_variance(
    model: nn.Module,
    labels: Sequence[int],
    *,
    seeds: Sequence[int] = (0,),
    sampler: str = "ddim",
    steps: int = 25,
    cfg_scale: float = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_elements: int = CHUNK_ELEMENTS,
) -> tuple[VarianceResult, list[Tensor]]:
    """Sample once per seed (all ``labels`` in one batch) while recording the attention variance.

    Returns the :class:`VarianceResult` and the final samples of every seed (model space), which
    are exactly what the unmodified model samples (they serve as ``k = 0`` of the constant-map
    experiment).
    """
    seeds = list(seeds)
    if not seeds:
        raise SparseditError("give at least one seed")
    runs: list[list[tuple[int, list[float]]]] = []
    samples = []
    for seed in tqdm(seeds, desc="attention variance", unit="seed", disable=not progress):
        with VarianceRecorder(model, max_elements) as rec:
            samples.append(_generate(model, labels, seed, sampler, steps, cfg_scale, device).cpu())
        runs.append(rec.records)
    n_steps = len(runs[0])
    if n_steps == 0 or any(len(r) != n_steps for r in runs):
        raise SparseditError("the sampler did not call the model once per step; cannot align the steps")
    timesteps = [t for t, _ in runs[0]]
    n_layers = len(runs[0][0][1])
    variance = [[sum(run[s][1][layer] for run in runs) / len(runs) for s in range(n_steps)] for layer in range(n_layers)]
    result = VarianceResult(variance, timesteps, sampler, steps, [int(v) for v in labels], seeds, cfg_scale)
    return result, samples


# ------------------------------------------------------------------------------------------------
# constant attention maps (paper Fig. 3)
# ------------------------------------------------------------------------------------------------


def uniform_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention with a constant map, normalised: every query gets the mean of V over the keys."""
    return v.mean(dim=-2, keepdim=True).expand(*v.shape[:-2], q.shape[-2], v.shape[-1])


@contextmanager
def constant_attention(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """Within the block, blocks ``0..k-1`` attend with :func:`uniform_attention`; restored afterwards."""
    attns = _attention_modules(model)
    if not 0 <= k <= len(attns):
        raise SparseditError(f"k = {k} is outside [0, {len(attns)}] (the model's depth)")
    saved = [m.attn_fn for m in attns[:k]]
    try:
        for m in attns[:k]:
            m.attn_fn = uniform_attention
        yield model
    finally:
        for m, fn in zip(attns[:k], saved, strict=True):
            m.attn_fn = fn


@dataclass
class ConstantMapResult:
    """Difference of final samples when blocks ``0..k-1`` use a constant map, vs the model (``k = 0``).

    Per ``k``: ``mean_abs`` = mean |x_k - x_0|, ``mse`` = mean (x_k - x_0)^2 and ``rel_l2`` =
    ||x_k - x_0|| / ||x_0||, over all samples (classes x seeds), in the model's data space.
    """

    ks: list[int]
    mean_abs: list[float]
    mse: list[float]
    rel_l2: list[float]
    sampler: str
    steps: int
    labels: list[int]
    seeds: list[int]
    samples: list[Tensor] = field(default_factory=list, repr=False)  # per k: (seeds*labels, C, H, W)

    def rows(self) -> list[dict[str, Any]]:
        return [{"k": k, "mean_abs": a, "mse": m, "rel_l2": r}
                for k, a, m, r in zip(self.ks, self.mean_abs, self.mse, self.rel_l2, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "labels": self.labels, "seeds": self.seeds,
                "replacement": "blocks 0..k-1 attend with a constant (uniform) map: output = mean of V",
                "rows": self.rows()}

    def rel_l2_at(self, k: int) -> float | None:
        return self.rel_l2[self.ks.index(k)] if k in self.ks else None


@torch.no_grad()
def constant_map_experiment(
    model: nn.Module,
    labels: Sequence[int],
    *,
    max_k: int,
    seeds: Sequence[int] = (0,),
    sampler: str = "ddim",
    steps: int = 25,
    cfg_scale: float = 1.0,
    device: str | torch.device = "cpu",
    reference: Sequence[Tensor] | None = None,
    progress: bool = True,
) -> ConstantMapResult:
    """Sample with blocks ``0..k-1`` on constant attention maps for ``k = 0..max_k``, same seeds.

    ``reference`` (the ``k = 0`` samples per seed, e.g. from :func:`attention_variance` with the
    same settings) saves the ``k = 0`` runs.
    """
    depth = len(_attention_modules(model))
    if not 0 <= max_k <= depth:
        raise SparseditError(f"--max-k {max_k} is outside [0, {depth}] (the model's depth)")
    seeds = list(seeds)
    ref = list(reference) if reference is not None else None
    if ref is not None and len(ref) != len(seeds):
        raise SparseditError("reference must hold one sample batch per seed")
    ks = list(range(max_k + 1))
    todo = [(k, s) for k in ks for s in seeds if not (k == 0 and ref is not None)]
    outs: dict[tuple[int, int], Tensor] = {}
    if ref is not None:
        outs.update({(0, s): r.cpu() for s, r in zip(seeds, ref, strict=True)})
    for k, s in tqdm(todo, desc="constant maps", unit="run", disable=not progress):
        with constant_attention(model, k):
            outs[(k, s)] = _generate(model, labels, s, sampler, steps, cfg_scale, device).cpu()
    per_k = [torch.cat([outs[(k, s)] for s in seeds]).float() for k in ks]
    x0 = per_k[0]
    norm0 = x0.norm().item()
    mean_abs, mse, rel = [], [], []
    for xk in per_k:
        diff = xk - x0
        mean_abs.append(diff.abs().mean().item())
        mse.append(diff.pow(2).mean().item())
        rel.append(diff.norm().item() / norm0 if norm0 > 0 else 0.0)
    return ConstantMapResult(ks, mean_abs, mse, rel, sampler, steps, [int(v) for v in labels], seeds, per_k)


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


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows of equal keys -> CSV (written atomically)."""
    from sparsedit.core.checkpoint import atomic_write

    path = Path(path)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SparseditError("plots need matplotlib: pip install 'sparsedit[plot]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    from sparsedit.core.checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return path


def plot_variance(result: VarianceResult, heatmap: str | Path, lines: str | Path, max_lines: int = 10) -> list[Path]:
    """A heat map (steps x layers) and Fig. 1b's line plot (variance vs layer, one line per step)."""
    plt = _pyplot()
    data = torch.tensor(result.variance).T.numpy()  # (steps, layers)
    n_steps, n_layers = data.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * n_layers + 2), max(3.0, 0.18 * n_steps + 1.5)))
    im = ax.imshow(data, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("layer")
    ax.set_ylabel("sampling step (t)")
    ticks = sorted(set(torch.linspace(0, n_steps - 1, min(n_steps, 8)).round().long().tolist()))
    ax.set_yticks(ticks, [f"{s} ({result.timesteps[s]})" for s in ticks])
    ax.set_title("normalised attention variance")
    fig.colorbar(im, ax=ax, label="(N sum p^2 - 1)/(N - 1)")
    out = [_save_figure(fig, Path(heatmap))]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * n_layers + 2), 3.5))
    picks = sorted(set(torch.linspace(0, n_steps - 1, min(n_steps, max_lines)).round().long().tolist()))
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(picks):
        ax.plot(range(n_layers), data[s], marker="o", ms=3, lw=1, color=cmap(i / max(1, len(picks) - 1)),
                label=f"t={result.timesteps[s]}")
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised variance")
    ax.set_title("attention variance per layer (one line per sampling step)")
    ax.legend(fontsize=7, ncol=2)
    out.append(_save_figure(fig, Path(lines)))
    plt.close(fig)
    return out


def plot_constant_map(result: ConstantMapResult, path: str | Path) -> Path:
    """Sample difference vs k (Fig. 3's experiment): relative L2 and mean |diff|."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    ax.plot(result.ks, result.rel_l2, marker="o", label="relative L2 ||x_k - x_0|| / ||x_0||")
    ax.plot(result.ks, result.mean_abs, marker="s", label="mean |x_k - x_0|")
    ax.set_xlabel("k (blocks 0..k-1 on constant attention maps)")
    ax.set_ylabel("difference vs k = 0")
    ax.set_xticks(result.ks)
    ax.legend(fontsize=8)
    ax.set_title("constant attention maps in the first k layers")
    out = _save_figure(fig, Path(path))
    plt.close(fig)
    return out
