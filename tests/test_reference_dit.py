"""Parity with facebookresearch/DiT's own ``models.py`` (optional: needs that file and timm).

The official model imports timm, and timm needs torchvision, which does not import beside our CPU
torch, so CI skips this test. To run it, point ``SPARSEDIT_DIT_MODELS`` at a local copy of
https://github.com/facebookresearch/DiT/blob/main/models.py in an environment with timm, e.g.::

    SPARSEDIT_DIT_MODELS=/path/to/DiT/models.py pytest -q tests/test_reference_dit.py

The official model is built at DiT-S/2 and DiT-XL/2 sizes with every parameter randomised (its own
init zeroes the adaLN and output layers, which would make any two models agree), its state dict is
saved exactly as the official training script saves ``.pt`` files, and :func:`sparsedit.load_model`
must reproduce its ``forward`` and ``forward_with_cfg``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sparsedit.loading import load_model

MODELS_PY = os.environ.get("SPARSEDIT_DIT_MODELS")


def _official() -> ModuleType:
    if not MODELS_PY or not Path(MODELS_PY).is_file():
        pytest.skip("set SPARSEDIT_DIT_MODELS to facebookresearch/DiT's models.py to run this check")
    pytest.importorskip("timm", reason="facebookresearch/DiT's models.py imports timm")
    spec = importlib.util.spec_from_file_location("official_dit_models", MODELS_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,image_size", [("DiT-S/2", 256), ("DiT-XL/2", 256), ("DiT-XL/2", 512)])
def test_official_models_py_matches_sparsedit(tmp_path: Path, name: str, image_size: int) -> None:
    official = _official()
    torch.manual_seed(0)
    ref = official.DiT_models[name](input_size=image_size // 8, num_classes=1000).eval()
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if key != "pos_embed":  # the fixed sin-cos table (a frozen parameter in models.py)
                p.normal_(0.0, 0.02)
    path = tmp_path / "official.pt"
    torch.save(ref.state_dict(), path)  # the layout of the released DiT-XL-2-256x256.pt
    ours = load_model(path, image_size=image_size).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, ours = ref.to(device), ours.to(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(4, 4, image_size // 8, image_size // 8, device=device)
    t = torch.tensor([0, 250, 500, 999], device=device)
    y = torch.tensor([1, 207, 360, 1000], device=device)  # 1000 = the null class
    with torch.no_grad():
        expected, got = ref(x, t, y), ours(x, t, y)
        scale = expected.abs().max()
        assert (got - expected).abs().max() / scale < 1e-4
        expected_cfg = ref.forward_with_cfg(x, t, y, 4.0)
        got_cfg = ours.forward_with_cfg(x, t, y, 4.0)
        assert (got_cfg - expected_cfg).abs().max() / expected_cfg.abs().max() < 1e-4
