"""Tests for ``sparsedit extract-latents``: an image folder encoded offline with a tiny random
``AutoencoderKL``, read back by ``LatentsDataset``/``open_dataset`` and trained on for two steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sparsedit.cli import extract_latents as X
from sparsedit.cli.common import Parser
from sparsedit.encoders.vae import LATENT_SCALE
from sparsedit.errors import SparseditError
from sparsedit.train.data import ImageFolderDataset, LatentsDataset
from sparsedit.train.trainer import open_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_SIZE = 32  # a 4-level (factor 8) VAE maps it to a 4 x 4 latent: DiT-S/2 sees 2 x 2 tokens


def tiny_vae_dir(root: Path, levels: int = 4) -> Path:
    """A random diffusers AutoencoderKL with ``levels`` resolution levels (factor 2**(levels-1))."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE)
    path = root / f"vae{levels}"
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A factor-8 tiny VAE and an image folder: 2 classes, 5 non-square RGB images of various sizes."""
    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    folder = root / "images"
    for c, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for i in range(3 - c):
            size = (40 + 8 * i, 36 + 4 * c)  # (W, H): exercises the center crop
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return {"root": root, "images": folder, "vae": tiny_vae_dir(root)}


def run(argv: list[str]) -> int:
    """Parse ``extract-latents`` arguments with the module's own ``register`` and run it."""
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    X.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["extract-latents", *argv])
    return args.func(args)


def reference_encoding(workspace: dict[str, Path], flip: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, logvar and labels computed here, image by image, with the preprocessing of ImageFolderDataset."""
    from sparsedit.encoders.vae import load_vae

    vae = load_vae(workspace["vae"])
    ds = ImageFolderDataset(workspace["images"], resolution=IMAGE_SIZE, channels=3)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    if flip:
        x, labels = torch.cat([x, x.flip(-1)]), torch.cat([labels, labels])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return dist.mean, dist.logvar, labels


def test_moments_match_the_vae_and_meta_is_complete(workspace: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lat"
    assert run(["--data", str(workspace["images"]), "--vae", str(workspace["vae"]), "--image-size", str(IMAGE_SIZE),
                "--out", str(out), "--batch-size", "2", "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    stored = load_file(str(out / "latents.safetensors"))
    mean, logvar, labels = reference_encoding(workspace)
    assert stored["moments"].shape == (5, 8, 4, 4) and stored["moments"].dtype == torch.float32
    torch.testing.assert_close(stored["moments"][:, :4], mean, rtol=1e-5, atol=1e-6)  # unscaled
    torch.testing.assert_close(stored["moments"][:, 4:], logvar, rtol=1e-5, atol=1e-6)
    assert stored["labels"].tolist() == labels.tolist() == [0, 0, 0, 1, 1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scale_factor"] == LATENT_SCALE == 0.18215
    assert meta["vae"] == str(workspace["vae"].resolve()) and meta["resolution"] == IMAGE_SIZE
    assert meta["kind"] == "moments" and meta["latent_shape"] == [4, 4, 4] and meta["num_samples"] == 5
    assert meta["classes"] == ["cat", "dog"] and meta["flip"] is False
    # read back as training will: a posterior sample, scaled by 0.18215
    ds = LatentsDataset(out, apply_scale_factor=True)
    z, y = ds[3]
    assert y == 1 and z.shape == (4, 4, 4)
    assert (z / LATENT_SCALE - mean[3]).abs().max() < 6 * (0.5 * logvar[3]).exp().max()


def test_flip_appends_mirrored_copies(workspace: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "flip"
    run(["--data", str(workspace["images"]), "--vae", str(workspace["vae"]), "--image-size", str(IMAGE_SIZE),
         "--out", str(out), "--flip", "--batch-size", "4", "--dtype", "float16", "--no-progress", "--device", "cpu"])
    stored = load_file(str(out / "latents.safetensors"))
    mean, logvar, labels = reference_encoding(workspace, flip=True)
    assert stored["moments"].shape == (10, 8, 4, 4) and stored["moments"].dtype == torch.float16
    torch.testing.assert_close(stored["moments"].float(), torch.cat([mean, logvar], 1), rtol=2e-3, atol=2e-3)
    assert stored["labels"].tolist() == labels.tolist() == [0, 0, 0, 1, 1] * 2
    assert json.loads((out / "meta.json").read_text())["flip"] is True


def test_kind_latents_is_a_seeded_posterior_sample(workspace: dict[str, Path], tmp_path: Path) -> None:
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(["--data", str(workspace["images"]), "--vae", str(workspace["vae"]), "--image-size", str(IMAGE_SIZE),
             "--out", str(tmp_path / name), "--kind", "latents", "--seed", str(seed), "--no-progress",
             "--device", "cpu"])
        outs.append(load_file(str(tmp_path / name / "latents.safetensors"))["latents"])
    assert outs[0].shape == (5, 4, 4, 4)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    mean, logvar, _ = reference_encoding(workspace)
    # a sample, not the mean, and a plausible one: within 6 posterior standard deviations
    assert not torch.allclose(outs[0], mean) and ((outs[0] - mean).abs() < 6 * (0.5 * logvar).exp()).all()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["kind"] == "latents" and meta["seed"] == 3


def test_errors(workspace: dict[str, Path], tmp_path: Path) -> None:
    base = ["--data", str(workspace["images"]), "--image-size", str(IMAGE_SIZE), "--no-progress", "--device", "cpu"]
    with pytest.raises(SparseditError, match="is not a VAE directory .*huggingface-cli download"):
        run([*base, "--vae", str(tmp_path / "no_vae"), "--out", str(tmp_path / "o1")])
    assert not (tmp_path / "o1").exists()
    with pytest.raises(SparseditError, match="does not exist"):
        run(["--data", str(tmp_path / "nope"), "--vae", str(workspace["vae"]), "--out", str(tmp_path / "o2"),
             "--no-progress", "--device", "cpu"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):  # a directory that holds something else is never written into
        with pytest.raises(SparseditError, match="is not empty and holds no latents directory; choose a new path"):
            run([*base, "--vae", str(workspace["vae"]), "--out", str(tmp_path / "busy"), *extra])
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    run([*base, "--vae", str(workspace["vae"]), "--out", str(tmp_path / "lat")])
    with pytest.raises(SparseditError, match="already holds a latents directory; pass --overwrite"):
        run([*base, "--vae", str(workspace["vae"]), "--out", str(tmp_path / "lat")])
    (tmp_path / "lat" / "notes.txt").write_text("the user's")  # replacing the directory would delete it
    with pytest.raises(SparseditError, match="holds files sparsedit did not write there \\(notes.txt\\)"):
        run([*base, "--vae", str(workspace["vae"]), "--out", str(tmp_path / "lat"), "--overwrite"])
    (tmp_path / "lat" / "notes.txt").unlink()
    before = (tmp_path / "lat" / "meta.json").stat().st_mtime_ns
    run([*base, "--vae", str(workspace["vae"]), "--out", str(tmp_path / "lat"), "--overwrite", "--flip"])
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["latents.safetensors", "meta.json"]
    assert (tmp_path / "lat" / "meta.json").stat().st_mtime_ns != before
    with pytest.raises(SystemExit):
        run([*base, "--vae", str(workspace["vae"]), "--out", str(tmp_path / "o3"), "--kind", "pixels"])
    with pytest.raises(SparseditError, match="unknown device"):
        run([*base[:-1], "gpu0", "--vae", str(workspace["vae"]), "--out", str(tmp_path / "o4")])


def test_train_two_steps_on_extracted_latents(workspace: dict[str, Path], tmp_path: Path) -> None:
    from sparsedit import load_model
    from sparsedit.cli import main

    out = tmp_path / "lat"
    run(["--data", str(workspace["images"]), "--vae", str(workspace["vae"]), "--image-size", str(IMAGE_SIZE),
         "--out", str(out), "--flip", "--no-progress", "--device", "cpu"])
    ds, info = open_dataset(str(out))
    assert len(ds) == 10
    assert info["kind"] == "latents" and info["data_space"] == "latent" and info["latent_size"] == [4, 4]
    assert info["resolution"] == IMAGE_SIZE and info["channels"] == 4 and info["num_classes"] == 2
    run_dir = tmp_path / "run"
    code = main(["train", "--data", str(out), "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2",
                 "--num-heads", "2", "--batch-size", "4", "--steps", "2", "--log-every", "1",
                 "--run-dir", str(run_dir), "--no-progress", "--device", "cpu"])
    assert code == 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(np.isfinite(r["loss"]) for r in lines)
    model = load_model(run_dir / "model")
    assert model.config.data_space == "latent" and model.config.latent_hw == (4, 4)
    assert model.config.in_channels == 4 and model.config.num_classes == 2


def test_train_on_latents_of_a_factor_2_vae(workspace: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from sparsedit.cli.train import build_model
    from sparsedit.train.trainer import check_model_fits_data

    vae2 = tiny_vae_dir(tmp_path, levels=2)  # 16 px -> 8 x 8 latents
    out = tmp_path / "lat2"
    run(["--data", str(workspace["images"]), "--vae", str(vae2), "--image-size", "16", "--out", str(out),
         "--no-progress", "--device", "cpu"])
    assert "(factor 2); `sparsedit train --model PRESET` assumes factor 8" in capsys.readouterr().err
    _, info = open_dataset(str(out))
    assert info["latent_size"] == [8, 8] and info["resolution"] == 16
    args = argparse.Namespace(init_from=None, model="DiT-S/2", layout=None, hidden_size=32, depth=2, num_heads=2,
                              no_learn_sigma=False, image_size=None, init_gain=None)
    check_model_fits_data(build_model(args, info).config, info)  # raises: input size (2, 2) vs (8, 8)
