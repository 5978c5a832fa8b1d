"""The generic MAC count (sparsedit.eval.macs): counted from the model itself, for every family, with no family code.

The report of a tiny model of every family equals FlopCounterMode on the real model; every block's ``other``
follows the per-op rules of docs/flops.md; the block memo and the schedule-blind cache change no number; and
neither flops.py nor macs.py asks which family a config is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import sparsedit.eval.flops as flops
import sparsedit.eval.macs as macs
from sparsedit.core.checkpoint import build_model
from sparsedit.core.layout import parse_layout
from sparsedit.eval.flops import dit_macs, forward_macs, model_params, sparse_dit_macs
from sparsedit.families import family_of
from sparsedit.families.dit.model import DiTConfig
from sparsedit.families.dit.sparse import SparseDiTConfig
from sparsedit.families.latte.model import LatteConfig
from sparsedit.families.latte.sparse import SparseLatteConfig
from sparsedit.families.pixart.model import PixArtConfig
from sparsedit.families.pixart.sparse import SparsePixArtConfig

pytestmark = pytest.mark.usefixtures("single_thread")

D, HEADS, F = 32, 2, 128  # width, heads, MLP width (mlp_ratio 4)
TINY = dict(hidden_size=D, num_heads=HEADS, patch_size=2, in_channels=4)


def dit(depth: int = 2, size: int = 8, **kw: object) -> DiTConfig:
    return DiTConfig(input_size=size, depth=depth, num_classes=10, **{**TINY, **kw})  # type: ignore[arg-type]


def sparse_dit(layout: str, size: int = 12, **kw: object) -> SparseDiTConfig:
    return SparseDiTConfig.from_dit(dit(parse_layout(layout).depth, size), layout, **kw)


def pixart(depth: int = 2, **kw: object) -> PixArtConfig:
    return PixArtConfig(input_size=8, depth=depth, caption_channels=16, null_caption_length=4, **{**TINY, **kw})  # type: ignore[arg-type]


def latte(depth: int = 2, **kw: object) -> LatteConfig:
    return LatteConfig(input_size=8, depth=depth, num_frames=3, num_classes=10, caption_channels=16,
                       **{**TINY, **kw})  # type: ignore[arg-type]


CONFIGS = {
    "DiT": (dit(), None),
    "SparseDiT": (sparse_dit("1,1,1,1,1,1,1"), (2, 3)),
    "PixArt": (pixart(use_additional_conditions=True, hidden_size=48, num_heads=3), None),
    "SparsePixArt": (SparsePixArtConfig.from_pixart(pixart(6), "1,1,1,1,1,1,1"), (3, 3)),
    "Latte-class": (latte(), None),
    "Latte-text": (latte(conditioning="text"), None),
    "SparseLatte": (SparseLatteConfig.from_latte(latte(10, conditioning="text"), "2,1,2,2,2,0,2"), ((3, 2), 2)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_report_is_what_flop_counter_counts_on_the_real_model(name: str) -> None:
    config, tokens = CONFIGS[name]
    fam = family_of(config)
    model = build_model(config).eval()
    cond = fam.conditioning(model, 1, False, torch.Generator().manual_seed(0))
    counter = macs.flop_counter()
    with torch.no_grad(), counter:
        fam.call(model, torch.randn(fam.sample_shape(1)), torch.tensor([500]), cond, tokens)
    linear, attention = macs.split_flops(counter.get_flop_counts()["Global"])
    report = forward_macs(config, tokens)
    assert (report.by_kind["linear"], report.by_kind["attention"]) == (linear, attention)
    assert model_params(config) == sum(p.numel() for p in model.parameters())
    assert report.by_kind["other"] > 0


# ------------------------------------------------------------------------------------------------
# other: the documented rules, block by block
# ------------------------------------------------------------------------------------------------


def dit_block(nq: int, nk: int | None = None) -> tuple[int, int, int]:
    """docs/flops.md's DiT block: (linear, attention, other) with nq queries and nk context tokens."""
    kv = nq if nk is None else nk
    other = 16 * nq * D + nq * F + HEADS * nq * kv + (0 if nk is None else 6 * nk * D)
    return 6 * D * D + 2 * nq * D * D + 2 * kv * D * D + 2 * nq * D * F, 2 * nq * kv * D, other


def plus(*costs: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(sum(c[k] for c in costs) for k in range(3))  # type: ignore[return-value]


def documented(kind: str, n: int, m: int, pos: bool) -> tuple[int, int, int]:
    """The cost docs/flops.md gives a SparseDiT block of ``kind`` with n dense and m sparse tokens."""
    adds = (2 if pos else 1) * n * D  # the merge's add (+ the position table)
    costs = {
        "pool": (8 * D * D + 2 * n * D * F, 0, 16 * n * D + n * F + D),
        "gen": plus(dit_block(m, n), (0, 0, n * D)),  # + the adaptive pooling, one op per dense input element
        "gen+": dit_block(m, n),
        "sparse": dit_block(m),
        "recover": plus(dit_block(n, m), (2 * n * D * D, 0, (n * D if m != n else 0) + adds)),
        "recover+": dit_block(n, m),
        # merges with the previous recovery output and attends to it: cross-attention over n tokens, no upsampling
        "recover*": plus(dit_block(n, n), (2 * n * D * D, 0, adds)),
    }
    return costs.get(kind, dit_block(n))


@pytest.mark.parametrize("options", [{}, dict(extra_recovery="repeat"), dict(recovery_pos_embed=False),
                                     dict(extra_recovery="repeat", recovery_pos_embed=False)])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (6, 6)])
def test_every_block_counts_what_the_docs_say(options: dict, grid: tuple[int, int]) -> None:
    config = sparse_dit("1,1,2,1,3,1,1", **options)
    n, m = 36, grid[0] * grid[1]
    count = macs.count_forward(config, grid)
    kinds = family_of(config).block_kinds()
    assert list(count.blocks) == [documented(k, n, m, config.recovery_pos_embed) for k in kinds]
    patch_in, patch_out = 4 * 2 * 2, 2 * 2 * 8  # C_in p^2 and p^2 C_out
    assert count.embed == (n * patch_in * D + 256 * D + D * D, 0, n * D)  # label lookup, SiLU, t + y: free
    assert count.final == (2 * D * D + n * D * patch_out, 0, 6 * n * D)


# ------------------------------------------------------------------------------------------------
# caches that must not change a number
# ------------------------------------------------------------------------------------------------


class _Forgetful(dict):
    """A memo that never remembers: every block call runs."""

    def __contains__(self, key: object) -> bool:
        return False


@pytest.mark.parametrize("name", ["SparseDiT", "SparsePixArt", "SparseLatte"])
def test_the_block_memo_changes_no_count(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config, tokens = CONFIGS[name]
    remembered = macs._count.__wrapped__(macs._Config.of(config), tokens, None)
    monkeypatch.setattr(macs, "_MEMO", _Forgetful())
    assert macs._count.__wrapped__(macs._Config.of(config), tokens, None) == remembered


def test_rates_share_a_count_and_other_sizes_are_the_model_at_that_size() -> None:
    a, b = sparse_dit("1,1,1,1,1,1,1", r_min=0.3, r_max=0.5), sparse_dit("1,1,1,1,1,1,1", r_min=0.6, r_max=0.9)
    assert macs.count_forward(a, (2, 2)) is macs.count_forward(b, (2, 2))  # the schedule only picks tokens
    assert dit_macs(dit(), (3, 5)).table == dit_macs(dit(size=(6, 10))).table
    assert sparse_dit_macs(a, (2, 2), (5, 5)).table == sparse_dit_macs(sparse_dit("1,1,1,1,1,1,1", 10), (2, 2)).table


def test_video_reports_name_their_frames() -> None:
    config, tokens = CONFIGS["SparseLatte"]
    report = forward_macs(config, tokens)
    assert (report.grid, report.sparse_grid, report.frames, report.sparse_frames) == ((4, 4), (3, 2), 3, 2)
    assert set(report.table) == {"embed", "pool", "sdtm", "top", "final"}
    assert set(report.by_part) == {"gen", "sparse", "recover", "dense"}
    assert flops.latte_macs(CONFIGS["Latte-class"][0], frames=5).frames == 5


# ------------------------------------------------------------------------------------------------
# no family code in the count
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [flops, macs])
def test_the_count_never_asks_which_family_a_config_is(module: object) -> None:
    tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
    checks = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "id", None) in ("isinstance", "type")
              and any(isinstance(a, ast.Name) and ("Config" in a.id or a.id in ("DiT", "PixArt", "Latte"))
                      for a in ast.walk(node))]
    assert checks == []
    family_imports = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                      and (node.module or "").startswith("sparsedit.families.") for alias in node.names]
    assert all(name.isupper() for name in family_imports), family_imports  # constants only (CAPTION_TOKENS)
