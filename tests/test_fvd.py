"""FVD: the I3D's weight layout and shapes, loading and refusals, preprocessing, statistics, the distance and the CLI."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from helpers import Exploit, one_line
from sparsedit.cli import eval as eval_cmd
from sparsedit.cli.common import Parser
from sparsedit.errors import SparseditError
from sparsedit.eval.metrics import fvd as fvd_mod
from sparsedit.eval.metrics import i3d as i3d_mod
from sparsedit.eval.metrics.stats import feature_stats

pytestmark = pytest.mark.usefixtures("single_thread")

PIERGIAJ = "https://github.com/piergiaj/pytorch-i3d"

# Written out from the architecture tables, independently of the model code. The stem is I3D's
# (Carreira & Zisserman 2017, Fig. 3). The Inception blocks are GoogLeNet's (Szegedy et al. 2014, Table 1),
# listed as #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5 (a 3x3x3 conv in I3D) and pool proj. The names are
# piergiaj's: b0 | b1a -> b1b | b2a -> b2b | b3b.
STEM = [("Conv3d_1a_7x7", 3, 64, (7, 7, 7)), ("Conv3d_2b_1x1", 64, 64, (1, 1, 1)), ("Conv3d_2c_3x3", 64, 192, (3, 3, 3))]
INCEPTION_TABLE = [
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
]


def released_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of piergiaj's rgb_imagenet.pt, derived from the tables above."""
    layout: dict[str, tuple[int, ...]] = {}

    def unit(name: str, cin: int, cout: int, kernel: tuple[int, int, int]) -> None:
        layout[f"{name}.conv3d.weight"] = (cout, cin, *kernel)
        for t in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{t}"] = (cout,)

    for name, cin, cout, kernel in STEM:
        unit(name, cin, cout, kernel)
    cin = 192
    one, three = (1, 1, 1), (3, 3, 3)
    for name, (c1, r3, c3, r5, c5, pp) in INCEPTION_TABLE:
        unit(f"{name}.b0", cin, c1, one)
        unit(f"{name}.b1a", cin, r3, one)
        unit(f"{name}.b1b", r3, c3, three)
        unit(f"{name}.b2a", cin, r5, one)
        unit(f"{name}.b2b", r5, c5, three)
        unit(f"{name}.b3b", cin, pp, one)
        cin = c1 + c3 + c5 + pp
    assert cin == 1024
    layout["logits.conv3d.weight"] = (400, 1024, 1, 1, 1)
    layout["logits.conv3d.bias"] = (400,)
    return layout


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the released layout, scaled so a 20-layer forward neither vanishes nor explodes."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_layout().items():
        if key.endswith("conv3d.weight"):
            value = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        else:
            value = 0.1 * torch.randn(shape, generator=g)
        state[key] = value
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = random_state()
    path = tmp_path_factory.mktemp("i3d") / "rgb_imagenet.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def model(weights) -> i3d_mod.InceptionI3d:
    return i3d_mod.load_i3d(weights[0])


# --------------------------------------------------------------------------------------------------
# Architecture


def test_state_dict_matches_released_layout():
    sd = i3d_mod.InceptionI3d().state_dict()
    expected = released_layout()
    assert len(expected) == 57 * 5 + 2 == 287
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def _tf_same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    # TF's documented SAME rule: out = ceil(size / s); total = max((out - 1) * s + k - size, 0); before = total // 2.
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize(("size", "k", "s"), [(16, 7, 2), (224, 7, 2), (15, 7, 2), (8, 3, 1), (5, 3, 2), (7, 2, 2),
                                              (4, 1, 1), (9, 3, 2)])
def test_same_padding_is_tf_same(size: int, k: int, s: int):
    pads = i3d_mod.same_padding((size, size + 1, size + 2), (k, k, k), (s, s, s))
    assert pads == (*_tf_same_pads(size + 2, k, s), *_tf_same_pads(size + 1, k, s), *_tf_same_pads(size, k, s))


def test_unit_and_maxpool_match_tf_same_semantics():
    g = torch.Generator().manual_seed(1)
    unit = i3d_mod.Unit3D(2, 3, (3, 3, 3), (2, 2, 2))
    with torch.no_grad():
        for t in unit.state_dict().values():
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    x = torch.randn(1, 2, 5, 6, 7, generator=g)
    pad = sum((_tf_same_pads(n, 3, 2) for n in (7, 6, 5)), ())
    bn = unit.bn
    ref = F.conv3d(F.pad(x, pad), unit.conv3d.weight, stride=2)
    ref = F.relu((ref - bn.running_mean.view(1, -1, 1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1, 1) + 1e-3)
                 * bn.weight.view(1, -1, 1, 1, 1) + bn.bias.view(1, -1, 1, 1, 1))
    out = unit(x)
    assert out.shape == (1, 3, 3, 3, 4)
    assert torch.allclose(out, ref, atol=1e-5)
    # TF's SAME max pool ignores the padding. Brute force over the valid window of a non-negative input
    # (every I3D max pool reads a ReLU output).
    pool = i3d_mod.MaxPool3dSame((1, 3, 3), (1, 2, 2))
    y = torch.rand(1, 1, 2, 5, 6, generator=g)
    got = pool(y)
    (h0, _), (w0, _) = _tf_same_pads(5, 3, 2), _tf_same_pads(6, 3, 2)
    assert got.shape == (1, 1, 2, 3, 3)
    for t in range(2):
        for i in range(3):
            for j in range(3):
                rows = slice(max(i * 2 - h0, 0), i * 2 - h0 + 3)
                cols = slice(max(j * 2 - w0, 0), j * 2 - w0 + 3)
                assert got[0, 0, t, i, j] == y[0, 0, t, rows, cols].max()


def test_forward_shapes_on_16x224(model):
    names = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3", "Mixed_3b",
             "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
             "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"]
    expected = [(64, 8, 112, 112), (64, 8, 56, 56), (64, 8, 56, 56), (192, 8, 56, 56), (192, 8, 28, 28),
                (256, 8, 28, 28), (480, 8, 28, 28), (480, 4, 14, 14), (512, 4, 14, 14), (512, 4, 14, 14),
                (512, 4, 14, 14), (528, 4, 14, 14), (832, 4, 14, 14), (832, 2, 7, 7), (832, 2, 7, 7),
                (1024, 2, 7, 7)]
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            out = model(torch.rand(1, 3, 16, 224, 224) * 2 - 1)
    finally:
        for h in hooks:
            h.remove()
    assert {n: tuple(seen[n].shape[1:]) for n in names} == dict(zip(names, expected, strict=True))
    assert out.shape == (1, 400) and torch.isfinite(out).all()
    # Head: the (2, 7, 7) average pool covers the whole 2x7x7 map, then a 1x1x1 conv with bias.
    pooled = seen["Mixed_5c"].mean(dim=(2, 3, 4))
    head = pooled @ model.logits.conv3d.weight.flatten(1).t() + model.logits.conv3d.bias
    assert torch.allclose(out, head, atol=1e-4)
    assert out.std() > 1e-3  # the random weights keep a signal through the 20 layers


def test_head_averages_logits_over_time(model, monkeypatch):
    # A longer clip leaves a time axis after the (2, 7, 7) pool: DeepMind's head averages the logits over it.
    trunk = torch.randn(2, 1024, 4, 7, 7)
    monkeypatch.setattr(model, "trunk", lambda x: trunk)
    windows = torch.stack([trunk[:, :, t : t + 2].mean(dim=(2, 3, 4)) for t in range(3)], dim=1)  # (2, 3, 1024)
    logits = windows @ model.logits.conv3d.weight.flatten(1).t() + model.logits.conv3d.bias
    assert torch.allclose(model(torch.zeros(2, 3, 1, 1, 1)), logits.mean(dim=1), atol=1e-5)
    assert not torch.allclose(logits[:, 0], logits.mean(dim=1), atol=1e-3)


def test_small_clips_refused_by_the_head(model):
    with pytest.raises(SparseditError) as err:
        model(torch.zeros(1, 3, 16, 32, 32))
    one_line(err, "(2, 7, 7)", "224x224")


# --------------------------------------------------------------------------------------------------
# Loading


def test_load_round_trip_and_safetensors(weights, tmp_path: Path):
    path, state = weights
    loaded = i3d_mod.load_i3d(path).state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "i3d.safetensors")
    again = i3d_mod.load_i3d(tmp_path / "i3d.safetensors").state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)
    # A file saved from nn.BatchNorm3d (newer PyTorch) also has one counter per batch norm: read and ignored.
    counters = dict(state, **{"Mixed_4d.b2b.bn.num_batches_tracked": torch.tensor(7)})
    torch.save(counters, tmp_path / "counters.pt")
    assert i3d_mod.load_i3d(tmp_path / "counters.pt") is not None


def test_load_refuses_missing_extra_and_misshapen_keys(weights, tmp_path: Path):
    _, state = weights
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "Mixed_4d.b2b.bn.running_var"},
                    "Mixed_4d.b2b.bn.running_var"),
        "extra": (dict(state, **{"Mixed_4d.b5.conv3d.weight": torch.zeros(1)}), "Mixed_4d.b5.conv3d.weight"),
        "counter without bn": (dict(state, **{"logits.bn.num_batches_tracked": torch.tensor(0)}),
                               "logits.bn.num_batches_tracked"),
        "charades head": (dict(state, **{"logits.conv3d.weight": torch.zeros(157, 1024, 1, 1, 1),
                                         "logits.conv3d.bias": torch.zeros(157)}), "logits.conv3d"),
        "prefixed": ({f"module.{k}": v for k, v in state.items()}, "Conv3d_1a_7x7"),
    }
    for name, (bad, word) in cases.items():
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(SparseditError) as err:
            i3d_mod.load_i3d(tmp_path / f"{name}.pt")
        one_line(err, word, "rgb_imagenet.pt", PIERGIAJ)


def test_load_refuses_missing_file_pickles_and_torchscript(tmp_path: Path):
    with pytest.raises(SparseditError) as err:
        fvd_mod.load_i3d(tmp_path / "nope.pt")
    one_line(err, "not found", "rgb_imagenet.pt", PIERGIAJ)

    marker = tmp_path / "ran"
    torch.save({"x": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SparseditError) as err:
        fvd_mod.load_i3d(tmp_path / "evil.pt")
    one_line(err, "rgb_imagenet.pt")
    assert not marker.exists()

    with warnings.catch_warnings():  # torch.jit.script is deprecated, but still writes the archive format to refuse
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "i3d_torchscript.pt"))
    with pytest.raises(SparseditError) as err:
        fvd_mod.load_i3d(tmp_path / "i3d_torchscript.pt")
    one_line(err, "TorchScript", "rgb_imagenet.pt", PIERGIAJ)


# --------------------------------------------------------------------------------------------------
# Preprocessing


class Recorder:
    """A stand-in video model: records its input and returns a fixed random projection of it (D = 6)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.w = torch.randn(3 * 16 * 8 * 8, 6, generator=torch.Generator().manual_seed(3))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return F.adaptive_avg_pool3d(x, (16, 8, 8)).flatten(1) @ self.w


def _videos(n: int, seed: int, frames: int = 16, size: int = 8, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=(n, frames, size, size, 3), dtype=np.uint8)


def test_uint8_and_signed_float_inputs_give_the_same_features():
    u8 = _videos(3, 0, frames=20, size=12)
    signed = torch.from_numpy(u8).permute(0, 4, 1, 2, 3).float() / 255.0 * 2 - 1  # the TF reference's 2x/255 - 1
    model = Recorder()
    a = fvd_mod.i3d_features(model, u8, batch_size=2)
    b = fvd_mod.i3d_features(model, signed, batch_size=3)
    assert a.shape == (3, 6) and np.allclose(a, b, atol=1e-5)
    x = model.inputs[0]
    assert x.shape == (2, 3, 16, 224, 224) and x.dtype == torch.float32
    # Per-frame bilinear resize with half-pixel centres of the first 16 frames, channels in RGB order.
    frame = torch.from_numpy(u8[1, 5]).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = F.interpolate(frame, size=(224, 224), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(x[1, :, 5], expected, atol=1e-6)


def test_preprocess_takes_the_first_16_frames_and_keeps_224_frames_exact():
    u8 = _videos(1, 1, frames=18, size=224)
    x = fvd_mod.preprocess(u8)
    assert torch.equal(x[0, :, 3], torch.from_numpy(u8[0, 3]).permute(2, 0, 1).float() / 127.5 - 1)
    late = u8.copy()
    late[:, 16:] = 255 - late[:, 16:]
    assert torch.equal(fvd_mod.preprocess(late), x)
    early = u8.copy()
    early[:, 0, :, :, 0] = 0  # red channel of the first frame only
    diff = (fvd_mod.preprocess(early) - x).abs().sum(dim=(0, 3, 4))
    assert diff[0, 0] > 0 and diff[1:].sum() == 0 and diff[0, 1:].sum() == 0


def test_preprocess_refusals():
    with pytest.raises(SparseditError) as err:
        fvd_mod.preprocess(_videos(2, 0, frames=15))
    one_line(err, "15 frames", "16")
    with pytest.raises(SparseditError) as err:
        fvd_mod.preprocess(torch.rand(1, 3, 16, 8, 8) * 255)
    one_line(err, "[-1, 1]", "uint8")
    with pytest.raises(SparseditError) as err:
        fvd_mod.preprocess(torch.rand(1, 16, 8, 8, 3))
    one_line(err, "(N, 3, F, H, W)")
    with pytest.raises(SparseditError) as err:
        fvd_mod.preprocess(np.zeros((16, 8, 8, 3), np.uint8))
    one_line(err, "(N, F, H, W, 3)")


# --------------------------------------------------------------------------------------------------
# Statistics and distance


def _random_gaussian(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, 2 * d))
    return rng.normal(size=d), a @ a.T / (2 * d)


def test_frechet_distance_matches_independent_computations():
    (mu1, s1), (mu2, s2) = _random_gaussian(12, 0), _random_gaussian(12, 1)
    got = fvd_mod.frechet_distance(mu1, s1, mu2, s2)
    by_scipy = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    # TF-GAN's form (the reference FVD): tr sqrt(S1) S2 sqrt(S1))^(1/2), by symmetric eigendecompositions.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    by_eigh = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert got == pytest.approx(by_scipy, rel=1e-9) and got == pytest.approx(by_eigh, rel=1e-8)
    assert got > 1.0


def test_fvd_stats_use_stylegan_v_biased_covariance():
    feats = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    mu, sigma = fvd_mod.fvd_stats(feats)
    x = feats.astype(np.float64)
    assert np.allclose(mu, x.mean(0)) and np.allclose(sigma, np.cov(x, rowvar=False, bias=True))
    assert np.allclose(sigma, feature_stats(feats)[1] * 6 / 7)
    with pytest.raises(SparseditError) as err:
        fvd_mod.fvd_stats(feats[:1])
    one_line(err, "N >= 2")


def test_fvd_is_zero_for_a_set_with_itself_positive_otherwise_and_symmetric():
    model = Recorder()
    a, b = _videos(12, 1), _videos(12, 2, lo=80)
    same = fvd_mod.fvd(a, a, model)
    ab, ba = fvd_mod.fvd(a, b, model), fvd_mod.fvd(b, a, model)
    assert abs(same) < 1e-8
    assert ab > 0.01 and ab == pytest.approx(ba, rel=1e-9)
    fa, fb = fvd_mod.i3d_features(model, a), fvd_mod.i3d_features(model, b)
    mu_a, mu_b = fa.astype(np.float64).mean(0), fb.astype(np.float64).mean(0)
    sa, sb = np.cov(fa.astype(np.float64), rowvar=False, bias=True), np.cov(fb.astype(np.float64), rowvar=False, bias=True)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sa + sb - 2 * np.real(scipy.linalg.sqrtm(sa @ sb)))
    assert ab == pytest.approx(expected, rel=1e-7)


# --------------------------------------------------------------------------------------------------
# CLI


def _run_cli(argv: list[str]) -> int:
    parser = Parser(prog="sparsedit")
    eval_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_video_path_with_the_real_network(weights, tmp_path: Path, capsys):
    np.savez(tmp_path / "smp.npz", _videos(2, 1, frames=17))
    np.savez(tmp_path / "ref.npz", _videos(3, 2, lo=90))
    argv = ["eval", "--samples", str(tmp_path / "smp.npz"), "--ref", str(tmp_path / "ref.npz"), "--i3d", str(weights[0])]
    assert _run_cli([*argv, "--json", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert set(out) == {"fvd", "num_samples", "num_ref", "clip_frames"}
    assert (out["num_samples"], out["num_ref"], out["clip_frames"]) == (2, 3, 16)
    assert math.isfinite(out["fvd"]) and out["fvd"] > 0
    assert "not meaningful" in captured.err and "400" in captured.err


def test_cli_video_value_and_table(tmp_path: Path, monkeypatch, capsys):
    model = Recorder()
    monkeypatch.setattr(fvd_mod, "load_i3d", lambda path, device="cpu": model)
    a, b = _videos(6, 1, frames=16), _videos(5, 2, lo=60)
    np.savez(tmp_path / "smp.npz", a)
    np.savez(tmp_path / "ref.npz", b)
    argv = ["eval", "--samples", str(tmp_path / "smp.npz"), "--ref", str(tmp_path / "ref.npz"), "--i3d", "x.pt"]
    assert _run_cli([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fvd"] == pytest.approx(fvd_mod.fvd(a, b, model), rel=1e-9)
    assert _run_cli(argv) == 0
    table = capsys.readouterr().out
    assert "FVD" in table and f"{out['fvd']:.4f}" in table and "reference videos" in table


def test_cli_video_refusals(tmp_path: Path):
    np.savez(tmp_path / "v.npz", _videos(2, 0))
    np.savez(tmp_path / "short.npz", _videos(2, 0, frames=8))
    np.savez(tmp_path / "img.npz", np.zeros((2, 8, 8, 3), np.uint8))
    v, short, img = (str(tmp_path / n) for n in ("v.npz", "short.npz", "img.npz"))
    with pytest.raises(SparseditError) as err:
        _run_cli(["eval", "--samples", v, "--ref", v])
    one_line(err, "--i3d", "rgb_imagenet.pt", PIERGIAJ)
    with pytest.raises(SparseditError) as err:
        _run_cli(["eval", "--samples", img, "--ref", img, "--i3d", "x.pt"])
    one_line(err, "--i3d", "drop")
    with pytest.raises(SparseditError) as err:
        _run_cli(["eval", "--samples", v, "--ref", img, "--i3d", "x.pt"])
    one_line(err, "--samples", "--ref", "videos")
    with pytest.raises(SparseditError) as err:  # the batch is checked before the (missing) weights are read
        _run_cli(["eval", "--samples", short, "--ref", v, "--i3d", str(tmp_path / "none.pt")])
    one_line(err, "8 frames", "16")
    with pytest.raises(SparseditError) as err:
        _run_cli(["eval", "--samples", v, "--ref", v, "--i3d", str(tmp_path / "none.pt")])
    one_line(err, "not found", "rgb_imagenet.pt")
