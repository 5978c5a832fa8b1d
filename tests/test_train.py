"""Tests for training (:mod:`sparsedit.train.trainer`, ``sparsedit train``): determinism, a tiny overfit,
kill-and-resume equivalence with a real subprocess and SIGKILL (DiT and SparseDiT fine-tuning),
settings validation, run-directory safety, NaN handling, checkpoint pruning and the final model.

Everything runs on CPU with tiny models (hidden 32, 2-4 blocks) on the embedded 16 px digits.
Distributed (DDP / FSDP under torchrun) tests live in ``test_train_distributed.py``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import digits, settings
from sparsedit import load_model, save_model
from sparsedit.cli import main
from sparsedit.core.checkpoint import read_safetensors
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import DiT, dit_config
from sparsedit.families.dit.sparse import SparseDiT
from sparsedit.train.trainer import StepBatchSampler, Trainer, list_checkpoints

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--batch-size", "8"]
SPARSE_LAYOUT = "1,1,1,0,1,0,1"  # pool, SDTM (gen, recover), top: 4 blocks


def tiny_dit(depth: int = 2) -> DiT:
    """A 16 px, 1-channel pixel-space DiT for the digits: 8 x 8 tokens, hidden 32."""
    torch.manual_seed(0)
    cfg = dit_config("DiT-S/2", 16, vae_downsample=1, in_channels=1, num_classes=10, hidden_size=32, depth=depth,
                     num_heads=2, data_space="pixel")
    return DiT(cfg)




def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]  # a line being appended right now is skipped
    return [json.loads(line) for line in complete.splitlines() if line]


def losses(run_dir: Path) -> list[tuple[int, float, float, float, str]]:
    """Everything a step logs except its wall-clock rate."""
    return [(r["step"], r["loss"], r["mse"], r["vb"], r["grid"]) for r in records(run_dir)]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


# ------------------------------------------------------------------------------------------------
# determinism and learning
# ------------------------------------------------------------------------------------------------


def test_steps_are_deterministic_given_the_seed(tmp_path: Path) -> None:
    def run(name: str, seed: int) -> tuple[list[Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        trainer = Trainer(tiny_dit(), digits(), tmp_path / name, settings(seed=seed), progress=False)
        trainer.fit()
        return losses(tmp_path / name), trainer.raw.state_dict(), trainer.ema.state_dict()

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert [r[0] for r in a[0]] == [1, 2] and all(math.isfinite(r[1]) for r in a[0])
    assert a[0] == b[0]
    assert_states_equal(a[1], b[1])
    assert_states_equal(a[2], b[2])
    assert a[0][0][1] != c[0][0][1] and a[0][1][1] != c[0][1][1]
    assert not torch.equal(a[1]["final_layer.linear.weight"], c[1]["final_layer.linear.weight"])


def test_loss_falls_on_a_tiny_overfit(tmp_path: Path) -> None:
    trainer = Trainer(tiny_dit(), digits(32), tmp_path / "run",
                      settings(steps=100, batch_size=16, lr=1e-3, ckpt_every=1000), progress=False)
    trainer.fit()
    loss = [r[1] for r in losses(tmp_path / "run")]
    assert len(loss) == 100
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < 0.4 * first, (first, last)  # about 0.97 -> 0.13 in practice


def test_step_batch_sampler_order_is_a_function_of_seed_and_step() -> None:
    def take(sampler: StepBatchSampler, k: int) -> list[list[int]]:
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    full = take(StepBatchSampler(20, 3, rank=0, world=2, seed=5, start_step=0), 10)  # 3 batches per epoch
    assert take(StepBatchSampler(20, 3, rank=0, world=2, seed=5, start_step=4), 6) == full[4:]
    other = take(StepBatchSampler(20, 3, rank=1, world=2, seed=5, start_step=0), 3)
    assert not set(sum(full[:3], [])) & set(sum(other[:3], []))  # ranks see disjoint items in an epoch
    assert full[:3] != full[3:6]  # a new permutation each epoch
    with pytest.raises(SparseditError, match="fewer than one global batch"):
        StepBatchSampler(5, 3, rank=0, world=2, seed=0, start_step=0)


# ------------------------------------------------------------------------------------------------
# kill and resume
# ------------------------------------------------------------------------------------------------


def train_command(run_dir: Path, steps: int, model_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sparsedit", "train", *model_args, "--steps", str(steps), "--ckpt-every", "2",
            "--log-every", "1", "--no-progress", "--device", "cpu", "--run-dir", str(run_dir)]


def child_env() -> dict[str, str]:
    # One intra-op thread: on a shared box thread contention makes tiny steps 100x slower.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_and_kill(cmd: list[str], run_dir: Path, kill_at: int, timeout: float = 120.0) -> bool:
    """Start ``cmd``; SIGKILL it once it has logged step ``kill_at`` and written a checkpoint.

    Returns False if it finished on its own first (the caller retries with more steps).
    """
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = proc.poll() is not None
            log = records(run_dir)
            if log and log[-1]["step"] >= kill_at and list_checkpoints(run_dir):
                if done:
                    break
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if done:
                break
            time.sleep(0.005)
        else:
            raise AssertionError(f"no step {kill_at} within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 0, stderr
    return False


@pytest.fixture(scope="module")
def sparse_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block tiny DiT checkpoint (random, non-zero adaLN) to fine-tune as a SparseDiT."""
    model = tiny_dit(depth=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return save_model(model, tmp_path_factory.mktemp("src") / "dit4")


@pytest.mark.parametrize("kind", ["dit", "sparsedit"])
def test_kill_and_resume_logs_the_same_losses(kind: str, tmp_path: Path, sparse_source: Path) -> None:
    model_args = TINY if kind == "dit" else ["--init-from", str(sparse_source), "--layout", SPARSE_LAYOUT,
                                             "--batch-size", "8"]
    kill_at = 5  # after the step-4 checkpoint
    for attempt, steps in enumerate((16, 64, 256)):
        killed_dir = tmp_path / f"killed{attempt}"
        if start_and_kill(train_command(killed_dir, steps, model_args), killed_dir, kill_at):
            break
    else:
        pytest.fail("the run always finished before it could be killed")
    cmd = train_command(killed_dir, steps, model_args)
    partial = losses(killed_dir)
    assert kill_at <= partial[-1][0] < steps and not (killed_dir / "model").exists()
    resumed_from = list_checkpoints(killed_dir)[-1].name
    out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"from step {int(resumed_from[5:])} ({resumed_from})" in out.stdout
    ref_dir = tmp_path / "reference"  # uninterrupted, in this process (one thread, like the child)
    assert main(train_command(ref_dir, steps, model_args)[3:]) == 0
    expected = losses(ref_dir)
    assert [r[0] for r in expected] == list(range(1, steps + 1))
    assert losses(killed_dir) == expected  # exactly equal, step for step
    assert partial == expected[: len(partial)]
    assert_states_equal(state_of(killed_dir / "model"), state_of(ref_dir / "model"))
    for name in ("model", "ema"):
        last = f"checkpoints/step_{steps:07d}/{name}"
        assert_states_equal(state_of(killed_dir / last), state_of(ref_dir / last))
    if kind == "sparsedit":
        assert isinstance(load_model(killed_dir / "model"), SparseDiT)
        assert len({r[4] for r in expected}) > 1 and "dense" not in {r[4] for r in expected}


def test_raising_steps_resumes_an_existing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", *TINY, "--ckpt-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu"]
    assert main([*base, "--steps", "2", "--run-dir", str(tmp_path / "a")]) == 0
    assert main([*base, "--steps", "4", "--run-dir", str(tmp_path / "a")]) == 0
    assert "resuming" in capsys.readouterr().out
    assert main([*base, "--steps", "4", "--run-dir", str(tmp_path / "b")]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["settings"]["steps"] == 4


# ------------------------------------------------------------------------------------------------
# settings and run-directory safety
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "world", "message"), [
    (dict(batch_size=6, grad_accum=4), 1, "--batch-size 6 is not divisible by world size 1 x --grad-accum 4; "
     "pick a multiple of 4"),
    (dict(batch_size=8), 3, "pick a multiple of 3"),
    (dict(precision="fp16"), 1, "--precision must be auto, fp32 or bf16, not 'fp16'"),
    (dict(steps=0), 1, "--steps must be > 0, got 0"),
    (dict(keep_last=0), 1, "--keep-last must be > 0"),
    (dict(lr=0.0), 1, "need --lr > 0"),
    (dict(ema_decay=1.0), 1, "0 <= --ema-decay < 1"),
    (dict(grad_clip=-1.0), 1, "--grad-clip >= 0"),
])
def test_settings_validation(kw: dict[str, Any], world: int, message: str) -> None:
    with pytest.raises(SparseditError) as err:
        settings(**kw).validate(world)
    assert message in str(err.value)


def test_trainer_validates_and_cli_rejects_bad_precision(tmp_path: Path) -> None:
    with pytest.raises(SparseditError, match="not divisible"):
        Trainer(tiny_dit(), digits(), tmp_path / "run", settings(batch_size=6, grad_accum=4), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--precision", "fp16", "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2


def test_run_dir_safety(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    base = ["train", *TINY, "--steps", "2", "--ckpt-every", "2", "--no-progress", "--device", "cpu",
            "--run-dir", str(run_dir)]
    assert main(base) == 0
    capsys.readouterr()
    before = (run_dir / "run.json").read_text()
    for extra, what in ((["--lr", "2e-4"], "differs in lr"), (["--hidden-size", "64"], "differs in model config"),
                        (["--seed", "1"], "differs in seed")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sparsedit train: error: ")
        assert what in err and "holds a different run" in err and "repeat the original command" in err
    assert (run_dir / "run.json").read_text() == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    assert main([*base[:-1], str(busy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and is not a sparsedit run" in err
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]


# ------------------------------------------------------------------------------------------------
# NaN handling, checkpoints and the final model
# ------------------------------------------------------------------------------------------------


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(tiny_dit(), digits(), tmp_path / "run", settings(steps=6, ckpt_every=2), progress=False)
    original = trainer.diffusion.training_losses

    def poisoned(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = original(*args, **kwargs)
        if trainer.step >= 2:  # step 3 on
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer.diffusion, "training_losses", poisoned)
    with pytest.raises(SparseditError) as err:
        trainer.fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert str(err.value).startswith(f"loss became nan at step 3; last good checkpoint: {ckpt}")
    assert "Lower --lr" in str(err.value)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_0000002"]
    assert [r[0] for r in losses(tmp_path / "run")] == [1, 2]


def test_diverging_lr_stops_with_one_line_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", *TINY, "--lr", "1e30", "--steps", "6", "--ckpt-every", "1", "--no-progress",
                 "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "sparsedit train: error: loss became" in err and "last good checkpoint: " in err
    step = int(err.split(" at step ")[1].split(";")[0])
    assert 2 <= step <= 6 and f"step_{step - 1:07d}" in err  # the checkpoint of the step before
    assert not (tmp_path / "run" / "model").exists()


def test_keep_last_and_the_final_model_is_the_latest_ema(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_dit(), digits(), run_dir, settings(steps=5, ckpt_every=1, keep_last=2, ema_decay=0.5),
                      progress=False)
    out = trainer.fit()
    assert out == run_dir / "model"
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_0000004", "step_0000005"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000004", "step_0000005"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_0000005").iterdir()) == [
        "ema", "model", "optimizer.pt", "rng_rank0.pt", "trainer.json"]
    assert json.loads((run_dir / "checkpoints" / "step_0000005" / "trainer.json").read_text()) == {
        "step": 5, "world_size": 1}
    final = load_model(out)
    assert isinstance(final, DiT) and final.config == trainer.config
    ema = trainer.ema.state_dict()
    assert_states_equal(final.state_dict(), ema)
    assert_states_equal(read_safetensors(run_dir / "checkpoints" / "step_0000005" / "ema" / "model.safetensors"), ema)
    assert_states_equal(state_of(run_dir / "checkpoints" / "step_0000005" / "model"), trainer.raw.state_dict())
    assert not torch.equal(ema["final_layer.linear.weight"], trainer.raw.state_dict()["final_layer.linear.weight"])
    assert [p.name for p in run_dir.rglob(".*")] == [".lock"]  # no temp leftovers; the run lock stays


def test_ema_follows_the_decay(tmp_path: Path) -> None:
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in tiny_dit().state_dict().items()}
    trainer = Trainer(tiny_dit(), digits(), tmp_path / "run", settings(steps=1, ema_decay=0.75, ema_warmup=False),
                      progress=False)
    trainer.fit()
    model, ema = trainer.raw.state_dict(), trainer.ema.state_dict()
    for k, v in init.items():
        if v.is_floating_point():
            torch.testing.assert_close(ema[k], 0.75 * v + 0.25 * model[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [
    dict(precision="bf16"),
    dict(grad_accum=2, grad_checkpointing=True, grad_clip=0.0, weight_decay=0.01),
    dict(sample_every=2),
])
def test_training_flags_run(kw: dict[str, Any], tmp_path: Path) -> None:
    trainer = Trainer(tiny_dit(), digits(), tmp_path / "run", settings(**kw), progress=False)
    trainer.fit()
    log = losses(tmp_path / "run")
    assert [r[0] for r in log] == [1, 2] and all(math.isfinite(r[1]) for r in log)
    if kw.get("sample_every"):
        assert (tmp_path / "run" / "samples" / "step_0000002.png").exists()


def test_sparsedit_batches_share_one_grid_per_step(tmp_path: Path, sparse_source: Path) -> None:
    from sparsedit.families.dit.sparsify import sparsify

    model = sparsify(load_model(sparse_source), layout=SPARSE_LAYOUT).train()
    trainer = Trainer(model, digits(), tmp_path / "run", settings(steps=6, grad_accum=2), progress=False)
    assert trainer.pieces is not None
    drawn: list[Any] = []
    sample = trainer.pieces.sample

    def recording(n: int, device: Any = None) -> Any:
        t, piece = sample(n, device)
        drawn.append((trainer.step, piece, t))
        return t, piece

    trainer.pieces.sample = recording  # type: ignore[method-assign]
    trainer.fit()
    assert [d[0] for d in drawn] == [s for s in range(6) for _ in range(2)]  # one piece per micro-batch
    for _, piece, t in drawn:
        assert t.shape == (4,) and ((piece.t_start <= t) & (t < piece.t_end)).all()
        assert len({model.config.schedule.grid(int(v), model.config.grid) for v in t}) == 1
    logged = [r[4] for r in losses(tmp_path / "run")]
    # the log shows the grid of the step's last micro-batch
    assert logged == [f"{p.grid[0]}x{p.grid[1]}" for _, p, _ in drawn[1::2]]


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code = main(["train", *TINY, "--fsdp", "--steps", "1", "--no-progress", "--device", "cpu",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "torchrun" in capsys.readouterr().err
