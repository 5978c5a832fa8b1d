"""diffusers interop for PixArt-alpha and Latte: our models as drop-in transformers of PixArtAlphaPipeline and
LattePipeline, per-step sparse grids under DDIM / DPM-Solver++ / flow matching, and the README recipes.

Pipelines are assembled offline from random components: diffusers' own transformers (every parameter
re-randomised), a tiny VAE, and either precomputed prompt embeddings (no text encoder) or, for the README
recipes, a tiny T5 encoder with a tokenizer built in memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import helpers
import sparsedit
from sparsedit.core.schedule import discrete_timestep
from sparsedit.errors import SparseditError
from sparsedit.families.latte.model import Latte, LatteConfig
from sparsedit.families.latte.sparse import SparseLatte, sparsify_latte
from sparsedit.families.pixart.sparse import SparsePixArt, sparsify_pixart
from sparsedit.interop import DiffusersLatte, DiffusersPixArt, to_diffusers, use_in_pipeline

pytest.importorskip("transformers")  # diffusers only provides PixArtAlphaPipeline / LattePipeline with it
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    LattePipeline,
    LatteTransformer3DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

from test_interop import dit_transformer, tiny_vae  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

HEADS, HEAD_DIM = 2, 16
CAPTION, TOKENS = 16, 6
FRAMES, LATENT = 4, 8  # 4 x 4 token grid at patch 2; the 1-block VAE keeps images at latent size
PIXART_LAYOUT, LATTE_LAYOUT = "1,1,1,1,1,0,1", "0,1,2,2,2,0,0"
RATES = dict(r_min=0.3, r_max=0.8)
TRANSFORMER_ARGS = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
                        cross_attention_dim=HEADS * HEAD_DIM, patch_size=2, caption_channels=CAPTION, norm_eps=1e-6)
LATTE_ARGS = dict(attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                  norm_type="ada_norm_single", norm_elementwise_affine=False)


def pixart_transformer(sample_size: int = LATENT, caption: int = CAPTION) -> PixArtTransformer2DModel:
    ref = PixArtTransformer2DModel(**{**TRANSFORMER_ARGS, "caption_channels": caption}, num_layers=5,
                                   sample_size=sample_size)
    return helpers.randomize(ref, 0.05).eval()


def latte_transformer(sample_size: int = LATENT, patch_size: int = 2, frames: int = FRAMES) -> LatteTransformer3DModel:
    ref = LatteTransformer3DModel(**{**TRANSFORMER_ARGS, "patch_size": patch_size}, **LATTE_ARGS, num_layers=3,
                                  sample_size=sample_size, video_length=frames)
    return helpers.randomize(ref, 0.05).eval()


def text_inputs(batch: int = 2) -> dict[str, Tensor]:
    """Fixed prompt / negative-prompt embeddings (the same every call); the prompt mask pads the first caption."""
    gen = torch.Generator().manual_seed(4)
    mask = torch.ones(batch, TOKENS, dtype=torch.long)
    mask[0, 3:] = 0
    return dict(prompt_embeds=torch.randn(batch, TOKENS, CAPTION, generator=gen), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(batch, TOKENS, CAPTION, generator=gen),
                negative_prompt_attention_mask=torch.ones(batch, TOKENS, dtype=torch.long))


def saved(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def pixart_pipe(ref: nn.Module) -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=ref,
                               scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latte_pipe(ref: nn.Module) -> LattePipeline:
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=ref, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pixart(pipe: PixArtAlphaPipeline, scheduler_cls: type = DPMSolverMultistepScheduler) -> np.ndarray:
    pipe.scheduler = scheduler_cls()
    return pipe(**text_inputs(), negative_prompt=None, num_inference_steps=4, guidance_scale=4.5, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0), output_type="np").images  # (B, H, W, 3)


def run_latte(pipe: LattePipeline, scheduler_cls: type = DDIMScheduler) -> np.ndarray:
    pipe.scheduler = scheduler_cls()
    inp = text_inputs()
    return pipe(prompt_embeds=inp["prompt_embeds"], negative_prompt_embeds=inp["negative_prompt_embeds"],
                negative_prompt=None, video_length=FRAMES, height=LATENT, width=LATENT, num_inference_steps=4, guidance_scale=4.5,
                generator=torch.Generator().manual_seed(0), output_type="np").frames  # (B, F, H, W, 3)


def record_sparse_tokens(model: SparsePixArt | SparseLatte) -> list[tuple[int, ...]]:
    """One entry per forward: the sparse token count of each generation block (dim 1 of its output).

    PixArt: (M,) from its (B, M, D) output. Latte: (M, f) from gen_s (B*F, M, D) and gen_t (B*M, f, D).
    """
    gens = [block for block, kind in zip(model.blocks, model.kinds, strict=True) if kind in ("gen", "gen_s", "gen_t")]
    seen: list[tuple[int, ...]] = []
    current: list[int] = []

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        current.append(out.shape[1])
        if len(current) == len(gens):
            seen.append(tuple(current))
            current.clear()

    for block in gens:
        block.register_forward_hook(hook)
    return seen


def expected_tokens(model: SparsePixArt | SparseLatte, t: float | Tensor) -> tuple[int, ...]:
    """What the schedule gives for a (possibly fractional) scheduler timestep."""
    step = discrete_timestep(float(t), model.config.num_timesteps)
    if isinstance(model, SparseLatte):
        (h, w), frames = model.config.tokens_at(step)
        return (h * w, frames)
    h, w = model.config.schedule.grid(step, model.config.grid)
    return (h * w,)


# ------------------------------------------------------------------------------------------------
# PixArtAlphaPipeline
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    return saved(pixart_transformer(), tmp_path_factory.mktemp("pixart") / "transformer")


def test_pixart_loaded_model_reproduces_the_pipeline(pixart_dir: Path) -> None:
    ref = PixArtTransformer2DModel.from_pretrained(pixart_dir).eval()
    pipe = pixart_pipe(ref)
    expected = run_pixart(pipe)
    use_in_pipeline(pipe, sparsedit.load_model(pixart_dir))
    assert isinstance(pipe.transformer, DiffusersPixArt)
    got = run_pixart(pipe)
    assert got.shape == (2, LATENT, LATENT, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_sparse_pixart_uses_the_schedule_grid_at_every_step(pixart_dir: Path, scheduler_cls: type) -> None:
    sparse = sparsify_pixart(sparsedit.load_model(pixart_dir), PIXART_LAYOUT, **RATES)
    seen = record_sparse_tokens(sparse)
    pipe = pixart_pipe(PixArtTransformer2DModel.from_pretrained(pixart_dir))
    use_in_pipeline(pipe, sparse)
    images = run_pixart(pipe, scheduler_cls)
    assert np.isfinite(images).all()
    assert seen == [expected_tokens(sparse, t) for t in pipe.scheduler.timesteps]
    assert len(set(seen)) > 1  # the grid really changes over the run


# ------------------------------------------------------------------------------------------------
# LattePipeline
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    return saved(latte_transformer(), tmp_path_factory.mktemp("latte") / "transformer")


def test_latte_loaded_model_reproduces_the_pipeline(latte_dir: Path) -> None:
    pipe = latte_pipe(LatteTransformer3DModel.from_pretrained(latte_dir).eval())
    expected = run_latte(pipe)
    use_in_pipeline(pipe, sparsedit.load_model(latte_dir))
    assert isinstance(pipe.transformer, DiffusersLatte)
    got = run_latte(pipe)
    assert got.shape == (2, FRAMES, LATENT, LATENT, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sparse_latte_uses_the_schedule_tokens_at_every_step(latte_dir: Path) -> None:
    sparse = sparsify_latte(sparsedit.load_model(latte_dir), LATTE_LAYOUT, **RATES)
    seen = record_sparse_tokens(sparse)
    pipe = latte_pipe(LatteTransformer3DModel.from_pretrained(latte_dir))
    use_in_pipeline(pipe, sparse)
    assert np.isfinite(run_latte(pipe, DPMSolverMultistepScheduler)).all()
    assert seen == [expected_tokens(sparse, t) for t in pipe.scheduler.timesteps]
    assert len(set(seen)) > 1


# ------------------------------------------------------------------------------------------------
# timesteps: flow matching, fractional, scalar / 0-d / (1,) / expanded
# ------------------------------------------------------------------------------------------------


def test_discrete_timestep_rounds_half_up_and_maps_the_noise_end() -> None:
    assert [discrete_timestep(t) for t in (0, 0.49, 0.5, 249.5, 998.6, 999, 999.5, 1000.0)] == [
        0, 0, 1, 250, 999, 999, 999, 999]
    for bad in (-0.6, 1000.5, float("nan"), "500"):
        with pytest.raises(SparseditError, match="outside"):
            discrete_timestep(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_flow_matching_loop_gives_each_step_its_schedule_grid(pixart_dir: Path, latte_dir: Path, family: str) -> None:
    """FlowMatchEulerDiscreteScheduler passes t = sigma * 1000 (1000.0 first, then fractional values).

    diffusers' PixArt / Latte pipelines cannot run it (it has no scale_model_input), so the test drives
    the wrapped model with the scheduler in the pipelines' own loop form.
    """
    if family == "pixart":
        sparse = sparsify_pixart(sparsedit.load_model(pixart_dir), PIXART_LAYOUT, **RATES)
        x = torch.randn(2, 4, LATENT, LATENT)
    else:
        sparse = sparsify_latte(sparsedit.load_model(latte_dir), LATTE_LAYOUT, **RATES)
        x = torch.randn(2, 4, FRAMES, LATENT, LATENT)
    face, seen = to_diffusers(sparse), record_sparse_tokens(sparse)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    timesteps = scheduler.timesteps
    assert timesteps[0] == 1000 and any(t != t.round() for t in timesteps)  # the noise end and fractions
    text = torch.randn(2, TOKENS, CAPTION)
    with torch.no_grad():
        for t in timesteps:
            out = face(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            x = scheduler.step(out[:, :4], t, x).prev_sample
    assert torch.isfinite(x).all()
    assert seen == [expected_tokens(sparse, t) for t in timesteps] and len(set(seen)) > 1


def test_timestep_forms_agree(pixart_dir: Path) -> None:
    sparse = sparsify_pixart(sparsedit.load_model(pixart_dir), PIXART_LAYOUT, **RATES)
    face = to_diffusers(sparse)
    x, text = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, TOKENS, CAPTION)
    with torch.no_grad():
        outs = [face(x, text, timestep=t).sample for t in
                (600, 600.0, torch.tensor(600), torch.tensor([600]), torch.tensor(600.0).expand(2))]
        assert all(torch.equal(o, outs[0]) for o in outs)
        # t = 1000 (pure noise, flow matching) uses the grid of t = 999.
        seen = record_sparse_tokens(sparse)
        face(x, text, timestep=torch.tensor(1000.0))
        assert seen == [expected_tokens(sparse, 999)]
        with pytest.raises(SparseditError, match="outside"):
            face(x, text, timestep=1000.7)
        with pytest.raises(SparseditError, match="3 timesteps for a batch of 2"):
            face(x, text, timestep=torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_mismatched_models_are_refused(pixart_dir: Path, latte_dir: Path) -> None:
    pixart, latte = sparsedit.load_model(pixart_dir), sparsedit.load_model(latte_dir)
    dit_pipe = DiTPipeline(transformer=dit_transformer(), vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe = pixart_pipe(PixArtTransformer2DModel.from_pretrained(pixart_dir))
    original = pipe.transformer
    cases = [
        (dit_pipe, pixart, ("a PixArt cannot replace the transformer of a DiTPipeline", "PixArtAlphaPipeline")),
        (pipe, latte, ("Latte", "PixArtAlphaPipeline", "LattePipeline")),
        (pipe, sparsedit.load_model(saved(pixart_transformer(caption=12), pixart_dir.parent / "other")),
         ("caption_channels=16", "has 12", "converted from this pipeline")),
        (latte_pipe(LatteTransformer3DModel.from_pretrained(latte_dir)),
         Latte(LatteConfig(input_size=LATENT, num_frames=FRAMES, hidden_size=32, depth=2, num_heads=2)),
         ("class-conditional",)),
        (pipe, nn.Linear(2, 2), ("no diffusers pipeline takes a Linear",)),
    ]
    for target, model, words in cases:
        with pytest.raises(SparseditError) as err:
            use_in_pipeline(target, model)
        one_line(err, *words)
    assert pipe.transformer is original
    face = to_diffusers(latte)
    with pytest.raises(SparseditError) as err:
        face(torch.randn(1, 4, FRAMES, LATENT, LATENT), 5, torch.randn(1, TOKENS, CAPTION),
             enable_temporal_attentions=False)
    one_line(err, "enable_temporal_attentions")


# ------------------------------------------------------------------------------------------------
# README: the one-call recipes run as written on tiny stand-ins saved under the paths they name
# ------------------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using a SparseDiT inside a diffusers pipeline"


def build_readme_stand_ins(root: Path) -> None:
    """The pipeline and checkpoint directories the README names, tiny and random.

    PixArt: sample_size 32 (a "256 px" model, so the pipeline's default resolution binning applies) with
    an 8x VAE. Latte: the pipeline's defaults (512 px, 16 frames) become 64 x 64 latents, 4 x 4 tokens
    per frame at patch 16.
    """
    from sparsedit.families.dit.sparsify import sparsify

    DiTPipeline(transformer=dit_transformer(), vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(root / "DiT-XL-2-256")
    sparsedit.save_pretrained(sparsify(sparsedit.load_model(root / "DiT-XL-2-256"), layout="1,1,1,1,1,0,1", **RATES),
                              root / "sparse-xl")
    encoder, tokenizer = helpers.tiny_text_encoder(CAPTION)
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(4), transformer=pixart_transformer(32),
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(root / "PixArt-XL-2-512x512")
    sparsedit.save_pretrained(sparsify_pixart(sparsedit.load_model(root / "PixArt-XL-2-512x512"), PIXART_LAYOUT,
                                              **RATES), root / "sparse-pixart")
    LattePipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(4),
                  transformer=latte_transformer(64, patch_size=16, frames=16),
                  scheduler=DDIMScheduler()).save_pretrained(root / "Latte-1")
    sparsedit.save_pretrained(sparsify_latte(sparsedit.load_model(root / "Latte-1"), LATTE_LAYOUT, **RATES),
                              root / "sparse-latte")


def test_readme_recipes_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    build_readme_stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {"__name__": "readme"}
        exec(compile(block, str(README), "exec"), namespace)
        pipe = namespace["pipe"]
        assert type(pipe.transformer.model).__name__.startswith("Sparse")
    assert np.asarray(namespace["frames"][0]).shape == (512, 512, 3) and len(namespace["frames"]) == 16
