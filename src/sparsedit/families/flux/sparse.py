"""SparseFLUX: SparseDiT's layout (poolingformers, sparse-dense token modules, top blocks) and timestep-wise sparse
image grid on FLUX.1, its config, the RoPE positions of pooled tokens, and :func:`sparsify_flux` with the paper's
initialisation.

The layout counts (P, K, g, s, r, d, T) run over ``model.blocks``, FLUX's 19 double-stream then 38 single-stream
blocks, so an SDTM may hold blocks of either type (blocks in :mod:`sparsedit.families.flux.sparse_blocks`). The
text tokens stay dense in every block; the image tokens are pooled to an ``h x w`` grid inside each SDTM. FLUX has
no additive position table: positions are RoPE, and a pooled token sits at the mean coordinates of the dense cells
it averages. FLUX is a flow-matching model called with ``t = sigma * 1000``; the pruning schedule reads that
timestep through :func:`sparsedit.core.schedule.discrete_timestep`, as SparseDiT does, so the noisiest steps are the
sparsest. Design and reasons: docs/mmdit_flux_sparse.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsedit.core.layout import Layout, SparseLayoutConfig, block_kinds, layout_fields, parse_layout
from sparsedit.errors import SparseditError
from sparsedit.families.dit.sparse import SparseDiT
from sparsedit.families.dit.sparsify import InitRule, build_sparse, default_rule
from sparsedit.families.flux.model import Flux, FluxConfig, Rope, rope_table, unpack_latents
from sparsedit.families.flux.sparse_blocks import BLOCKS, DoublePoolingformer

Grid = tuple[int, int]

# The default layout of both released FLUX.1 transformers (57 blocks): 2 poolingformers, 4 SDTMs of (1 gen, 9 sparse,
# 1 recover, 1 dense) = 48, 7 top blocks. Argued from the MAC budget in docs/mmdit_flux_sparse.md; not tuned on FLUX
# weights.
FLUX_LAYOUT = "2,4,1,9,1,1,7"
SPARSE_FLUX_LAYOUTS: dict[str, str] = {"FLUX.1-dev": FLUX_LAYOUT, "FLUX.1-schnell": FLUX_LAYOUT}


@dataclass
class SparseFluxConfig(SparseLayoutConfig, FluxConfig):
    """A FLUX config plus the SparseDiT layout over its 57 blocks (double-stream first), the pruning-rate range and
    the sparse-grid options. The layout defaults are FLUX.1's (:data:`FLUX_LAYOUT`).

    ``recovery_pos_embed`` is always False: FLUX has no additive position table for a recovery merge to re-add (its
    positions are RoPE, applied in every attention), so True is refused.
    """

    sparse_blocks: int = 9
    top_blocks: int = 7
    recovery_pos_embed: bool = False
    model_type: str = field(default="SparseFLUX", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recovery_pos_embed:
            raise SparseditError("recovery_pos_embed must be false for FLUX: it has no position table to re-add "
                                 "(positions are RoPE); pass --no-recovery-pos-embed or drop the option")

    @classmethod
    def from_flux(cls, config: FluxConfig, layout: str | Layout, **kwargs: Any) -> SparseFluxConfig:
        """The SparseFLUX config of a dense FLUX config, a layout and schedule options."""
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(FluxConfig) if f.init}
        return cls(**base, **layout_fields(parse_layout(layout, config.patch_size)), **kwargs)


# ------------------------------------------------------------------------------------------------
# positions of pooled tokens
# ------------------------------------------------------------------------------------------------


def pooled_coordinates(dense: int, sparse: int) -> list[float]:
    """The mean coordinate of each of the ``sparse`` cells adaptive average pooling makes of ``dense`` positions.

    Cell i covers [floor(i * dense / sparse), ceil((i + 1) * dense / sparse)), PyTorch's adaptive pooling
    boundaries, so its mean is (start + stop - 1) / 2: a whole or half-whole number, exact in float32."""
    return [(i * dense // sparse + -(-(i + 1) * dense // sparse) - 1) / 2 for i in range(sparse)]


def sparse_position_ids(dense_grid: Grid, sparse_grid: Grid, text_len: int,
                        device: torch.device | str | None = None) -> Tensor:
    """(L + M, 3) RoPE positions of [text; sparse image tokens]: text at (0, 0, 0), the sparse token covering rows
    [a, b) x columns [c, d) of the dense grid at (0, mean row, mean column). Equal grids give the dense
    :func:`~sparsedit.families.flux.model.position_ids`."""
    (H, W), (h, w) = dense_grid, sparse_grid
    rows = torch.tensor(pooled_coordinates(H, h), device=device)  # (h,)
    cols = torch.tensor(pooled_coordinates(W, w), device=device)  # (w,)
    ids = torch.zeros(text_len + h * w, 3, device=device)
    ids[text_len:, 1] = rows.repeat_interleave(w)
    ids[text_len:, 2] = cols.repeat(h)
    return ids


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


class SparseFlux(Flux):
    """FLUX.1 with poolingformers, SDTMs over the image tokens and a timestep-wise sparse image grid.

    ``forward(x, t, encoder_hidden_states, pooled_projections, guidance=None, grid=None, keep_ratio=None)``:
    ``t = sigma * 1000``; the sparse grid comes from the schedule at the batch's timesteps (all items must share one
    grid) unless ``grid=(h, w)`` or ``keep_ratio=M/N`` overrides it (:meth:`SparseDiT.sparse_grid`).
    """

    config: SparseFluxConfig

    sparse_grid = SparseDiT.sparse_grid  # reads only config.schedule: the same choice as SparseDiT's

    def build_blocks(self, config: FluxConfig) -> nn.ModuleList:
        assert isinstance(config, SparseFluxConfig)
        self.kinds = block_kinds(config.layout, config.extra_recovery)
        d, heads, hidden = config.hidden_size, config.num_heads, config.mlp_hidden
        blocks = []
        for i, kind in enumerate(self.kinds):
            cls = BLOCKS[kind][0 if i < config.depth_double else 1]  # the block type the layer has in FLUX
            extra = {"upsample": config.upsample} if kind in ("recover", "recover*") else {}
            blocks.append(cls(d, heads, hidden, **extra))
        return nn.ModuleList(blocks)

    def sparse_rope(self, dense_grid: Grid, sparse_grid: Grid, text_len: int, device: torch.device) -> Rope:
        """(cos, sin) of [text; sparse image tokens] at the pooled positions, each (L + M, Dh), in float64 then
        float32 as the dense table (:func:`~sparsedit.families.flux.model.rope_table`)."""
        ids = sparse_position_ids(dense_grid, sparse_grid, text_len, device)
        return rope_table(ids, self.config.axes_dims_rope, self.config.rope_theta)

    def run_block(self, block: nn.Module, *args: Any) -> tuple[Tensor, Tensor]:
        """Call ``block``, recomputing its activations in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor,  # type: ignore[override]
                pooled_projections: Tensor, guidance: Tensor | None = None, grid: Grid | None = None,
                keep_ratio: float | None = None) -> Tensor:
        """x: (B, C, H, W), t: (B,) = sigma * 1000, encoder_hidden_states: (B, L, C_text), pooled_projections:
        (B, C_pooled), guidance: (B,) or None -> (B, C, H, W)."""
        dense_grid, h, txt, vec, t = self.embed(x, t, encoder_hidden_states, pooled_projections, guidance)
        sparse_grid = self.sparse_grid(t, dense_grid, grid, keep_ratio)
        length = txt.shape[1]
        dense_rope = self.rope(dense_grid, length, x.device)  # 2 x (L + N, Dh)
        sparse_rope = dense_rope if sparse_grid == dense_grid else self.sparse_rope(dense_grid, sparse_grid,
                                                                                    length, x.device)  # (L + M, Dh)
        dense_in = xs = h
        run = self.run_block
        for block, kind in zip(self.blocks, self.kinds, strict=True):
            if kind == "gen":
                dense_in = h  # kept for the recovery block's merge and the gen+ blocks' keys
                xs, txt = run(block, None, txt, vec, dense_in, dense_grid, sparse_grid, True, sparse_rope, dense_rope)
            elif kind == "gen+":
                xs, txt = run(block, xs, txt, vec, dense_in, dense_grid, sparse_grid, False, sparse_rope, dense_rope)
            elif kind == "sparse":
                xs, txt = run(block, xs, txt, vec, sparse_rope)  # (B, M, D): a FLUX block on text + M tokens
            elif kind == "recover":
                h, txt = run(block, dense_in, txt, vec, xs, dense_grid, sparse_grid, dense_rope, sparse_rope)
            elif kind == "recover*":  # merges the SDTM input with the previous recovery output, attends to it
                h, txt = run(block, dense_in, txt, vec, h, dense_grid, dense_grid, dense_rope, dense_rope)
            elif kind == "recover+":
                h, txt = run(block, h, txt, vec, xs, dense_rope, sparse_rope)  # (B, N, D)
            else:  # pool, dense, top
                h, txt = run(block, h, txt, vec, dense_rope)  # (B, N, D)
        out = self.final_layer(h, vec)  # (B, N, p*p*C)
        return unpack_latents(out, dense_grid, self.config.patch_size)  # (B, C, H, W)


# ------------------------------------------------------------------------------------------------
# FLUX -> SparseFLUX (paper Sec. 3.3)
# ------------------------------------------------------------------------------------------------


def flux_init_rules(config: SparseFluxConfig, target_keys: list[str]) -> list[InitRule]:
    """One rule per SparseFLUX state-dict key: layer i <- layer i of the FLUX.

    Double-stream poolingformers: ``img_attn.kv`` <- rows [D, 3D) of ``img_attn.qkv`` (image K and V: the text
    queries need the image keys); W1 (``merge_sparse``) = 0, W2 (``merge_dense``) = I with bias 0; every other tensor
    (embedders, both streams' weights, q/k norms, single-stream ``linear1`` / ``linear2``, adaLN, final layer) is a
    copy of the same key.
    """
    d = config.hidden_size
    rules: list[InitRule] = []
    for key in target_keys:
        if ".img_attn.kv." in key:
            rules.append(InitRule(key, "slice", key.replace(".img_attn.kv.", ".img_attn.qkv."), (d, 3 * d),
                                      "K, V of qkv"))
        else:
            rules.append(default_rule(key))
    return rules


def dropped_keys(model: SparseFlux) -> set[str]:
    """The source tensors a conversion leaves unused: the image query norms of the double-stream poolingformers
    (their ``qkv`` query rows are dropped by the slices above). A single-stream poolingformer drops nothing: its
    text queries use the shared ``linear1`` query rows and query norm."""
    return {f"blocks.{i}.img_attn.norm.query_norm.scale" for i, block in enumerate(model.blocks)
            if isinstance(block, DoublePoolingformer)}


def sparsify_flux(model: Flux, layout: str | Layout, r_min: float = 0.61, r_max: float = 0.86,
                  **options: Any) -> SparseFlux:
    """FLUX -> SparseFLUX with the paper's initialisation (:func:`flux_init_rules`); in the source's dtype and
    device, in eval mode. ``options``: ``num_pieces``, ``num_timesteps``, ``upsample``, ``extra_recovery``
    (``recovery_pos_embed`` only as False)."""
    sparse, _ = sparsify_flux_with_rules(model, layout, r_min, r_max, **options)
    return sparse


def sparsify_flux_with_rules(model: Flux, layout: str | Layout, r_min: float = 0.61, r_max: float = 0.86,
                             **options: Any) -> tuple[SparseFlux, list[InitRule]]:
    """:func:`sparsify_flux`, also returning the tensor-by-tensor initialisation map."""
    if type(model) is not Flux:
        raise SparseditError(f"sparsify_flux needs a dense FLUX, got {type(model).__name__}; pass the original FLUX")
    if layout is None:
        raise SparseditError(f"sparsifying a FLUX needs a layout 'P,K,g,s,r,d,T', e.g. {FLUX_LAYOUT} for FLUX.1's "
                             "57 blocks")
    config = SparseFluxConfig.from_flux(model.config, layout, r_min=r_min, r_max=r_max, **options)
    return build_sparse(model, SparseFlux, config, flux_init_rules, dropped_keys, "FLUX")  # type: ignore[return-value]
