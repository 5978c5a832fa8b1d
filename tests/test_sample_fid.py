"""``sparsedit sample-fid``: balanced labels, shard layout and seeds, resume, manifest checks, packing, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsedit.eval.sample_fid as sf
from sparsedit import DiT, DiTConfig, SparseditError, load_model, save_pretrained
from sparsedit.cli.common import Parser
from sparsedit.cli.sample_fid import main, register
from sparsedit.eval.sample_fid import FidSampling, balanced_labels, sample_fid, sample_shard, shard_path, shard_seed

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 3


def tiny_dit(in_channels: int = 1, data_space: str = "pixel", seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
                          num_classes=NUM_CLASSES, data_space=data_space))
    with torch.no_grad():  # adaLN-Zero init would make every sample pure noise
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(tiny_dit(), tmp_path_factory.mktemp("ckpt") / "gray")


@pytest.fixture(scope="module")
def ckpt_rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(tiny_dit(in_channels=3, seed=1), tmp_path_factory.mktemp("ckpt") / "rgb")


def cli(ckpt: Path, out: Path, *extra: str, n: int = 8, b: int = 3, steps: int = 2) -> int:
    """Run the sub-command through a fresh parser holding only it (as ``sparsedit sample-fid``)."""
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sample-fid", "--ckpt", str(ckpt), "--num-samples", str(n), "--batch-size", str(b),
                              "--steps", str(steps), "--out", str(out), "--device", "cpu", "--no-progress", *extra])
    return args.func(args)


def packed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["arr_1"]


def test_parser_defaults() -> None:
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample-fid", "--ckpt", "c", "--num-samples", "50000", "--batch-size", "32", "--out", "d"])
    assert (args.steps, args.sampler, args.cfg_scale, args.cfg_mode, args.seed) == (250, "ddpm", 1.5, "first3", 0)
    assert args.pack is None and args.vae is None
    with pytest.raises(SystemExit):
        parser.parse_args(["sample-fid", "--ckpt", "c", "--num-samples", "0", "--batch-size", "32", "--out", "d"])


def test_balanced_labels_and_shard_layout() -> None:
    labels = balanced_labels(0, 10, NUM_CLASSES)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert np.bincount(balanced_labels(0, 50_000, 1000)).tolist() == [50] * 1000
    assert np.array_equal(balanced_labels(4, 7, NUM_CLASSES), labels[4:7])
    spec = FidSampling(num_samples=8, batch_size=3)
    assert spec.num_shards == 3
    assert [spec.shard_range(k) for k in range(3)] == [(0, 3), (3, 6), (6, 8)]
    with pytest.raises(SparseditError):
        spec.shard_range(3)
    seeds = {shard_seed(s, k) for s in range(3) for k in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert shard_seed(0, 5) == shard_seed(0, 5)


def test_packed_batch_format_and_partial_last_shard(ckpt: Path, tmp_path: Path) -> None:
    assert cli(ckpt, tmp_path / "run", n=8, b=3) == 0
    images, labels = packed(tmp_path / "run" / "samples_8.npz")
    assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    assert images.std() > 10  # real samples, not a constant image
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    shards = sorted(p.name for p in (tmp_path / "run" / "shards").iterdir())
    assert shards == ["shard_000000.npz", "shard_000001.npz", "shard_000002.npz"]
    with np.load(shard_path(tmp_path / "run", 2)) as last:
        assert last["images"].shape == (2, 8, 8, 1) and last["labels"].tolist() == [0, 1]


def test_rgb_model_and_pack_path(ckpt_rgb: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "fid.npz"
    assert cli(ckpt_rgb, tmp_path / "run", "--pack", str(out), "--sampler", "ddim", n=5, b=2) == 0
    images, labels = packed(out)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[..., 0], images[..., 1])
    assert labels.tolist() == [0, 1, 2, 0, 1]
    assert not (tmp_path / "run" / "samples_5.npz").exists()


def test_shard_alone_equals_shard_of_full_run(ckpt: Path, tmp_path: Path) -> None:
    assert cli(ckpt, tmp_path / "run", n=8, b=3) == 0
    model = load_model(ckpt)
    spec = FidSampling(num_samples=8, batch_size=3, steps=2)
    for k in (1, 2):
        images, labels = sample_shard(model, spec, k)
        with np.load(shard_path(tmp_path / "run", k)) as saved:
            assert np.array_equal(saved["images"], images) and np.array_equal(saved["labels"], labels)
    # Shards differ from one another (distinct seeds), and the seed changes them.
    a, _ = sample_shard(model, spec, 0)
    b, _ = sample_shard(model, FidSampling(num_samples=8, batch_size=3, steps=2, seed=1), 0)
    assert not np.array_equal(a, b)


def test_resume_skips_finished_shards_and_reproduces(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    assert cli(ckpt, run, n=8, b=2) == 0
    original = packed(run / "samples_8.npz")
    kept = shard_path(run, 0).stat().st_mtime_ns
    shard_path(run, 1).unlink()
    shard_path(run, 3).unlink()
    (run / "samples_8.npz").unlink()
    (run / "shards" / ".shard_000001.npz.x.tmp").write_bytes(b"left by a killed run")
    calls: list[int] = []
    real = sf.sample_shard

    def counting(model, spec, k, *args, **kwargs):
        calls.append(k)
        return real(model, spec, k, *args, **kwargs)

    monkeypatch.setattr(sf, "sample_shard", counting)
    assert cli(ckpt, run, n=8, b=2) == 0
    assert calls == [1, 3]
    assert shard_path(run, 0).stat().st_mtime_ns == kept
    assert not list((run / "shards").glob(".*.tmp"))
    again = packed(run / "samples_8.npz")
    for x, y in zip(original, again, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    # A finished run re-packs without sampling anything.
    calls.clear()
    assert cli(ckpt, run, n=8, b=2) == 0
    assert calls == []


def test_settings_mismatch_refused(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(ckpt, run) == 0
    with pytest.raises(SparseditError, match=r"other settings \(steps 2 there, 3 now\)"):
        cli(ckpt, run, steps=3)
    with pytest.raises(SparseditError, match="batch_size 3 there, 4 now"):
        cli(ckpt, run, b=4)
    other = save_pretrained(tiny_dit(seed=5), tmp_path / "other")  # same config, other weights
    with pytest.raises(SparseditError, match="model_sha256 differs"):
        cli(other, run)
    base = ["--ckpt", str(ckpt), "--num-samples", "8", "--batch-size", "3", "--steps", "2", "--out", str(run),
            "--device", "cpu", "--no-progress"]
    assert main([*base, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsedit sample-fid: error:") and "seed 0 there, 7 now" in err


def test_manifest_without_shards_is_replaced(ckpt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(ckpt, run, n=2, b=2) == 0
    shard_path(run, 0).unlink()
    assert cli(ckpt, run, "--seed", "3", n=2, b=2) == 0  # no shard left to mix with: start afresh


def test_shards_without_manifest_refused(ckpt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(ckpt, run, n=4, b=2) == 0
    (run / "manifest.json").unlink()
    with pytest.raises(SparseditError, match="manifest.json is missing"):
        cli(ckpt, run, n=4, b=2)


def test_bad_shard_reported_at_pack(ckpt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(ckpt, run, n=4, b=2) == 0
    shard_path(run, 1).write_bytes(b"not a zip")
    with pytest.raises(SparseditError, match=r"shard_000001.npz is unreadable .*delete .* and re-run"):
        cli(ckpt, run, n=4, b=2)


def test_latent_model_needs_vae(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = save_pretrained(tiny_dit(in_channels=4, data_space="latent"), tmp_path / "latent")
    argv = ["--ckpt", str(ckpt), "--num-samples", "2", "--batch-size", "2", "--out", str(tmp_path / "run"),
            "--device", "cpu"]
    assert main(argv) == 2
    assert "needs --vae" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SparseditError, match="needs --vae"):
        sample_fid(load_model(ckpt), FidSampling(num_samples=2, batch_size=2), tmp_path / "run2")


def test_no_null_class_needs_cfg_one(tmp_path: Path) -> None:
    model = tiny_dit()
    model.config.class_dropout_prob = 0.0
    with pytest.raises(SparseditError, match="cfg-scale must be 1"):
        sample_fid(model, FidSampling(num_samples=2, batch_size=2, steps=2), tmp_path / "run")
    out = sample_fid(model, FidSampling(num_samples=2, batch_size=2, steps=2, cfg_scale=1.0), tmp_path / "run",
                     progress=False)
    assert out == tmp_path / "run" / "samples_2.npz" and packed(out)[0].shape == (2, 8, 8, 3)


def test_torchrun_two_processes_match_single_process(ckpt: Path, tmp_path: Path) -> None:
    assert cli(ckpt, tmp_path / "single", n=8, b=3) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparsedit.cli.sample_fid", "--ckpt", str(ckpt), "--num-samples", "8", "--batch-size", "3",
           "--steps", "2", "--out", str(tmp_path / "multi"), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = packed(tmp_path / "single" / "samples_8.npz")
    multi = packed(tmp_path / "multi" / "samples_8.npz")
    for x, y in zip(single, multi, strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_latent_model_decodes_with_vae(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")
    ckpt = save_pretrained(tiny_dit(in_channels=4, data_space="latent"), tmp_path / "latent")
    assert cli(ckpt, tmp_path / "run", "--vae", str(tmp_path / "vae"), n=3, b=2) == 0
    images, labels = packed(tmp_path / "run" / "samples_3.npz")
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2]
    vae2 = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae2.save_pretrained(tmp_path / "vae2")  # other random weights: shards would not match
    with pytest.raises(SparseditError, match="vae_sha256 differs"):
        cli(ckpt, tmp_path / "run", "--vae", str(tmp_path / "vae2"), n=3, b=2)


def test_pack_never_replaces_a_users_file(ckpt: Path, tmp_path: Path) -> None:
    """--pack over an existing file needs --overwrite; a name that is not .npz is refused; both before sampling."""
    picture, batch = tmp_path / "photo.png", tmp_path / "old.npz"
    picture.write_bytes(b"a picture")
    batch.write_bytes(b"an older batch")
    for target, words in ((picture, "must end in .npz"), (batch, "already exists"), (tmp_path, "is a directory")):
        with pytest.raises(SparseditError) as err:
            cli(ckpt, tmp_path / "run", "--pack", str(target), n=2, b=2)
        msg = str(err.value)
        assert "\n" not in msg and words in msg and "--pack" in msg, msg
    assert picture.read_bytes() == b"a picture" and batch.read_bytes() == b"an older batch"
    assert not (tmp_path / "run").exists()
    assert cli(ckpt, tmp_path / "run", "--pack", str(batch), "--overwrite", n=2, b=2) == 0
    assert packed(batch)[0].shape[0] == 2
