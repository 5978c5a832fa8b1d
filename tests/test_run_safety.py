"""Run directories under stress: one writer at a time, resume past damage, nothing half-written left behind.

``train`` and ``sample-fid`` resume what their directory holds. These tests damage a run the ways a crash,
a full disk or a second process would, and check that the next command either carries on from the newest
good state (saying what it skipped) or stops with one line, never a traceback, and that nothing earlier
is lost.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import Exploit
from sparsedit.cli import main
from sparsedit.core.locking import run_lock

TINY = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--batch-size", "8",
        "--ckpt-every", "2", "--keep-last", "3", "--log-every", "1", "--no-progress", "--device", "cpu"]


def train(run_dir: Path, steps: int) -> int:
    return main([*TINY, "--steps", str(steps), "--run-dir", str(run_dir)])


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    """The losses of an uninterrupted 6-step run."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert train(run_dir, 6) == 0
    return losses(run_dir)


def damage_truncate(path: Path, marker: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_empty(path: Path, marker: Path) -> None:
    path.write_bytes(b"")


def damage_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": Exploit(marker)}))  # must be refused, not executed


def damage_garbage(path: Path, marker: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


@pytest.mark.parametrize("damage", [damage_truncate, damage_empty, damage_pickle, damage_garbage])
@pytest.mark.parametrize("name", ["optimizer.pt", "rng_rank0.pt", "ema/model.safetensors", "trainer.json"])
def test_resume_falls_back_past_a_damaged_checkpoint(name: str, damage: Any, tmp_path: Path, reference: list,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The newest checkpoint is damaged: resume from the one before, say so, move the damaged one aside, and
    still log exactly the losses of an uninterrupted run."""
    run_dir = tmp_path / "run"
    assert train(run_dir, 4) == 0
    marker = tmp_path / "executed"
    damage(run_dir / "checkpoints" / "step_0000004" / name, marker)
    capsys.readouterr()
    assert train(run_dir, 6) == 0
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint step_0000004: " in out and "resuming" in out and "from step 2" in out, out
    assert not marker.exists()
    assert (run_dir / "checkpoints" / "damaged-step_0000004").is_dir()
    assert losses(run_dir) == reference


def test_no_loadable_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert train(run_dir, 2) == 0
    (run_dir / "checkpoints" / "step_0000002" / "optimizer.pt").write_bytes(b"")
    capsys.readouterr()
    assert train(run_dir, 4) == 2
    assert "no checkpoint in" in error_line(capsys) and (run_dir / "checkpoints" / "damaged-step_0000002").is_dir()


@pytest.mark.parametrize("tail", [b'{"step": 5, "loss": 0.', b"\xff\xfe not utf-8\n", b"[1, 2]\n"])
def test_a_torn_or_foreign_metrics_line_is_dropped_on_resume(tail: bytes, tmp_path: Path, reference: list,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert train(run_dir, 4) == 0
    with open(run_dir / "metrics.jsonl", "ab") as fh:  # a process killed while appending
        fh.write(tail)
    capsys.readouterr()
    assert train(run_dir, 6) == 0
    assert "dropped 1 damaged line(s)" in capsys.readouterr().out
    assert losses(run_dir) == reference


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import sparsedit.train.runs as train_module  # where the checkpoint writing lives

    run_dir = tmp_path / "run"
    assert train(run_dir, 2) == 0
    real = train_module.write_safetensors

    def full(path: Path, *args: Any, **kwargs: Any) -> None:
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, *args, **kwargs)

    monkeypatch.setattr(train_module, "write_safetensors", full)
    capsys.readouterr()
    assert train(run_dir, 4) == 2
    assert "no space left" in error_line(capsys)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002"]  # no .step_*.tmp left
    monkeypatch.undo()
    assert train(run_dir, 4) == 0


def test_stale_temporary_directories_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(run_dir, 2) == 0
    (run_dir / "checkpoints" / ".step_0000004.tmp" / "model").mkdir(parents=True)  # as a kill mid-write leaves it
    (run_dir / ".model.tmp").mkdir()
    assert train(run_dir, 4) == 0
    assert sorted(p.name for p in run_dir.rglob(".*")) == [".lock"]


def test_a_second_train_on_a_locked_run_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """flock conflicts between two opens even in one process, so the holder can be this test."""
    run_dir = tmp_path / "run"
    assert train(run_dir, 2) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    with run_lock(run_dir):
        assert train(run_dir, 4) == 2
    err = error_line(capsys)
    assert f"is in use by sparsedit process {os.getpid()} on " in err and "choose another --run-dir" in err, err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert train(run_dir, 4) == 0  # the lock went with its holder


def test_two_trains_started_together_never_share_a_run(tmp_path: Path) -> None:
    """Two processes on one new run dir: one trains, the other stops with one line; the log holds each step once."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparsedit", *TINY, "--steps", "12", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the first finished before the second started: the second resumed a finished run
        pass
    else:
        assert codes == [0, 2], results
        err = next(e for c, e in results if c == 2)
        assert err.count("\n") == 1 and "is in use by sparsedit process" in err, err
    assert [s for s, _ in losses(run_dir)] == list(range(1, 13))


def test_sample_fid_takes_the_lock_and_refuses_a_file_as_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sparsedit.core.checkpoint import save_pretrained
    from sparsedit.families.dit.model import DiT, DiTConfig

    torch.manual_seed(0)
    ckpt = save_pretrained(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                                         num_heads=2, num_classes=4, data_space="pixel")), tmp_path / "ckpt")
    args = ["sample-fid", "--ckpt", str(ckpt), "--num-samples", "4", "--batch-size", "2", "--steps", "2",
            "--sampler", "ddim", "--no-progress", "--device", "cpu"]
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is a file" in error_line(capsys) and (tmp_path / "notes.txt").read_text() == "mine"
    with run_lock(tmp_path / "fid"):
        assert main([*args, "--out", str(tmp_path / "fid")]) == 2
    assert "is in use by sparsedit process" in error_line(capsys)
    assert sorted(p.name for p in (tmp_path / "fid").iterdir()) == [".lock"]
    assert main([*args, "--out", str(tmp_path / "fid")]) == 0


def test_a_run_that_stopped_before_its_first_checkpoint_starts_afresh(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A refused start (a batch larger than the data) must not lock the corrected command out as 'a different run'."""
    run_dir = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--batch-size", "4096", "--run-dir", str(run_dir)]) == 2
    assert "fewer than one global batch" in error_line(capsys)
    assert train(run_dir, 2) == 0
    assert [s for s, _ in losses(run_dir)] == [1, 2]


def test_a_checkpoint_whose_step_disagrees_with_its_name_is_skipped(tmp_path: Path, reference: list,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert train(run_dir, 4) == 0
    info = run_dir / "checkpoints" / "step_0000004" / "trainer.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "step": 99}))
    capsys.readouterr()
    assert train(run_dir, 6) == 0
    assert "skipping checkpoint step_0000004" in capsys.readouterr().out
    assert losses(run_dir) == reference
