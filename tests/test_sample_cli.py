"""`sparsedit sample`: a PNG grid, bit-reproducible with one seed; latent models decode with a local VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import sparsedit
from sparsedit.cli import main
from sparsedit.core.images import make_grid
from sparsedit.diffusion.sampling import generate, to_images
from sparsedit.families.dit.model import DiT, DiTConfig


def tiny(tmp_path, data_space: str, channels: int, name: str):
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=channels, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, data_space=data_space))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sparsedit.save_pretrained(model, tmp_path / name)


@pytest.fixture()
def pixel_ckpt(tmp_path):
    return tiny(tmp_path, "pixel", 3, "pixel")


def sample_args(ckpt, out, seed=0, *extra):
    return ["sample", "--ckpt", str(ckpt), "--class-labels", "1", "2", "3", "--steps", "4", "--seed", str(seed),
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def test_same_seed_same_bytes_other_seed_other_image(tmp_path, pixel_ckpt):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(sample_args(pixel_ckpt, a)) == 0
    assert main(sample_args(pixel_ckpt, b)) == 0
    assert main(sample_args(pixel_ckpt, c, 1)) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    img = np.asarray(Image.open(a))
    assert img.shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # 3 images of 8 px in a 2x2 grid with 2 px padding


def test_png_holds_the_generated_samples(tmp_path, pixel_ckpt):
    out = tmp_path / "g.png"
    assert main(sample_args(pixel_ckpt, out, 0, "--sampler", "ddim", "--cfg-scale", "1.5", "--nrow", "3")) == 0
    model = sparsedit.load_model(pixel_ckpt)
    x = generate(model, [1, 2, 3], sampler="ddim", steps=4, cfg_scale=1.5, seed=0, progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), make_grid(to_images(model, x), nrow=3))


def test_latent_model_needs_a_vae_and_says_where_to_get_it(tmp_path, capsys):
    ckpt = tiny(tmp_path, "latent", 4, "latent")
    assert main(sample_args(ckpt, tmp_path / "x.png")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--vae" in err and "stabilityai/sd-vae-ft-ema" in err
    assert not (tmp_path / "x.png").exists()
    assert main(sample_args(ckpt, tmp_path / "x.png", 0, "--vae", str(tmp_path / "nope"))) == 2
    assert "not a VAE directory" in capsys.readouterr().err


def test_latent_model_decodes_with_a_local_vae(tmp_path):
    ckpt = tiny(tmp_path, "latent", 4, "latent")
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "v.png"
    assert main(sample_args(ckpt, out, 0, "--vae", str(tmp_path / "vae"))) == 0
    assert np.asarray(Image.open(out)).shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # latent 8 px -> 16 px images


def test_a_vae_with_other_latent_channels_is_refused_before_sampling(tmp_path, capsys):
    ckpt = tiny(tmp_path, "latent", 4, "latent")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                  latent_channels=8, norm_num_groups=4, layers_per_block=1).save_pretrained(tmp_path / "vae8")
    out = tmp_path / "v.png"
    assert main(sample_args(ckpt, out, 0, "--vae", str(tmp_path / "vae8"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "8-channel latents, the model takes 4" in err and not out.exists()


def test_bad_labels_and_bad_device_are_one_line_errors(tmp_path, pixel_ckpt, capsys):
    args = ["sample", "--ckpt", str(pixel_ckpt), "--class-labels", "12", "--steps", "2", "--out", str(tmp_path / "o.png")]
    assert main(args) == 2
    assert "outside [0, 10)" in capsys.readouterr().err
    assert main([*args[:4], "1", *args[5:], "--device", "tpu9"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_low_precision_model_samples_with_float32_state(pixel_ckpt):
    model = sparsedit.load_model(pixel_ckpt)
    ref = generate(model, [1, 2], sampler="ddim", steps=2, seed=0, progress=False)
    half = generate(model.to(torch.bfloat16), [1, 2], sampler="ddim", steps=2, seed=0, progress=False)
    assert half.dtype == torch.float32 and half.shape == ref.shape
    rel = (half - ref).norm() / ref.norm()
    assert rel < 0.1, rel  # bf16 rounding only, not a different trajectory


def test_out_is_never_clobbered_or_mislabelled(tmp_path, pixel_ckpt, capsys):
    """An existing --out is kept unless --overwrite; a directory, a foreign suffix or a GIF of images is refused."""
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own picture")
    assert main(sample_args(pixel_ckpt, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"the user's own picture"
    for bad, words in ((tmp_path, "is a directory"), (tmp_path / "x.jpg", ".png"), (tmp_path / "x.gif", "video")):
        assert main(sample_args(pixel_ckpt, bad)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "x.jpg").exists() and not (tmp_path / "x.gif").exists()
    assert main(sample_args(pixel_ckpt, out, 0, "--overwrite")) == 0
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_default_labels_come_from_the_model_and_a_pixel_model_takes_no_vae(tmp_path, pixel_ckpt, capsys):
    """A 10-class model samples its own classes by default (not ImageNet ids); --vae on a pixel model is refused
    before sampling, and so is a label outside the model's classes."""
    out = tmp_path / "default.png"
    args = ["sample", "--ckpt", str(pixel_ckpt), "--steps", "2", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert main([*args[:-4], str(tmp_path / "v.png"), "--vae", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pixel space" in err and "drop --vae" in err
    assert main([*args[:-4], str(tmp_path / "l.png"), "--class-labels", "1", "207", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside [0, 10)" in err
    assert not (tmp_path / "v.png").exists() and not (tmp_path / "l.png").exists()


def test_weights_that_are_not_finite_give_no_image(tmp_path, capsys):
    """A diverged fine-tune (NaN weights) must not turn into a black PNG and exit 0."""
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=4, data_space="pixel"))
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(float("nan"))
    ckpt = sparsedit.save_pretrained(model, tmp_path / "nan")
    out = tmp_path / "x.png"
    assert main(sample_args(ckpt, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not finite" in err and not out.exists()
