"""`sparsedit sparsify` on PixArt-alpha and Latte checkpoints (dispatch by model family)."""

from __future__ import annotations

import torch

import sparsedit
from sparsedit.cli import main
from sparsedit.families.latte.model import Latte, LatteConfig
from sparsedit.families.latte.sparse import SparseLatte
from sparsedit.families.pixart.model import PixArt, PixArtConfig
from sparsedit.families.pixart.sparse import SparsePixArt


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


def test_sample_pixart_from_prompt_embeddings_and_latte_as_a_strip(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    pix = PixArt(PixArtConfig(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, caption_channels=16,
                              null_caption_length=5, data_space="pixel"))
    src = sparsedit.save_pretrained(pix, tmp_path / "pixart")
    assert main(["sample", "--ckpt", str(src), "--steps", "2", "--out", str(tmp_path / "p.png"), "--no-progress"]) == 2
    assert "--prompt-embeds" in capsys.readouterr().err
    save_file({"prompt_embeds": torch.randn(3, 5, 16), "prompt_mask": torch.ones(3, 5)}, str(tmp_path / "emb.st"))
    assert main(["sample", "--ckpt", str(src), "--prompt-embeds", str(tmp_path / "emb.st"), "--steps", "2",
                 "--out", str(tmp_path / "p.png"), "--no-progress"]) == 0
    assert np.asarray(Image.open(tmp_path / "p.png")).shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # 3 images, 2x2 grid

    lat = Latte(LatteConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                            num_frames=4, num_classes=3, data_space="pixel"))
    src = sparsedit.save_pretrained(lat, tmp_path / "latte")
    assert main(["sample", "--ckpt", str(src), "--class-labels", "0", "2", "--steps", "2", "--cfg-scale", "1",
                 "--out", str(tmp_path / "v.png"), "--no-progress"]) == 0
    assert "2 videos" in capsys.readouterr().out
    assert np.asarray(Image.open(tmp_path / "v.png")).shape == (2 + 2 * 10, 2 + 4 * 10, 3)  # a row of 4 frames each
