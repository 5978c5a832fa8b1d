"""The SparseDiT authors' checkpoints (github.com/changsn/SparseDiT): import, export, variant switches.

State dicts are built here with their key names (``poolingformer_blocks``, ``dumbbell_blocks.{k}.
{token_merge,semantic,token_recover,normal}_blocks``, ``attn.q`` / ``attn.kv``, ``merged_layer1/2``,
``normal_blocks``) and random values. :func:`reference_forward` re-computes their model's forward from
those tensors alone, with plain tensor ops written from their code's behaviour (explicit softmax
attention, explicit adaptive-average-pool bins, index-based nearest upsampling): it shares no code with
sparsedit. ``tests/test_reference_sparsedit.py`` checks against their ``models.py`` itself (opt-in).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import sparsedit
from helpers import Exploit, one_line, run_doc_snippets
from sparsedit.cli import main
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.dit.authors import authors_state_dict, save_authors, sparse_dit_from_authors
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig

pytestmark = pytest.mark.usefixtures("single_thread")

GROUPS = ("token_merge_blocks", "semantic_blocks", "token_recover_blocks", "normal_blocks")


# ------------------------------------------------------------------------------------------------
# their state dicts, built from their key names
# ------------------------------------------------------------------------------------------------


def sincos_table(dim: int, rows: int, cols: int) -> Tensor:
    """MAE's 2-D sin-cos table (first half of the channels: column, second half: row), (rows*cols, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")

    def one(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(c), one(r)], dim=1).float()


def linear(state: dict, name: str, rows: int, cols: int, std: float) -> None:
    state[f"{name}.weight"] = torch.randn(rows, cols) * std
    state[f"{name}.bias"] = torch.randn(rows) * std


def block(state: dict, name: str, d: int, kind: str, std: float) -> None:
    """One of their blocks: DiTBlock ("dit"), PoolingformerBlock ("pool"), CrossDiTBlock ("cross") or RecoveryBlock."""
    if kind == "pool":
        linear(state, f"{name}.attn.v", d, d, std)
    elif kind in ("cross", "recovery"):
        linear(state, f"{name}.attn.q", d, d, std)
        linear(state, f"{name}.attn.kv", 2 * d, d, std)
    else:
        linear(state, f"{name}.attn.qkv", 3 * d, d, std)
    linear(state, f"{name}.attn.proj", d, d, std)
    linear(state, f"{name}.mlp.fc1", 4 * d, d, std)
    linear(state, f"{name}.mlp.fc2", d, 4 * d, std)
    linear(state, f"{name}.adaLN_modulation.1", 6 * d, d, std)
    if kind == "recovery":
        linear(state, f"{name}.merged_layer1", d, d, std)
        linear(state, f"{name}.merged_layer2", d, d, std)


def their_state(pool: int, sdtm: int, group: tuple[int, int, int, int], top: int, grid: tuple[int, int] = (8, 8),
                d: int = 32, patch: int = 2, channels: int = 4, classes: int = 10, std: float = 0.15) -> dict:
    """A state dict of their ``DiT`` (learned sigma, label dropout on) with random values."""
    state: dict[str, Tensor] = {}
    state["x_embedder.proj.weight"] = torch.randn(d, channels, patch, patch) * std
    state["x_embedder.proj.bias"] = torch.randn(d) * std
    linear(state, "t_embedder.mlp.0", d, 256, std)
    linear(state, "t_embedder.mlp.2", d, d, std)
    state["y_embedder.embedding_table.weight"] = torch.randn(classes + 1, d) * std
    state["pos_embed"] = sincos_table(d, *grid)[None]
    for j in range(pool):
        block(state, f"poolingformer_blocks.{j}", d, "pool", std)
    for k in range(sdtm):
        for part, n in zip(GROUPS, group, strict=True):
            kind = {"token_merge_blocks": "cross", "token_recover_blocks": "recovery"}.get(part, "dit")
            for j in range(n):
                block(state, f"dumbbell_blocks.{k}.{part}.{j}", d, kind, std)
    for j in range(top):
        block(state, f"normal_blocks.{j}", d, "dit", std)
    linear(state, "final_layer.linear", patch * patch * 2 * channels, d, std)
    linear(state, "final_layer.adaLN_modulation.1", 2 * d, d, std)
    return state


def train_py_args(**kw: object) -> argparse.Namespace:
    """``args`` as their train.py's parser produces it (its defaults: XL/2 at 256 px, semantic_size 8)."""
    base = dict(feature_path="features", results_dir="results", model="DiT-XL/2", image_size=256, num_classes=1000,
                epochs=1400, global_batch_size=256, lr=1e-4, global_seed=0, vae="ema", num_workers=4, log_every=100,
                ckpt_every=50_000, num_poolingformer=2, num_dumbbell=4, num_normal_block=2, semantic_size=8,
                dumbbell_group=[1, 3, 1, 1], use_checkpoint=False, prefix="", attn_relat_pos=None, temp=1.0,
                pretrained="DiT-XL-2-256x256.pt", drop_path=0.0, use_longshortcut=False)
    base.update(kw)
    return argparse.Namespace(**base)


# ------------------------------------------------------------------------------------------------
# an independent re-computation of their forward
# ------------------------------------------------------------------------------------------------


def lin(s: dict, name: str, x: Tensor) -> Tensor:
    return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]


def modulated(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    b, n, d = q.shape

    def split(z: Tensor) -> Tensor:
        return z.reshape(b, z.shape[1], heads, d // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def run_block(s: dict, name: str, kind: str, x: Tensor, c: Tensor, heads: int, context: Tensor | None = None,
              grids: tuple | None = None) -> Tensor:
    """One of their blocks on tokens ``x`` (B, n, D); ``context``: the dense tokens of a cross / recovery block."""
    d = x.shape[-1]
    shift1, scale1, gate1, shift2, scale2, gate2 = lin(s, f"{name}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
    if kind == "recovery":  # merged = W1 up(x) + W2 dense; attention: queries merged, keys/values x
        sparse_grid, dense_grid = grids
        up = upsample_nearest(x, sparse_grid, dense_grid)
        keys, x = x, lin(s, f"{name}.merged_layer1", up) + lin(s, f"{name}.merged_layer2", context)
    else:
        keys = context
    h = modulated(x, shift1, scale1)
    if kind == "pool":  # uniform attention: every token gets proj(mean over tokens of v)
        v = lin(s, f"{name}.attn.v", h)
        out = lin(s, f"{name}.attn.proj", v.mean(dim=1, keepdim=True).expand_as(v))
    elif kind == "dit":
        q, k, v = lin(s, f"{name}.attn.qkv", h).split(d, dim=-1)
        out = lin(s, f"{name}.attn.proj", attend(q, k, v, heads))
    else:
        hk = modulated(keys, shift1, scale1)
        k, v = lin(s, f"{name}.attn.kv", hk).split(d, dim=-1)
        out = lin(s, f"{name}.attn.proj", attend(lin(s, f"{name}.attn.q", h), k, v, heads))
    x = x + gate1[:, None] * out
    hidden = F.gelu(lin(s, f"{name}.mlp.fc1", modulated(x, shift2, scale2)), approximate="tanh")
    return x + gate2[:, None] * lin(s, f"{name}.mlp.fc2", hidden)


def pool_bins(x: Tensor, dense_grid: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """Adaptive average pooling by its definition: output cell i covers rows floor(i*H/h) .. ceil((i+1)*H/h)."""
    b, _, d = x.shape
    grid = x.reshape(b, *dense_grid, d)
    cells = []
    for i in range(out[0]):
        r0, r1 = (i * dense_grid[0]) // out[0], -(-((i + 1) * dense_grid[0]) // out[0])
        for j in range(out[1]):
            c0, c1 = (j * dense_grid[1]) // out[1], -(-((j + 1) * dense_grid[1]) // out[1])
            cells.append(grid[:, r0:r1, c0:c1].mean(dim=(1, 2)))
    return torch.stack(cells, dim=1)


def upsample_nearest(x: Tensor, grid: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """Nearest upsampling as torch defines it: output row i reads input row floor(i * h / H)."""
    b, _, d = x.shape
    rows = torch.arange(out[0]) * grid[0] // out[0]
    cols = torch.arange(out[1]) * grid[1] // out[1]
    return x.reshape(b, *grid, d)[:, rows][:, :, cols].reshape(b, out[0] * out[1], d)


def reference_forward(s: dict, layout: tuple, heads: int, sparse_grid: tuple[int, int], x: Tensor, t: Tensor,
                      y: Tensor) -> Tensor:
    """Their ``DiT.forward`` (eval mode) from the state dict ``s``; ``layout`` = (P, K, (g, s, r, d), T)."""
    pool, sdtm, group, top = layout
    p = s["x_embedder.proj.weight"].shape[-1]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    h = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + s["pos_embed"]
    # Their timestep features are float32 whatever the model's dtype (as in DiT).
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([args.cos(), args.sin()], dim=-1).to(x.dtype)
    c = lin(s, "t_embedder.mlp.2", F.silu(lin(s, "t_embedder.mlp.0", t_freq)))
    c = c + s["y_embedder.embedding_table.weight"][y]
    for j in range(pool):
        h = run_block(s, f"poolingformer_blocks.{j}", "pool", h, c, heads)
    for k in range(sdtm):
        dense = h
        h = pool_bins(dense, grid, sparse_grid)
        for j in range(group[0]):
            h = run_block(s, f"dumbbell_blocks.{k}.token_merge_blocks.{j}", "cross", h, c, heads, dense)
        for j in range(group[1]):
            h = run_block(s, f"dumbbell_blocks.{k}.semantic_blocks.{j}", "dit", h, c, heads)
        for j in range(group[2]):  # the 2nd.. recovery block gets dense tokens: its upsampling is the identity
            current = sparse_grid if j == 0 else grid
            h = run_block(s, f"dumbbell_blocks.{k}.token_recover_blocks.{j}", "recovery", h, c, heads, dense,
                          (current, grid))
        for j in range(group[3]):
            h = run_block(s, f"dumbbell_blocks.{k}.normal_blocks.{j}", "dit", h, c, heads)
    for j in range(top):
        h = run_block(s, f"normal_blocks.{j}", "dit", h, c, heads)
    shift, scale = lin(s, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = lin(s, "final_layer.linear", modulated(h, shift, scale))  # (B, N, p*p*C)
    b, channels = out.shape[0], out.shape[-1] // (p * p)
    out = out.reshape(b, *grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(b, channels, grid[0] * p, grid[1] * p)


def reference_cfg(s: dict, layout: tuple, heads: int, sparse_grid: tuple[int, int], x: Tensor, t: Tensor,
                  y: Tensor, scale: float) -> Tensor:
    """Their ``forward_with_cfg``: the first half of x for both halves, guidance on the first 3 channels."""
    half = x[: len(x) // 2]
    out = reference_forward(s, layout, heads, sparse_grid, torch.cat([half, half]), t, y)
    cond, uncond = out[:, :3].chunk(2)
    guided = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), out[:, 3:]], dim=1)


def read(path: Path) -> dict:
    """One of the .pt files, with their args' argparse.Namespace as the only allowed class."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def as64(state: dict) -> dict:
    return {k: v.double() for k, v in state.items()}


def inputs(grid: tuple[int, int], batch: int = 4, patch: int = 2, classes: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.randn(batch, 4, grid[0] * patch, grid[1] * patch)
    t = torch.tensor([999, 500, 250, 0][:batch])
    y = torch.tensor([1, classes, 3, 7][:batch])  # label `classes` = the null class
    return x, t, y


def max_rel(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------
# import: forward equals the re-computation
# ------------------------------------------------------------------------------------------------

CASES = [
    # (P, K, (g, s, r, d), T), dense token grid, semantic grid
    pytest.param((2, 4, (1, 3, 1, 1), 2), (16, 16), (8, 8), id="XL-layout-16to8"),
    pytest.param((2, 4, (1, 3, 1, 1), 2), (16, 16), (6, 6), id="XL-layout-16to6-uneven-bins"),
    pytest.param((1, 2, (1, 2, 1, 1), 1), (32, 32), (8, 8), id="B-layout-32to8"),
    pytest.param((1, 2, (2, 1, 1, 1), 1), (8, 8), (4, 4), id="g2"),
    pytest.param((1, 2, (1, 1, 2, 1), 1), (8, 8), (3, 3), id="r2-repeated-recovery"),
    pytest.param((0, 1, (2, 0, 3, 0), 0), (6, 6), (4, 4), id="g2-r3-no-pool-no-top"),
    pytest.param((1, 1, (1, 1, 1, 1), 1), (8, 4), (4, 2), id="non-square-8x4"),
    pytest.param((2, 0, (1, 3, 1, 1), 2), (4, 4), (2, 2), id="no-sdtm"),
]


@pytest.mark.parametrize(("layout", "grid", "sparse"), CASES)
def test_import_reproduces_their_forward(layout: tuple, grid: tuple[int, int], sparse: tuple[int, int]) -> None:
    state = their_state(*layout, grid=grid)
    model = sparse_dit_from_authors(dict(state), "theirs", num_heads=2, semantic_size=sparse)
    cfg = model.config
    assert (cfg.pool_blocks, cfg.num_sdtm, cfg.top_blocks) == (layout[0], layout[1], layout[3])
    if layout[1]:
        assert (cfg.gen_blocks, cfg.sparse_blocks, cfg.recovery_blocks, cfg.dense_blocks) == layout[2]
    assert cfg.grid == grid and cfg.r_min == cfg.r_max
    assert (cfg.recovery_pos_embed, cfg.extra_recovery) == (False, "repeat")
    x, t, y = inputs(grid)
    with torch.no_grad():
        assert all(cfg.schedule.grid(int(ti), grid) == sparse for ti in t)  # their grid at every timestep
        expected = reference_forward(as64(state), layout, 2, sparse, x.double(), t, y)
        assert max_rel(model.double()(x.double(), t, y), expected) < 1e-12
        assert max_rel(model.float()(x, t, y), expected.float()) < 1e-5
        guided = reference_cfg(as64(state), layout, 2, sparse, x.double(), t, y, 4.0)
        assert max_rel(model.double().forward_with_cfg(x.double(), t, y, 4.0), guided) < 1e-12


def test_the_paper_switch_changes_the_output_and_cross_recovery_cannot_hold_their_weights() -> None:
    """Re-adding the position table at recovery (the paper, our default) is a different function."""
    layout, grid, sparse = (1, 2, (1, 2, 2, 1), 1), (8, 8), (4, 4)
    state = their_state(*layout, grid=grid)
    theirs = sparse_dit_from_authors(dict(state), "theirs", num_heads=2, semantic_size=sparse).double()
    paper_cfg = dataclasses.replace(theirs.config, recovery_pos_embed=True)
    x, t, y = inputs(grid)
    with torch.no_grad():
        expected = reference_forward(as64(state), layout, 2, sparse, x.double(), t, y)
        paper = SparseDiT(paper_cfg).double()
        paper.load_state_dict(theirs.state_dict())
        assert max_rel(theirs(x.double(), t, y), expected) < 1e-12
        assert max_rel(paper(x.double(), t, y), expected) > 1e-3
    ours = SparseDiT(dataclasses.replace(paper_cfg, extra_recovery="cross"))
    extra = set(theirs.state_dict()) - set(ours.state_dict())
    assert extra == {f"blocks.{i}.merge_{w}.{s}" for i in (5, 11) for w in ("sparse", "dense") for s in ("weight", "bias")}


# ------------------------------------------------------------------------------------------------
# files: their train.py's training dict, bare state dicts, round trips
# ------------------------------------------------------------------------------------------------


def train_py_checkpoint(path: Path, grid: int = 4, semantic: int = 2) -> tuple[dict, dict]:
    """A file as their train.py writes it, DiT-S width (384 -> 6 heads from args.model), depth 4."""
    ema = their_state(1, 1, (1, 1, 1, 0), 0, grid=(grid, grid), d=384, classes=1000, std=0.05)
    raw = {k: v + 0.01 for k, v in ema.items() if k != "pos_embed"} | {"pos_embed": ema["pos_embed"]}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4, weight_decay=0).state_dict()
    args = train_py_args(model="DiT-S/2", image_size=grid * 2 * 8, num_poolingformer=1, num_dumbbell=1,
                         num_normal_block=0, dumbbell_group=[1, 1, 1, 0], semantic_size=semantic)
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": args}, path)
    return ema, raw


def test_their_train_py_checkpoint_loads_with_no_flags(tmp_path: Path) -> None:
    path = tmp_path / "0050000.pt"
    ema, raw = train_py_checkpoint(path)
    model = sparsedit.load_model(path)
    assert isinstance(model, SparseDiT) and not model.training
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.input_size, cfg.num_classes) == (384, 6, 4, 8, 1000)
    assert cfg.layout.as_string() == "1,1,1,1,1,0,0" and (cfg.r_min, cfg.r_max) == (0.75, 0.75)
    layout = (1, 1, (1, 1, 1, 0), 0)
    x, t, y = inputs((4, 4), classes=1000)
    with torch.no_grad():
        out = model(x, t, y)
        assert max_rel(out, reference_forward(ema, layout, 6, (2, 2), x, t, y)) < 1e-4
        guided = model.forward_with_cfg(x, t, y, 4.0)
        assert max_rel(guided, reference_cfg(ema, layout, 6, (2, 2), x, t, y, 4.0)) < 1e-4
        raw_model = sparsedit.load_model(path, use_ema=False)
        assert max_rel(raw_model(x, t, y), reference_forward(raw, layout, 6, (2, 2), x, t, y)) < 1e-4


def test_bare_state_dict_uses_semantic_size_8_unless_told(tmp_path: Path) -> None:
    state = their_state(1, 1, (1, 1, 1, 1), 1, grid=(16, 16), d=384, std=0.05)
    torch.save(state, tmp_path / "ema.pt")
    assert sparsedit.load_model(tmp_path / "ema.pt").config.schedule.grid(0, (16, 16)) == (8, 8)
    model = sparsedit.load_model(tmp_path / "ema.pt", semantic_size=4)
    assert model.config.schedule.grid(500, (16, 16)) == (4, 4) and model.config.num_heads == 6


@pytest.mark.parametrize(("layout", "grid", "sparse"), CASES)
def test_export_writes_their_exact_state_dict_and_round_trips_bit_exactly(layout: tuple, grid: tuple[int, int],
                                                                         sparse: tuple[int, int],
                                                                         tmp_path: Path) -> None:
    state = their_state(*layout, grid=grid, d=16)
    model = sparse_dit_from_authors(dict(state), "theirs", num_heads=2, semantic_size=sparse)
    if grid[0] != grid[1]:  # their code reshapes tokens by sqrt(N): a non-square model has no export
        with pytest.raises(SparseditError) as err:
            save_authors(model, tmp_path / "x.pt")
        one_line(err, "square", f"{grid[0]}x{grid[1]}")
        return
    exported = authors_state_dict(model)
    assert sorted(exported) == sorted(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)
    path = save_authors(model, tmp_path / "sparsedit.pt")
    ckpt = read(path)
    assert set(ckpt) == {"ema", "args"}
    args = ckpt["args"]
    group = list(layout[2]) if layout[1] else [0, 0, 0, 0]
    assert (args.semantic_size, args.dumbbell_group, args.num_poolingformer, args.num_heads) == (
        sparse[0], group, layout[0], 2)
    again = sparsedit.load_model(path)
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


def test_export_needs_a_new_file_path(tmp_path: Path) -> None:
    model = sparse_dit_from_authors(their_state(1, 1, (1, 1, 1, 1), 1, grid=(4, 4), d=16), "theirs", num_heads=2,
                                    semantic_size=2)
    path = save_authors(model, tmp_path / "sparsedit.pt")
    with pytest.raises(SparseditError) as err:
        save_authors(model, path)
    one_line(err, "exists", "--overwrite")
    save_authors(model, path, overwrite=True)
    with pytest.raises(SparseditError) as err:
        save_authors(model, tmp_path)
    one_line(err, "directory", ".pt")


def test_convert_cli_both_ways_and_a_timestep_range_on_top(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "0050000.pt"
    train_py_checkpoint(path)
    assert main(["convert", str(path), "--to", "sparsedit", str(tmp_path / "fixed")]) == 0
    out = capsys.readouterr().out
    assert "r in [0.75, 0.75], sparse token sets 2x2, recovery_pos_embed=false, extra_recovery=repeat" in out
    assert main(["convert", str(path), "--to", "sparsedit", str(tmp_path / "ranged"), "--r-min", "0.5",
                 "--r-max", "0.9"]) == 0
    ranged = sparsedit.load_model(tmp_path / "ranged")
    assert (ranged.config.r_min, ranged.config.r_max, ranged.config.recovery_pos_embed) == (0.5, 0.9, False)
    assert ranged.config.schedule.grid(999, (4, 4)) == (1, 1) and ranged.config.schedule.grid(0, (4, 4)) == (3, 3)
    capsys.readouterr()
    back = tmp_path / "back.pt"
    assert main(["convert", str(tmp_path / "fixed"), "--to", "official-sparsedit", str(back)]) == 0
    out = capsys.readouterr().out
    # DiT-S width at depth 4: no preset of theirs, so the command says PRESET and a note says what to build.
    assert "--model PRESET --image-size 64 --num-classes 1000 --num_poolingformer 1 --num_dumbbell 1 " \
           "--num_normal_block 0 --semantic_size 2 --dumbbell_group 1 1 1 0" in out
    assert "longshortcut" in out and "no DiT_models preset has depth 4, width 384, 6 heads" in out
    original, exported = read(path)["ema"], read(back)["ema"]
    assert sorted(original) == sorted(exported) and all(torch.equal(original[k], exported[k]) for k in original)
    assert main(["convert", str(tmp_path / "ranged"), "--to", "official-sparsedit", str(tmp_path / "x.pt")]) == 2
    assert "one fixed sparse grid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# what cannot be exported
# ------------------------------------------------------------------------------------------------


def tiny_sparse(**kw: object) -> SparseDiT:
    base = dict(input_size=16, patch_size=2, hidden_size=32, depth=6, num_heads=2, num_classes=10, pool_blocks=1,
                num_sdtm=1, gen_blocks=1, sparse_blocks=1, recovery_blocks=2, dense_blocks=0, top_blocks=1,
                r_min=0.75, r_max=0.75, recovery_pos_embed=False, extra_recovery="repeat")
    return SparseDiT(SparseDiTConfig(**{**base, **kw}))


@pytest.mark.parametrize(("kw", "words"), [
    (dict(recovery_pos_embed=True), ("recovery_pos_embed=true",)),
    (dict(extra_recovery="cross"), ("extra_recovery='cross'",)),
    (dict(r_min=0.5, r_max=0.9), ("one fixed sparse grid", "--r-min R --r-max R")),
    (dict(input_size=(16, 8)), ("square", "8x4")),
    (dict(upsample="bilinear"), ("upsample='bilinear'", "--to sparsedit")),
    (dict(t_freq_shift=1.0), ("t_freq_shift=1.0",)),
])
def test_export_refuses_what_their_code_cannot_express(kw: dict, words: tuple[str, ...], tmp_path: Path) -> None:
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(tiny_sparse(**kw), tmp_path / "x.pt", fmt="official-sparsedit")
    one_line(err, *words)
    assert not (tmp_path / "x.pt").exists()


def test_export_refuses_dense_models(tmp_path: Path) -> None:
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2)), tmp_path / "x.pt",
                             fmt="official-sparsedit")
    one_line(err, "only a SparseDiT", "DiT")


# ------------------------------------------------------------------------------------------------
# malformed and foreign checkpoints
# ------------------------------------------------------------------------------------------------


def save(tmp_path: Path, obj: object, name: str = "ckpt.pt") -> Path:
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def small_state(**kw: object) -> dict:
    return their_state(1, 1, (1, 1, 1, 1), 1, grid=(4, 4), d=384, std=0.05, **kw)


@pytest.mark.parametrize(("edit", "words"), [
    (lambda s: s.pop("dumbbell_blocks.0.token_merge_blocks.0.attn.kv.bias"), ("missing key", "attn.kv.bias")),
    (lambda s: s.update({"dumbbell_blocks.0.semantic_blocks.0.attn.lora.weight": torch.zeros(2)}),
     ("not used", "attn.lora.weight")),
    (lambda s: s.update({"relative_pos_embedder.0.relative_position_bias_table": torch.zeros(3, 6)}),
     ("attn_relat_pos", "does not implement")),
    (lambda s: s.update({"pos_embed": torch.randn(1, 16, 384)}), ("pos_embed", "sin-cos")),
    (lambda s: s.pop("pos_embed"), ("no pos_embed",)),
    (lambda s: s.update({"poolingformer_blocks.2.attn.v.weight": torch.zeros(384, 384)}), ("indices [0, 2]",)),
])
def test_malformed_state_dicts_fail_in_one_line(tmp_path: Path, edit, words: tuple[str, ...]) -> None:
    state = small_state()
    edit(state)
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(save(tmp_path, state), semantic_size=2)
    one_line(err, "ckpt.pt", *words)


@pytest.mark.parametrize(("args", "words"), [
    (dict(attn_relat_pos="sin"), ("attn_relat_pos='sin'",)),
    (dict(use_longshortcut=True), ("use_longshortcut",)),
    (dict(num_dumbbell=4), ("args.num_dumbbell is 4", "weights hold 1")),
    (dict(dumbbell_group=[1, 3, 1, 1]), ("args.dumbbell_group", "[1, 1, 1, 1]")),
    (dict(image_size=256), ("4x4", "16x16")),
    (dict(model="DiT-XL/2"), ("384", "DiT-XL/2")),
    (dict(semantic_size=6), ("semantic_size 6", "6x6", "4x4")),
    (dict(num_classes=5), ("num_classes is 5", "11 rows")),
])
def test_args_that_contradict_the_weights_or_need_missing_code_fail(tmp_path: Path, args: dict, words) -> None:
    base = dict(model="DiT-S/2", image_size=64, num_classes=10, num_poolingformer=1, num_dumbbell=1,
                num_normal_block=1, dumbbell_group=[1, 1, 1, 1], semantic_size=2)
    state = small_state()
    path = save(tmp_path, {"model": state, "ema": state, "opt": {}, "args": train_py_args(**{**base, **args})})
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(path)
    one_line(err, *words)


def test_layouts_sparsedit_cannot_build_are_named(tmp_path: Path) -> None:
    state = their_state(1, 1, (0, 2, 1, 1), 1, grid=(4, 4), d=384, std=0.05)
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(save(tmp_path, state), semantic_size=2)
    one_line(err, "no token-merge or no recovery block")
    state = their_state(0, 2, (1, 1, 1, 1), 0, grid=(4, 4), d=384, std=0.05)
    state = {k.replace("dumbbell_blocks.1.semantic_blocks.0", "dumbbell_blocks.1.normal_blocks.1"): v
             for k, v in state.items()}
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(save(tmp_path, state), semantic_size=2)
    one_line(err, "dumbbell blocks differ")


def test_unknown_width_without_args_asks_for_heads(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(save(tmp_path, their_state(1, 1, (1, 1, 1, 1), 1, grid=(4, 4))), semantic_size=2)
    one_line(err, "hidden size 32", "num_heads")


def test_foreign_checkpoints_name_what_they_hold(tmp_path: Path) -> None:
    foreign = {"encoder.layer.0.weight": torch.zeros(2), "decoder.head.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(save(tmp_path, foreign))
    one_line(err, "decoder, encoder", "poolingformer_blocks")
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(save(tmp_path, [torch.zeros(2)]))
    one_line(err, "holds a list")
    with pytest.raises(SparseditError) as err:
        sparsedit.load_model(save(tmp_path, foreign), semantic_size=2)
    one_line(err, "semantic_size", "authors'")


class NamespaceLike(argparse.Namespace):
    """Not a plain argparse.Namespace: refused like any other class."""


def test_pickles_other_than_namespace_and_tensors_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = small_state()
    for i, args in enumerate((Exploit(marker), NamespaceLike(semantic_size=2))):
        path = save(tmp_path, {"model": state, "ema": state, "args": args}, f"evil{i}.pt")
        with pytest.raises(CheckpointError) as err:
            sparsedit.load_model(path)
        one_line(err, path.name, "unsafe")
    assert not marker.exists()
    path = save(tmp_path, {"model": state, "ema": state, "args": "DiT-S/2"}, "strange.pt")
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(path)
    one_line(err, "'args' is a str")


# ------------------------------------------------------------------------------------------------
# the from-scratch initialisation gain (their train.py: xavier gain 0.5)
# ------------------------------------------------------------------------------------------------


def test_init_gain_scales_only_the_xavier_linears() -> None:
    cfg = DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    torch.manual_seed(3)
    plain = DiT(cfg)
    torch.manual_seed(3)
    half = DiT(cfg, init_gain=0.5)
    for (key, a), b in zip(plain.state_dict().items(), half.state_dict().values(), strict=True):
        scaled = key.startswith("blocks.") and key.endswith("weight") and "adaLN" not in key
        assert torch.equal(b, 0.5 * a) if scaled else torch.equal(b, a), key
    assert plain.blocks[0].attn.qkv.weight.abs().max() > 0
    with pytest.raises(SparseditError, match="gain must be > 0"):
        DiT(cfg, init_gain=0.0)


def test_train_records_the_init_gain(tmp_path: Path) -> None:
    base = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--batch-size",
            "4", "--steps", "1", "--no-progress", "--device", "cpu"]
    assert main([*base, "--init-gain", "0.5", "--run-dir", str(tmp_path / "run")]) == 0
    run = (tmp_path / "run" / "run.json").read_text()
    assert re.search(r'"init_gain": 0\.5', run)
    assert main([*base, "--init-gain", "0.5", "--init-from", str(tmp_path / "run" / "model"),
                 "--run-dir", str(tmp_path / "b")]) == 2


# ------------------------------------------------------------------------------------------------
# docs/official.md
# ------------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "official.md"


def test_doc_snippets_run_and_print_what_they_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    count, expected = run_doc_snippets(DOC)
    assert count and expected and capsys.readouterr().out.splitlines() == expected
