"""Analytic compute cost (multiply-accumulates) and parameter counts of DiT and SparseDiT.

Costs are computed from the config and the token grids alone, never by running the model, and
follow what our modules execute (:mod:`sparsedit.core.layers`, :mod:`sparsedit.core.blocks`,
:mod:`sparsedit.families.dit.sparse`). Conventions (docs/flops.md):

* One MAC is one multiply-accumulate; FLOPs in the DiT / fvcore sense are MACs
  (DiT-XL/2 at 256 px: 118.6 G). ``torch.utils.flop_counter`` reports 2 FLOPs per MAC.
* Everything is per image and per forward pass (batch size 1). Classifier-free guidance runs the
  model on a doubled batch, so a guided sampling step costs twice the number reported here.
* Op kinds: ``linear`` = every matmul of a Linear or convolution layer (patch embedding, t-embedder
  MLP, adaLN regressors, q/k/v/proj, poolingformer V/proj, recovery merge W1/W2, MLPs, final
  projection; biases are not counted); ``attention`` = the two activation-activation matmuls
  ``Q K^T`` and ``A V``; ``other`` = an estimate of the element-wise / reduction work on token
  tensors (norms, modulation, gating, activations, softmax, pooling, upsampling, position-embedding
  adds), defined exactly in docs/flops.md.
* ``total`` is ``linear + attention``: the matmul work, which is what the DiT paper, fvcore and
  :func:`measure_macs` (FlopCounterMode) count. ``other`` is reported beside it, never inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.core.layout import block_kinds
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import DiTConfig
from sparsedit.families.dit.sparse import SparseDiTConfig
from sparsedit.families.latte.model import LatteConfig
from sparsedit.families.latte.sparse import SparseLatteConfig, latte_block_axes, latte_block_kinds
from sparsedit.families.pixart.model import CAPTION_TOKENS, PixArtConfig
from sparsedit.families.pixart.sparse import SparsePixArtConfig

__all__ = [
    "KINDS",
    "MacReport",
    "VideoMacReport",
    "dit_macs",
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
KINDS = ("linear", "attention", "other")
# Width of the sinusoidal timestep features fed to the t-embedder MLP (TimestepEmbedder default).
T_FREQ = 256
# SDTM block kind -> the part of the SDTM it belongs to (by_part in MacReport).
_SDTM_PART = {"gen": "gen", "gen+": "gen", "sparse": "sparse", "recover": "recover", "recover+": "recover",
              "recover*": "recover", "dense": "dense"}
_SEGMENT = {"pool": "pool", "top": "top", **{k: "sdtm" for k in _SDTM_PART}}
G = 1e9


@dataclass
class MacReport:
    """MACs of one forward pass of one image, by segment and by op kind.

    ``table[segment][kind]`` holds the MACs of every (segment, kind) pair; segments are ``embed``,
    ``blocks`` and ``final`` for a DiT and ``embed``, ``pool``, ``sdtm``, ``top`` and ``final`` for a
    SparseDiT (whose ``by_part`` splits ``sdtm`` into gen / sparse / recover / dense, kinds summed
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


# ------------------------------------------------------------------------------------------------
# per-module costs: (linear, attention, other) MACs for one image
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dims:
    d: int  # hidden size
    f: int  # MLP hidden size
    heads: int
    patch_in: int  # C_in * p * p (patch-embedding conv fan-in)
    patch_out: int  # p * p * C_out (final projection width)
    embedders: int  # conditioning embedders (1, or depth with per_block_cond)

    @classmethod
    def of(cls, config: DiTConfig) -> _Dims:
        p = config.patch_size
        return cls(
            d=config.hidden_size, f=int(config.hidden_size * config.mlp_ratio), heads=config.num_heads,
            patch_in=config.in_channels * p * p, patch_out=p * p * config.out_channels,
            embedders=config.depth if config.per_block_cond else 1,
        )


Cost = tuple[int, int, int]


def _embed(n: int, m: _Dims) -> Cost:
    # patch conv + t-embedder MLP (256 -> D -> D) per embedder; label lookup is free; + pos embed.
    linear = n * m.patch_in * m.d + m.embedders * (T_FREQ * m.d + m.d * m.d)
    return linear, 0, n * m.d


def _final(n: int, m: _Dims) -> Cost:
    # adaLN (D -> 2D), LayerNorm (4/elem) + modulate (2/elem), projection to p*p*C_out.
    return 2 * m.d * m.d + n * m.d * m.patch_out, 0, 6 * n * m.d


def _dit_block(nq: int, m: _Dims, nk: int | None = None) -> Cost:
    """DiTBlock with nq query tokens; ``nk`` = context tokens for cross-attention (k/v from them)."""
    d, f = m.d, m.f
    kv = nq if nk is None else nk
    linear = 6 * d * d + nq * d * d + 2 * kv * d * d + nq * d * d + 2 * nq * d * f  # adaLN, q, k+v, proj, MLP
    attention = 2 * nq * kv * d  # Q K^T and A V
    # LayerNorm 4/elem, modulate 2, gate+residual 2 (twice each), GELU, softmax over the score matrix;
    # cross-attention also normalises and modulates the context (4 + 2 per element).
    other = 16 * nq * d + nq * f + m.heads * nq * kv + (0 if nk is None else 6 * nk * d)
    return linear, attention, other


def _poolingformer(n: int, m: _Dims) -> Cost:
    d, f = m.d, m.f
    # Tokens are averaged first, then V and proj act on one token (PoolingAttention): 2 D^2.
    linear = 6 * d * d + 2 * d * d + 2 * n * d * f
    # norm1 4, modulate 2, mean 1, broadcast residual add 1, norm2 4, modulate 2, gate+residual 2
    # per element; GELU; gate multiply on the single pooled token.
    other = 16 * n * d + n * f + d
    return linear, 0, other


def _add(a: Cost, b: Cost) -> Cost:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _block_cost(kind: str, n: int, mtok: int, upsample: bool, m: _Dims, pos: bool = True) -> Cost:
    """Cost of one SparseDiT block of ``kind`` with n dense and mtok sparse tokens; ``pos``: the recovery
    merges add the position table (the config's ``recovery_pos_embed``)."""
    if kind == "pool":
        return _poolingformer(n, m)
    if kind in ("gen", "gen+"):
        cost = _dit_block(mtok, m, nk=n)  # q from the M sparse tokens, k/v from the N dense ones
        return _add(cost, (0, 0, n * m.d)) if kind == "gen" else cost  # adaptive avg pool reads N*D
    if kind == "sparse":
        return _dit_block(mtok, m)
    if kind in ("recover", "recover+"):
        cost = _dit_block(n, m, nk=mtok)  # q from the N dense tokens, k/v from the M sparse ones
        if kind == "recover":
            # merge W1 on the N upsampled tokens, W2 on the N dense tokens; upsample writes N*D
            # (skipped by the code when the grids are equal); adds: the merge (+ the position table).
            cost = _add(cost, (2 * n * m.d * m.d, 0, (n * m.d if upsample else 0) + (2 if pos else 1) * n * m.d))
        return cost
    if kind == "recover*":  # the authors' repeated recovery: merge and attention on the N dense tokens only
        return _add(_dit_block(n, m), (2 * n * m.d * m.d, 0, (2 if pos else 1) * n * m.d))
    return _dit_block(n, m)  # dense, top


def _check_grid(grid: object, what: str) -> Grid:
    try:
        h, w = (int(v) for v in grid)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise SparseditError(f"{what} must be a pair of integers (h, w), got {grid!r}; pass e.g. (8, 8)") from None
    if h < 1 or w < 1:
        raise SparseditError(f"{what} {h}x{w} is empty; pass positive sides, e.g. (8, 8)")
    return h, w


def _row(cost: Cost) -> dict[str, int]:
    return dict(zip(KINDS, cost, strict=True))


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


def model_params(config: DiTConfig) -> int:
    """Number of parameters of the model ``config`` builds (buffers such as pos_embed excluded)."""
    if isinstance(config, LatteConfig):
        return latte_params(config)
    if isinstance(config, PixArtConfig):
        return pixart_params(config)
    m = _Dims.of(config)
    d, f = m.d, m.f
    labels = config.num_classes + int(config.class_dropout_prob > 0)
    embed = m.patch_in * d + d + m.embedders * (T_FREQ * d + d + d * d + d + labels * d)
    dit_block = 10 * d * d + 2 * d * f + 11 * d + f  # adaLN 6D, qkv 3D, proj D, MLP
    final = 2 * d * d + 2 * d + d * m.patch_out + m.patch_out
    if not isinstance(config, SparseDiTConfig):
        return embed + config.depth * dit_block + final
    merged = dit_block + 2 * d * d + 2 * d  # a block with W1, W2
    per_kind = {"pool": 8 * d * d + 2 * d * f + 9 * d + f, "recover": merged, "recover*": merged}
    kinds = block_kinds(config.layout, config.extra_recovery)
    return embed + final + sum(per_kind.get(kind, dit_block) for kind in kinds)


def dit_macs(config: DiTConfig, grid: Grid | None = None) -> MacReport:
    """MACs of one DiT forward for one image on token grid ``grid`` (default: the config's grid)."""
    if isinstance(config, SparseDiTConfig):
        raise SparseditError("dit_macs got a SparseDiT config; use sparse_dit_macs(config, sparse_grid) or schedule_macs")
    H, W = _check_grid(config.grid if grid is None else grid, "grid")
    n, m = H * W, _Dims.of(config)
    block = _dit_block(n, m)
    table = {
        "embed": _row(_embed(n, m)),
        "blocks": _row((config.depth * block[0], config.depth * block[1], config.depth * block[2])),
        "final": _row(_final(n, m)),
    }
    return MacReport("DiT", (H, W), None, table, params=model_params(config))


def _sparse_grids(dense_grid: object, sparse_grid: object) -> tuple[Grid, Grid]:
    """Both grids checked; the sparse one must fit inside the dense one, as :meth:`SparseDiT.sparse_grid` requires."""
    H, W = _check_grid(dense_grid, "dense grid")
    h, w = _check_grid(sparse_grid, "sparse grid")
    if h > H or w > W:
        raise SparseditError(f"sparse grid {h}x{w} must lie within the dense grid {H}x{W}; pick a smaller grid")
    return (H, W), (h, w)


def _sparse_table(kinds: list[str], block_cost: Callable[[str], Cost], embed: Cost,
                  final: Cost) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per-segment MAC table (embed, pool, sdtm, top, final) of a SparseDiT-layout model and the SDTM
    cost by part (gen, sparse, recover, dense; linear + attention MACs)."""
    table = {seg: dict.fromkeys(KINDS, 0) for seg in ("embed", "pool", "sdtm", "top", "final")}
    table["embed"] = _row(embed)
    table["final"] = _row(final)
    parts = dict.fromkeys(("gen", "sparse", "recover", "dense"), 0)
    for kind in kinds:
        cost = block_cost(kind)
        row = table[_SEGMENT[kind]]
        for k, v in zip(KINDS, cost, strict=True):
            row[k] += v
        if kind in _SDTM_PART:
            parts[_SDTM_PART[kind]] += cost[0] + cost[1]
    return table, parts


def sparse_dit_macs(config: SparseDiTConfig, sparse_grid: Grid, dense_grid: Grid | None = None) -> MacReport:
    """MACs of one SparseDiT forward for one image with sparse grid ``sparse_grid`` (h, w).

    ``dense_grid`` defaults to the config's token grid; the sparse grid must fit inside it, as
    :meth:`SparseDiT.sparse_grid` requires.
    """
    if not isinstance(config, SparseDiTConfig):
        raise SparseditError("sparse_dit_macs needs a SparseDiT config; use dit_macs for a DiT")
    (H, W), (h, w) = _sparse_grids(config.grid if dense_grid is None else dense_grid, sparse_grid)
    n, mtok, m = H * W, h * w, _Dims.of(config)
    resized = (h, w) != (H, W)
    pos = config.recovery_pos_embed
    table, parts = _sparse_table(block_kinds(config.layout, config.extra_recovery),
                                 lambda kind: _block_cost(kind, n, mtok, resized, m, pos), _embed(n, m), _final(n, m))
    return MacReport("SparseDiT", (H, W), (h, w), table, by_part=parts, params=model_params(config))


def model_macs(config: DiTConfig, sparse_grid: Grid | None = None) -> MacReport:
    """:func:`dit_macs` or :func:`sparse_dit_macs` by config type (a SparseDiT needs ``sparse_grid``).

    PixArt / SparsePixArt configs go to :func:`pixart_macs` / :func:`sparse_pixart_macs` (120 text tokens).
    Latte configs go to :func:`latte_macs`; a SparseLatte needs :func:`sparse_latte_macs` (frames too).
    """
    if isinstance(config, LatteConfig):
        if isinstance(config, SparseLatteConfig):
            raise SparseditError("a SparseLatte's cost depends on its sparse grid and frames; use sparse_latte_macs")
        return latte_macs(config)
    if isinstance(config, PixArtConfig):
        if isinstance(config, SparsePixArtConfig):
            if sparse_grid is None:
                raise SparseditError("a SparsePixArt's cost depends on its sparse grid; pass sparse_grid=(h, w)")
            return sparse_pixart_macs(config, sparse_grid)
        return pixart_macs(config)
    if isinstance(config, SparseDiTConfig):
        if sparse_grid is None:
            raise SparseditError(
                "a SparseDiT's cost depends on its sparse grid; pass sparse_grid=(h, w), or use schedule_macs "
                "for the mean over a sampling run"
            )
        return sparse_dit_macs(config, sparse_grid)
    if sparse_grid is not None:
        raise SparseditError("sparse_grid only applies to a SparseDiT config; drop it for a DiT")
    return dit_macs(config)


def schedule_macs(config: DiTConfig, timesteps: Iterable[int], dense_grid: Grid | None = None) -> dict[str, Any]:
    """Cost of a sampling run: one forward per timestep, the grid of each from the model's schedule.

    ``timesteps`` are the original (training) timesteps the model sees, e.g.
    ``space_timesteps(1000, "250")``. Returns a dict with ``gmacs`` (mean over the steps: a
    SparseDiT's cost under a schedule is its mean over the sampling steps), ``gmacs_min``,
    ``gmacs_max``, ``grids`` (one entry per distinct grid, fewest tokens first: ``grid``, ``steps``,
    ``gmacs``), ``per_step`` (GMACs of each step, in the order given), ``by_segment`` / ``by_kind`` /
    ``by_part`` (means over the steps, GMACs), ``steps`` and ``params``. For a DiT every step uses the
    dense grid. Per image, per forward.
    """
    if isinstance(config, LatteConfig):
        return latte_schedule_macs(config, timesteps)
    steps = [int(t) for t in timesteps]
    if not steps:
        raise SparseditError("schedule_macs got no timesteps; pass the sampling run's timesteps, e.g. space_timesteps(1000, '250')")
    dense = _check_grid(config.grid if dense_grid is None else dense_grid, "dense grid")
    if isinstance(config, SparsePixArtConfig):
        grids = config.schedule.grids_for_timesteps(steps, dense)
        reports = {g: sparse_pixart_macs(config, g, dense) for g in set(grids)}
    elif isinstance(config, PixArtConfig):
        grids = [dense] * len(steps)
        reports = {dense: pixart_macs(config, dense)}
    elif isinstance(config, SparseDiTConfig):
        grids = config.schedule.grids_for_timesteps(steps, dense)
        reports = {g: sparse_dit_macs(config, g, dense) for g in set(grids)}
    else:
        grids = [dense] * len(steps)
        reports = {dense: dit_macs(config, dense)}
    n = len(steps)
    per_step = [reports[g].total / G for g in grids]
    counts = {g: grids.count(g) for g in reports}

    def mean_of(attr: str) -> dict[str, float]:
        keys = getattr(next(iter(reports.values())), attr).keys()
        return {k: sum(c * getattr(reports[g], attr)[k] for g, c in counts.items()) / n / G for k in keys}

    return {
        "gmacs": sum(c * reports[g].total for g, c in counts.items()) / n / G,
        "gmacs_min": min(per_step),
        "gmacs_max": max(per_step),
        "grids": [
            {"grid": list(g), "tokens": g[0] * g[1], "steps": counts[g], "gmacs": reports[g].total / G}
            for g in sorted(reports, key=lambda g: (g[0] * g[1], g))
        ],
        "per_step": per_step,
        "by_segment": mean_of("by_segment"),
        "by_kind": mean_of("by_kind"),
        "by_part": mean_of("by_part"),
        "steps": n,
        "params": model_params(config),
    }


# ------------------------------------------------------------------------------------------------
# PixArt-alpha / SparsePixArt (sparsedit.families.pixart.model): a DiT block without its adaLN regressor (adaLN-single
# computes one shared 6D vector) plus an un-gated text cross-attention over L caption tokens.
# ------------------------------------------------------------------------------------------------


def _pixart_dims(config: PixArtConfig) -> _Dims:
    p = config.patch_size
    return _Dims(d=config.hidden_size, f=int(config.hidden_size * config.mlp_ratio), heads=config.num_heads,
                 patch_in=config.in_channels * p * p, patch_out=p * p * config.out_channels, embedders=1)


def _pixart_embed(n: int, text_len: int, config: PixArtConfig, m: _Dims) -> Cost:
    d = m.d
    # patch conv, t-embedder MLP, t_block (D -> 6D, once), caption projection (C_text -> D -> D per token).
    linear = n * m.patch_in * d + T_FREQ * d + d * d + 6 * d * d + text_len * (config.caption_channels * d + d * d)
    if config.use_additional_conditions:  # 2 size + 1 aspect-ratio values through 256 -> D/3 -> D/3 MLPs
        s = d // 3
        linear += 3 * (T_FREQ * s + s * s)
    return linear, 0, n * d + text_len * d  # pos-embed add; caption GELU


def _text_cross(nq: int, text_len: int, m: _Dims) -> Cost:
    """Text cross-attention of nq image tokens over text_len caption tokens: q, k+v, proj; QK^T and AV."""
    d = m.d
    return 2 * nq * d * d + 2 * text_len * d * d, 2 * nq * text_len * d, nq * d + m.heads * nq * text_len


def _pixart_block(kind: str, n: int, mtok: int, text_len: int, upsample: bool, m: _Dims, pos: bool = True) -> Cost:
    """A PixArt block of ``kind`` (``block_kinds``; "top" for a dense PixArt): the DiT block of that kind
    without the per-block adaLN regressor, plus the text cross-attention on the tokens it holds."""
    nq = mtok if kind in ("gen", "gen+", "sparse") else n
    dit = _block_cost(kind, n, mtok, upsample, m, pos)
    return _add((dit[0] - 6 * m.d * m.d, dit[1], dit[2]), _text_cross(nq, text_len, m))


def _pixart_final(n: int, m: _Dims) -> Cost:
    # (shift, scale) come from a table plus the embedding: no matmul; LayerNorm + modulate; projection.
    return n * m.d * m.patch_out, 0, 6 * n * m.d


def pixart_params(config: PixArtConfig) -> int:
    """Parameters of a PixArt / SparsePixArt (buffers: pos_embed and the null caption excluded)."""
    m = _pixart_dims(config)
    d, f = m.d, m.f
    embed = m.patch_in * d + d + (T_FREQ * d + d + d * d + d) + (6 * d * d + 6 * d)
    embed += config.caption_channels * d + d + d * d + d
    if config.use_additional_conditions:
        s = d // 3
        embed += 2 * (T_FREQ * s + s + s * s + s)
    block = 8 * d * d + 2 * d * f + 15 * d + f  # qkv, proj, text q, kv, proj, MLP, scale_shift_table
    final = d * m.patch_out + m.patch_out + 2 * d
    if not isinstance(config, SparsePixArtConfig):
        return embed + config.depth * block + final
    merged = block + 2 * d * d + 2 * d  # a block with W1, W2
    per_kind = {"pool": block - 2 * d * d - 2 * d, "recover": merged, "recover*": merged}
    kinds = block_kinds(config.layout, config.extra_recovery)
    return embed + final + sum(per_kind.get(kind, block) for kind in kinds)


def pixart_macs(config: PixArtConfig, grid: Grid | None = None, text_len: int = CAPTION_TOKENS) -> MacReport:
    """MACs of one PixArt forward for one image with ``text_len`` caption tokens (default 120).

    Padded caption tokens are computed too (the mask only zeroes their attention weights).
    """
    if isinstance(config, SparsePixArtConfig):
        raise SparseditError("pixart_macs got a SparsePixArt config; use sparse_pixart_macs(config, sparse_grid)")
    H, W = _check_grid(config.grid if grid is None else grid, "grid")
    n, m = H * W, _pixart_dims(config)
    block = _pixart_block("top", n, n, text_len, False, m)
    table = {
        "embed": _row(_pixart_embed(n, text_len, config, m)),
        "blocks": _row(tuple(config.depth * v for v in block)),  # type: ignore[arg-type]
        "final": _row(_pixart_final(n, m)),
    }
    return MacReport("PixArt", (H, W), None, table, params=pixart_params(config))


def sparse_pixart_macs(config: SparsePixArtConfig, sparse_grid: Grid, dense_grid: Grid | None = None,
                       text_len: int = CAPTION_TOKENS) -> MacReport:
    """MACs of one SparsePixArt forward for one image with sparse grid ``sparse_grid`` and ``text_len`` tokens."""
    if not isinstance(config, SparsePixArtConfig):
        raise SparseditError("sparse_pixart_macs needs a SparsePixArt config; use pixart_macs for a PixArt")
    (H, W), (h, w) = _sparse_grids(config.grid if dense_grid is None else dense_grid, sparse_grid)
    n, mtok, m = H * W, h * w, _pixart_dims(config)
    resized = (h, w) != (H, W)
    table, parts = _sparse_table(block_kinds(config.layout, config.extra_recovery),
                                 lambda kind: _pixart_block(kind, n, mtok, text_len, resized, m,
                                                            config.recovery_pos_embed),
                                 _pixart_embed(n, text_len, config, m), _pixart_final(n, m))
    return MacReport("SparsePixArt", (H, W), (h, w), table, by_part=parts, params=pixart_params(config))


# ------------------------------------------------------------------------------------------------
# Latte / SparseLatte (sparsedit.families.latte.model): per sample, every block's cost is (rows) x (one sequence's
# cost): a spatial layer runs one sequence of N tokens per frame, a temporal layer one sequence of F
# frames per spatial location. The class variant's blocks are DiT blocks whose adaLN regressor runs
# once per row (as in the Latte release); the text variant's are PixArt blocks (adaLN-single) whose
# text cross-attention projects the caption once per row (as diffusers does).
# ------------------------------------------------------------------------------------------------


@dataclass
class VideoMacReport(MacReport):
    """A :class:`MacReport` of one video (per sample, per forward) with its frame counts."""

    frames: int = 1
    sparse_frames: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "frames": self.frames, "sparse_frames": self.sparse_frames}


def latte_params(config: LatteConfig) -> int:
    """Parameters of a Latte / SparseLatte (buffers: the sin-cos tables excluded)."""
    m = _pixart_dims(config)  # type: ignore[arg-type]  # reads the shared size fields only
    d, f = m.d, m.f
    embed = m.patch_in * d + d + (T_FREQ * d + d + d * d + d)
    kinds = latte_block_kinds(config.layout) if isinstance(config, SparseLatteConfig) else ["top"] * config.depth
    if config.text:
        embed += 6 * d * d + 6 * d + config.caption_channels * d + d + d * d + d
        final = d * m.patch_out + m.patch_out + 2 * d
        block = 4 * d * d + 2 * d * f + 11 * d + f  # qkv, proj, MLP, scale_shift_table
        text = 4 * d * d + 4 * d  # text q, kv, proj

        def params(kind: str, spatial: bool) -> int:
            extra = {"pool": -2 * d * d - 2 * d, "recover_t": 2 * d * d + 2 * d, "recover_s": 2 * d * d + 2 * d}
            return block + extra.get(kind, 0) + (text if spatial else 0)
    else:
        if config.num_classes:
            embed += (config.num_classes + int(config.class_dropout_prob > 0)) * d
        final = 2 * d * d + 2 * d + d * m.patch_out + m.patch_out
        dit_block = 10 * d * d + 2 * d * f + 11 * d + f

        def params(kind: str, spatial: bool) -> int:
            extra = {"pool": -2 * d * d - 2 * d, "recover_t": 2 * d * d + 2 * d, "recover_s": 2 * d * d + 2 * d}
            return dit_block + extra.get(kind, 0)
    return embed + final + sum(params(k, i % 2 == 0) for i, k in enumerate(kinds))


def _latte_block(kind: str, axis: str, spatial_source: bool, dims: tuple[int, int, int, int], upsample: tuple[bool, bool],
                 config: LatteConfig, m: _Dims, text_len: int) -> Cost:
    """Per-sample cost of one Latte layer; dims = (N, F, M, f), upsample = (space, time)."""
    n, frames, mtok, sf = dims
    if kind in ("pool", "dense", "top"):
        seq_kind, up = ("pool" if kind == "pool" else "top"), False
        seq_n, seq_m, rows = (n, n, frames) if axis == "s" else (frames, frames, n)
    elif kind == "gen_s":
        seq_kind, seq_n, seq_m, rows, up = "gen", n, mtok, frames, False
    elif kind == "gen_t":
        seq_kind, seq_n, seq_m, rows, up = "gen", frames, sf, mtok, False
    elif kind == "sparse":
        seq_kind, seq_n, seq_m, rows, up = ("sparse", mtok, mtok, sf, False) if axis == "s" else ("sparse", sf, sf, mtok, False)
    elif kind == "recover_t":
        seq_kind, seq_n, seq_m, rows, up = "recover", frames, sf, mtok, upsample[1]
    else:  # recover_s
        seq_kind, seq_n, seq_m, rows, up = "recover", n, mtok, frames, upsample[0]
    pos = getattr(config, "recovery_pos_embed", True)  # a dense Latte has no recovery blocks
    if config.text:
        if spatial_source:
            seq = _pixart_block(seq_kind, seq_n, seq_m, text_len, up, m, pos)
        else:
            dit = _block_cost(seq_kind, seq_n, seq_m, up, m, pos)
            seq = (dit[0] - 6 * m.d * m.d, dit[1], dit[2])
    else:
        seq = _block_cost(seq_kind, seq_n, seq_m, up, m, pos)
    return rows * seq[0], rows * seq[1], rows * seq[2]


def _latte_report(config: LatteConfig, grid: Grid, frames: int, sparse: tuple[Grid, int] | None,
                  text_len: int) -> VideoMacReport:
    H, W = _check_grid(grid, "grid")
    if frames < 1:
        raise SparseditError(f"frames must be positive, got {frames}")
    n, m = H * W, _pixart_dims(config)  # type: ignore[arg-type]
    d = m.d
    embed = frames * n * m.patch_in * d + T_FREQ * d + d * d
    embed_other = frames * n * d + (n * frames * d if frames > 1 else 0)  # spatial and temporal table adds
    if config.text:
        embed += 6 * d * d + text_len * (config.caption_channels * d + d * d)
        embed_other += text_len * d
    final = _pixart_final(n, m) if config.text else _final(n, m)  # once per frame
    table = {"embed": _row((embed, 0, embed_other)), "final": _row(tuple(frames * v for v in final))}  # type: ignore[arg-type]
    if sparse is None:
        kinds = ["top"] * config.depth
        axes = ["s" if i % 2 == 0 else "t" for i in range(config.depth)]
        dims, up = (n, frames, n, frames), (False, False)
        table["blocks"] = dict.fromkeys(KINDS, 0)
        segment = dict.fromkeys(kinds, "blocks")
    else:
        (h, w), sf = sparse
        _check_grid((h, w), "sparse grid")
        if h > H or w > W or not 1 <= sf <= frames:
            raise SparseditError(f"sparse tokens {h}x{w} x {sf} must lie within {H}x{W} x {frames}")
        assert isinstance(config, SparseLatteConfig)
        kinds = latte_block_kinds(config.layout)
        axes = latte_block_axes(kinds)
        dims, up = (n, frames, h * w, sf), ((h, w) != (H, W), sf != frames)
        for seg in ("pool", "sdtm", "top"):
            table[seg] = dict.fromkeys(KINDS, 0)
        segment = {"pool": "pool", "top": "top", **dict.fromkeys(("gen_s", "gen_t", "sparse", "recover_t",
                                                                  "recover_s", "dense"), "sdtm")}
    parts = dict.fromkeys(("gen", "sparse", "recover", "dense"), 0)
    for i, (kind, axis) in enumerate(zip(kinds, axes, strict=True)):
        cost = _latte_block(kind, axis, i % 2 == 0, dims, up, config, m, text_len)
        row = table[segment[kind]]
        for k, v in zip(KINDS, cost, strict=True):
            row[k] += v
        if sparse is not None and segment[kind] == "sdtm":
            parts[kind.split("_")[0]] += cost[0] + cost[1]
    table = {seg: table[seg] for seg in ("embed", "blocks", "pool", "sdtm", "top", "final") if seg in table}
    return VideoMacReport("SparseLatte" if sparse else "Latte", (H, W), None if sparse is None else sparse[0], table,
                          by_part=parts if sparse else {}, params=latte_params(config), frames=frames,
                          sparse_frames=None if sparse is None else sparse[1])


def latte_macs(config: LatteConfig, grid: Grid | None = None, frames: int | None = None,
               text_len: int = CAPTION_TOKENS) -> VideoMacReport:
    """MACs of one Latte forward for one video (default: the config's grid and ``num_frames``).

    ``text_len`` caption tokens for the text variant (ignored for the class variant).
    """
    if isinstance(config, SparseLatteConfig):
        raise SparseditError("latte_macs got a SparseLatte config; use sparse_latte_macs(config, sparse_grid, sparse_frames)")
    return _latte_report(config, config.grid if grid is None else grid,
                         config.num_frames if frames is None else frames, None, text_len)


def sparse_latte_macs(config: SparseLatteConfig, sparse_grid: Grid, sparse_frames: int, dense_grid: Grid | None = None,
                      frames: int | None = None, text_len: int = CAPTION_TOKENS) -> VideoMacReport:
    """MACs of one SparseLatte forward for one video with sparse tokens ``sparse_grid`` x ``sparse_frames``."""
    if not isinstance(config, SparseLatteConfig):
        raise SparseditError("sparse_latte_macs needs a SparseLatte config; use latte_macs for a Latte")
    return _latte_report(config, config.grid if dense_grid is None else dense_grid,
                         config.num_frames if frames is None else frames, (tuple(sparse_grid), int(sparse_frames)),
                         text_len)


def latte_schedule_macs(config: LatteConfig, timesteps: Iterable[int], text_len: int = CAPTION_TOKENS) -> dict[str, Any]:
    """:func:`schedule_macs` for Latte / SparseLatte: mean GMACs over the steps, per video, per forward.

    ``grids`` lists each distinct sparse token set as in :func:`schedule_macs`, with ``frames`` added.
    """
    steps = [int(t) for t in timesteps]
    if not steps:
        raise SparseditError("latte_schedule_macs got no timesteps; pass e.g. space_timesteps(1000, '250')")
    if isinstance(config, SparseLatteConfig):
        sets = [config.tokens_at(t) for t in steps]
        reports = {s: sparse_latte_macs(config, s[0], s[1], text_len=text_len) for s in set(sets)}
    else:
        sets = [(config.grid, config.num_frames)] * len(steps)
        reports = {sets[0]: latte_macs(config, text_len=text_len)}
    counts = {s: sets.count(s) for s in reports}
    per_step = [reports[s].total / G for s in sets]
    return {
        "gmacs": sum(c * reports[s].total for s, c in counts.items()) / len(steps) / G,
        "gmacs_min": min(per_step),
        "gmacs_max": max(per_step),
        "grids": [
            {"grid": list(s[0]), "frames": s[1], "tokens": s[0][0] * s[0][1] * s[1], "steps": counts[s],
             "gmacs": reports[s].total / G}
            for s in sorted(reports, key=lambda s: (s[0][0] * s[0][1] * s[1], s))
        ],
        "per_step": per_step,
        "steps": len(steps),
        "params": latte_params(config),
    }


# ------------------------------------------------------------------------------------------------
# cross-check against torch.utils.flop_counter
# ------------------------------------------------------------------------------------------------


def _attention_ops() -> tuple[Any, ...]:
    from torch.utils import flop_counter

    reg = flop_counter.flop_registry
    aten = torch.ops.aten
    ops = [aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
           aten._scaled_dot_product_cudnn_attention]
    cpu = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu is not None:
        ops.append(cpu)
    return tuple(op for op in ops if op in reg or op is cpu)


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict[Any, Any]:
    """FLOP formula for CPU flash SDPA, which torch's registry lacks (it would count 0).

    Passed to this FlopCounterMode only (``custom_mapping``), so torch's global registry is untouched;
    skipped if a torch version registers the op itself.
    """
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return {}
    return {op: _sdpa_cpu_flops}


def measure_macs_by_kind(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, **forward_kwargs: Any) -> dict[str, int]:
    """Run ``model(x, t, y, **forward_kwargs)`` under FlopCounterMode; MACs by kind for the whole batch.

    Returns ``{"linear": ..., "attention": ..., "total": ...}``: ``attention`` is what the SDPA ops
    (and any explicit bmm) count, ``linear`` the mm/addmm/convolution ops. FlopCounterMode counts 2
    FLOPs per MAC and only matmul-like ops, so ``total`` compares with :attr:`MacReport.total` (times
    the batch size). Works on CPU and on the meta device (no data needed with an explicit ``grid``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    attention_ops = set(_attention_ops()) | {torch.ops.aten.bmm, torch.ops.aten.baddbmm}
    with torch.no_grad(), counter:
        model(x, t, y, **forward_kwargs)
    counts = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in counts.items() if op in attention_ops)
    total = sum(counts.values())
    return {"linear": (total - attention) // 2, "attention": attention // 2, "total": total // 2}


def measure_macs(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, **forward_kwargs: Any) -> int:
    """MACs of ``model(x, t, y, **forward_kwargs)`` as counted by ``torch.utils.flop_counter``.

    For the whole batch of ``x`` (divide by the batch size for per-image numbers); matmul-like ops
    only (linear + attention). Attention run through CPU flash SDPA is counted, see
    :func:`measure_macs_by_kind`.
    """
    return measure_macs_by_kind(model, x, t, y, **forward_kwargs)["total"]


def forward_macs(config: Any, tokens: Any = None) -> MacReport:
    """MACs of one forward pass of one sample with the family's sparse token set ``tokens`` (None: dense)."""
    if isinstance(config, LatteConfig):
        return latte_macs(config) if tokens is None else sparse_latte_macs(config, *tokens)
    return model_macs(config, tokens)
