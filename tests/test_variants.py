"""The variant switches of every family that shares the recovery code (docs/official.md).

``recovery_pos_embed`` (SparseDiT, SparsePixArt, SparseLatte) and ``extra_recovery`` (SparseDiT,
SparsePixArt): what each block receives, what the forward computes, the MAC counts, the ``sparsify``
flags, and that configs written before the switches existed still load with today's behaviour.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from helpers import randomize
from sparsedit.cli import main
from sparsedit.core.blocks import DenseRecoveryBlock, RecoveryMerge
from sparsedit.core.checkpoint import load_pretrained, save_pretrained
from sparsedit.core.layout import block_kinds, parse_layout
from sparsedit.errors import SparseditError
from sparsedit.eval.flops import measure_macs_by_kind, model_params, sparse_dit_macs, sparse_pixart_macs
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig
from sparsedit.families.latte.model import LatteConfig
from sparsedit.families.latte.sparse import SparseLatte, SparseLatteConfig
from sparsedit.families.pixart.model import PixArtConfig
from sparsedit.families.pixart.sparse import PixArtRecoveryBlock, SparsePixArt, SparsePixArtConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def sparse_dit(layout: str = "1,1,1,1,2,1,1", **kw: object) -> SparseDiT:
    lay = parse_layout(layout)
    dit = DiTConfig(input_size=16, hidden_size=32, depth=lay.depth, num_heads=2, num_classes=5)
    return randomize(SparseDiT(SparseDiTConfig.from_dit(dit, lay, r_min=0.7, r_max=0.7, **kw))).eval()


def sparse_pixart(**kw: object) -> SparsePixArt:
    base = PixArtConfig(input_size=16, hidden_size=32, depth=6, num_heads=2, caption_channels=8, null_caption_length=3)
    return randomize(SparsePixArt(SparsePixArtConfig.from_pixart(base, "1,1,1,1,2,0,1", r_min=0.7, r_max=0.7, **kw)))


def sparse_latte(**kw: object) -> SparseLatte:
    base = LatteConfig(input_size=8, num_frames=4, hidden_size=32, depth=8, num_heads=2, num_classes=5)
    return randomize(SparseLatte(SparseLatteConfig.from_latte(base, "2,1,2,2,2,0,0", r_min=0.5, r_max=0.5, **kw)))


def rebuilt(model: nn.Module, **switches: object) -> nn.Module:
    """The same weights under a config with other switches."""
    other = type(model)(dataclasses.replace(model.config, **switches))
    other.load_state_dict(model.state_dict())
    return other.eval()


class MergeSpy:
    """Records the ``pos_embed`` every recovery merge receives."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tables: list[Tensor | None] = []
        merge = RecoveryMerge.merge

        def spy(block: RecoveryMerge, *args: object) -> Tensor:
            self.tables.append(args[-1])  # type: ignore[arg-type]
            return merge(block, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(RecoveryMerge, "merge", spy)


def dit_inputs(batch: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    return torch.randn(batch, 4, 16, 16), torch.tensor([10, 900][:batch]), torch.tensor([1, 5][:batch])


def pixart_inputs() -> tuple[Tensor, ...]:
    return torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 3, 8)


def latte_inputs() -> tuple[Tensor, ...]:
    return torch.randn(2, 4, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 5])


FAMILIES = [
    pytest.param(sparse_dit, dit_inputs, id="SparseDiT"),
    pytest.param(sparse_pixart, pixart_inputs, id="SparsePixArt"),
    pytest.param(sparse_latte, latte_inputs, id="SparseLatte"),
]


@pytest.mark.parametrize(("build", "make_inputs"), FAMILIES)
def test_recovery_pos_embed_reaches_every_merge(build, make_inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    paper = build()
    assert paper.config.recovery_pos_embed is True  # default: the paper
    authors = rebuilt(paper, recovery_pos_embed=False)
    spy = MergeSpy(monkeypatch)
    inp = make_inputs()
    with torch.no_grad():
        out_paper = paper(*inp)
        n = len(spy.tables)
        out_authors = authors(*inp)
    assert n > 0 and all(t is not None for t in spy.tables[:n])
    assert len(spy.tables) == 2 * n and all(t is None for t in spy.tables[n:])
    assert (out_paper - out_authors).abs().max() > 1e-3


def test_recovery_block_without_table_is_w1_up_plus_w2_x() -> None:
    block = randomize(DenseRecoveryBlock(16, 2)).eval()
    x, sparse = torch.randn(2, 16, 16), torch.randn(2, 4, 16)
    up = sparse.reshape(2, 2, 2, 16).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 16, 16)
    expected = block.merge_sparse(up) + block.merge_dense(x)
    pos = torch.randn(1, 16, 16)
    assert torch.allclose(block.merge(x, sparse, (4, 4), (2, 2), None), expected, atol=1e-6)
    assert torch.allclose(block.merge(x, sparse, (4, 4), (2, 2), pos), expected + pos, atol=1e-6)


@pytest.mark.parametrize("build", [sparse_dit, sparse_pixart], ids=["SparseDiT", "SparsePixArt"])
def test_extra_recovery_repeat_builds_full_recovery_blocks(build) -> None:
    ours = build()
    repeat = build(extra_recovery="repeat")
    recovery = PixArtRecoveryBlock if isinstance(ours, SparsePixArt) else DenseRecoveryBlock
    assert ours.kinds[3:5] == ["recover", "recover+"] and repeat.kinds[3:5] == ["recover", "recover*"]
    assert type(repeat.blocks[4]) is recovery and type(ours.blocks[4]) is not recovery
    # a freshly initialised repeat block starts at W1 = 0, W2 = I like the first one (Sec. 3.3; their code too)
    fresh = type(repeat)(repeat.config)
    assert torch.equal(fresh.blocks[4].merge_sparse.weight, torch.zeros(32, 32))
    assert torch.equal(fresh.blocks[4].merge_dense.weight, torch.eye(32))


def test_repeated_recovery_merges_the_sdtm_input_with_the_previous_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2nd recovery block gets (SDTM input, previous recovery output, dense grid, dense grid)."""
    model = sparse_dit(extra_recovery="repeat", recovery_pos_embed=False)
    seen: dict[int, tuple] = {}
    for i in (3, 4):  # recover, recover*
        model.blocks[i].register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args, out)))
    gen_in: list[Tensor] = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: gen_in.append(args[2]))
    with torch.no_grad():
        model(*dit_inputs())
    (x3, _, s3, dense3, grid3, _), out3 = seen[3]
    (x4, _, s4, dense4, grid4, pos4), _ = seen[4]
    assert torch.equal(x3, gen_in[0]) and torch.equal(x4, gen_in[0])  # both merge the SDTM's input
    assert s3.shape[1] == 16 and (dense3, grid3) == ((8, 8), (4, 4))  # 8 x 8 dense, 4 x 4 sparse at r = 0.7
    assert torch.equal(s4, out3) and grid4 == dense4 == (8, 8) and pos4 is None


def test_switch_validation() -> None:
    with pytest.raises(SparseditError, match="extra_recovery must be one of cross, repeat"):
        sparse_dit(extra_recovery="merge")
    with pytest.raises(SparseditError, match="recovery_pos_embed must be true or false"):
        sparse_dit(recovery_pos_embed="no")
    with pytest.raises(SparseditError, match="recovery_pos_embed must be true or false"):
        sparse_latte(recovery_pos_embed=1)


@pytest.mark.parametrize("build", [sparse_dit, sparse_pixart, sparse_latte], ids=["SparseDiT", "SparsePixArt",
                                                                               "SparseLatte"])
def test_configs_written_before_the_switches_load_with_todays_behaviour(build, tmp_path: Path) -> None:
    model = build()
    save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["recovery_pos_embed"] is True and config.get("extra_recovery", "cross") == "cross"
    config.pop("recovery_pos_embed")
    config.pop("extra_recovery", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    old = load_pretrained(tmp_path / "m")
    assert old.config == model.config and old.kinds == model.kinds


@pytest.mark.parametrize("kw", [dict(extra_recovery="repeat"), dict(extra_recovery="repeat", recovery_pos_embed=False),
                                dict(recovery_pos_embed=False)])
def test_macs_and_params_follow_the_switches(kw: dict) -> None:
    model = sparse_dit("1,1,2,1,3,0,1", **kw)
    assert model_params(model.config) == sum(p.numel() for p in model.parameters())
    for grid in ((3, 3), (8, 8)):
        report = sparse_dit_macs(model.config, grid)
        measured = measure_macs_by_kind(model, *dit_inputs(1), grid=grid)
        assert report.by_kind["linear"] == measured["linear"]
        assert report.by_kind["attention"] == measured["attention"]
        assert report.total == measured["total"]


@pytest.mark.parametrize(("mode", "merges"), [("cross", 1), ("repeat", 3)])
def test_the_table_add_is_counted_once_per_merge(mode: str, merges: int) -> None:
    on = sparse_dit("1,1,2,1,3,0,1", extra_recovery=mode).config
    off = dataclasses.replace(on, recovery_pos_embed=False)
    n, d = 64, 32  # 8 x 8 dense tokens, width 32
    assert sparse_dit_macs(on, (3, 3)).by_kind["other"] - sparse_dit_macs(off, (3, 3)).by_kind["other"] == merges * n * d


def test_sparse_pixart_params_with_repeat() -> None:
    model = sparse_pixart(extra_recovery="repeat")
    assert model_params(model.config) == sum(p.numel() for p in model.parameters())
    assert sparse_pixart_macs(model.config, (4, 4)).total > sparse_pixart_macs(sparse_pixart().config, (4, 4)).total


def test_block_kinds_for_both_modes() -> None:
    lay = parse_layout("0,1,1,0,3,0,0")
    assert block_kinds(lay) == ["gen", "recover", "recover+", "recover+"]
    assert block_kinds(lay, "repeat") == ["gen", "recover", "recover*", "recover*"]


def test_sparsify_flags_set_the_switches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dit = randomize(DiT(DiTConfig(input_size=16, hidden_size=32, depth=7, num_heads=2, num_classes=5)))
    save_pretrained(dit, tmp_path / "dit")
    assert main(["sparsify", str(tmp_path / "dit"), "--layout", "1,1,1,1,2,1,1", "--no-recovery-pos-embed",
                 "--extra-recovery", "repeat", "--out", str(tmp_path / "s")]) == 0
    model = load_pretrained(tmp_path / "s")
    assert (model.config.recovery_pos_embed, model.config.extra_recovery) == (False, "repeat")
    assert model.kinds[4] == "recover*" and torch.equal(model.blocks[4].merge_dense.weight, torch.eye(32))
    assert torch.equal(model.blocks[4].attn.qkv.weight, dit.blocks[4].attn.qkv.weight)
    default = tmp_path / "d"
    assert main(["sparsify", str(tmp_path / "dit"), "--layout", "1,1,1,1,2,1,1", "--out", str(default)]) == 0
    assert (load_pretrained(default).config.recovery_pos_embed, load_pretrained(default).config.extra_recovery) == (
        True, "cross")
