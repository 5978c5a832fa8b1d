"""Prompts through a local T5 (sparsedit.encoders.text) and ``sparsedit sample --prompt --t5`` for PixArt and text Latte.

The reference for the embeddings is diffusers' own ``PixArtAlphaPipeline.encode_prompt`` on the same tiny
T5 (a 1-layer encoder and an in-memory tokenizer, saved to disk as a user's local copy would be).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
import sparsedit
from sparsedit.cli import sample as sample_cmd
from sparsedit.cli.common import Parser
from sparsedit.core.images import save_grid
from sparsedit.diffusion.sampling import to_images
from sparsedit.encoders.text import T5Encoder, encode_prompts
from sparsedit.encoders.vae import load_vae
from sparsedit.errors import SparseditError
from sparsedit.families.latte.sparse import sparsify_latte
from sparsedit.families.latte.video import generate_latte, save_video_gif
from sparsedit.families.pixart.sampling import generate_pixart

pytest.importorskip("transformers")
from diffusers import DDIMScheduler, PixArtAlphaPipeline  # noqa: E402

from test_interop import tiny_vae  # noqa: E402
from test_interop_families import CAPTION, LATTE_LAYOUT, RATES, latte_transformer, pixart_transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["A small cactus with a happy face", "  dog on the beach  "]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A diffusers PixArt pipeline directory (text_encoder/ + tokenizer/), a bare T5 directory, a Latte-T2V."""
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    encoder, tokenizer = helpers.tiny_text_encoder(CAPTION)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(), transformer=pixart_transformer(),
                               scheduler=DDIMScheduler())
    pipe.save_pretrained(root / "pipeline")
    encoder.save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    latte_transformer().save_pretrained(root / "latte-dense")
    latte = sparsify_latte(sparsedit.load_model(root / "latte-dense"), LATTE_LAYOUT, **RATES)
    sparsedit.save_pretrained(latte, root / "sparse-latte")
    wide, _ = helpers.tiny_text_encoder(CAPTION * 2)
    wide.save_pretrained(root / "t5-wide")
    tokenizer.save_pretrained(root / "t5-wide")
    return {"pipeline": root / "pipeline", "t5": root / "t5", "t5-wide": root / "t5-wide",
            "pixart": root / "pipeline" / "transformer", "sparse-latte": root / "sparse-latte"}


def reference_embeddings(pipeline_dir: Path, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """diffusers' own encoding: (embeds, mask, negative embeds, negative mask) of the empty negative prompt."""
    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir)
    with torch.no_grad():
        return pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="", device="cpu",
                                  clean_caption=False, max_sequence_length=120)


@pytest.mark.parametrize("layout", ["pipeline", "t5"])
def test_encoding_matches_pixart_alpha_pipeline(local: dict[str, Path], layout: str) -> None:
    embeds, mask, neg, neg_mask = reference_embeddings(local["pipeline"], PROMPTS)
    t5 = T5Encoder(local[layout])
    ours, ours_mask = t5(PROMPTS)
    assert ours.shape == (2, 120, CAPTION) and t5.channels == CAPTION
    torch.testing.assert_close(ours, embeds.float(), rtol=0, atol=0)
    torch.testing.assert_close(ours_mask, mask.float(), rtol=0, atol=0)
    assert ours_mask.sum(1).tolist() == [8, 5]  # 7 / 4 words (unknown ones too) + </s>; the rest is padding
    ours_neg, ours_neg_mask = t5([""])
    torch.testing.assert_close(ours_neg, neg[:1].float(), rtol=0, atol=0)
    torch.testing.assert_close(ours_neg_mask, neg_mask[:1].float(), rtol=0, atol=0)
    short, short_mask = encode_prompts(PROMPTS, local[layout], max_length=4)  # truncation keeps the first tokens
    assert short.shape == (2, 4, CAPTION) and short_mask.all()


def test_missing_or_wrong_t5_directories_are_one_line_errors(local: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SparseditError, match="does not exist; pass a local copy of huggingface.co/PixArt-alpha"):
        T5Encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparseditError, match="neither text_encoder/ \\+ tokenizer/ nor a T5 config.json"):
        T5Encoder(tmp_path / "empty")
    with pytest.raises(SparseditError, match="non-empty list of prompts"):
        T5Encoder(local["t5"])("a single string")


def sample(argv: list[str]) -> int:
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    sample_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", *argv])
    return args.func(args)


def test_cli_pixart_prompts_equal_sampling_from_the_pipelines_embeddings(local: dict[str, Path], tmp_path: Path) -> None:
    """--prompt/--t5 on a diffusers PixArt (no stored null caption): the PNG equals sampling from diffusers' own
    encoding of the prompts, with the empty prompt as the unconditional caption (as PixArtAlphaPipeline does)."""
    out = tmp_path / "prompts.png"
    assert sample(["--ckpt", str(local["pixart"]), "--prompt", *PROMPTS, "--t5", str(local["pipeline"]),
                   "--vae", str(local["pipeline"] / "vae"), "--sampler", "ddim", "--steps", "2", "--cfg-scale", "3",
                   "--seed", "5", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    model = sparsedit.load_model(local["pixart"])
    embeds, mask, neg, neg_mask = reference_embeddings(local["pipeline"], PROMPTS)
    latents = generate_pixart(model, embeds, mask, neg[:1], null_mask=neg_mask[:1], sampler="ddim", steps=2,
                              cfg_scale=3.0, seed=5)
    reference = save_grid(to_images(model, latents, load_vae(local["pipeline"] / "vae")), tmp_path / "reference.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(reference)))


def test_cli_text_latte_writes_a_gif(local: dict[str, Path], tmp_path: Path) -> None:
    """A text Latte from --prompt/--t5 as a GIF: the same frames as generating from the encoded prompts directly."""
    out = tmp_path / "videos.gif"
    vae = local["pipeline"] / "vae"
    assert sample(["--ckpt", str(local["sparse-latte"]), "--prompt", *PROMPTS, "--t5", str(local["t5"]),
                   "--vae", str(vae), "--sampler", "ddim", "--steps", "2", "--cfg-scale", "2", "--out", str(out),
                   "--device", "cpu", "--no-progress", "--fps", "4"]) == 0
    model = sparsedit.load_model(local["sparse-latte"])
    t5 = T5Encoder(local["t5"])
    embeds, mask = t5(PROMPTS)
    neg, _ = t5([""], embeds.shape[1])  # Latte-T2V stores no null caption: the empty prompt, as LattePipeline
    videos = generate_latte(model, embeds, text_mask=mask, null_embeds=neg, sampler="ddim", steps=2, cfg_scale=2.0)
    b, c, f, h, w = videos.shape
    frames = to_images(model, videos.transpose(1, 2).reshape(b * f, c, h, w), load_vae(vae))
    reference = save_video_gif(frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2), tmp_path / "ref.gif", fps=4)
    gif, ref = Image.open(out), Image.open(reference)
    assert gif.n_frames == ref.n_frames == model.config.num_frames and gif.info["duration"] == 250
    assert gif.size == (2 * (w + 2) + 2, h + 4)  # two videos side by side, 2 px padding
    for i in range(gif.n_frames):
        gif.seek(i)
        ref.seek(i)
        assert np.array_equal(np.asarray(gif.convert("RGB")), np.asarray(ref.convert("RGB")))


def test_cli_text_errors(local: dict[str, Path], tmp_path: Path) -> None:
    base = ["--ckpt", str(local["pixart"]), "--vae", str(local["pipeline"] / "vae"), "--steps", "1", "--out",
            str(tmp_path / "x.png"), "--device", "cpu"]
    with pytest.raises(SparseditError, match="--prompt needs a local T5 encoder: add --t5 DIR"):
        sample([*base, "--prompt", "a dog"])
    with pytest.raises(SparseditError, match="gives 32-wide embeddings but the model takes 16"):
        sample([*base, "--prompt", "a dog", "--t5", str(local["t5-wide"])])
    with pytest.raises(SparseditError, match="not both"):
        sample([*base, "--prompt", "a dog", "--t5", str(local["t5"]), "--prompt-embeds", "x.safetensors"])
    with pytest.raises(SparseditError, match="pass --prompt TEXT ... with --t5 DIR, or --prompt-embeds"):
        sample(base)
    assert not (tmp_path / "x.png").exists()


def test_cli_refuses_prompts_for_a_class_model(tmp_path: Path) -> None:
    from sparsedit.families.dit.model import DiT, DiTConfig

    ckpt = sparsedit.save_pretrained(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                                                   num_heads=2, num_classes=3, data_space="pixel")), tmp_path / "dit")
    with pytest.raises(SparseditError, match="is class-conditional: drop --prompt and pass --class-labels"):
        sample(["--ckpt", str(ckpt), "--prompt", "a dog", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert not (tmp_path / "x.png").exists()


def test_cli_text_latte_writes_an_mp4(local: dict[str, Path], tmp_path: Path) -> None:
    """--out *.mp4: the same videos side by side, as H.264 at the model's frame rate (Latte: 8 fps)."""
    av = pytest.importorskip("av")
    gif, mp4 = tmp_path / "v.gif", tmp_path / "v.mp4"
    common = ["--ckpt", str(local["sparse-latte"]), "--prompt", *PROMPTS, "--t5", str(local["t5"]), "--vae",
              str(local["pipeline"] / "vae"), "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--no-progress"]
    assert sample([*common, "--out", str(gif)]) == 0 and sample([*common, "--out", str(mp4)]) == 0
    with av.open(str(mp4)) as container:
        rate = float(container.streams.video[0].average_rate)
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    ref = Image.open(gif)
    assert rate == 8 and len(frames) == ref.n_frames
    h, w = np.asarray(ref.convert("RGB")).shape[:2]
    for i, frame in enumerate(frames):
        ref.seek(i)
        want = np.asarray(ref.convert("RGB")).astype(int)
        assert frame.shape == (h + h % 2, w + w % 2, 3)
        assert np.abs(frame[:h, :w] - want).mean() < 24  # lossy, on random-weight noise videos


def test_encode_prompts_with_a_t5(local: dict[str, Path], tmp_path: Path) -> None:
    """`sparsedit encode-prompts --t5`: the T5's embeddings and masks, and the empty prompt's as the one negative row."""
    from sparsedit.cli import main
    from sparsedit.core.prompts import prompt_list, read_prompt_embeds

    out = tmp_path / "p.safetensors"
    assert main(["encode-prompts", "--t5", str(local["t5"]), "--prompt", *PROMPTS, "--out", str(out),
                 "--device", "cpu"]) == 0
    t5 = T5Encoder(local["t5"])
    embeds, mask = t5(PROMPTS)
    null, null_mask = t5([""], embeds.shape[1])
    text = read_prompt_embeds(out, embeds.shape[-1], None)
    assert torch.allclose(text["embeds"], embeds, atol=1e-5) and torch.equal(text["mask"], mask)
    assert torch.allclose(text["null_embeds"][1], null[0], atol=1e-5) and torch.equal(text["null_mask"][0], null_mask[0])
    assert prompt_list(out) == PROMPTS
