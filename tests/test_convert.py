"""Tests for checkpoint conversion: diffusers parity, round trips, and refusing bad input.

diffusers' own ``DiTTransformer2DModel`` forward is the reference for the diffusers format; every
parameter is re-randomised so that zero-initialised layers (adaLN-Zero, output) cannot hide errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel

import sparsedit
from helpers import Exploit, one_line, run_doc_snippets
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families.dit.convert import official_state_dict
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.loading import export_differences

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5
DIFFUSERS_TINY = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
    patch_size=2, num_embeds_ada_norm=10,
)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 250.0, 999.0])
    y = torch.tensor([0, 9, 10])  # 10: the null class
    return x, t, y


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def make_diffusers(randomize, shared: bool, **overrides) -> DiTTransformer2DModel:
    ref = randomize(DiTTransformer2DModel(**{**DIFFUSERS_TINY, **overrides})).eval()
    if shared:  # converted releases hold identical embedder copies in every block
        first = ref.transformer_blocks[0].norm1.emb.state_dict()
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return ref


@torch.no_grad()
def diffusers_out(ref: DiTTransformer2DModel, x, t, y) -> torch.Tensor:
    return ref(x, timestep=t, class_labels=y).sample


def tiny_official_model(randomize, **overrides) -> DiT:
    # Width 384 (DiT-S) so that an official file's head count can be inferred from its shapes.
    kw = dict(input_size=8, patch_size=2, hidden_size=384, depth=2, num_heads=6, num_classes=10)
    return randomize(DiT(DiTConfig(**{**kw, **overrides})), std=0.05).eval()


@pytest.fixture
def official_pt(tmp_path, randomize) -> Path:
    path = tmp_path / "DiT-tiny-64x64.pt"
    torch.save(official_state_dict(tiny_official_model(randomize)), path)
    return path


@pytest.fixture
def sparsedit_dir(tmp_path, randomize) -> Path:
    return sparsedit.save_model(randomize(DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2,
                                                         num_classes=10))), tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------------
# 2. diffusers parity
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_diffusers_shared_embedders_load_as_one(tmp_path, randomize):
    ref = make_diffusers(randomize, shared=True)
    ref.save_pretrained(tmp_path / "dit")
    model = sparsedit.load_model(tmp_path / "dit")
    cfg = model.config
    assert cfg.per_block_cond is False and len(model.block_cond) == 0
    assert cfg.t_freq_shift == 1 and cfg.mlp_norm_eps == ref.config.norm_eps == 1e-5 and cfg.norm_eps == 1e-6
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.num_classes, cfg.learn_sigma) == (32, 2, 2, 10, True)
    x, t, y = batch()
    expect = diffusers_out(ref, x, t, y)
    assert expect.abs().max() > 0.1
    assert max_err(model(x, t, y), expect) < TOL


@torch.no_grad()
def test_diffusers_per_block_embedders_and_norm_eps(tmp_path, randomize):
    ref = make_diffusers(randomize, shared=False, norm_eps=1e-2)  # a large eps makes the MLP norm eps visible
    ref.save_pretrained(tmp_path / "dit")
    model = sparsedit.load_model(tmp_path / "dit")
    assert model.config.per_block_cond is True and len(model.block_cond) == 1
    assert model.config.mlp_norm_eps == 1e-2 and model.config.t_freq_shift == 1
    x, t, y = batch()
    expect = diffusers_out(ref, x, t, y)
    assert max_err(model(x, t, y), expect) < TOL

    # Both named differences matter at this tolerance: shared conditioning or the default eps miss.
    shared = DiT(DiTConfig(**{**_fields(model.config), "per_block_cond": False}))
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("block_cond.")})
    assert max_err(shared.eval()(x, t, y), expect) > 100 * TOL
    eps = DiT(DiTConfig(**{**_fields(model.config), "mlp_norm_eps": 1e-5}))
    eps.load_state_dict(model.state_dict())
    assert max_err(eps.eval()(x, t, y), expect) > 100 * TOL


def _fields(cfg: DiTConfig) -> dict:
    data = cfg.to_dict()
    data.pop("model_type")
    return data


def test_diffusers_pipeline_directory_and_other_class(tmp_path, randomize):
    ref = make_diffusers(randomize, shared=True)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    model = sparsedit.load_model(tmp_path / "pipe")  # a DiTPipeline folder: transformer/ is used
    x, t, y = batch()
    with torch.no_grad():
        assert max_err(model(x, t, y), diffusers_out(ref, x, t, y)) < TOL

    cfg_path = tmp_path / "pipe" / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "UNet2DModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path / "pipe")
    one_line(err, "UNet2DModel", "DiTTransformer2DModel")


# ------------------------------------------------------------------------------------------------
# 3. round trips
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sparsedit_round_trip_is_bit_exact(tmp_path, randomize):
    cfg = DiTConfig(input_size=(4, 8), hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False,
                    t_freq_shift=1.0, norm_eps=1e-5, mlp_norm_eps=1e-3, per_block_cond=True,
                    class_dropout_prob=0.2)
    model = randomize(DiT(cfg)).eval()
    out = sparsedit.save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "DiT" and saved["input_size"] == [4, 8] and saved["per_block_cond"] is True

    loaded = sparsedit.load_model(out)  # no flags: config.json rebuilds everything
    assert loaded.config == cfg and loaded.config.to_dict() == cfg.to_dict()
    assert not loaded.training
    x = torch.randn(2, 4, 4, 8)
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert sparsedit.load_pretrained(out).config == cfg


@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_diffusers_export_round_trip(tmp_path, randomize, shared):
    ref = make_diffusers(randomize, shared=shared)
    ref.save_pretrained(tmp_path / "src")
    model = sparsedit.load_model(tmp_path / "src")
    assert export_differences(model.config) == []  # diffusers numerics: the export is exact

    sparsedit.save_model(model, tmp_path / "out", fmt="diffusers")
    back = DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert back.config.norm_eps == ref.config.norm_eps and back.config.out_channels == 8
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert sorted(ref_state) == sorted(back_state)
    assert all(torch.equal(ref_state[k], back_state[k]) for k in ref_state)
    x, t, y = batch()
    assert max_err(diffusers_out(back, x, t, y), model(x, t, y)) < TOL


@torch.no_grad()
def test_official_to_diffusers_reports_the_frequency_shift(tmp_path, official_pt):
    model = sparsedit.load_model(official_pt)
    notes = export_differences(model.config)
    assert len(notes) == 1 and "frequency shift" in notes[0]

    sparsedit.save_model(model, tmp_path / "diff", fmt="diffusers")
    assert json.loads((tmp_path / "diff" / "config.json").read_text())["norm_eps"] == 1e-6  # official MLP eps kept
    back = DiTTransformer2DModel.from_pretrained(tmp_path / "diff").eval()
    reloaded = sparsedit.load_model(tmp_path / "diff")
    assert reloaded.config.t_freq_shift == 1 and reloaded.config.mlp_norm_eps == 1e-6
    x, t, y = batch()
    assert max_err(diffusers_out(back, x, t, y), reloaded(x, t, y)) < TOL
    # The reported shift is real: the official numerics differ from the export's.
    assert max_err(model(x, t, y), reloaded(x, t, y)) > 100 * TOL

    # The official -> sparsedit path keeps the official numerics exactly.
    sparsedit.save_model(model, tmp_path / "sd")
    assert torch.equal(sparsedit.load_model(tmp_path / "sd")(x, t, y), model(x, t, y))


def test_convert_cli_exports_pixart_and_latte_to_diffusers(tmp_path, randomize, capsys):
    """`sparsedit convert --to diffusers` for the text families: overwrite rules, the null caption, sparse refusals."""
    from diffusers import LatteTransformer3DModel, PixArtTransformer2DModel

    from sparsedit.cli import main
    from sparsedit.families.latte.model import Latte, LatteConfig
    from sparsedit.families.latte.sparse import sparsify_latte
    from sparsedit.families.pixart.model import PixArt, PixArtConfig
    from sparsedit.families.pixart.sparse import sparsify_pixart

    pixart = randomize(PixArt(PixArtConfig(input_size=8, hidden_size=32, depth=5, num_heads=2, caption_channels=12,
                                           null_caption_length=5))).eval()
    latte = randomize(Latte(LatteConfig(input_size=8, num_frames=3, hidden_size=32, depth=4, num_heads=2,
                                        conditioning="text", caption_channels=12))).eval()
    text = torch.randn(2, 5, 12)
    for name, model, theirs_cls, x in (("pixart", pixart, PixArtTransformer2DModel, torch.randn(2, 4, 8, 8)),
                                       ("latte", latte, LatteTransformer3DModel, torch.randn(2, 4, 3, 8, 8))):
        src, out = sparsedit.save_pretrained(model, tmp_path / name), tmp_path / f"{name}-diffusers"
        convert = ["convert", str(src), "--to", "diffusers", str(out)]
        if name == "pixart":  # the original's null caption has no diffusers slot: dropped only when asked
            assert main(convert) == 2 and "--drop-null-caption" in capsys.readouterr().err
            convert.append("--drop-null-caption")
        assert main(convert) == 0
        assert "note: diffusers cannot keep this model's numerics exactly: caption padding" in capsys.readouterr().out
        assert main(convert) == 2 and "--overwrite" in capsys.readouterr().err
        assert main([*convert, "--overwrite"]) == 0
        theirs = theirs_cls.from_pretrained(out).eval()
        t = torch.tensor([999, 10])
        with torch.no_grad():
            assert max_err(theirs(x, timestep=t, encoder_hidden_states=text).sample, model(x, t, text)) < TOL
    sparse = {"SparsePixArt": sparsify_pixart(pixart, "1,1,1,1,1,0,1"), "SparseLatte": sparsify_latte(latte, "0,1,2,0,2,0,0"),
              "SparseDiT": sparsedit.sparsify(tiny_official_model(randomize, depth=5), layout="1,1,1,1,1,0,1")}
    for name, model in sparse.items():
        with pytest.raises(SparseditError) as err:
            sparsedit.save_model(model, tmp_path / "sparse", fmt="diffusers")
        one_line(err, f"a {name} has no diffusers class", "--to sparsedit")
    assert not (tmp_path / "sparse").exists()


def test_unknown_export_format(tmp_path, randomize):
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(tiny_official_model(randomize), tmp_path / "x", fmt="onnx")
    one_line(err, "onnx")


# ------------------------------------------------------------------------------------------------
# 5. bad input
# ------------------------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path / "missing.pt")
    one_line(err, "missing.pt", "does not exist")


def test_truncated_pt(tmp_path, official_pt):
    data = official_pt.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(bad)
    one_line(err, "truncated.pt", "cannot read")


@pytest.mark.parametrize(
    "content",
    [
        b"# README\n",
        b"GIF89a" + bytes(range(256)),
        pytest.param(b"hello world\n", id="text-hello"),  # torch's unpickler raises KeyError here
        pytest.param(b"just some notes\n", id="text-just"),
    ],
)
def test_random_file_is_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "notes.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(bad)
    one_line(err, "notes.pt")


def test_pickled_code_is_refused_not_executed(tmp_path, official_pt):
    marker = tmp_path / "pwned"
    state = torch.load(official_pt, weights_only=True)
    state["x_embedder.proj.weight"] = Exploit(marker)
    bad = tmp_path / "evil.pt"
    torch.save(state, bad)
    torch.save({"model": state, "args": Exploit(marker)}, tmp_path / "evil2.pt")
    for path in (bad, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError) as err:
            sparsedit.load_model(path)
        one_line(err, path.name, "unsafe")
    assert not marker.exists()


def test_extra_and_missing_keys_are_named(tmp_path, official_pt):
    state = torch.load(official_pt, weights_only=True)
    extra = {**state, "decoder.head.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path / "extra.pt")
    one_line(err, "decoder.head.weight")

    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path / "missing.pt")
    one_line(err, "blocks.1.mlp.fc2.bias")

    wrong = {**state, "blocks.0.attn.proj.bias": torch.zeros(5)}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path / "wrong.pt")
    one_line(err, "blocks.0.attn.proj.bias")


def test_wrong_image_size_for_official(official_pt):
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(official_pt, image_size=256)
    one_line(err, "64 px", "256 px", "--image-size 64")
    assert sparsedit.load_model(official_pt, image_size=64).config.input_size == 8


def test_directory_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(tmp_path / "weights")
    one_line(err, "no config.json")


def test_corrupt_config(sparsedit_dir):
    (sparsedit_dir / "config.json").write_text('{"model_type": "DiT", "depth": ')
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(sparsedit_dir)
    one_line(err, "config.json", "not valid JSON")


def test_config_with_neither_marker(sparsedit_dir):
    (sparsedit_dir / "config.json").write_text('{"depth": 2}')
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(sparsedit_dir)
    one_line(err, "model_type", "_class_name")


def test_truncated_safetensors(sparsedit_dir):
    weights = sparsedit_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(sparsedit_dir)
    one_line(err, "model.safetensors", "truncated")


def test_missing_safetensors(sparsedit_dir):
    (sparsedit_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(sparsedit_dir)
    one_line(err, "model.safetensors", "missing")


def test_unknown_config_field(sparsedit_dir):
    cfg = json.loads((sparsedit_dir / "config.json").read_text())
    cfg["sparsity_rate"] = 0.5
    (sparsedit_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        sparsedit.load_model(sparsedit_dir)
    one_line(err, "sparsity_rate")


@pytest.mark.parametrize("fmt", ["sparsedit", "diffusers"])
def test_save_refuses_non_checkpoint_directory(tmp_path, randomize, fmt):
    target = tmp_path / "thesis"
    target.mkdir()
    (target / "chapter1.tex").write_text("precious")
    model = randomize(DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10)))
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(model, target, fmt=fmt)
    one_line(err, "not empty")
    assert [p.name for p in target.iterdir()] == ["chapter1.tex"]
    assert (target / "chapter1.tex").read_text() == "precious"


def test_existing_checkpoint_needs_overwrite(sparsedit_dir, randomize):
    first = sparsedit.load_model(sparsedit_dir)
    other = randomize(DiT(first.config))
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(other, sparsedit_dir)
    one_line(err, "already holds a checkpoint", "overwrite")
    kept = sparsedit.load_model(sparsedit_dir).state_dict()
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in kept.items())

    sparsedit.save_model(other, sparsedit_dir, overwrite=True)
    replaced = sparsedit.load_model(sparsedit_dir).state_dict()
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in replaced.items())
    assert sorted(p.name for p in sparsedit_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_save_to_a_file_path_is_refused(tmp_path, randomize):
    target = tmp_path / "model.pt"
    target.write_bytes(b"x")
    with pytest.raises(SparseditError) as err:
        sparsedit.save_model(tiny_official_model(randomize), target)
    one_line(err, "looks like a file name", "directory")
    assert target.read_bytes() == b"x"


# ------------------------------------------------------------------------------------------------
# docs/checkpoints.md
# ------------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"


def test_doc_snippets_run_and_print_what_they_say(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    count, expected = run_doc_snippets(DOC)
    assert count >= 3 and expected and capsys.readouterr().out.splitlines() == expected
