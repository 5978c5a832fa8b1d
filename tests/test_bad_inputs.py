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
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsedit.cli import main
from sparsedit.cli.common import run_command
from sparsedit.core.checkpoint import save_pretrained
from sparsedit.families.dit.model import DiT, DiTConfig

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
        from sparsedit.cli.common import run_command
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
    import sparsedit.core.checkpoint as ckpt_module

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


# ---------------------------------------------------------------------------------------------------------------
# The table: bad input per sub-command, each refused with exit 2 and one line, touching nothing.
#
# ``{W}`` is a workspace of real files made once (``workspace``): a tiny pixel DiT checkpoint, a SparseDiT made
# from it, damaged copies of both, and ordinary files a user might have. Paths under ``{W}/new`` must not exist
# afterwards: a refused command creates nothing.

SMALL = ["--steps", "2", "--sampler", "ddim", "--device", "cpu"]
ANALYZE = ["analyze", "--ckpt", "{W}/dit", *SMALL, "--max-k", "1"]
TINY_LAYOUT = "0,1,1,0,1,0,0"  # P,K,g,s,r,d,T for a depth-2 model

BAD_INPUTS: list[tuple[list[str], tuple[str, ...]]] = [
    # -- no command, unknown command or flag
    ([], ("required: COMMAND", "--help")),
    (["bogus"], ("invalid choice: 'bogus'",)),
    (["flops", "--model", "DiT-S/2", "--bogus"], ("unrecognized arguments: --bogus",)),
    # -- flops
    (["flops", "--model", "DiT-Q/7"], ("DiT-Q/7",)),
    (["flops", "--model", "{W}/missing"], ("missing",)),
    (["flops", "--model", "{W}/notes.txt"], ("notes.txt",)),
    (["flops", "--model", "{W}/empty_dir"], ("empty_dir",)),
    (["flops", "--model", "{W}/bad_json"], ("not valid JSON",)),
    (["flops", "--model", "{W}/no_heads"], ("missing field(s) num_heads",)),
    (["flops", "--model", "{W}/foreign_json"], ("unknown model_type",)),
    (["flops", "--model", "DiT-S/2", "--steps", "0"], ("--steps", "> 0")),
    (["flops", "--model", "DiT-S/2", "--image-size", "100"], ("100",)),
    (["flops", "--model", "DiT-S/2", "--r-min", "1.5"], ("--r-min", "[0, 1)")),
    (["flops", "--model", "SparseDiT-S/2", "--r-min", "0.8", "--r-max", "0.2"], ("0.8", "0.2")),
    (["flops", "--model", "DiT-S/2", "--r-min", "0.3"], ("--r-min", "sparse")),
    (["flops", "--model", "DiT-S/2", "--layout", "1,2,3"], ("layout",)),
    (["flops", "--model", "DiT-S/2", "--sampler", "dpm++"], ("--sampler",)),
    # -- sparsify
    (["sparsify", "{W}/missing", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("missing",)),
    (["sparsify", "{W}/dit", "--layout", "2,4,1,3,1,1,2", "--out", "{W}/new/s"], ("depth",)),
    (["sparsify", "{W}/dit", "--layout", "a,b", "--out", "{W}/new/s"], ("layout",)),
    (["sparsify", "{W}/dit", "--layout", TINY_LAYOUT, "--out", "{W}/notes.txt"], ("notes.txt", "file name")),
    (["sparsify", "{W}/dit", "--layout", TINY_LAYOUT, "--out", "{W}/empty_dir/model.pt"], ("model.pt", "file name")),
    (["sparsify", "{W}/dit", "--layout", TINY_LAYOUT, "--out", "{W}/dit", "--overwrite"], ("destroy",)),
    (["sparsify", "{W}/dit", "--layout", TINY_LAYOUT, "--out", "{W}/busy"], ("busy", "holds no checkpoint")),
    (["sparsify", "{W}/dit", "--layout", TINY_LAYOUT, "--out", "{W}/sparse"], ("--overwrite",)),
    (["sparsify", "{W}/sparse", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("sparse",)),
    (["sparsify", "{W}/dit", "--layout", TINY_LAYOUT, "--r-max", "1", "--out", "{W}/new/s"], ("--r-max",)),
    (["sparsify", "{W}/dit", "--layout", TINY_LAYOUT, "--num-pieces", "0", "--out", "{W}/new/s"], ("--num-pieces",)),
    (["sparsify", "{W}/truncated", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("truncated",)),
    (["sparsify", "{W}/garbage.pt", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("garbage.pt",)),
    (["sparsify", "{W}/pickle.pt", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("pickle.pt",)),
    (["sparsify", "{W}/empty.pt", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("empty.pt",)),
    # -- convert
    (["convert", "{W}/dit", "{W}/new/c"], ("--to",)),
    (["convert", "{W}/dit", "{W}/new/c", "--to", "onnx"], ("--to",)),
    (["convert", "{W}/missing", "{W}/new/c", "--to", "sparsedit"], ("missing",)),
    (["convert", "{W}/dit", "{W}/notes.txt", "--to", "diffusers"], ("notes.txt",)),
    (["convert", "{W}/dit", "{W}/busy", "--to", "diffusers"], ("busy", "holds no checkpoint")),
    (["convert", "{W}/dit", "{W}/sparse", "--to", "sparsedit"], ("--overwrite",)),
    (["convert", "{W}/sparse", "{W}/new/c", "--to", "diffusers"], ("diffusers",)),
    (["convert", "{W}/dit", "{W}/new/c.pt", "--to", "official-sparsedit"], ("SparseDiT",)),
    (["convert", "{W}/dit", "{W}/new/c", "--to", "sparsedit", "--r-min", "0.3"], ("--r-min", "dense")),
    (["convert", "{W}/dit", "{W}/new/c", "--to", "sparsedit", "--semantic-size", "4"], ("--semantic-size",)),
    (["convert", "{W}/no_heads", "{W}/new/c", "--to", "sparsedit"], ("num_heads",)),
    (["convert", "{W}/pickle.pt", "{W}/new/c", "--to", "sparsedit"], ("pickle.pt",)),
    # -- sample
    (["sample", *SMALL], ("--ckpt",)),
    (["sample", "--ckpt", "{W}/missing", *SMALL, "--out", "{W}/new/a.png"], ("missing",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--out", "{W}/old.png"], ("old.png", "--overwrite")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--out", "{W}/busy"], ("busy", "is a directory")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--out", "{W}/new/a.jpg"], ("a.jpg", ".png")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--out", "{W}/new/a.gif"], ("a.gif",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--out", "{W}/new/a.mp4"], ("a.mp4", "video models")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--class-labels", "7", "--out", "{W}/new/a.png"], ("7",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--class-labels", "-1", "--out", "{W}/new/a.png"], ("-1",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--class-labels", "x", "--out", "{W}/new/a.png"], ("'x'",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--vae", "{W}/busy", "--out", "{W}/new/a.png"], ("--vae",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--prompt", "a dog", "--out", "{W}/new/a.png"], ("--prompt",)),
    (["sample", "--ckpt", "{W}/dit", "--steps", "0", "--out", "{W}/new/a.png"], ("--steps", "> 0")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--nrow", "0", "--out", "{W}/new/a.png"], ("--nrow",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--device", "tpu", "--out", "{W}/new/a.png"], ("device",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--sampler", "euler"], ("--sampler",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--cfg-mode", "some"], ("--cfg-mode",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--pipeline", "{W}/busy", "--out", "{W}/new/a.png"], ("--pipeline",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--guidance", "3", "--out", "{W}/new/a.png"], ("--guidance",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--guidance", "0", "--out", "{W}/new/a.png"], ("--guidance",)),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt", "a dog", "--pipeline", "{W}/busy",
      "--out", "{W}/new/a.png"], ("--pipeline is not read", "--t5")),
    (["encode-prompts", "--pipeline", "{W}/missing", "--prompt", "a", "--out", "{W}/new/p.safetensors"],
     ("model_index.json",)),
    (["encode-prompts", "--pipeline", "{W}/busy", "--prompt", "a", "--out", "{W}/new/p.txt"], (".safetensors",)),
    (["encode-prompts", "--pipeline", "{W}/busy", "--prompts-file", "{W}/missing.txt", "--out", "{W}/new/p.safetensors"],
     ("missing.txt", "does not exist")),
    (["encode-prompts", "--pipeline", "{W}/busy", "--prompts-file", "{W}/busy", "--out", "{W}/new/p.safetensors"],
     ("directory",)),
    (["encode-prompts", "--t5", "{W}/busy", "--prompt", "a", "--negative-prompt", "b", "--no-negative",
      "--out", "{W}/new/p.safetensors"], ("contradict",)),
    (["encode-prompts", "--t5", "{W}/busy", "--pipeline", "{W}/busy", "--prompt", "a", "--out", "{W}/new/p.safetensors"],
     ("not allowed with",)),
    (["encode-prompts", "--t5", "{W}/busy", "--out", "{W}/new/p.safetensors"], ("--prompt",)),
    (["train", "--init-from", "{W}/dit", "--prompt-embeds", "{W}/embeds_ok.safetensors", "--run-dir", "{W}/new/r"],
     ("--data-free",)),
    (["train", "--init-from", "{W}/dit", "--data-free", "4", "--prompt-embeds", "{W}/embeds_ok.safetensors", "--data",
      "digits", "--run-dir", "{W}/new/r"], ("drop --data",)),
    (["train", "--init-from", "{W}/dit", "--data-free", "4", "--prompt-embeds", "{W}/embeds_ok.safetensors",
      "--distill-weight", "1", "--run-dir", "{W}/new/r"], ("takes no prompts",)),
    (["sample", "--ckpt", "{W}/bad_json", *SMALL, "--out", "{W}/new/a.png"], ("not valid JSON",)),
    (["sample", "--ckpt", "{W}/truncated", *SMALL, "--out", "{W}/new/a.png"], ("truncated",)),
    # -- sample-fid
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", *SMALL,
      "--out", "{W}/notes.txt"], ("notes.txt", "is a file")),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "0", "--batch-size", "2", *SMALL,
      "--out", "{W}/new/f"], ("--num-samples", "> 0")),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "-2", *SMALL,
      "--out", "{W}/new/f"], ("--batch-size",)),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", *SMALL,
      "--out", "{W}/new/f", "--pack", "{W}/old.npz"], ("old.npz", "--overwrite")),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", *SMALL,
      "--out", "{W}/new/f", "--pack", "{W}/old.png"], ("old.png", ".npz")),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", *SMALL,
      "--out", "{W}/new/f", "--vae", "{W}/busy"], ("--vae",)),
    (["sample-fid", "--ckpt", "{W}/missing", "--num-samples", "4", "--batch-size", "2", *SMALL,
      "--out", "{W}/new/f"], ("missing",)),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", *SMALL,
      "--out", "{W}/new/f", "--device", "cuda:x"], ("device",)),
    # -- analyze
    ([*ANALYZE, "--out", "{W}/notes.txt", "--no-plots"], ("notes.txt",)),
    ([*ANALYZE, "--out", "{W}/busy", "--no-plots"], ("busy", "holds no analysis")),
    (["analyze", "--ckpt", "{W}/dit", *SMALL, "--max-k", "9", "--out", "{W}/new/an", "--no-plots"], ("--max-k",)),
    ([*ANALYZE, "--seeds", "0", "--out", "{W}/new/an"], ("--seeds", "> 0")),
    ([*ANALYZE, "--classes", "9", "--out", "{W}/new/an", "--no-plots"], ("9",)),
    ([*ANALYZE, "--target-ratio", "0.5", "--out", "{W}/new/an"], ("--propose",)),
    ([*ANALYZE, "--propose", "--target-ratio", "0.5", "--target-gmacs", "1",
      "--out", "{W}/new/an"], ("not allowed with",)),
    ([*ANALYZE, "--rate-spread", "1", "--propose", "--out", "{W}/new/an"],
     ("--rate-spread",)),
    (["analyze", "--ckpt", "{W}/sparse", *SMALL, "--out", "{W}/new/an", "--no-plots"], ("sparse",)),
    ([*ANALYZE, "--vae", "{W}/busy", "--out", "{W}/new/an", "--no-plots"], ("--vae",)),
    # -- train
    ([*TINY_TRAIN, "--run-dir", "{W}/busy"], ("busy", "not a sparsedit run")),
    ([*TINY_TRAIN, "--run-dir", "{W}/notes.txt"], ("notes.txt",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--data", "{W}/missing"], ("missing",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--data", "{W}/notes.txt"], ("notes.txt",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--batch-size", "0"], ("--batch-size", "> 0")),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--steps", "-5"], ("--steps",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--grad-accum", "3"], ("grad",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--precision", "fp8"], ("--precision",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--recipe", "magic"], ("--recipe",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--recipe", "distill"], ("teacher",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--num-heads", "3"], ("3",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--image-size", "15"], ("15",)),
    (["train", "--init-from", "{W}/missing", "--run-dir", "{W}/new/r"], ("missing",)),
    (["train", "--init-from", "{W}/dit", "--layout", "2,4,1,3,1,1,2", "--run-dir", "{W}/new/r"], ("depth",)),
    (["train", "--init-from", "{W}/sparse", "--run-dir", "{W}/new/r"], ("4 classes vs 10",)),
    (["train", "--run-dir", "{W}/new/r"], ("--model", "--init-from")),
    # -- bench
    (["bench", "--a", "DiT-Q/7"], ("DiT-Q/7",)),
    (["bench", "--a", "{W}/missing", "--b", "{W}/sparse"], ("missing",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--batch-size", "0"], ("--batch-size", "> 0")),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--dtype", "int8"], ("--dtype",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--device", "tpu"], ("device",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--t", "5000"], ("5000",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--image-size", "100"], ("100",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--cuda-graphs", "--device", "cpu"], ("--cuda-graphs",)),
    # -- compare
    (["compare", "{W}/dit", "{W}/missing", "--out", "{W}/new/cmp"], ("missing",)),
    (["compare", "{W}/dit", "{W}/sparse", "--num-samples", "1", "--out", "{W}/new/cmp"], ("--num-samples",)),
    (["compare", "{W}/dit", "{W}/sparse", "--cfg-scales", "0", "--out", "{W}/new/cmp"], ("--cfg-scales", "> 0")),
    (["compare", "{W}/dit", "{W}/sparse", "--seeds", "-1", "--out", "{W}/new/cmp"], ("--seeds", "[0, 2**63)")),
    (["compare", "{W}/dit", "{W}/sparse", "--out", "{W}/notes.txt"], ("notes.txt",)),
    (["compare", "{W}/dit", "{W}/sparse", "--out", "{W}/busy"], ("busy",)),
    (["compare", "{W}/dit", "{W}/sparse", "--device", "tpu", "--out", "{W}/new/cmp"], ("device",)),
    # -- demo
    (["demo", "--out", "{W}/busy"], ("busy",)),
    (["demo", "--out", "{W}/notes.txt"], ("notes.txt",)),
    (["demo", "--out", "{W}/new/d", "--finetune-steps", "0"], ("--finetune-steps", "> 0")),
    (["demo", "--out", "{W}/new/d", "--lr", "nan"], ("--lr", "finite")),
    (["demo", "--out", "{W}/new/d", "--ema-decay", "2"], ("--ema-decay",)),
    (["demo", "--out", "{W}/new/d", "--num-samples", "-3"], ("--num-samples",)),
    (["demo", "--out", "{W}/new/d", "--layout", "9,9,9,9,9,9,9"], ("layout",)),
    (["demo", "--out", "{W}/new/d", "--dit", "{W}/missing"], ("missing",)),
    (["demo", "--out", "{W}/new/d", "--recipe", "magic"], ("magic",)),
    (["demo", "--out", "{W}/new/d", "--threads", "-1"], ("--threads",)),
    # -- extract-latents
    (["extract-latents", "--data", "{W}/missing", "--vae", "{W}/busy", "--out", "{W}/new/l"], ("missing",)),
    (["extract-latents", "--data", "{W}/busy", "--vae", "{W}/missing", "--out", "{W}/new/l"], ("class subfolders",)),
    (["extract-latents", "--data", "{W}/busy", "--vae", "{W}/busy", "--out", "{W}/notes.txt"], ("notes.txt",)),
    (["extract-latents", "--data", "{W}/busy", "--vae", "{W}/busy", "--out", "{W}/new/l", "--image-size", "0"],
     ("--image-size",)),
    # -- seeds torch cannot take; --model / --image-size that a checkpoint directory would silently ignore
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--seed", "99999999999999999999"], ("--seed", "2**63")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--seed", "-1"], ("--seed", "2**63")),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--seed", "1e3"], ("--seed", "not an integer")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--image-size", "32", "--out", "{W}/new/a.png"], ("8x8", "--image-size")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--model", "DiT-XL/2", "--out", "{W}/new/a.png"], ("drop --model",)),
    (["sparsify", "{W}/dit", "--model", "DiT-S/2", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("drop --model",)),
    (["sample-fid", "--ckpt", "{W}/dit", "--image-size", "64", "--num-samples", "4", "--batch-size", "2", *SMALL,
      "--out", "{W}/new/f"], ("--image-size",)),
    (["convert", "{W}/dit", "{W}/new/c", "--to", "sparsedit", "--image-size", "256"], ("--image-size",)),
    # -- flags that would be silently ignored
    (["sample", "--ckpt", "{W}/dit", "--steps", "2", "--sampler", "ddpm", "--eta", "0.5", "--out", "{W}/new/a.png"],
     ("--eta", "DDIM")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--fps", "3", "--out", "{W}/new/a.png"], ("--fps",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--negative-prompt", "x", "--out", "{W}/new/a.png"], ("--negative-prompt",)),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--t5", "{W}/busy", "--out", "{W}/new/a.png"], ("--t5",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--r-min", "0.3"], ("--r-min", "--layout")),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--upsample", "bicubic"], ("--upsample", "--layout")),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--merge-lr-scale", "2"], ("--merge-lr-scale",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--vae", "{W}/busy"], ("--vae", "pixels")),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--num-workers", "-1"], ("--num-workers",)),
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--sample-every", "-1"], ("--sample-every",)),
    (["train", "--init-from", "{W}/dit", "--hidden-size", "64", "--image-size", "8", "--run-dir", "{W}/new/r"],
     ("--hidden-size", "drop")),
    (["train", "--init-from", "{W}/sparse", "--r-min", "0.3", "--run-dir", "{W}/new/r"], ("--r-min", "--layout")),
    (["train", "--data", "{W}/busy", "--channels", "3", "--model", "DiT-S/2", "--run-dir", "{W}/new/r"],
     ("--channels",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--compile-mode", "max-autotune"], ("--compile",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--compile", "--compile-backend", "bogus"], ("bogus",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--compile", "--compile-mode", "fastest"], ("fastest",)),
    ([*ANALYZE, "--sparse-out", "{W}/new/s", "--out", "{W}/new/an"], ("--sparse-out", "--propose")),
    ([*ANALYZE, "--propose", "--target-ratio", "1.5", "--out", "{W}/new/an"], ("--target-ratio",)),
    (["extract-latents", "--data", "{W}/busy", "--vae", "{W}/busy", "--out", "{W}/new/l", "--seed", "3"],
     ("--seed", "moments")),
    (["convert", "{W}/dit", "{W}/new/c", "--to", "diffusers", "--drop-null-caption"], ("--drop-null-caption",)),
    (["convert", "{W}/dit", "{W}/new/c", "--to", "sparsedit", "--drop-null-caption"], ("--drop-null-caption",)),
    (["convert", "{W}/sparse", "{W}/notes.txt", "--to", "official-sparsedit", "--overwrite"], ("notes.txt", ".pt")),
    (["convert", "{W}/sparse", "{W}/sparse", "--to", "sparsedit", "--overwrite"], ("destroy",)),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", *SMALL, "--out", "{W}/busy"],
     ("busy", "not a sample-fid run folder")),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", *SMALL, "--out", "{W}/dit"],
     ("not a sample-fid run folder",)),
    (["compare", "{W}/dit", "{W}/sparse", "--names", "a", "a", "--out", "{W}/new/cmp"], ("--names",)),
    (["compare", "{W}/dit", "{W}/sparse", "--names", "a|b", "c", "--out", "{W}/new/cmp"], ("--names",)),
    (["compare", "{W}/dit", "{W}/sparse", "--steps", "5000", "--out", "{W}/new/cmp"], ("5000",)),
    (["demo", "--out", "{W}/new/d", "--sampler", "ddpm", "--sample-steps", "5000"], ("5000",)),
    (["demo", "--out", "{W}/new/d", "--seed", "-4"], ("--seed",)),
    (["eval", "--samples", "{W}/busy", "--ref", "{W}/old.npz"], ("busy", "is a directory")),
    # -- an empty path would quietly be the current directory
    ([*TINY_TRAIN, "--run-dir", "{W}/new/r", "--data", ""], ("--data", "empty")),
    (["sample", "--ckpt", "", *SMALL], ("--ckpt", "empty")),
    (["sample-fid", "--ckpt", "{W}/dit", "--num-samples", "4", "--batch-size", "2", "--out", ""], ("--out", "empty")),
    (["convert", "", "{W}/new/c", "--to", "sparsedit"], ("PATH", "empty")),
    (["compare", "{W}/dit", " ", "--out", "{W}/new/cmp"], ("B", "empty")),
    # -- a pipe is no checkpoint (reading it would block); a dangling symbolic link is still the user's
    (["sparsify", "{W}/fifo", "--layout", TINY_LAYOUT, "--out", "{W}/new/s"], ("fifo", "regular file")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--out", "{W}/dangling.png"], ("dangling.png", "--overwrite")),
    # -- second probe round
    (["sparsify", "{W}/dit", "--layout", "SparseDiT-B/3", "--out", "{W}/new/s"], ("patch size 3",)),
    ([*ANALYZE, "--var-threshold", "0.3", "--out", "{W}/new/an"], ("--var-threshold", "--propose")),
    (["analyze", "--ckpt", "{W}/dit", *SMALL, "--max-k", "0", "--vae", "{W}/busy", "--out", "{W}/new/an"],
     ("--vae",)),
    ([*ANALYZE, "--propose", "--target-gmacs", "1000", "--out", "{W}/new/an"], ("--target-gmacs",)),
    (["compare", "{W}/dit", "{W}/sparse", "--cache-dir", "{W}/notes.txt", "--out", "{W}/new/cmp"], ("--cache-dir",)),
    (["convert", "{W}/sparse", "{W}/new/c.pt", "--to", "official-sparsedit"], ("latent models",)),
    (["sample", "--ckpt", "{W}/dit", "--steps", "2", "--cfg-scale", "1", "--cfg-mode", "all", "--out", "{W}/new/a.png"],
     ("--cfg-mode", "guidance is off")),
    (["sample", "--ckpt", "{W}/dit", *SMALL, "--bogus"], ("sparsedit sample: error: unrecognized arguments",)),
    (["bench", "--a", "DiT-S/2", "--b", "SparseDiT-S/2", "--threads", "100000"], ("--threads",)),
    (["demo", "--out", "{W}/new/d", "--dit", "{W}/sparse"], ("pixel-space class-conditional DiT",)),
    # -- third probe round: another library's config.json, caption embeddings of the wrong shape or type
    (["convert", "{W}/diff_patch_str", "{W}/new/c", "--to", "sparsedit"], ("patch_size must be a positive integer",)),
    (["convert", "{W}/diff_sample0", "{W}/new/c", "--to", "sparsedit"], ("sample_size must be a positive integer",)),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_2d.safetensors",
      "--out", "{W}/new/a.png"], ("prompt_embeds", "(N, L, 16)")),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_wide.safetensors",
      "--out", "{W}/new/a.png"], ("prompt_embeds", "(N, L, 16)")),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_int.safetensors",
      "--out", "{W}/new/a.png"], ("prompt_embeds", "float")),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_empty.safetensors",
      "--out", "{W}/new/a.png"], ("prompt_embeds", "L >= 1")),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_ok.safetensors", "--class-labels", "1",
      "--out", "{W}/new/a.png"], ("text-conditional", "--class-labels")),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_ok.safetensors", "--t5", "{W}/busy",
      "--out", "{W}/new/a.png"], ("--t5", "--prompt")),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_extra.safetensors",
      "--out", "{W}/new/a.png"], ("extra",)),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_mask0.safetensors",
      "--out", "{W}/new/a.png"], ("prompt_mask", "at least one token")),
    (["sample", "--ckpt", "{W}/pixart", *SMALL, "--prompt-embeds", "{W}/embeds_neg.safetensors", "--cfg-scale", "1",
      "--out", "{W}/new/a.png"], ("negative_embeds", "guidance")),
    # -- eval
    (["eval", "--samples", "{W}/missing.npz", "--ref", "{W}/old.npz"], ("missing.npz",)),
    (["eval", "--samples", "{W}/notes.txt", "--ref", "{W}/old.npz"], ("notes.txt",)),
    (["eval", "--samples", "{W}/old.npz", "--ref", "{W}/garbage.npz"], ("garbage.npz",)),
    (["eval", "--samples", "{W}/old.npz", "--ref", "{W}/old.npz", "--batch-size", "0"], ("--batch-size",)),
    (["eval", "--samples", "{W}/old.npz", "--ref", "{W}/old.npz", "--inception-weights", "{W}/missing.pt"],
     ("missing.pt",)),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    from helpers import Exploit
    from sparsedit.families.dit.sparsify import sparsify

    w = tmp_path_factory.mktemp("workspace")
    torch.manual_seed(0)
    dit = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                        num_classes=4, data_space="pixel"))
    save_pretrained(dit, w / "dit")
    save_pretrained(sparsify(dit, layout=TINY_LAYOUT), w / "sparse")
    for name, change in (("bad_json", None), ("no_heads", "num_heads"), ("foreign_json", "model_type"),
                         ("truncated", "weights")):
        save_pretrained(dit, w / name)
        config = json.loads((w / name / "config.json").read_text())
        if change is None:
            (w / name / "config.json").write_text('{"model_type": "DiT", "depth": ')
        elif change == "weights":
            weights = w / name / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:500])
        else:
            config.pop(change) if change == "num_heads" else config.update(model_type="Transformer9000")
            (w / name / "config.json").write_text(json.dumps(config))
    (w / "notes.txt").write_text("the user's notes")
    (w / "empty.pt").write_bytes(b"")
    (w / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    (w / "garbage.npz").write_bytes(bytes(range(256)) * 8)
    (w / "pickle.pt").write_bytes(__import__("pickle").dumps({"model": Exploit(w / "executed")}))
    (w / "old.png").write_bytes(b"\x89PNG not really")
    np.savez(w / "old.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    from safetensors.torch import save_file

    from sparsedit.families.pixart.model import PixArt, PixArtConfig
    from sparsedit.loading import save_model

    for name, change in (("diff_patch_str", {"patch_size": "2"}), ("diff_sample0", {"sample_size": 0})):
        save_model(dit, w / name, fmt="diffusers")
        config = json.loads((w / name / "config.json").read_text())
        (w / name / "config.json").write_text(json.dumps({**config, **change}))
    save_pretrained(PixArt(PixArtConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                                        num_heads=2, caption_channels=16, null_caption_length=4, data_space="pixel")),
                    w / "pixart")
    for name, embeds in (("embeds_2d", torch.randn(4, 16)), ("embeds_wide", torch.randn(1, 4, 32)),
                         ("embeds_int", torch.ones(1, 4, 16, dtype=torch.int64)), ("embeds_empty", torch.randn(1, 0, 16))):
        save_file({"prompt_embeds": embeds}, str(w / f"{name}.safetensors"))
    ok = torch.randn(1, 4, 16)
    save_file({"prompt_embeds": ok}, str(w / "embeds_ok.safetensors"))
    save_file({"prompt_embeds": ok, "extra": ok.clone()}, str(w / "embeds_extra.safetensors"))
    save_file({"prompt_embeds": ok, "prompt_mask": torch.zeros(1, 4)}, str(w / "embeds_mask0.safetensors"))
    save_file({"prompt_embeds": ok, "negative_embeds": ok.clone()}, str(w / "embeds_neg.safetensors"))
    (w / "empty_dir").mkdir()
    os.mkfifo(w / "fifo")
    (w / "dangling.png").symlink_to(w / "nowhere.png")
    (w / "busy").mkdir()
    (w / "busy" / "keep.txt").write_text("keep me")
    return w


def _ids(value: object) -> str | None:
    return " ".join(value)[:80] if isinstance(value, list) else None


@pytest.mark.parametrize(("argv", "words"), BAD_INPUTS, ids=_ids)
def test_bad_input_table(argv: list[str], words: tuple[str, ...], workspace: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(workspace / "new", ignore_errors=True)  # a failure of an earlier row must not fail this one
    before = files_under(workspace)
    args = [a.replace("{W}", str(workspace)) for a in argv]
    try:
        code = main(args)
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "error: " in err and all(w.replace("{W}", str(workspace)) in err for w in words), err
    assert files_under(workspace) == before
    assert not (workspace / "new").exists() and not (workspace / "executed").exists()
    assert (workspace / "dangling.png").is_symlink() and (workspace / "fifo").is_fifo()


def test_the_table_covers_every_sub_command() -> None:
    from sparsedit.cli import COMMANDS

    assert len(BAD_INPUTS) >= 100
    covered = {argv[0] for argv, _ in BAD_INPUTS if argv}
    assert covered >= set(COMMANDS), set(COMMANDS) - covered


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="non-UTF-8 file names are a Linux matter")
def test_a_checkpoint_at_a_non_utf8_path_loads_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Linux file names are bytes; safetensors only opens UTF-8 paths. What sparsedit writes there it must read."""
    from sparsedit.core.checkpoint import load_pretrained

    out = tmp_path / os.fsdecode(b"ckpt-\xff")
    save_pretrained(tiny_model(0), out)
    loaded = load_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_model(0).state_dict().values(),
                                                 strict=True))
    png = tmp_path / os.fsdecode(b"samples-\xfe.png")
    assert main(["sample", "--ckpt", str(out), *SMALL, "--out", str(png), "--no-progress"]) == 0
    assert png.is_file()


def test_analyze_output_is_replaced_whole_and_only_with_overwrite(workspace: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.replace("{W}", str(workspace)) for a in ANALYZE] + ["--no-plots", "--no-progress", "--seeds", "1",
                                                                  "--out", str(tmp_path / "an")]
    assert main(args) == 0
    first = files_under(tmp_path)
    assert main([*args, "--seed", "1"]) == 2
    assert "already holds an analysis; pass --overwrite" in capsys.readouterr().err
    assert files_under(tmp_path) == first
    (tmp_path / "an" / "notes.txt").write_text("mine")
    assert main([*args, "--seed", "1", "--overwrite"]) == 2
    assert "did not write there (notes.txt)" in capsys.readouterr().err
    (tmp_path / "an" / "notes.txt").unlink()
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    second = files_under(tmp_path)
    assert sorted(second) == sorted(first) and second != first
    assert [p.name for p in tmp_path.iterdir()] == ["an"]  # no hidden temporary or old directory left


def test_a_failed_diffusers_export_leaves_nothing(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import sparsedit.core.formats as convert_module

    def disk_full(path: Path, data: dict[str, object]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(convert_module, "write_json", disk_full)
    assert main(["convert", str(workspace / "dit"), str(tmp_path / "diff"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'diff' / 'config.json'}: no space left" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_misuse_in_one_line(workspace: Path, tmp_path: Path) -> None:
    """The documented functions take the wrong types with a SparseditError that says what to pass."""
    import sparsedit
    from sparsedit.errors import SparseditError

    dit = sparsedit.load_model(workspace / "dit")
    calls = [
        (lambda: sparsedit.sparsify(dit, "SparseDiT-B/2"), "layout='SparseDiT-B/2'"),
        (lambda: sparsedit.sparsify(dit, layout=5), "not a int"),
        (lambda: sparsedit.sparsify(dit, layout="SparseDiT-B/4"), "patch size 4"),
        (lambda: sparsedit.save_pretrained(dit, workspace / "dit", overwrite="no"), "True or False"),
        (lambda: sparsedit.save_pretrained(dit.state_dict(), tmp_path / "x"), "not a OrderedDict"),
        (lambda: sparsedit.load_model(None), "not None"),
        (lambda: sparsedit.load_model(""), "not ''"),
        (lambda: sparsedit.load_model(workspace / "dit", dtype="float16"), "torch.dtype"),
        (lambda: sparsedit.load_model(workspace / "dit", device="tpu"), "unknown device"),
    ]
    before = files_under(workspace)
    for call, words in calls:
        with pytest.raises(SparseditError) as err:
            call()
        assert "\n" not in str(err.value) and words in str(err.value), str(err.value)
    assert files_under(workspace) == before


def test_sigterm_cleans_up_and_exits_143(tmp_path: Path) -> None:
    """`kill PID` mid-write: the hidden temporary directory goes, the earlier checkpoint stays, exit 143."""
    child = textwrap.dedent(f"""
        import argparse, sys, time
        from pathlib import Path
        from sparsedit.core.checkpoint import write_dir
        from sparsedit.cli.common import run_command
        def slow(tmp):
            (tmp / "half.bin").write_bytes(b"x")
            print("writing", flush=True)
            time.sleep(60)
        def cmd(args):
            write_dir(Path({str(tmp_path / "out")!r}), slow)
        sys.exit(run_command(argparse.Namespace(func=cmd, command="convert")))
    """)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert proc.stderr is not None and proc.stderr.read() == "sparsedit convert: terminated\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]
