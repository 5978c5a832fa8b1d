"""Tests for sparsedit.train.data: embedded digits, image folders, precomputed latents."""

from __future__ import annotations

import json
import math
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsedit.errors import SparseditError
from sparsedit.train.data import (
    DigitsDataset,
    ImageFolderDataset,
    LatentsDataset,
    center_crop_arr,
    digits_split_indices,
    load_digits_array,
    load_digits_raw,
    save_latents,
)

# Tiny tensors: one intra-op thread is faster (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------------------------------
# Embedded digits
# --------------------------------------------------------------------------------------------------


def test_asset_is_package_data_with_licence() -> None:
    base = resources.files("sparsedit") / "assets" / "digits"
    assert (base / "digits8x8.npz").is_file()
    licence = (base / "LICENSE.md").read_text()
    assert "CC BY 4.0" in licence and "Alpaydin" in licence and "BSD-3" in licence


def test_raw_asset_contents() -> None:
    images, labels = load_digits_raw()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 16
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    assert not images.flags.writeable  # the cached copy cannot be corrupted by callers


def test_asset_matches_sklearn() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    images, labels = load_digits_raw()
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(bunch.target))
    np.testing.assert_array_equal(labels, bunch.target)
    np.testing.assert_array_equal(images, bunch.images.astype(np.uint8))


def _bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Independent numpy bilinear resize with half-pixel centres (align_corners=False semantics)."""
    n = img.shape[0]
    scale = n / out
    src = np.maximum((np.arange(out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = src - i0
    w0 = 1.0 - w1
    rows = img[i0, :] * w0[:, None] + img[i1, :] * w1[:, None]
    return rows[:, i0] * w0[None, :] + rows[:, i1] * w1[None, :]


@pytest.mark.parametrize("resolution", [16, 32, 12])
def test_upscale_matches_independent_bilinear(resolution: int) -> None:
    raw, _ = load_digits_raw()
    x, _ = load_digits_array(resolution=resolution)
    for i in (0, 1, 500, 1796):
        expected = _bilinear_reference(raw[i].astype(np.float64) / 8.0 - 1.0, resolution)
        np.testing.assert_allclose(x[i, 0].numpy(), expected, atol=1e-5)


def test_upscale_hand_checked_corner_and_identity_at_8() -> None:
    raw, _ = load_digits_raw()
    x16, _ = load_digits_array(resolution=16)
    # Output pixel (0, 0) samples source coordinate -0.25, clamped to 0: exactly the source corner.
    assert x16[7, 0, 0, 0].item() == pytest.approx(raw[7, 0, 0] / 8 - 1)
    # Output pixel (1, 1) samples (0.25, 0.25): 9/16 a + 3/16 b + 3/16 c + 1/16 d.
    a, b, c, d = (raw[7, 0, 0], raw[7, 0, 1], raw[7, 1, 0], raw[7, 1, 1])
    expected = (9 * a + 3 * b + 3 * c + d) / 16 / 8 - 1
    assert x16[7, 0, 1, 1].item() == pytest.approx(expected, abs=1e-6)
    x8, _ = load_digits_array(resolution=8)
    np.testing.assert_array_equal(x8[:, 0].numpy(), raw.astype(np.float32) / 8 - 1)


@pytest.mark.parametrize(("resolution", "channels"), [(16, 1), (16, 3), (32, 1), (32, 3)])
def test_digits_array_shapes_and_range(resolution: int, channels: int) -> None:
    x, y = load_digits_array(resolution=resolution, channels=channels)
    assert x.shape == (1797, channels, resolution, resolution) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and 0.9 < x.max().item() <= 1.0
    if channels == 3:
        gray, _ = load_digits_array(resolution=resolution, channels=1)
        for c in range(3):
            assert torch.equal(x[:, c], gray[:, 0])


def test_digits_array_rejects_bad_arguments() -> None:
    with pytest.raises(SparseditError, match=r"resolution must be an integer >= 8.*resolution=8"):
        load_digits_array(resolution=4)
    with pytest.raises(SparseditError, match="channels must be 1 or 3"):
        load_digits_array(channels=2)


def test_split_disjoint_and_covering() -> None:
    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(train) == 1438 and len(test) == 359
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    assert (test % 5 == 4).all()
    with pytest.raises(SparseditError, match="unknown digits split"):
        digits_split_indices("val")  # type: ignore[arg-type]


def test_digits_dataset_items_follow_split() -> None:
    x, y = load_digits_array(resolution=16, channels=3)
    ds = DigitsDataset("test", resolution=16, channels=3)
    assert len(ds) == 359 and len(DigitsDataset("train")) == 1438 and len(DigitsDataset()) == 1797
    image, label = ds[2]
    assert isinstance(label, int)
    assert torch.equal(image, x[14]) and label == int(y[14])  # third test sample is index 14
    assert set(ds.labels.tolist()) == set(range(10))


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _striped(width: int, height: int, vertical: bool) -> np.ndarray:
    """Red / green / blue bands along x (vertical=True) or y: outer quarters red/blue, middle green."""
    n = width if vertical else height
    bands = np.zeros((n, 3), np.uint8)
    q = n // 4
    bands[:q, 0] = 255
    bands[q : n - q, 1] = 255
    bands[n - q :, 2] = 255
    if vertical:
        return np.broadcast_to(bands[None, :, :], (height, width, 3)).copy()
    return np.broadcast_to(bands[:, None, :], (height, width, 3)).copy()


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "zebra" / "wide.png", _striped(64, 32, vertical=True))
    _save(root / "apple" / "tall.png", _striped(32, 64, vertical=False))
    _save(root / "apple" / "nested" / "small.png", np.full((5, 7, 3), 128))
    (root / "apple" / "notes.txt").write_text("not an image")
    _save(root / ".hidden" / "x.png", np.zeros((8, 8, 3)))
    return root


def test_image_folder_labels_and_shapes(image_folder: Path) -> None:
    ds = ImageFolderDataset(image_folder, resolution=8)
    assert ds.classes == ["apple", "zebra"]
    assert [label for _, label in ds.samples] == [0, 0, 1]
    assert [p.name for p, _ in ds.samples] == ["small.png", "tall.png", "wide.png"]
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert -1.0 <= x.min().item() and x.max().item() <= 1.0
        assert label == ds.samples[i][1]
    gray = ImageFolderDataset(image_folder, resolution=8, channels=1)
    assert gray[0][0].shape == (1, 8, 8)
    # Uniform gray 128 -> 128 / 127.5 - 1 everywhere, also after upscaling 5x7 -> 8x8.
    torch.testing.assert_close(gray[0][0], torch.full((1, 8, 8), 128 / 127.5 - 1))


def test_image_folder_center_crop_keeps_middle(image_folder: Path) -> None:
    ds = ImageFolderDataset(image_folder, resolution=8)
    green = torch.stack([torch.full((8, 8), -1.0), torch.full((8, 8), 1.0), torch.full((8, 8), -1.0)])
    # Both the wide (vertical bands) and the tall (horizontal bands) image keep only the green middle.
    torch.testing.assert_close(ds[1][0], green, atol=0.02, rtol=0)
    torch.testing.assert_close(ds[2][0], green, atol=0.02, rtol=0)


def test_center_crop_arr_recipe() -> None:
    # 100x60 -> BOX halvings while min side >= 2*res (60 -> 30 -> 15 stops for res=8: 15 < 16),
    # bicubic to min side 8 (25x15 -> 13x8), crop the central 8 columns.
    arr = center_crop_arr(Image.new("RGB", (100, 60), (10, 20, 30)), 8)
    assert arr.shape == (8, 8, 3)
    assert (arr == np.array([10, 20, 30])).all()
    ramp = np.tile(np.arange(16, dtype=np.uint8)[None, :] * 10, (8, 1))
    out = center_crop_arr(Image.fromarray(ramp), 8)  # already min side 8: crop columns 4..11
    np.testing.assert_array_equal(out, ramp[:, 4:12])


def test_image_folder_random_flip(tmp_path: Path) -> None:
    _save(tmp_path / "c" / "ramp.png", np.tile(np.arange(8)[None, :, None] * 30, (8, 1, 3)))
    ds = ImageFolderDataset(tmp_path, resolution=8, random_flip=True)
    base = ds.load_image(0)
    assert not torch.equal(base, base.flip(-1))
    torch.manual_seed(0)
    outs = [ds[0][0] for _ in range(30)]
    assert all(torch.equal(o, base) or torch.equal(o, base.flip(-1)) for o in outs)
    assert 0 < sum(torch.equal(o, base) for o in outs) < 30


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SparseditError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    flat = tmp_path / "flat"
    _save(flat / "a.png", np.zeros((8, 8, 3)))
    with pytest.raises(SparseditError, match="no class subfolders"):
        ImageFolderDataset(flat)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.md").write_text("x")
    with pytest.raises(SparseditError, match="no images found"):
        ImageFolderDataset(empty)
    bad = tmp_path / "bad"
    (bad / "cls").mkdir(parents=True)
    (bad / "cls" / "broken.png").write_bytes(b"definitely not a png")
    ds = ImageFolderDataset(bad, resolution=8)
    with pytest.raises(SparseditError, match=r"cannot read image .*broken\.png"):
        ds[0]
    with pytest.raises(SparseditError, match="channels must be 1 or 3"):
        ImageFolderDataset(bad, channels=4)


# --------------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------------

META = {"scale_factor": 0.18215, "vae": "stabilityai/sd-vae-ft-ema", "resolution": 256}


def test_latents_round_trip(tmp_path: Path) -> None:
    lat = torch.randn(6, 4, 8, 8).half()
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    save_latents(tmp_path / "lat", lat, labels, META, kind="latents")
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["latents.safetensors", "meta.json"]
    ds = LatentsDataset(tmp_path / "lat")
    assert len(ds) == 6 and ds.kind == "latents" and ds.latent_shape == (4, 8, 8)
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert meta["vae"] == META["vae"] and meta["kind"] == "latents" and meta["num_samples"] == 6
    for i in range(6):
        x, label = ds[i]
        assert x.dtype == torch.float32 and label == int(labels[i])
        assert torch.equal(x, lat[i].float())
        assert torch.equal(ds[i][0], x)  # stored latents are deterministic
    assert torch.equal(ds[-1][0], lat[5].float())
    with pytest.raises(IndexError):
        ds[6]
    scaled = LatentsDataset(tmp_path / "lat", apply_scale_factor=True)
    torch.testing.assert_close(scaled[2][0], lat[2].float() * 0.18215)
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch_x.shape == (4, 4, 8, 8) and batch_y.tolist() == [3, 1, 4, 1]


def test_moments_sampling_reproducible_and_correct(tmp_path: Path) -> None:
    c, h = 4, 32
    mean = torch.randn(3, c, h, h)
    stds = torch.tensor([0.5, 1.0, 2.0, 0.1])
    logvar = torch.log(stds**2).view(1, c, 1, 1).expand(3, c, h, h)
    save_latents(tmp_path / "m", torch.cat([mean, logvar], dim=1), torch.tensor([0, 1, 2]), META)
    ds = LatentsDataset(tmp_path / "m", seed=7)
    assert ds.kind == "moments" and ds.latent_shape == (c, h, h)
    a = ds[1][0]
    assert a.shape == (c, h, h)
    assert torch.equal(a, ds[1][0])  # same item, same epoch -> same sample
    assert torch.equal(a, LatentsDataset(tmp_path / "m", seed=7)[1][0])  # same seed -> same sample
    assert torch.equal(a, pickle.loads(pickle.dumps(ds))[1][0])  # survives pickling (workers)
    assert not torch.equal(a, LatentsDataset(tmp_path / "m", seed=8)[1][0])
    assert not torch.equal(a, ds[2][0] - mean[2] + mean[1])  # items get different noise
    ds.set_epoch(1)
    b = ds[1][0]
    assert not torch.equal(a, b)
    ds.set_epoch(0)
    assert torch.equal(a, ds[1][0])
    # Statistics: z = (x - mean) / std is standard normal per channel (1024 values per channel).
    for x in (a, b):
        z = (x - mean[1]) / stds.view(c, 1, 1)
        for ch in range(c):
            assert abs(z[ch].mean().item()) < 0.15
            assert abs(z[ch].std().item() - 1.0) < 0.1
    # Across many epochs the samples of one element average to its mean.
    draws = []
    for epoch in range(100):
        ds.set_epoch(epoch)
        draws.append(ds[0][0][:, :2, :2])
    stacked = torch.stack(draws)
    se = stds.view(c, 1, 1) / math.sqrt(100)
    assert ((stacked.mean(0) - mean[0, :, :2, :2]).abs() < 5 * se).all()


def test_save_latents_validation(tmp_path: Path) -> None:
    with pytest.raises(SparseditError, match="even channel count"):
        save_latents(tmp_path, torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), META)
    with pytest.raises(SparseditError, match="labels must be a 1-d integer tensor with 2"):
        save_latents(tmp_path, torch.zeros(2, 4, 4, 4), torch.zeros(3, dtype=torch.long), META)
    with pytest.raises(SparseditError, match="meta lacks vae"):
        save_latents(
            tmp_path, torch.zeros(2, 4, 4, 4), torch.zeros(2, dtype=torch.long), {"scale_factor": 1.0, "resolution": 32}
        )
    with pytest.raises(SparseditError, match="must be a 4-d tensor"):
        save_latents(tmp_path, torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long), META, kind="latents")
    with pytest.raises(SparseditError, match="float16 or float32"):
        save_latents(tmp_path, torch.zeros(2, 4, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long), META)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_latents_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(SparseditError, match="does not exist"):
        LatentsDataset(tmp_path / "missing")
    d = tmp_path / "d"
    save_latents(d, torch.zeros(2, 8, 4, 4), torch.tensor([0, 1]), META)
    meta_text = (d / "meta.json").read_text()
    (d / "meta.json").unlink()
    with pytest.raises(SparseditError, match=r"meta\.json.*is missing"):
        LatentsDataset(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(SparseditError, match="not valid JSON"):
        LatentsDataset(d)
    (d / "meta.json").write_text(meta_text)
    (d / "latents.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(SparseditError, match="corrupt or not safetensors"):
        LatentsDataset(d)
    (d / "latents.safetensors").unlink()
    with pytest.raises(SparseditError, match=r"latents\.safetensors.*is missing"):
        LatentsDataset(d)


# --------------------------------------------------------------------------------------------------
# Video latents and caption embeddings (PixArt-alpha, Latte)
# --------------------------------------------------------------------------------------------------


def test_video_latents_are_returned_channel_first(tmp_path: Path) -> None:
    lat = torch.randn(3, 5, 4, 6, 8)  # (N, F, C, h, w): frames encoded one by one
    save_latents(tmp_path / "v", lat, torch.tensor([0, 1, 2]), META, kind="latents")
    ds = LatentsDataset(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 5, 6, 8] and meta["num_frames"] == 5
    assert ds.num_frames == 5 and ds.latent_shape == (4, 5, 6, 8) and ds.caption_shape is None
    x, label = ds[1]
    assert label == 1 and torch.equal(x, lat[1].transpose(0, 1))  # (C, F, h, w), Latte's layout
    # Moments split along the channel axis of every frame; logvar -30 leaves the mean (std 3e-7).
    moments = torch.cat([lat, torch.full_like(lat, -30.0)], dim=2)  # (N, F, 2C, h, w)
    save_latents(tmp_path / "m", moments, torch.tensor([0, 1, 2]), META)
    sample = LatentsDataset(tmp_path / "m", apply_scale_factor=True)[2][0]
    torch.testing.assert_close(sample, lat[2].transpose(0, 1) * 0.18215, atol=1e-5, rtol=0)
    assert not torch.equal(sample, lat[2].transpose(0, 1) * 0.18215)  # noise was drawn
    assert LatentsDataset(tmp_path / "m").latent_shape == (4, 5, 6, 8)
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch_x.shape == (2, 4, 5, 6, 8) and batch_y.tolist() == [0, 1]


def test_captions_round_trip_as_model_keyword_arguments(tmp_path: Path) -> None:
    emb = torch.randn(4, 7, 16).half()  # (N, L, D) T5 embeddings, fp16
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] * 1 + [0] * 6]).bool()
    null = torch.randn(7, 16)
    lat = torch.randn(4, 4, 8, 8)
    save_latents(tmp_path / "c", lat, None, META, kind="latents", captions=emb, caption_mask=mask, null_caption=null)
    ds = LatentsDataset(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["caption_shape"] == [7, 16] and ds.caption_shape == (7, 16)
    assert ds.labels is None and ds.num_classes == 0 and torch.equal(ds.null_caption, null)
    x, cond = ds[1]
    assert torch.equal(x, lat[1]) and sorted(cond) == ["encoder_attention_mask", "encoder_hidden_states"]
    assert cond["encoder_hidden_states"].dtype == torch.float32 and torch.equal(cond["encoder_hidden_states"],
                                                                                emb[1].float())
    assert cond["encoder_attention_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0]
    _, batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["encoder_hidden_states"].shape == (4, 7, 16) and torch.equal(batch["encoder_attention_mask"],
                                                                             mask.long())
    # With labels as well, "y" joins the dict; without a mask every token is real.
    save_latents(tmp_path / "cl", lat, torch.tensor([5, 6, 7, 8]), META, kind="latents", captions=emb)
    labelled = LatentsDataset(tmp_path / "cl")
    assert labelled.num_classes == 9 and labelled.null_caption is None
    assert labelled[2][1]["y"] == 7 and labelled[2][1]["encoder_attention_mask"].tolist() == [1] * 7


def test_save_latents_caption_validation(tmp_path: Path) -> None:
    lat, emb = torch.zeros(2, 4, 4, 4), torch.zeros(2, 3, 8)
    cases = [
        (dict(labels=None), "labels must be a 1-d integer tensor with 2 entries, got None"),
        (dict(captions=torch.zeros(3, 3, 8)), "captions hold 3 rows for 2 latents"),
        (dict(captions=emb.double()), "captions must be a float16/float32 tensor (N=2, L, D)"),
        (dict(captions=emb, caption_mask=torch.full((2, 3), 2)), "caption_mask must be a 0/1 integer or bool tensor"),
        (dict(captions=emb, caption_mask=torch.ones(2, 4, dtype=torch.long)), "(2, 3), got torch.int64 (2, 4)"),
        (dict(captions=emb, null_caption=torch.zeros(4, 8)), "null_caption has shape (4, 8) but captions are (3, 8)"),
        (dict(null_caption=torch.zeros(3, 8)), "caption_mask / null_caption were given without captions"),
    ]
    for kw, message in cases:
        args = {"labels": torch.zeros(2, dtype=torch.long), **kw}
        with pytest.raises(SparseditError) as err:
            save_latents(tmp_path, lat, args.pop("labels"), META, kind="latents", **args)
        assert message in str(err.value), (kw, str(err.value))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_latents_dataset_refuses_inconsistent_caption_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_latents(tmp_path, torch.zeros(2, 4, 4, 4), None, META, kind="latents", captions=torch.zeros(2, 3, 8))
    tensors = {"latents": torch.zeros(2, 4, 4, 4), "captions": torch.zeros(2, 3, 8),
               "caption_mask": torch.ones(2, 5, dtype=torch.long)}
    save_file(tensors, str(tmp_path / "latents.safetensors"))
    with pytest.raises(SparseditError, match=r"captions in .* do not fit: 'captions' \[2, 3, 8\], 'caption_mask' \[2, 5\]"):
        LatentsDataset(tmp_path)
    save_file({"latents": torch.zeros(2, 4, 4, 4)}, str(tmp_path / "latents.safetensors"))
    with pytest.raises(SparseditError, match="must hold exactly one of 'latents'/'moments' and 'labels' and/or"):
        LatentsDataset(tmp_path)


@pytest.mark.parametrize(("change", "words"), [({"num_samples": 60}, "says 60 samples but"),
                                               ({"classes": ["a", "b"]}, "names 2 classes")])
def test_a_latents_directory_whose_meta_disagrees_is_refused(change: dict, words: str, tmp_path: Path) -> None:
    """An edited or mixed-up meta.json would build a model for the wrong number of classes, or lie about N."""
    save_latents(tmp_path / "lat", torch.randn(6, 4, 8, 8), torch.tensor([0, 1, 5, 1, 0, 1]), META, kind="latents")
    meta = tmp_path / "lat" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **change}))
    with pytest.raises(SparseditError, match=words):
        LatentsDataset(tmp_path / "lat")


def test_image_folder_refuses_an_empty_class_and_reads_16_bit_grey(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grey16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)  # 0 .. 63000 of 65535
    Image.fromarray(grey16).save(tmp_path / "a" / "x.png")
    with pytest.raises(SparseditError, match="holds no images"):
        ImageFolderDataset(tmp_path, resolution=8, channels=3)
    Image.fromarray(grey16).save(tmp_path / "b" / "y.png")
    x = ImageFolderDataset(tmp_path, resolution=8, channels=1).load_image(0)  # in [-1, 1]
    expected = torch.from_numpy((grey16 >> 8).astype(np.float32)) / 127.5 - 1  # the high byte, not clipped to white
    assert torch.allclose(x[0], expected)
