"""The dense Wan family: exact against diffusers' WanTransformer3DModel (text- and image-to-video, frame counts, dtypes;
loaded from its directories, sharded or not, pipeline roots and the original single-file layout), exported back,
behind WanPipeline (one transformer and Wan2.2's two experts), and its presets, sampling run and MAC counts.

The reference models are diffusers' own classes with every parameter random (diffusers draws some from tiny ranges);
the original key layout is checked by diffusers' own converter (``convert_wan_transformer_to_diffusers``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

import sparsedit
from helpers import one_line, tiny_text_encoder
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families import family_of
from sparsedit.families.presets import preset_config
from sparsedit.families.wan import (
    Wan,
    WanConfig,
    cast_like_diffusers,
    latent_frames,
    rope_table,
    token_positions,
    use_wan_experts,
)
from sparsedit.interop import to_diffusers, use_in_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT_DIM, IMAGE_DIM, TEXT = 20, 24, 7  # umT5 width, CLIP width, caption tokens of the tiny models
LATENT = (6, 10)  # non-square: a 3 x 5 token grid per frame
VARIANTS = {"t2v": {}, "i2v": {"image_dim": IMAGE_DIM, "added_kv_proj_dim": 32},
            "flf2v": {"image_dim": IMAGE_DIM, "added_kv_proj_dim": 32, "pos_embed_seq_len": 2 * 257}}


def tiny_reference(variant: str = "t2v", heads: int = 2, head_dim: int = 16, layers: int = 2, channels: int = 4,
                   text_dim: int = TEXT_DIM) -> WanTransformer3DModel:
    """A small diffusers Wan with every parameter random (I2V: 4 more input channels, as Wan's 16 + 20)."""
    extra = 4 if variant != "t2v" else 0
    image = {**VARIANTS[variant], "added_kv_proj_dim": heads * head_dim} if variant != "t2v" else {}
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                in_channels=channels + extra, out_channels=channels, text_dim=text_dim, freq_dim=32,
                                ffn_dim=40, num_layers=layers, rope_max_seq_len=32, **image)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    return ref.eval()


def inputs(ref: WanTransformer3DModel, frames: int = 3, batch: int = 2) -> dict[str, torch.Tensor | None]:
    cfg = ref.config
    image = None
    if cfg.image_dim is not None:  # diffusers splits the context 512 tokens from its end: I2V captions are 512 long
        image = torch.randn(batch * (2 if cfg.pos_embed_seq_len else 1), 257, cfg.image_dim)
    return {"hidden_states": torch.randn(batch, cfg.in_channels, frames, *LATENT), "timestep": torch.rand(batch) * 1000,
            "encoder_hidden_states": torch.randn(batch, 512 if image is not None else TEXT, cfg.text_dim),
            "encoder_hidden_states_image": image}


@torch.no_grad()
def reference_output(ref: WanTransformer3DModel, inp: dict[str, torch.Tensor | None]) -> torch.Tensor:
    return ref(**inp, return_dict=False)[0]


@torch.no_grad()
def our_output(model: torch.nn.Module, inp: dict[str, torch.Tensor | None]) -> torch.Tensor:
    return model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["encoder_hidden_states_image"])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_equal_diffusers_for_every_frame_count(tmp_path: Path, variant: str) -> None:
    ref = tiny_reference(variant)
    ref.save_pretrained(tmp_path)
    model = sparsedit.load_model(tmp_path)
    assert (type(model), model.config.image_conditioned) == (Wan, variant != "t2v")
    for frames in (1, 3, 5):
        inp = inputs(ref, frames)
        expected = reference_output(ref, inp)
        got = our_output(model, inp)
        assert got.shape == expected.shape == (2, 4, frames, *LATENT)
        assert relative_error(got, expected) < 1e-5  # in fact bit-identical: the same ops in the same order
        assert torch.equal(got, expected)


@pytest.mark.parametrize("sharded, pipeline_dir", [(True, False), (False, True), (True, True)])
def test_diffusers_directories_load(tmp_path: Path, sharded: bool, pipeline_dir: bool) -> None:
    ref = tiny_reference("i2v")
    target = tmp_path / "transformer" if pipeline_dir else tmp_path
    ref.save_pretrained(target, max_shard_size="40KB" if sharded else "10GB")
    assert (target / "diffusion_pytorch_model.safetensors.index.json").exists() == sharded
    model = sparsedit.load_model(tmp_path)
    inp = inputs(ref)
    assert torch.equal(our_output(model, inp), reference_output(ref, inp))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_equals_diffusers_loaded_in_it(tmp_path: Path, dtype: torch.dtype) -> None:
    ref = tiny_reference("i2v")
    ref.save_pretrained(tmp_path / "fp32")
    ref.to(dtype).save_pretrained(tmp_path / "half")
    inp = {k: None if v is None else v.to(dtype) if k != "timestep" else v for k, v in inputs(ref).items()}
    for src in ("fp32", "half"):
        theirs = WanTransformer3DModel.from_pretrained(tmp_path / src, torch_dtype=dtype).eval()
        ours = sparsedit.load_model(tmp_path / src)  # a half-precision file loads as from_pretrained loads it
        face = to_diffusers(ours).to(dtype=dtype) if src == "fp32" else to_diffusers(ours)  # as use_in_pipeline casts
        assert ours.dtype == dtype and ours.time_embedding[0].weight.dtype == torch.float32
        assert ours.blocks[0].norm3.weight.dtype == ours.blocks[0].modulation.dtype == torch.float32
        assert torch.equal(reference_output(face, inp), reference_output(theirs, inp))
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "fp32", torch_dtype=dtype).eval()
    plain = cast_like_diffusers(sparsedit.load_model(tmp_path / "fp32"), dtype)  # the same cast, on the model
    assert torch.equal(our_output(plain, inp), reference_output(theirs, inp))
    assert sparsedit.load_model(tmp_path / "fp32", dtype=dtype).time_embedding[0].weight.dtype == dtype  # .to: all


def test_export_to_diffusers_and_back_is_exact(tmp_path: Path) -> None:
    ref = tiny_reference("flf2v")
    ref.save_pretrained(tmp_path / "ref")
    model = sparsedit.load_model(tmp_path / "ref")
    sparsedit.save_model(model, tmp_path / "out", fmt="diffusers")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    theirs, again = ref.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys() and all(torch.equal(theirs[k], again[k]) for k in theirs)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in written.items() if not k.startswith("_")} == \
        {k: v for k, v in json.loads((tmp_path / "ref" / "config.json").read_text()).items() if not k.startswith("_")}
    inp = inputs(ref)
    assert torch.equal(reference_output(back, inp), reference_output(ref, inp))
    sparsedit.save_model(model, tmp_path / "ours")  # and through our own format
    assert torch.equal(our_output(sparsedit.load_model(tmp_path / "ours"), inp), our_output(model, inp))


def test_every_key_is_consumed(tmp_path: Path) -> None:
    tiny_reference("i2v", layers=1).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({**state, "blocks.0.attn1.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path)
    one_line(err, "1 key(s) not used", "blocks.0.attn1.extra.weight")
    save_file({k: v for k, v in state.items() if k != "blocks.0.attn2.norm_added_k.weight"}, weights)
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path)
    one_line(err, "missing key 'blocks.0.attn2.norm_added_k.weight'")
    # the unused norm_added_q of some diffusers I2V files is taken and dropped, as diffusers ignores it
    save_file({**state, "blocks.0.attn2.norm_added_q.weight": torch.ones(32)}, weights)
    assert "norm_added_q" not in " ".join(sparsedit.load_model(tmp_path).state_dict())


@pytest.mark.parametrize("field, value, message", [
    ("patch_size", [1, 2, 3], "patch_size must be \\[t, p, p\\]"),
    ("num_layers", "2", "num_layers must be a positive integer"),
    ("added_kv_proj_dim", None, "image_dim and added_kv_proj_dim go together"),
    ("added_kv_proj_dim", 16, "added_kv_proj_dim 16 must be the hidden size 32"),
    ("cross_attn_norm", "yes", "cross_attn_norm must be true or false"),
])
def test_unsupported_diffusers_settings_are_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    tiny_reference("i2v", layers=1).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(CheckpointError, match=message) as err:
        sparsedit.load_model(tmp_path)
    one_line(err)


def test_original_single_file_has_diffusers_converter_names(tmp_path: Path) -> None:
    ref = tiny_reference("i2v", heads=1, head_dim=128, layers=2)  # the releases' 128 channels per head
    ref.save_pretrained(tmp_path / "ref")
    original = sparsedit.load_model(tmp_path / "ref").state_dict()  # our names are the original release's
    converted = convert_wan_transformer_to_diffusers({f"model.diffusion_model.{k}": v for k, v in original.items()})
    theirs = ref.state_dict()
    assert converted.keys() == theirs.keys() and all(torch.equal(converted[k], theirs[k]) for k in theirs)
    path = tmp_path / "wan2.1_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}, path)  # ComfyUI's prefix
    model = sparsedit.load_model(path)
    inp = inputs(ref)
    assert torch.equal(our_output(model, inp), reference_output(ref, inp))
    save_file({**{k: v.contiguous() for k, v in original.items()}, "blocks.0.extra": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not used by the model: blocks.0.extra"):
        sparsedit.load_model(path)


def test_rope_tables_are_diffusers_and_take_fractional_positions() -> None:
    ref = tiny_reference(heads=1, head_dim=128)
    cos, sin = ref.rope(torch.zeros(1, 4, 3, *LATENT))  # (1, N, 1, 128), each pair's value twice
    ours = rope_table(token_positions(3, (3, 5)), WanConfig(hidden_size=128, num_heads=1).rope_axes)
    assert WanConfig(hidden_size=128, num_heads=1).rope_axes == (44, 42, 42)
    assert torch.equal(ours[0], cos[0, :, 0, 0::2]) and torch.equal(ours[1], sin[0, :, 0, 1::2])
    half = rope_table(torch.tensor([[0.5, 1.5, 2.5]], dtype=torch.float64), (44, 42, 42))
    assert torch.equal(half[0][0, :1], torch.tensor([0.5]).cos())  # the first frequency of each axis is 1


def tiny_pipeline(transformer: WanTransformer3DModel, transformer_2: WanTransformer3DModel | None = None) -> WanPipeline:
    """WanPipeline with a tiny Wan VAE, a one-layer umT5 over an in-memory vocabulary and the Euler scheduler."""
    from transformers import UMT5Config, UMT5EncoderModel

    _, tokenizer = tiny_text_encoder(TEXT_DIM)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_ff=32, d_kv=8, num_layers=1,
                                          num_heads=2)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer_2=transformer_2,
                       boundary_ratio=None if transformer_2 is None else 0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = dict(prompt=["a small cactus with happy face"], negative_prompt=["dog"], height=48, width=80, num_frames=9,
            num_inference_steps=3, guidance_scale=5.0, max_sequence_length=TEXT, output_type="latent")


def test_face_and_generate_match_wan_pipeline(tmp_path: Path) -> None:
    ref = tiny_reference(channels=16)
    ref.save_pretrained(tmp_path)
    pipe = tiny_pipeline(ref)
    noise = torch.randn(1, 16, 3, *LATENT)  # 9 frames -> 3 latent frames of 48 x 80 px
    expected = pipe(latents=noise.clone(), **CALL).frames
    model = sparsedit.load_model(tmp_path)
    use_in_pipeline(pipe, model)
    got = pipe(latents=noise.clone(), **CALL).frames
    assert relative_error(got, expected) < 1e-5
    fam = family_of(model)  # the family's own sampling: the same Euler run and guidance, with WanPipeline's prompts
    fam.config.max_sequence_length = TEXT
    text = fam.pipeline_encode(pipe, CALL["prompt"], "dog", True, torch.device("cpu"))
    assert text["embeds"].shape == (1, TEXT, TEXT_DIM) and not text["null_embeds"][0, 2:].any()  # zero padding
    latents = fam.generate(model, text=text, steps=3, cfg_scale=5.0, noise=noise.clone())
    assert relative_error(latents, expected) < 1e-5
    with pytest.raises(SparseditError, match="no attention_kwargs"):
        pipe.transformer(noise, torch.tensor([500.0]), text["embeds"], attention_kwargs={"scale": 0.5})


def test_two_experts_switch_at_the_boundary(tmp_path: Path) -> None:
    high, low = tiny_reference(channels=16, layers=1), tiny_reference(channels=16, layers=1)
    high.save_pretrained(tmp_path / "transformer")
    low.save_pretrained(tmp_path / "transformer_2")
    pipe = tiny_pipeline(high, low)
    noise = torch.randn(1, 16, 3, *LATENT)
    expected = pipe(latents=noise.clone(), **CALL).frames
    with pytest.raises(SparseditError, match="has no boundary_ratio"):
        use_wan_experts(tiny_pipeline(high), high, low)
    use_wan_experts(pipe, sparsedit.load_model(tmp_path), sparsedit.load_model(tmp_path / "transformer_2"))
    assert relative_error(pipe(latents=noise.clone(), **CALL).frames, expected) < 1e-5


def hand_params(d: int, f: int, layers: int, c_in: int = 16, c_out: int = 16, text: int = 4096,
                image: int | None = None) -> int:
    """Parameters of a Wan from its architecture (weights and biases of every Linear / Conv, norm weights, tables)."""
    block = 8 * (d * d + d) + 4 * d + 2 * d + (d * f + f + f * d + d) + 6 * d  # attentions, q/k norms, norm3, FFN
    embed = c_in * 4 * d + d + (text * d + d + d * d + d) + (256 * d + d + d * d + d) + (6 * d * d + 6 * d)
    head = d * 4 * c_out + 4 * c_out + 2 * d
    if image is not None:
        block += 2 * (d * d + d) + d  # k_img, v_img, norm_k_img
        embed += 2 * image + image * image + image + image * d + d + 2 * d
    return layers * block + embed + head


def test_presets_and_their_sizes() -> None:
    small = preset_config("Wan2.1-T2V-1.3B", 480)
    assert (small.model_type, small.latent_hw, small.grid, small.num_frames, small.video_frames) == \
        ("Wan", (60, 104), (30, 52), 21, 81)
    assert (small.hidden_size, small.num_heads, small.head_dim, small.depth, small.ffn_dim) == (1536, 12, 128, 30, 8960)
    assert preset_config("Wan2.1-T2V-14B", 720).latent_hw == (90, 160)
    params = {name: family_of(preset_config(name, 480)) for name in ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B",
                                                                      "Wan2.1-I2V-14B-480P", "Wan2.2-T2V-A14B")}
    from sparsedit.eval.macs import count_params

    counts = {name: count_params(fam.config) for name, fam in params.items()}
    assert counts == {"Wan2.1-T2V-1.3B": hand_params(1536, 8960, 30),
                      "Wan2.1-T2V-14B": hand_params(5120, 13824, 40),
                      "Wan2.1-I2V-14B-480P": hand_params(5120, 13824, 40, c_in=36, image=1280),
                      "Wan2.2-T2V-A14B": hand_params(5120, 13824, 40)}
    assert counts["Wan2.1-T2V-1.3B"] == 1_418_996_800 and counts["Wan2.1-T2V-14B"] == 14_288_491_584 and counts["Wan2.1-I2V-14B-480P"] == 16_394_878_784
    assert latent_frames(81) == 21 and latent_frames(1) == 1
    with pytest.raises(SparseditError, match="4k \\+ 1 frames"):
        latent_frames(80)
    with pytest.raises(SparseditError, match="not a multiple of 16"):
        preset_config("Wan2.1-T2V-1.3B", 488)


def hand_macs(n: int, text: int, d: int, f: int, layers: int, c_in: int = 16, c_out: int = 16) -> int:
    """Wan's matmul MACs for one video of ``n`` tokens and ``text`` caption tokens, from the architecture."""
    block = (n * 6 * d * d + text * 2 * d * d + n * 2 * d * f  # self q, k, v, o + cross q, o; cross k, v; FFN
             + 2 * n * n * d + 2 * n * text * d)  # self-attention Q K^T and A V, cross-attention
    embed = n * c_in * 4 * d + text * (4096 * d + d * d) + 256 * d + d * d + 6 * d * d  # patches, caption, timestep
    return layers * block + embed + n * d * 4 * c_out  # + the head


def test_flops_cli_counts_wan_at_480p_81_frames(capsys: pytest.CaptureFixture[str]) -> None:
    from sparsedit.cli import main

    assert main(["flops", "--model", "Wan2.1-T2V-1.3B", "--image-size", "480", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model_type"], out["grid"], out["image_size"], out["sampler"], out["steps"]) == \
        ("Wan", [30, 52], [480, 832], "euler", 50)
    assert out["grids"][0]["frames"] == 21 and out["grids"][0]["tokens"] == 21 * 30 * 52
    expected = hand_macs(21 * 30 * 52, 512, 1536, 8960, 30)
    assert expected == 141_500_893_888_512
    assert out["gmacs"] * 1e9 == pytest.approx(expected, rel=1e-12) and out["params"] == 1_418_996_800


def test_sampling_timesteps_are_the_euler_schedulers() -> None:
    for size, shift in ((480, 3.0), (720, 5.0)):
        fam = family_of(preset_config("Wan2.1-T2V-14B", size))
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(50)
        assert fam.sampling_timesteps("euler", 50) == pytest.approx(sorted(float(t) for t in sched.timesteps), abs=1e-3)
    with pytest.raises(SparseditError, match="use --sampler euler"):
        fam.sampling_timesteps("ddpm", 50)


def test_family_members(tmp_path: Path) -> None:
    fam = family_of(preset_config("Wan2.1-I2V-14B-480P", 480))
    assert (fam.name, fam.sparse, fam.text_conditioned, fam.pooled_text, fam.frames) == ("wan", False, True, False, 21)
    assert (fam.default_sampling, fam.default_cfg_scale, fam.pipeline_class) == (("euler", 50), 5.0, "WanPipeline")
    cond = fam.conditioning(None, 2, True, torch.Generator())
    assert {k: tuple(v.shape) for k, v in cond.items()} == \
        {"encoder_hidden_states": (4, 512, 4096), "encoder_hidden_states_image": (4, 257, 1280)}
    assert fam.sample_shape(2) == (2, 36, 21, 60, 104)
    assert fam.describe(None) == {"forward_grid": [30, 52], "forward_frames": 21}
    assert fam.tokens_label(((3, 5), 2)) == "3x5x2f"
    with pytest.raises(SparseditError, match="dense Wan runs on its whole token grid"):
        fam.call(lambda *a: a[0], torch.zeros(1), torch.zeros(1), cond, ((2, 2), 1))
    with pytest.raises(SparseditError, match="needs a dense Wan"):
        fam.sparsify(None, "2,4,1,5,1,1,6", None)  # type: ignore[arg-type]
    with pytest.raises(SparseditError, match="image-to-video"):
        fam.generate(None, text={"embeds": torch.zeros(1, 512, 4096)})  # type: ignore[arg-type]
    assert fam.default_vae_dir(None) is None  # no pipeline folder given: --vae must say where the Wan VAE is
    with pytest.raises(SparseditError, match="normalised per channel"):
        fam.latent_scaling(None)  # type: ignore[arg-type]
    with pytest.raises(SparseditError, match="AutoencoderKLWan"):
        fam.decode_samples(None, torch.zeros(1, 16, 2, 4, 4), None)  # type: ignore[arg-type]
    video = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    assert fam.write_samples(video, tmp_path / "v.gif", None, None).stat().st_size > 0
    assert fam.write_samples(video, tmp_path / "v.png", None, None).stat().st_size > 0


def test_inputs_are_checked_and_checkpointing_gives_the_same_gradients() -> None:
    model = Wan(WanConfig(input_size=LATENT, num_frames=2, in_channels=4, out_channels=4, hidden_size=32, depth=2,
                          num_heads=2, ffn_dim=40, caption_channels=TEXT_DIM, freq_dim=32))
    x, t, text = torch.randn(1, 4, 2, *LATENT), torch.tensor([300.0]), torch.randn(1, TEXT, TEXT_DIM)
    with pytest.raises(SparseditError, match="expected \\(B, 4, F, H, W\\)"):
        model(x[:, :3], t, text)
    with pytest.raises(SparseditError, match="takes no image embeddings"):
        model(x, t, text, torch.randn(1, 257, IMAGE_DIM))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(SparseditError, match="set both or neither"):
        WanConfig(image_dim=1280)
    with pytest.raises(SparseditError, match="qk_norm"):
        WanConfig(qk_norm="layer_norm")


def test_a_diffusers_lora_lands_on_the_renamed_tensor(tmp_path: Path) -> None:
    from sparsedit.lora import load_lora

    tiny_reference().save_pretrained(tmp_path)
    model = sparsedit.load_model(tmp_path)
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    before = model.blocks[1].cross_attn.v.weight.clone()
    load_lora(model, {"transformer.blocks.1.attn2.to_v.lora_A.weight": a, "transformer.blocks.1.attn2.to_v.lora_B.weight": b})
    assert torch.allclose(model.blocks[1].cross_attn.v.weight - before, b @ a, atol=1e-6)


def test_prompts_are_encoded_by_the_pipeline_folder(tmp_path: Path) -> None:
    from sparsedit.families.flow import pipeline_family

    pipe = tiny_pipeline(tiny_reference(channels=16, layers=1))
    pipe.save_pretrained(tmp_path)
    fam = pipeline_family(tmp_path)  # the family and transformer config named by model_index.json
    assert (fam.name, fam.config.max_sequence_length) == ("wan", 512)
    text = fam.encode_prompts(None, tmp_path, ["a small dog", "happy cactus"], None, True, "cpu")
    with torch.no_grad():
        embeds, null = pipe.encode_prompt(["a small dog", "happy cactus"], "", True, max_sequence_length=512)
    # the reloaded umT5 rounds its last bits differently (3.6e-7 here); the zero padding is exact
    assert torch.allclose(text["embeds"], embeds, atol=1e-5) and torch.allclose(text["null_embeds"], null, atol=1e-5)
    assert text["embeds"].shape == (2, 512, TEXT_DIM) and not text["embeds"][:, 8:].any()
    assert isinstance(sparsedit.load_model(tmp_path), Wan)  # the pipeline root loads its transformer/


def test_bench_times_a_tiny_wan_with_and_without_guidance() -> None:
    from sparsedit.eval.bench import BenchSettings, bench_forward

    model = Wan(WanConfig(input_size=LATENT, num_frames=3, in_channels=4, out_channels=4, hidden_size=32, depth=1,
                          num_heads=2, ffn_dim=40, caption_channels=TEXT_DIM, freq_dim=32, max_sequence_length=TEXT)).eval()
    assert bench_forward(model, 2, 500, settings=BenchSettings(repeats=1)).n == 1
    assert bench_forward(model, 1, 500, settings=BenchSettings(repeats=1, cfg_scale=5.0)).n == 1


def test_sample_cli_gives_wan_pipelines_own_video(tmp_path: Path) -> None:
    """`sparsedit sample --ckpt WAN_PIPELINE --prompt ...`: umT5 and the Wan VAE of the pipeline folder, the Euler run
    with guidance, the per-channel latent normalisation undone, the whole clip decoded at once; the MP4 / GIF hold
    the same frames as WanPipeline(output_type="np") on the same noise."""
    av = pytest.importorskip("av")
    from PIL import Image

    from sparsedit.cli import main
    from sparsedit.diffusion.flow import start_noise

    ref = tiny_reference(channels=16, layers=1)
    pipe = tiny_pipeline(ref)
    pipe.save_pretrained(tmp_path / "pipe")
    model = sparsedit.load_model(tmp_path / "pipe", image_size=48)  # 48 x 48 px: 6 x 6 latents
    assert model.config.latent_hw == (6, 6)
    noise = start_noise(family_of(model).sample_shape(1), 3, "cpu")
    call = {**CALL, "output_type": "np", "negative_prompt": [""], "max_sequence_length": 512,
            "height": 48, "width": 48, "num_frames": 1 + 4 * (noise.shape[2] - 1)}
    want = pipe(latents=noise.clone(), **call).frames[0]  # (F, H, W, 3) in [0, 1]
    strip, gif, mp4 = tmp_path / "v.png", tmp_path / "v.gif", tmp_path / "v.mp4"
    common = ["--ckpt", str(tmp_path / "pipe"), "--image-size", "48", "--prompt", CALL["prompt"][0], "--steps", "3",
              "--seed", "3", "--device", "cpu", "--no-progress"]
    for out in (strip, gif, mp4):
        assert main(["sample", *common, "--out", str(out)]) == 0
    ref_frames = np.round(want * 255).astype(np.int16)
    tiles = np.asarray(Image.open(strip).convert("RGB")).astype(np.int16)  # lossless: frames left to right, 2 px apart
    for i, frame in enumerate(ref_frames):
        assert np.abs(tiles[2:50, 2 + 50 * i:50 + 50 * i] - frame).max() <= 1
    assert tiles.shape[1] == 2 + 50 * len(ref_frames)
    img = Image.open(gif)  # a palette per frame: only its timing is compared
    assert img.n_frames == len(ref_frames) and abs(img.info["duration"] - 1000 / 16) <= 10  # 16 fps (GIF: 10 ms units)
    with av.open(str(mp4)) as container:
        assert float(container.streams.video[0].average_rate) == 16
        assert sum(1 for _ in container.decode(video=0)) == len(ref_frames)


def test_flops_of_a_checkpoint_at_480_counts_480_by_832(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--image-size on a checkpoint goes through the family (Wan: 480 -> 480 x 832 px), not a square."""
    from sparsedit.cli import main

    model = Wan(WanConfig(input_size=LATENT, num_frames=2, in_channels=4, out_channels=4, hidden_size=32, depth=2,
                          num_heads=2, ffn_dim=40, caption_channels=TEXT_DIM, freq_dim=32, rope_max_seq_len=64))
    sparsedit.save_model(model, tmp_path / "wan")
    capsys.readouterr()
    assert main(["flops", "--model", str(tmp_path / "wan"), "--image-size", "480"]) == 0
    assert "token grid 30x52" in capsys.readouterr().out
