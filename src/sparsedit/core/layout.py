"""The SparseDiT layout shared by every family: block counts (P, K, g, s, r, d, T), the paper's layouts,
the kind of every layer, the config mixin holding layout and pruning-rate fields, and the timestep bounds
that pick a sparse token set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sparsedit.core.blocks import EXTRA_RECOVERY_MODES, UPSAMPLE_MODES
from sparsedit.core.schedule import PruningSchedule, discrete_timestep
from sparsedit.errors import SparseditError


@dataclass(frozen=True)
class Layout:
    """Block counts: P poolingformers, K SDTMs of (g gen, s sparse, r recovery, d dense), T top blocks."""

    pool: int
    sdtm: int
    gen: int
    sparse: int
    recovery: int
    dense: int
    top: int

    @property
    def depth(self) -> int:
        return self.pool + self.sdtm * (self.gen + self.sparse + self.recovery + self.dense) + self.top

    def feature_layers(self) -> list[int]:
        """Layers whose output is the whole dense token set, as in the source's same layer: the last block
        of every SDTM and the last block (the input of the final layer). Feature distillation taps these."""
        ends = [self.pool + k * (self.gen + self.sparse + self.recovery + self.dense) - 1 for k in range(1, self.sdtm + 1)]
        return sorted({*ends, self.depth - 1})

    def as_string(self) -> str:
        return ",".join(str(v) for v in (self.pool, self.sdtm, self.gen, self.sparse, self.recovery, self.dense, self.top))


# The paper's layouts (Sec. 4.1) plus our choices for the sizes it does not cover (S shares B's
# depth; L: 24 layers as 2 + 4 x (1, 2, 1, 1) + 2).
LAYOUTS: dict[str, Layout] = {
    "SparseDiT-XL": Layout(pool=2, sdtm=4, gen=1, sparse=3, recovery=1, dense=1, top=2),
    "SparseDiT-L": Layout(pool=2, sdtm=4, gen=1, sparse=2, recovery=1, dense=1, top=2),
    "SparseDiT-B": Layout(pool=1, sdtm=2, gen=1, sparse=2, recovery=1, dense=1, top=1),
    "SparseDiT-S": Layout(pool=1, sdtm=2, gen=1, sparse=2, recovery=1, dense=1, top=1),
}
LAYOUT_HELP = "a preset (" + ", ".join(f"{k}/2" for k in LAYOUTS) + ") or 7 counts 'P,K,g,s,r,d,T' such as 2,4,1,3,1,1,2"


def parse_layout(spec: str | Layout, patch_size: int | None = None) -> Layout:
    """``"SparseDiT-XL/2"`` (the patch suffix is optional) or ``"P,K,g,s,r,d,T"`` -> :class:`Layout`.

    A patch suffix must be the model's ``patch_size`` when that is given: ``SparseDiT-B/4`` names another model.
    """
    if isinstance(spec, Layout):
        return spec
    if not isinstance(spec, str):
        raise SparseditError(f"a layout is a preset name or 'P,K,g,s,r,d,T', not a {type(spec).__name__}; use "
                             f"{LAYOUT_HELP}")
    name, _, patch = spec.partition("/")
    if patch and (not patch.isdigit() or (patch_size is not None and int(patch) != patch_size)):
        raise SparseditError(f"layout {spec!r} is for patch size {patch}, but the model's patch size is {patch_size}; "
                             f"write {name}/{patch_size} or {name}")
    if name in LAYOUTS:
        return LAYOUTS[name]
    parts = spec.replace(" ", "").split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 7 or min(values) < 0:
        raise SparseditError(f"unknown layout {spec!r}; use {LAYOUT_HELP}")
    return Layout(*values)


def layout_fields(layout: Layout) -> dict[str, int]:
    """A :class:`Layout` as the config fields that store it (``pool_blocks=P``, ``num_sdtm=K``, ...)."""
    return dict(pool_blocks=layout.pool, num_sdtm=layout.sdtm, gen_blocks=layout.gen, sparse_blocks=layout.sparse,
                recovery_blocks=layout.recovery, dense_blocks=layout.dense, top_blocks=layout.top)


@dataclass
class SparseLayoutConfig:
    """Mixin: the SparseDiT layout, pruning-rate range and sparse-grid fields, with their validation.

    Put it before a dense config class (``class SparseXConfig(SparseLayoutConfig, XConfig)``): its
    fields then follow the dense ones and ``__post_init__`` validates the dense fields first. Shared by
    SparseDiT and SparsePixArt, whose sparse fields mean the same.

    Variant switches (docs/official.md): ``recovery_pos_embed`` re-adds the position table in every
    recovery merge (the paper; False = the authors' code); ``extra_recovery`` says what the 2nd..
    recovery blocks of an SDTM are: "cross" (ours: cross-attention to the sparse tokens, no merge) or
    "repeat" (the authors' code: the recovery block again, merging its own W1/W2 and attending to the
    dense tokens). Their defaults are what sparsedit computed before the switches existed.
    """

    if TYPE_CHECKING:  # provided by the dense config (not fields of the mixin)
        depth: int

    # Fields that checkpoints written before they existed lack; their defaults are that older behaviour.
    # Every other field must be in a config.json (see checkpoint.config_from_dict).
    OPTIONAL_FIELDS = frozenset({"recovery_pos_embed", "extra_recovery"})

    pool_blocks: int = 2
    num_sdtm: int = 4
    gen_blocks: int = 1
    sparse_blocks: int = 3
    recovery_blocks: int = 1
    dense_blocks: int = 1
    top_blocks: int = 2
    r_min: float = 0.61
    r_max: float = 0.86
    num_pieces: int | None = None
    num_timesteps: int = 1000
    upsample: str = "nearest"
    recovery_pos_embed: bool = True
    extra_recovery: str = "cross"

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # the dense config's checks
        layout = self.layout
        if layout.sdtm and (layout.gen < 1 or layout.recovery < 1):
            raise SparseditError("an SDTM needs at least one generation and one recovery block (g >= 1, r >= 1)")
        if layout.depth != self.depth:
            raise SparseditError(
                f"layout {layout.as_string()} has {layout.depth} blocks but the model has depth {self.depth}; "
                "make P + K*(g+s+r+d) + T equal the source depth"
            )
        if self.upsample not in UPSAMPLE_MODES:
            raise SparseditError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {self.upsample!r}")
        if self.extra_recovery not in EXTRA_RECOVERY_MODES:
            raise SparseditError(f"extra_recovery must be one of {', '.join(EXTRA_RECOVERY_MODES)}, "
                                 f"not {self.extra_recovery!r}")
        if not isinstance(self.recovery_pos_embed, bool):
            raise SparseditError(f"recovery_pos_embed must be true or false, not {self.recovery_pos_embed!r}")
        self.schedule  # validates the rates  # noqa: B018

    @property
    def layout(self) -> Layout:
        return Layout(self.pool_blocks, self.num_sdtm, self.gen_blocks, self.sparse_blocks, self.recovery_blocks,
                      self.dense_blocks, self.top_blocks)

    @property
    def schedule(self) -> PruningSchedule:
        return PruningSchedule(self.r_min, self.r_max, self.num_timesteps, self.num_pieces)


def timestep_bounds(t: Tensor, num_timesteps: int) -> tuple[int, int]:
    """(min, max) of a batch's timesteps as schedule timesteps, read with one device -> host transfer.

    Reading ``t`` on a GPU waits for all queued work; one read per forward instead of two halves
    those stalls (the grid decides tensor shapes, so the host must know it). Fractional and
    flow-matching timesteps map to integers by :func:`sparsedit.core.schedule.discrete_timestep`.
    """
    lo, hi = torch.stack([t.min(), t.max()]).tolist()
    return discrete_timestep(lo, num_timesteps), discrete_timestep(hi, num_timesteps)


def block_kinds(layout: Layout, extra_recovery: str = "cross") -> list[str]:
    """Kind of every layer, in order: pool, gen, gen+, sparse, recover, recover+ / recover*, dense, top.

    ``gen+`` is a 2nd.. generation block of an SDTM: it cross-attends without pooling again. The
    2nd.. recovery blocks are ``recover+`` (``extra_recovery="cross"``: cross-attention to the sparse
    tokens, no merge) or ``recover*`` (``"repeat"``: a full recovery block whose "sparse" input is the
    previous recovery block's dense output).
    """
    extra = "recover+" if extra_recovery == "cross" else "recover*"
    sdtm = (["gen"] + ["gen+"] * (layout.gen - 1) + ["sparse"] * layout.sparse
            + ["recover"] + [extra] * (layout.recovery - 1) + ["dense"] * layout.dense)
    return ["pool"] * layout.pool + sdtm * layout.sdtm + ["top"] * layout.top
