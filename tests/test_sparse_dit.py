"""Tests for the SparseDiT model: layouts, block kinds, schedule-driven sparse grid, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import sparsedit
from helpers import randomize
from sparsedit.core.blocks import CrossDenseBlock, DenseRecoveryBlock, Poolingformer, SparseGenerationBlock
from sparsedit.core.layers import DiTBlock
from sparsedit.core.layout import LAYOUTS, Layout, block_kinds, parse_layout
from sparsedit.errors import SparseditError
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig


def tiny_config(layout: str = "1,1,1,1,1,1,1", **kw) -> SparseDiTConfig:
    """32 px, patch 2 -> a 16 x 16 dense grid (DiT-XL/2 at 256 px has the same grid)."""
    lay = parse_layout(layout)
    base = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=16, depth=lay.depth, num_heads=2,
                num_classes=5, pool_blocks=lay.pool, num_sdtm=lay.sdtm, gen_blocks=lay.gen,
                sparse_blocks=lay.sparse, recovery_blocks=lay.recovery, dense_blocks=lay.dense, top_blocks=lay.top,
                r_min=0.61, r_max=0.86)
    base.update(kw)
    return SparseDiTConfig(**base)


def inputs(cfg: SparseDiTConfig, t: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    h, w = cfg.latent_hw
    return torch.randn(len(t), cfg.in_channels, h, w), torch.tensor(t), torch.arange(len(t)) % cfg.num_classes


class TokenCounter:
    """Forward hook on the generation blocks: records how many sparse tokens each call produced."""

    def __init__(self, model: SparseDiT) -> None:
        self.counts: list[int] = []
        self.handles = [b.register_forward_hook(self._hook) for b, k in zip(model.blocks, model.kinds, strict=True)
                        if k == "gen"]

    def _hook(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        self.counts.append(out.shape[1])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# layouts and block kinds
# ------------------------------------------------------------------------------------------------


def test_xl_preset_block_kinds_follow_the_paper() -> None:
    sdtm = ["gen", "sparse", "sparse", "sparse", "recover", "dense"]
    expected = ["pool", "pool"] + sdtm * 4 + ["top", "top"]
    assert block_kinds(LAYOUTS["SparseDiT-XL"]) == expected
    assert len(expected) == 28 and LAYOUTS["SparseDiT-XL"].depth == 28


def test_b_preset_block_kinds_follow_the_paper() -> None:
    sdtm = ["gen", "sparse", "sparse", "recover", "dense"]
    assert block_kinds(LAYOUTS["SparseDiT-B"]) == ["pool"] + sdtm * 2 + ["top"]
    assert LAYOUTS["SparseDiT-B"].depth == 12


def test_parse_layout_presets_and_counts() -> None:
    assert parse_layout("SparseDiT-XL/2") == Layout(2, 4, 1, 3, 1, 1, 2)
    assert parse_layout("SparseDiT-B") == Layout(1, 2, 1, 2, 1, 1, 1)
    assert parse_layout("2, 4, 1, 3, 1, 1, 2") == LAYOUTS["SparseDiT-XL"]
    for bad in ("SparseDiT-XXL/2", "1,2,3", "1,2,3,4,5,6,x", "1,2,1,1,1,1,-1"):
        with pytest.raises(SparseditError, match="layout"):
            parse_layout(bad)


def test_xl_model_modules_match_kinds() -> None:
    model = SparseDiT(tiny_config("SparseDiT-XL/2"))
    expected_types = {"pool": Poolingformer, "gen": SparseGenerationBlock, "sparse": DiTBlock,
                      "recover": DenseRecoveryBlock, "dense": DiTBlock, "top": DiTBlock}
    assert len(model.blocks) == 28
    for block, kind in zip(model.blocks, block_kinds(LAYOUTS["SparseDiT-XL"]), strict=True):
        assert type(block) is expected_types[kind], kind


def test_generalised_sdtm_g2_r2() -> None:
    cfg = tiny_config("1,1,2,1,2,1,1")
    model = SparseDiT(cfg).eval()
    assert model.kinds == ["pool", "gen", "gen+", "sparse", "recover", "recover+", "dense", "top"]
    assert type(model.blocks[2]) is SparseGenerationBlock and type(model.blocks[5]) is CrossDenseBlock
    x, t, y = inputs(cfg, [10, 20])
    with torch.no_grad():
        assert model(x, t, y).shape == (2, 8, 32, 32)


@pytest.mark.parametrize("layout", ["1,1,1,2,1,1,1", "2,1,1,1,1,0,2", "0,2,1,0,1,0,3", "3,0,0,0,0,0,4", "1,3,1,0,1,0,0"])
def test_any_layout_with_matching_depth_builds(layout: str) -> None:
    cfg = tiny_config(layout)
    assert cfg.depth == 7
    model = randomize(SparseDiT(cfg)).eval()
    x, t, y = inputs(cfg, [3, 3])
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 8, 32, 32) and torch.isfinite(out).all()


def test_layout_depth_mismatch_raises() -> None:
    with pytest.raises(SparseditError, match="depth"):
        tiny_config("1,1,1,1,1,1,1", depth=8)
    with pytest.raises(SparseditError, match="depth"):
        tiny_config("SparseDiT-B/2", depth=28)


def test_sdtm_without_generation_or_recovery_raises() -> None:
    with pytest.raises(SparseditError):
        tiny_config("1,1,0,3,1,1,1")
    with pytest.raises(SparseditError):
        tiny_config("1,1,1,3,0,1,1")


def test_bad_rates_and_upsample_raise() -> None:
    with pytest.raises(SparseditError):
        tiny_config(r_min=0.9, r_max=0.5)
    with pytest.raises(SparseditError):
        tiny_config(r_max=1.0)
    with pytest.raises(SparseditError, match="upsample"):
        tiny_config(upsample="area")


# ------------------------------------------------------------------------------------------------
# forward and the sparse grid
# ------------------------------------------------------------------------------------------------


def test_forward_shape_and_learned_sigma() -> None:
    cfg = tiny_config(learn_sigma=False)
    model = randomize(SparseDiT(cfg)).eval()
    x, t, y = inputs(cfg, [999, 990, 980])
    with torch.no_grad():
        assert model(x, t, y).shape == (3, 4, 32, 32)
        assert model(x[:1], torch.tensor(5), y[:1]).shape == (1, 4, 32, 32)  # 0-d t is broadcast


def expected_grid(r: float, side: int = 16) -> tuple[int, int]:
    s = math.floor(side * math.sqrt(1 - r) + 0.5)
    return s, s


@pytest.mark.parametrize(("t", "grid"), [(0, (10, 10)), (249, (10, 10)), (999, (6, 6)), (600, None)])
def test_grid_follows_schedule(t: int, grid: tuple[int, int] | None) -> None:
    cfg = tiny_config()
    model = randomize(SparseDiT(cfg)).eval()
    if grid is None:  # linear part, by the formula written out here
        grid = expected_grid(0.61 * (4000 - 4 * t) / 3000 + 0.86 * (4 * t - 1000) / 3000)
    counter = TokenCounter(model)
    x, tt, y = inputs(cfg, [t, t])
    with torch.no_grad():
        model(x, tt, y)
    counter.remove()
    assert counter.counts == [grid[0] * grid[1]]
    assert model.sparse_grid(tt, (16, 16)) == grid


def test_every_sdtm_uses_the_same_grid() -> None:
    cfg = tiny_config("SparseDiT-B/2")
    model = SparseDiT(cfg).eval()
    counter = TokenCounter(model)
    with torch.no_grad():
        model(*inputs(cfg, [999]))
    assert counter.counts == [36, 36]


def test_mixed_timesteps_on_different_grids_raise() -> None:
    cfg = tiny_config()
    model = SparseDiT(cfg).eval()
    x, t, y = inputs(cfg, [0, 999])
    with pytest.raises(SparseditError, match="grid="):
        model(x, t, y)


def test_mixed_timesteps_in_one_piece_work() -> None:
    cfg = tiny_config()
    model = randomize(SparseDiT(cfg)).eval()
    piece = cfg.schedule.piece_at(999, (16, 16))
    ts = [piece.t_start, piece.t_end - 1, (piece.t_start + piece.t_end) // 2]
    x, t, y = inputs(cfg, ts)
    counter = TokenCounter(model)
    with torch.no_grad():
        out = model(x, t, y)
        # each item equals its own single-item forward (no cross-talk across the batch)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(3)])
    assert counter.counts[0] == piece.grid[0] * piece.grid[1] == 36
    torch.testing.assert_close(out, single, atol=1e-5, rtol=0)
    # and [0, T/4) is one piece too: 0 and 249 share the r_min grid
    with torch.no_grad():
        model(*inputs(cfg, [0, 249]))
    assert counter.counts[-1] == 100


def test_explicit_grid_and_keep_ratio_override_schedule() -> None:
    cfg = tiny_config()
    model = randomize(SparseDiT(cfg)).eval()
    x, t, y = inputs(cfg, [0, 999])  # would raise without an override
    counter = TokenCounter(model)
    with torch.no_grad():
        model(x, t, y, grid=(3, 7))
        model(x, t, y, keep_ratio=0.25)  # r = 0.75 -> 16 * 0.5 = 8
        model(x, t, y, keep_ratio=1.0)
    assert counter.counts == [21, 64, 256]
    with pytest.raises(SparseditError):
        model(x, t, y, grid=(17, 4))
    with pytest.raises(SparseditError):
        model(x, t, y, keep_ratio=0.0)


def test_explicit_grid_changes_output() -> None:
    cfg = tiny_config()
    model = randomize(SparseDiT(cfg)).eval()
    x, t, y = inputs(cfg, [999])
    with torch.no_grad():
        a = model(x, t, y)
        b = model(x, t, y, grid=(6, 6))
        c = model(x, t, y, grid=(4, 4))
    assert torch.equal(a, b)  # the schedule's grid at t=999 is 6x6
    assert not torch.allclose(a, c, atol=1e-4)


def test_forward_with_cfg_passes_grid() -> None:
    cfg = tiny_config()
    model = randomize(SparseDiT(cfg)).eval()
    x, t, y = inputs(cfg, [999, 999])
    counter = TokenCounter(model)
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, torch.tensor([1, cfg.num_classes]), cfg_scale=2.0, grid=(2, 3))
    assert counter.counts == [6] and out.shape == (2, 8, 32, 32)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tmp_path) -> None:
    cfg = tiny_config("1,1,2,1,2,1,1", r_min=0.3, r_max=0.7, num_pieces=3, upsample="bilinear",
                      input_size=(32, 24))
    model = randomize(SparseDiT(cfg)).eval()
    sparsedit.save_pretrained(model, tmp_path / "ckpt")
    loaded = sparsedit.load_model(tmp_path / "ckpt")
    assert type(loaded) is SparseDiT
    assert loaded.config == cfg and loaded.kinds == model.kinds
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    x, t, y = inputs(cfg, [999, 990])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    # the schedule travels with the checkpoint: the grid at t=999 needs no flag
    assert loaded.sparse_grid(t, cfg.grid) == cfg.schedule.grid(999, cfg.grid)


# Regression test for a library bug found while writing these tests: checkpoint.atomic_write
# (src/sparsedit/checkpoint.py) created files with tempfile.mkstemp (mode 0600) and os.replace kept
# that mode, so config.json / model.safetensors were unreadable by other users. A concurrent edit of
# checkpoint.py (os.chmod(tmp, 0o644) before os.replace) fixes it; this fails without that fix.
def test_saved_checkpoint_files_are_readable_by_others(tmp_path) -> None:
    import os

    model = SparseDiT(tiny_config())
    old = os.umask(0o022)
    try:
        out = sparsedit.save_pretrained(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
