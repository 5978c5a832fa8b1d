"""Tests for the attention analysis (paper Fig. 1b / Fig. 3), the layout proposal and ``sparsedit analyze``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shlex

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import sparsedit
from sparsedit.cli import analyze as analyze_cmd
from sparsedit.cli import main
from sparsedit.cli.common import Parser
from sparsedit.core.layers import modulate
from sparsedit.core.layout import parse_layout
from sparsedit.diffusion.process import space_timesteps
from sparsedit.errors import SparseditError
from sparsedit.eval.analyze import (
    ConstantMapResult,
    ProposeRule,
    VarianceRecorder,
    VarianceResult,
    attention_row_sum_sq,
    attention_variance,
    constant_attention,
    constant_map_experiment,
    normalized_variance,
    propose,
    sparsify_command,
    uniform_attention,
)
from sparsedit.eval.flops import dit_macs, schedule_macs
from sparsedit.families.dit.model import DiT, DiTConfig, dit_config
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig

pytestmark = pytest.mark.usefixtures("single_thread")

DEPTH = 10


def tiny_dit(randomize, depth: int = DEPTH) -> DiT:
    """Pixel-space DiT: 16 px, patch 2 -> 8 x 8 tokens, hidden 16, random (non-zero adaLN) weights."""
    cfg = DiTConfig(input_size=16, patch_size=2, in_channels=3, hidden_size=16, depth=depth, num_heads=2,
                    num_classes=4, data_space="pixel")
    return randomize(DiT(cfg)).eval()


def explicit_variance(attn: Tensor) -> Tensor:
    """Per-row variance over keys (population) divided by its one-hot maximum (N-1)/N^2."""
    n = attn.shape[-1]
    return attn.var(dim=-1, unbiased=False) / ((n - 1) / n**2)


# ------------------------------------------------------------------------------------------------
# the statistic
# ------------------------------------------------------------------------------------------------


def test_normalized_variance_on_hand_made_maps() -> None:
    n = 7
    uniform = torch.full((3, n), 1.0 / n)
    one_hot = torch.eye(n)[:3]
    mixed = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0], [0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0.0]])
    assert torch.allclose(normalized_variance(uniform), torch.zeros(3), atol=1e-7)
    assert torch.allclose(normalized_variance(one_hot), torch.ones(3))
    assert torch.allclose(normalized_variance(mixed), explicit_variance(mixed), atol=1e-6)
    # two equal keys out of 7: N * (1/2) - 1 over N - 1
    assert normalized_variance(mixed)[0].item() == pytest.approx((n / 2 - 1) / (n - 1))


def test_row_sum_sq_matches_explicit_softmax_in_chunks() -> None:
    q, k = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 29, 8)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = p.pow(2).sum(-1)
    for max_elements in (1, 2 * 3 * 29 * 5, 1 << 24):  # 1 row per chunk, 5 rows, everything at once
        assert torch.allclose(attention_row_sum_sq(q, k, max_elements=max_elements), expected, atol=1e-6)


def test_recorder_matches_explicit_softmax_of_every_block(randomize) -> None:
    model = tiny_dit(randomize)
    x, t, y = torch.randn(2, 3, 16, 16), torch.full((2,), 500), torch.tensor([1, 3])
    inputs: dict[int, Tensor] = {}
    hooks = [block.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        plain = model(x, t, y)
        with VarianceRecorder(model, max_elements=64) as rec:  # forces chunking (N = 64)
            recorded = model(x, t, y=y)
    for h in hooks:
        h.remove()
    assert torch.equal(plain, recorded), "recording must not change the model's output"
    assert [r[0] for r in rec.records] == [500]
    values = rec.records[0][1]
    assert len(values) == DEPTH
    for i, block in enumerate(model.blocks):
        a = block.attn
        q, k, _ = a.qkv(inputs[i]).chunk(3, dim=-1)
        q, k = a._heads(q), a._heads(k)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, N, N)
        assert values[i] == pytest.approx(explicit_variance(p).mean().item(), rel=1e-4, abs=1e-7)
    # the swap is undone
    assert all(block.attn.attn_fn is F.scaled_dot_product_attention for block in model.blocks)
    # sanity of the hook input: block 0 normalises + modulates the embedded tokens
    c = model.t_embedder(t) + model.y_embedder(y)
    shift, scale = model.blocks[0].adaLN_modulation(c).chunk(6, dim=1)[:2]
    h0 = model.x_embedder(x) + model.pos_embed
    assert torch.allclose(inputs[0], modulate(model.blocks[0].norm1(h0), shift, scale), atol=1e-6)


def test_attention_variance_per_layer_and_step(randomize) -> None:
    model = tiny_dit(randomize)
    result, samples = attention_variance(model, [0, 1], seeds=[0, 1], sampler="ddim", steps=4, progress=False)
    assert result.timesteps == [750, 500, 250, 0]
    assert len(result.variance) == DEPTH and all(len(row) == 4 for row in result.variance)
    assert all(0 <= v <= 1 for row in result.variance for v in row)
    assert len(result.rows()) == DEPTH * 4
    assert [s.shape for s in samples] == [torch.Size([2, 3, 16, 16])] * 2
    # a model whose q/k weights are zero attends uniformly: variance 0 everywhere
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 16].zero_()
            block.attn.qkv.bias[: 2 * 16].zero_()
    flat, _ = attention_variance(model, [0], seeds=[0], steps=2, progress=False)
    assert max(max(row) for row in flat.variance) == pytest.approx(0.0, abs=1e-6)


def test_analyze_refuses_a_sparse_dit(randomize) -> None:
    model = sparsedit.sparsify(tiny_dit(randomize), layout="1,2,1,1,1,1,1")
    assert isinstance(model, SparseDiT)
    with pytest.raises(SparseditError, match="dense DiT"):
        VarianceRecorder(model)


# ------------------------------------------------------------------------------------------------
# constant maps
# ------------------------------------------------------------------------------------------------


def test_uniform_attention_is_softmax_of_a_constant_map() -> None:
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    ones = torch.ones(2, 3, 5, 9)  # the paper's "full-one" map, normalised by the softmax
    expected = torch.softmax(ones, dim=-1) @ v
    assert torch.allclose(uniform_attention(q, k, v), expected, atol=1e-6)


def test_constant_map_experiment_zero_at_k0_nonzero_after(randomize) -> None:
    model = tiny_dit(randomize)
    result = constant_map_experiment(model, [0, 2], max_k=2, seeds=[3], steps=3, progress=False)
    assert result.ks == [0, 1, 2]
    assert result.mean_abs[0] == 0 and result.mse[0] == 0 and result.rel_l2[0] == 0
    assert all(v > 0 for v in result.mean_abs[1:]) and all(v > 0 for v in result.rel_l2[1:])
    assert all(block.attn.attn_fn is F.scaled_dot_product_attention for block in model.blocks)
    with constant_attention(model, 2):
        kinds = [block.attn.attn_fn is uniform_attention for block in model.blocks]
    assert kinds == [True, True] + [False] * (DEPTH - 2)
    with pytest.raises(SparseditError, match="outside"):
        constant_map_experiment(model, [0], max_k=DEPTH + 1, progress=False)


# ------------------------------------------------------------------------------------------------
# the proposal rule
# ------------------------------------------------------------------------------------------------


def xl_like_variance(depth: int = 28, steps: int = 10) -> VarianceResult:
    """Fig. 1b-like pattern: two near-uniform bottom layers, local layers at SDTM-dense positions
    (recovery/dense of a 6-layer period after layer 2 and the top), variance growing as t falls."""
    timesteps = [int(999 - i * 111) for i in range(steps)]
    rows = []
    for layer in range(depth):
        if layer < 2:
            base = 0.002
        elif layer >= depth - 2 or (layer - 2) % 6 in (4, 5):
            base = 0.2
        else:
            base = 0.05
        rows.append([base * (1 + 2 * (1 - t / 1000)) for t in timesteps])
    return VarianceResult(rows, timesteps, "ddim", steps, [0], [0])


def test_propose_recovers_the_paper_layout_for_a_dit_xl_pattern() -> None:
    cfg = dit_config("DiT-XL/2")
    constant = ConstantMapResult([0, 1, 2, 3], [0, 0.01, 0.02, 0.3], [0, 0, 0, 0], [0, 0.05, 0.1, 0.6], "ddim", 25,
                                 [0], [0])
    steps = list(range(0, 1000, 40))
    prop = propose(cfg, xl_like_variance(), constant, target_ratio=0.6, timesteps=steps)
    assert prop.layout.as_string() == "2,4,1,3,1,1,2"  # SparseDiT-XL's layout (paper Sec. 4.1)
    dense = dit_macs(cfg).gmacs
    assert prop.dense_gmacs == pytest.approx(dense)
    assert prop.expected_gmacs <= 0.6 * dense
    sparse_cfg = SparseDiTConfig.from_dit(cfg, prop.layout, r_min=prop.r_min, r_max=prop.r_max)
    assert schedule_macs(sparse_cfg, steps)["gmacs"] == pytest.approx(prop.expected_gmacs)
    assert prop.r_max > prop.r_min  # variance grows as denoising proceeds -> fewer tokens when noisy
    # the least pruning that meets the budget: with a fixed spread, one rate step less misses it
    fixed = propose(cfg, xl_like_variance(), constant, target_ratio=0.6, timesteps=steps,
                    rule=ProposeRule(rate_spread=0.25))
    assert fixed.r_max == pytest.approx(fixed.r_min + 0.25) and fixed.expected_gmacs <= 0.6 * dense
    looser = SparseDiTConfig.from_dit(cfg, fixed.layout, r_min=round(fixed.r_min - 0.01, 2),
                                      r_max=round(fixed.r_max - 0.01, 2))
    assert schedule_macs(looser, steps)["gmacs"] > 0.6 * dense
    # a constant-map difference above tolerance at k = 2 holds P at 1
    strict = ProposeRule(diff_tolerance=0.07)
    assert propose(cfg, xl_like_variance(), constant, target_ratio=0.6, timesteps=steps, rule=strict).layout.pool == 1
    # a budget in GMACs works the same way; an impossible one is refused
    by_gmacs = propose(cfg, xl_like_variance(), constant, target_gmacs=60.0, timesteps=steps)
    assert by_gmacs.expected_gmacs <= 60.0
    with pytest.raises(SparseditError, match="no layout meets"):
        propose(cfg, xl_like_variance(), constant, target_gmacs=1.0, timesteps=steps)
    with pytest.raises(SparseditError, match="exactly one budget"):
        propose(cfg, xl_like_variance(), constant, timesteps=steps)


def test_propose_fixed_spread_and_flat_trend() -> None:
    cfg = dit_config("DiT-B/2")
    flat = VarianceResult([[0.1] * 5 for _ in range(12)], [999, 750, 500, 250, 0], "ddim", 5, [0], [0])
    prop = propose(cfg, flat, target_ratio=0.7)
    parse_layout(prop.layout.as_string())
    assert prop.layout.depth == 12 and prop.layout.pool == 1  # no uniform prefix: P = min_pool
    assert prop.r_min == prop.r_max  # no trend over the steps -> a constant rate
    spread = propose(cfg, flat, target_ratio=0.7, rule=ProposeRule(rate_spread=0.2))
    assert spread.r_max == pytest.approx(spread.r_min + 0.2)


def test_sparsify_command_quotes_paths() -> None:
    cfg = dit_config("DiT-B/2")
    flat = VarianceResult([[0.1] * 2 for _ in range(12)], [999, 0], "ddim", 2, [0], [0])
    cmd = sparsify_command(propose(cfg, flat, target_ratio=0.8), "my ckpt/DiT.pt", "out dir", model="DiT-B/2",
                           image_size=256)
    argv = shlex.split(cmd)
    assert argv[:3] == ["sparsedit", "sparsify", "my ckpt/DiT.pt"]
    assert argv[argv.index("--out") + 1] == "out dir" and argv[argv.index("--model") + 1] == "DiT-B/2"


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def run_analyze(argv: list[str]) -> tuple[int, str]:
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    analyze_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", *argv])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = args.func(args)
    return code, buf.getvalue()


def is_png(path) -> bool:
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    with Image.open(path) as img:
        img.verify()
    return True


def test_cli_writes_files_and_a_working_proposal(randomize, tmp_path) -> None:
    ckpt = sparsedit.save_pretrained(tiny_dit(randomize), tmp_path / "dit")
    out = tmp_path / "analysis"
    steps, max_k = 3, 2
    code, text = run_analyze([
        "--ckpt", str(ckpt), "--steps", str(steps), "--classes", "0", "1", "--seeds", "1", "--max-k", str(max_k),
        "--out", str(out), "--propose", "--target-ratio", "0.6", "--device", "cpu", "--no-progress", "--json",
    ])
    assert code == 0
    summary = json.loads(text)
    with open(out / "attention_variance.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == DEPTH * steps
    assert {(int(r["layer"]), int(r["step"])) for r in rows} == {(i, s) for i in range(DEPTH) for s in range(steps)}
    var = json.loads((out / "attention_variance.json").read_text())
    assert len(var["variance"]) == DEPTH and var["timesteps"] == space_timesteps(1000, f"ddim{steps}")[::-1]
    const = json.loads((out / "constant_map.json").read_text())
    assert [r["k"] for r in const["rows"]] == [0, 1, 2] and const["rows"][0]["rel_l2"] == 0
    for name in ("attention_variance_heatmap.png", "attention_variance_lines.png", "constant_map.png",
                 "constant_map_samples.png"):
        assert is_png(out / name), name

    prop = json.loads((out / "proposal.json").read_text())
    assert prop == summary["proposal"]
    assert set(prop) >= {"layout", "r_min", "r_max", "num_pieces", "expected_gmacs", "dense_gmacs", "rationale",
                         "command"}
    layout = parse_layout(prop["layout"])
    cfg = sparsedit.load_pretrained(ckpt).config
    sparse_cfg = SparseDiTConfig.from_dit(cfg, layout, r_min=prop["r_min"], r_max=prop["r_max"])
    assert prop["expected_gmacs"] <= 0.6 * prop["dense_gmacs"] + 1e-12
    assert prop["dense_gmacs"] == pytest.approx(dit_macs(cfg).gmacs)
    assert schedule_macs(sparse_cfg, var["timesteps"])["gmacs"] == pytest.approx(prop["expected_gmacs"])

    argv = shlex.split(prop["command"])
    assert argv[:2] == ["sparsedit", "sparsify"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv[1:]) == 0
    model = sparsedit.load_pretrained(argv[argv.index("--out") + 1])
    assert isinstance(model, SparseDiT)
    assert model.config.layout == layout and model.config.r_min == prop["r_min"]


def test_cli_text_output_without_plots(randomize, tmp_path) -> None:
    ckpt = sparsedit.save_pretrained(tiny_dit(randomize, depth=6), tmp_path / "dit")
    out = tmp_path / "a"
    code, text = run_analyze(["--ckpt", str(ckpt), "--steps", "2", "--classes", "3", "--seeds", "1", "--max-k", "0",
                              "--out", str(out), "--no-plots", "--no-progress", "--device", "cpu"])
    assert code == 0 and "mean normalised attention variance" in text
    assert not list(out.glob("*.png")) and not (out / "constant_map.csv").exists()
    with pytest.raises(SparseditError, match="only apply with --propose"):
        run_analyze(["--ckpt", str(ckpt), "--target-ratio", "0.5", "--out", str(out), "--device", "cpu"])
