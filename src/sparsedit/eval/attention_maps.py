"""Attention maps of a DiT, measured: their normalised variance per layer and sampling step (paper Fig. 1b), and
samples with constant maps in the first blocks (Fig. 3). The statistic is defined in :mod:`sparsedit.eval.analyze`,
which re-exports everything here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsedit.core.layers import Attention, AttentionFn
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.base import not_analyzable

__all__ = [
    "CHUNK_ELEMENTS",
    "IMAGENET_LABELS",
    "VARIANCE_DEFINITION",
    "ConstantMapResult",
    "VarianceRecorder",
    "VarianceResult",
    "attention_row_sum_sq",
    "attention_variance",
    "constant_attention",
    "constant_map_experiment",
    "default_labels",
    "normalized_variance",
    "normalized_variance_from_sum_sq",
    "uniform_attention",
]

VARIANCE_DEFINITION = (
    "normalised attention variance: for each query row p over N keys, var(p) = sum_j p_j^2 / N - 1/N^2 divided "
    "by its one-hot maximum (N-1)/N^2, i.e. v = (N * sum_j p_j^2 - 1) / (N - 1) in [0, 1] (0 = uniform map, "
    "1 = one-hot rows); averaged over query rows, heads and samples"
)
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
