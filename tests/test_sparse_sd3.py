"""SparseSD3: SparseDiT on the image tokens of an SD3 / SD3.5 MMDiT, the caption stream dense in every block.

Tiny randomised SD3s (SD3-style; SD3.5-style with RMS q/k norm and dual attention layers) are sparsified and run at
flow-matching timesteps ``t = sigma * 1000`` with the grid of each step from the schedule; the converted model is
checked block by block against its source at the dense grid (and as a whole where SparseDiT's design allows it);
the joint poolingformer against a hand computation of the uniform map; then checkpoints, presets, MACs and the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import helpers
import sparsedit
from helpers import OpShapes, cli, close, record
from sparsedit.cli import main
from sparsedit.core.schedule import discrete_timestep
from sparsedit.diffusion.flow import euler_sigmas
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.presets import preset_config, resolve_preset
from sparsedit.families.sd3 import (
    SD3,
    JointGenerationBlock,
    SD3Config,
    SparseSD3,
    SparseSD3Config,
    sd3_init_rules,
    sparsify_sd3,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, POOLED, TOKENS = 24, 12, 5
STYLES = {
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd3.5": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1, 2, 3)),  # pool, gen, gen+ and a sparse block dual
}
LAYOUT = "1,1,2,1,2,1,1"  # pool, gen, gen+, sparse, recover, recover+, dense, top: every kind, 8 blocks


def tiny_sd3(style: str = "sd3.5", depth: int = 8, **kw: object) -> SD3:
    """A 16 x 16 latent (8 x 8 tokens), width 32, 2 heads, random weights (adaLN-Zero would hide mistakes)."""
    cfg = SD3Config(input_size=16, hidden_size=32, depth=depth, num_heads=2, in_channels=4, caption_channels=CAPTION,
                    pooled_channels=POOLED, pos_embed_max_size=10, **{**STYLES[style], **kw})  # type: ignore[arg-type]
    model = helpers.randomize(SD3(cfg), 0.15).eval()
    with torch.no_grad():
        model.pos_table.normal_()
    return model


def inputs(t: float, batch: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=gen), torch.full((batch,), float(t)),
            torch.randn(batch, TOKENS, CAPTION, generator=gen), torch.randn(batch, POOLED, generator=gen))




# ------------------------------------------------------------------------------------------------
# the converted model: kinds, rules, grids per flow timestep
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
def test_sparsify_runs_at_the_schedule_grid_of_each_flow_step(style: str) -> None:
    dense = tiny_sd3(style)
    model = sparsify_sd3(dense, LAYOUT)
    assert type(model) is SparseSD3 and model.config.model_type == "SparseSD3" and not model.training
    assert model.kinds == ["pool", "gen", "gen+", "sparse", "recover", "recover+", "dense", "top"]
    seen: list[tuple] = []
    for block in model.blocks:
        if type(block) is JointGenerationBlock:
            block.register_forward_hook(lambda m, a, o: seen.append((a[5], o[0].shape[1], o[1].shape)))
    schedule = model.config.schedule
    sigmas = euler_sigmas(6, shift=3.0)[:-1]  # a 6-step SD3 run, noisiest first
    grids = []
    for sigma in sigmas.tolist():
        seen.clear()
        x, t, text, pooled = inputs(sigma * 1000)
        with torch.no_grad():
            out = model(x, t, text, pooled)
        assert out.shape == x.shape and torch.isfinite(out).all()
        grid = schedule.grid(discrete_timestep(sigma * 1000), (8, 8))
        assert [s[:2] for s in seen] == [(grid, grid[0] * grid[1])] * 2  # gen and gen+ at the step's grid
        assert all(s[2] == (2, TOKENS, 32) for s in seen)  # the caption stays dense
        grids.append(grid[0] * grid[1])
    assert grids == sorted(grids) and grids[0] < grids[-1]  # sparsest at the noisiest step (t = 1000)
    assert schedule.grid(discrete_timestep(1000.0), (8, 8)) == (3, 3)
    # grid= overrides the schedule; one batch mixing grids is refused
    x, t, text, pooled = inputs(1000.0)
    with torch.no_grad():
        assert model(x, t, text, pooled, grid=(4, 6)).shape == x.shape
    with pytest.raises(SparseditError) as err:
        model(x, torch.tensor([1000.0, 0.0]), text, pooled)
    helpers.one_line(err, "grid")


def test_rules_and_extra_recovery_repeat() -> None:
    dense = tiny_sd3("sd3.5")
    model = sparsify_sd3(dense, LAYOUT, extra_recovery="repeat", upsample="bilinear")
    assert model.kinds[5] == "recover*"
    src, dst = dense.state_dict(), model.state_dict()
    rules = {r.target: r for r in sd3_init_rules(model.config, list(dst))}
    assert [r.target for r in family_of(model).init_rules(model)] == list(dst) == list(rules)
    assert rules["blocks.0.attn.kv.weight"].describe() == "blocks.0.attn.kv.weight <- blocks.0.attn.qkv.weight[32:96] (K, V of qkv)"
    assert torch.equal(dst["blocks.0.attn.kv.weight"], src["blocks.0.attn.qkv.weight"][32:])
    assert torch.equal(dst["blocks.0.attn2.v.bias"], src["blocks.0.attn2.qkv.bias"][64:])
    for i in (4, 5):  # both recovery blocks merge: W1 = 0, W2 = I
        assert not dst[f"blocks.{i}.merge_sparse.weight"].any() and not dst[f"blocks.{i}.merge_dense.bias"].any()
        assert torch.equal(dst[f"blocks.{i}.merge_dense.weight"], torch.eye(32))
    copies = [k for k, r in rules.items() if r.rule == "copy"]
    assert all(torch.equal(dst[k], src[k]) for k in copies) and "blocks.7.attn.unused_context_q_weight" in copies
    dropped = set(src) - {r.source for r in rules.values()}  # the image queries' norms of the poolingformer
    assert dropped == {"blocks.0.attn.q_norm.weight", "blocks.0.attn2.q_norm.weight", "blocks.0.attn2.k_norm.weight"}
    x, t, text, pooled = inputs(500.0)
    with torch.no_grad():
        assert model(x, t, text, pooled).shape == x.shape


def test_training_step_gives_every_parameter_a_gradient() -> None:
    model = sparsify_sd3(tiny_sd3("sd3.5"), LAYOUT).train()
    x, t, text, pooled = inputs(700.0)
    model(x, t, text, pooled).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ------------------------------------------------------------------------------------------------
# what the converted model computes at the dense grid
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_blocks_reduce_to_the_dense_blocks_at_the_dense_grid() -> None:
    dense = tiny_sd3("sd3.5", depth=7)
    layout = "0,1,2,1,2,0,2"  # gen, gen+, sparse, recover, recover+, top, top
    model = sparsify_sd3(dense, layout, r_min=0.0, r_max=0.0)
    names = [f"blocks.{i}" for i in range(7)] + ["t_embedder", "pooled_embedder"]
    got = record(model, names)
    x, t, text, pooled = inputs(900.0)
    model(x, t, text, pooled)
    c = got["t_embedder"][0][1] + got["pooled_embedder"][0][1]
    pos = model.position_embedding((8, 8))
    for i, kind in enumerate(model.kinds):
        (args, (out_x, out_ctx)), = got[f"blocks.{i}"]
        src = dense.blocks[i]
        if kind == "gen":  # pooling to the same grid is the identity; cross-attention to itself is self-attention
            assert args[0] is None and args[5] == (8, 8)
            want = src(args[3], args[1], c)
        elif kind == "gen+":  # refines the sparse tokens against the dense ones the SDTM started from
            assert torch.equal(args[3], got["blocks.0"][0][0][3])
            want = src(args[0], args[1], c, source=args[3])
        elif kind == "recover":  # X_in + pos (W1 = 0, W2 = I), image keys / values from the sparse tokens
            x_in, sparse = got["blocks.0"][0][0][3], got["blocks.2"][0][1][0]
            assert torch.equal(args[0], x_in) and torch.equal(args[3], sparse)
            want = src(x_in + pos, args[1], c, source=sparse)
        elif kind == "recover+":
            want = src(args[0], args[1], c, source=got["blocks.2"][0][1][0])
        else:  # sparse, top: the dense block itself (the last one context pre-only)
            want = src(args[0], args[1], c)
        assert close(out_x, want[0]), (i, kind)
        assert (out_ctx is None) == (want[1] is None) and (out_ctx is None or close(out_ctx, want[1])), (i, kind)


def _zero_image_gates(block: nn.Module) -> None:
    """Zero the adaLN rows of the image stream's gates: the block leaves the image tokens as they are."""
    lin = block.adaLN_modulation[-1]
    d = lin.weight.shape[1]
    for chunk in (2, 5, 8)[: lin.weight.shape[0] // (3 * d)]:
        lin.weight[chunk * d:(chunk + 1) * d] = 0
        lin.bias[chunk * d:(chunk + 1) * d] = 0


@pytest.mark.parametrize("style", list(STYLES))
@torch.no_grad()
def test_whole_model_at_the_dense_grid(style: str) -> None:
    """P = 0, r = 0: SparseDiT's recovery merges the SDTM's *input* (W2 = I, W1 = 0), so the converted model equals
    its source where the SDTM's generation and sparse blocks leave the image tokens alone, and only there."""
    dense = tiny_sd3(style, depth=6)
    layout, options = "0,1,1,2,1,1,1", dict(r_min=0.0, r_max=0.0, recovery_pos_embed=False)
    for i in (0, 1, 2):  # gen, sparse, sparse
        _zero_image_gates(dense.blocks[i])
    x, t, text, pooled = inputs(1000.0)
    model = sparsify_sd3(dense, layout, **options)
    assert close(model(x, t, text, pooled), dense(x, t, text, pooled))
    # the caption stream still changes in those blocks, and the later blocks read it: equality is not trivial
    ctx = dense.context_embedder(text)
    assert not torch.allclose(dense.blocks[0](dense.x_embedder(x), ctx, dense.t_embedder(t))[1], ctx, atol=1e-3)
    # with the sparse blocks changing the image tokens, the recovery block drops that change (W1 = 0)
    changed = tiny_sd3(style, depth=6)
    assert not torch.allclose(sparsify_sd3(changed, layout, **options)(x, t, text, pooled),
                              changed(x, t, text, pooled), atol=1e-3)



@torch.no_grad()
def test_joint_poolingformer_is_the_uniform_map_for_images_and_exact_for_text() -> None:
    dense = tiny_sd3("sd3.5", depth=4)
    model = sparsify_sd3(dense, "1,0,0,0,0,0,3")
    block, src = model.blocks[0], dense.blocks[0]
    n, length, d, heads = 64, TOKENS, 32, 2
    gen = torch.Generator().manual_seed(3)
    u, ctx = torch.randn(2, n, d, generator=gen), torch.randn(2, length, d, generator=gen)
    mode = OpShapes()
    with mode:
        image, text = block.attn(u, ctx)
    maps = [(n, n + length), (n + length, n + length), (n, n)]  # an image query's row of scores: never built
    assert not [s for s in mode.shapes if len(s) == 4 and s[-2:] in maps]
    # by hand, from the source's weights: the joint values, a uniform (N x (N + L)) map over them per head
    v = torch.cat([u @ src.attn.qkv.weight[2 * d:].T + src.attn.qkv.bias[2 * d:],
                   ctx @ src.attn.context_qkv.weight[2 * d:].T + src.attn.context_qkv.bias[2 * d:]], dim=1)
    v = v.view(2, n + length, heads, d // heads).transpose(1, 2)  # (B, heads, N + L, d)
    uniform = torch.full((n, n + length), 1.0 / (n + length))
    by_hand = src.attn.proj((uniform @ v).transpose(1, 2).reshape(2, n, d))  # (B, N, D)
    assert image.shape == (2, 1, d) and close(image.expand(2, n, d), by_hand)
    assert close(text, src.attn(u, ctx)[1])  # caption queries: the source's exact joint attention
    # the image-only second attention: the mean of its V over the N image tokens (DiT's poolingformer)
    v2 = u @ src.attn2.qkv.weight[2 * d:].T + src.attn2.qkv.bias[2 * d:]
    assert close(block.attn2(u), src.attn2.proj(v2.mean(1, keepdim=True)))


# ------------------------------------------------------------------------------------------------
# checkpoints, presets, costs, command line, refusals
# ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = sparsify_sd3(tiny_sd3("sd3.5"), LAYOUT, r_min=0.5, r_max=0.8, num_pieces=3)
    out = sparsedit.save_model(model, tmp_path / "sparse")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "SparseSD3" and cfg["dual_attention_layers"] == [0, 1, 2, 3]
    back = sparsedit.load_model(out)
    assert type(back) is SparseSD3 and back.config == model.config
    x, t, text, pooled = inputs(987.5)
    with torch.no_grad():
        assert torch.equal(back(x, t, text, pooled), model(x, t, text, pooled))
    fam = family_of(back)
    assert fam.sparse and fam.dense_config() == tiny_sd3("sd3.5").config
    assert fam.tokens_at(1000.0) == fam.token_sets()[0] and fam.tokens_at(0) == fam.token_sets()[-1]
    with pytest.raises(SparseditError) as err:
        fam.sparsify(back, LAYOUT, None)
    helpers.one_line(err, "already a SparseSD3")
    # one evaluation as bench and flops run it: explicit tokens
    cond = fam.conditioning(back, 1, True, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert fam.call(back, x, t, cond, fam.tokens_at(400.0)).shape == x.shape


@pytest.mark.parametrize("scheduler, steps", [("FlowMatchEulerDiscreteScheduler", 4),
                                               ("FlowMatchHeunDiscreteScheduler", 3)])
def test_in_stable_diffusion3_pipeline(scheduler: str, steps: int) -> None:
    """Inside StableDiffusion3Pipeline every model call runs at the grid of its own timestep: one call per Euler step;
    under FlowMatchHeunDiscreteScheduler (which the pipeline also takes) a first call per step and a correction call
    at the next sigma (none after the last step)."""
    import diffusers
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from sparsedit.families.sd3 import save_sd3_diffusers
    from sparsedit.interop import use_in_pipeline

    dense = tiny_sd3("sd3.5")
    model = sparsify_sd3(dense, LAYOUT)
    timesteps: list[float] = []
    model.register_forward_hook(lambda m, a, o: timesteps.append(float(a[1][0])))
    grids: list[tuple[int, int]] = []
    model.blocks[1].register_forward_hook(lambda m, a, o: grids.append(a[5]))
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"))
    with tempfile.TemporaryDirectory() as tmp:  # the pipeline's own transformer: the dense source, exported
        transformer = SD3Transformer2DModel.from_pretrained(save_sd3_diffusers(dense, Path(tmp) / "t"))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=getattr(diffusers, scheduler)(shift=3.0), **none)
    use_in_pipeline(pipe, model)
    x, _, text, pooled = inputs(0.0, batch=1)
    latents = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(text),
                   negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=steps,
                   guidance_scale=3.0, output_type="latent", latents=x).images
    assert latents.shape == x.shape and torch.isfinite(latents).all()
    sigmas = euler_sigmas(steps, shift=3.0)[:-1].tolist()
    if "Heun" in scheduler:
        assert len(timesteps) == 2 * steps - 1 and len(set(timesteps)) == steps
    else:
        assert timesteps == pytest.approx([s * 1000 for s in sigmas], rel=1e-5)
    assert grids == [model.config.schedule.grid(discrete_timestep(t), (8, 8)) for t in timesteps]
    assert len(set(grids)) > 1


@pytest.mark.parametrize("name, layout, depth", [("SparseSD3-medium", "2,4,1,2,1,1,2", 24),
                                                 ("SparseSD3.5-medium", "2,4,1,2,1,1,2", 24),
                                                 ("SparseSD3.5-large", "3,4,1,5,1,1,3", 38)])
def test_presets(name: str, layout: str, depth: int) -> None:
    dense, got = resolve_preset(name, 1024)
    assert got == layout and dense.model_type == "SD3" and dense.depth == depth
    cfg = preset_config(name, 1024)
    assert type(cfg) is SparseSD3Config and cfg.layout.as_string() == layout and (cfg.r_min, cfg.r_max) == (0.61, 0.86)
    assert family_of(cfg).block_kinds()[-1] == "top"


def test_flops_cli_counts_fewer_macs_than_the_dense_preset() -> None:
    def flops(name: str) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["flops", "--model", name, "--image-size", "1024", "--json"]) == 0
        return json.loads(out.getvalue())

    sparse, dense = flops("SparseSD3.5-medium"), flops("SD3.5-medium")
    assert sparse["model_type"] == "SparseSD3" and sparse["layout"] == "2,4,1,2,1,1,2"
    assert sparse["gmacs"] < 0.7 * dense["gmacs"] and sparse["dense_gmacs"] == dense["gmacs"]
    assert sparse["steps"] == 28 and sparse["grids"][0]["grid"] == [24, 24]  # t = 1000: r_max



def test_sparsify_cli_on_a_diffusers_directory(tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=24, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=CAPTION, caption_projection_dim=16,
                                pooled_projection_dim=POOLED, out_channels=4, pos_embed_max_size=8,
                                qk_norm="rms_norm", dual_attention_layers=(0, 1, 2)).eval()
    helpers.randomize(ref, 0.1)
    ref.save_pretrained(tmp_path / "sd3")
    code, out, err = cli("sparsify", str(tmp_path / "sd3"), "--layout", "2,4,1,2,1,1,2", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert out.startswith("wrote SparseSD3") and "sparse token sets 3x3, 4x4, 5x5" in out
    model = sparsedit.load_model(tmp_path / "s")
    assert type(model) is SparseSD3 and model.config.layout.as_string() == "2,4,1,2,1,1,2"
    x, t, text, pooled = inputs(1000.0)
    with torch.no_grad():
        assert model(x, t, text, pooled).shape == x.shape
    # a layout whose last block is not a top block: one line, exit 2, nothing written
    code, _, err = cli("sparsify", str(tmp_path / "sd3"), "--layout", "4,4,1,2,1,1,0", "--out", str(tmp_path / "t"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "top block" in err and not (tmp_path / "t").exists()


def test_refusals() -> None:
    dense = tiny_sd3("sd3", depth=4)
    with pytest.raises(SparseditError) as err:
        sparsify_sd3(dense, "1,1,1,0,1,1,0")
    helpers.one_line(err, "1,1,1,0,1,1,0", "dense block", "context pre-only", "top block")
    with pytest.raises(SparseditError) as err:
        family_of(dense).sparse_config("0,1,1,1,1,1,0")
    helpers.one_line(err, "T >= 1")
    with pytest.raises(SparseditError) as err:
        sparsify_sd3(dense, "1,1,1,1,1,1,1")
    helpers.one_line(err, "depth 4")
    fam = family_of(dense)
    with pytest.raises(SparseditError) as err:
        fam.sampling_timesteps("ddpm", 10)
    helpers.one_line(err, "euler")
    assert fam.sampling_timesteps("euler", 28)[-1] == 1000.0 and len(fam.sampling_timesteps("euler", 28)) == 28
