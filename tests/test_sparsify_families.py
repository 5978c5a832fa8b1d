"""`sparsedit sparsify` on PixArt-alpha and Latte checkpoints (dispatch by model family)."""

from __future__ import annotations

import torch

import sparsedit
from sparsedit.cli import main
from sparsedit.latte import Latte, LatteConfig, SparseLatte
from sparsedit.pixart import PixArt, PixArtConfig, SparsePixArt


def test_pixart_checkpoint_sparsifies_to_sparse_pixart(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = PixArtConfig(input_size=8, hidden_size=32, depth=5, num_heads=2, caption_channels=16, null_caption_length=5)
    src = sparsedit.save_pretrained(PixArt(cfg), tmp_path / "pixart")
    out = tmp_path / "sparse"
    assert main(["sparsify", str(src), "--layout", "1,1,1,1,1,0,1", "--r-min", "0.3", "--r-max", "0.7",
                 "--out", str(out), "--verbose"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model = sparsedit.load_model(out)
    assert isinstance(model, SparsePixArt) and model.config.layout.as_string() == "1,1,1,1,1,0,1"
    assert len(lines) == len(model.state_dict()) + 1 and lines[-1].startswith("wrote SparsePixArt")
    assert main(["sparsify", str(out), "--layout", "1,1,1,1,1,0,1", "--out", str(tmp_path / "again")]) == 2
    assert "already a SparsePixArt" in capsys.readouterr().err


def test_latte_checkpoint_sparsifies_to_sparse_latte(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = LatteConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=8, num_heads=2, num_frames=4,
                      num_classes=3)
    src = sparsedit.save_pretrained(Latte(cfg), tmp_path / "latte")
    out = tmp_path / "sparse"
    assert main(["sparsify", str(src), "--layout", "2,1,2,0,2,0,2", "--r-min", "0.5", "--r-max", "0.8",
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote SparseLatte") and "f," in line + ","
    assert isinstance(sparsedit.load_model(out), SparseLatte)
    assert main(["sparsify", str(src), "--layout", "2,1,2,0,2,0,2", "--num-pieces", "3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not supported for Latte" in capsys.readouterr().err
