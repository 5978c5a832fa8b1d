"""``sparsedit compare`` on video models (Latte / SparseLatte): same noise as a direct ``family.generate`` call,
PSNR / RMSE per frame next to the floor A vs A', FVD with an I3D in the released layout, cost, files, CLI, refusals."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import helpers
import sparsedit
from helpers import one_line
from sparsedit.cli import main
from sparsedit.core.prompts import read_prompt_embeds, select_prompts, write_prompt_embeds
from sparsedit.diffusion.process import space_timesteps
from sparsedit.errors import SparseditError
from sparsedit.eval.compare import compare_models
from sparsedit.eval.compare_report import remove_own_outputs
from sparsedit.eval.compare_text import FLOOR_OFFSET, compare_text_models, noise_seed
from sparsedit.eval.compare_video import VideoCompareSettings, compare_video_models
from sparsedit.eval.compare_video_report import strip_image
from sparsedit.eval.flops import measure_macs
from sparsedit.eval.metrics import fvd as fvd_mod
from sparsedit.families import family_of
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.families.latte.model import Latte, LatteConfig
from sparsedit.families.latte.sparse import sparsify_latte
from sparsedit.families.latte.video import generate_latte

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, TOKENS, STEPS = 12, 5, 3
LAYOUT = "0,1,2,2,2,0,2"  # pool, gen (space + time), 2 sparse, recovery (time + space), 2 top: every SDTM kind
PROMPTS = ["a red cat", "a dog on the moon", "happy cactus"]


def tiny_latte(frames: int = 4, conditioning: str = "class", num_classes: int = 5, **kw: object) -> Latte:
    """A pixel-space Latte (3 channels, 8 x 8 frames, 4 x 4 tokens at patch 2): no VAE, seconds per comparison."""
    cfg = LatteConfig(input_size=8, num_frames=frames, hidden_size=32, depth=8, num_heads=2, in_channels=3,
                      data_space="pixel", conditioning=conditioning, num_classes=num_classes,
                      caption_channels=CAPTION, **kw)
    return helpers.randomize(Latte(cfg), 0.05).eval()


@pytest.fixture(scope="module")
def latte() -> Latte:
    torch.manual_seed(0)
    return tiny_latte()


@pytest.fixture(scope="module")
def sparse(latte: Latte) -> nn.Module:
    return sparsify_latte(latte, LAYOUT, r_min=0.3, r_max=0.8).eval()


def settings(**kw: object) -> VideoCompareSettings:
    base: dict = dict(cfg_scales=(1.0, 4.0), seeds=(0, 1), sampler="ddim", steps=STEPS, num_samples=3)
    return VideoCompareSettings(**{**base, **kw})


def strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def direct(model: nn.Module, i: int, seed: int, cfg: float, label: int | None = None) -> torch.Tensor:
    """Video i under ``seed`` by one plain family.generate call, its generator seeded by the noise rule."""
    return family_of(model).generate(model, labels=[i % 5 if label is None else label], sampler="ddim", steps=STEPS,
                                     cfg_scale=cfg, seed=noise_seed(seed, i), progress=False)


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------------
# The numbers


def test_identical_models_infinite_psnr_zero_rmse_and_a_finite_floor(latte: Latte, tmp_path: Path) -> None:
    report = compare_video_models(latte, copy.deepcopy(latte), settings(), progress=False, out=tmp_path / "o")
    assert report["kind"] == "video" and report["space"] == "pixels" and report["frames"] == 4
    assert [r["label"] for r in report["results"]] == ["cfg 1 (no guidance)", "cfg 4"]
    for r in report["results"]:
        for row in r["per_seed"]:
            assert row["psnr_db"] == math.inf and row["pixel_rmse"] == 0 and row["latent_rel_rmse"] == 0
            assert row["rmse_ratio"] == 0 and row["per_video"]["rmse"] == [0.0] * 3
            assert row["per_frame"]["rmse"] == [0.0] * 4
            assert 0 < row["floor_pixel_rmse"] and math.isfinite(row["floor_psnr_db"])
            assert row["floor_seed"] == row["seed"] + FLOOR_OFFSET and min(row["per_frame"]["floor_rmse"]) > 0
        assert r["psnr_db"]["mean"] == math.inf and r["floor_psnr_db"]["std"] is not None
        assert r["per_frame"]["b"] == [math.inf] * 4 and all(math.isfinite(v) for v in r["per_frame"]["floor"])
        assert r["verdict"] == "B reproduces A's videos exactly" and r["fvd_b_a"] is None
    out = tmp_path / "o"
    names = ["compare.json", "compare.md", "paired_cfg1.gif", "paired_cfg1.png", "paired_cfg4.gif", "paired_cfg4.png"]
    assert sorted(p.name for p in out.iterdir()) == names and sorted(report["outputs"]) == names
    saved = strict_json(out / "compare.json")  # strict JSON: the infinite PSNR is the string "inf"
    assert saved["results"][0]["psnr_db"]["mean"] == "inf" and saved["results"][1]["per_frame"]["b"] == ["inf"] * 4
    assert saved["results"][1]["floor_psnr_db"]["mean"] == pytest.approx(report["results"][1]["floor_psnr_db"]["mean"])
    assert saved["conditioning"]["kind"] == "class" and saved["fvd"]["available"] is False
    gif = Image.open(out / "paired_cfg4.gif")  # 2 rows (A over B) of 3 videos, 8 px frames with 2 px padding
    assert gif.n_frames == 4 and gif.size == (3 * 10 + 2, 2 * 10 + 2)
    frames = []
    for k in range(gif.n_frames):
        gif.seek(k)
        frames.append(np.asarray(gif.convert("RGB")))
    assert not np.array_equal(frames[0], frames[1])  # it plays: the frames differ
    assert np.array_equal(frames[2][2:10, 2:10], frames[2][12:20, 2:10])  # B = A: the rows match
    md = (out / "compare.md").read_text()
    assert "∞ (identical)" in md and "not video quality" in md and "| frame |" in md and "FVD" not in md


def test_sparse_latte_numbers_come_from_the_same_noise_as_direct_generate(latte: Latte, sparse: nn.Module) -> None:
    report = compare_video_models(latte, sparse, settings(), progress=False)
    for r in report["results"]:
        for row in r["per_seed"]:
            s, cfg = row["seed"], r["cfg_scale"]
            a = torch.cat([direct(latte, i, s, cfg) for i in range(3)])
            b = torch.cat([direct(sparse, i, s, cfg) for i in range(3)])
            f = torch.cat([direct(latte, i, s + FLOOR_OFFSET, cfg) for i in range(3)])
            norm = float(a.double().pow(2).mean().sqrt())
            assert row["latent_rel_rmse"] == pytest.approx(rmse(b, a) / norm, rel=1e-6)
            assert row["floor_latent_rel_rmse"] == pytest.approx(rmse(f, a) / norm, rel=1e-6)
            va, vb, vf = (x.clamp(-1, 1) for x in (a, b, f))
            assert row["pixel_rmse"] == pytest.approx(rmse(vb, va), rel=1e-6)
            assert row["psnr_db"] == pytest.approx(20 * math.log10(2 / rmse(vb, va)), abs=1e-6)
            assert row["floor_pixel_rmse"] == pytest.approx(rmse(vf, va), rel=1e-6)
            assert row["rmse_ratio"] == pytest.approx(rmse(vb, va) / rmse(vf, va), rel=1e-6)
            assert row["per_video"]["rmse"][2] == pytest.approx(rmse(vb[2], va[2]), rel=1e-6)
            assert row["per_frame"]["rmse"][3] == pytest.approx(rmse(vb[:, :, 3], va[:, :, 3]), rel=1e-6)
            assert row["per_frame"]["floor_rmse"][0] == pytest.approx(rmse(vf[:, :, 0], va[:, :, 0]), rel=1e-6)
        psnr = [20 * math.log10(2 / row["per_frame"]["rmse"][1]) for row in r["per_seed"]]
        assert r["per_frame"]["b"][1] == pytest.approx(sum(psnr) / 2)
        assert r["psnr_db"]["mean"] == pytest.approx((r["per_seed"][0]["psnr_db"] + r["per_seed"][1]["psnr_db"]) / 2)
    assert 0 < report["results"][0]["pixel_rmse"]["mean"]  # a sparse model is not its source
    assert report["results"][0]["pixel_rmse"]["per_seed"] != report["results"][1]["pixel_rmse"]["per_seed"]


def test_the_noise_does_not_depend_on_the_batch_size(latte: Latte, sparse: nn.Module) -> None:
    one = compare_video_models(latte, sparse, settings(cfg_scales=(4.0,), seeds=(2,), batch_size=1), progress=False)
    three = compare_video_models(latte, sparse, settings(cfg_scales=(4.0,), seeds=(2,), batch_size=3), progress=False)
    for key in ("pixel_rmse", "floor_pixel_rmse"):
        assert one["results"][0][key]["mean"] == pytest.approx(three["results"][0][key]["mean"], rel=1e-9)


def test_cost_follows_the_token_sets_and_doubles_under_guidance(latte: Latte, sparse: nn.Module) -> None:
    report = compare_video_models(latte, sparse, settings(seeds=(0,)), progress=False)
    cost = report["cost"]
    x, y = torch.randn(1, 3, 4, 8, 8), torch.tensor([1])
    dense = measure_macs(latte, x, torch.full((1,), 500), y)
    assert cost["gmacs_per_forward"]["a"] * 1e9 == pytest.approx(dense, rel=1e-9)
    steps = sorted(space_timesteps(1000, f"ddim{STEPS}"))
    counted = [measure_macs(sparse, x, torch.full((1,), t), y) for t in steps]  # SparseLatte picks its tokens from t
    assert len(set(counted)) > 1  # the token set changes over the run
    assert cost["gmacs_per_forward"]["b"] * 1e9 == pytest.approx(sum(counted) / len(counted), rel=1e-9)
    per = cost["gmacs_per_video"]
    assert per["cfg1"]["b"] == pytest.approx(sum(counted) / 1e9) and per["cfg4"]["b"] == pytest.approx(2 * per["cfg1"]["b"])
    assert cost["flops_ratio_a_over_b"] > 1 and cost["steps"] == STEPS
    assert all(v > 0 for v in report["timing"]["seconds_per_video"].values())
    # A: its own and the floor's videos; the first chunk (batch 2: videos 0 and 1) of the first scale is a warm-up
    assert report["timing"]["videos_timed"] == {"a": 2 * (2 * 3 - 2), "b": 2 * 3 - 2}


def test_unconditional_latte_samples_each_video_from_its_noise_seed() -> None:
    torch.manual_seed(1)
    a = tiny_latte(num_classes=0)
    b = helpers.randomize(copy.deepcopy(a), 0.05).eval()
    report = compare_video_models(a, b, VideoCompareSettings(seeds=(3,), sampler="ddim", steps=2, num_samples=2),
                                  progress=False)
    assert report["settings"]["cfg_scales"] == (1.0,) and report["conditioning"]["kind"] == "unconditional"
    row = report["results"][0]["per_seed"][0]

    def one(model: nn.Module, i: int, seed: int) -> torch.Tensor:
        return generate_latte(model, None, num_videos=1, sampler="ddim", steps=2, seed=noise_seed(seed, i))

    xa, xb, xf = (torch.cat([one(m, i, s) for i in range(2)]) for m, s in ((a, 3), (b, 3), (a, 3 + FLOOR_OFFSET)))
    assert row["pixel_rmse"] == pytest.approx(rmse(xb.clamp(-1, 1), xa.clamp(-1, 1)), rel=1e-6)
    assert row["floor_pixel_rmse"] == pytest.approx(rmse(xf.clamp(-1, 1), xa.clamp(-1, 1)), rel=1e-6)
    with pytest.raises(SparseditError) as err:
        compare_video_models(a, b, VideoCompareSettings(cfg_scales=(1.0, 4.0), num_samples=2), progress=False)
    one_line(err, "unconditional", "--cfg-scales must be 1")


# --------------------------------------------------------------------------------------------------
# FVD


class Recording(nn.Module):
    """The loaded I3D, recording what it sees and says."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.seen.append((x.clone(), out.detach().clone()))
        return out


def test_fvd_of_b_against_a_next_to_the_floor_with_an_i3d_in_the_released_layout(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from test_fvd import random_state  # the released key layout, random values

    path = tmp_path / "rgb_imagenet.pt"
    torch.save(random_state(), path)
    nets: list[Recording] = []
    real_load = fvd_mod.load_i3d
    monkeypatch.setattr(fvd_mod, "load_i3d", lambda p, d="cpu": nets.append(Recording(real_load(p, d))) or nets[-1])
    torch.manual_seed(2)
    a = tiny_latte(frames=16)
    b = sparsify_latte(a, LAYOUT, r_min=0.3, r_max=0.8).eval()
    s = VideoCompareSettings(cfg_scales=(4.0,), seeds=(0,), sampler="ddim", steps=2, num_samples=2, batch_size=2)
    report = compare_video_models(a, b, s, i3d=str(path), progress=False, out=tmp_path / "o")
    assert len(nets) == 1 and len(nets[0].seen) == 3  # one I3D batch for A, B and A' each
    one = {k: torch.cat([family_of(m).generate(m, labels=[i % 5], sampler="ddim", steps=2, cfg_scale=4.0,
                                               seed=noise_seed(sd, i)) for i in range(2)]).clamp(-1, 1)
           for k, m, sd in (("a", a, 0), ("b", b, 0), ("f", a, FLOOR_OFFSET))}
    feats = {}
    for (x, out), k in zip(nets[0].seen, ("a", "b", "f"), strict=True):
        assert torch.equal(x, fvd_mod.preprocess(one[k]))  # the first 16 frames of the very videos, at 224 x 224
        feats[k] = out.numpy()

    def fd(x: np.ndarray, y: np.ndarray) -> float:
        return max(fvd_mod.frechet_distance(*fvd_mod.fvd_stats(x), *fvd_mod.fvd_stats(y)), 0.0)

    row, r = report["results"][0]["per_seed"][0], report["results"][0]
    assert row["fvd_b_a"] == pytest.approx(fd(feats["b"], feats["a"]), rel=1e-6)
    assert row["fvd_b_floor"] == pytest.approx(fd(feats["b"], feats["f"]), rel=1e-6)
    assert row["fvd_floor"] == pytest.approx(fd(feats["f"], feats["a"]), rel=1e-6) and row["fvd_floor"] > 0
    assert r["fvd_floor"]["mean"] == row["fvd_floor"] and r["fvd_floor"]["std"] is None
    fvd = report["fvd"]
    assert fvd["available"] and fvd["num_videos"] == 2 and fvd["clip_frames"] == 16 and str(path) in fvd["detector"]
    assert "N = 2 videos" in fvd["note"] and "biased" in fvd["note"] and "rgb_imagenet.pt" in fvd["note"]
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "| FVD B vs A | FVD B vs A' | FVD floor A' vs A |" in md and "FVD caveats" in md and "N = 2" in md


# --------------------------------------------------------------------------------------------------
# Text-to-video Latte, through the CLI


@pytest.fixture(scope="module")
def t2v(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2v")
    torch.manual_seed(3)
    dense = tiny_latte(conditioning="text")
    g = torch.Generator().manual_seed(0)
    text = {"embeds": torch.randn(3, TOKENS, CAPTION, generator=g),
            "null_embeds": torch.randn(1, TOKENS, CAPTION, generator=g)}
    return {"a": sparsedit.save_pretrained(dense, root / "t2v"),
            "b": sparsedit.save_pretrained(sparsify_latte(dense, LAYOUT, r_min=0.3, r_max=0.8), root / "sparse-t2v"),
            "prompts": write_prompt_embeds(root / "prompts.safetensors", text, PROMPTS)}


def test_cli_text_latte_compares_on_prompt_embeddings(t2v: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    args = ["compare", str(t2v["a"]), str(t2v["b"]), "--prompt-embeds", str(t2v["prompts"]), "--out", str(out),
            "--seeds", "0", "1", "--sampler", "ddim", "--steps", "2", "--rows", "2", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| guidance | N videos | PSNR B vs A (dB) |" in printed and "| cfg 2 |" in printed and "paired videos" in printed
    report = strict_json(out / "compare.json")
    assert report["settings"]["cfg_scales"] == [2.0, 4.0]  # half and all of the family's default guidance
    assert report["conditioning"]["texts"] == PROMPTS and "negative_embeds" in report["conditioning"]["unconditional"]
    assert report["conditioning"]["shown"] == ["0: a red cat", "1: a dog on the moon"]
    a, b = sparsedit.load_model(t2v["a"]), sparsedit.load_model(t2v["b"])
    text = read_prompt_embeds(t2v["prompts"], CAPTION, None)

    def one(model: nn.Module, i: int, seed: int) -> torch.Tensor:
        return family_of(model).generate(model, text=select_prompts(text, [i]), sampler="ddim", steps=2, cfg_scale=4.0,
                                         seed=noise_seed(seed, i))

    row = report["results"][1]["per_seed"][1]
    xa, xb, xf = (torch.cat([one(m, i, s) for i in range(3)]) for m, s in ((a, 1), (b, 1), (a, 1 + FLOOR_OFFSET)))
    assert row["pixel_rmse"] == pytest.approx(rmse(xb.clamp(-1, 1), xa.clamp(-1, 1)), rel=1e-6)
    assert row["floor_pixel_rmse"] == pytest.approx(rmse(xf.clamp(-1, 1), xa.clamp(-1, 1)), rel=1e-6)
    assert Image.open(out / "paired_cfg4.gif").size == (2 * 10 + 2, 2 * 10 + 2)  # --rows 2
    assert "2: happy cactus" not in json.dumps(report["conditioning"]["shown"])
    assert main([*args, "--overwrite", "--num-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-samples" in err and "not with --prompt-embeds" in err


# --------------------------------------------------------------------------------------------------
# Class Latte through the CLI, files and refusals


@pytest.fixture(scope="module")
def ckpts(latte: Latte, sparse: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video_ckpts")
    dit = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                        data_space="pixel"))
    return {"a": sparsedit.save_pretrained(latte, root / "latte"), "b": sparsedit.save_pretrained(sparse, root / "sparse"),
            "long": sparsedit.save_pretrained(tiny_latte(frames=16), root / "long"),
            "dit": sparsedit.save_pretrained(dit, root / "dit")}


def cli(ckpts: dict[str, Path], out: Path, *extra: str, a: str = "a", b: str = "b") -> list[str]:
    return ["compare", str(ckpts[a]), str(ckpts[b]), "--out", str(out), "--seeds", "0", "1", "--num-samples", "2",
            "--sampler", "ddim", "--steps", "2", "--threads", "1", "--no-progress", *extra]


def test_cli_class_latte_writes_the_report_and_never_clobbers(ckpts: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert main(cli(ckpts, out)) == 0
    printed = capsys.readouterr().out
    assert "| cfg 1 (no guidance) | 2 x 2 seeds |" in printed and "| cfg 4 |" in printed  # Latte's default axis: 1, 4
    report = strict_json(out / "compare.json")
    assert report["names"] == {"a": "latte", "b": "sparse"} and report["settings"]["cfg_scales"] == [1.0, 4.0]
    assert report["models"]["b"]["class"] == "SparseLatte" and report["settings"]["num_samples"] == 2
    assert report["conditioning"]["shown"] == ["0: class 0", "1: class 1"] and isinstance(report["command"], str)
    assert main(cli(ckpts, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    (out / "paired_mine.gif").write_text("keep")
    assert main(cli(ckpts, out, "--overwrite", "--cfg-scales", "4")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "paired_cfg4.gif", "paired_cfg4.png",
                                                     "paired_mine.gif"]


@pytest.mark.parametrize("extra, words", [
    (["--ref", "r.npz"], ["--ref", "not for video models", "--i3d"]),
    (["--inception-weights", "w.pth"], ["--inception-weights", "not for video models"]),
    (["--per-class", "2"], ["--per-class", "not for video models"]),
    (["--sampler-b", "ddpm"], ["--sampler-b", "not for video models"]),
    (["--guidance", "3"], ["--guidance", "--prompt-embeds"]),
    (["--num-prompts", "2"], ["--num-prompts", "--prompt-embeds"]),
    (["--sampler", "euler"], ["ddpm or ddim", "--sampler ddpm"]),
    (["--prompt-embeds", "{prompts}"], ["class-conditional", "drop --prompt-embeds"]),
    (["--i3d", "rgb.pt"], ["clips of 16 frames", "have 4", "drop --i3d"]),
    (["--vae", "vae"], ["pixel space", "drop --vae"]),
    (["--cfg-scales", "1", "1"], ["--cfg-scales", "distinct"]),
])
def test_cli_video_refusals_exit_2_one_line(ckpts: dict[str, Path], t2v: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture, extra: list[str], words: list[str]) -> None:
    extra = [e.format(prompts=t2v["prompts"]) for e in extra]
    args = cli(ckpts, tmp_path / "o", *extra)
    if "--prompt-embeds" in extra:  # --num-samples is refused with --prompt-embeds before the models are read
        del args[args.index("--num-samples"):args.index("--num-samples") + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_cli_i3d_is_checked_before_sampling_and_only_for_video_models(ckpts: dict[str, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(cli(ckpts, tmp_path / "o", "--i3d", str(tmp_path / "missing.pt"), a="long", b="long")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "I3D weights not found" in err and "missing.pt" in err
    assert main(cli(ckpts, tmp_path / "o", "--i3d", "rgb.pt", a="dit", b="dit")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--i3d is for video models" in err and "DiT" in err
    assert main(cli(ckpts, tmp_path / "o", a="a", b="long")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "frame counts differ" in err
    assert main(cli(ckpts, tmp_path / "o", a="a", b="dit")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model B is a DiT, an image model" in err
    assert not (tmp_path / "o").exists()


def test_library_refusals_are_one_line_naming_the_fix(latte: Latte, sparse: nn.Module) -> None:
    with pytest.raises(SparseditError) as err:
        compare_models(latte, sparse)
    one_line(err, "model A is a Latte, a video model", "compare_video_models")
    t2v = tiny_latte(conditioning="text")
    with pytest.raises(SparseditError) as err:
        compare_text_models(t2v, t2v, {"embeds": torch.randn(2, TOKENS, CAPTION)})
    one_line(err, "video model", "compare_video_models")
    with pytest.raises(SparseditError) as err:
        compare_video_models(t2v, t2v, settings(), progress=False)
    one_line(err, "text-to-video", "--prompt-embeds FILE")
    with pytest.raises(SparseditError) as err:
        compare_video_models(t2v, latte, settings(), progress=False)
    one_line(err, "caption-conditioned", "class-conditioned")
    with pytest.raises(SparseditError) as err:
        compare_video_models(t2v, t2v, settings(num_samples=None, num_prompts=5), prompt_embeds={
            "embeds": torch.randn(2, TOKENS, CAPTION)}, progress=False)
    one_line(err, "--num-prompts 5", "2 prompts")
    with pytest.raises(SparseditError) as err:
        compare_video_models(latte, latte, settings(num_prompts=2), progress=False)
    one_line(err, "--num-prompts is for caption models", "--num-samples")
    no_null = tiny_latte(class_dropout_prob=0.0)
    with pytest.raises(SparseditError) as err:
        compare_video_models(no_null, no_null, settings(), progress=False)
    one_line(err, "model A", "without a null class", "--cfg-scales 1")
    with pytest.raises(SparseditError) as err:
        compare_video_models(latte, sparse, settings(num_samples=1), i3d="rgb.pt", progress=False)
    one_line(err, "FVD", "16 frames", "drop --i3d")
    long = tiny_latte(frames=16)
    with pytest.raises(SparseditError) as err:
        compare_video_models(long, long, settings(num_samples=1), i3d="rgb.pt", progress=False)
    one_line(err, "at least 2 videos", "drop --i3d")
    with pytest.raises(SparseditError) as err:
        VideoCompareSettings(seeds=(1, 1))
    one_line(err, "--seeds")
    with pytest.raises(SparseditError) as err:
        compare_video_models(latte, sparse, settings(), names=("A", ""), progress=False)
    one_line(err, "--names")


class FrameVAE(nn.Module):
    """An image VAE stand-in: 'decodes' (B, 4, h, w) latents to (B, 3, 8h, 8w) and records the batch shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.shapes: list[tuple[int, ...]] = []

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        self.shapes.append(tuple(z.shape))
        return SimpleNamespace(sample=(z[:, :3] * self.weight).repeat_interleave(8, -1).repeat_interleave(8, -2))


def test_latent_videos_are_decoded_as_the_family_decodes_them_and_fvd_needs_them() -> None:
    torch.manual_seed(4)
    cfg = LatteConfig(input_size=8, num_frames=4, hidden_size=32, depth=8, num_heads=2, num_classes=3)
    a = helpers.randomize(Latte(cfg), 0.05).eval()
    b = sparsify_latte(a, LAYOUT, r_min=0.3, r_max=0.8).eval()
    s = settings(cfg_scales=(4.0,), seeds=(0,), num_samples=2)
    with pytest.raises(SparseditError) as err:
        compare_video_models(a, b, s, i3d="rgb.pt", progress=False)
    one_line(err, "FVD needs decoded videos", "--vae")
    latent = compare_video_models(a, b, s, progress=False)
    assert latent["space"] == "latents" and latent["results"][0]["psnr_db"] is None and latent["frames"] == 4
    assert latent["results"][0]["per_frame"]["metric"] == "latent_rel_rmse"
    vae = FrameVAE()
    report = compare_video_models(a, b, s, vae=vae, progress=False)
    assert report["space"] == "pixels" and "the VAE given in memory" in report["videos_from"]
    assert {len(shape) for shape in vae.shapes} == {4}  # Latte's frames go through the image VAE one by one
    assert report["results"][0]["latent_rel_rmse"] == latent["results"][0]["latent_rel_rmse"]
    fam = family_of(a)
    xa = torch.cat([direct(a, i, 0, 4.0, label=i % 3) for i in range(2)])
    xb = torch.cat([direct(b, i, 0, 4.0, label=i % 3) for i in range(2)])
    va, vb = fam.decode_samples(a, xa, vae), fam.decode_samples(a, xb, vae)
    assert va.shape == (2, 3, 4, 64, 64)
    row = report["results"][0]["per_seed"][0]
    assert row["pixel_rmse"] == pytest.approx(rmse(vb, va), rel=1e-6) and row["pixel_rmse"] > 0
    with pytest.raises(SparseditError) as err:
        compare_video_models(a, b, s, vae=vae, i3d="rgb.pt", progress=False)
    one_line(err, "clips of 16 frames", "have 4")


def test_own_outputs_are_replaced_others_kept_and_strips_fit(tmp_path: Path) -> None:
    for name in ("paired_cfg1.gif", "paired_cfg4.png", "paired_cfg2_guidance3.5.gif", "paired_mine.gif", "x.gif"):
        (tmp_path / name).write_text("x")
    remove_own_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paired_mine.gif", "x.gif"]
    videos = torch.zeros(2, 1, 40, 4, 4)
    image = strip_image(videos, videos, ["\u732b " * 300], 2, ["one header line"])  # long, non-Latin-1, 40 frames
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.shape[1] == max(40 + 16 * (8 + 2) + 8, 360)


def test_wan_models_of_different_sizes_are_compared_at_the_sparse_models_size() -> None:
    """A Wan loaded from its pipeline folder is 480p by default; a SparseWan trained with --image-size 48 is 48 x 48:
    both are sampled at the sparse model's size (a note says so), or both at --image-size, as Wan runs at any size."""
    from sparsedit.families.wan import Wan, WanConfig, sparsify_wan

    torch.manual_seed(0)
    dense = helpers.randomize(Wan(WanConfig(input_size=(6, 6), num_frames=2, in_channels=4, out_channels=4,
                                            hidden_size=32, depth=4, num_heads=2, ffn_dim=40, caption_channels=8,
                                            freq_dim=32, rope_max_seq_len=32, max_sequence_length=3)), 0.1).eval()
    sparse_wan = sparsify_wan(dense, "0,1,1,1,1,0,1")
    big = copy.copy(dense)
    big.config = dataclasses.replace(dense.config, input_size=(8, 12))
    text = {"embeds": torch.randn(2, 3, 8), "null_embeds": torch.zeros(2, 3, 8)}
    s = VideoCompareSettings(cfg_scales=(1.0,), seeds=(0,), steps=2, batch_size=2)
    moved = compare_video_models(big, sparse_wan, s, prompt_embeds=text, progress=False)
    same = compare_video_models(dense, sparse_wan, s, prompt_embeds=text, progress=False)
    assert moved["size"]["latent_hw"] == [6, 6] and "the sparse model's size" in moved["size"]["note"]
    assert same["size"]["note"] is None and big.config.latent_hw == (8, 12)  # the caller's model keeps its config
    assert moved["results"][0]["per_seed"] == same["results"][0]["per_seed"]
    both = compare_video_models(big, sparse_wan, s, prompt_embeds=text, progress=False, image_size=64)
    assert both["size"] == {"latent_hw": [8, 8], "note": "both models sampled at 64 px (--image-size)"}
