"""``sparsedit compare``: same noise for both models, aggregation over seeds, the real floor, cache, images, CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import sparsedit
import sparsedit.eval.compare as cmp
from sparsedit import SparseditError
from sparsedit.cli import common, main
from sparsedit.eval.compare import (
    CompareSettings,
    aggregate,
    compare_models,
    floor_indices,
    paired_image,
    paired_image_size,
    paired_rmse,
    render_markdown,
    spread,
)
from sparsedit.eval.metrics.adm import save_sample_batch
from sparsedit.eval.metrics.digits import digits_score
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.train.data import DigitsDataset

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """scipy's BLAS on one thread too (compare_models does this itself; the direct scorer calls here need it)."""
    with cmp.blas_threads(1):
        yield


SMALL = CompareSettings(cfg_scales=(1.0, 3.0), seeds=(0, 1), num_samples=20, steps=3, batch_size=10, per_class=2,
                        scale=2)


def digits_dit(seed: int = 0) -> DiT:
    """A 12-layer hidden-32 DiT on 16x16 single-channel digits, nudged off its identity-like init."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=12, num_heads=2,
                          num_classes=10, data_space="pixel"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def dit() -> DiT:
    return digits_dit()


@pytest.fixture(scope="module")
def sparse(dit: DiT) -> nn.Module:
    return sparsedit.sparsify(dit, layout="SparseDiT-B/2", r_min=0.44, r_max=0.75).eval()


@pytest.fixture(scope="module")
def ckpts(dit: DiT, sparse: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return sparsedit.save_pretrained(dit, root / "dit"), sparsedit.save_pretrained(sparse, root / "sparse")


class Recorder(nn.Module):
    """Wraps a model; records the noisy input and labels of every call and counts the calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), y.clone()))
        return self.inner(x, t, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_mode: str = "first3") -> torch.Tensor:
        self.calls.append((x.clone(), y.clone()))
        return self.inner.forward_with_cfg(x, t, y, cfg_scale, cfg_mode)


def run(a: nn.Module, b: nn.Module, settings: CompareSettings = SMALL, **kw) -> dict:
    return compare_models(a, b, settings, progress=False, **kw)


def numbers(report: dict) -> list:
    return [(r["per_seed"], r["fid_ratio"], r["accuracy_gap_points"]) for r in report["results"]]


# --------------------------------------------------------------------------------------------------
# Honesty rules


def test_identical_models_tie_exactly_and_runs_repeat(dit: DiT, sparse: nn.Module) -> None:
    report = run(dit, copy.deepcopy(dit))
    for r in report["results"]:
        assert r["fid_ratio"]["per_seed"] == [1.0, 1.0] and r["fid_ratio"]["std"] == 0.0
        assert r["a"]["accuracy"] == r["b"]["accuracy"]
        assert r["accuracy_gap_points"]["per_seed"] == [0.0, 0.0]
        assert r["a"]["per_class"] == r["b"]["per_class"] and len(r["a"]["per_class"]) == 10
        assert r["verdict"] == "same FID on every seed; same accuracy"
        assert r["paired_rmse"]["per_seed"] == [0.0, 0.0]  # B reproduces A's samples exactly
    assert [r["cfg_scale"] for r in report["results"]] == [1.0, 3.0]
    json.dumps(report)  # JSON-able as returned
    first, second = run(dit, sparse), run(dit, sparse)
    assert numbers(first) == numbers(second)
    assert first["results"][0]["fid_ratio"]["per_seed"] != [1.0, 1.0]
    assert all(v > 0 for r in first["results"] for v in r["paired_rmse"]["per_seed"])


def test_paired_rmse_by_hand(dit: DiT) -> None:
    a, b = torch.randn(6, 1, 16, 16) * 2, torch.randn(6, 1, 16, 16)
    by_hand = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean().sqrt().item()  # pixels are clamped to [-1, 1]
    assert paired_rmse(dit, a, b) == pytest.approx(by_hand, rel=1e-6)


def test_both_models_get_the_same_noise_and_labels(dit: DiT, sparse: nn.Module) -> None:
    a, b = Recorder(dit), Recorder(sparse)
    run(a, b)
    steps = SMALL.steps
    # 2 scales x 2 seeds x 2 chunks, `steps` model calls per chunk; the first call of a chunk sees its noise.
    assert len(a.calls) == len(b.calls) == 2 * 2 * 2 * steps
    starts_a, starts_b = a.calls[::steps], b.calls[::steps]
    for (xa, ya), (xb, yb) in zip(starts_a, starts_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(starts_a[0][1], torch.arange(10))  # label(i) = i % 10
    assert not torch.equal(starts_a[0][0], starts_a[1][0])  # chunks get different noise
    assert not torch.equal(a.calls[1][0], b.calls[1][0])  # ... and the models then differ
    guided = a.calls[2 * 2 * steps]  # first chunk at CFG 3: doubled batch, second half the null class
    assert guided[0].shape[0] == 20 and torch.equal(guided[1][10:], torch.full((10,), 10))


def test_b_can_sample_with_its_own_sampler(dit: DiT, sparse: nn.Module) -> None:
    """The paper's Table 5 question: the DiT at many DDPM steps vs the SparseDiT at few DDIM steps."""
    a, b = Recorder(dit), Recorder(sparse)
    settings = CompareSettings(cfg_scales=(1.0,), seeds=(0, 1), num_samples=20, batch_size=10, sampler="ddpm",
                               steps=6, sampler_b="ddim", steps_b=3, per_class=1, scale=1)
    report = run(a, b, settings)
    assert len(a.calls) == 2 * 2 * 6 and len(b.calls) == 2 * 2 * 3
    for (xa, ya), (xb, yb) in zip(a.calls[::6], b.calls[::3], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same x_T and labels per chunk
    cost = report["cost"]
    assert cost["timesteps"] == "A: 6 ddpm steps of 1000; B: 3 ddim steps of 1000"
    assert cost["run_flops_ratio_a_over_b"] == pytest.approx(
        6 * cost["gmacs_per_forward"]["a"] / (3 * cost["gmacs_per_forward"]["b"]))
    assert "A samples with ddpm 6 steps, B with ddim 3 steps" in render_markdown(report)


def test_a_worse_model_b_gives_ratio_above_one() -> None:
    a = sparsedit.load_model(Path(sparsedit.__file__).parent / "assets" / "digits_dit")
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    settings = CompareSettings(cfg_scales=(1.0,), seeds=(0, 1), num_samples=30, steps=5, batch_size=30)
    r = run(a, b, settings)["results"][0]
    assert min(r["fid_ratio"]["per_seed"]) > 1.5
    assert r["verdict"].startswith("B worse than A beyond the seed spread")


def test_floor_is_distinct_train_images_scored_against_the_test_split() -> None:
    for n in (20, 2000):
        idx = floor_indices(0, 1438, n)
        assert len(idx) == min(n, 1438) == len(set(idx.tolist())) and idx.min() >= 0 and idx.max() < 1438
    assert not np.array_equal(floor_indices(0, 1438, 20), floor_indices(1, 1438, 20))
    assert np.array_equal(floor_indices(1, 1438, 20), floor_indices(1, 1438, 20))
    scorer = cmp.DigitsScorer(16, 10)
    floor = cmp._floor(scorer, CompareSettings(num_samples=40, seeds=(0, 1)))
    assert floor["num_images"] == 40 and not floor["capped"] and floor["pool_size"] == 1438
    train, test = DigitsDataset("train", resolution=16), DigitsDataset("test", resolution=16)
    for row in floor["per_seed"]:
        idx = floor_indices(row["seed"], 1438, 40)
        same = digits_score(train.images[idx], train.labels[idx], reference=test.images)
        assert row["fid"] == pytest.approx(same["fid_digits_cnn"], rel=1e-9)
        assert row["accuracy"] == same["class_accuracy"]
    assert floor["fid"]["mean"] == pytest.approx(statistics.fmean(r["fid"] for r in floor["per_seed"]))
    capped = cmp._floor(scorer, CompareSettings(num_samples=2000, seeds=(0, 1)))
    assert capped["num_images"] == 1438 and capped["capped"] and capped["fid"]["std"] == 0.0


# --------------------------------------------------------------------------------------------------
# Aggregation (pure)


def test_aggregate_against_hand_computation() -> None:
    a = [{"seed": s, "fid": f, "accuracy": acc, "per_class": pc}
         for s, f, acc, pc in ((0, 100.0, 0.9, [1.0, None]), (1, 110.0, 0.8, [0.5, 0.5]), (2, 120.0, 0.7, [0.0, 1.0]))]
    b = [{"seed": s, "fid": f, "accuracy": acc, "per_class": [0.5, 0.5]}
         for s, f, acc in ((0, 110.0, 0.85), (1, 121.0, 0.8), (2, 150.0, 0.6))]
    out = aggregate(a, b)
    assert out["a"]["fid"] == {"per_seed": [100.0, 110.0, 120.0], "mean": 110.0, "std": 10.0}
    assert out["b"]["accuracy"]["mean"] == pytest.approx(0.75)
    assert out["b"]["accuracy"]["std"] == pytest.approx(((0.1**2 + 0.05**2 + 0.15**2) / 2) ** 0.5)
    # Ratios per seed, then summarised: 1.1, 1.1, 1.25 -> mean 1.15, std sqrt(0.015 / 2).
    assert out["fid_ratio"]["per_seed"] == pytest.approx([1.1, 1.1, 1.25])
    assert out["fid_ratio"]["mean"] == pytest.approx(1.15) and out["fid_ratio"]["std"] == pytest.approx(0.0075**0.5)
    # Gaps in points: -5, 0, -10 -> mean -5, std 5.
    assert out["accuracy_gap_points"]["per_seed"] == pytest.approx([-5.0, 0.0, -10.0])
    assert out["accuracy_gap_points"]["mean"] == pytest.approx(-5.0)
    assert out["accuracy_gap_points"]["std"] == pytest.approx(5.0)
    assert out["a"]["per_class"] == [0.5, pytest.approx(0.75)]  # a missing class is left out of its mean
    assert out["verdict"] == "no FID difference resolved at this N (|ratio-1| < 2 std); no accuracy difference resolved"
    clear = aggregate([{"fid": 100.0, "accuracy": 0.9}, {"fid": 102.0, "accuracy": 0.9}],
                      [{"fid": 150.0, "accuracy": 0.5}, {"fid": 150.0, "accuracy": 0.6}])
    assert clear["verdict"] == "B worse than A beyond the seed spread (FID); B less accurate beyond the spread"
    better = aggregate([{"fid": 100.0}, {"fid": 100.0}], [{"fid": 50.0}, {"fid": 52.0}])
    assert better["accuracy_gap_points"] is None and better["verdict"].startswith("B better than A")
    one = aggregate([{"fid": 1.0}], [{"fid": 2.0}])
    assert one["fid_ratio"]["std"] is None and one["verdict"].startswith("one seed")
    assert spread([3.0]) == {"per_seed": [3.0], "mean": 3.0, "std": None}


# --------------------------------------------------------------------------------------------------
# Paired image, cache, report text


def test_paired_image_size_and_content() -> None:
    images = torch.rand(20, 1, 16, 16) * 2 - 1
    labels = np.arange(20) % 10
    arr = paired_image(images, -images, labels, per_class=2, scale=3, header=["title", "A = x  B = y"])
    # 10 class rows x 2 pairs of 48 px images: width 64 + 2 * (2 * 48 + 2) + 3 * 8, height 44 + 10 * 48 + 11 * 8.
    assert arr.shape == (*paired_image_size(10, 2, 16, 16, 3), 3) == (612, 284, 3) and arr.dtype == np.uint8
    y0, x0 = cmp.HEADER_H + cmp.PAIR_SEP, cmp.LABEL_W + cmp.PAIR_SEP  # first pair of class 0: sample 0
    gray = ((images[0, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(arr[y0 : y0 + 48, x0 : x0 + 48, 0], gray.repeat(3, 0).repeat(3, 1))
    xb = x0 + 48 + cmp.PAIR_GAP
    assert np.array_equal(arr[y0 : y0 + 48 : 3, xb : xb + 48 : 3, 1], 255 - gray)


def test_cache_hit_then_miss_on_changed_settings(dit: DiT, sparse: nn.Module, tmp_path: Path) -> None:
    a, b = Recorder(dit), Recorder(sparse)
    first = run(a, b, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("samples_*.safetensors"))) == 2 * 2 * 2  # models x scales x seeds
    a.calls.clear(), b.calls.clear()
    second = run(a, b, cache_dir=tmp_path / "cache")
    assert a.calls == [] and b.calls == []  # nothing sampled
    assert numbers(second) == numbers(first) and second["timing"]["cached_sets"] == {"a": 4, "b": 4}
    # The cached samples are the model's; scored with digits_score against the test split they give the same FID.
    key = cmp.cache_key(a, SMALL.spec(1.0, 0), cmp.weights_sha256(a), torch.device("cpu"))
    samples = cmp.load_cached(cmp.cache_path(tmp_path / "cache", key), key)
    assert samples is not None and samples.shape == (20, 1, 16, 16) and samples.dtype == torch.float32
    same = digits_score(samples.clamp(-1, 1), torch.arange(20) % 10, reference=DigitsDataset("test").images)
    assert first["results"][0]["a"]["fid"]["per_seed"][0] == pytest.approx(same["fid_digits_cnn"], rel=1e-9)
    changed = dataclasses.replace(SMALL, steps=2, cfg_scales=(1.0,))
    run(a, b, changed, cache_dir=tmp_path / "cache")
    assert len(a.calls) == len(b.calls) == 2 * 2 * 2  # 2 seeds x 2 chunks x 2 steps: sampled again


def test_markdown_shows_every_scale_and_never_says_quality(dit: DiT, sparse: nn.Module) -> None:
    report = run(dit, sparse, cache_dir=None)
    md = render_markdown(report)
    assert "quality" not in md.lower()
    assert "| 1 (no guidance) |" in md and "| 3 |" in md and "real floor (20 real images per seed)" in md
    assert "not ImageNet FID" in md and "held-out test split" in md and "N = **20 samples per model" in md
    assert "## Per-class accuracy" in md and "FLOPs ratio A/B" in md
    cost, gmacs = report["cost"], report["cost"]["gmacs_per_forward"]
    assert cost["flops_ratio_a_over_b"] == pytest.approx(gmacs["a"] / gmacs["b"]) and gmacs["a"] > gmacs["b"]
    assert set(report["environment"]) >= {"python", "torch", "threads", "device"}


def test_refusals(dit: DiT) -> None:
    other = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, data_space="pixel"))
    with pytest.raises(SparseditError, match="input sizes differ"):
        run(dit, other)
    no_null = copy.deepcopy(dit)
    no_null.config = copy.copy(dit.config)
    no_null.config.class_dropout_prob = 0.0
    with pytest.raises(SparseditError, match="model B was trained without a null class.*--cfg-scales 1"):
        run(dit, no_null)
    with pytest.raises(SparseditError, match="seeds"):
        CompareSettings(seeds=(0, 0))
    with pytest.raises(SparseditError, match="num-samples"):
        CompareSettings(num_samples=1)
    with pytest.raises(SparseditError, match="drop --vae"):
        run(dit, dit, ref="ref.npz")


def test_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert common.default_threads() == 8
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert common.default_threads() == 5
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert common.default_threads() == 1


# --------------------------------------------------------------------------------------------------
# CLI


def cli_args(ckpts: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["compare", str(ckpts[0]), str(ckpts[1]), "--out", str(out), "--cfg-scales", "1", "2", "--seeds", "0", "1",
            "--num-samples", "20", "--steps", "2", "--batch-size", "10", "--per-class", "2", "--scale", "2",
            "--threads", "1", "--device", "cpu", "--no-progress", *extra]


def test_cli_writes_outputs_and_never_clobbers(ckpts: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(cli_args(ckpts, out)) == 0
    printed = capsys.readouterr().out
    assert "| CFG scale | FID A |" in printed and "real floor" in printed
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "paired_cfg1.png",
                                                     "paired_cfg2.png"]
    report = json.loads((out / "compare.json").read_text())
    assert report["names"] == {"a": "dit", "b": "sparse"} and report["settings"]["num_samples"] == 20
    assert Image.open(out / "paired_cfg2.png").size[::-1] == paired_image_size(10, 2, 16, 16, 2)
    (out / "mine.txt").write_text("keep")
    (out / "paired_cfg_mine.png").write_text("keep")  # not a name compare writes
    assert main(cli_args(ckpts, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    assert (out / "mine.txt").read_text() == "keep"
    assert main(cli_args(ckpts, out, "--overwrite", "--cfg-scales", "1", "--names", "X", "Y")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "mine.txt", "paired_cfg1.png",
                                                     "paired_cfg_mine.png"]  # paired_cfg2.png of the last run: gone
    assert json.loads((out / "compare.json").read_text())["names"] == {"a": "X", "b": "Y"}


def test_cli_mismatched_models_one_line_exit_2(ckpts: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    three = DiT(DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                          num_classes=3, data_space="pixel"))
    other = sparsedit.save_pretrained(three, tmp_path / "three")
    assert main(cli_args((ckpts[0], other), tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsedit compare: error: the models' class counts differ")


# --------------------------------------------------------------------------------------------------
# ADM path (latent models, stand-in Inception)


class StandInInception:
    """Small deterministic features in place of InceptionV3: 'pool' 6-d, 'spatial' 4-d, 'logits' 5-d."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.proj = torch.randn(3 * 16, 15, generator=g)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.adaptive_avg_pool2d(images.float() / 127.5 - 1, 4).flatten(1) @ self.proj  # (B, 15)
        return {"pool": z[:, :6], "spatial": z[:, 6:10], "logits": z[:, 10:]}


def latent_dit(seed: int) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=3, data_space="latent"))
    return model.eval()


@pytest.fixture(scope="module")
def latent_pair() -> tuple[DiT, DiT]:
    a = latent_dit(0)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return a, b


def test_adm_path_with_stand_in_inception(latent_pair: tuple[DiT, DiT], tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4).eval()
    rng = np.random.default_rng(0)
    ref = save_sample_batch(tmp_path / "ref.npz", rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    real = save_sample_batch(tmp_path / "real.npz", rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    settings = CompareSettings(cfg_scales=(1.0, 2.0), seeds=(0, 1), num_samples=12, steps=2, batch_size=6,
                               per_class=1, scale=1)
    a, b = latent_pair
    report = run(a, b, settings, vae=vae, ref=ref, real=real, feature_model=StandInInception(), out=tmp_path / "o")
    assert report["scorer"] == "adm" and report["reference"]["num_images"] == 30
    for r in report["results"]:
        assert set(r["a"]) == {"fid", "sfid", "inception_score", "precision", "recall"}
        assert r["accuracy_gap_points"] is None and len(r["fid_ratio"]["per_seed"]) == 2
    assert report["floor"]["num_images"] == 12 and report["floor"]["pool_size"] == 16
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "sFID A" in md and "real floor (12 real images per seed)" in md and "quality" not in md.lower()
    assert Image.open(tmp_path / "o" / "paired_cfg2.png").size[::-1] == paired_image_size(3, 1, 8, 8, 1)
    same = run(a, copy.deepcopy(a), settings, vae=vae, ref=ref, feature_model=StandInInception())
    assert all(r["fid_ratio"]["per_seed"] == [1.0, 1.0] for r in same["results"])
    assert not same["floor"]["available"] and "--real" in same["floor"]["note"]
    with pytest.raises(SparseditError, match="needs --vae"):
        run(a, b, settings, ref=ref, feature_model=StandInInception())


def test_adm_cli_names_the_missing_file(latent_pair: tuple[DiT, DiT], tmp_path: Path, capsys,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSEDIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    a = sparsedit.save_pretrained(latent_pair[0], tmp_path / "a")
    b = sparsedit.save_pretrained(latent_pair[1], tmp_path / "b")
    base = ["compare", str(a), str(b), "--cfg-scales", "1", "--num-samples", "4", "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --ref REF.npz" in err and "docs/metrics.md" in err
    ref = save_sample_batch(tmp_path / "ref.npz", np.zeros((4, 8, 8, 3), dtype=np.uint8))
    assert main([*base, "--out", str(tmp_path / "o2"), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights-inception-2015-12-05-6726825d.pth" in err and "download" in err
    assert main([*base, "--out", str(tmp_path / "o3"), "--ref", str(tmp_path / "nope.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
