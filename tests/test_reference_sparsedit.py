"""Parity with the SparseDiT authors' own ``models.py`` (https://github.com/changsn/SparseDiT; optional).

CI skips this test: it needs their code. To run it, put their ``models.py`` and ``vision_transformer.py``
in one directory and point ``SPARSEDIT_AUTHORS_MODELS`` at the former::

    mkdir -p /tmp/authors && cd SparseDiT
    git show HEAD:models.py > /tmp/authors/models.py
    git show HEAD:vision_transformer.py > /tmp/authors/vision_transformer.py
    SPARSEDIT_AUTHORS_MODELS=/tmp/authors/models.py pytest -q -s tests/test_reference_sparsedit.py

Their ``vision_transformer.py`` imports timm, and timm needs torchvision, which does not import beside
a CPU-only torch. Without a working timm this test registers a stand-in ``timm`` holding the pieces their
classes use: ``PatchEmbed`` (a strided convolution, tokens flattened row-major), ``Mlp`` (fc1, activation,
fc2), ``DropPath`` (identity in eval) and ``use_fused_attn``, written from timm's documentation; every
other name is an inert placeholder that the classes ``models.py`` uses never call. Their ``Attention``,
``CrossAttention``, ``PoolingAttention`` and every block of ``models.py`` run as written.

Their models get random weights (their own init zeroes the adaLN and output layers, which would make
any two models agree). ``-s`` prints the numbers the issue quotes: the error of the authors' variant
(``recovery_pos_embed=False``, ``extra_recovery="repeat"``) in fp32 and fp64, and how far the paper's
variant (the position table re-added at recovery) is from their code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import sparsedit
from sparsedit.families.dit.authors import sparse_dit_from_authors
from sparsedit.families.dit.sparse import SparseDiT

MODELS_PY = os.environ.get("SPARSEDIT_AUTHORS_MODELS")
_TIMM_MODULES = ("timm", "timm.data", "timm.layers", "timm.models", "timm.models._builder",
                 "timm.models._manipulate", "timm.models._registry")


# ------------------------------------------------------------------------------------------------
# a stand-in for the few timm pieces their classes use
# ------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """timm's PatchEmbed as their DiT uses it: ``proj`` conv with stride p, (B, C, H, W) -> (B, H*W/p^2, D)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True) -> None:
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> act -> dropout -> fc2 -> dropout (dropout 0 in their models)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Any = nn.GELU, drop: float = 0.0, **_: Any) -> None:
        super().__init__()
        hidden, out = hidden_features or in_features, out_features or in_features
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden), act_layer(), nn.Linear(hidden, out)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth; the identity in eval mode (their models build it only for drop_path > 0)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x


def _placeholder(*_: Any, **__: Any) -> Any:
    raise AssertionError("a timm piece the stand-in does not provide was called")


def _stub_module(name: str, names: dict[str, Any]) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(names)
    module.__getattr__ = lambda attr: _placeholder  # PEP 562: any other imported name is inert
    return module


@contextlib.contextmanager
def _timm() -> Iterator[None]:
    """The real timm when it imports, else the stand-in, registered in sys.modules for the import only."""
    try:
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken timm (torchvision) is the usual case here
        layers = {"PatchEmbed": PatchEmbed, "Mlp": Mlp, "DropPath": DropPath, "use_fused_attn": lambda: True,
                  "trunc_normal_": nn.init.trunc_normal_, "LayerType": Any}
        saved = {name: sys.modules.get(name) for name in _TIMM_MODULES}
        sys.modules.update({name: _stub_module(name, layers if name == "timm.layers" else {})
                            for name in _TIMM_MODULES})
        try:
            yield
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    else:
        yield


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def authors() -> Iterator[types.ModuleType]:
    """Their models.py, importing their vision_transformer.py from the same directory."""
    if not MODELS_PY or not Path(MODELS_PY).is_file():
        pytest.skip("set SPARSEDIT_AUTHORS_MODELS to github.com/changsn/SparseDiT's models.py to run this check")
    vit = Path(MODELS_PY).with_name("vision_transformer.py")
    if not vit.is_file():
        pytest.skip(f"their models.py imports vision_transformer.py, which is not beside it ({vit})")
    before = sys.modules.get("vision_transformer")
    with _timm():
        _load("vision_transformer", vit)
        models = _load("sparsedit_authors_models", Path(MODELS_PY))
    yield models
    sys.modules.pop("sparsedit_authors_models", None)
    if before is None:
        sys.modules.pop("vision_transformer", None)
    else:
        sys.modules["vision_transformer"] = before


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomized(ref: nn.Module, std: float) -> nn.Module:
    for key, p in ref.named_parameters():
        if key != "pos_embed":  # their fixed sin-cos table (a frozen parameter)
            p.normal_(0.0, std)
    ref.longshortcut = False  # their forward reads it; their __init__ never sets it
    return ref.eval()


def inputs(latent: int, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(4, 4, latent, latent)
    return x, torch.tensor([999, 600, 250, 0]), torch.tensor([1, classes, 3, classes - 1])


def err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


@contextlib.contextmanager
def float64(ref: nn.Module) -> Iterator[None]:
    """Run their model in fp64: their uniform attention builds its ``ones`` in the default dtype, and their
    timestep features are float32 (cast to the weights' dtype, as our TimestepEmbedder does)."""
    features = ref.t_embedder.timestep_embedding
    ref.t_embedder.timestep_embedding = lambda t, dim, max_period=10000: features(t, dim, max_period).double()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
        del ref.t_embedder.timestep_embedding


# ------------------------------------------------------------------------------------------------
# a checkpoint written as their train.py writes it (acceptance)
# ------------------------------------------------------------------------------------------------


def test_their_train_py_checkpoint_reproduces_forward_and_cfg(authors: types.ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    layout = dict(num_poolingformer=1, num_dumbbell=2, num_normal_block=1, semantic_size=2, dumbbell_group=[1, 2, 1, 1])
    model = randomized(authors.DiT_models["DiT-S/2"](input_size=8, num_classes=1000, **layout), 0.05)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model.train()
    x, t, y = inputs(8, 1000)
    model(x, t, y).square().mean().backward()
    opt.step()  # a real optimizer state, as in their checkpoints
    args = argparse.Namespace(
        feature_path="features", results_dir="results", model="DiT-S/2", image_size=64, num_classes=1000, epochs=1,
        global_batch_size=4, lr=1e-4, global_seed=0, vae="ema", num_workers=0, log_every=1, ckpt_every=1,
        use_checkpoint=False, prefix="", attn_relat_pos=None, temp=1.0, pretrained="", drop_path=0.0, **layout,
    )
    path = tmp_path / "0000001.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    ours = sparsedit.load_model(path)
    assert isinstance(ours, SparseDiT) and ours.config.num_heads == 6
    with torch.no_grad():
        expected, got = ema(x, t, y), ours(x, t, y)
        cfg_expected, cfg_got = ema.forward_with_cfg(x, t, y, 4.0), ours.forward_with_cfg(x, t, y, 4.0)
    scale = expected.abs().max().item()
    print(f"\ntrain.py checkpoint, DiT-S/2 (1,2,[1,2,1,1],1), 4x4 -> 2x2, fp32: forward max|err| {err(got, expected):.2e}, "
          f"forward_with_cfg {err(cfg_got, cfg_expected):.2e} (output scale {scale:.2f})")
    assert err(got, expected) < 1e-4 * scale
    assert err(cfg_got, cfg_expected) < 1e-4 * cfg_expected.abs().max().item()


# ------------------------------------------------------------------------------------------------
# the variant switches against their code (the numbers)
# ------------------------------------------------------------------------------------------------

CASES = [
    # their constructor arguments: (P, K, dumbbell_group, T), latent size, semantic size
    pytest.param((2, 4, [1, 3, 1, 1], 2), 32, 8, id="XL-layout-16to8"),
    pytest.param((1, 2, [2, 2, 1, 1], 1), 32, 8, id="g2"),
    pytest.param((1, 2, [1, 2, 2, 1], 1), 32, 8, id="r2"),
    pytest.param((2, 4, [1, 3, 1, 1], 2), 32, 6, id="16to6-uneven"),
    pytest.param((1, 2, [1, 2, 1, 1], 1), 64, 8, id="32to8"),
]


@pytest.mark.parametrize(("layout", "latent", "semantic"), CASES)
def test_variant_switches_reproduce_their_code(authors: types.ModuleType, layout: tuple, latent: int,
                                               semantic: int) -> None:
    torch.manual_seed(0)
    pool, sdtm, group, top = layout
    ref = randomized(authors.DiT(input_size=latent, patch_size=2, in_channels=4, hidden_size=64, num_heads=4,
                                 depth=pool + sdtm * sum(group) + top, num_poolingformer=pool, num_dumbbell=sdtm,
                                 num_normal_block=top, semantic_size=semantic, dumbbell_group=group, num_classes=10),
                     0.02)
    theirs = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ours = sparse_dit_from_authors(theirs, "theirs", num_heads=4, semantic_size=semantic)
    paper = SparseDiT(type(ours.config)(**{k: v for k, v in ours.config.to_dict().items() if k != "model_type"}
                                        | {"recovery_pos_embed": True}))
    paper.load_state_dict(ours.state_dict())
    paper.eval()
    x, t, y = inputs(latent, 10)
    with torch.no_grad():
        expected = ref(x, t, y)
        fp32 = err(ours(x, t, y), expected)
        cfg32 = err(ours.forward_with_cfg(x, t, y, 4.0), ref.forward_with_cfg(x, t, y, 4.0))
        shipped = err(paper(x, t, y), expected)
        with float64(ref.double()):
            expected64 = ref(x.double(), t, y)
        fp64 = err(ours.double()(x.double(), t, y), expected64)
    scale = expected.abs().max().item()
    print(f"\n{layout} {latent // 2}->{semantic}: authors' variant fp32 {fp32:.1e} (cfg {cfg32:.1e}), fp64 {fp64:.1e}; "
          f"position table re-added (paper, our default) {shipped:.1e}; output scale {scale:.2f}")
    assert fp32 < 1e-4 * scale and cfg32 < 1e-4 * scale
    assert fp64 < 1e-10 * scale
    assert shipped > 1e-3 * scale
