"""TF-compatible InceptionV3: weight layout, loading, TF1 resize, sFID feature layout, weight lookup."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsedit.errors import SparseditError
from sparsedit.eval.metrics import inception as inc


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file in torch-fidelity's layout (plain dict, no num_batches_tracked) with random tensors."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for key, ref in inc.InceptionV3().state_dict().items():
        if key.endswith("running_var"):
            value = torch.rand(ref.shape, generator=g) + 0.5
        elif key.endswith("conv.weight"):
            fan_in = ref[0].numel()
            value = torch.randn(ref.shape, generator=g) * math.sqrt(2.0 / fan_in)
        else:
            value = torch.randn(ref.shape, generator=g) * 0.1
        state[key] = value
    path = tmp_path_factory.mktemp("w") / inc.WEIGHTS_FILENAME
    torch.save(state, path)
    return path, state


def test_state_dict_layout_matches_torch_fidelity_file():
    sd = inc.InceptionV3().state_dict()
    # 94 conv units x (conv.weight, bn.{weight,bias,running_mean,running_var}) + fc.{weight,bias}
    assert len(sd) == 94 * 5 + 2
    assert not any("num_batches_tracked" in k for k in sd)
    assert sum(v.numel() for v in sd.values()) == 23_885_392
    spot = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_3.conv.weight": (192, 192, 7, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in spot.items():
        assert tuple(sd[key].shape) == shape, key


def test_weights_round_trip_and_forward(fake_weights):
    path, state = fake_weights
    model = inc.load_inception(path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    images = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert out["pool"].shape == (1, 2048)
    assert out["logits"].shape == (1, 1008)
    assert out["spatial"].shape == (1, 17 * 17 * 7)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["pool"].abs().sum() > 0
    # ADM's IS input is pool_3 @ W without the bias.
    assert torch.allclose(out["logits"], out["pool"] @ state["fc.weight"].t(), atol=1e-5)
    assert not torch.allclose(out["logits"], out["pool"] @ state["fc.weight"].t() + state["fc.bias"], atol=1e-3)


def test_load_rejects_wrong_files(tmp_path: Path, fake_weights):
    _, state = fake_weights
    with_counters = dict(state, **{"Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)})
    torch.save(with_counters, tmp_path / "counters.pth")
    inc.load_inception(tmp_path / "counters.pth")  # nn.BatchNorm2d-style extra counters are fine
    missing = {k: v for k, v in state.items() if k != "fc.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(SparseditError, match="1 missing"):
        inc.load_inception(tmp_path / "missing.pth")
    reshaped = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(reshaped, tmp_path / "shape.pth")
    with pytest.raises(SparseditError, match="fc.weight"):
        inc.load_inception(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(SparseditError, match="cannot read"):
        inc.load_inception(tmp_path / "junk.pth")


def test_safetensors_weights(tmp_path: Path, fake_weights):
    from safetensors.torch import save_file

    _, state = fake_weights
    save_file(state, str(tmp_path / "w.safetensors"))
    model = inc.load_inception(tmp_path / "w.safetensors")
    assert torch.equal(model.fc.weight, state["fc.weight"])


def _tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent float64 TF1 bilinear (align_corners=False): src = dst * in / out, lerp floor..ceil."""
    n, c, in_h, in_w = img.shape
    out = np.empty((n, c, out_h, out_w))
    for i in range(out_h):
        sy = i * in_h / out_h
        y0, y1 = int(math.floor(sy)), min(int(math.ceil(sy)), in_h - 1)
        wy = sy - math.floor(sy)
        for j in range(out_w):
            sx = j * in_w / out_w
            x0, x1 = int(math.floor(sx)), min(int(math.ceil(sx)), in_w - 1)
            wx = sx - math.floor(sx)
            top = img[:, :, y0, x0] * (1 - wx) + img[:, :, y0, x1] * wx
            bottom = img[:, :, y1, x0] * (1 - wx) + img[:, :, y1, x1] * wx
            out[:, :, i, j] = top * (1 - wy) + bottom * wy
    return out


@pytest.mark.parametrize("size", [(29, 31), (3, 4), (16, 11), (7, 5)])
def test_tf1_resize_matches_reference(size):
    img = np.random.default_rng(0).uniform(0, 255, size=(2, 3, 7, 5))
    got = inc.resize_bilinear_tf1(torch.tensor(img, dtype=torch.float32), size).double().numpy()
    assert np.allclose(got, _tf1_resize_reference(img, *size), atol=2e-3)
    if size != (7, 5):  # and it is not PyTorch's half-pixel bilinear
        torch_way = F.interpolate(torch.tensor(img), size=size, mode="bilinear", align_corners=False)
        assert not np.allclose(got, torch_way.numpy(), atol=1.0)


def test_preprocess_normalises_like_the_graph():
    img = torch.full((1, 3, 299, 299), 255, dtype=torch.uint8)
    x = inc.InceptionV3.preprocess(img)
    assert x.shape == (1, 3, 299, 299) and torch.allclose(x, torch.full_like(x, 127 / 128))
    small = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8)
    assert torch.equal(inc.InceptionV3.preprocess(small), inc.InceptionV3.preprocess(small.float()))
    with pytest.raises(SparseditError, match="N, 3, H, W"):
        inc.InceptionV3.preprocess(torch.zeros(1, 10, 12, 3))


def test_spatial_features_keep_seven_channels_in_nhwc_order():
    n, c, h, w = 2, 10, 2, 3
    fmap = torch.zeros(n, c, h, w)
    for b in range(n):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    fmap[b, ch, y, x] = 1000 * b + 100 * ch + 10 * y + x
    vec = inc.spatial_features_nhwc(fmap)
    expected = [
        [1000 * b + 100 * ch + 10 * y + x for y in range(h) for x in range(w) for ch in range(7)] for b in range(n)
    ]
    assert vec.shape == (n, h * w * 7)
    assert vec.tolist() == expected


def test_weight_lookup_order_and_errors(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    with pytest.raises(SparseditError) as err:
        inc.find_inception_weights(None)
    msg = str(err.value)
    assert inc.WEIGHTS_FILENAME in msg and inc.WEIGHTS_URL in msg and inc.WEIGHTS_ENV in msg
    assert "\n" not in msg

    cache = tmp_path / "torch_home" / "hub" / "checkpoints" / inc.WEIGHTS_FILENAME
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"x")
    assert inc.find_inception_weights(None) == cache

    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(env_file))
    assert inc.find_inception_weights(None) == env_file

    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"x")
    assert inc.find_inception_weights(str(explicit)) == explicit

    with pytest.raises(SparseditError, match="not found at"):
        inc.find_inception_weights(str(tmp_path / "absent.pth"))
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(SparseditError, match=inc.WEIGHTS_ENV):
        inc.find_inception_weights(None)


def test_bit_exact_with_torch_fidelity_if_installed(fake_weights):
    """Optional cross-check against torch-fidelity's port (skipped when it is not importable)."""
    tfe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    path, _ = fake_weights
    ours = inc.load_inception(path)
    theirs = tfe.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
    )
    images = torch.randint(0, 256, (1, 3, 33, 47), dtype=torch.uint8)
    with torch.no_grad():
        out = ours(images)
        pool, logits = theirs(images)
    assert torch.allclose(out["pool"], pool, atol=1e-5) and torch.allclose(out["logits"], logits, atol=1e-4)
