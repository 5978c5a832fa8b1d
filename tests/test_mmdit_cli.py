"""SD3 and FLUX.1 from the command line, on tiny pipeline folders saved offline (tests/tiny_pipelines.py):
`encode-prompts` gives the pipeline's own embeddings, `sample` gives the pipeline's own images, data-free
distillation samples the teacher from prompt embeddings, and the prompt-embeddings file refuses what does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sparsedit  # noqa: E402
from helpers import one_line  # noqa: E402
from sparsedit.cli import main  # noqa: E402
from sparsedit.core.prompts import prompt_list, read_prompt_embeds, select_prompts, write_prompt_embeds  # noqa: E402
from sparsedit.diffusion.flow import start_noise  # noqa: E402
from sparsedit.diffusion.sampling import to_images  # noqa: E402
from sparsedit.errors import SparseditError  # noqa: E402
from sparsedit.families import family_of  # noqa: E402
from tiny_pipelines import save_flux_pipeline, save_sd3_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a happy dog", "a red cat on the cactus"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {"flux": save_flux_pipeline(root / "flux"), "sd3": save_sd3_pipeline(root / "sd3")}


def load_pipeline(path: Path):  # noqa: ANN201
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)


def png(path: Path) -> np.ndarray:
    """The one image of a sample grid (the grid pads by 2 pixels)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    return grid[2:-2, 2:-2]


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_encode_prompts_writes_the_pipelines_own_embeddings(pipes: dict[str, Path], tmp_path: Path, name: str) -> None:
    out = tmp_path / "p.safetensors"
    assert main(["encode-prompts", "--pipeline", str(pipes[name]), "--prompt", *PROMPTS, "--out", str(out),
                 "--device", "cpu"]) == 0
    pipe = load_pipeline(pipes[name])
    model = sparsedit.load_model(pipes[name])
    text = read_prompt_embeds(out, model.config.caption_channels, model.config.pooled_channels)
    if name == "flux":
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=model.config.max_sequence_length)
        assert set(text) == {"embeds", "pooled"}  # FLUX.1 has no classifier-free guidance: no negatives
        assert text["embeds"].shape[1] == 512
    else:
        embeds, null, pooled, null_pooled = pipe.encode_prompt(PROMPTS, None, None, negative_prompt="")
        close(text["null_embeds"], null)
        close(text["null_pooled"], null_pooled)
        assert text["embeds"].shape[1] == 77 + 256
    close(text["embeds"], embeds)  # the same function; the CLI may run on more threads (other summation order)
    close(text["pooled"], pooled)
    assert prompt_list(out) == PROMPTS
    # the file is refused, not overwritten, unless asked
    assert main(["encode-prompts", "--pipeline", str(pipes[name]), "--prompt", "x", "--out", str(out)]) == 2
    assert prompt_list(out) == PROMPTS


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_sample_gives_the_pipelines_own_image(pipes: dict[str, Path], tmp_path: Path, name: str) -> None:
    """`sparsedit sample --ckpt PIPELINE --prompt ...` = the diffusers pipeline on the same noise, decoded by the same
    VAE with its scaling and shift factors (to one 8-bit level)."""
    out = tmp_path / "s.png"
    steps = "3"
    assert main(["sample", "--ckpt", str(pipes[name]), "--prompt", PROMPTS[0], "--steps", steps, "--seed", "5",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    ours = png(out)
    pipe = load_pipeline(pipes[name])
    model = sparsedit.load_model(pipes[name])
    noise = start_noise((1, model.config.in_channels, *model.config.latent_hw), 5, "cpu")
    if name == "flux":
        h, w = noise.shape[-2:]
        latents = pipe._pack_latents(noise, 1, noise.shape[1], h, w)
        ref = pipe(PROMPTS[0], num_inference_steps=int(steps), latents=latents, output_type="np").images[0]
    else:
        ref = pipe(PROMPTS[0], num_inference_steps=int(steps), latents=noise, output_type="np").images[0]
    ref8 = np.round(ref * 255).astype(np.int16)
    assert ours.shape == ref8.shape
    assert np.abs(ours.astype(np.int16) - ref8).max() <= 1
    assert ours.std() > 1  # a real picture, not a flat one that any decoder would match


def test_decoding_applies_the_vaes_scaling_and_shift(pipes: dict[str, Path]) -> None:
    from sparsedit.encoders.vae import load_vae

    model = sparsedit.load_model(pipes["flux"])
    vae = load_vae(pipes["flux"] / "vae", latent_channels=4)
    family = family_of(model)
    assert family.latent_scaling(vae) == (pytest.approx(0.36), pytest.approx(0.11))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z / 0.36 + 0.11).sample.clamp(-1, 1)
    assert torch.allclose(to_images(model, z, vae, family.latent_scaling(vae)), want, atol=1e-6)
    # DiT-style models keep the SD VAE's 0.18215 whatever the VAE's config says
    dit = sparsedit.families.dit.DiT(sparsedit.families.dit.DiTConfig(input_size=8, in_channels=4, hidden_size=32,
                                                                      depth=1, num_heads=2, num_classes=2))
    assert family_of(dit).latent_scaling(vae) == (0.18215, 0.0)


def test_sparse_flux_samples_with_the_pipelines_encoders_and_vae(pipes: dict[str, Path], tmp_path: Path) -> None:
    sparse = tmp_path / "flux-sparse"
    assert main(["sparsify", str(pipes["flux"]), "--layout", "0,1,1,1,1,0,1", "--out", str(sparse)]) == 0
    out = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(sparse), "--pipeline", str(pipes["flux"]), "--prompt", *PROMPTS,
                 "--steps", "2", "--guidance", "4.5", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    model = sparsedit.load_model(sparse)
    text = read_prompt_embeds_from(pipes["flux"], model, tmp_path)
    text["guidance"] = 4.5
    latents = family_of(model).generate(model, text=text, steps=2, seed=0)
    from sparsedit.encoders.vae import load_vae

    vae = load_vae(pipes["flux"] / "vae", latent_channels=4)
    want = to_images(model, latents, vae, family_of(model).latent_scaling(vae))
    grid = np.asarray(Image.open(out).convert("RGB"))
    first = grid[2:2 + want.shape[-2], 2:2 + want.shape[-1]].astype(np.int16)
    want8 = ((want[0].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.int16)
    assert np.abs(first - want8).max() <= 1


def read_prompt_embeds_from(pipe_dir: Path, model: torch.nn.Module, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "prompts.safetensors"
    if not out.exists():
        assert main(["encode-prompts", "--pipeline", str(pipe_dir), "--prompt", *PROMPTS, "--out", str(out)]) == 0
    return read_prompt_embeds(out, model.config.caption_channels, model.config.pooled_channels)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_data_free_distillation_samples_the_teacher_from_the_prompts(pipes: dict[str, Path], tmp_path: Path,
                                                                     name: str, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    layout = "0,1,1,1,1,0,1" if name == "flux" else "0,1,1,0,1,0,1"
    prompts = tmp_path / "prompts.safetensors"
    assert main(["encode-prompts", "--pipeline", str(pipes[name]), "--prompt", *PROMPTS, "--out", str(prompts)]) == 0
    run = tmp_path / "run"
    argv = ["train", "--init-from", str(pipes[name]), "--layout", layout, "--recipe", "data-free", "--data-free", "3",
            "--prompt-embeds", str(prompts), "--lora-rank", "2", "--batch-size", "2", "--log-every", "1",
            "--image-size", "256" if name == "flux" else "128",
            "--run-dir", str(run), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--steps", "2"]) == 0
    cache = run / "teacher_samples" / "teacher_samples.safetensors"
    stored = load_file(cache)
    teacher = sparsedit.load_model(pipes[name], image_size=256 if name == "flux" else 128)
    family = family_of(teacher)
    how = family.teacher_sampling()
    how.pop("batch_size")
    assert how["sampler"] == "euler" and how["cfg_scale"] == (7.0 if name == "sd3" else 1.0)
    assert stored["labels"].tolist() == [0, 1, 0]  # prompt i % 2
    text = read_prompt_embeds(prompts, teacher.config.caption_channels, teacher.config.pooled_channels)
    want = family.generate(teacher, text=select_prompts(text, [0, 1, 0]), **how, seed=0)  # chunk 0: seed 0 * 100003
    assert torch.allclose(stored["samples"], want, atol=1e-5)
    # resuming reads the cache back; other prompts are refused rather than mixed in
    before = cache.stat().st_mtime_ns
    assert main([*argv, "--steps", "3"]) == 0
    assert cache.stat().st_mtime_ns == before
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    other = dict(text)
    other["embeds"] = other["embeds"] + 1
    write_prompt_embeds(prompts, other, PROMPTS)
    capsys.readouterr()
    assert main([*argv, "--steps", "4"]) == 2
    assert "holds teacher samples made with other settings" in capsys.readouterr().err


def test_the_prompt_file_refuses_what_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    e, p = torch.randn(2, 5, 8), torch.randn(2, 6)
    write_prompt_embeds(path, {"embeds": e})
    one_line(pytest.raises(SparseditError, read_prompt_embeds, path, 8, 6), "pooled_embeds", "encode-prompts")
    write_prompt_embeds(path, {"embeds": e, "pooled": p})
    one_line(pytest.raises(SparseditError, read_prompt_embeds, path, 8, None), "pooled_embeds", "no pooled")
    one_line(pytest.raises(SparseditError, read_prompt_embeds, path, 8, 7), "pooled_embeds", "(N, 7)", "N = 2")
    one_line(pytest.raises(SparseditError, read_prompt_embeds, path, 9, 6), "prompt_embeds", "(N, L, 9)")
    write_prompt_embeds(path, {"embeds": e, "pooled": p, "null_embeds": torch.randn(3, 5, 8),
                               "null_pooled": torch.randn(3, 6)})
    one_line(pytest.raises(SparseditError, read_prompt_embeds, path, 8, 6), "3 rows for 2 prompts")
    write_prompt_embeds(path, {"embeds": e, "pooled": p, "null_embeds": torch.randn(1, 5, 8)})
    one_line(pytest.raises(SparseditError, read_prompt_embeds, path, 8, 6), "negative_pooled_embeds")
    write_prompt_embeds(path, {"embeds": e, "pooled": p, "null_embeds": torch.randn(1, 5, 8),
                               "null_pooled": torch.randn(1, 6)})
    text = read_prompt_embeds(path, 8, 6)
    assert text["null_embeds"].shape == (2, 5, 8) and torch.equal(text["null_pooled"][0], text["null_pooled"][1])
    with pytest.raises(SparseditError, match="does not exist"):
        read_prompt_embeds(tmp_path / "missing.safetensors", 8, 6)
