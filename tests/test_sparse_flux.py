"""SparseFLUX: SparseDiT on the image tokens of FLUX.1 (double- and single-stream blocks, RoPE), the text dense in
every block.

Tiny randomised FLUXes (dev-style with a guidance embedding, schnell-style without) with 3 double- and 4 single-stream
blocks are sparsified and run at flow-matching timesteps ``t = sigma * 1000`` with the grid of each step from the
schedule; the converted blocks are checked against their sources at the dense grid (and the whole model where
SparseDiT's design allows it); the pooled tokens' RoPE positions and the poolingformers against hand computations;
then checkpoints, presets, MACs, the command line and FluxPipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor

import helpers
import sparsedit
from helpers import OpShapes, cli, close, record
from sparsedit.cli import main
from sparsedit.core.blocks import pool_tokens
from sparsedit.core.layers import modulate
from sparsedit.core.schedule import discrete_timestep
from sparsedit.diffusion.flow import euler_sigmas, resolution_mu
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.flux import (
    DoubleStreamBlock,
    Flux,
    FluxConfig,
    SingleStreamBlock,
    SparseFlux,
    SparseFluxConfig,
    apply_rope,
    flux_init_rules,
    position_ids,
    rope_table,
    sparse_position_ids,
    sparsify_flux,
)
from sparsedit.families.flux.sparse_blocks import DoubleCross, SingleCross
from sparsedit.families.presets import preset_config, resolve_preset
from sparsedit.interop import use_in_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, POOLED, TEXT = 24, 12, 5  # T5 width, CLIP width, caption tokens of the tiny models
LATENT = (12, 16)  # a 6 x 8 token grid (non-square)
GRID = (6, 8)
LAYOUT = "1,1,2,1,2,0,1"  # pool, gen, gen+ (double) | sparse, recover, recover+, top (single)
D = 32


def tiny_flux(guidance: bool = True, depths: tuple[int, int] = (3, 4), std: float = 0.2) -> Flux:
    """3 double- and 4 single-stream blocks of width 32 (2 heads of 16: RoPE axes 4 / 6 / 6), random weights."""
    cfg = FluxConfig(input_size=LATENT, in_channels=4, hidden_size=D, depth_double=depths[0], depth_single=depths[1],
                     num_heads=2, axes_dims_rope=(4, 6, 6), caption_channels=CAPTION, pooled_channels=POOLED,
                     guidance_embeds=guidance, max_sequence_length=TEXT)
    return helpers.randomize(Flux(cfg), std).eval()


def inputs(t: float, guidance: bool = True, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *LATENT, generator=gen), torch.full((batch,), float(t)),
            torch.randn(batch, TEXT, CAPTION, generator=gen), torch.randn(batch, POOLED, generator=gen),
            torch.full((batch,), 3.5) if guidance else None)




# ------------------------------------------------------------------------------------------------
# the converted model: kinds, rules, grids per flow timestep
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_sparsify_runs_at_the_schedule_grid_of_each_flow_step(guidance: bool) -> None:
    model = sparsify_flux(tiny_flux(guidance), LAYOUT)
    assert type(model) is SparseFlux and model.config.model_type == "SparseFLUX" and not model.training
    assert model.kinds == ["pool", "gen", "gen+", "sparse", "recover", "recover+", "top"]
    assert [type(b).__name__ for b in model.blocks] == ["DoublePoolingformer", "DoubleGenerationBlock",
                                                        "DoubleGenerationBlock", "SingleStreamBlock",
                                                        "SingleRecoveryBlock", "SingleCrossDenseBlock",
                                                        "SingleStreamBlock"]
    seen: list[tuple] = []
    for i in (1, 2, 3):  # gen, gen+ (double) and the sparse single-stream block
        model.blocks[i].register_forward_hook(lambda m, a, o: seen.append((o[0].shape[1], o[1].shape)))
    schedule = model.config.schedule
    # FLUX.1-dev's run shifts its sigmas by the resolution, schnell's does not
    sigmas = euler_sigmas(6, mu=resolution_mu(48) if guidance else 0.0)[:-1]
    sizes = []
    for sigma in sigmas.tolist():
        seen.clear()
        x, t, text, pooled, g = inputs(sigma * 1000, guidance)
        with torch.no_grad():
            out = model(x, t, text, pooled, g)
        assert out.shape == x.shape and torch.isfinite(out).all()
        grid = schedule.grid(discrete_timestep(sigma * 1000), GRID)
        assert [s[0] for s in seen] == [grid[0] * grid[1]] * 3  # every SDTM block at the step's grid
        assert all(s[1] == (2, TEXT, D) for s in seen)  # the text stays dense
        sizes.append(grid[0] * grid[1])
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # sparsest at the noisiest step (t = 1000)
    assert schedule.grid(discrete_timestep(1000.0), GRID) == (2, 3)
    x, t, text, pooled, g = inputs(1000.0, guidance)
    with torch.no_grad():  # grid= overrides the schedule; one batch mixing grids is refused
        assert model(x, t, text, pooled, g, grid=(3, 5)).shape == x.shape
    with pytest.raises(SparseditError) as err:
        model(x, torch.tensor([1000.0, 0.0]), text, pooled, g)
    helpers.one_line(err, "grid")


def test_rules_every_source_key_and_extra_recovery_repeat() -> None:
    dense = tiny_flux()
    model = sparsify_flux(dense, "4,0,0,0,0,0,3")  # poolingformers of both block types
    src, dst = dense.state_dict(), model.state_dict()
    rules = {r.target: r for r in flux_init_rules(model.config, list(dst))}
    assert family_of(model).init_rules(model) == list(rules.values())
    assert rules["blocks.0.img_attn.kv.weight"].describe() == \
        "blocks.0.img_attn.kv.weight <- blocks.0.img_attn.qkv.weight[32:96] (K, V of qkv)"
    assert torch.equal(dst["blocks.2.img_attn.kv.bias"], src["blocks.2.img_attn.qkv.bias"][D:])
    copies = [k for k, r in rules.items() if r.rule == "copy"]
    assert all(torch.equal(dst[k], src[k]) for k in copies) and "blocks.3.linear1.weight" in copies
    used = {r.source for r in rules.values()}
    # the only source tensors not read: the image query norms of the double-stream poolingformers (the single-stream
    # one keeps its query rows and norm for the text queries)
    assert set(src) - used == {f"blocks.{i}.img_attn.norm.query_norm.scale" for i in range(3)}
    repeat = sparsify_flux(dense, "0,1,1,1,2,1,2", extra_recovery="repeat", upsample="bilinear")
    assert repeat.kinds[2:4] == ["recover", "recover*"]  # a double- and a single-stream recovery block
    for i in (2, 3):  # both merge: W1 = 0, W2 = I
        state = repeat.blocks[i].state_dict()
        assert not state["merge_sparse.weight"].any() and not state["merge_dense.bias"].any()
        assert torch.equal(state["merge_dense.weight"], torch.eye(D))
    x, t, text, pooled, g = inputs(800.0)
    with torch.no_grad():
        assert repeat(x, t, text, pooled, g).shape == x.shape


def test_training_step_gives_every_parameter_a_gradient() -> None:
    model = sparsify_flux(tiny_flux(), "4,1,1,1,1,0,0").train()  # pools of both types; gen, sparse, recover single
    x, t, text, pooled, g = inputs(700.0)
    model(x, t, text, pooled, g).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ------------------------------------------------------------------------------------------------
# RoPE positions of pooled tokens
# ------------------------------------------------------------------------------------------------


def test_pooled_positions_are_the_mean_coordinates() -> None:
    ids = sparse_position_ids((4, 6), (2, 3), 2)
    # by hand: 4 rows pool into [0, 2) and [2, 4) (means 0.5, 2.5), 6 columns into [0, 2), [2, 4), [4, 6)
    rows, cols = [0.5, 0.5, 0.5, 2.5, 2.5, 2.5], [0.5, 2.5, 4.5] * 2
    assert ids.tolist() == [[0.0, 0.0, 0.0]] * 2 + [[0.0, r, c] for r, c in zip(rows, cols, strict=True)]
    # the same numbers as average-pooling the dense coordinates, also where adaptive cells overlap (5 -> 3)
    for dense, sparse in (((4, 6), (2, 3)), ((5, 7), (3, 4)), ((6, 8), (6, 8))):
        coords = position_ids(dense, 0)[None]  # (1, N, 3)
        assert torch.equal(sparse_position_ids(dense, sparse, 0), pool_tokens(coords, dense, sparse)[0])
    assert sparse_position_ids((5, 5), (3, 3), 0)[:, 1].unique().tolist() == [0.5, 2.0, 3.5]
    assert torch.equal(sparse_position_ids(GRID, GRID, TEXT), position_ids(GRID, TEXT))
    # the cos / sin tables of fractional positions, computed in float64 as the dense model does
    cos, sin = rope_table(ids, (4, 6, 6), 10000.0)
    angle = 4.5 * 10000.0 ** (-2 / 6)  # last token, column axis (channels 10..15), frequency k = 1
    assert cos[-1, 12].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert sin[-1, 13].item() == pytest.approx(math.sin(angle), abs=1e-7)
    assert torch.equal(cos[:2], torch.ones(2, 16)) and not sin[:2].any()  # text at (0, 0, 0): no rotation


# ------------------------------------------------------------------------------------------------
# what the converted model computes at the dense grid
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["0,1,2,1,2,0,2", "0,2,1,1,1,0,1"])
@torch.no_grad()
def test_blocks_reduce_to_the_dense_blocks_at_the_dense_grid(layout: str) -> None:
    """r = 0: the sparse grid is the dense one and the pooled positions are the dense positions. The first layout
    has gen / gen+ / sparse double-stream, recover / recover+ single-stream; the second one SDTM of each type."""
    dense = tiny_flux()
    model = sparsify_flux(dense, layout, r_min=0.0, r_max=0.0)
    got = record(model, [f"blocks.{i}" for i in range(7)])
    x, t, text, pooled, g = inputs(900.0)
    model(x, t, text, pooled, g)
    _, _, _, vec, _ = dense.embed(x, t, text, pooled, g)
    rope = dense.rope(GRID, TEXT, x.device)
    gen_in = None
    for i, kind in enumerate(model.kinds):
        (args, out), = got[f"blocks.{i}"]
        src = dense.blocks[i]
        cross = (DoubleCross if isinstance(src, DoubleStreamBlock) else SingleCross).cross
        if kind == "gen":  # pooling to the same grid is the identity; cross-attention to itself is self-attention
            assert args[0] is None and args[5] == GRID and all(torch.equal(a, b) for a, b in zip(args[7], rope, strict=True))
            gen_in = args[3]
            want = src(gen_in, args[1], vec, rope)
        elif kind == "gen+":  # refines the sparse tokens against the dense ones the SDTM started from
            assert torch.equal(args[3], gen_in)
            want = cross(src, args[0], args[1], vec, gen_in, rope, rope)
        elif kind == "recover":  # X_in (W1 = 0, W2 = I), image keys / values from the sparse tokens
            sparse = got[f"blocks.{i - 1}"][0][1][0]
            assert torch.equal(args[0], gen_in) and torch.equal(args[3], sparse)
            want = cross(src, gen_in, args[1], vec, sparse, rope, rope)
        elif kind == "recover+":
            want = cross(src, args[0], args[1], vec, args[3], rope, rope)
        else:  # sparse, top: the dense block itself
            want = src(*args)
        assert close(out[0], want[0]) and close(out[1], want[1]), (i, kind)
    # and the cross-attending form of every source block with its own tokens as keys is the block itself
    img, txt = torch.randn(2, 48, D), torch.randn(2, TEXT, D)
    for src in (dense.blocks[0], dense.blocks[3]):
        cross = (DoubleCross if isinstance(src, DoubleStreamBlock) else SingleCross).cross
        assert all(close(a, b) for a, b in zip(cross(src, img, txt, vec, img, rope, rope), src(img, txt, vec, rope), strict=True))


def _zero_image_gates(block: DoubleStreamBlock) -> None:
    """Zero the image stream's attention and MLP gates: the block leaves the image tokens as they are."""
    lin = block.img_mod.lin
    for chunk in (2, 5):
        lin.weight[chunk * D:(chunk + 1) * D] = 0
        lin.bias[chunk * D:(chunk + 1) * D] = 0


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@torch.no_grad()
def test_whole_model_at_the_dense_grid(guidance: bool) -> None:
    """P = 0, r = 0, fresh W1 / W2. SparseDiT's recovery merges the SDTM's *input* (W2 = I, W1 = 0), so the converted
    model equals its source exactly where the SDTM's generation and sparse blocks leave the image tokens alone; with
    K = 0 (top blocks only) it is the source bit for bit."""
    x, t, text, pooled, g = inputs(1000.0, guidance)
    dense = tiny_flux(guidance)
    only_top = sparsify_flux(dense, "0,0,0,0,0,0,7", r_min=0.0, r_max=0.0)
    assert torch.equal(only_top(x, t, text, pooled, g), dense(x, t, text, pooled, g))
    layout = "0,1,1,2,1,1,2"  # gen, sparse, sparse (double) | recover, dense, top, top (single)
    for i in (0, 1, 2):
        _zero_image_gates(dense.blocks[i])
    model = sparsify_flux(dense, layout, r_min=0.0, r_max=0.0)
    assert close(model(x, t, text, pooled, g), dense(x, t, text, pooled, g))
    # the text stream still changes in those blocks, and the later blocks read it: equality is not trivial
    _, img, txt, vec, _ = dense.embed(x, t, text, pooled, g)
    assert not torch.allclose(dense.blocks[0](img, txt, vec, dense.rope(GRID, TEXT, x.device))[1], txt, atol=1e-3)
    # with the sparse blocks changing the image tokens, the recovery block drops that change (W1 = 0)
    changed = tiny_flux(guidance)
    assert not torch.allclose(sparsify_flux(changed, layout, r_min=0.0, r_max=0.0)(x, t, text, pooled, g),
                              changed(x, t, text, pooled, g), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# the poolingformers: uniform map for image queries, exact attention for text queries
# ------------------------------------------------------------------------------------------------



def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], length: int) -> Tensor:
    """[text; image] joint attention with an explicit (S x S) map: the softmax for the text rows, 1 / S everywhere
    for the image rows -> (B, S, D)."""
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, S, S)
    weights[:, :, length:] = 1.0 / k.shape[2]
    return (weights @ v).transpose(1, 2).flatten(2)


@torch.no_grad()
def test_poolingformers_are_the_uniform_map_for_images_and_exact_for_text() -> None:
    dense = tiny_flux()
    model = sparsify_flux(dense, "4,0,0,0,0,0,3")  # blocks 0-2 double-stream, 3 single-stream poolingformers
    _, img, txt, vec, _ = dense.embed(*inputs(600.0))
    n, length = img.shape[1], TEXT
    rope = dense.rope(GRID, length, img.device)
    for i in (0, 3):
        block, src = model.blocks[i], dense.blocks[i]
        mode = OpShapes()
        with mode:
            out_img, out_txt = block(img, txt, vec, rope)
        assert not [s for s in mode.shapes if len(s) == 4 and s[-2:] in ((n, n + length), (n + length, n + length))]
        want_img, want_txt = src(img, txt, vec, rope)
        assert close(out_txt, want_txt)  # text queries: the source's exact joint attention, its MLP unchanged
        assert not torch.allclose(out_img, want_img, atol=1e-3)
        # by hand, from the source's weights, with the explicit uniform rows
        if isinstance(src, DoubleStreamBlock):
            im, tm = src.img_mod(vec), src.txt_mod(vec)
            iq, ik, iv = src.img_attn.heads(modulate(src.img_norm1(img), *im[:2]))
            tq, tk, tv = src.txt_attn.heads(modulate(src.txt_norm1(txt), *tm[:2]))
            attn = _explicit_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), rope,
                                       length)[:, length:]  # (B, N, D): every row the mean of the L + N values
            values = torch.cat([src.txt_attn.qkv(modulate(src.txt_norm1(txt), *tm[:2]))[..., 2 * D:],
                                src.img_attn.qkv(modulate(src.img_norm1(img), *im[:2]))[..., 2 * D:]], dim=1)
            assert close(attn, values.mean(1, keepdim=True).expand_as(attn))  # the mean of V over all joint tokens
            by_hand = img + im[2].unsqueeze(1) * src.img_attn.proj(attn)
            by_hand = by_hand + im[5].unsqueeze(1) * src.img_mlp(modulate(src.img_norm2(by_hand), im[3], im[4]))
        else:
            shift, scale, gate = src.modulation(vec)
            x = torch.cat([txt, img], dim=1)
            qkv, hidden = src.linear1(modulate(src.pre_norm(x), shift, scale)).split([3 * D, src.mlp_hidden], dim=-1)
            q, k, v = qkv.reshape(2, n + length, 3, 2, 16).permute(2, 0, 3, 1, 4)
            attn = _explicit_attention(src.norm.query_norm(q), src.norm.key_norm(k), v, rope, length)
            assert close(attn[:, length:], qkv[..., 2 * D:].mean(1, keepdim=True).expand(2, n, D))
            by_hand = (x + gate.unsqueeze(1) * src.linear2(torch.cat([attn, F.gelu(hidden, approximate="tanh")],
                                                                      dim=2)))[:, length:]
        assert close(out_img, by_hand)


# ------------------------------------------------------------------------------------------------
# checkpoints, presets, family, costs, command line, pipeline, refusals
# ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    dense = tiny_flux(False)
    model = sparsify_flux(dense, LAYOUT, r_min=0.5, r_max=0.8, num_pieces=3)
    out = sparsedit.save_model(model, tmp_path / "sparse")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "SparseFLUX" and cfg["recovery_pos_embed"] is False and cfg["depth_single"] == 4
    back = sparsedit.load_model(out)
    assert type(back) is SparseFlux and back.config == model.config
    x, t, text, pooled, _ = inputs(987.5, False)
    with torch.no_grad():
        assert torch.equal(back(x, t, text, pooled), model(x, t, text, pooled))
    fam = family_of(back)
    assert fam.sparse and fam.dense_config() == dense.config and fam.block_kinds() == model.kinds
    assert fam.token_sets() == [(3, 4), (4, 5), (4, 6)]
    assert fam.tokens_at(1000.0) == fam.token_sets()[0] and fam.tokens_at(0) == fam.token_sets()[-1]
    cond = {"encoder_hidden_states": text, "pooled_projections": pooled}
    with torch.no_grad():
        assert torch.equal(fam.call(back, x, t, cond, (3, 4)), back(x, t, text, pooled, grid=(3, 4)))
    # a config.json without recovery_pos_embed (it is optional) reads as False; true is refused in one line
    del cfg["recovery_pos_embed"]
    (out / "config.json").write_text(json.dumps(cfg))
    assert sparsedit.load_model(out).config.recovery_pos_embed is False
    with pytest.raises(SparseditError) as err:
        fam.sparsify(back, LAYOUT, None)
    helpers.one_line(err, "already a SparseFLUX")
    with pytest.raises(SparseditError) as err:
        sparsify_flux(dense, LAYOUT, recovery_pos_embed=True)
    helpers.one_line(err, "recovery_pos_embed", "RoPE")
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(back, tmp_path / "diffusers", fmt="diffusers")
    helpers.one_line(err, "SparseFlux")


@pytest.mark.parametrize("name, steps", [("SparseFLUX.1-dev", 28), ("SparseFLUX.1-schnell", 4)])
def test_presets(name: str, steps: int) -> None:
    dense, layout = resolve_preset(name, 1024)
    assert layout == "2,4,1,9,1,1,7" and dense.model_type == "FLUX" and dense.depth == 57
    cfg = preset_config(name, 1024)
    assert type(cfg) is SparseFluxConfig and cfg.layout.as_string() == layout and (cfg.r_min, cfg.r_max) == (0.61, 0.86)
    assert cfg.guidance_embeds == (name == "SparseFLUX.1-dev") and cfg.layout == SparseFluxConfig().layout
    fam = family_of(cfg)
    kinds = fam.block_kinds()
    assert kinds.count("sparse") == 36 and kinds[:3] == ["pool", "pool", "gen"] and kinds[-7:] == ["top"] * 7
    assert fam.default_sampling == ("euler", steps) and fam.token_sets()[0] == (24, 24)


def flops_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["flops", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


def test_flops_cli_counts_fewer_macs_than_the_dense_preset() -> None:
    sparse = flops_json("--model", "SparseFLUX.1-dev", "--image-size", "1024")
    dense = flops_json("--model", "FLUX.1-dev", "--image-size", "1024")
    assert sparse["model_type"] == "SparseFLUX" and sparse["layout"] == "2,4,1,9,1,1,7"
    assert (sparse["sampler"], sparse["steps"]) == ("euler", 28) and sparse["grids"][0]["grid"] == [24, 24]
    assert dense["gmacs"] == pytest.approx(37_192.326709248) and sparse["dense_gmacs"] == dense["gmacs"]
    assert 0.45 < sparse["gmacs"] / dense["gmacs"] < 0.5  # 28-step mean: 18,053 of 37,192 GMACs (docs)
    # 4 recovery merges add W1, W2 (2 x (D^2 + D) each); the 2 double-stream poolingformers drop their image query
    # rows and query norms
    d = 3072
    assert sparse["params"] == dense["params"] + 8 * (d * d + d) - 2 * (d * d + d + 128) == 11_958_049_600



def tiny_reference(guidance: bool, depths: tuple[int, int] = (3, 4)) -> FluxTransformer2DModel:
    """A small diffusers FLUX (4 latent channels, packed to 16) with every parameter random."""
    ref = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=depths[0], num_single_layers=depths[1],
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=CAPTION,
                                 pooled_projection_dim=POOLED, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    return helpers.randomize(ref, 0.1).eval()


def test_sparsify_cli_on_a_diffusers_directory(tmp_path: Path) -> None:
    tiny_reference(False).save_pretrained(tmp_path / "flux")
    code, out, err = cli("sparsify", str(tmp_path / "flux"), "--layout", LAYOUT, "--r-min", "0.5", "--out",
                         str(tmp_path / "s"))
    assert code == 0, err
    assert out.startswith("wrote SparseFlux") and "layout 1,1,2,1,2,0,1" in out
    model = sparsedit.load_model(tmp_path / "s")
    assert type(model) is SparseFlux and model.config.layout.as_string() == LAYOUT
    assert model.config.recovery_pos_embed is False and model.config.r_min == 0.5
    x, t, text, pooled, _ = inputs(1000.0, False, batch=1)
    x = torch.randn(1, 4, 32, 32)  # the diffusers config keeps no size: 128 px by default (a 16 x 16 grid)
    with torch.no_grad():
        assert model(x, t, text, pooled).shape == x.shape
    # a layout that does not fit the 7 blocks: one line, exit 2, nothing written
    code, _, err = cli("sparsify", str(tmp_path / "flux"), "--layout", "2,4,1,9,1,1,7", "--out", str(tmp_path / "t"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "depth 7" in err and not (tmp_path / "t").exists()


def test_sparse_flux_runs_in_flux_pipeline(tmp_path: Path) -> None:
    ref = tiny_reference(True)
    ref.save_pretrained(tmp_path / "flux")
    model = sparsify_flux(sparsedit.load_model(tmp_path / "flux"), LAYOUT, r_min=0.3, r_max=0.8)
    used: list[tuple[float, tuple[int, int]]] = []
    choose = model.sparse_grid

    def spy(t: Tensor, dense_grid: tuple[int, int], *rest: object) -> tuple[int, int]:
        grid = choose(t, dense_grid, *rest)
        used.append((float(t[0]), grid))
        return grid

    model.sparse_grid = spy  # type: ignore[method-assign]
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=ref)
    use_in_pipeline(pipe, model)
    images = pipe(prompt_embeds=torch.randn(1, TEXT, CAPTION), pooled_prompt_embeds=torch.randn(1, POOLED), height=96,
                  width=128, num_inference_steps=4, output_type="latent", guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(1)).images
    assert images.shape == (1, 48, 16) and torch.isfinite(images).all()  # 6 x 8 packed tokens of 16 channels
    sigmas = pipe.scheduler.sigmas[:-1].tolist()  # the face gets sigma and calls the model with sigma * 1000
    assert [t for t, _ in used] == pytest.approx([s * 1000 for s in sigmas], abs=1e-3)
    schedule = model.config.schedule
    assert [g for _, g in used] == [schedule.grid(discrete_timestep(s * 1000), GRID) for s in sigmas]
    assert used[0][1] == (3, 4) and used[-1][1][0] * used[-1][1][1] > 12  # the noisiest step is the sparsest


def test_refusals() -> None:
    dense = tiny_flux()
    with pytest.raises(SparseditError) as err:
        sparsify_flux(dense, "1,1,1,1,1,1,1")
    helpers.one_line(err, "depth 7")
    with pytest.raises(SparseditError) as err:
        sparsify_flux(dense, None)  # type: ignore[arg-type]
    helpers.one_line(err, "2,4,1,9,1,1,7")
    with pytest.raises(SparseditError) as err:
        x, t, text, pooled, g = inputs(0.0)
        family_of(dense).call(dense, x, t, {"encoder_hidden_states": text, "pooled_projections": pooled}, (2, 2))
    helpers.one_line(err, "dense FLUX")
    with pytest.raises(SparseditError) as err:
        SparseFluxConfig(recovery_pos_embed=True)
    helpers.one_line(err, "no position table")
    assert family_of(dense).tokens_at(1000.0) is None
    assert isinstance(sparsify_flux(dense, LAYOUT).blocks[6], SingleStreamBlock)
