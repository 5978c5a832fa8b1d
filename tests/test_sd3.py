"""Stable Diffusion 3 / 3.5 (the dense SD3 family): exact against diffusers' ``SD3Transformer2DModel``.

The references are diffusers' own transformers built from tiny configs (SD3-style, SD3.5 with RMS q/k norm and
dual attention, learned-sigma output) with every parameter and the stored position table re-randomised (diffusers
zero-initialises adaLN and output layers, which would hide mapping errors), saved with ``save_pretrained`` (once
sharded), loaded with ``sparsedit.load_model`` and compared in fp32 on square and non-square latents. SD3 takes no
caption mask, so there is no mask case. Export goes back through ``SD3Transformer2DModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import helpers
import sparsedit
from sparsedit.cli import main
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.eval.bench_setup import build_bench_model
from sparsedit.eval.flops import flop_counter, forward_macs, model_params, split_flops
from sparsedit.families import family_of
from sparsedit.families.presets import preset_config, with_sparsity
from sparsedit.families.sd3 import SD3, DiffusersSD3, SD3Config, sd3_config
from sparsedit.interop import use_in_pipeline
from sparsedit.loading import detect_format

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, POOLED, TOKENS = 24, 12, 7
BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=CAPTION, caption_projection_dim=32, pooled_projection_dim=POOLED, out_channels=4,
            pos_embed_max_size=8)
CONFIGS = {
    "sd3": {},
    "sd3.5-dual": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1), pos_embed_max_size=10),
    "sd3.5-large-like": dict(qk_norm="rms_norm", out_channels=8, num_layers=2, attention_head_dim=16,
                             num_attention_heads=4, caption_projection_dim=64),
}
SIZES = [(8, 8), (8, 12), (16, 6)]  # latent H x W: square, and non-square both ways (grids up to the table side)


def reference(name: str, **overrides: object) -> SD3Transformer2DModel:
    ref = SD3Transformer2DModel(**{**BASE, **CONFIGS[name], **overrides}).eval()  # type: ignore[arg-type]
    helpers.randomize(ref, 0.1)
    with torch.no_grad():
        ref.pos_embed.pos_embed.normal_()  # a random table: a wrong crop cannot hide in a smooth sin-cos one
    return ref


def inputs(hw: tuple[int, int], batch: int = 2, seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, *hw, generator=gen), t=torch.tensor([999.0, 250.5, 3.0, 0.0][:batch]),
                text=torch.randn(batch, TOKENS, CAPTION, generator=gen), pooled=torch.randn(batch, POOLED, generator=gen))


@torch.no_grad()
def theirs(ref: nn.Module, inp: dict[str, Tensor]) -> Tensor:
    return ref(hidden_states=inp["x"], encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"],
               timestep=inp["t"]).sample


@torch.no_grad()
def ours(model: nn.Module, inp: dict[str, Tensor]) -> Tensor:
    return model(inp["x"], inp["t"], inp["text"], inp["pooled"])


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def saved(ref: nn.Module, path: Path, **kw: object) -> Path:
    ref.save_pretrained(path, **kw)
    return path


# ------------------------------------------------------------------------------------------------
# parity and formats
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_parity_and_export(tmp_path: Path, name: str) -> None:
    ref = reference(name)
    shards = {"max_shard_size": "20KB"} if name == "sd3.5-dual" else {}
    path = saved(ref, tmp_path / "ref", **shards)
    assert (path / "diffusion_pytorch_model.safetensors.index.json").exists() == bool(shards)
    model = sparsedit.load_model(path)
    assert isinstance(model, SD3) and model.config.qk_norm == CONFIGS[name].get("qk_norm")
    for hw in SIZES:
        inp = inputs(hw)
        assert rel_err(ours(model, inp), theirs(ref, inp)) < 1e-5, (name, hw)
    # export: diffusers reads back the very tensors it wrote, and computes the same
    out = sparsedit.save_model(model, tmp_path / "export", fmt="diffusers")
    back = SD3Transformer2DModel.from_pretrained(out).eval()
    mine, orig = back.state_dict(), ref.state_dict()
    assert set(mine) == set(orig) and all(torch.equal(mine[k], orig[k]) for k in orig)
    assert list(back.config.dual_attention_layers) == list(ref.config.dual_attention_layers)
    inp = inputs((8, 12))
    assert rel_err(theirs(back, inp), ours(model, inp)) < 1e-5


def test_pipeline_directory_and_sparsedit_round_trip(tmp_path: Path) -> None:
    ref = reference("sd3.5-dual")
    saved(ref, tmp_path / "pipe" / "transformer")
    model = sparsedit.load_model(tmp_path / "pipe")
    assert detect_format(tmp_path / "pipe") == "sd3-diffusers"
    again = sparsedit.load_model(sparsedit.save_model(model, tmp_path / "ours"))
    assert again.config == model.config and again.config.dual_attention_layers == (0, 1)
    inp = inputs((6, 8))
    assert torch.equal(ours(again, inp), ours(model, inp))


def _edit_weights(path: Path, add: dict[str, Tensor] | None = None, drop: str | None = None) -> None:
    file = path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    state.update(add or {})
    state.pop(drop or "", None)
    save_file(state, str(file), metadata={"format": "pt"})


def test_every_key_consumed(tmp_path: Path) -> None:
    extra = saved(reference("sd3"), tmp_path / "extra")
    _edit_weights(extra, add={"transformer_blocks.0.attn.spare.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(extra)
    helpers.one_line(err, "not used", "transformer_blocks.0.attn.spare.weight")
    missing = saved(reference("sd3.5-dual"), tmp_path / "missing")
    _edit_weights(missing, drop="transformer_blocks.1.attn2.norm_k.weight")
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(missing)
    helpers.one_line(err, "missing", "transformer_blocks.1.attn2.norm_k.weight")


@pytest.mark.parametrize("field, value, words", [
    ("qk_norm", "layer_norm", ("qk_norm", "layer_norm")),
    ("caption_projection_dim", 48, ("caption_projection_dim", "48")),
    ("dual_attention_layers", [5], ("dual_attention_layers",)),
    ("pos_embed_max_size", None, ("pos_embed_max_size",)),
    ("out_channels", 5, ("out_channels",)),
    ("num_layers", "3", ("num_layers",)),
])
def test_unsupported_config_is_refused(tmp_path: Path, field: str, value: object, words: tuple[str, ...]) -> None:
    path = saved(reference("sd3"), tmp_path / "ref")
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(path)
    helpers.one_line(err, *words)


def test_refusals() -> None:
    model = SD3(SD3Config(input_size=(8, 12), hidden_size=32, depth=2, num_heads=2, in_channels=4,
                          caption_channels=CAPTION, pooled_channels=POOLED, pos_embed_max_size=8)).eval()
    fam = family_of(model)
    with pytest.raises(SparseditError) as err:  # a layout must cover the model's blocks
        fam.sparsify(model, "1,1,1,1,1,1,1", None)
    helpers.one_line(err, "has 6 blocks but the model has depth 2")
    with pytest.raises(SparseditError) as err:
        with_sparsity(model.config, "1,1,1,1,1,1,1", {})
    helpers.one_line(err, "has 6 blocks but the model has depth 2")
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(model, "/nonexistent/never-written", fmt="diffusers")
    helpers.one_line(err, "8x12", "sample_size")
    with pytest.raises(SparseditError) as err:
        ours(model, inputs((18, 8)))
    helpers.one_line(err, "9x4", "position table")
    with pytest.raises(SparseditError) as err:
        SD3Config(depth=4, dual_attention_layers=(4,))
    helpers.one_line(err, "dual_attention_layers")


def test_training_step_gives_every_parameter_a_gradient() -> None:
    """The last block skips the caption queries diffusers discards: no parameter is left without a gradient
    (DDP would stop), and gradient checkpointing changes nothing."""
    model = SD3(SD3Config(input_size=8, hidden_size=32, depth=3, num_heads=2, in_channels=4, caption_channels=CAPTION,
                          pooled_channels=POOLED, pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(2,)))
    helpers.randomize(model, 0.1).train()
    inp = inputs((8, 8))
    ours(model, inp)  # warm-up: same numbers with and without checkpointing below
    with torch.enable_grad():
        model(inp["x"], inp["t"], inp["text"], inp["pooled"]).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    with torch.enable_grad():
        model(inp["x"], inp["t"], inp["text"], inp["pooled"]).square().mean().backward()
    assert all(torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------------
# presets, costs, interop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, depth, hidden, max_size, qk_norm, dual", [
    ("SD3-medium", 24, 1536, 192, None, ()),
    ("SD3.5-medium", 24, 1536, 384, "rms_norm", tuple(range(13))),
    ("SD3.5-large", 38, 2432, 192, "rms_norm", ()),
])
def test_presets(name: str, depth: int, hidden: int, max_size: int, qk_norm: str | None, dual: tuple) -> None:
    cfg = preset_config(name, 1024)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (depth, hidden, depth, 64)
    assert (cfg.pos_embed_max_size, cfg.qk_norm, cfg.dual_attention_layers) == (max_size, qk_norm, dual)
    assert (cfg.latent_hw, cfg.grid, cfg.in_channels, cfg.out_channels) == ((128, 128), (64, 64), 16, 16)
    assert (cfg.caption_channels, cfg.pooled_channels) == (4096, 2048)


def test_flops_of_a_preset_and_of_a_tiny_model() -> None:
    report = forward_macs(preset_config("SD3.5-large", 1024))  # built on the meta device
    assert report.model_type == "SD3" and report.grid == (64, 64)
    assert 7.9e9 < report.params < 8.2e9 and report.total > 1e13
    # the count from the model equals FlopCounterMode on a tiny real model, 333 caption tokens (77 CLIP + 256 T5)
    cfg = sd3_config("SD3.5-medium", 64, hidden_size=32, num_heads=2, depth=3,
                                            caption_channels=CAPTION, pooled_channels=POOLED, in_channels=4,
                                            pos_embed_max_size=8, dual_attention_layers=(0,))
    model = SD3(cfg).eval()
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(torch.randn(1, 4, 8, 8), torch.zeros(1), torch.randn(1, 333, CAPTION), torch.randn(1, POOLED))
    linear, attention = split_flops(counter.get_flop_counts()["Global"])
    tiny = forward_macs(cfg)
    assert (tiny.by_kind["linear"], tiny.by_kind["attention"]) == (linear, attention)
    assert tiny.params == model_params(cfg) == sum(p.numel() for p in model.parameters())
    assert set(tiny.by_segment) == {"embed", "blocks", "final"} and tiny.by_kind["other"] > 0


def test_flops_cli() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["flops", "--model", "SD3.5-medium", "--image-size", "1024", "--json"]) == 0
    result = json.loads(out.getvalue())
    assert (result["model_type"], result["grid"], result["image_size"]) == ("SD3", [64, 64], 1024)
    assert result["reduction"] == 0.0 and 2.0e9 < result["params"] < 2.6e9


def test_use_in_stable_diffusion3_pipeline(tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    ref = reference("sd3.5-dual", sample_size=8)
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"))
    pipe = StableDiffusion3Pipeline(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    gen = torch.Generator().manual_seed(3)
    prompt = dict(prompt_embeds=torch.randn(1, TOKENS, CAPTION, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, POOLED, generator=gen),
                  negative_prompt_embeds=torch.randn(1, TOKENS, CAPTION, generator=gen),
                  negative_pooled_prompt_embeds=torch.randn(1, POOLED, generator=gen))

    def run() -> Tensor:
        return pipe(**prompt, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    expected = run()
    model = sparsedit.load_model(saved(ref, tmp_path / "ref"))
    use_in_pipeline(pipe, model)
    assert isinstance(pipe.transformer, DiffusersSD3)
    assert rel_err(run(), expected) < 1e-5
    inp = inputs((8, 8))
    with pytest.raises(SparseditError) as err:
        pipe.transformer(inp["x"], inp["text"], inp["pooled"], inp["t"], joint_attention_kwargs={"scale": 0.5})
    helpers.one_line(err, "joint_attention_kwargs")
    with pytest.raises(SparseditError) as err:
        pipe.transformer(inp["x"], inp["text"], inp["pooled"], inp["t"], skip_layers=[1])
    helpers.one_line(err, "skip")


def test_bench_conditioning_and_call() -> None:
    cfg = sd3_config("SD3-medium", 64, hidden_size=32, num_heads=2, depth=2, caption_channels=CAPTION,
                     pooled_channels=POOLED, in_channels=4, pos_embed_max_size=8)
    model = build_bench_model(cfg)  # meta device -> to_empty -> tiled values, then the position table recomputed
    assert torch.equal(model.pos_table, model.initial_position_table())
    fam = family_of(model)
    cond = fam.conditioning(model, 2, True, torch.Generator().manual_seed(0))
    assert cond["encoder_hidden_states"].shape == (4, 333, CAPTION) and cond["pooled_projections"].shape == (4, POOLED)
    assert not cond["encoder_hidden_states"][2:].any()  # the unconditional half
    x = torch.randn(fam.sample_shape(4))
    with torch.no_grad():
        assert fam.call(model, x, torch.full((4,), 500.0), cond, fam.tokens_at(500)).shape == x.shape
    with pytest.raises(SparseditError) as err:
        fam.call(model, x, torch.zeros(4), cond, (2, 2))
    helpers.one_line(err, "dense SD3")
