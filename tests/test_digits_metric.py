"""Tests for sparsedit.eval.metrics.digits: the shipped digits CNN and the FID (digits-CNN features) score."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from sparsedit.errors import SparseditError
from sparsedit.eval.metrics.digits import (
    DigitsClassifier,
    digits_score,
    load_digits_classifier,
    train_digits_classifier,
)
from sparsedit.train.data import DigitsDataset, load_digits_array

# Small convolutions: one intra-op thread is faster (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clf() -> DigitsClassifier:
    return load_digits_classifier()


@pytest.fixture(scope="module")
def heldout16() -> DigitsDataset:
    return DigitsDataset("test", resolution=16)


@pytest.fixture(scope="module")
def train16() -> DigitsDataset:
    return DigitsDataset("train", resolution=16)


def _accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.logits(x).argmax(1) == y).float().mean())


def test_shipped_weights_are_package_data() -> None:
    base = resources.files("sparsedit") / "assets" / "digits_cnn"
    assert (base / "model.safetensors").is_file()
    config = json.loads((base / "config.json").read_text())
    assert config["resolution"] == 16 and 64 <= config["feature_dim"] <= 128
    assert config["training"]["test_accuracy"] >= 0.97
    assert "python -m sparsedit.eval.metrics.digits train" in (base / "TRAINING.md").read_text()


def test_shipped_classifier_accuracy(clf: DigitsClassifier, heldout16: DigitsDataset) -> None:
    assert not clf.training
    assert _accuracy(clf, heldout16.images, heldout16.labels) >= 0.95


def test_classifier_shapes_resolutions_and_channels(clf: DigitsClassifier, heldout16: DigitsDataset) -> None:
    x = heldout16.images[:32]
    with torch.no_grad():
        f = clf.features(x)
        assert f.shape == (32, clf.feature_dim) and clf.logits(x).shape == (32, 10)
        # 3 channels -> mean over channels: repeated gray gives the same features.
        torch.testing.assert_close(clf.features(x.repeat(1, 3, 1, 1)), f)
        # A 32 px input is resized to the configured 16 px before the network sees it.
        x32 = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        down = torch.nn.functional.interpolate(x32, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(clf.features(x32), clf.features(down))
    test32 = DigitsDataset("test", resolution=32, channels=3)
    assert _accuracy(clf, test32.images, test32.labels) >= 0.95
    with pytest.raises(SparseditError, match=r"H, W >= 8"):
        clf.features(torch.zeros(2, 1, 4, 4))
    with pytest.raises(SparseditError, match=r"\(N, 1\|3, H, W\)"):
        clf.logits(torch.zeros(2, 2, 16, 16))


def test_score_real_vs_noise(clf: DigitsClassifier, heldout16: DigitsDataset, train16: DigitsDataset) -> None:
    real = digits_score(heldout16.images, heldout16.labels, reference=train16.images, classifier=clf)
    assert real["num_samples"] == 359
    assert real["class_accuracy"] >= 0.95
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(heldout16.images.shape, generator=gen) * 2 - 1
    noisy = digits_score(noise, None, reference=train16.images, classifier=clf)
    assert "class_accuracy" not in noisy and noisy["num_samples"] == 359
    assert 0 < real["fid_digits_cnn"] < 0.1 * noisy["fid_digits_cnn"]


def test_score_of_set_against_itself_is_zero(clf: DigitsClassifier, train16: DigitsDataset) -> None:
    gen = torch.Generator().manual_seed(0)
    shuffled = train16.labels[torch.randperm(len(train16), generator=gen)]
    same = digits_score(train16.images, shuffled, reference=train16.images, classifier=clf)
    assert abs(same["fid_digits_cnn"]) < 1e-4
    assert 0.05 < same["class_accuracy"] < 0.15  # shuffled labels: chance level


def test_default_reference_is_whole_set_at_sample_resolution(clf: DigitsClassifier) -> None:
    test32 = DigitsDataset("test", resolution=32)
    default = digits_score(test32.images, test32.labels, classifier=clf)
    explicit = digits_score(test32.images, test32.labels, reference=load_digits_array(32)[0], classifier=clf)
    assert default["fid_digits_cnn"] == pytest.approx(explicit["fid_digits_cnn"], rel=1e-6)
    assert default["class_accuracy"] >= 0.95


def test_score_input_errors(clf: DigitsClassifier, heldout16: DigitsDataset) -> None:
    with pytest.raises(SparseditError, match="at least 2 samples"):
        digits_score(heldout16.images[:1], None, classifier=clf)
    with pytest.raises(SparseditError, match=r"samples must be an \(N, 1\|3, H, W\) tensor"):
        digits_score(heldout16.images[:, 0], None, classifier=clf)
    with pytest.raises(SparseditError, match=r"labels must have shape \(10,\)"):
        digits_score(heldout16.images[:10], heldout16.labels[:9], classifier=clf)


def test_train_and_load_round_trip(tmp_path: Path) -> None:
    config = train_digits_classifier(tmp_path / "cnn", resolution=8, epochs=2, seed=0)
    files = sorted(p.name for p in (tmp_path / "cnn").iterdir())
    assert files == ["TRAINING.md", "config.json", "model.safetensors"]
    assert config["resolution"] == 8 and config["training"]["seed"] == 0
    assert "--resolution 8 --epochs 2 --seed 0" in (tmp_path / "cnn" / "TRAINING.md").read_text()
    model = load_digits_classifier(tmp_path / "cnn")
    same = load_digits_classifier(tmp_path / "cnn" / "model.safetensors")
    test8 = DigitsDataset("test", resolution=8)
    acc = _accuracy(model, test8.images, test8.labels)
    assert acc == pytest.approx(config["training"]["test_accuracy"], abs=1e-4)
    assert acc > 0.3  # two short epochs already beat chance (0.1) clearly
    assert _accuracy(same, test8.images, test8.labels) == acc
    # The resolution is a config field: 16 px inputs are resized to 8 px.
    assert model.features(DigitsDataset("test", resolution=16).images[:4]).shape == (4, 128)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SparseditError, match="does not exist"):
        load_digits_classifier(tmp_path / "nope")
    (tmp_path / "w").mkdir()
    with pytest.raises(SparseditError, match=r"model\.safetensors.*is missing"):
        load_digits_classifier(tmp_path / "w")
    base = resources.files("sparsedit") / "assets" / "digits_cnn"
    (tmp_path / "w" / "config.json").write_text((base / "config.json").read_text())
    (tmp_path / "w" / "model.safetensors").write_bytes(b"garbage" * 8)
    with pytest.raises(SparseditError, match="cannot load the digits classifier"):
        load_digits_classifier(tmp_path / "w")
