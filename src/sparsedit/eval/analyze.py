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

The first two live in :mod:`sparsedit.eval.attention_maps`, the third in :mod:`sparsedit.eval.layout_proposal`;
this module re-exports them and writes the CSV files and plots.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from sparsedit.errors import SparseditError
from sparsedit.eval.attention_maps import (
    CHUNK_ELEMENTS,
    IMAGENET_LABELS,
    VARIANCE_DEFINITION,
    ConstantMapResult,
    VarianceRecorder,
    VarianceResult,
    attention_row_sum_sq,
    attention_variance,
    constant_attention,
    constant_map_experiment,
    default_labels,
    normalized_variance,
    normalized_variance_from_sum_sq,
    uniform_attention,
)
from sparsedit.eval.layout_proposal import (
    PAPER_R_MAX,
    PAPER_R_MIN,
    Proposal,
    ProposeRule,
    budget_gmacs,
    propose,
    sparsify_command,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "IMAGENET_LABELS",
    "PAPER_R_MAX",
    "PAPER_R_MIN",
    "VARIANCE_DEFINITION",
    "ConstantMapResult",
    "Proposal",
    "ProposeRule",
    "VarianceRecorder",
    "VarianceResult",
    "attention_row_sum_sq",
    "attention_variance",
    "budget_gmacs",
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
