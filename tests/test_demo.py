"""The demo's pieces on a reduced budget (the full run is `make demo`)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import sparsedit
from sparsedit.cli import main
from sparsedit.eval.demo import DemoSettings, run_demo
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.train.trainer import DEFAULT_RECIPE

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def tiny_digits_dit(tmp_path):
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=12, num_heads=2,
                          num_classes=10, data_space="pixel"))
    with torch.no_grad():  # leave adaLN-Zero so the model is not the identity
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return sparsedit.save_pretrained(model, tmp_path / "dit")


def small_settings(out, **kw) -> DemoSettings:
    base = dict(out=str(out), finetune_steps=3, batch_size=8, num_samples=20, seeds=(0, 1), sample_steps=3,
                per_class=1, image_scale=1, threads=1)
    return DemoSettings(**{**base, **kw})


def test_demo_writes_complete_report(tmp_path, tiny_digits_dit):
    report = run_demo(small_settings(tmp_path / "demo"), dit_path=tiny_digits_dit, progress=False)
    out = tmp_path / "demo"
    saved = json.loads((out / "report.json").read_text())
    assert json.loads(json.dumps(report["settings"])) == saved["settings"] and saved["recipe"]["name"] == DEFAULT_RECIPE
    c = saved["comparison"]
    assert c["names"] == {"a": "DiT", "b": "SparseDiT"} and c["models"]["b"]["class"] == "SparseDiT"
    assert [r["cfg_scale"] for r in c["results"]] == [1.0, 1.5, 4.0]
    for r in c["results"]:
        assert len(r["per_seed"]["a"]) == len(r["per_seed"]["b"]) == 2  # two seeds
        assert r["fid_ratio"]["std"] is not None and len(r["a"]["per_class"]) == 10
    assert c["floor"]["available"] and c["floor"]["num_images"] == 20
    # r in [0.44, 0.75] on an 8x8 token grid: the SparseDiT is cheaper than its DiT
    assert c["cost"]["flops_ratio_a_over_b"] > 1.3
    run = json.loads((out / "finetune" / "run.json").read_text())
    assert run["settings"]["min_snr_gamma"] == 5.0 and run["recipe"] == DEFAULT_RECIPE == "min-snr"
    md = (out / "report.md").read_text()
    for text in ("FID (digits-CNN features)", "real floor", "min-snr", "sparsedit demo report", "FLOPs ratio",
                 "finetune_steps"):
        assert text in md, text
    assert "quality" not in md.lower().replace("docs/quality.md", "")
    for scale in ("1", "1.5", "4"):
        assert Image.open(out / f"paired_cfg{scale}.png").size[0] > 2 * 16
    assert type(sparsedit.load_model(out / "finetune" / "model")).__name__ == "SparseDiT"


def test_demo_distill_recipe_uses_the_dit_as_teacher(tmp_path, tiny_digits_dit):
    run_demo(small_settings(tmp_path / "demo", recipe="distill", cfg_scales=(1.0,)), dit_path=tiny_digits_dit,
             progress=False)
    run = json.loads((tmp_path / "demo" / "finetune" / "run.json").read_text())
    assert run["settings"]["distill_weight"] == 1.0 and run["teacher"]["model"]["model_type"] == "DiT"


def test_demo_cli_twice_and_never_clobbers_other_files(tmp_path, tiny_digits_dit, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--dit", str(tiny_digits_dit), "--finetune-steps", "2", "--batch-size", "8",
            "--num-samples", "10", "--seeds", "0", "1", "--cfg-scales", "1", "--sample-steps", "2", "--per-class", "1",
            "--no-progress", "--overwrite"]
    assert main(args) == 0
    assert main(args) == 0  # `make demo` twice in a row
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seeds"] == [0, 1] and report["settings"]["threads"] >= 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert main([*args[:2], str(other), *args[3:]]) == 2
    assert "not empty and holds no demo report" in capsys.readouterr().err
    assert (other / "mine.txt").read_text() == "keep"
    assert main([*args[:-1]]) == 2  # a report is there, and no --overwrite
    assert "already holds a demo report" in capsys.readouterr().err
    assert main([*args, "--recipe", "nope"]) == 2
    assert "unknown --recipe 'nope'" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")  # --overwrite replaces the folder whole: never with the user's files in it
    assert main(args) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    (out / "notes.txt").unlink()


def test_a_demo_that_fails_half_way_keeps_the_earlier_report(tmp_path, tiny_digits_dit, monkeypatch, capsys):
    import sparsedit.eval.demo as demo_module

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--dit", str(tiny_digits_dit), "--finetune-steps", "2", "--batch-size", "8",
            "--num-samples", "10", "--seeds", "0", "--cfg-scales", "1", "--sample-steps", "2", "--per-class", "1",
            "--no-progress", "--overwrite"]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "compare_models", interrupted)  # after the fine-tune, before the report
    assert main(args) == 130
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden directory left behind


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--sampler", "bogus", "unknown sampler 'bogus'"),
    ("--cfg-scales", "0", "argument --cfg-scales: must be > 0"),  # refused by the parser itself
    ("--num-samples", "1", "--num-samples must be >= 2"),
])
def test_demo_refuses_bad_settings_before_fine_tuning(tmp_path, tiny_digits_dit, capsys, flag, value, words):
    """A setting only the comparison uses is checked before minutes of fine-tuning, not after them."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--dit", str(tiny_digits_dit), "--finetune-steps", "2", "--batch-size", "8",
            "--no-progress", flag, value]
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not out.exists()
