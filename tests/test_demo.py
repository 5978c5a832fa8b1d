"""The demo's pieces on a reduced budget (the full run is `make demo`)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import sparsedit
from sparsedit.cli import main
from sparsedit.demo import DemoSettings, run_demo
from sparsedit.dit import DiT, DiTConfig


@pytest.fixture()
def tiny_digits_dit(tmp_path):
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=12, num_heads=2,
                          num_classes=10, data_space="pixel"))
    with torch.no_grad():  # leave adaLN-Zero so the model is not the identity
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return sparsedit.save_pretrained(model, tmp_path / "dit")


def small_settings(out) -> DemoSettings:
    return DemoSettings(out=str(out), finetune_steps=3, batch_size=8, samples_per_class=2, sample_steps=5,
                        timing_repeats=1)


def test_demo_writes_complete_report(tmp_path, tiny_digits_dit):
    report = run_demo(small_settings(tmp_path / "demo"), dit_path=tiny_digits_dit, progress=False)
    out = tmp_path / "demo"
    saved = json.loads((out / "report.json").read_text())
    assert saved["sparse_layout"] == "1,2,1,2,1,1,1"
    for model in ("dit", "sparsedit"):
        assert saved["gmacs_per_forward"][model] > 0
        assert 0 <= saved["quality"][model]["class_accuracy"] <= 1
        assert saved["quality"][model]["num_samples"] == 20
        assert saved["quality"][model]["fid_digits_cnn"] >= 0
    # r in [0.44, 0.75] on an 8x8 token grid: 6x6 .. 4x4, cheaper than the dense model.
    assert saved["gmacs_per_forward"]["sparsedit"] < saved["gmacs_per_forward"]["dit"]
    assert saved["flops_ratio"] == pytest.approx(
        saved["gmacs_per_forward"]["dit"] / saved["gmacs_per_forward"]["sparsedit"])
    assert {tuple(g) for g in saved["grids"]} <= {(6, 6), (5, 5), (4, 4)}
    assert saved["throughput"]["speedup"] > 0 and len(saved["throughput"]["seconds"]["dit"]) == 1
    assert report["settings"] == saved["settings"]
    md = (out / "report.md").read_text()
    assert "FID (digits-CNN features)" in md and "sparsedit demo" in md and "finetune_steps" in md
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + 10 * 18, 2 + 2 * 18)  # 10 classes x (DiT row, SparseDiT row), 16 px + 2 px padding
    # The fine-tuned SparseDiT is a loadable checkpoint.
    assert type(sparsedit.load_model(out / "finetune" / "model")).__name__ == "SparseDiT"


def test_demo_cli_refuses_to_clobber(tmp_path, tiny_digits_dit, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    args = ["demo", "--out", str(out), "--dit", str(tiny_digits_dit), "--finetune-steps", "2", "--no-progress"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
