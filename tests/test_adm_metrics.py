"""ADM-compatible scores: Fréchet distance, IS, precision/recall, npz batches, evaluate, CLI."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsedit.cli import eval as eval_cmd
from sparsedit.cli.common import Parser
from sparsedit.errors import SparseditError
from sparsedit.eval.metrics import adm
from sparsedit.eval.metrics import inception as inception_mod
from sparsedit.eval.metrics.stats import feature_stats, frechet_distance


class TinyFeatures:
    """A deterministic stand-in for InceptionV3 with small feature sizes (8 / 6 / 5)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w_pool = torch.randn(48, 8, generator=g)
        self.w_spatial = torch.randn(48, 6, generator=g)
        self.w_logits = torch.randn(8, 5, generator=g)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        pool = x @ self.w_pool
        return {"pool": pool, "spatial": x @ self.w_spatial, "logits": pool @ self.w_logits}


def _images(n: int, seed: int, lo: int = 0, hi: int = 256, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=(n, size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_identical_features_is_zero():
    feats = np.random.default_rng(1).normal(size=(200, 16))
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


# --------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_uniform_one_hot_is_k_and_identical_is_one():
    k = 7
    one_hot = np.eye(k)[np.arange(70) % k]
    mean, std = adm.inception_score(one_hot)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0)
    same = np.tile(np.random.default_rng(0).dirichlet(np.ones(k)), (50, 1))
    assert adm.inception_score(same)[0] == pytest.approx(1.0)


def test_inception_score_splits_are_consecutive_and_last_split_kept():
    # Split 1 (4 rows): one-hot over 4 classes -> 4. Split 2 (2 rows): one-hot over 2 classes -> 2.
    probs = np.zeros((6, 4))
    probs[np.arange(4), np.arange(4)] = 1
    probs[4, 0] = probs[5, 1] = 1
    mean, std = adm.inception_score(probs, split_size=4)
    assert mean == pytest.approx(3.0) and std == pytest.approx(1.0)


def test_inception_score_matches_adm_formula_on_positive_probs():
    probs = adm.softmax(np.random.default_rng(3).normal(size=(23, 10)) * 2)
    scores = []
    for i in range(0, 23, 10):  # ADM's loop, written out
        part = probs[i : i + 10]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert adm.inception_score(probs, split_size=10)[0] == pytest.approx(float(np.mean(scores)), rel=1e-12)
    with pytest.raises(SparseditError):
        adm.inception_score(-probs)


# --------------------------------------------------------------------------------------------------
# Precision / recall


def test_precision_recall_missing_cluster_by_hand():
    # Reference: clusters {0..4} and {100..104} on a line; samples cover only the first cluster.
    ref = np.concatenate([np.arange(5.0), 100 + np.arange(5.0)])[:, None]
    samples = (np.arange(5.0) + 0.5)[:, None]
    # Every sample lies within 0.5 of a reference point whose 3-NN radius is >= 2: precision 1.
    # Reference points 0..4 are 0.5 from a sample (sample radii >= 2); 100..104 are ~96 away: recall 1/2.
    assert adm.precision_recall(ref, samples, k=3) == (1.0, 0.5)
    # An outlier sample at 50: 46 from reference 4 (radius 3), so it is outside -> precision 5/6. Its own
    # radius is 47.5 (3rd nearest sample: 2.5), which reaches no reference in {100..104}: recall stays 1/2.
    with_outlier = np.concatenate([samples, [[50.0]]])
    precision, recall = adm.precision_recall(ref, with_outlier, k=3)
    assert precision == pytest.approx(5 / 6) and recall == 0.5


def test_manifold_radius_is_kth_neighbour_excluding_self():
    pts = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    radii = adm.manifold_radii(pts, k=3).numpy()
    # 3rd nearest other point: 0 -> 6, 1 -> 5 (at 6), 3 -> 3 (at 0 or 6), 6 -> 5 (at 1), 10 -> 9 (at 1)
    assert np.allclose(np.sqrt(radii), [6, 5, 3, 5, 9])
    with pytest.raises(SparseditError, match="more than 3"):
        adm.manifold_radii(pts[:3], k=3)


def _brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    cross = d2(smp, ref)
    precision = np.mean((cross <= r_ref[None, :]).any(axis=1))
    recall = np.mean((cross <= r_smp[:, None]).any(axis=0))
    return float(precision), float(recall)


def test_precision_recall_blocked_equals_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(37, 5))
    smp = rng.normal(loc=0.7, size=(29, 5))
    expected = _brute_force_pr(ref, smp, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for batch in (4, 7, 10000):
        got = adm.precision_recall(ref, smp, k=3, batch_size=batch, dtype=torch.float64)
        assert got == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------
# npz batches


def test_save_and_stream_sample_batch(tmp_path: Path):
    imgs = _images(7, 0)
    labels = np.arange(7) % 3
    out = adm.save_sample_batch(tmp_path / "s.npz", imgs, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no temp file left behind
    with np.load(out) as data:
        assert np.array_equal(data["arr_0"], imgs) and np.array_equal(data["arr_1"], labels)
    with adm.open_image_batch(out) as reader:
        assert len(reader) == 7
        batches = list(reader.batches(3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert np.array_equal(np.concatenate(batches), imgs)
    np.savez_compressed(tmp_path / "c.npz", imgs)
    with adm.open_image_batch(tmp_path / "c.npz") as reader:
        assert np.array_equal(np.concatenate(list(reader.batches(4))), imgs)


def test_batch_errors(tmp_path: Path):
    with pytest.raises(SparseditError, match="does not exist"):
        with adm.open_image_batch(tmp_path / "missing.npz"):
            pass
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SparseditError, match="not a readable"):
        with adm.open_image_batch(tmp_path / "junk.npz"):
            pass
    np.savez(tmp_path / "other.npz", images=_images(2, 0))
    with pytest.raises(SparseditError, match="no arr_0"):
        with adm.open_image_batch(tmp_path / "other.npz"):
            pass
    np.savez(tmp_path / "float.npz", _images(2, 0).astype(np.float32))
    with pytest.raises(SparseditError, match="dtype float32"):
        with adm.open_image_batch(tmp_path / "float.npz"):
            pass
    np.savez(tmp_path / "nchw.npz", _images(2, 0).transpose(0, 3, 1, 2).copy())
    with pytest.raises(SparseditError, match="shape"):
        with adm.open_image_batch(tmp_path / "nchw.npz"):
            pass
    with pytest.raises(SparseditError, match="dtype"):
        adm.save_sample_batch(tmp_path / "bad.npz", _images(2, 0).astype(np.int64))
    # A truncated arr_0 member: header promises 5 images, the payload holds fewer.
    buf = io.BytesIO()
    np.lib.format.write_array(buf, _images(5, 1))
    with zipfile.ZipFile(tmp_path / "trunc.npz", "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue()[:-500])
    with pytest.raises(SparseditError, match="truncated"):
        with adm.open_image_batch(tmp_path / "trunc.npz") as reader:
            list(reader.batches(2))


# --------------------------------------------------------------------------------------------------
# evaluate / CLI


def test_evaluate_end_to_end_with_injected_model(tmp_path: Path):
    model = TinyFeatures()
    ref_imgs, smp_imgs = _images(40, 1), _images(30, 2, lo=60, hi=256)
    ref_path = adm.save_sample_batch(tmp_path / "ref.npz", ref_imgs)
    smp_path = adm.save_sample_batch(tmp_path / "smp.npz", smp_imgs)

    same = adm.evaluate(ref_path, ref_path, model=model, batch_size=16)
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0

    res = adm.evaluate(smp_path, ref_path, model=model, batch_size=7)
    assert res["num_samples"] == 30 and res["num_ref"] == 40
    ref_f = adm.compute_features(ref_imgs, model, batch_size=64)
    smp_f = adm.compute_features(smp_imgs, model, batch_size=64)
    assert ref_f["pool"].shape == (40, 8) and ref_f["spatial"].shape == (40, 6)
    expected_fid = frechet_distance(*feature_stats(smp_f["pool"]), *feature_stats(ref_f["pool"]))
    expected_sfid = frechet_distance(*feature_stats(smp_f["spatial"]), *feature_stats(ref_f["spatial"]))
    assert res["fid"] == pytest.approx(expected_fid, rel=1e-6) and res["fid"] > 0.01
    assert res["sfid"] == pytest.approx(expected_sfid, rel=1e-6)
    assert res["inception_score"] == pytest.approx(adm.inception_score(adm.softmax(smp_f["logits"]))[0])
    assert (res["precision"], res["recall"]) == adm.precision_recall(ref_f["pool"], smp_f["pool"])

    # Statistics stored in the reference file take precedence, as in ADM's read_statistics.
    mu, sigma = feature_stats(ref_f["pool"])
    mu_s, sigma_s = feature_stats(ref_f["spatial"])
    np.savez(tmp_path / "ref_stats.npz", ref_imgs, mu=mu + 1.0, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    shifted = adm.evaluate(smp_path, tmp_path / "ref_stats.npz", model=model)
    assert shifted["fid"] == pytest.approx(
        frechet_distance(*feature_stats(smp_f["pool"]), mu + 1.0, sigma), rel=1e-6
    )
    assert shifted["sfid"] == pytest.approx(res["sfid"], rel=1e-6)


def test_evaluate_reports_bad_inputs_before_loading_weights(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(inception_mod.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ref = adm.save_sample_batch(tmp_path / "ref.npz", _images(4, 0))
    with pytest.raises(SparseditError, match="does not exist"):
        adm.evaluate(tmp_path / "nope.npz", ref)
    with pytest.raises(SparseditError, match="weights-inception-2015-12-05-6726825d.pth"):
        adm.evaluate(ref, ref)


def _run_cli(argv: list[str]) -> int:
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    eval_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_json_and_table(tmp_path: Path, monkeypatch, capsys):
    model = TinyFeatures()
    monkeypatch.setattr(inception_mod, "load_inception", lambda weights=None, device="cpu": model)
    ref = adm.save_sample_batch(tmp_path / "ref.npz", _images(20, 1))
    smp = adm.save_sample_batch(tmp_path / "smp.npz", _images(12, 2))
    assert _run_cli(["eval", "--samples", str(smp), "--ref", str(ref), "--batch-size", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "num_samples", "num_ref"
    }
    assert out["num_samples"] == 12 and out["num_ref"] == 20 and math.isfinite(out["fid"])
    assert _run_cli(["eval", "--samples", str(smp), "--ref", str(ref)]) == 0
    table = capsys.readouterr().out
    assert "sFID" in table and "Recall" in table and f"{out['fid']:.4f}" in table
    with pytest.raises(SystemExit):  # refused by the parser: one line naming --batch-size
        _run_cli(["eval", "--samples", str(smp), "--ref", str(ref), "--batch-size", "0"])
    assert "argument --batch-size: must be > 0" in capsys.readouterr().err
