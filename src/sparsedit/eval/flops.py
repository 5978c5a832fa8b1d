"""Compute cost (multiply-accumulates) and parameter counts of every model family, counted from the model itself.

Every number comes from one generic count (:mod:`sparsedit.eval.macs`): the model of the config is built on the
meta device, which allocates nothing and computes nothing, and one forward of one sample per token set runs under
``torch.utils.flop_counter.FlopCounterMode`` plus a counter of the element-wise work; the counts are split per
module into the report's segments, the blocks by the kinds the family adapter names. No formula here knows a
family: :func:`sparsedit.families.family_of` answers every family question. Conventions (docs/flops.md):

* One MAC is one multiply-accumulate; FLOPs in the DiT / fvcore sense are MACs
  (DiT-XL/2 at 256 px: 118.6 G). ``torch.utils.flop_counter`` reports 2 FLOPs per MAC.
* Everything is per image (per video for a video family) and per forward pass (batch size 1). Classifier-free
  guidance runs the model on a doubled batch, so a guided sampling step costs twice the number reported here.
* Op kinds: ``linear`` = every matmul of a Linear or convolution layer (patch embedding, t-embedder
  MLP, adaLN regressors, q/k/v/proj, poolingformer V/proj, recovery merge W1/W2, MLPs, final
  projection; biases are not counted); ``attention`` = the two activation-activation matmuls
  ``Q K^T`` and ``A V``; ``other`` = the element-wise / reduction work on token tensors (norms,
  modulation, gating, activations, softmax, pooling, upsampling, position-embedding adds), counted op by
  op under the rules of docs/flops.md ("What other counts, exactly").
* ``total`` is ``linear + attention``: the matmul work, which is what the DiT paper, fvcore and
  :func:`measure_macs` (FlopCounterMode) count. ``other`` is reported beside it, never inside it.

Padded caption tokens are computed like real ones (a mask only zeroes their attention weights), so the caption
families count ``text_len`` tokens (120 unless given).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.core.schedule import discrete_timestep
from sparsedit.errors import SparseditError
from sparsedit.eval.macs import KINDS, count_forward, count_params, flop_counter, resized, split_flops
from sparsedit.families import family_of
from sparsedit.families.pixart.model import CAPTION_TOKENS

__all__ = [
    "KINDS",
    "MacReport",
    "VideoMacReport",
    "dit_macs",
    "forward_macs",
    "latte_macs",
    "latte_params",
    "latte_schedule_macs",
    "measure_macs",
    "measure_macs_by_kind",
    "model_macs",
    "model_params",
    "pixart_macs",
    "pixart_params",
    "schedule_macs",
    "sparse_dit_macs",
    "sparse_latte_macs",
    "sparse_pixart_macs",
]

Grid = tuple[int, int]
G = 1e9
# The parts of an SDTM (by_part of a sparse model's report), each the sum of its blocks' linear + attention.
SDTM_PARTS = ("gen", "sparse", "recover", "dense")


@dataclass
class MacReport:
    """MACs of one forward pass of one image, by segment and by op kind.

    ``table[segment][kind]`` holds the MACs of every (segment, kind) pair; segments are ``embed``,
    ``blocks`` and ``final`` for a dense model and ``embed``, ``pool``, ``sdtm``, ``top`` and ``final`` for a
    sparse one (whose ``by_part`` splits ``sdtm`` into gen / sparse / recover / dense, kinds summed
    as in ``total``). ``total``, ``by_segment`` and every ``by_part`` value count ``linear +
    attention`` only; ``by_kind`` lists all three kinds, so ``total == by_kind["linear"] +
    by_kind["attention"]`` and ``total_with_other`` adds ``by_kind["other"]``.
    """

    model_type: str
    grid: Grid
    sparse_grid: Grid | None
    table: dict[str, dict[str, int]]
    by_part: dict[str, int] = field(default_factory=dict)
    params: int = 0

    @property
    def by_kind(self) -> dict[str, int]:
        return {k: sum(row[k] for row in self.table.values()) for k in KINDS}

    @property
    def by_segment(self) -> dict[str, int]:
        return {seg: row["linear"] + row["attention"] for seg, row in self.table.items()}

    @property
    def total(self) -> int:
        kinds = self.by_kind
        return kinds["linear"] + kinds["attention"]

    @property
    def total_with_other(self) -> int:
        return sum(self.by_kind.values())

    @property
    def gmacs(self) -> float:
        return self.total / G

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: ``macs`` (int) and GMACs (floats, 1 G = 1e9) everywhere else."""
        return {
            "model_type": self.model_type,
            "grid": list(self.grid),
            "sparse_grid": None if self.sparse_grid is None else list(self.sparse_grid),
            "macs": self.total,
            "gmacs": self.gmacs,
            "gmacs_with_other": self.total_with_other / G,
            "by_segment": {k: v / G for k, v in self.by_segment.items()},
            "by_kind": {k: v / G for k, v in self.by_kind.items()},
            "by_part": {k: v / G for k, v in self.by_part.items()},
            "table": {seg: {k: v / G for k, v in row.items()} for seg, row in self.table.items()},
            "params": self.params,
        }


@dataclass
class VideoMacReport(MacReport):
    """A :class:`MacReport` of one video (per sample, per forward) with its frame counts."""

    frames: int = 1
    sparse_frames: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "frames": self.frames, "sparse_frames": self.sparse_frames}


# ------------------------------------------------------------------------------------------------
# the one generic report
# ------------------------------------------------------------------------------------------------


def _report(config: Any, tokens: Any = None, text_len: int | None = None) -> MacReport:
    """The report of one forward of ``config``'s model with sparse ``tokens`` (None: dense), from the count."""
    fam = family_of(config)
    count = count_forward(config, tokens, text_len)
    segments = ("embed", "pool", "sdtm", "top", "final") if fam.sparse else ("embed", "blocks", "final")
    table = {seg: dict.fromkeys(KINDS, 0) for seg in segments}
    table["embed"], table["final"] = _row(count.embed), _row(count.final)
    parts = dict.fromkeys(SDTM_PARTS, 0) if fam.sparse else {}
    for kind, cost in zip(fam.block_kinds(), count.blocks, strict=True):
        part = fam.block_part(kind)  # pool, top, or the SDTM part of the block
        if not fam.sparse:
            segment = "blocks"
        else:
            segment = part if part in ("pool", "top") else "sdtm"
        for k, v in zip(KINDS, cost, strict=True):
            table[segment][k] += v
        if segment == "sdtm":
            parts[part] += cost[0] + cost[1]
    sparse_grid, sparse_frames = fam.split_tokens(tokens)
    report = dict(model_type=config.model_type, grid=tuple(config.grid), table=table, by_part=parts,
                  params=count.params, sparse_grid=None if sparse_grid is None else tuple(sparse_grid))
    if fam.frames is None:
        return MacReport(**report)  # type: ignore[arg-type]
    return VideoMacReport(**report, frames=fam.frames, sparse_frames=sparse_frames)  # type: ignore[arg-type]


def _row(cost: tuple[int, int, int]) -> dict[str, int]:
    return dict(zip(KINDS, cost, strict=True))


def _check_grid(grid: object, what: str) -> Grid:
    try:
        h, w = (int(v) for v in grid)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise SparseditError(f"{what} must be a pair of integers (h, w), got {grid!r}; pass e.g. (8, 8)") from None
    if h < 1 or w < 1:
        raise SparseditError(f"{what} {h}x{w} is empty; pass positive sides, e.g. (8, 8)")
    return h, w


def _sparse_grids(dense_grid: object, sparse_grid: object) -> tuple[Grid, Grid]:
    """Both grids checked; the sparse one must fit inside the dense one, as the sparse models require."""
    H, W = _check_grid(dense_grid, "dense grid")
    h, w = _check_grid(sparse_grid, "sparse grid")
    if h > H or w > W:
        raise SparseditError(f"sparse grid {h}x{w} must lie within the dense grid {H}x{W}; pick a smaller grid")
    return (H, W), (h, w)


def _refuse(config: Any, sparse: bool, message: str) -> None:
    """Refuse a dense config where a sparse one is needed (``sparse`` True), or the other way round."""
    if family_of(config).sparse != sparse:
        raise SparseditError(message)


def _dense_image(config: Any, grid: Grid | None, text_len: int | None) -> MacReport:
    H, W = _check_grid(config.grid if grid is None else grid, "grid")
    return _report(resized(config, (H, W), None), None, text_len)


def _sparse_image(config: Any, sparse_grid: Grid, dense_grid: Grid | None, text_len: int | None) -> MacReport:
    (H, W), (h, w) = _sparse_grids(config.grid if dense_grid is None else dense_grid, sparse_grid)
    return _report(resized(config, (H, W), None), (h, w), text_len)


# ------------------------------------------------------------------------------------------------
# public API: parameters and one forward
# ------------------------------------------------------------------------------------------------


def model_params(config: Any) -> int:
    """Number of parameters of the model ``config`` builds (buffers such as pos_embed excluded)."""
    return count_params(config)


def pixart_params(config: Any) -> int:
    """Parameters of a PixArt / SparsePixArt (buffers: pos_embed and the null caption excluded)."""
    return count_params(config)


def latte_params(config: Any) -> int:
    """Parameters of a Latte / SparseLatte (buffers: the sin-cos tables excluded)."""
    return count_params(config)


def dit_macs(config: Any, grid: Grid | None = None) -> MacReport:
    """MACs of one DiT forward for one image on token grid ``grid`` (default: the config's grid)."""
    _refuse(config, False, "dit_macs got a SparseDiT config; use sparse_dit_macs(config, sparse_grid) or schedule_macs")
    return _dense_image(config, grid, None)


def sparse_dit_macs(config: Any, sparse_grid: Grid, dense_grid: Grid | None = None) -> MacReport:
    """MACs of one SparseDiT forward for one image with sparse grid ``sparse_grid`` (h, w).

    ``dense_grid`` defaults to the config's token grid; the sparse grid must fit inside it, as
    :meth:`SparseDiT.sparse_grid` requires.
    """
    _refuse(config, True, "sparse_dit_macs needs a SparseDiT config; use dit_macs for a DiT")
    return _sparse_image(config, sparse_grid, dense_grid, None)


def pixart_macs(config: Any, grid: Grid | None = None, text_len: int = CAPTION_TOKENS) -> MacReport:
    """MACs of one PixArt forward for one image with ``text_len`` caption tokens (default 120).

    Padded caption tokens are computed too (the mask only zeroes their attention weights).
    """
    _refuse(config, False, "pixart_macs got a SparsePixArt config; use sparse_pixart_macs(config, sparse_grid)")
    return _dense_image(config, grid, text_len)


def sparse_pixart_macs(config: Any, sparse_grid: Grid, dense_grid: Grid | None = None,
                       text_len: int = CAPTION_TOKENS) -> MacReport:
    """MACs of one SparsePixArt forward for one image with sparse grid ``sparse_grid`` and ``text_len`` tokens."""
    _refuse(config, True, "sparse_pixart_macs needs a SparsePixArt config; use pixart_macs for a PixArt")
    return _sparse_image(config, sparse_grid, dense_grid, text_len)


def _video(config: Any, grid: Grid, frames: int, sparse: tuple[Grid, int] | None, text_len: int) -> VideoMacReport:
    H, W = _check_grid(grid, "grid")
    if frames < 1:
        raise SparseditError(f"frames must be positive, got {frames}")
    tokens = None
    if sparse is not None:
        (h, w), sf = _check_grid(sparse[0], "sparse grid"), int(sparse[1])
        if h > H or w > W or not 1 <= sf <= frames:
            raise SparseditError(f"sparse tokens {h}x{w} x {sf} must lie within {H}x{W} x {frames}")
        tokens = ((h, w), sf)
    return _report(resized(config, (H, W), frames), tokens, text_len)  # type: ignore[return-value]


def latte_macs(config: Any, grid: Grid | None = None, frames: int | None = None,
               text_len: int = CAPTION_TOKENS) -> VideoMacReport:
    """MACs of one Latte forward for one video (default: the config's grid and ``num_frames``).

    ``text_len`` caption tokens for the text variant (ignored for the class variant).
    """
    _refuse(config, False, "latte_macs got a SparseLatte config; use sparse_latte_macs(config, sparse_grid, sparse_frames)")
    return _video(config, config.grid if grid is None else grid, family_of(config).frames if frames is None else frames,
                  None, text_len)


def sparse_latte_macs(config: Any, sparse_grid: Grid, sparse_frames: int, dense_grid: Grid | None = None,
                      frames: int | None = None, text_len: int = CAPTION_TOKENS) -> VideoMacReport:
    """MACs of one SparseLatte forward for one video with sparse tokens ``sparse_grid`` x ``sparse_frames``."""
    _refuse(config, True, "sparse_latte_macs needs a SparseLatte config; use latte_macs for a Latte")
    return _video(config, config.grid if dense_grid is None else dense_grid,
                  family_of(config).frames if frames is None else frames, (sparse_grid, sparse_frames), text_len)


def model_macs(config: Any, sparse_grid: Grid | None = None) -> MacReport:
    """MACs of one forward of any image model (a sparse one needs ``sparse_grid``), dense video model included.

    A sparse video model needs :func:`sparse_latte_macs` (its tokens have frames too). Caption models count
    120 text tokens.
    """
    fam = family_of(config)
    if fam.frames is not None and fam.sparse:
        raise SparseditError(f"a {config.model_type}'s cost depends on its sparse grid and frames; use sparse_latte_macs")
    if fam.sparse:
        if sparse_grid is None:
            raise SparseditError(
                f"a {config.model_type}'s cost depends on its sparse grid; pass sparse_grid=(h, w), or use "
                "schedule_macs for the mean over a sampling run"
            )
        return _sparse_image(config, sparse_grid, None, None)
    if sparse_grid is not None:
        raise SparseditError(f"sparse_grid only applies to a {fam.sparse_type} config; drop it for a {fam.dense_type}")
    return _report(config)


def forward_macs(config: Any, tokens: Any = None) -> MacReport:
    """MACs of one forward pass of one sample with the family's sparse token set ``tokens`` (None: dense)."""
    if family_of(config).frames is None or tokens is None:
        return model_macs(config, tokens)
    return sparse_latte_macs(config, *tokens)


# ------------------------------------------------------------------------------------------------
# public API: a sampling run
# ------------------------------------------------------------------------------------------------


def _schedule(config: Any, steps: list[int], text_len: int | None) -> tuple[dict[Any, int], dict[Any, MacReport],
                                                                           dict[str, Any]]:
    """(steps per token set, the report of each, the fields every schedule result has) of a sampling run."""
    fam = family_of(config)
    dense = tuple(config.grid) if fam.frames is None else (tuple(config.grid), fam.frames)
    sets = [fam.tokens_at(t) for t in steps] if fam.sparse else [dense] * len(steps)
    reports = {s: _report(config, s if fam.sparse else None, text_len) for s in set(sets)}
    counts = {s: sets.count(s) for s in reports}
    per_step = [reports[s].total / G for s in sets]

    def tokens(s: Any) -> int:
        grid, frames = (s, 1) if fam.frames is None else s
        return grid[0] * grid[1] * frames

    grids = []
    for s in sorted(reports, key=lambda s: (tokens(s), s)):
        entry = {"grid": list(s)} if fam.frames is None else {"grid": list(s[0]), "frames": s[1]}
        grids.append({**entry, "tokens": tokens(s), "steps": counts[s], "gmacs": reports[s].total / G})
    fields = {
        "gmacs": sum(c * reports[s].total for s, c in counts.items()) / len(steps) / G,
        "gmacs_min": min(per_step),
        "gmacs_max": max(per_step),
        "grids": grids,
        "per_step": per_step,
    }
    return counts, reports, fields


def schedule_macs(config: Any, timesteps: Iterable[int], dense_grid: Grid | None = None,
                  text_len: int | None = None) -> dict[str, Any]:
    """Cost of a sampling run: one forward per timestep, the grid of each from the model's schedule.

    ``timesteps`` are the original (training) timesteps the model sees, e.g.
    ``space_timesteps(1000, "250")``. Returns a dict with ``gmacs`` (mean over the steps: a
    sparse model's cost under a schedule is its mean over the sampling steps), ``gmacs_min``,
    ``gmacs_max``, ``grids`` (one entry per distinct grid, fewest tokens first: ``grid``, ``steps``,
    ``gmacs``; ``frames`` too for a video model), ``per_step`` (GMACs of each step, in the order given),
    ``by_segment`` / ``by_kind`` / ``by_part`` (means over the steps, GMACs), ``steps`` and ``params``. For a dense
    model every step uses the dense grid. Per image (or video), per forward. ``text_len``: caption tokens of a text
    video model (None: the family's own count); ``dense_grid`` resizes an image model.
    """
    video = family_of(config).frames is not None
    # Fractional and flow-matching timesteps (sigma * 1000) use the grid of the integer timestep the model maps
    # them to; integer DDPM timesteps are unchanged.
    steps = [discrete_timestep(t, getattr(config, "num_timesteps", 1000)) for t in timesteps]
    if not steps:
        raise SparseditError("schedule_macs got no timesteps; pass the sampling run's timesteps, e.g. space_timesteps(1000, '250')")
    if not video:
        config = resized(config, _check_grid(config.grid if dense_grid is None else dense_grid, "dense grid"), None)
    counts, reports, fields = _schedule(config, steps, text_len if video else None)

    def mean_of(attr: str) -> dict[str, float]:
        keys = getattr(next(iter(reports.values())), attr).keys()
        return {k: sum(c * getattr(reports[s], attr)[k] for s, c in counts.items()) / len(steps) / G for k in keys}

    return {**fields, "by_segment": mean_of("by_segment"), "by_kind": mean_of("by_kind"),
            "by_part": mean_of("by_part"), "steps": len(steps), "params": model_params(config)}


def latte_schedule_macs(config: Any, timesteps: Iterable[int], text_len: int | None = None) -> dict[str, Any]:
    """:func:`schedule_macs` for a video model (its former entry point): mean GMACs over the steps, per video, per
    forward; ``text_len`` None counts the family's own caption length (Latte-T2V 120, Wan 512)."""
    return schedule_macs(config, timesteps, text_len=text_len)


# ------------------------------------------------------------------------------------------------
# measuring a real model
# ------------------------------------------------------------------------------------------------


def measure_macs_by_kind(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, **forward_kwargs: Any) -> dict[str, int]:
    """Run ``model(x, t, y, **forward_kwargs)`` under FlopCounterMode; MACs by kind for the whole batch.

    Returns ``{"linear": ..., "attention": ..., "total": ...}``: ``attention`` is what the SDPA ops
    (and any explicit bmm) count, ``linear`` the mm/addmm/convolution ops. FlopCounterMode counts 2
    FLOPs per MAC and only matmul-like ops, so ``total`` compares with :attr:`MacReport.total` (times
    the batch size). Works on CPU, where CPU flash SDPA (which torch has no formula for) is counted, and
    on the meta device (no data needed with an explicit ``grid``).
    """
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(x, t, y, **forward_kwargs)
    counts = counter.get_flop_counts().get("Global", {})
    linear, attention = split_flops(counts)
    return {"linear": linear, "attention": attention, "total": sum(counts.values()) // 2}


def measure_macs(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, **forward_kwargs: Any) -> int:
    """MACs of ``model(x, t, y, **forward_kwargs)`` as counted by ``torch.utils.flop_counter``.

    For the whole batch of ``x`` (divide by the batch size for per-image numbers); matmul-like ops
    only (linear + attention). Attention run through CPU flash SDPA is counted, see
    :func:`measure_macs_by_kind`.
    """
    return measure_macs_by_kind(model, x, t, y, **forward_kwargs)["total"]
