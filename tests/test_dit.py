"""Tests for the DiT model and for loading official DiT checkpoints.

The official-format parity tests compare against ``reference_dit`` below: an independent functional
re-statement of the published DiT forward pass (facebookresearch/DiT ``models.py``) that reads the
official state-dict keys directly and computes everything another way (``F.conv2d`` patchify, an
explicit softmax(QK^T / sqrt(d)) V attention, hand-written LayerNorm / GELU(tanh) / SiLU, a numpy
float64 sin-cos table built with ``np.meshgrid`` as in MAE's ``get_2d_sincos_pos_embed`` and a manual
unpatchify). Random non-zero weights everywhere (adaLN and final layer included) keep it sensitive.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.nn import functional as F

import sparsedit
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.dit.model import DIT_PRESETS, DiT, DiTConfig, dit_config

pytestmark = pytest.mark.usefixtures("single_thread")

# Tiny official-layout model: hidden 384 is DiT-S's width, so the loader can infer 6 heads.
HIDDEN, HEADS, DEPTH, PATCH, IN_CH, CLASSES = 384, 6, 2, 2, 4, 10
IMAGE = 64  # px -> latent 8 -> 4 x 4 tokens
LATENT = IMAGE // 8
TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------


def numpy_sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE-style 2-D sin-cos table in float64, (grid_h * grid_w, dim), generalised to H != W."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))  # w first
    grid = np.stack(grid, axis=0)  # (2, H, W): [0] column index, [1] row index
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def _linear(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def reference_dit(sd: dict[str, Tensor], x: Tensor, t: Tensor, y: Tensor, num_heads: int) -> Tensor:
    """The official DiT forward, computed from an official state dict. x: (B, C, H, W)."""
    w = sd["x_embedder.proj.weight"]
    d, _, p, _ = w.shape
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p)  # (B, D, gh, gw)
    b, _, gh, gw = h.shape
    h = h.reshape(b, d, gh * gw).permute(0, 2, 1)  # row-major tokens
    h = h + torch.from_numpy(numpy_sincos_2d(d, gh, gw)).float()[None]

    half = 128  # 256 frequency channels
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    c = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", t_freq)))
    c = c + sd["y_embedder.embedding_table.weight"][y]
    sc = _silu(c)

    hd = d // num_heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = _linear(sd, pre + "adaLN_modulation.1", sc).split(d, dim=1)
        a = _layer_norm(h) * (1 + scale1[:, None]) + shift1[:, None]
        qkv = _linear(sd, pre + "attn.qkv", a).reshape(b, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, hd)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = att.permute(0, 2, 1, 3).reshape(b, -1, d)
        h = h + gate1[:, None] * _linear(sd, pre + "attn.proj", att)
        m = _layer_norm(h) * (1 + scale2[:, None]) + shift2[:, None]
        h = h + gate2[:, None] * _linear(sd, pre + "mlp.fc2", _gelu_tanh(_linear(sd, pre + "mlp.fc1", m)))

    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", sc).split(d, dim=1)
    out = _linear(sd, "final_layer.linear", _layer_norm(h) * (1 + scale[:, None]) + shift[:, None])
    c_out = out.shape[-1] // (p * p)
    out = out.reshape(b, gh, gw, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return out.reshape(b, c_out, gh * p, gw * p)


def official_state(
    seed: int, hidden: int = HIDDEN, depth: int = DEPTH, grid: tuple[int, int] = (LATENT // PATCH,) * 2,
    learn_sigma: bool = True,
) -> dict[str, Tensor]:
    """Random official-layout state dict; every tensor non-zero, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    d, p = hidden, PATCH
    c_out = 2 * IN_CH if learn_sigma else IN_CH

    def lin(name: str, n_out: int, n_in: int, gain: float = 1.0) -> dict[str, Tensor]:
        return {
            f"{name}.weight": torch.randn(n_out, n_in, generator=g) * gain / math.sqrt(n_in),
            f"{name}.bias": torch.randn(n_out, generator=g) * 0.1,
        }

    sd: dict[str, Tensor] = {
        "pos_embed": torch.from_numpy(numpy_sincos_2d(d, *grid)).float()[None],
        "x_embedder.proj.weight": torch.randn(d, IN_CH, p, p, generator=g) / math.sqrt(IN_CH * p * p),
        "x_embedder.proj.bias": torch.randn(d, generator=g) * 0.1,
        "y_embedder.embedding_table.weight": torch.randn(CLASSES + 1, d, generator=g),
        **lin("t_embedder.mlp.0", d, 256),
        **lin("t_embedder.mlp.2", d, d),
        **lin("final_layer.adaLN_modulation.1", 2 * d, d, 0.5),
        **lin("final_layer.linear", p * p * c_out, d),
    }
    for i in range(depth):
        pre = f"blocks.{i}."
        sd.update(lin(pre + "attn.qkv", 3 * d, d))
        sd.update(lin(pre + "attn.proj", d, d))
        sd.update(lin(pre + "mlp.fc1", 4 * d, d))
        sd.update(lin(pre + "mlp.fc2", d, 4 * d))
        sd.update(lin(pre + "adaLN_modulation.1", 6 * d, d, 0.5))
    return sd


def inputs(batch: int = 3, hw: tuple[int, int] = (LATENT, LATENT)) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(batch, IN_CH, *hw)
    t = torch.tensor([0.0, 37.5, 999.0, 500.0][:batch])
    y = torch.tensor([0, CLASSES - 1, CLASSES, 3][:batch])  # CLASSES = the null label
    return x, t, y


def max_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def load_official_weights(model: DiT, sd: dict[str, Tensor]) -> DiT:
    model.load_state_dict({k: v for k, v in sd.items() if k != "pos_embed"}, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# 1. official format: load_model vs the reference
# ------------------------------------------------------------------------------------------------


def test_reference_table_matches_mae_layout():
    # Guards the reference itself: first half of the channels encodes the column, second the row.
    table = numpy_sincos_2d(8, 2, 3)
    token = 1 * 3 + 2  # row 1, column 2
    assert np.allclose(table[token, :2], np.sin([2.0, 2.0 / 100]))
    assert np.allclose(table[token, 4:6], np.sin([1.0, 1.0 / 100]))


@torch.no_grad()
def test_official_bare_pt_matches_reference(tmp_path):
    sd = official_state(seed=1)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(sd, path)
    model = sparsedit.load_model(path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.patch_size) == (HIDDEN, HEADS, DEPTH, PATCH)
    assert (cfg.input_size, cfg.num_classes, cfg.learn_sigma, cfg.t_freq_shift) == (LATENT, CLASSES, True, 0.0)
    assert not model.training

    x, t, y = inputs()
    ref = reference_dit(sd, x, t, y, HEADS)
    out = model(x, t, y)
    assert out.shape == (3, 2 * IN_CH, LATENT, LATENT)
    assert max_err(out, ref) < TOL
    assert ref.abs().max() > 0.1  # a non-trivial output, so the tolerance means something

    # The tolerance is tight enough to see diffusers' timestep-frequency shift.
    shifted = load_official_weights(DiT(dataclass_replace(cfg, t_freq_shift=1.0)), sd)
    assert max_err(shifted(x, t, y), ref) > 100 * TOL


def dataclass_replace(cfg: DiTConfig, **changes) -> DiTConfig:
    data = cfg.to_dict()
    data.pop("model_type")
    data.update(changes)
    return DiTConfig(**data)


@torch.no_grad()
def test_official_training_dict_picks_ema_by_default(tmp_path):
    sd_model, sd_ema = official_state(seed=2), official_state(seed=3)
    path = tmp_path / "0050000.pt"
    args = argparse.Namespace(model="DiT-S/2", image_size=IMAGE, num_classes=CLASSES)
    torch.save({"model": sd_model, "ema": sd_ema, "opt": {}, "args": args}, path)
    x, t, y = inputs()
    ref_ema, ref_model = reference_dit(sd_ema, x, t, y, HEADS), reference_dit(sd_model, x, t, y, HEADS)
    assert max_err(ref_ema, ref_model) > 1e-2

    assert max_err(sparsedit.load_model(path)(x, t, y), ref_ema) < TOL
    assert max_err(sparsedit.load_model(path, use_ema=False)(x, t, y), ref_model) < TOL


@torch.no_grad()
def test_official_safetensors_with_and_without_pos_embed(tmp_path):
    sd = official_state(seed=4, learn_sigma=False)
    x, t, y = inputs()
    ref = reference_dit(sd, x, t, y, HEADS)

    path = tmp_path / "dit.safetensors"
    save_file(sd, str(path))
    model = sparsedit.load_model(path)
    assert model.config.learn_sigma is False
    assert model(x, t, y).shape == (3, IN_CH, LATENT, LATENT)
    assert max_err(model(x, t, y), ref) < TOL

    bare = tmp_path / "no_pos.safetensors"
    save_file({k: v for k, v in sd.items() if k != "pos_embed"}, str(bare))
    with pytest.raises(CheckpointError, match="image-size"):
        sparsedit.load_model(bare)
    assert max_err(sparsedit.load_model(bare, image_size=IMAGE)(x, t, y), ref) < TOL


def test_official_heads_cannot_be_inferred_for_unknown_width(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(official_state(seed=5, hidden=64), path)
    with pytest.raises(CheckpointError, match="hidden size 64 is not a released DiT width") as err:
        sparsedit.load_model(path)
    assert "\n" not in str(err.value)


def test_official_preset_that_does_not_fit_is_refused(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(official_state(seed=6), path)  # width of DiT-S but depth 2
    with pytest.raises(CheckpointError, match="not DiT-S/2"):
        sparsedit.load_model(path, model="DiT-S/2")
    with pytest.raises(CheckpointError, match="not DiT-B/2"):
        sparsedit.load_model(path, model="DiT-B/2")


def test_official_nonstandard_pos_embed_is_refused(tmp_path):
    sd = official_state(seed=7)
    sd["pos_embed"] = sd["pos_embed"] + 0.01
    path = tmp_path / "bad_pos.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="pos_embed"):
        sparsedit.load_model(path)


# ------------------------------------------------------------------------------------------------
# 4. model: presets, shapes, non-square inputs, position embedding
# ------------------------------------------------------------------------------------------------

PAPER_SIZES = {"DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16)}
PAPER_PARAMS_M = {"DiT-S": 33, "DiT-B": 130, "DiT-L": 458, "DiT-XL": 675}  # DiT paper Table 1 / README


def meta_param_count(preset: str, image_size: int = 256) -> tuple[int, int]:
    with torch.device("meta"):
        model = DiT(dit_config(preset, image_size))
    return sum(p.numel() for p in model.parameters()), model.pos_embed.numel()


def test_presets_have_paper_sizes():
    assert sorted(DIT_PRESETS) == sorted(f"{s}/{p}" for s in PAPER_SIZES for p in (2, 4, 8))
    for preset in DIT_PRESETS:
        size, patch = preset.split("/")
        cfg = dit_config(preset, 512)
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == PAPER_SIZES[size]
        assert (cfg.patch_size, cfg.input_size, cfg.in_channels, cfg.num_classes) == (int(patch), 64, 4, 1000)
        assert cfg.learn_sigma and cfg.out_channels == 8
        assert cfg.mlp_ratio == 4.0 and cfg.class_dropout_prob == 0.1


def test_dit_xl2_parameter_count_matches_release():
    params, pos = meta_param_count("DiT-XL/2")
    # The release keeps pos_embed as a frozen nn.Parameter, so its 675,129,632 counts the table too.
    assert params + pos == 675_129_632
    assert abs(params - 675_129_632) / 675_129_632 < 0.005
    for size, millions in PAPER_PARAMS_M.items():
        params, _ = meta_param_count(f"{size}/2")
        assert round(params / 1e6) == millions, size


def test_unknown_preset_is_refused():
    with pytest.raises(SparseditError, match="unknown DiT preset"):
        dit_config("DiT-XXL/2")
    with pytest.raises(SparseditError, match="unknown DiT preset"):
        dit_config("DiT-S/3")


def tiny_config(**overrides) -> DiTConfig:
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    kw.update(overrides)
    return DiTConfig(**kw)


@torch.no_grad()
def test_output_shapes(randomize):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    assert DiT(tiny_config()).eval()(x, t, y).shape == (2, 8, 8, 8)
    assert DiT(tiny_config(learn_sigma=False)).eval()(x, t, y).shape == (2, 4, 8, 8)
    # A scalar timestep is broadcast over the batch.
    model = randomize(DiT(tiny_config())).eval()
    assert torch.equal(model(x, torch.tensor(3.0), y), model(x, torch.tensor([3.0, 3.0]), y))
    with pytest.raises(SparseditError, match="does not fit"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(SparseditError, match="not divisible by patch size"):
        tiny_config(input_size=9)


def token_sincos(dim: int, row: int, col: int) -> list[float]:
    """One token's sin-cos embedding written out by hand: [sin/cos of column | sin/cos of row]."""
    q = dim // 4
    omega = [1.0 / 10000 ** (k / q) for k in range(q)]

    def part(pos: int) -> list[float]:
        return [math.sin(pos * o) for o in omega] + [math.cos(pos * o) for o in omega]

    return part(col) + part(row)


def test_position_embedding_is_row_major_on_non_square_grids():
    model = DiT(tiny_config(input_size=(4, 8)))  # grid 2 x 4
    assert model.config.grid == (2, 4)
    table = model.pos_embed[0]
    assert table.shape == (8, 32)
    for row in range(2):
        for col in range(4):
            expect = torch.tensor(token_sincos(32, row, col))
            assert torch.allclose(table[row * 4 + col], expect, atol=1e-6), (row, col)

    square = DiT(tiny_config())  # grid 4 x 4
    tall = square.position_embedding((4, 2))
    assert tall.shape == (1, 8, 32)
    assert torch.allclose(tall[0, 2], torch.tensor(token_sincos(32, 1, 0)), atol=1e-6)
    assert not torch.allclose(tall, square.pos_embed[:, :8])  # token 2 is (1, 0), not (0, 2)
    assert not torch.allclose(tall, table[None])
    assert torch.allclose(
        square.position_embedding((3, 5))[0], torch.from_numpy(numpy_sincos_2d(32, 3, 5)).float(), atol=1e-6
    )


@torch.no_grad()
def test_non_square_inputs_match_reference():
    sd = official_state(seed=8, grid=(2, 4))
    x, t, y = inputs(hw=(4, 8))
    ref = reference_dit(sd, x, t, y, HEADS)
    cfg = DiTConfig(input_size=(4, 8), patch_size=PATCH, hidden_size=HIDDEN, depth=DEPTH, num_heads=HEADS,
                    num_classes=CLASSES)
    rect = load_official_weights(DiT(cfg), sd)
    assert rect(x, t, y).shape == (3, 2 * IN_CH, 4, 8)
    assert max_err(rect(x, t, y), ref) < TOL
    # A square model given a non-square latent computes that grid's table on the fly.
    square = load_official_weights(DiT(dataclass_replace(cfg, input_size=LATENT)), sd)
    assert max_err(square(x, t, y), ref) < TOL
    x_wide, _, _ = inputs(hw=(6, 2))
    assert max_err(square(x_wide, t, y), reference_dit(sd, x_wide, t, y, HEADS)) < TOL


# ------------------------------------------------------------------------------------------------
# 4. classifier-free guidance and label dropout
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def guided_model(randomize):
    return randomize(DiT(tiny_config(depth=1))).eval()


def cfg_batch():
    half = torch.randn(2, 4, 8, 8)
    x = torch.cat([half, torch.randn(2, 4, 8, 8)])  # the second half of x must be ignored
    t = torch.tensor([10.0, 10.0, 10.0, 10.0])
    y = torch.tensor([3, 7, 10, 10])  # conditional labels, then the null class
    plain = torch.cat([half, half])
    return x, t, y, plain


@torch.no_grad()
def test_cfg_first3_guides_only_three_eps_channels(guided_model):
    x, t, y, plain_x = cfg_batch()
    plain = guided_model(plain_x, t, y)
    cond, uncond = plain[:2], plain[2:]
    out = guided_model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    assert out.shape == plain.shape
    expect = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    assert torch.allclose(out[:2, :3], expect, atol=1e-5)
    assert (out[:2, :3] - cond[:, :3]).abs().amax(dim=(0, 2, 3)).min() > 1e-3  # each guided channel moved
    assert torch.equal(out[:2, 3:], cond[:, 3:])  # eps channel 3 and all learned-sigma channels: conditional
    assert torch.equal(out[:2, :3], out[2:, :3])  # guided eps written to both halves
    # Like the official forward_with_cfg, the null half keeps its own unguided channels.
    assert torch.equal(out[2:, 3:], uncond[:, 3:])


@torch.no_grad()
def test_cfg_all_guides_every_eps_channel(guided_model):
    x, t, y, plain_x = cfg_batch()
    plain = guided_model(plain_x, t, y)
    cond, uncond = plain[:2], plain[2:]
    out = guided_model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_mode="all")
    assert torch.allclose(out[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)
    assert (out[:2, 3] - cond[:, 3]).abs().max() > 1e-3
    assert torch.equal(out[:2, 4:], cond[:, 4:])  # learned sigma stays conditional
    assert torch.equal(out[:2, :4], out[2:, :4])


@torch.no_grad()
def test_cfg_scale_one_is_the_conditional_output(guided_model):
    x, t, y, plain_x = cfg_batch()
    cond = guided_model(plain_x, t, y)[:2]
    for mode in ("first3", "all"):
        out = guided_model.forward_with_cfg(x, t, y, cfg_scale=1.0, cfg_mode=mode)
        assert torch.allclose(out[:2], cond, atol=1e-6)
    with pytest.raises(SparseditError, match="unknown cfg mode"):
        guided_model.forward_with_cfg(x, t, y, 4.0, cfg_mode="half")


@torch.no_grad()
def test_label_dropout_only_in_train_mode():
    model = DiT(tiny_config(class_dropout_prob=0.5))
    emb = model.y_embedder
    assert emb.embedding_table.weight.shape[0] == 11  # null class appended as row num_classes
    labels = torch.arange(2000) % 10
    table = emb.embedding_table.weight

    model.eval()
    assert torch.equal(emb(labels), table[labels])
    model.train()
    out = emb(labels)
    dropped = (out == table[10]).all(dim=1)
    kept = (out == table[labels]).all(dim=1)
    assert 0.4 < dropped.float().mean() < 0.6
    assert bool((dropped | kept).all())

    model.eval()
    force = torch.tensor([True, False])
    assert torch.equal(emb(torch.tensor([4, 4]), force_drop=force), table[torch.tensor([10, 4])])


@torch.no_grad()
def test_full_dropout_in_training_equals_null_label(randomize):
    model = randomize(DiT(tiny_config(class_dropout_prob=1.0)))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 6.0])
    model.train()
    trained = model(x, t, torch.tensor([1, 2]))
    model.eval()
    assert torch.allclose(trained, model(x, t, torch.tensor([10, 10])), atol=1e-6)
    assert not torch.allclose(trained, model(x, t, torch.tensor([1, 2])), atol=1e-4)
    assert DiT(tiny_config(class_dropout_prob=0.0)).y_embedder.embedding_table.weight.shape[0] == 10
