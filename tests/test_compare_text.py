"""``sparsedit compare --prompt-embeds``: caption models (SD3, FLUX.1, PixArt) compared on the same prompts and noise,
next to the floor A vs A with other noise; the numbers against direct ``family.generate`` calls, the files, the CLI and
the refusals."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import helpers
import sparsedit
from helpers import one_line
from sparsedit.cli import main
from sparsedit.core.prompts import select_prompts, write_prompt_embeds
from sparsedit.diffusion.sampling import to_images
from sparsedit.errors import SparseditError
from sparsedit.eval.compare import compare_models
from sparsedit.eval.compare_report import remove_own_outputs
from sparsedit.eval.compare_text import (
    FLOOR_OFFSET,
    TextCompareSettings,
    compare_text_models,
    guidance_points,
    noise_seed,
    prompt_noise,
    resolve_settings,
)
from sparsedit.eval.compare_text_report import (
    json_safe,
    point_name,
    spread_inf,
    text_paired_image,
    text_paired_image_size,
    text_results_table,
)
from sparsedit.eval.flops import measure_macs
from sparsedit.families import family_of
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.families.flux import Flux, FluxConfig, sparsify_flux
from sparsedit.families.pixart.model import PixArt, PixArtConfig
from sparsedit.families.sd3 import SD3, SD3Config, sparsify_sd3

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, POOLED, TOKENS = 24, 12, 5
PROMPTS = ["a red cat", "a dog on the moon", "happy cactus"]
STEPS = 3


def tiny_sd3(input_size: int = 16) -> SD3:
    """16 x 16 latents with 4 channels (the tiny VAE's), 8 blocks: every SparseDiT block kind once sparsified."""
    cfg = SD3Config(input_size=input_size, hidden_size=32, depth=8, num_heads=2, in_channels=4,
                    caption_channels=CAPTION, pooled_channels=POOLED, pos_embed_max_size=10)
    model = helpers.randomize(SD3(cfg), 0.15).eval()
    with torch.no_grad():
        model.pos_table.normal_()
    return model


def tiny_flux(guidance: bool = True) -> Flux:
    cfg = FluxConfig(input_size=16, in_channels=4, hidden_size=32, depth_double=3, depth_single=4, num_heads=2,
                     axes_dims_rope=(4, 6, 6), caption_channels=CAPTION, pooled_channels=POOLED,
                     guidance_embeds=guidance, max_sequence_length=TOKENS)
    return helpers.randomize(Flux(cfg), 0.2).eval()


def prompt_text(n: int = 3, pooled: bool = True, seed: int = 0, negative: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = {"embeds": torch.randn(n, TOKENS, CAPTION, generator=g)}
    if pooled:
        text["pooled"] = torch.randn(n, POOLED, generator=g)
    if negative:
        text["null_embeds"] = torch.randn(1, TOKENS, CAPTION, generator=g)
        text["null_pooled"] = torch.randn(1, POOLED, generator=g)
    return text


@pytest.fixture(scope="module")
def sd3() -> SD3:
    torch.manual_seed(0)
    return tiny_sd3()


@pytest.fixture(scope="module")
def sparse_sd3(sd3: SD3) -> nn.Module:
    return sparsify_sd3(sd3, "1,1,2,1,2,1,1").eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_pipelines import vae

    root = tmp_path_factory.mktemp("compare_text")
    torch.manual_seed(0)
    vae().save_pretrained(root / "vae")
    return {"vae": root / "vae",
            "prompts": write_prompt_embeds(root / "prompts.safetensors", prompt_text(negative=True), PROMPTS),
            "no_pooled": write_prompt_embeds(root / "no_pooled.safetensors", prompt_text(pooled=False))}


def run(a: nn.Module, b: nn.Module, prompts: object, **kw: object) -> dict:
    settings = kw.pop("settings", TextCompareSettings(cfg_scales=(1.0, 3.0), seeds=(0, 1), steps=STEPS, batch_size=2))
    return compare_text_models(a, b, prompts, settings, progress=kw.pop("progress", False), **kw)  # type: ignore[arg-type]


def strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# --------------------------------------------------------------------------------------------------
# The numbers


def test_identical_models_infinite_psnr_zero_rmse_and_a_finite_floor(sd3: SD3, files: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    report = run(sd3, copy.deepcopy(sd3), files["prompts"], vae=files["vae"], out=tmp_path / "o")
    assert report["space"] == "pixels" and len(report["results"]) == 2
    for r in report["results"]:
        for row in r["per_seed"]:
            assert row["psnr_db"] == math.inf and row["pixel_rmse"] == 0 and row["latent_rel_rmse"] == 0
            assert row["rmse_ratio"] == 0 and row["per_prompt"]["rmse"] == [0.0] * 3
            assert 0 < row["floor_pixel_rmse"] and math.isfinite(row["floor_psnr_db"]) and row["floor_latent_rel_rmse"] > 0
            assert row["floor_seed"] == row["seed"] + FLOOR_OFFSET
        assert r["psnr_db"]["mean"] == math.inf and r["floor_psnr_db"]["std"] is not None
        assert r["verdict"] == "B reproduces A's samples exactly"
    saved = strict_json(tmp_path / "o" / "compare.json")  # strict JSON: the infinite PSNR is the string "inf"
    assert saved["results"][0]["psnr_db"]["mean"] == "inf" and saved["results"][0]["per_seed"][1]["psnr_db"] == "inf"
    assert saved["results"][0]["floor_psnr_db"]["mean"] == pytest.approx(report["results"][0]["floor_psnr_db"]["mean"])
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "∞ (identical)" in md and "not image quality" in md


def direct(model: nn.Module, text: dict, i: int, seed: int, cfg: float, guidance: float | None = None) -> torch.Tensor:
    """Prompt i under ``seed`` by one plain family.generate call with the noise rule's tensor."""
    one = select_prompts(text, [i])
    if guidance is not None:
        one["guidance"] = guidance
    return family_of(model).generate(model, text=one, steps=STEPS, cfg_scale=cfg, noise=prompt_noise(model.config, seed, i))


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).pow(2).mean().sqrt())


def test_sparse_model_numbers_come_from_the_same_noise_as_direct_generate(sd3: SD3, sparse_sd3: nn.Module,
                                                                           files: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL

    report = run(sd3, sparse_sd3, files["prompts"], vae=files["vae"])
    vae = AutoencoderKL.from_pretrained(str(files["vae"])).eval()
    scaling = family_of(sd3).latent_scaling(vae)
    text = prompt_text(negative=True)
    text = {k: v.expand(3, *v.shape[1:]) for k, v in text.items()}
    for r in report["results"]:
        for row in r["per_seed"]:
            s = row["seed"]
            a = torch.cat([direct(sd3, text, i, s, r["cfg_scale"]) for i in range(3)])
            b = torch.cat([direct(sparse_sd3, text, i, s, r["cfg_scale"]) for i in range(3)])
            f = torch.cat([direct(sd3, text, i, s + FLOOR_OFFSET, r["cfg_scale"]) for i in range(3)])
            norm = float(a.double().pow(2).mean().sqrt())
            assert row["latent_rel_rmse"] == pytest.approx(rmse(b, a) / norm, rel=1e-4)
            assert row["floor_latent_rel_rmse"] == pytest.approx(rmse(f, a) / norm, rel=1e-4)
            ia, ib, i_f = (to_images(sd3, x, vae, scaling) for x in (a, b, f))
            assert row["pixel_rmse"] == pytest.approx(rmse(ib, ia), rel=1e-4, abs=1e-6)
            assert row["psnr_db"] == pytest.approx(20 * math.log10(2 / rmse(ib, ia)), abs=1e-3)
            assert row["floor_pixel_rmse"] == pytest.approx(rmse(i_f, ia), rel=1e-4, abs=1e-6)
            assert row["rmse_ratio"] == pytest.approx(rmse(ib, ia) / rmse(i_f, ia), rel=1e-4)
            assert row["per_prompt"]["rmse"][2] == pytest.approx(rmse(ib[2:], ia[2:]), rel=1e-4, abs=1e-6)
    assert report["results"][0]["latent_rel_rmse"]["mean"] > 0  # a sparse model is not its source
    assert report["prompts"]["texts"] == PROMPTS and "negative_embeds" in report["prompts"]["unconditional"]


def test_the_noise_does_not_depend_on_the_batch_size(sd3: SD3, sparse_sd3: nn.Module, files: dict[str, Path]) -> None:
    one = run(sd3, sparse_sd3, files["prompts"], settings=TextCompareSettings(cfg_scales=(2.0,), seeds=(5,), steps=2,
                                                                               batch_size=1))
    three = run(sd3, sparse_sd3, files["prompts"], settings=TextCompareSettings(cfg_scales=(2.0,), seeds=(5,), steps=2,
                                                                                 batch_size=3))
    for key in ("latent_rel_rmse", "floor_latent_rel_rmse"):
        assert one["results"][0][key]["mean"] == pytest.approx(three["results"][0][key]["mean"], rel=1e-4)
    assert noise_seed(5, 0) != noise_seed(5, 1) != noise_seed(5 + FLOOR_OFFSET, 1)
    assert not torch.equal(prompt_noise(sd3.config, 5, 0), prompt_noise(sd3.config, 5 + FLOOR_OFFSET, 0))


def test_flux_dev_compares_over_its_guidance_embedding_in_latent_space(tmp_path: Path, files: dict[str, Path],
                                                                       capsys: pytest.CaptureFixture) -> None:
    dense = tiny_flux(guidance=True)
    sparse = sparsify_flux(dense, "1,1,2,1,2,0,1").eval()
    resolved = resolve_settings(TextCompareSettings(), dense)
    assert resolved.guidance == (2.5, 3.5) and resolved.cfg_scales == (1.0,) and resolved.steps == 28
    assert guidance_points(resolved) == [(1.0, 2.5), (1.0, 3.5)]
    text = prompt_text(n=2)
    settings = TextCompareSettings(guidance=(2.5, 3.5), seeds=(0, 1), steps=STEPS)
    report = run(dense, sparse, text, settings=settings, out=tmp_path / "o", progress=True)
    assert "compare" in capsys.readouterr().err  # the progress bar
    assert report["space"] == "latents" and "latent space only" in report["images_from"]
    assert [r["label"] for r in report["results"]] == ["guidance 2.5", "guidance 3.5"]
    for r in report["results"]:
        assert r["psnr_db"] is None and "pixel_rmse" not in r["per_seed"][0]
        row = r["per_seed"][1]
        a = torch.cat([direct(dense, text, i, 1, 1.0, r["guidance"]) for i in range(2)])
        b = torch.cat([direct(sparse, text, i, 1, 1.0, r["guidance"]) for i in range(2)])
        assert row["latent_rel_rmse"] == pytest.approx(rmse(b, a) / float(a.double().pow(2).mean().sqrt()), rel=1e-4)
        assert row["rmse_ratio"] == pytest.approx(row["latent_rel_rmse"] / row["floor_latent_rel_rmse"], rel=1e-9)
    assert report["results"][0]["latent_rel_rmse"] != report["results"][1]["latent_rel_rmse"]
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["compare.json", "compare.md", "paired_guidance2.5.png", "paired_guidance3.5.png"]
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "no PSNR" in md and "PSNR B vs A" not in md and "| guidance 3.5 |" in md
    assert Image.open(tmp_path / "o" / "paired_guidance2.5.png").size[::-1] == text_paired_image_size(2, 16, 16, 1)
    assert report["prompts"]["texts"] is None and report["cost"]["flops_ratio_a_over_b"] > 1


def test_pixart_samples_each_prompt_from_its_noise_seed() -> None:
    """PixArt's generate takes no noise: each prompt is sampled alone from the noise rule's generator seed."""
    torch.manual_seed(0)
    cfg = PixArtConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, caption_channels=CAPTION,
                       null_caption_length=TOKENS, interpolation_scale=0.5)
    a = helpers.randomize(PixArt(cfg), 0.1).eval()
    b = helpers.randomize(copy.deepcopy(a), 0.1).eval()
    text = {**prompt_text(pooled=False), "mask": torch.ones(3, TOKENS, dtype=torch.long)}
    settings = TextCompareSettings(seeds=(3,), sampler="ddim", steps=2, batch_size=2)
    resolved = resolve_settings(settings, a)
    assert resolved.cfg_scales == (2.0, 4.0)  # half and all of the family's default guidance
    report = run(a, b, text, settings=settings)
    fam = family_of(a)

    def one(model: nn.Module, i: int, seed: int, cfg: float) -> torch.Tensor:
        return fam.generate(model, text=select_prompts(text, [i]), sampler="ddim", steps=2, cfg_scale=cfg,
                            seed=noise_seed(seed, i), progress=False)

    for r in report["results"]:
        xa = torch.cat([one(a, i, 3, r["cfg_scale"]) for i in range(3)])
        xb = torch.cat([one(b, i, 3, r["cfg_scale"]) for i in range(3)])
        xf = torch.cat([one(a, i, 3 + FLOOR_OFFSET, r["cfg_scale"]) for i in range(3)])
        norm = float(xa.double().pow(2).mean().sqrt())
        assert r["per_seed"][0]["latent_rel_rmse"] == pytest.approx(rmse(xb, xa) / norm, rel=1e-4)
        assert r["per_seed"][0]["floor_latent_rel_rmse"] == pytest.approx(rmse(xf, xa) / norm, rel=1e-4)


class PoolMean:
    """A stand-in for InceptionV3: 'pool' features are the per-channel means and stds of the uint8 images."""

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
        return {"pool": pool, "spatial": pool[:, :2], "logits": pool}


def test_frechet_distances_read_against_a_fresh_draw_of_a(sd3: SD3, sparse_sd3: nn.Module, files: dict[str, Path]) -> None:
    text = prompt_text(n=8, seed=4)
    settings = TextCompareSettings(cfg_scales=(1.0,), seeds=(0, 1), steps=2, batch_size=4)
    same = run(sd3, copy.deepcopy(sd3), text, settings=settings, vae=files["vae"], feature_model=PoolMean())
    r = same["results"][0]
    assert r["fd"]["per_seed"] == r["floor_fd"]["per_seed"] and r["fd"]["mean"] > 0  # B = A: the floor exactly
    other = run(sd3, sparse_sd3, text, settings=settings, vae=files["vae"], feature_model=PoolMean())
    assert other["results"][0]["fd"]["per_seed"] != r["fd"]["per_seed"]
    assert other["results"][0]["floor_fd"]["per_seed"] == r["floor_fd"]["per_seed"]
    assert "FD B vs A'" in text_results_table(other)


def test_cost_counts_the_caption_length_and_doubles_under_guidance(sd3: SD3, sparse_sd3: nn.Module,
                                                                   files: dict[str, Path]) -> None:
    report = run(sd3, sparse_sd3, files["prompts"], settings=TextCompareSettings(cfg_scales=(1.0, 3.0), seeds=(0,),
                                                                                  steps=2))
    cost = report["cost"]
    x, t = torch.randn(1, 4, 16, 16), torch.full((1,), 500.0)
    measured = measure_macs(sd3, x, t, torch.randn(1, TOKENS, CAPTION), pooled_projections=torch.randn(1, POOLED))
    assert cost["gmacs_per_forward"]["a"] * 1e9 == pytest.approx(measured, rel=1e-9)
    assert cost["caption_tokens"] == TOKENS and cost["gmacs_per_forward"]["a"] > cost["gmacs_per_forward"]["b"]
    per = cost["gmacs_per_image"]
    assert per["cfg3"]["b"] == pytest.approx(2 * per["cfg1"]["b"]) and per["cfg1"]["a"] == pytest.approx(
        2 * cost["gmacs_per_forward"]["a"])
    assert all(v > 0 for v in report["timing"]["seconds_per_image"].values())
    # A: its own and the floor's; the first chunk (batch 4: all 3 prompts) of the first guidance value is a warm-up
    assert report["timing"]["images_timed"] == {"a": 2 * 3, "b": 3}


def test_pure_helpers() -> None:
    assert spread_inf([1.0, 3.0]) == {"per_seed": [1.0, 3.0], "mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    assert spread_inf([math.inf, math.inf])["mean"] == math.inf and spread_inf([math.inf, 1.0])["std"] is None
    assert math.isnan(spread_inf([math.inf, 1.0])["mean"])
    assert json_safe({"a": [math.inf, -math.inf, math.nan, 1.5]}) == {"a": ["inf", "-inf", None, 1.5]}
    assert [point_name(7.0, None), point_name(1.0, 3.5), point_name(2.0, 3.5)] == ["cfg7", "guidance3.5",
                                                                                 "cfg2_guidance3.5"]
    images = torch.zeros(2, 3, 4, 4)
    image = text_paired_image(images, images, ["\u732b on a mat " * 300], 2, ["one header line"])  # long, non-Latin-1
    assert image.shape == (*text_paired_image_size(2, 4, 4, 2, header_lines=1), 3) and image.dtype == np.uint8


def test_own_paired_images_are_replaced_others_kept(tmp_path: Path) -> None:
    for name in ("paired_guidance3.5.png", "paired_cfg7.png", "paired_cfg2_guidance3.5.png", "paired_guidance_x.png",
                 "paired_mine.png", "compare.md"):
        (tmp_path / name).write_text("x")
    remove_own_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paired_guidance_x.png", "paired_mine.png"]


# --------------------------------------------------------------------------------------------------
# Refusals


def test_refusals_are_one_line_naming_the_fix(sd3: SD3, files: dict[str, Path]) -> None:
    flux_dev, schnell = tiny_flux(True), tiny_flux(False)
    with pytest.raises(SparseditError) as err:
        run(sd3, flux_dev, files["prompts"])
    one_line(err, "different model families", "SD3", "FLUX")
    dit = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3))
    with pytest.raises(SparseditError) as err:
        run(dit, dit, files["prompts"])
    one_line(err, "model A is a DiT", "class-conditional", "drop --prompt-embeds")
    with pytest.raises(SparseditError) as err:
        compare_models(sd3, sd3)
    one_line(err, "caption-conditioned", "--prompt-embeds")
    with pytest.raises(SparseditError) as err:
        run(flux_dev, flux_dev, prompt_text(), settings=TextCompareSettings(cfg_scales=(3.0,)))
    one_line(err, "no classifier-free guidance", "--cfg-scales must be 1", "--guidance 2.5 3.5")
    for model in (schnell, sd3):
        with pytest.raises(SparseditError) as err:
            run(model, model, prompt_text(), settings=TextCompareSettings(guidance=(3.5,)))
        one_line(err, "--guidance", "drop --guidance")
    with pytest.raises(SparseditError) as err:
        run(sd3, tiny_sd3(input_size=8), files["prompts"])
    one_line(err, "input sizes differ")
    with pytest.raises(SparseditError) as err:
        run(sd3, sd3, files["no_pooled"])
    one_line(err, "pooled_embeds")
    with pytest.raises(SparseditError) as err:
        run(sd3, sd3, files["prompts"], settings=TextCompareSettings(num_prompts=4))
    one_line(err, "--num-prompts 4", "3 prompts")
    with pytest.raises(SparseditError) as err:
        run(sd3, sd3, files["prompts"], settings=TextCompareSettings(sampler="ddim"))
    one_line(err, "euler")
    with pytest.raises(SparseditError) as err:
        run(sd3, sd3, files["prompts"], feature_model=PoolMean())
    one_line(err, "needs images", "--vae")
    with pytest.raises(SparseditError) as err:
        run(sd3, sd3, files["prompts"], vae=files["vae"], pipeline=files["vae"])
    one_line(err, "not both")
    with pytest.raises(SparseditError) as err:
        TextCompareSettings(seeds=(1, 1))
    one_line(err, "--seeds")
    with pytest.raises(SparseditError) as err:
        TextCompareSettings(cfg_scales=(0.0,))
    one_line(err, "--cfg-scales")


# --------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def ckpts(sd3: SD3, sparse_sd3: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("text_ckpts")
    return sparsedit.save_pretrained(sd3, root / "sd3"), sparsedit.save_pretrained(sparse_sd3, root / "sparse")


def cli(ckpts: tuple[Path, Path], files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["compare", str(ckpts[0]), str(ckpts[1]), "--prompt-embeds", str(files["prompts"]), "--vae",
            str(files["vae"]), "--out", str(out), "--seeds", "0", "1", "--steps", "2", "--rows", "2", "--threads", "1",
            "--device", "cpu", "--no-progress", *extra]


def test_cli_writes_the_report_and_never_clobbers(ckpts: tuple[Path, Path], files: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert main(cli(ckpts, files, out)) == 0
    printed = capsys.readouterr().out
    assert "| guidance | N images | PSNR B vs A (dB) | floor PSNR A vs A' (dB) |" in printed and "| cfg 7 |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "paired_cfg3.5.png", "paired_cfg7.png"]
    report = strict_json(out / "compare.json")
    assert report["names"] == {"a": "sd3", "b": "sparse"} and report["settings"]["cfg_scales"] == [3.5, 7.0]
    assert report["settings"]["steps"] == 2 and report["settings"]["sampler"] == "euler"
    assert [r["num_images"] for r in report["results"]] == [3, 3] and report["kind"] == "caption"
    assert np.isfinite(report["results"][1]["psnr_db"]["mean"]) and isinstance(report["command"], str)
    assert Image.open(out / "paired_cfg7.png").size[::-1] == text_paired_image_size(2, 32, 32, 1)
    assert report["prompts"]["texts"] == PROMPTS and "sampling seconds per image" in (out / "compare.md").read_text()
    assert main(cli(ckpts, files, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    (out / "mine.txt").write_text("keep")
    assert main(cli(ckpts, files, out, "--overwrite", "--cfg-scales", "1", "--num-prompts", "2")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "mine.txt", "paired_cfg1.png"]
    assert strict_json(out / "compare.json")["results"][0]["num_images"] == 2


@pytest.mark.parametrize("extra, words", [
    (["--ref", "r.npz"], ["--ref", "for class models"]),
    (["--guidance", "3"], ["--guidance", "drop --guidance"]),
    (["--sampler", "ddim"], ["euler"]),
    (["--cfg-scales", "1", "1"], ["--cfg-scales", "distinct"]),
])
def test_cli_bad_input_exit_2_one_line(ckpts: tuple[Path, Path], files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture, extra: list[str], words: list[str]) -> None:
    assert main(cli(ckpts, files, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_cli_caption_flags_need_prompt_embeds_and_caption_models_need_them(ckpts: tuple[Path, Path], tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    base = ["compare", str(ckpts[0]), str(ckpts[1]), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--guidance", "3.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--guidance" in err and "--prompt-embeds" in err
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "caption-conditioned" in err and "--prompt-embeds FILE" in err
    assert main([*base, "--prompt-embeds", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "encode-prompts" in err


def test_cli_flux_dev_decodes_with_the_pipeline_vae(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The documented command: a FLUX.1-dev and its SparseFLUX, the VAE from --pipeline, the guidance axis default."""
    import dataclasses

    from tiny_pipelines import CLIP_WIDTH, T5_WIDTH, save_flux_pipeline

    pipe = save_flux_pipeline(tmp_path / "FLUX.1-dev")
    dense = sparsedit.load_model(pipe)
    dense.config = dataclasses.replace(dense.config, input_size=16)  # 8 x 8 tokens: seconds, not minutes
    a = sparsedit.save_pretrained(dense, tmp_path / "dense")
    b = sparsedit.save_pretrained(sparsify_flux(dense, "1,1,1,0,1,0,1"), tmp_path / "sparse")
    g = torch.Generator().manual_seed(0)
    prompts = write_prompt_embeds(tmp_path / "p.safetensors", {"embeds": torch.randn(2, 6, T5_WIDTH, generator=g),
                                                               "pooled": torch.randn(2, CLIP_WIDTH, generator=g)})
    out = tmp_path / "cmp"
    args = ["compare", str(a), str(b), "--prompt-embeds", str(prompts), "--pipeline", str(pipe), "--out", str(out),
            "--seeds", "0", "1", "--steps", "2", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    assert "| guidance 2.5 |" in capsys.readouterr().out
    report = strict_json(out / "compare.json")
    assert report["space"] == "pixels" and str(pipe / "vae") in report["images_from"]
    assert [r["guidance"] for r in report["results"]] == [2.5, 3.5] and report["settings"]["cfg_scales"] == [1.0]
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "paired_guidance2.5.png",
                                                     "paired_guidance3.5.png"]
    assert main([*args, "--overwrite", "--cfg-scales", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cfg-scales must be 1" in err and "--guidance" in err


def test_models_of_different_sizes_sample_at_the_sparse_models_size(sd3: SD3, sparse_sd3: nn.Module,
                                                                    files: dict[str, Path]) -> None:
    small = copy.copy(sd3)
    family_of(small).set_image_size(small, 64)  # A's config says 64 px (8 x 8 latents), B's 128 px: SD3 runs at both
    assert small.config.latent_hw == (8, 8)
    settings = TextCompareSettings(cfg_scales=(2.0,), seeds=(0,), steps=2)
    moved = run(small, sparse_sd3, files["prompts"], settings=settings)
    same = run(sd3, sparse_sd3, files["prompts"], settings=settings)
    assert moved["size"]["latent_hw"] == [16, 16] and "the sparse model's size" in moved["size"]["note"]
    assert same["size"]["note"] is None and small.config.latent_hw == (8, 8)  # the caller's model keeps its config
    assert moved["results"][0]["per_seed"] == same["results"][0]["per_seed"]
    both = run(sd3, sparse_sd3, files["prompts"], settings=settings, image_size=64)
    assert both["size"] == {"latent_hw": [8, 8], "note": "both models sampled at 64 px (--image-size)"}
    assert both["results"][0]["latent_rel_rmse"] != same["results"][0]["latent_rel_rmse"]
    with pytest.raises(SparseditError) as err:
        run(small, sd3, files["prompts"], settings=settings)  # two dense models: which size is not obvious
    one_line(err, "input sizes differ", "--image-size")
    pixart = PixArt(PixArtConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, caption_channels=CAPTION,
                                 null_caption_length=TOKENS, interpolation_scale=0.5)).eval()
    with pytest.raises(SparseditError) as err:  # a PixArt keeps its checkpoint's size
        run(pixart, pixart, prompt_text(pooled=False), settings=settings, image_size=128)
    one_line(err, "PixArt runs at its checkpoint's size (64x64 px)", "drop --image-size")
