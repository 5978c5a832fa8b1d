"""The dense FLUX family: exact against diffusers' FluxTransformer2DModel (loaded from its directories, sharded or
not, and the original single-file layout), exported back, behind FluxPipeline, and its presets and MAC counts.

The reference models are diffusers' own classes with every parameter random (diffusers zero-initialises some);
packing and positions on the reference side come from FluxPipeline's own helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import sparsedit
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families import family_of
from sparsedit.families.flux import Flux, FluxConfig, flux_from_original, pack_latents, position_ids, unpack_latents
from sparsedit.families.presets import preset_config
from sparsedit.interop import to_diffusers, use_in_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, POOLED, TEXT = 32, 24, 7  # T5 width, CLIP width, caption tokens of the tiny models
LATENT = (6, 10)  # non-square: a 3 x 5 token grid


def tiny_reference(guidance: bool, heads: int = 2, head_dim: int = 16, axes: tuple[int, ...] = (4, 6, 6),
                   depths: tuple[int, int] = (2, 2)) -> FluxTransformer2DModel:
    """A small diffusers FLUX (4 latent channels, packed to 16) with every parameter random."""
    ref = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=depths[0], num_single_layers=depths[1],
                                 attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=CAPTION,
                                 pooled_projection_dim=POOLED, guidance_embeds=guidance, axes_dims_rope=axes)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    return ref.eval()


def inputs(guidance: bool, batch: int = 2) -> dict[str, torch.Tensor | None]:
    return {"x": torch.randn(batch, 4, *LATENT), "sigma": torch.rand(batch),
            "text": torch.randn(batch, TEXT, CAPTION), "pooled": torch.randn(batch, POOLED),
            "guidance": torch.full((batch,), 3.5) if guidance else None}


def pipeline_call(inp: dict[str, torch.Tensor | None]) -> dict[str, object]:
    """The transformer's keyword arguments as FluxPipeline builds them (its own packing and ids)."""
    x = inp["x"]
    b, c, h, w = x.shape
    return {"hidden_states": FluxPipeline._pack_latents(x, b, c, h, w), "timestep": inp["sigma"],
            "guidance": inp["guidance"], "pooled_projections": inp["pooled"], "encoder_hidden_states": inp["text"],
            "txt_ids": torch.zeros(TEXT, 3), "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                                                torch.float32),
            "joint_attention_kwargs": {}, "return_dict": False}


@torch.no_grad()
def reference_output(ref: FluxTransformer2DModel, inp: dict[str, torch.Tensor | None]) -> torch.Tensor:
    out = ref(**pipeline_call(inp))[0]  # (B, N, 16) packed
    return FluxPipeline._unpack_latents(out, LATENT[0] * 8, LATENT[1] * 8, 8)  # (B, 4, H, W)


@torch.no_grad()
def our_output(model: torch.nn.Module, inp: dict[str, torch.Tensor | None]) -> torch.Tensor:
    return model(inp["x"], inp["sigma"] * 1000, inp["text"], inp["pooled"], inp["guidance"])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("guidance, sharded, pipeline_dir", [(True, False, False), (False, True, True)])
def test_diffusers_directory_loads_exactly(tmp_path: Path, guidance: bool, sharded: bool, pipeline_dir: bool) -> None:
    ref = tiny_reference(guidance)
    target = tmp_path / "transformer" if pipeline_dir else tmp_path
    ref.save_pretrained(target, max_shard_size="40KB" if sharded else "10GB")
    assert (target / "diffusion_pytorch_model.safetensors.index.json").exists() == sharded
    model = sparsedit.load_model(tmp_path)
    assert model.config.guidance_embeds == guidance and model.config.max_sequence_length == (512 if guidance else 256)
    assert (model.config.in_channels, model.config.depth) == (4, 4)
    inp = inputs(guidance)
    expected = reference_output(ref, inp)
    assert relative_error(our_output(model, inp), expected) < 1e-5


def test_export_to_diffusers_and_back_is_exact(tmp_path: Path) -> None:
    ref = tiny_reference(True)
    ref.save_pretrained(tmp_path / "ref")
    model = sparsedit.load_model(tmp_path / "ref")
    sparsedit.save_model(model, tmp_path / "out", fmt="diffusers")
    back = FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    theirs, again = ref.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys() and all(torch.equal(theirs[k], again[k]) for k in theirs)
    inp = inputs(True)
    assert torch.equal(reference_output(back, inp), reference_output(ref, inp))
    # and through our own format
    sparsedit.save_model(model, tmp_path / "ours")
    assert torch.equal(our_output(sparsedit.load_model(tmp_path / "ours"), inp), our_output(model, inp))


def test_every_key_is_consumed(tmp_path: Path) -> None:
    tiny_reference(False, depths=(1, 1)).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({**state, "single_transformer_blocks.0.attn.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) not used.*attn\.extra\.weight") as err:
        sparsedit.load_model(tmp_path)
    assert "\n" not in str(err.value)
    save_file({k: v for k, v in state.items() if k != "transformer_blocks.0.attn.norm_added_k.weight"}, weights)
    with pytest.raises(CheckpointError, match="missing key 'transformer_blocks.0.attn.norm_added_k.weight'") as err:
        sparsedit.load_model(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("patch_size", 2, "patch_size 2 is not supported"),
    ("out_channels", 8, "out_channels 8 differs from in_channels 16"),
    ("in_channels", 18, "in_channels 18 is not 4 x latent channels"),
    ("axes_dims_rope", [4, 6, 8], "axes_dims_rope \\[4, 6, 8\\] sums to 18"),
    ("num_layers", "2", "num_layers must be a positive integer"),
])
def test_unsupported_diffusers_settings_are_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    tiny_reference(False, depths=(1, 1)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(CheckpointError, match=message) as err:
        sparsedit.load_model(tmp_path)
    assert "\n" not in str(err.value)


def original_layout(ref: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """Black Forest Labs' key layout of a diffusers FLUX: the inverse of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` (loaders/single_file_utils.py), written out here."""
    sd = ref.state_dict()
    out: dict[str, torch.Tensor] = {}

    def put(ours: str, *theirs: str) -> None:
        for s in (".weight", ".bias"):
            out[ours + s] = torch.cat([sd.pop(t + s) for t in theirs])

    put("img_in", "x_embedder")
    put("txt_in", "context_embedder")
    for ours, theirs in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                         ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{theirs}.linear_1.weight" in sd:
            put(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
            put(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
    for i in range(ref.config.num_layers):
        o, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        put(o + "img_mod.lin", t + "norm1.linear")
        put(o + "txt_mod.lin", t + "norm1_context.linear")
        put(o + "img_attn.qkv", *(t + f"attn.to_{x}" for x in "qkv"))
        put(o + "txt_attn.qkv", *(t + f"attn.add_{x}_proj" for x in "qkv"))
        put(o + "img_attn.proj", t + "attn.to_out.0")
        put(o + "txt_attn.proj", t + "attn.to_add_out")
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            put(o + f"{stream}_mlp.0", t + f"{ff}.net.0.proj")
            put(o + f"{stream}_mlp.2", t + f"{ff}.net.2")
        for ours, theirs in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                             ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")):
            out[o + ours + ".scale"] = sd.pop(t + f"attn.{theirs}.weight")
    for i in range(ref.config.num_single_layers):
        o, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        put(o + "modulation.lin", t + "norm.linear")
        put(o + "linear1", t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp")
        put(o + "linear2", t + "proj_out")
        out[o + "norm.query_norm.scale"] = sd.pop(t + "attn.norm_q.weight")
        out[o + "norm.key_norm.scale"] = sd.pop(t + "attn.norm_k.weight")
    put("final_layer.linear", "proj_out")
    for s in (".weight", ".bias"):  # diffusers: (scale, shift); the original: (shift, scale)
        scale, shift = sd.pop("norm_out.linear" + s).chunk(2)
        out["final_layer.adaLN_modulation.1" + s] = torch.cat([shift, scale])
    assert not sd, sorted(sd)
    return out


def test_original_single_file_loads_exactly(tmp_path: Path) -> None:
    ref = tiny_reference(True, heads=1, head_dim=128, axes=(16, 56, 56), depths=(1, 2))  # FLUX.1's head layout
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in original_layout(ref).items()}, path)  # ComfyUI's prefix
    model = sparsedit.load_model(path)
    inp = inputs(True)
    assert relative_error(our_output(model, inp), reference_output(ref, inp)) < 1e-5
    # another head size needs the RoPE split, which the file does not store
    small = tiny_reference(False, depths=(1, 1))
    save_file(original_layout(small), path)
    with pytest.raises(CheckpointError, match="head dim 16 is not FLUX.1's 128"):
        sparsedit.load_model(path)
    inp = inputs(False)
    assert relative_error(our_output(flux_from_original(path, axes_dims_rope=(4, 6, 6)), inp),
                          reference_output(small, inp)) < 1e-5


@pytest.mark.parametrize("guidance, dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_face_matches_the_diffusers_transformer(tmp_path: Path, guidance: bool, dtype: torch.dtype) -> None:
    ref = tiny_reference(guidance, depths=(1, 1))
    ref.save_pretrained(tmp_path)
    face = to_diffusers(sparsedit.load_model(tmp_path, dtype=dtype))
    assert face.config.in_channels == 16 and face.config.guidance_embeds == guidance
    call = pipeline_call(inputs(guidance))
    for key in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"):  # as FluxPipeline casts
        call[key] = call[key].to(dtype)  # type: ignore[attr-defined]
    with torch.no_grad():
        expected, got = ref.to(dtype)(**call)[0], face(**call)[0]
    # bfloat16: the same ops in the same order (sigma rounded to bfloat16 before the x1000, as diffusers does)
    assert got.shape == expected.shape and relative_error(got.float(), expected.float()) < (1e-5 if dtype == torch.float32
                                                                                          else 1e-2)
    with pytest.raises(SparseditError, match="no joint_attention_kwargs"):
        face(**{**call, "joint_attention_kwargs": {"scale": 0.5}})
    kontext = call["img_ids"].clone()
    kontext[:, 0] = 1
    with pytest.raises(SparseditError, match="not FluxPipeline's \\(0, row, col\\) grid"):
        face(**{**call, "img_ids": kontext})


def test_model_runs_in_flux_pipeline(tmp_path: Path) -> None:
    ref = tiny_reference(True, depths=(1, 1))
    ref.save_pretrained(tmp_path)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=ref)
    kwargs = dict(prompt_embeds=torch.randn(1, TEXT, CAPTION), pooled_prompt_embeds=torch.randn(1, POOLED), height=48,
                  width=80, num_inference_steps=3, output_type="latent", guidance_scale=3.5)
    expected = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    use_in_pipeline(pipe, sparsedit.load_model(tmp_path))
    got = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert relative_error(got, expected) < 1e-5


def test_packing_round_trips_and_positions_are_the_pipelines() -> None:
    x = torch.randn(2, 4, *LATENT)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, *LATENT))
    assert torch.equal(unpack_latents(packed, (3, 5)), x)
    assert torch.equal(position_ids((3, 5), 0), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    assert not position_ids((3, 5), 4)[:4].any()


def test_guidance_must_match_the_model() -> None:
    dev = Flux(FluxConfig(input_size=LATENT, in_channels=4, hidden_size=32, depth_double=1, depth_single=1,
                          num_heads=2, axes_dims_rope=(4, 6, 6), caption_channels=CAPTION, pooled_channels=POOLED,
                          guidance_embeds=True))
    inp = inputs(False)
    with pytest.raises(SparseditError, match="guidance-distilled.*pass guidance"):
        our_output(dev, inp)
    schnell = Flux(FluxConfig(**{**{f: getattr(dev.config, f) for f in ("input_size", "in_channels", "hidden_size",
                                                                        "depth_double", "depth_single", "num_heads",
                                                                        "axes_dims_rope", "caption_channels",
                                                                        "pooled_channels")}}))
    with pytest.raises(SparseditError, match="no guidance embedding"):
        our_output(schnell, inputs(True))
    with pytest.raises(SparseditError, match="sums to 18, not the head dim 16"):
        FluxConfig(hidden_size=32, num_heads=2, axes_dims_rope=(4, 6, 8))


def test_presets_resolve() -> None:
    dev, schnell = preset_config("FLUX.1-dev", 1024), preset_config("FLUX.1-schnell", 512)
    assert (dev.model_type, dev.latent_hw, dev.grid, dev.depth, dev.guidance_embeds, dev.max_sequence_length) == \
        ("FLUX", (128, 128), (64, 64), 57, True, 512)
    assert (schnell.grid, schnell.guidance_embeds, schnell.max_sequence_length) == ((32, 32), False, 256)
    assert (dev.hidden_size, dev.num_heads, dev.head_dim, dev.axes_dims_rope, dev.in_channels) == \
        (3072, 24, 128, (16, 56, 56), 16)
    with pytest.raises(SparseditError, match="not a multiple of 16"):
        preset_config("FLUX.1-dev", 1000)


def test_family_members() -> None:
    fam = family_of(preset_config("FLUX.1-dev", 256))
    assert (fam.name, fam.sparse, fam.text_conditioned) == ("flux", False, True)
    with pytest.raises(SparseditError, match="has 28 blocks but the model has depth 57"):
        fam.sparse_config("SparseDiT-XL")
    with pytest.raises(SparseditError, match="guidance embedding"):
        fam.check_guidance("FLUX.1-dev")
    cond = fam.conditioning(None, 2, False, torch.Generator())
    assert {k: tuple(v.shape) for k, v in cond.items()} == \
        {"encoder_hidden_states": (2, 512, 4096), "pooled_projections": (2, 768), "guidance": (2,)}
    assert fam.sample_shape(2) == (2, 16, 32, 32)
    with pytest.raises(SparseditError, match="dense FLUX runs on its whole token grid"):
        fam.call(lambda *a: a[0], torch.zeros(1), torch.zeros(1), cond, (2, 2))


def hand_macs(n: int, text: int, d: int = 3072, depths: tuple[int, int] = (19, 38), packed: int = 64,
              caption: int = 4096, pooled: int = 768, guidance: bool = True) -> int:
    """FLUX's matmul MACs for one image of ``n`` tokens and ``text`` caption tokens, from the architecture."""
    f, s = 4 * d, n + text
    attention = 2 * s * s * d  # Q K^T and A V over the joint sequence
    double = 2 * 6 * d * d + s * (4 * d * d + 2 * d * f) + attention  # per stream: adaLN, qkv + proj, MLP
    single = 3 * d * d + s * (3 * d * d + d * f) + s * (d + f) * d + attention  # adaLN, linear1, linear2
    embed = n * packed * d + text * caption * d + (256 * d + d * d) * (2 if guidance else 1) + pooled * d + d * d
    final = 2 * d * d + n * d * packed
    return depths[0] * double + depths[1] * single + embed + final


def test_macs_of_flux_dev_at_1024_px_match_the_hand_count() -> None:
    from sparsedit.eval.flops import forward_macs

    report = forward_macs(preset_config("FLUX.1-dev", 1024))
    assert report.by_kind["linear"] + report.by_kind["attention"] == hand_macs(4096, 512) == 37_192_326_709_248
    assert report.params == 11_901_408_320  # FLUX.1-dev's published 12 B
    schnell = forward_macs(preset_config("FLUX.1-schnell", 512))
    assert schnell.total == hand_macs(1024, 256, guidance=False)


def test_flops_cli_counts_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    from sparsedit.cli import main

    assert main(["flops", "--model", "FLUX.1-dev", "--image-size", "1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model_type"], out["grid"], out["image_size"]) == ("FLUX", [64, 64], 1024)
    assert (out["sampler"], out["steps"]) == ("euler", 28)  # FluxPipeline's default run
    assert out["gmacs"] == pytest.approx(37_192.326709248)


def test_bench_runs_a_flux_and_refuses_guidance() -> None:
    from sparsedit.eval.bench import BenchSettings, bench_forward

    model = Flux(FluxConfig(input_size=LATENT, in_channels=4, hidden_size=32, depth_double=1, depth_single=1,
                            num_heads=2, axes_dims_rope=(4, 6, 6), caption_channels=CAPTION, pooled_channels=POOLED,
                            guidance_embeds=True, max_sequence_length=TEXT)).eval()
    assert bench_forward(model, 2, 500, settings=BenchSettings(repeats=1)).n == 1
    with pytest.raises(SparseditError, match="guidance-distilled.*--cfg-scale must be 1"):
        bench_forward(model, 1, 500, settings=BenchSettings(repeats=1, cfg_scale=4.0))


@pytest.mark.parametrize("preset, steps", [("FLUX.1-dev", 28), ("FLUX.1-schnell", 4)])
def test_sampling_timesteps_are_the_pipelines(preset: str, steps: int) -> None:
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    fam = family_of(preset_config(preset, 1024))
    assert fam.default_sampling == ("euler", steps)
    dev = preset == "FLUX.1-dev"  # FLUX.1-dev's scheduler shifts by the resolution; schnell's does not
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(4096) if dev else None)
    expected = sorted(float(t) for t in sched.timesteps)
    assert fam.sampling_timesteps("euler", steps) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(SparseditError, match="use --sampler euler"):
        fam.sampling_timesteps("ddpm", steps)
