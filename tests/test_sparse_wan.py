"""SparseWan: SparseDiT on the video tokens of Wan 2.1 / 2.2 (3-D token sets, RoPE at pooled positions, the text
cross-attention on whatever tokens a block holds).

Tiny random Wans (width 32, 2 heads, 5 latent frames of 6 x 10: a 5 x 3 x 5 token volume) are sparsified and run at
flow-matching timesteps ``t = sigma * 1000`` with each step's token set from the schedule; the converted blocks are
checked against their sources at a sparse set equal to the dense one (and the whole model where SparseDiT's design
allows it); pooled positions and the poolingformer against hand computations; then checkpoints, presets, MACs, the
command line, WanPipeline (one transformer and two experts) and the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

import helpers
import sparsedit
from helpers import OpShapes, cli, close, record
from sparsedit.cli import main
from sparsedit.core.schedule import discrete_timestep
from sparsedit.diffusion.flow import euler_sigmas
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.presets import preset_config, resolve_preset
from sparsedit.families.wan import (
    SparseWan,
    SparseWanConfig,
    Wan,
    WanBlock,
    WanConfig,
    cast_like_diffusers,
    rope_table,
    sparsify_wan,
    token_positions,
    use_wan_experts,
    wan_init_rules,
)
from sparsedit.families.wan.model import fp32_norm
from sparsedit.families.wan.sparse_blocks import WanCross, pool_video, pooled_positions, pooled_rope, upsample_video

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT_DIM, TEXT, D = 20, 7, 32  # umT5 width, caption tokens, hidden size of the tiny models
LATENT, FRAMES = (6, 10), 5  # a 3 x 5 token grid per frame, 5 token frames: N = 75
DENSE = ((3, 5), FRAMES)
LAYOUT = "1,1,2,1,2,0,1"  # pool | gen, gen+, sparse, recover, recover+ | top: 7 blocks


def tiny_wan(depth: int = 7, image: bool = False, std: float = 0.2) -> Wan:
    extra = {"image_dim": 24, "added_kv_proj_dim": D, "in_channels": 8} if image else {}
    cfg = WanConfig(**{"input_size": LATENT, "num_frames": FRAMES, "in_channels": 4, "out_channels": 4,
                       "hidden_size": D, "depth": depth, "num_heads": 2, "ffn_dim": 40, "caption_channels": TEXT_DIM,
                       "freq_dim": 32, "max_sequence_length": TEXT, **extra})
    return helpers.randomize(Wan(cfg), std).eval()


def inputs(t: float, batch: int = 2, seed: int = 0, channels: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, FRAMES, *LATENT, generator=gen), torch.full((batch,), float(t)),
            torch.randn(batch, TEXT, TEXT_DIM, generator=gen))


# ------------------------------------------------------------------------------------------------
# the converted model: kinds, rules, token sets per flow timestep
# ------------------------------------------------------------------------------------------------


def test_sparsify_runs_at_the_schedule_tokens_of_each_flow_step() -> None:
    model = sparsify_wan(tiny_wan(), LAYOUT)
    assert type(model) is SparseWan and model.config.model_type == "SparseWan" and not model.training
    assert model.kinds == ["pool", "gen", "gen+", "sparse", "recover", "recover+", "top"]
    assert [type(b).__name__ for b in model.blocks] == ["WanPoolingformer", "WanGenerationBlock", "WanGenerationBlock",
                                                        "WanBlock", "WanRecoveryBlock", "WanCrossDenseBlock", "WanBlock"]
    got = record(model, ["blocks.1", "blocks.2", "blocks.3", "blocks.4"])
    cfg = model.config
    sizes = []
    for sigma in euler_sigmas(6, shift=3.0)[:-1].tolist():  # WanPipeline's Euler run at 480p's shift
        got.clear()
        x, t, text = inputs(sigma * 1000)
        with torch.no_grad():
            out = model(x, t, text)
        assert out.shape == x.shape and torch.isfinite(out).all()
        tokens = cfg.tokens_at(discrete_timestep(sigma * 1000), (3, 5), FRAMES)
        (h, w), f = tokens
        assert [o.shape[1] for i in (1, 2, 3) for _, o in got[f"blocks.{i}"]] == [f * h * w] * 3  # M in every SDTM block
        assert got["blocks.4"][0][1].shape == (2, 75, D)  # recovery: back to the N dense tokens
        args = got["blocks.1"][0][0]  # the generation block: pooled queries at the pooled cells' mean positions
        assert args[5:7] == (DENSE, tokens)
        assert all(torch.equal(a, b) for a, b in zip(args[8], pooled_rope(DENSE, tokens, cfg.rope_axes, x.device),
                                                     strict=True))
        sizes.append(f * h * w)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # the noisiest step (t = 1000) is the sparsest
    assert cfg.tokens_at(999) == ((1, 2), 3) and cfg.tokens_at(0) == ((2, 4), 4)  # frames keep k^(1/4), space k^(3/4)
    x, t, text = inputs(1000.0)
    with torch.no_grad():  # grid= / frames= / keep_ratio= override the schedule
        assert model(x, t, text, grid=(2, 3), frames=2).shape == x.shape
        assert model(x, t, text, keep_ratio=1.0).shape == x.shape
    for bad, words in (({"grid": (4, 5)}, ("within 3x5 x 5",)), ({"frames": 6}, ("within",))):
        with pytest.raises(SparseditError) as err:
            model(x, t, text, **bad)
        helpers.one_line(err, *words)
    with pytest.raises(SparseditError) as err:  # one batch, one token set
        model(x, torch.tensor([1000.0, 0.0]), text)
    helpers.one_line(err, "mixes timesteps", "frames=f")


def test_rules_consume_every_source_tensor_and_keep_dtypes() -> None:
    dense = tiny_wan()
    model = sparsify_wan(dense, "2,1,1,1,2,0,1", extra_recovery="repeat", upsample="bilinear")
    assert model.kinds == ["pool", "pool", "gen", "sparse", "recover", "recover*", "top"]
    src, dst = dense.state_dict(), model.state_dict()
    rules = {r.target: r for r in wan_init_rules(model.config, list(dst))}
    assert family_of(model).init_rules(model) == list(rules.values()) and set(rules) == set(dst)
    assert rules["blocks.0.self_attn.v.weight"].describe() == "blocks.0.self_attn.v.weight <- blocks.0.self_attn.v.weight"
    copies = [k for k, r in rules.items() if r.rule == "copy"]
    assert all(torch.equal(dst[k], src[k]) for k in copies) and len(copies) == len(dst) - 8  # 2 merges x 4 tensors
    for i in (4, 5):  # both merges: W1 = 0, W2 = I
        state = model.blocks[i].state_dict()
        assert not state["merge_sparse.weight"].any() and not state["merge_dense.bias"].any()
        assert torch.equal(state["merge_dense.weight"], torch.eye(D))
    # the only source tensors not read: the poolingformers' q / k projections and their norms
    parts = ("q.weight", "q.bias", "k.weight", "k.bias", "norm_q.weight", "norm_k.weight")
    assert set(src) - {r.source for r in rules.values()} == {f"blocks.{i}.self_attn.{p}" for i in (0, 1) for p in parts}
    x, t, text = inputs(800.0)
    with torch.no_grad():
        assert model(x, t, text).shape == x.shape
    # a bfloat16 Wan loaded as diffusers loads it: the float32 tensors stay float32, the merges take the compute dtype
    half = sparsify_wan(cast_like_diffusers(tiny_wan(), torch.bfloat16), LAYOUT)
    assert half.dtype == torch.bfloat16 and half.blocks[1].modulation.dtype == torch.float32
    assert half.time_embedding[0].weight.dtype == half.blocks[4].norm3.weight.dtype == torch.float32
    assert half.blocks[4].merge_dense.weight.dtype == half.blocks[0].self_attn.v.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert half(x.bfloat16(), t, text.bfloat16()).dtype == torch.bfloat16


def test_training_gives_every_parameter_a_gradient_and_checkpointing_the_same_ones() -> None:
    model = sparsify_wan(tiny_wan(), LAYOUT).train()
    x, t, text = inputs(700.0)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, text).square().mean().backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# token sets: positions of pooled tokens, pooling and upsampling
# ------------------------------------------------------------------------------------------------


def test_pooled_positions_are_the_cells_mean_coordinates() -> None:
    pos = pooled_positions(((4, 6), 5), ((2, 3), 3))
    # by hand: 5 frames -> 3 adaptive cells [0, 2), [1, 4), [3, 5) (overlapping): 0.5, 2, 3.5; 4 rows -> 0.5, 2.5;
    # 6 columns -> 0.5, 2.5, 4.5; frame-major, then row-major, as the tokens are flattened
    hand = list(itertools.product([0.5, 2.0, 3.5], [0.5, 2.5], [0.5, 2.5, 4.5]))
    assert pos.dtype == torch.float64 and pos.tolist() == [list(p) for p in hand]
    for dense, sparse in ((((4, 6), 5), ((2, 3), 3)), (((5, 7), 21), ((3, 4), 13)), (DENSE, DENSE)):
        coords = token_positions(dense[1], dense[0])[None]  # (1, N, 3): the same numbers as pooling the coordinates
        assert torch.equal(pooled_positions(dense, sparse), pool_video(coords, dense, sparse)[0])
    assert torch.equal(pooled_positions(DENSE, DENSE), token_positions(FRAMES, (3, 5)))  # equal sets: the dense ones
    cos, sin = rope_table(pos, (8, 4, 4))  # 16-channel heads: frames 8, rows 4, columns 4 channels
    assert cos[6, 0].item() == pytest.approx(torch.tensor(2.0).cos().item(), abs=1e-7)  # frame 2.0, frequency 1
    assert sin[-1, 6].item() == pytest.approx(torch.tensor(4.5).sin().item(), abs=1e-7)  # column 4.5, frequency 1
    v = torch.randn(2, 75, D)
    assert torch.equal(pool_video(v, DENSE, DENSE), v) and torch.equal(upsample_video(v, DENSE, DENSE, "nearest"), v)
    up = upsample_video(pool_video(v, DENSE, ((1, 1), 1)), ((1, 1), 1), DENSE, "bicubic")  # one cell: the mean
    assert torch.allclose(up, v.mean(1, keepdim=True).expand_as(v), atol=1e-6)
    for mode in ("nearest", "bilinear", "bicubic"):
        assert upsample_video(v[:, :12], ((2, 3), 2), DENSE, mode).shape == v.shape


# ------------------------------------------------------------------------------------------------
# what the converted model computes at a sparse set equal to the dense one
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_blocks_reduce_to_the_dense_blocks_at_the_dense_token_set() -> None:
    dense = tiny_wan()
    model = sparsify_wan(dense, "0,1,2,1,2,1,1", r_min=0.0, r_max=0.0)  # gen, gen+, sparse, recover, recover+, dense, top
    got = record(model, [f"blocks.{i}" for i in range(7)])
    x, t, text = inputs(900.0)
    model(x, t, text)
    inp = dense.embed(x, t, text)
    rope = dense.rope(FRAMES, (3, 5), x.device)
    gen_in = None
    for i, kind in enumerate(model.kinds):
        (args, out), = got[f"blocks.{i}"]
        src = dense.blocks[i]
        if kind == "gen":  # pooling to the same set is the identity; attending to itself is self-attention
            assert args[0] is None and args[5] == args[6] == DENSE
            assert all(torch.equal(a, b) for a, b in zip(args[8], rope, strict=True))
            gen_in = args[4]
            want = src(gen_in, inp.context, 0, inp.e, rope)
        elif kind == "gen+":  # refines the sparse tokens against the dense ones the SDTM started from
            assert torch.equal(args[4], gen_in)
            want = WanCross.cross(src, args[0], gen_in, inp.context, 0, inp.e, rope, rope)
        elif kind == "recover":  # the source block with X_in as queries (W1 = 0, W2 = I), the sparse tokens as keys
            sparse = got[f"blocks.{i - 1}"][0][1]
            assert torch.equal(args[0], gen_in) and torch.equal(args[4], sparse)
            want = WanCross.cross(src, gen_in, sparse, inp.context, 0, inp.e, rope, rope)
        elif kind == "recover+":
            want = WanCross.cross(src, args[0], args[4], inp.context, 0, inp.e, rope, rope)
        else:  # sparse, dense, top: the Wan block itself
            assert type(model.blocks[i]) is WanBlock
            want = src(*args)
        assert torch.equal(out, want), (i, kind)  # op for op: bit-identical
    h = torch.randn(2, 75, D)  # and the cross form of a source block with its own tokens as keys is the block itself
    assert torch.equal(WanCross.cross(dense.blocks[0], h, h, inp.context, 0, inp.e, rope, rope),
                       dense.blocks[0](h, inp.context, 0, inp.e, rope))


def _zero_branches(block: WanBlock) -> None:
    """Zero the outputs of the block's self-attention, cross-attention and FFN: the block passes its tokens on.
    (Wan's gates are the shared time modulation plus a per-block table, so no per-block gate is zero at every t.)"""
    for layer in (block.self_attn.o, block.cross_attn.o, block.ffn[2]):
        layer.weight.zero_()
        layer.bias.zero_()


@torch.no_grad()
def test_whole_model_at_the_dense_token_set() -> None:
    """K = 0: the source bit for bit. P = 0, K = 1, fresh W1 / W2: the recovery merge restarts from the SDTM's input,
    so the SparseWan equals the Wan where the SDTM's generation and sparse blocks leave the tokens alone."""
    x, t, text = inputs(1000.0)
    dense = tiny_wan()
    only_top = sparsify_wan(dense, "0,0,0,0,0,0,7", r_min=0.0, r_max=0.0)
    assert torch.equal(only_top(x, t, text), dense(x, t, text))
    layout = "0,1,1,2,1,1,2"  # gen, sparse, sparse, recover, dense, top, top
    changed = sparsify_wan(dense, layout, r_min=0.0, r_max=0.0)  # the sparse blocks' changes are dropped (W1 = 0)
    assert not torch.allclose(changed(x, t, text), dense(x, t, text), atol=1e-3)
    for i in (0, 1, 2):
        _zero_branches(dense.blocks[i])
    model = sparsify_wan(dense, layout, r_min=0.0, r_max=0.0)
    assert close(model(x, t, text), dense(x, t, text))


# ------------------------------------------------------------------------------------------------
# the poolingformer: the uniform map, mean-first
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_poolingformer_is_the_uniform_map_computed_mean_first() -> None:
    dense = tiny_wan()
    model = sparsify_wan(dense, "2,0,0,0,0,0,5")
    x, t, text = inputs(600.0)
    inp = dense.embed(x, t, text)
    rope = dense.rope(FRAMES, (3, 5), x.device)
    block, src, n = model.blocks[0], dense.blocks[0], 75
    mode = OpShapes()
    with mode:
        out = block(inp.tokens, inp.context, 0, inp.e, rope)
    assert not [s for s in mode.shapes if s[-2:] == (n, n)]  # no N x N map anywhere
    assert not torch.allclose(out, src(inp.tokens, inp.context, 0, inp.e, rope), atol=1e-3)
    # by hand, from the source's weights: an explicit uniform (N x N) map over the values of all N tokens
    shift1, scale1, gate1, shift2, scale2, gate2 = (src.modulation + inp.e).chunk(6, dim=1)
    h0 = inp.tokens
    values = src.self_attn.v(fp32_norm(src.norm1, h0) * (1 + scale1) + shift1).unflatten(2, (2, 16)).transpose(1, 2)
    uniform = torch.full((2, 2, n, n), 1.0 / n)  # (B, H, N, N)
    attn = (uniform @ values).transpose(1, 2).flatten(2)  # (B, N, D): every row the mean of V
    h = h0 + src.self_attn.o(attn) * gate1
    h = h + src.cross_attn(fp32_norm(src.norm3, h), inp.context, 0)
    h = h + src.ffn(fp32_norm(src.norm2, h) * (1 + scale2) + shift2) * gate2
    assert close(out, h)


# ------------------------------------------------------------------------------------------------
# checkpoints, family, presets, costs, command line
# ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_and_family_members(tmp_path: Path) -> None:
    dense = tiny_wan()
    model = sparsify_wan(dense, LAYOUT, r_min=0.5, r_max=0.8, temporal_share=1 / 3)
    out = sparsedit.save_model(model, tmp_path / "sparse")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "SparseWan" and cfg["recovery_pos_embed"] is False and cfg["temporal_share"] == 1 / 3
    back = sparsedit.load_model(out)
    assert type(back) is SparseWan and back.config == model.config
    x, t, text = inputs(987.5)
    with torch.no_grad():
        assert torch.equal(back(x, t, text), model(x, t, text))
    fam = family_of(back)
    assert fam.sparse and fam.dense_config() == dense.config and fam.block_kinds() == model.kinds
    sets = fam.token_sets()
    assert sets == [((2, 3), 3), ((2, 4), 4)] and fam.tokens_label(sets[0]) == "2x3x3f"
    assert fam.tokens_at(1000.0) == sets[0] and fam.tokens_at(0) == sets[-1]
    assert fam.describe(sets[0]) == {"forward_grid": [2, 3], "forward_frames": 3} and fam.split_tokens(sets[0]) == ((2, 3), 3)
    with torch.no_grad():
        assert torch.equal(fam.call(back, x, t, {"encoder_hidden_states": text}, sets[1]),
                           back(x, t, text, grid=(2, 4), frames=4))
    from sparsedit.eval.bench import BenchSettings, bench_forward

    assert bench_forward(back, 1, 500, settings=BenchSettings(repeats=1)).n == 1
    with pytest.raises(SparseditError) as err:
        fam.sparsify(back, LAYOUT, None)
    helpers.one_line(err, "already a SparseWan")
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(back, tmp_path / "diffusers", fmt="diffusers")
    helpers.one_line(err, "no diffusers format")
    for bad, words in (({"recovery_pos_embed": True}, ("no position table",)), ({"num_pieces": 3}, ("num_pieces",)),
                       ({"temporal_share": 1.5}, ("temporal_share",))):
        with pytest.raises(SparseditError) as err:
            sparsify_wan(dense, LAYOUT, **bad)
        helpers.one_line(err, *words)
    with pytest.raises(SparseditError) as err:
        sparsify_wan(dense, "2,4,1,3,1,1,4")
    helpers.one_line(err, "depth 7")
    with pytest.raises(SparseditError) as err:
        family_of(dense).call(dense, x, t, {"encoder_hidden_states": text}, ((2, 2), 1))
    helpers.one_line(err, "dense Wan")
    assert family_of(dense).tokens_at(1000.0) is None
    i2v = sparsify_wan(tiny_wan(image=True), LAYOUT)  # image-to-video: the image tokens are cross-attention keys too
    x8, _, _ = inputs(900.0, channels=8)
    with torch.no_grad():
        assert i2v(x8, t, torch.randn(2, 512, TEXT_DIM), torch.randn(2, 257, 24)).shape == (2, 4, FRAMES, *LATENT)


@pytest.mark.parametrize("name, layout, depth", [("SparseWan2.1-T2V-1.3B", "2,4,1,3,1,1,4", 30),
                                                 ("SparseWan2.1-I2V-14B-480P", "2,4,1,5,1,1,6", 40),
                                                 ("SparseWan2.1-T2V-14B", "2,4,1,5,1,1,6", 40),
                                                 ("SparseWan2.2-T2V-A14B", "2,4,1,5,1,1,6", 40)])
def test_presets(name: str, layout: str, depth: int) -> None:
    dense, got = resolve_preset(name, 480)
    assert got == layout and dense.model_type == "Wan" and dense.depth == depth
    cfg = preset_config(name, 480)
    assert type(cfg) is SparseWanConfig and cfg.layout.as_string() == layout and cfg.layout.depth == depth
    assert (cfg.r_min, cfg.r_max, cfg.temporal_share, cfg.num_pieces) == (0.61, 0.86, 0.25, None)
    fam = family_of(cfg)
    assert fam.token_sets()[0] == ((14, 25), 13) and fam.token_sets()[-1] == ((21, 37), 17)
    assert fam.tokens_at(1000.0) == ((14, 25), 13)  # 4,550 of the 32,760 tokens at the noisiest step


def flops_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["flops", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("name, dense_gmacs, sparse_gmacs, lo, hi, d", [
    ("Wan2.1-T2V-1.3B", 141_500.893888512, 60_969.74, 53_871.97, 72_504.74, 1536),
    ("Wan2.1-T2V-14B", 839_185.14159616, 365_281.96, 320_064.41, 437_989.87, 5120)])
def test_flops_of_the_sparse_presets_are_those_of_the_docs(name: str, dense_gmacs: float, sparse_gmacs: float,
                                                           lo: float, hi: float, d: int) -> None:
    sparse = flops_json("--model", f"Sparse{name}", "--image-size", "480")
    dense = flops_json("--model", name, "--image-size", "480")
    assert sparse["model_type"] == "SparseWan" and (sparse["sampler"], sparse["steps"]) == ("euler", 50)
    assert dense["gmacs"] == pytest.approx(dense_gmacs) and sparse["dense_gmacs"] == dense["gmacs"]
    assert (sparse["gmacs"], sparse["gmacs_min"], sparse["gmacs_max"]) == pytest.approx((sparse_gmacs, lo, hi), abs=0.01)
    assert sparse["gmacs"] < 0.44 * dense["gmacs"]  # docs/wan.md: -56.9% (1.3B), -56.5% (14B)
    assert sparse["grids"][0] == {**sparse["grids"][0], "grid": [14, 25], "frames": 13, "tokens": 4550}
    # 4 recovery merges add W1, W2 (2 (D^2 + D) each); 2 poolingformers drop q, k (2 (D^2 + D)) and their norms (2 D)
    assert sparse["params"] == dense["params"] + 8 * (d * d + d) - 2 * (2 * (d * d + d) + 2 * d)



def test_sparsify_cli_on_a_diffusers_directory(tmp_path: Path) -> None:
    from test_wan import tiny_reference

    tiny_reference(layers=4).save_pretrained(tmp_path / "wan")
    code, out, err = cli("sparsify", tmp_path / "wan", "--layout", "0,1,1,1,1,0,1", "--r-min", "0.5", "--verbose",
                         "--out", tmp_path / "s")
    assert code == 0, err
    assert "blocks.2.merge_dense.weight <- identity" in out and "wrote SparseWan" in out
    assert "dense grid 30x52, sparse token sets 14x25x13f, " in out  # no size in a diffusers config: 480p, 81 frames
    model = sparsedit.load_model(tmp_path / "s")
    assert type(model) is SparseWan and model.config.r_min == 0.5 and model.config.recovery_pos_embed is False
    code, _, err = cli("sparsify", tmp_path / "wan", "--layout", "0,1,1,1,1,0,1", "--num-pieces", "3", "--out",
                       tmp_path / "t")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--num-pieces" in err and not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------------------
# WanPipeline (one transformer, two experts) and the trainer
# ------------------------------------------------------------------------------------------------


def spy_tokens(model: SparseWan, seen: list[tuple[float, tuple]]) -> None:
    choose = model.sparse_tokens

    def spy(t: Tensor, *rest: object) -> tuple:
        tokens = choose(t, *rest)  # type: ignore[arg-type]
        seen.append((float(t[0]), tokens))
        return tokens

    model.sparse_tokens = spy  # type: ignore[method-assign]


def test_wan_pipeline_runs_each_step_at_its_token_set(tmp_path: Path) -> None:
    from test_wan import CALL, tiny_pipeline, tiny_reference

    high, low = tiny_reference(channels=16, layers=4), tiny_reference(channels=16, layers=4)
    for ref, folder in ((high, "high"), (low, "low")):
        ref.save_pretrained(tmp_path / folder)
    noise = torch.randn(1, 16, 3, *LATENT)  # 9 frames -> 3 latent frames of 48 x 80 px: a 3 x 3 x 5 volume
    model = sparsify_wan(sparsedit.load_model(tmp_path / "high"), "0,1,1,1,1,0,1", r_min=0.3, r_max=0.8)
    seen: list[tuple[float, tuple]] = []
    spy_tokens(model, seen)
    pipe = tiny_pipeline(high)
    sparsedit.interop.use_in_pipeline(pipe, model)
    frames = pipe(latents=noise.clone(), **CALL).frames
    assert frames.shape == noise.shape and torch.isfinite(frames).all()
    steps = pipe.scheduler.timesteps.tolist()  # sigma * 1000, passed on as they are; two calls per step (guidance)
    assert [t for t, _ in seen] == pytest.approx([t for t in steps for _ in (0, 1)], abs=1e-3)
    want = [model.config.tokens_at(discrete_timestep(t), (3, 5), 3) for t in steps]
    assert [s for _, s in seen[::2]] == want and want[0] == ((2, 3), 2) and want[0] != want[-1]
    # Wan2.2-A14B: each expert is its own SparseWan and sees only its side of the boundary (0.5 here)
    pipe = tiny_pipeline(high, low)
    experts = [sparsify_wan(sparsedit.load_model(tmp_path / f), "0,1,1,1,1,0,1", r_min=r, r_max=0.8)
               for f, r in (("high", 0.8), ("low", 0.3))]  # the high-noise expert at one constant rate
    calls: list[list[tuple[float, tuple]]] = [[], []]
    for m, c in zip(experts, calls, strict=True):
        spy_tokens(m, c)
    use_wan_experts(pipe, *experts)
    pipe(latents=noise.clone(), **CALL)
    assert calls[0] and calls[1] and min(t for t, _ in calls[0]) >= 500 > max(t for t, _ in calls[1])
    assert {s for _, s in calls[0]} == {experts[0].config.tokens_at(999, (3, 5), 3)}


def test_image_to_video_pipeline_runs_each_step_at_its_token_set(tmp_path: Path) -> None:
    """WanImageToVideoPipeline (Wan2.1-I2V: 36 input channels = latents + the first frame's latents and mask, CLIP
    image tokens as extra cross-attention keys): the dense model reproduces the pipeline's own transformer, and a
    SparseWan of it runs every call at the token set of its timestep."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image

    from test_wan import CALL, IMAGE_DIM, tiny_pipeline

    torch.manual_seed(0)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36,
                                out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=40, num_layers=4,
                                rope_max_seq_len=32, image_dim=IMAGE_DIM, added_kv_proj_dim=32)
    helpers.randomize(ref, 0.3)
    ref.save_pretrained(tmp_path / "i2v")
    text_pipe = tiny_pipeline(ref)
    parts = text_pipe.components
    # The I2V pipeline's own prompt cleaning needs ftfy: give it the embeddings. 512 tokens: diffusers' Wan takes the
    # last 512 context tokens as the caption and the rest as the image tokens, whatever the caption's length.
    with torch.no_grad():
        embeds, negative = text_pipe.encode_prompt(CALL["prompt"], CALL["negative_prompt"], True,
                                                   max_sequence_length=512)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanImageToVideoPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                                   scheduler=parts["scheduler"], image_processor=processor, image_encoder=encoder,
                                   transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((torch.rand(48, 80, 3) * 255).to(torch.uint8).numpy())
    call = {**{k: v for k, v in CALL.items() if "prompt" not in k}, "image": image, "prompt_embeds": embeds,
            "negative_prompt_embeds": negative}
    noise = torch.randn(1, 16, 3, *LATENT)
    expected = pipe(latents=noise.clone(), **call).frames
    sparsedit.interop.use_in_pipeline(pipe, sparsedit.load_model(tmp_path / "i2v"))
    assert close(pipe(latents=noise.clone(), **call).frames, expected)  # the dense model is the pipeline's own
    model = sparsify_wan(sparsedit.load_model(tmp_path / "i2v"), "0,1,1,1,1,0,1", r_min=0.3, r_max=0.8)
    seen: list[tuple[float, tuple]] = []
    spy_tokens(model, seen)
    sparsedit.interop.use_in_pipeline(pipe, model)
    frames = pipe(latents=noise.clone(), **call).frames
    assert frames.shape == noise.shape and torch.isfinite(frames).all()
    steps = pipe.scheduler.timesteps.tolist()
    want = [model.config.tokens_at(discrete_timestep(t), (3, 5), 3) for t in steps]
    assert [s for _, s in seen[::2]] == want and want[0] != want[-1]


def test_sample_cli_writes_a_sparse_wan_video(tmp_path: Path) -> None:
    from PIL import Image

    from test_wan import tiny_pipeline, tiny_reference

    ref = tiny_reference(channels=16, layers=4)
    tiny_pipeline(ref).save_pretrained(tmp_path / "pipe")  # umT5 and the Wan VAE come from the pipeline folder
    dense = sparsedit.load_model(tmp_path / "pipe")
    dense.config = dataclasses.replace(dense.config, num_frames=3)  # a 9-frame clip
    sparsedit.save_model(sparsify_wan(dense, "0,1,1,1,1,0,1"), tmp_path / "sparse")
    out = tmp_path / "v.gif"
    code, _, err = cli("sample", "--ckpt", tmp_path / "sparse", "--pipeline", tmp_path / "pipe", "--image-size", "48",
                       "--prompt", "a small cactus", "--steps", "2", "--seed", "1", "--device", "cpu", "--no-progress",
                       "--out", out)
    assert code == 0, err
    assert Image.open(out).n_frames == 9  # 3 latent frames decoded as one clip


def test_an_expert_trains_on_its_own_timesteps(tmp_path: Path) -> None:
    from sparsedit.families.latte.sparse import VideoPieceSampler

    dense = preset_config("Wan2.2-T2V-A14B", 480)
    high = SparseWanConfig.from_wan(dense, "SparseWan2.2-A14B-high")
    low = SparseWanConfig.from_wan(dense, "SparseWan2.2-A14B-low", r_min=0.5)
    assert high.layout.as_string() == low.layout.as_string() == "2,4,1,5,1,1,6"
    assert (high.train_timesteps, low.train_timesteps, low.r_min) == ((875, 1000), (0, 875), 0.5)
    sampler = family_of(high).timestep_sampler(torch.Generator().manual_seed(0))
    assert sampler.pieces[0].t_start == 875 and sampler.pieces[-1].t_end == 1000
    assert sum(sampler.piece_probabilities()) == pytest.approx(1.0)
    for _ in range(200):  # only the expert's steps, one token set per batch
        t, piece = sampler.sample(3)
        assert bool(((t >= 875) & (t < 1000)).all()) and {high.tokens_at(int(v)) for v in t} == {(piece.grid, piece.frames)}
    full = SparseWanConfig.from_wan(dense, "2,4,1,5,1,1,6")
    ours = family_of(full).timestep_sampler(torch.Generator().manual_seed(3))
    latte = VideoPieceSampler(full, torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    assert all(torch.equal(ours.sample(4)[0], latte.sample(4)[0]) for _ in range(20))  # no range: the same draws
    model = sparsify_wan(tiny_wan(), LAYOUT, train_timesteps=(500, 1000))
    back = sparsedit.load_model(sparsedit.save_model(model, tmp_path / "expert"))
    assert back.config == model.config and back.config.train_timesteps == (500, 1000)
    with pytest.raises(SparseditError) as err:
        sparsify_wan(tiny_wan(), LAYOUT, train_timesteps=(900, 800))
    helpers.one_line(err, "train_timesteps", "(875, 1000)")


def test_trainer_draws_one_token_set_per_batch(tmp_path: Path) -> None:
    from sparsedit.train import Trainer, TrainSettings
    from sparsedit.train.data import LatentsDataset, save_latents

    g = torch.Generator().manual_seed(0)
    meta = {"scale_factor": 1.0, "vae": "tiny AutoencoderKLWan", "resolution": 48, "latents_mean": [0.0] * 4,
            "latents_std": [1.0] * 4}
    save_latents(tmp_path / "d", torch.randn(4, FRAMES, 4, *LATENT, generator=g), None, meta, kind="latents",
                 captions=torch.randn(4, TEXT, TEXT_DIM, generator=g))
    model = sparsify_wan(tiny_wan(), LAYOUT).train()
    settings = TrainSettings(steps=6, batch_size=2, lr=1e-3, log_every=1, ckpt_every=100)
    trainer = Trainer(model, LatentsDataset(tmp_path / "d", apply_scale_factor=True), tmp_path / "run", settings,
                      progress=False, device="cpu")
    drawn: list[tuple] = []
    sample = trainer.pieces.sample

    def recording(n: int, device: object = None) -> tuple:
        t, piece = sample(n, device)
        drawn.append((piece, t))
        return t, piece

    trainer.pieces.sample = recording  # type: ignore[method-assign]
    trainer.fit()
    cfg = model.config
    for piece, t in drawn:  # every t of a batch uses its piece's token set
        assert {cfg.tokens_at(int(v)) for v in t} == {(piece.grid, piece.frames)}
    assert len({(p.grid, p.frames) for p, _ in drawn}) > 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grid"] for r in rows] == [p.label for p, _ in drawn] and rows[0]["grid"].endswith("f")
    # the command line: --init-from a Wan with --layout, output and feature distillation from it, a LoRA
    sparsedit.save_model(tiny_wan(), tmp_path / "wan")
    code, _, err = cli("train", "--init-from", tmp_path / "wan", "--layout", LAYOUT, "--data", tmp_path / "d",
                       "--batch-size", "2", "--steps", "1", "--ckpt-every", "1", "--log-every", "1", "--no-progress",
                       "--device", "cpu", "--distill-weight", "1", "--feature-weight", "1", "--lora-rank", "2",
                       "--run-dir", tmp_path / "cli")
    assert code == 0, err
    row = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["distill"] > 0 and row["feature"] > 0 and row["grid"].endswith("f")
    assert type(sparsedit.load_model(tmp_path / "cli" / "model")) is SparseWan
