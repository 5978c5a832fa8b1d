"""SparseWan: SparseDiT's layout (poolingformers, sparse-dense token modules, top blocks) and timestep-wise sparse
video token set on Wan 2.1 / 2.2 (each Wan2.2-A14B expert on its own), its config, presets and :func:`sparsify_wan`
with the paper's initialisation. Design and reasons: docs/wan.md, "SparseWan".

The layout counts (P, K, g, s, r, d, T) run over ``model.blocks``. The dense tokens are the (F, H, W) patch volume
(21 x 30 x 52 = 32,760 at 480p / 81 frames); inside each SDTM they are average-pooled to an (f, h, w) volume whose
size comes from the pruning rate r(t) of the whole token set, split between time and space in log space by
``temporal_share`` (:func:`sparsedit.families.latte.sparse.split_keep_ratio`). Wan is a flow-matching model called
with ``t = sigma * 1000``; the schedule reads that timestep through
:func:`sparsedit.core.schedule.discrete_timestep`, so the noisiest steps are the sparsest. Pooled tokens take RoPE at
their cells' mean coordinates (blocks and token-set helpers: :mod:`sparsedit.families.wan.sparse_blocks`).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsedit.core.layout import Layout, SparseLayoutConfig, block_kinds, layout_fields, parse_layout, timestep_bounds
from sparsedit.core.schedule import Piece, discrete_timestep, pruning_rate
from sparsedit.errors import SparseditError
from sparsedit.families.dit.sparsify import InitRule, build_sparse, default_rule
from sparsedit.families.latte.sparse import VideoPieceSampler, split_keep_ratio
from sparsedit.families.wan.model import Grid, Wan, WanConfig
from sparsedit.families.wan.sparse_blocks import BLOCKS, TokenSet, WanPoolingformer, pooled_rope

# Default layouts (docs/wan.md, "Default layouts and rates"): P + K (g + s + r + d) + T = depth. Argued from the MAC
# budget at 480p / 81 frames; not tuned on Wan weights.
WAN_1_3B_LAYOUT = "2,4,1,3,1,1,4"  # 30 blocks: 2 + 4 x 6 + 4
WAN_14B_LAYOUT = "2,4,1,5,1,1,6"  # 40 blocks: 2 + 4 x 8 + 6
SPARSE_WAN_LAYOUTS: dict[str, str] = {
    "Wan2.1-T2V-1.3B": WAN_1_3B_LAYOUT,
    "Wan2.1-T2V-14B": WAN_14B_LAYOUT,
    "Wan2.1-I2V-14B-480P": WAN_14B_LAYOUT,
    "Wan2.2-T2V-A14B": WAN_14B_LAYOUT,  # either expert: sparsify each on its own (docs/wan.md)
}
# Frames keep k ** (1/4), each spatial side k ** (3/8) of a total keep ratio k = 1 - r: time is pruned less than
# space (docs/wan.md, "The sparse token set").
TEMPORAL_SHARE = 0.25
# Wan2.2-T2V-A14B switches experts at boundary_ratio 0.875: the high-noise expert runs the steps t >= 875. Named
# layouts for `sparsify` / `train --layout`: the 14B layout, training drawn from the expert's own timesteps.
A14B_BOUNDARY = 875
EXPERT_LAYOUTS: dict[str, tuple[str, tuple[int, int]]] = {
    "SparseWan2.2-A14B-high": (WAN_14B_LAYOUT, (A14B_BOUNDARY, 1000)),
    "SparseWan2.2-A14B-low": (WAN_14B_LAYOUT, (0, A14B_BOUNDARY)),
}


@dataclass
class SparseWanConfig(SparseLayoutConfig, WanConfig):
    """A Wan config plus the SparseDiT layout over its blocks, the pruning-rate range and its split between time and
    space. The layout fields default to Wan2.1-T2V-1.3B's (:data:`WAN_1_3B_LAYOUT`, 30 blocks).

    ``temporal_share`` splits the keep ratio ``k = 1 - r(t)`` of the F x H x W token volume: frames keep
    ``k ** temporal_share``, the grid ``k ** (1 - temporal_share)`` (1/3: every axis shrinks by the same factor).
    ``recovery_pos_embed`` is always False (Wan's positions are RoPE: no table to re-add) and ``num_pieces`` always
    None (the token set comes from r(t) at every timestep, as SparseLatte's; training draws runs of one token set).
    ``train_timesteps`` ``(start, end)``: training draws its schedule steps from ``[start, end)`` only, the steps a
    Wan2.2-A14B expert runs (high noise: ``(875, 1000)``, low noise: ``(0, 875)``); None: all of them. Sampling is
    not restricted (the pipeline picks the expert).
    """

    pool_blocks: int = 2
    num_sdtm: int = 4
    gen_blocks: int = 1
    sparse_blocks: int = 3
    recovery_blocks: int = 1
    dense_blocks: int = 1
    top_blocks: int = 4
    temporal_share: float = TEMPORAL_SHARE
    train_timesteps: tuple[int, int] | None = None
    recovery_pos_embed: bool = False
    model_type: str = field(default="SparseWan", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recovery_pos_embed:
            raise SparseditError("recovery_pos_embed must be false for Wan: it has no position table to re-add "
                                 "(positions are RoPE); pass --no-recovery-pos-embed or drop the option")
        if self.num_pieces is not None:
            raise SparseditError("num_pieces does not apply to SparseWan: its token set follows r(t) at every "
                                 "timestep (training draws runs of one token set); drop --num-pieces")
        share = self.temporal_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise SparseditError(f"temporal_share must be a number in [0, 1] (1/3 shrinks every axis alike), got {share!r}")
        if self.train_timesteps is not None:
            span = tuple(self.train_timesteps)
            if len(span) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in span) \
                    or not 0 <= span[0] < span[1] <= self.num_timesteps:
                raise SparseditError(f"train_timesteps must be (start, end) with 0 <= start < end <= "
                                     f"{self.num_timesteps}, e.g. (875, 1000) for Wan2.2-A14B's high-noise expert; "
                                     f"got {self.train_timesteps!r}")
            self.train_timesteps = span  # type: ignore[assignment]  # a JSON list -> a tuple

    def tokens_at(self, t: int, dense_grid: Grid | None = None, frames: int | None = None) -> TokenSet:
        """The sparse token set ((h, w), f) at integer timestep ``t``: r(t) of the schedule split by
        ``temporal_share`` (defaults: the config's grid and token frames)."""
        dense_grid = self.grid if dense_grid is None else dense_grid
        frames = self.token_frames if frames is None else frames
        return split_keep_ratio(1.0 - self.schedule.rate(t), dense_grid, frames, self.temporal_share)

    @classmethod
    def from_wan(cls, config: WanConfig, layout: str | Layout, **kwargs: Any) -> SparseWanConfig:
        """The SparseWan config of a dense Wan config, a layout (counts, or an expert's name in
        :data:`EXPERT_LAYOUTS`: its counts and ``train_timesteps``) and schedule options."""
        if isinstance(layout, str) and layout in EXPERT_LAYOUTS:
            layout, span = EXPERT_LAYOUTS[layout]
            kwargs = {"train_timesteps": span, **kwargs}
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(WanConfig) if f.init}
        return cls(**base, **layout_fields(parse_layout(layout, config.patch_size)), **kwargs)


class SparseWan(Wan):
    """Wan with poolingformers, SDTMs over the video tokens and a timestep-wise sparse token set.

    ``forward(x, t, encoder_hidden_states, encoder_hidden_states_image=None, grid=None, frames=None,
    keep_ratio=None)``: ``t = sigma * 1000``; the sparse set comes from the schedule at the batch's timesteps (all
    items must share one set) unless ``grid=(h, w)`` / ``frames=f`` or ``keep_ratio=M/N`` overrides it.
    """

    config: SparseWanConfig

    def build_blocks(self, config: WanConfig) -> nn.ModuleList:
        assert isinstance(config, SparseWanConfig)
        self.kinds = block_kinds(config.layout, config.extra_recovery)
        args = (config.hidden_size, config.num_heads, config.ffn_dim, config.eps, config.cross_attn_norm,
                config.image_conditioned)
        blocks = []
        for kind in self.kinds:
            extra = {"upsample": config.upsample} if kind in ("recover", "recover*") else {}
            blocks.append(BLOCKS[kind](*args, **extra))  # type: ignore[arg-type]
        return nn.ModuleList(blocks)

    def sparse_tokens(self, t: Tensor, dense_grid: Grid, frames: int, grid: Grid | None = None,
                      sparse_frames: int | None = None, keep_ratio: float | None = None) -> TokenSet:
        """The sparse ((h, w), f) of a batch: explicit values, else ``keep_ratio``, else the schedule at ``t``."""
        cfg = self.config
        H, W = dense_grid
        if keep_ratio is not None:
            auto = split_keep_ratio(keep_ratio, dense_grid, frames, cfg.temporal_share)
        elif grid is None or sparse_frames is None:
            lo, hi = timestep_bounds(t, cfg.num_timesteps)  # r(t) is monotone: the extremes decide
            auto = cfg.tokens_at(lo, dense_grid, frames)
            other = cfg.tokens_at(hi, dense_grid, frames)
            if other != auto:
                raise SparseditError(f"this batch mixes timesteps {lo} and {hi}, which use sparse token sets {auto} and "
                                     f"{other}; draw a batch's timesteps from one piece or pass grid=(h, w), frames=f")
        else:
            auto = (dense_grid, frames)
        hw = auto[0] if grid is None else (int(grid[0]), int(grid[1]))
        f = auto[1] if sparse_frames is None else int(sparse_frames)
        if not (1 <= hw[0] <= H and 1 <= hw[1] <= W and 1 <= f <= frames):
            raise SparseditError(f"sparse tokens {hw[0]}x{hw[1]} x {f} frames must lie within {H}x{W} x {frames} "
                                 "(the dense token volume)")
        return hw, f

    def run_block(self, block: nn.Module, *args: Any) -> Tensor:
        """Call ``block``, recomputing its activations in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor,  # type: ignore[override]
                encoder_hidden_states_image: Tensor | None = None, grid: Grid | None = None,
                frames: int | None = None, keep_ratio: float | None = None) -> Tensor:
        """x: (B, C_in, F, H, W), t: (B,) = sigma * 1000, encoder_hidden_states: (B, L, 4096),
        encoder_hidden_states_image: (B, 257, 1280) or None -> (B, C_out, F, H, W)."""
        inp = self.embed(x, t, encoder_hidden_states, encoder_hidden_states_image)  # checks the inputs
        steps = torch.as_tensor(t, device=x.device).reshape(-1)
        dense_set: TokenSet = (inp.grid, inp.frames)
        sparse_set = self.sparse_tokens(steps, inp.grid, inp.frames, grid, frames, keep_ratio)
        dense_rope = self.rope(inp.frames, inp.grid, x.device)  # 2 x (N, Dh/2)
        sparse_rope = dense_rope if sparse_set == dense_set else pooled_rope(dense_set, sparse_set,
                                                                               self.config.rope_axes, x.device)
        ctx, img, e = inp.context, inp.image_tokens, inp.e
        h = dense_in = xs = inp.tokens  # (B, N, D)
        run = self.run_block
        for block, kind in zip(self.blocks, self.kinds, strict=True):
            if kind == "gen":
                dense_in = h  # kept for the recovery merge and the gen+ blocks' keys
                xs = run(block, None, ctx, img, e, dense_in, dense_set, sparse_set, True, sparse_rope, dense_rope)
            elif kind == "gen+":
                xs = run(block, xs, ctx, img, e, dense_in, dense_set, sparse_set, False, sparse_rope, dense_rope)
            elif kind == "sparse":
                xs = run(block, xs, ctx, img, e, sparse_rope)  # (B, M, D): the Wan block on M tokens
            elif kind == "recover":
                h = run(block, dense_in, ctx, img, e, xs, dense_set, sparse_set, dense_rope, sparse_rope)  # (B, N, D)
            elif kind == "recover*":  # merges the SDTM input with the previous recovery output, attends to it
                h = run(block, dense_in, ctx, img, e, h, dense_set, dense_set, dense_rope, dense_rope)
            elif kind == "recover+":
                h = run(block, h, ctx, img, e, xs, dense_rope, sparse_rope)  # (B, N, D)
            else:  # pool, dense, top
                h = run(block, h, ctx, img, e, dense_rope)  # (B, N, D)
        return self.unpatchify(self.head(h, inp.temb), inp.frames, inp.grid)  # (B, C_out, F, H, W)


# ------------------------------------------------------------------------------------------------
# Wan -> SparseWan (paper Sec. 3.3)
# ------------------------------------------------------------------------------------------------


def wan_init_rules(config: SparseWanConfig, target_keys: list[str]) -> list[InitRule]:
    """One rule per SparseWan state-dict key: layer i <- layer i of the Wan. W1 (``merge_sparse``) = 0, W2
    (``merge_dense``) = I with bias 0; every other tensor (embedders, every block's q / k / v / o, norms, cross-
    attention, FFN and modulation table, a poolingformer's ``self_attn.v`` / ``self_attn.o``, the head) is a copy
    of the same key: Wan's q, k and v are separate Linears, so nothing is sliced."""
    return [default_rule(key) for key in target_keys]


def dropped_keys(model: SparseWan) -> set[str]:
    """The only source tensors a conversion leaves unused: the poolingformers' self-attention q / k projections and
    their RMS norms (the uniform map has no scores)."""
    names = ("q.weight", "q.bias", "k.weight", "k.bias", "norm_q.weight", "norm_k.weight")
    return {f"blocks.{i}.self_attn.{n}" for i, block in enumerate(model.blocks) if isinstance(block, WanPoolingformer)
            for n in names}


def sparsify_wan(model: Wan, layout: str | Layout, r_min: float = 0.61, r_max: float = 0.86,
                 **options: Any) -> SparseWan:
    """Wan -> SparseWan with the paper's initialisation (:func:`wan_init_rules`), on the source's device, every
    copied tensor in its source's dtype (so the float32 tensors of a bfloat16 Wan stay float32), the merges in the
    compute dtype, in eval mode. ``options``: ``temporal_share``, ``num_timesteps``, ``upsample``,
    ``extra_recovery`` (``recovery_pos_embed`` only as False)."""
    sparse, _ = sparsify_wan_with_rules(model, layout, r_min, r_max, **options)
    return sparse


def sparsify_wan_with_rules(model: Wan, layout: str | Layout, r_min: float = 0.61, r_max: float = 0.86,
                            **options: Any) -> tuple[SparseWan, list[InitRule]]:
    """:func:`sparsify_wan`, also returning the tensor-by-tensor initialisation map."""
    if type(model) is not Wan:
        raise SparseditError(f"sparsify_wan needs a dense Wan, got {type(model).__name__}; pass the original Wan")
    if layout is None:
        raise SparseditError(f"sparsifying a Wan needs a layout 'P,K,g,s,r,d,T', e.g. {WAN_1_3B_LAYOUT} for the 30 "
                             f"blocks of Wan2.1-T2V-1.3B or {WAN_14B_LAYOUT} for the 40 of a 14B")
    config = SparseWanConfig.from_wan(model.config, layout, r_min=r_min, r_max=r_max, **options)
    # the float32 tensors of a bfloat16 Wan stay float32, the merges take its compute dtype
    return build_sparse(model, SparseWan, config, wan_init_rules, dropped_keys, "Wan",  # type: ignore[return-value]
                        compute_dtype=model.dtype)


class WanPieceSampler(VideoPieceSampler):
    """SparseLatte's video piece sampler (one run of timesteps with one token set per batch, t uniform) over
    ``config.train_timesteps`` when set: a piece with probability (its length inside the range) / (the range's
    length), then every t of the batch uniform inside it. Over all timesteps it draws exactly what
    :class:`VideoPieceSampler` draws."""

    def __init__(self, config: SparseWanConfig, generator: torch.Generator | None = None):
        super().__init__(config, generator)  # type: ignore[arg-type]  # reads schedule, grid and tokens_at only
        T = config.num_timesteps
        self.span = config.train_timesteps or (0, T)
        lo, hi = self.span
        self.pieces = [dataclasses.replace(p, t_start=max(p.t_start, lo), t_end=min(p.t_end, hi),
                                           rate=pruning_rate((max(p.t_start, lo) + min(p.t_end, hi) - 1) / 2,
                                                             config.r_min, config.r_max, T))
                       for p in self.pieces if p.t_start < hi and p.t_end > lo]
        self._starts = [p.t_start for p in self.pieces]

    def piece_probabilities(self) -> list[float]:
        lo, hi = self.span
        return [p.length / (hi - lo) for p in self.pieces]

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> tuple[Tensor, Piece]:
        lo, hi = self.span
        if (lo, hi) == (0, self.schedule.num_timesteps):
            return super().sample(batch_size, device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SparseditError(f"batch_size must be a positive integer, got {batch_size!r}")
        gen = self.generator
        rng = gen.device if gen is not None else torch.device("cpu")
        u = int(torch.randint(lo, hi, (1,), generator=gen, device=rng).item())
        piece = self.pieces[bisect.bisect_right(self._starts, u) - 1]
        t = torch.randint(piece.t_start, piece.t_end, (batch_size,), generator=gen, device=rng, dtype=torch.long)
        return (t if device is None else t.to(device)), piece


def sparse_wan_preset(name: str) -> tuple[str, str] | None:
    """``SparseWan2.1-T2V-1.3B`` -> (``Wan2.1-T2V-1.3B``, its default layout); None for other names."""
    dense = name[len("Sparse"):] if name.startswith("Sparse") else None
    return (dense, SPARSE_WAN_LAYOUTS[dense]) if dense in SPARSE_WAN_LAYOUTS else None


def schedule_step(config: SparseWanConfig, t: float) -> int:
    """The integer schedule step of a model timestep (fractional, or ``sigma * 1000``)."""
    return discrete_timestep(float(t), config.num_timesteps)
