"""Bad input, command by command: exit code 2, an error line naming the problem, no traceback, no file touched.

Each row is a command line that must be refused before any work. Rows run in-process (cheap); argparse
refusals end with ``SystemExit(2)`` and its ``usage: ... error: ...`` lines, our own checks with
``sparsedit CMD: error: ...``. Either way the last stderr line is the error and nothing was written.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsedit.checkpoint import save_pretrained
from sparsedit.cli import main
from sparsedit.commands.common import run_command
from sparsedit.dit import DiT, DiTConfig

TINY_TRAIN = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
              "--batch-size", "8", "--steps", "1", "--no-progress"]

# (command line after `sparsedit`, words the error line must contain)
NON_FINITE_OR_OUT_OF_RANGE: list[tuple[list[str], tuple[str, ...]]] = [
    ([*TINY_TRAIN, "--lr", "nan"], ("--lr", "finite")),
    ([*TINY_TRAIN, "--lr", "inf"], ("--lr", "finite")),
    ([*TINY_TRAIN, "--lr=-1e-4"], ("--lr", "> 0")),
    ([*TINY_TRAIN, "--grad-clip", "nan"], ("--grad-clip", "finite")),
    ([*TINY_TRAIN, "--grad-clip=-1"], ("--grad-clip", ">= 0")),
    ([*TINY_TRAIN, "--weight-decay", "nan"], ("--weight-decay", "finite")),
    ([*TINY_TRAIN, "--ema-decay", "1.5"], ("--ema-decay", "[0, 1]")),
    ([*TINY_TRAIN, "--ema-decay", "nan"], ("--ema-decay", "finite")),
    (["sample", "--model", "DiT-S/2", "--cfg-scale", "nan"], ("--cfg-scale", "finite")),
    (["sample", "--model", "DiT-S/2", "--cfg-scale=-inf"], ("--cfg-scale", "finite")),
    (["sample", "--model", "DiT-S/2", "--eta", "nan"], ("--eta", "finite")),
    (["sample", "--model", "DiT-S/2", "--eta=-0.5"], ("--eta", ">= 0")),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--cfg-scale", "inf"], ("--cfg-scale", "finite")),
    (["analyze", "--model", "DiT-S/2", "--cfg-scale", "nan"], ("--cfg-scale", "finite")),
]


def files_under(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("argv", "words"), NON_FINITE_OR_OUT_OF_RANGE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_numbers_must_be_finite_and_in_range(argv: list[str], words: tuple[str, ...], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("a file the user had")
    before = files_under(tmp_path)
    out = ["--run-dir", str(tmp_path / "run")] if argv[0] == "train" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *out])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and all(w in last for w in words), last
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("device", ["tpu9", "bogus", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_train_refuses_a_device_it_cannot_use(device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY_TRAIN, "--device", device, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsedit train: error: ") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_closed_stdout_ends_quietly() -> None:
    """`sparsedit ... | head`: when the reader goes away, no BrokenPipeError traceback, exit 141 (SIGPIPE's code)."""
    child = textwrap.dedent("""
        import argparse, sys
        from sparsedit.commands.common import run_command
        def talk(args):
            for i in range(10**6):
                print("line", i)
        sys.exit(run_command(argparse.Namespace(func=talk, command="talk")))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == "", err


def test_checkpoints_are_byte_reproducible(tmp_path: Path) -> None:
    """Equal models give equal files: the safetensors metadata must not come out in a random order."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=4, data_space="pixel"))
    digests = {hashlib.sha256((save_pretrained(model, tmp_path / f"c{i}") / "model.safetensors").read_bytes()).hexdigest()
               for i in range(8)}
    assert len(digests) == 1


BAD_CONFIG_VALUES: list[tuple[dict[str, object], str]] = [
    ({"hidden_size": "64"}, "hidden_size must be an integer"),
    ({"depth": 12.5}, "depth must be an integer"),
    ({"depth": -1}, "depth must be an integer >= 0"),
    ({"num_heads": None}, "num_heads must be an integer"),
    ({"mlp_ratio": "4"}, "mlp_ratio must be a finite number"),
    ({"learn_sigma": 1}, "learn_sigma must be true or false"),
    ({"input_size": [8, "x"]}, "input_size must be"),
    ({"data_space": 3}, "data_space must be a string"),
    ({"hidden_size": 33}, "invalid DiT config"),  # not divisible by num_heads: the dataclass's own check
]


@pytest.mark.parametrize(("change", "words"), BAD_CONFIG_VALUES, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_config_json_with_wrong_types_or_ranges(change: dict[str, object], words: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-edited config.json gets one line naming the field, never a TypeError from deep inside the model."""
    torch.manual_seed(0)
    ckpt = save_pretrained(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                                         num_heads=2, num_classes=4, data_space="pixel")), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **change}))
    before = files_under(tmp_path)
    assert main(["flops", "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and words in err, err
    assert files_under(tmp_path) == before


def test_run_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("the user's notes")
    before = files_under(tmp_path)
    assert main([*TINY_TRAIN, "--run-dir", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt" in err and "directory" in err and "Traceback" not in err, err
    assert files_under(tmp_path) == before


@pytest.mark.parametrize(("code", "words"), [
    (errno.EROFS, "read-only; choose a writable location"),
    (errno.ENOSPC, "no space left"),
    (errno.EACCES, "permission denied"),
    (errno.EISDIR, "is a directory"),
    (errno.ENOTDIR, "where a directory was expected"),
    (errno.EMLINK, "check the path"),  # anything else: the system's own words, and the path
])
def test_os_errors_become_one_line_naming_the_path(code: int, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Disk full, read-only, permissions, wrong kind of path: exit 2 and one line (these cannot all be staged as
    root in a test, so the command raises what the OS would)."""
    def fail(args: argparse.Namespace) -> int:
        raise OSError(code, os.strerror(code), "/data/out/model.safetensors")

    assert run_command(argparse.Namespace(func=fail, command="convert")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsedit convert: error: /data/out/model.safetensors: ")
    assert words in err, err


def tiny_model(seed: int) -> DiT:
    torch.manual_seed(seed)
    return DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                         num_classes=4, data_space="pixel"))


def test_overwriting_a_checkpoint_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing the config (disk full) must leave the old checkpoint whole: old weights beside the
    old config, loadable, and no hidden temporary directory behind."""
    import sparsedit.checkpoint as ckpt_module

    out = save_pretrained(tiny_model(0), tmp_path / "ckpt")
    before = files_under(tmp_path)

    def disk_full(path: Path, data: dict[str, object]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt_module, "write_json", disk_full)
    with pytest.raises(OSError):
        save_pretrained(tiny_model(1), out, overwrite=True)
    assert files_under(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    new = save_pretrained(tiny_model(1), out, overwrite=True)
    assert files_under(tmp_path) != before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (new / "config.json").exists()


def test_failed_sparsify_leaves_no_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sparse"
    assert main(["sparsify", str(tmp_path / "missing"), "--layout", "SparseDiT-S/2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists()
