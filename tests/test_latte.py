"""Tests for Latte / SparseLatte: diffusers parity, release state dicts, sparsification (token-set shapes,
r = 0 relationship, schedule), checkpoints, analytic FLOPs and generation.

The reference is diffusers' own ``LatteTransformer3DModel`` from a tiny config with every parameter
re-randomised (N(0, 0.2^2)), so zero-initialised layers cannot hide mapping errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import helpers
from sparsedit.core.checkpoint import save_pretrained
from sparsedit.diffusion.process import space_timesteps
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.eval.flops import latte_macs, latte_schedule_macs, measure_macs, model_params, sparse_latte_macs
from sparsedit.families.latte.convert import latte_from_original_state
from sparsedit.families.latte.model import Latte, LatteConfig, latte_config
from sparsedit.families.latte.sparse import SparseLatte, SparseLatteConfig, sparsify_latte
from sparsedit.families.latte.video import generate_latte, save_video_gif, save_video_strip
from sparsedit.loading import detect_format, export_differences, load_model, save_model

pytestmark = pytest.mark.usefixtures("single_thread")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
HEADS, HEAD_DIM = 2, 16
HIDDEN = HEADS * HEAD_DIM
CAPTION, TOKENS = 12, 5
FRAMES, LATENT = 4, 8  # 4 frames of a 4 x 4 token grid at patch 2


def randomize(module: nn.Module, std: float = 0.2) -> nn.Module:
    return helpers.randomize(module, std).eval()


def tiny(**kw) -> LatteConfig:
    base = dict(input_size=LATENT, num_frames=FRAMES, hidden_size=HIDDEN, depth=4, num_heads=HEADS, num_classes=5,
                caption_channels=CAPTION)
    base.update(kw)
    return LatteConfig(**base)


def cond(config: LatteConfig, batch: int = 2) -> Tensor:
    if config.conditioning == "text":
        return torch.randn(batch, TOKENS, CAPTION)
    return torch.tensor([1, 5, 0, 3][:batch])  # 5 = the null class


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    ref = diffusers.LatteTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=HIDDEN, attention_bias=True, sample_size=LATENT, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=CAPTION, video_length=FRAMES,
    )
    path = tmp_path_factory.mktemp("latte") / "pipe" / "transformer"
    randomize(ref).save_pretrained(path)
    return path


def test_diffusers_parity(diffusers_dir: Path) -> None:
    ref = diffusers.LatteTransformer3DModel.from_pretrained(diffusers_dir).eval()
    assert detect_format(diffusers_dir.parent) == "latte-diffusers"
    model = load_model(diffusers_dir.parent)  # the pipeline directory
    assert isinstance(model, Latte) and model.config.conditioning == "text" and model.config.depth == 4
    x, t, y = torch.randn(2, 4, FRAMES, LATENT, LATENT), torch.tensor([999, 7]), torch.randn(2, TOKENS, CAPTION)
    with torch.no_grad():
        assert (ref(x, timestep=t, encoder_hidden_states=y).sample - model(x, t, y)).abs().max() < TOL
        # Text masks: diffusers' Latte only handles them for a single frame, as a (B, 1, L) additive bias.
        bias = torch.zeros(2, 1, TOKENS)
        bias[0, :, 3:] = -10000.0
        x1 = x[:, :, :1]
        want = ref(x1, timestep=t, encoder_hidden_states=y, encoder_attention_mask=bias).sample
        assert (want - model(x1, t, y, bias)).abs().max() < TOL
        assert (want - model(x1, t, y)).abs().max() > 1e-3  # the mask mattered


def test_every_diffusers_key_consumed(diffusers_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "d"
    copy.mkdir()
    (copy / "config.json").write_text((diffusers_dir / "config.json").read_text())
    state = load_file(str(diffusers_dir / "diffusion_pytorch_model.safetensors"))
    save_file({**state, "extra.weight": torch.zeros(1)}, str(copy / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_model(copy)


def test_class_variant_release_state_and_guidance() -> None:
    model = randomize(Latte(tiny()))
    x, t = torch.randn(2, 4, FRAMES, LATENT, LATENT), torch.tensor([999, 7])
    with torch.no_grad():
        out = model(x, t, cond(model.config))
        assert out.shape == (2, 8, FRAMES, LATENT, LATENT)
        # The release stores pos_embed / temp_embed beside the weights, under our (= its) names.
        state = {**model.state_dict(), "pos_embed": model.pos_embed.clone(), "temp_embed": model.temp_embed.clone()}
        loaded = latte_from_original_state(state, num_heads=HEADS)
        assert loaded.config.num_classes == 5 and (loaded(x, t, cond(model.config)) - out).abs().max() == 0
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), cond(model.config), cfg_scale=3.0)
        assert guided.shape == (4, 8, FRAMES, LATENT, LATENT) and torch.equal(guided[:2, :4], guided[2:, :4])
        uncond = randomize(Latte(tiny(num_classes=0)))
        assert uncond(x, t).shape == (2, 8, FRAMES, LATENT, LATENT)
    with pytest.raises(CheckpointError, match="temp_embed"):
        latte_from_original_state({**state, "temp_embed": state["temp_embed"] + 1}, num_heads=HEADS)


def record(model: SparseLatte) -> dict[int, tuple[int, ...]]:
    shapes: dict[int, tuple[int, ...]] = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: shapes.__setitem__(i, tuple(out.shape)))
    return shapes


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_sparsify_token_sets_and_schedule(conditioning: str) -> None:
    dense = randomize(Latte(tiny(depth=10, conditioning=conditioning)))
    model = sparsify_latte(dense, "2,1,2,2,2,0,2", r_min=0.5, r_max=0.9)
    assert model.kinds == ["pool", "pool", "gen_s", "gen_t", "sparse", "sparse", "recover_t", "recover_s", "top", "top"]
    src, dst = dense.state_dict(), model.state_dict()
    assert torch.equal(dst["blocks.1.attn.v.weight"], src["blocks.1.attn.qkv.weight"][2 * HIDDEN :])
    assert torch.equal(dst["blocks.6.merge_dense.weight"], torch.eye(HIDDEN))
    assert not dst["blocks.7.merge_sparse.weight"].any()
    assert torch.equal(dst["blocks.5.attn.qkv.weight"], src["blocks.5.attn.qkv.weight"])
    if conditioning == "text":  # only layers on spatial source layers attend to the caption
        assert [b.cross_attn is not None for b in model.blocks] == [True, False] * 5
    shapes = record(model)
    b, n, f, d, y = 2, 16, FRAMES, HIDDEN, cond(dense.config)
    x = torch.randn(b, 4, f, LATENT, LATENT)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 3]), y, grid=(2, 3), frames=3)
    m, sf = 6, 3
    assert out.shape == (b, 8, f, LATENT, LATENT)
    assert shapes == {0: (b * f, n, d), 1: (b * n, f, d), 2: (b * f, m, d), 3: (b * m, sf, d), 4: (b * sf, m, d),
                      5: (b * m, sf, d), 6: (b * m, f, d), 7: (b * f, n, d), 8: (b * f, n, d), 9: (b * n, f, d)}
    # Schedule: isotropic split of r(t) over (frames, height, width); a batch must share one token set.
    cfg = model.config
    assert cfg.tokens_at(0) == ((3, 3), 3) and cfg.tokens_at(999) == ((2, 2), 2)  # keep 0.5 -> 0.79/axis; 0.1 -> 0.46
    with torch.no_grad():
        model(x, torch.tensor([999, 999]), y)
    assert shapes[3] == (b * 4, 2, d)
    with pytest.raises(SparseditError, match="mixes timesteps"):
        model(x, torch.tensor([0, 999]), y)


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_r0_generation_and_sparse_blocks_equal_dense(conditioning: str) -> None:
    """With every token kept, pooling is the identity and the generation cross-attention is the source
    self-attention, so gen_s, gen_t and the sparse blocks reproduce dense layers 0..3 (layer i is
    initialised from source layer i); the recovery blocks restart from the SDTM input and are not
    expected to."""
    dense = randomize(Latte(tiny(depth=8, conditioning=conditioning)))
    model = sparsify_latte(dense, "0,1,2,2,2,0,2")
    got, want = record(model), {}
    for i, block in enumerate(dense.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: want.__setitem__(i, out))
    outs: dict[int, Tensor] = {}
    for i in range(4):
        model.blocks[i].register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
    x, t, y = torch.randn(2, 4, FRAMES, LATENT, LATENT), torch.tensor([500, 500]), cond(dense.config)
    with torch.no_grad():
        dense(x, t, y)
        model(x, t, y, keep_ratio=1.0)
    assert got[3] == tuple(want[3].shape)
    for i in range(4):
        assert (outs[i] - want[i]).abs().max() < 1e-5, i


def test_checkpoint_round_trips(diffusers_dir: Path, tmp_path: Path) -> None:
    text = load_model(diffusers_dir)
    sparse = randomize(sparsify_latte(randomize(Latte(tiny(depth=10))), "2,1,2,2,2,0,2", temporal_share=0.5))
    x, t = torch.randn(1, 4, FRAMES, LATENT, LATENT), torch.tensor([600])
    for name, model in (("text", text), ("sparse", sparse)):
        loaded = load_model(save_pretrained(model, tmp_path / name))
        assert type(loaded) is type(model) and loaded.config == model.config
        y = cond(model.config, 1)
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_diffusers_export_round_trip(diffusers_dir: Path, tmp_path: Path) -> None:
    """diffusers -> ours -> diffusers is bit-exact; our own text Latte exports to a model diffusers runs equally."""
    loaded = load_model(diffusers_dir)
    assert export_differences(loaded.config) == []
    again = diffusers.LatteTransformer3DModel.from_pretrained(save_model(loaded, tmp_path / "again", fmt="diffusers"))
    ref = diffusers.LatteTransformer3DModel.from_pretrained(diffusers_dir)
    ref_state, again_state = ref.state_dict(), again.state_dict()
    assert sorted(ref_state) == sorted(again_state) and all(torch.equal(ref_state[k], again_state[k]) for k in ref_state)
    assert {k: again.config[k] for k in ref.config if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")}

    ours = randomize(Latte(tiny(conditioning="text")))  # exact caption masking: exported with diffusers' bias
    assert export_differences(ours.config) and "-10000" in export_differences(ours.config)[0]
    theirs = diffusers.LatteTransformer3DModel.from_pretrained(save_model(ours, tmp_path / "ours", fmt="diffusers"))
    x, t, y = torch.randn(2, 4, FRAMES, LATENT, LATENT), torch.tensor([999, 7]), cond(ours.config)
    with torch.no_grad():
        assert (theirs.eval()(x, timestep=t, encoder_hidden_states=y).sample - ours(x, t, y)).abs().max() < 1e-5
    refused = {
        "class-conditional": Latte(tiny()),
        "only a dense Latte": sparsify_latte(ours, "0,1,2,0,2,0,0"),
        "interpolation scale": Latte(tiny(conditioning="text", interpolation_scale=0.5)),
    }
    for words, model in refused.items():
        with pytest.raises(SparseditError, match=words):
            save_model(model, tmp_path / "refused", fmt="diffusers")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("case", ["class", "text", "sparse-class", "sparse-text"])
def test_macs_match_flop_counter(case: str) -> None:
    conditioning = case.split("-")[-1]
    model: Latte = randomize(Latte(tiny(depth=10, conditioning=conditioning)))
    if case.startswith("sparse"):
        model = sparsify_latte(model, "2,1,2,2,2,0,2")
    assert model_params(model.config) == sum(p.numel() for p in model.parameters())
    x, t, y = torch.randn(2, 4, 3, LATENT, LATENT), torch.tensor([5, 5]), cond(model.config)
    if isinstance(model, SparseLatte):
        kw = {"grid": (3, 2), "frames": 2}
        report = sparse_latte_macs(model.config, (3, 2), 2, frames=3, text_len=TOKENS)
    else:
        kw = {}
        report = latte_macs(model.config, frames=3, text_len=TOKENS)
    assert measure_macs(model, x, t, y, **kw) == 2 * report.total


def test_latte_xl_against_paper() -> None:
    """Paper Table 2: Latte-XL 1894 G, SparseLatte (r in [0.80, 0.93]) 828 G, per 16 x 256 px video, 250 steps."""
    config = latte_config("Latte-XL/2")
    assert latte_macs(config).gmacs == pytest.approx(1894, rel=1e-3)
    sparse = SparseLatteConfig.from_latte(config, "SparseLatte-XL")
    mean = latte_schedule_macs(sparse, space_timesteps(1000, "250"))["gmacs"]
    assert mean == pytest.approx(828, rel=0.03)


def test_generate_latte_strip_and_gif(tmp_path: Path) -> None:
    model = sparsify_latte(randomize(Latte(tiny(depth=10, in_channels=3, data_space="pixel"))), "2,1,2,2,2,0,2")
    videos = generate_latte(model, torch.tensor([0, 2]), sampler="ddim", steps=3, cfg_scale=2.0, num_frames=3)
    assert videos.shape == (2, 3, 3, LATENT, LATENT) and torch.isfinite(videos).all()
    again = generate_latte(model, torch.tensor([0, 2]), sampler="ddim", steps=3, cfg_scale=2.0, num_frames=3)
    assert torch.equal(videos, again)
    strip = Image.open(save_video_strip(videos.clamp(-1, 1), tmp_path / "v.png"))
    assert strip.size == (3 * (LATENT + 2) + 2, 2 * (LATENT + 2) + 2)  # one row per video, frames across
    gif = Image.open(save_video_gif(videos[0].clamp(-1, 1), tmp_path / "v.gif"))
    assert gif.n_frames == 3
