"""Tests for DiT -> SparseDiT conversion (paper Sec. 3.3), the r = 0 relationship to DiT, sampling
end to end with the timestep-wise grid, and the ``sparsify`` / ``sample`` CLI."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import sparsedit
from helpers import cli, randomize
from sparsedit.core.blocks import DenseRecoveryBlock, SparseGenerationBlock
from sparsedit.diffusion.process import space_timesteps
from sparsedit.diffusion.sampling import generate
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig
from sparsedit.families.dit.sparsify import sparsify, sparsify_with_rules

LAYOUT = "1,2,1,1,1,1,1"  # P=1, K=2 SDTMs of (g, s, r, d) = (1, 1, 1, 1), T=1 -> depth 10
KINDS = ["pool"] + ["gen", "sparse", "recover", "dense"] * 2 + ["top"]


def tiny_dit(**kw) -> DiT:
    """Pixel-space DiT: 16 px, patch 2 -> 8 x 8 tokens, hidden 16, random (non-zero adaLN) weights."""
    cfg = dict(input_size=16, patch_size=2, in_channels=3, hidden_size=16, depth=10, num_heads=2, num_classes=4,
               data_space="pixel")
    cfg.update(kw)
    return randomize(DiT(DiTConfig(**cfg))).eval()


def inputs(model: nn.Module, t: int, batch: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    h, w = model.config.latent_hw
    return torch.randn(batch, model.config.in_channels, h, w), torch.full((batch,), t), torch.arange(batch) % 4


# ------------------------------------------------------------------------------------------------
# conversion rules, checked key by key with a rule written independently here
# ------------------------------------------------------------------------------------------------


def expected_tensor(key: str, src: dict[str, Tensor], kinds: list[str], d: int) -> tuple[Tensor, str | None]:
    """What the paper's initialisation puts in ``key`` and which source tensor it reads."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and kinds[int(m.group(1))] == "pool" and m.group(2).startswith("attn.v."):
        source = f"blocks.{m.group(1)}.attn.qkv.{m.group(2).split('.')[-1]}"
        return src[source][2 * d : 3 * d], source  # V = third chunk of the fused q, k, v
    if m and m.group(2).startswith("merge_sparse."):
        return torch.zeros_like(src[f"blocks.{m.group(1)}.attn.proj.{m.group(2).split('.')[-1]}"]), None
    if m and m.group(2) == "merge_dense.weight":
        return torch.eye(d), None
    if m and m.group(2) == "merge_dense.bias":
        return torch.zeros(d), None
    return src[key], key


@pytest.mark.parametrize("per_block_cond", [False, True])
def test_every_parameter_follows_the_paper_initialisation(per_block_cond: bool) -> None:
    dit = tiny_dit(per_block_cond=per_block_cond)
    model = sparsify(dit, layout=LAYOUT, r_min=0.5, r_max=0.8)
    assert type(model) is SparseDiT and model.kinds == KINDS
    src, dst = dit.state_dict(), model.state_dict()
    copied, sliced = set(), set()
    for key, value in dst.items():
        want, source = expected_tensor(key, src, KINDS, 16)
        assert value.shape == want.shape and torch.equal(value, want), key
        if source is not None:
            (copied if source == key else sliced).add(source)
    pool_qk = {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"}
    assert set(src) - copied == pool_qk == sliced  # the poolingformer's fused qkv is the only partial use
    # ... and of it, only the Q and K rows go unused: nothing in the SparseDiT equals them
    qk_rows = src["blocks.0.attn.qkv.weight"][: 2 * 16]
    assert not any(v.shape == qk_rows[:16].shape and (torch.equal(v, qk_rows[:16]) or torch.equal(v, qk_rows[16:]))
                   for v in dst.values())
    # conversion copies: changing the SparseDiT leaves the DiT alone
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.add_(1.0)
    assert torch.equal(dit.blocks[1].attn.qkv.weight, src["blocks.1.attn.qkv.weight"])


def test_rules_cover_every_key_once() -> None:
    model, rules = sparsify_with_rules(tiny_dit(), layout=LAYOUT)
    assert [r.target for r in rules] == list(model.state_dict())
    kinds = {r.target: r.rule for r in rules}
    assert kinds["blocks.0.attn.v.weight"] == "slice" and kinds["blocks.3.merge_sparse.weight"] == "zeros"
    assert kinds["blocks.3.merge_dense.weight"] == "identity" and kinds["final_layer.linear.weight"] == "copy"


def test_sparsify_keeps_dtype_and_eval_mode() -> None:
    dit = tiny_dit().double()
    model = sparsify(dit, layout=LAYOUT)
    assert not model.training and all(p.dtype == torch.float64 for p in model.parameters())


def test_config_mismatches_raise() -> None:
    dit = tiny_dit()
    with pytest.raises(SparseditError, match="depth"):
        sparsify(dit, layout="SparseDiT-B/2")  # 12 blocks for a 10-block DiT
    base = {k: v for k, v in dit.config.to_dict().items() if k != "model_type"}
    wrong = SparseDiTConfig(**{**base, "hidden_size": 32}, pool_blocks=1, num_sdtm=2, gen_blocks=1, sparse_blocks=1,
                            recovery_blocks=1, dense_blocks=1, top_blocks=1)
    with pytest.raises(SparseditError, match="hidden_size"):
        sparsify(dit, wrong)
    with pytest.raises(SparseditError, match="layout"):
        sparsify(dit)
    with pytest.raises(SparseditError, match="dense DiT"):
        sparsify(sparsify(dit, layout=LAYOUT), layout=LAYOUT)
    with pytest.raises(SparseditError):
        sparsify(dit, layout=LAYOUT, r_min=0.9, r_max=0.1)


# ------------------------------------------------------------------------------------------------
# r_min = r_max = 0: what the converted model computes relative to the DiT
# ------------------------------------------------------------------------------------------------


def record(model: nn.Module, names: list[str]) -> dict[str, list]:
    """Forward hooks (with kwargs) recording (args, kwargs, output) of the named submodules."""
    seen: dict[str, list] = {}
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_hook(
            lambda m, a, k, o, name=name: seen.setdefault(name, []).append((a, k, o)), with_kwargs=True)
    return seen


@torch.no_grad()
def test_r0_conversion_relationship_block_by_block() -> None:
    dit = tiny_dit()
    model = sparsify(dit, layout=LAYOUT, r_min=0.0, r_max=0.0)
    x, t, y = inputs(dit, 500)
    names = ["x_embedder", "t_embedder", "y_embedder", "final_layer"] + [f"blocks.{i}" for i in range(10)]
    got, ref = record(model, names), record(dit, names)
    out_sparse, out_dense = model(x, t, y), dit(x, t, y)
    for name in ("x_embedder", "t_embedder", "y_embedder"):  # identical embedders
        assert torch.equal(got[name][0][2], ref[name][0][2]), name
    c = got["t_embedder"][0][2] + got["y_embedder"][0][2]
    grid = (8, 8)
    pos = dit.pos_embed
    for i, kind in enumerate(KINDS):
        (args, kwargs, out), = got[f"blocks.{i}"]
        src_block = dit.blocks[i]
        if kind == "gen":  # full grid: pooling is the identity, cross-attn to itself == self-attention
            assert args[4] == grid
            assert torch.equal(out, src_block(args[2], c))
        elif kind in ("sparse", "dense", "top"):
            assert torch.equal(out, src_block(args[0], c)), (i, kind)
        elif kind == "pool":
            assert not torch.allclose(out, src_block(args[0], c), atol=1e-3)  # learned map is not uniform
            src_block.attn.attn_fn = lambda q, k, v: v.mean(dim=2, keepdim=True).expand_as(v)
            torch.testing.assert_close(out, src_block(args[0], c), atol=1e-5, rtol=0)  # uniform map: equal
            del src_block.attn.attn_fn
        elif kind == "recover":
            # input is the dense tokens that entered the SDTM (the generation block's dense input) ...
            (gen_args, _, gen_out), = got[f"blocks.{i - 2}"]
            assert torch.equal(args[0], gen_args[2])
            assert torch.equal(args[2], got[f"blocks.{i - 1}"][0][2])  # ... attending to the sparse tokens
            # ... merged as X_in + pos (W1 = 0, W2 = I), then the source block with cross-attention
            torch.testing.assert_close(out, src_block(args[0] + pos, c, context=args[2]), atol=1e-5, rtol=0)
            # which is not what the DiT's layer i computes on its own input
            assert not torch.allclose(out, ref[f"blocks.{i}"][0][2], atol=1e-3)
    # identical final layer on identical input
    h_in = got["final_layer"][0][0][0]
    assert torch.equal(got["final_layer"][0][2], dit.final_layer(h_in, c))
    # as a whole the converted model is not the DiT (poolingformer + recovery merge differ)
    assert not torch.allclose(out_sparse, out_dense, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# end to end sampling with the timestep-wise grid
# ------------------------------------------------------------------------------------------------


class GridRecorder:
    """Forward hook on every generation block: the sparse grid argument and the token count produced."""

    def __init__(self, model: SparseDiT) -> None:
        self.calls: list[tuple[tuple[int, int], int]] = []
        for block in model.blocks:
            if isinstance(block, SparseGenerationBlock):
                block.register_forward_hook(lambda m, a, o: self.calls.append((a[4], o.shape[1])))


@pytest.mark.parametrize(("sampler", "spec"), [("ddpm", 5), ("ddim", "ddim5")])
def test_generate_uses_the_schedule_grid_at_each_step(sampler: str, spec) -> None:
    model = sparsify(tiny_dit(), layout=LAYOUT, r_min=0.61, r_max=0.86)
    rec = GridRecorder(model)
    out = generate(model, [0, 3], sampler=sampler, steps=5, cfg_scale=2.0, seed=1, progress=False)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    timesteps = space_timesteps(1000, spec)[::-1]  # sampling runs from noisy to clean
    grids = model.config.schedule.grids_for_timesteps(timesteps, (8, 8))
    assert len(set(grids)) >= 2  # the run really changes grid (ddpm: 3x3 at t=999 ... 5x5 near t=0)
    per_step = rec.calls[:: 2]  # two SDTMs per forward, both on the step's grid
    assert rec.calls[1::2] == per_step
    assert [g for g, _ in per_step] == grids
    assert [n for _, n in per_step] == [h * w for h, w in grids]


def test_generate_is_reproducible_and_cfg_matters() -> None:
    model = sparsify(tiny_dit(), layout=LAYOUT)
    a = generate(model, [1], sampler="ddim", steps=2, cfg_scale=3.0, seed=7, progress=False)
    b = generate(model, [1], sampler="ddim", steps=2, cfg_scale=3.0, seed=7, progress=False)
    c = generate(model, [1], sampler="ddim", steps=2, cfg_scale=1.0, seed=7, progress=False)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------



@pytest.fixture
def dit_dir(tmp_path):
    return sparsedit.save_pretrained(tiny_dit(), tmp_path / "dit")


def test_cli_sparsify_verbose_then_sample(dit_dir, tmp_path) -> None:
    sparse_dir = tmp_path / "sparse"
    code, out, err = cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--r-min", "0.5", "--r-max", "0.8",
                         "--out", str(sparse_dir), "--verbose")
    assert code == 0, err
    loaded = sparsedit.load_model(sparse_dir)
    assert type(loaded) is SparseDiT and (loaded.config.r_min, loaded.config.r_max) == (0.5, 0.8)
    keys = list(loaded.state_dict())
    lines = out.splitlines()
    assert lines[-1].startswith("wrote SparseDiT")
    rule_lines = lines[:-1]
    assert len(rule_lines) == len(keys)  # one line per parameter
    assert [line.split(" <- ")[0] for line in rule_lines] == keys
    assert "blocks.0.attn.v.weight <- blocks.0.attn.qkv.weight[32:48] (V of qkv)" in rule_lines
    # the weights equal the in-process conversion
    ref = sparsify(sparsedit.load_model(dit_dir), layout=LAYOUT, r_min=0.5, r_max=0.8).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())

    png = tmp_path / "grid.png"
    code, out, err = cli("sample", "--ckpt", str(sparse_dir), "--class-labels", "0", "2", "--steps", "3",
                         "--sampler", "ddim", "--cfg-scale", "2", "--out", str(png), "--no-progress", "--device", "cpu")
    assert code == 0, err
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 32 and img.height >= 16


def _one_line_error(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_cli_bad_layout(dit_dir, tmp_path) -> None:
    for layout in ("SparseDiT-Q/2", "1,2,3"):
        code, _, err = cli("sparsify", str(dit_dir), "--layout", layout, "--out", str(tmp_path / "a"))
        assert code == 2 and "layout" in _one_line_error(err)
    code, _, err = cli("sparsify", str(dit_dir), "--layout", "SparseDiT-XL/2", "--out", str(tmp_path / "b"))
    assert code == 2 and "depth" in _one_line_error(err) and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("r_min", "r_max"), [("-0.1", "0.5"), ("0.2", "1.0"), ("0.2", "abc")])
def test_cli_rates_out_of_range(dit_dir, tmp_path, r_min: str, r_max: str) -> None:
    out = tmp_path / "s"
    code, _, err = cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--r-min", r_min, "--r-max", r_max,
                       "--out", str(out))
    assert code == 2 and "--r-m" in _one_line_error(err)
    assert not out.exists()


def test_cli_r_min_above_r_max(dit_dir, tmp_path) -> None:
    out = tmp_path / "s"
    code, _, err = cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--r-min", "0.8", "--r-max", "0.5",
                       "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--r-min 0.8 is larger than --r-max 0.5" in err
    assert not out.exists()


def test_cli_existing_output_needs_overwrite(dit_dir, tmp_path) -> None:
    out = tmp_path / "s"
    assert cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--out", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--r-min", "0.1", "--r-max", "0.2",
                       "--out", str(out))
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    code, _, err = cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--r-min", "0.1", "--r-max", "0.2",
                       "--out", str(out), "--overwrite")
    assert code == 0, err
    assert sparsedit.load_model(out).config.r_max == 0.2


def test_cli_refuses_a_sparse_source(dit_dir, tmp_path) -> None:
    assert cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--out", str(tmp_path / "s"))[0] == 0
    code, _, err = cli("sparsify", str(tmp_path / "s"), "--layout", LAYOUT, "--out", str(tmp_path / "t"))
    assert code == 2 and "dense DiT" in err


def test_cli_upsample_choice_is_saved(dit_dir, tmp_path) -> None:
    code, _, err = cli("sparsify", str(dit_dir), "--layout", LAYOUT, "--upsample", "bilinear", "--num-pieces", "2",
                       "--out", str(tmp_path / "s"))
    assert code == 0, err
    model = sparsedit.load_model(tmp_path / "s")
    assert model.config.upsample == "bilinear" and model.config.num_pieces == 2
    assert all(b.upsample == "bilinear" for b in model.blocks if isinstance(b, DenseRecoveryBlock))
