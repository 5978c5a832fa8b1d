"""Distributed training on CPU: ``torchrun --nproc_per_node=2`` with gloo, DDP and FSDP2.

* ``torchrun --nproc_per_node=2 -m sparsedit train`` (DDP) exits 0 and its checkpoints load in one process;
* a worker script (written below, run with torchrun) checks that DDP replicas stay bitwise in sync
  step by step, that the saved checkpoints equal the in-memory model and EMA (DDP, and FSDP run through
  the CLI's ``main([... "--fsdp"])``), and that
  a SparseDiT under DDP draws one schedule piece (one token grid) per rank and micro-batch, with
  different timesteps per rank, and that the per-rank piece samplers cover every piece;
* a thread simulation of two ranks preparing a fresh run directory (no rank may refuse it).

Select or skip them with ``-m distributed`` / ``-m "not distributed"`` (or ``-k distributed``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from sparsedit import load_model
from sparsedit.cli import main
from sparsedit.core.checkpoint import read_safetensors

# The marker is not registered in pyproject/conftest (a ``pytest_configure`` hook in a test module is
# never called: pytest only runs hooks of plugins and conftest files); selecting by an unregistered
# marker works, so only its "unknown mark" warning is silenced here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    distributed = pytest.mark.distributed

pytestmark = [distributed, pytest.mark.usefixtures("single_thread")]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TINY = ["--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--batch-size", "8"]
SPARSE_LAYOUT = "1,1,1,0,1,0,1"


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def torchrun(args: list[str], timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*TORCHRUN, *args], env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"torchrun {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


# ------------------------------------------------------------------------------------------------
# the CLI under torchrun
# ------------------------------------------------------------------------------------------------


def test_cli_ddp_under_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``torchrun --nproc_per_node=2 -m sparsedit train ...`` (the worker below runs the ``--fsdp`` CLI)."""
    run_dir = tmp_path / "run"
    args = [*TINY, "--ckpt-every", "2", "--log-every", "1"]
    out = torchrun(["-m", "sparsedit", "train", *args, "--steps", "3", "--no-progress", "--device", "cpu",
                    "--run-dir", str(run_dir)])
    assert out.stdout.count("done: 3 steps") == 1  # rank 0 reports
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["grid"] == "dense" for r in log)
    last = run_dir / "checkpoints" / "step_0000003"
    assert sorted(p.name for p in last.iterdir()) == ["ema", "model", "optimizer.pt", "rng_rank0.pt",
                                                      "rng_rank1.pt", "trainer.json"]
    assert json.loads((last / "trainer.json").read_text()) == {"step": 3, "world_size": 2}
    assert json.loads((run_dir / "run.json").read_text())["settings"]["steps"] == 3
    # the checkpoint loads in this single process; the final model is its EMA
    model, ema, final = load_model(last / "model"), load_model(last / "ema"), load_model(run_dir / "model")
    assert_states_equal(final.state_dict(), ema.state_dict())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not torch.equal(model.state_dict()["final_layer.linear.weight"], ema.state_dict()["final_layer.linear.weight"])
    # the per-rank RNG states differ: each rank seeds seed * 1000 + rank
    rng = [torch.load(last / f"rng_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(rng[0]["generator"], rng[1]["generator"])
    # resuming with another number of processes is refused
    capsys.readouterr()
    code = main(["train", *args, "--steps", "5", "--no-progress", "--device", "cpu", "--run-dir", str(run_dir)])
    assert code == 2
    assert "was written by 2 ranks, this run has 1; resume with the same number of processes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# a worker: DDP sync, checkpoints equal the in-memory model (DDP and FSDP), SparseDiT pieces per rank
# ------------------------------------------------------------------------------------------------

WORKER = r'''
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sparsedit.cli import main
from sparsedit.train.data import DigitsDataset
from sparsedit.families.dit.model import DiT, dit_config
from sparsedit.families.dit.sparsify import sparsify
from sparsedit.train.trainer import Trainer, TrainSettings, init_distributed

OUT = Path(sys.argv[1])
D = init_distributed("cpu")
RANK = D.rank
DATA = DigitsDataset(split="train", resolution=16)
TRAINERS = []

# Keep every trainer for the checks below.
fit = Trainer.fit


def kept_fit(self):
    TRAINERS.append(self)
    return fit(self)


Trainer.fit = kept_fit


def tiny(depth=2):
    torch.manual_seed(0)
    cfg = dit_config("DiT-S/2", 16, vae_downsample=1, in_channels=1, num_classes=10, hidden_size=32, depth=depth,
                     num_heads=2, data_space="pixel")
    return DiT(cfg)


def make(name, model, **kw):
    s = dict(steps=2, batch_size=8, log_every=1, ckpt_every=2)
    s.update(kw)
    return Trainer(model, DATA, OUT / name, TrainSettings(**s), device="cpu", progress=False)


def full(module):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in module.state_dict().items()}


def checksum(module):
    flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
    return [flat.sum().item(), flat.square().sum().item(), flat.abs().max().item()]


# 1. DDP: replicas stay bitwise in sync after every step
ddp = make("ddp", tiny(), grad_accum=2)
sums = []
update = ddp._update_ema


def recording_update():
    update()
    sums.append(checksum(ddp.raw) + checksum(ddp.ema))


ddp._update_ema = recording_update
ddp.fit()
gathered = [None, None]
dist.all_gather_object(gathered, sums)
assert gathered[0] == gathered[1], gathered  # parameter checksums equal on every rank, step by step
torch.save({"model": full(ddp.raw), "ema": full(ddp.ema), "sums": sums}, OUT / f"ddp_rank{RANK}.pt")

# 2. FSDP2 through the CLI (as `torchrun -m sparsedit train --fsdp` runs it): the full (unsharded)
#    in-memory model and EMA, to compare with the checkpoint
code = main(["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
             "--batch-size", "8", "--steps", "2", "--ckpt-every", "2", "--log-every", "1", "--fsdp", "--no-progress",
             "--device", "cpu", "--run-dir", str(OUT / "fsdp")])
assert code == 0
fsdp = TRAINERS[-1]
assert fsdp.settings.fsdp and fsdp.step == 2
torch.save({"model": full(fsdp.raw), "ema": full(fsdp.ema),
            "sharded": [type(p).__name__ for p in fsdp.raw.parameters()]}, OUT / f"fsdp_rank{RANK}.pt")

# 3. SparseDiT under DDP: which piece, timesteps and sparse grid each rank uses per micro-batch
torch.manual_seed(1)
source = tiny(depth=4)
with torch.no_grad():
    for p in source.parameters():
        p.normal_(0.0, 0.05)
sparse = make("sparse", sparsify(source, layout="1,1,1,0,1,0,1").train(), steps=3, grad_accum=2)
draws, used = [], []
sample, sparse_grid = sparse.pieces.sample, sparse.raw.sparse_grid


def recording_sample(n, device=None):
    t, piece = sample(n, device)
    draws.append({"step": sparse.step, "t": t.tolist(), "piece": [piece.t_start, piece.t_end, list(piece.grid)]})
    return t, piece


def recording_grid(*args, **kwargs):
    grid = sparse_grid(*args, **kwargs)
    used.append(list(grid))
    return grid


sparse.pieces.sample = recording_sample
sparse.raw.sparse_grid = recording_grid
sparse.fit()
sparse.pieces.sample = sample
# a cheap sampler-only loop on the same per-rank generator: which pieces get drawn
coverage = [sample(1)[1].t_start for _ in range(60)]
pieces = [[p.t_start, p.t_end, list(p.grid)] for p in sparse.pieces.pieces]
(OUT / f"sparse_rank{RANK}.json").write_text(json.dumps(
    {"draws": draws, "used": used, "coverage": coverage, "pieces": pieces}))

# 4. distillation through the CLI: output + feature distillation under FSDP, data-free under DDP
if RANK == 0:
    from sparsedit import save_model

    save_model(source, OUT / "source")
dist.barrier()
base = ["train", "--init-from", str(OUT / "source"), "--layout", "1,1,1,0,1,0,1", "--batch-size", "8", "--steps", "2",
        "--ckpt-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu", "--min-snr-gamma", "5"]
assert main([*base, "--recipe", "distill-feature", "--fsdp", "--run-dir", str(OUT / "distill_fsdp")]) == 0
fsdp_distill = TRAINERS[-1]
assert fsdp_distill.settings.fsdp and fsdp_distill.teacher is not None
teacher_unchanged = all(torch.equal(a, b) for a, b in zip(fsdp_distill.teacher.state_dict().values(),
                                                             source.state_dict().values(), strict=True))
torch.save({"model": full(fsdp_distill.raw), "ema": full(fsdp_distill.ema), "teacher_unchanged": teacher_unchanged},
           OUT / f"distill_fsdp_rank{RANK}.pt")
assert main([*base, "--recipe", "data-free", "--data-free", "32", "--run-dir", str(OUT / "data_free_ddp")]) == 0
free = TRAINERS[-1]
torch.save({"model": full(free.raw), "samples": free.dataset.samples}, OUT / f"data_free_rank{RANK}.pt")

# 5. LoRA adapters under FSDP, then a resume of the same run one step further
lora_args = [*base, "--recipe", "paper", "--lora-rank", "2", "--fsdp", "--run-dir", str(OUT / "lora_fsdp")]
assert main(lora_args) == 0
lora = TRAINERS[-1]
torch.save({"model": full(lora.raw), "ema": full(lora.ema),
            "sharded": [type(p).__name__ for p in lora.raw.parameters()]}, OUT / f"lora_fsdp_rank{RANK}.pt")
assert main([*lora_args, "--steps", "3"]) == 0
torch.save({"model": full(TRAINERS[-1].raw), "step": TRAINERS[-1].step}, OUT / f"lora_fsdp_resumed_rank{RANK}.pt")
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("worker")
    script = out / "worker.py"
    script.write_text(WORKER)
    torchrun([str(script), str(out)])
    return out


def test_ddp_replicas_stay_in_sync_and_match_the_checkpoint(worker_out: Path) -> None:
    ranks = [torch.load(worker_out / f"ddp_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["sums"]) == 2 and ranks[0]["sums"] == ranks[1]["sums"]  # checked step by step
    for name in ("model", "ema"):
        assert_states_equal(ranks[0][name], ranks[1][name])
        saved = load_model(worker_out / "ddp" / "checkpoints" / "step_0000002" / name)
        assert_states_equal(saved.state_dict(), ranks[0][name])
    assert_states_equal(load_model(worker_out / "ddp" / "model").state_dict(), ranks[0]["ema"])


def test_fsdp_checkpoint_equals_the_in_memory_model(worker_out: Path) -> None:
    ranks = [torch.load(worker_out / f"fsdp_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert set(ranks[0]["sharded"]) == {"DTensor"}  # really sharded by fully_shard
    for name in ("model", "ema"):
        assert_states_equal(ranks[0][name], ranks[1][name])
        saved = read_safetensors(worker_out / "fsdp" / "checkpoints" / "step_0000002" / name / "model.safetensors")
        assert_states_equal(saved, ranks[0][name])
        assert_states_equal(load_model(worker_out / "fsdp" / "checkpoints" / "step_0000002" / name).state_dict(),
                            ranks[0][name])
    assert_states_equal(load_model(worker_out / "fsdp" / "model").state_dict(), ranks[0]["ema"])
    assert not torch.equal(ranks[0]["model"]["final_layer.linear.weight"], ranks[0]["ema"]["final_layer.linear.weight"])


def test_sparsedit_ranks_use_one_grid_per_step_and_cover_all_pieces(worker_out: Path) -> None:
    ranks = [json.loads((worker_out / f"sparse_rank{r}.json").read_text()) for r in (0, 1)]
    pieces = ranks[0]["pieces"]
    assert len(pieces) >= 2 and ranks[1]["pieces"] == pieces
    for rank in ranks:
        draws = rank["draws"]
        assert [d["step"] for d in draws] == [0, 0, 1, 1, 2, 2]  # one piece per micro-batch (grad_accum 2)
        assert len(rank["used"]) == len(draws)  # one forward per micro-batch ...
        for d, grid in zip(draws, rank["used"], strict=True):
            start, end, piece_grid = d["piece"]
            assert len(d["t"]) == 2 and all(start <= t < end for t in d["t"])  # 8 / (2 ranks x 2 micro)
            assert grid == piece_grid  # ... on the piece's grid
    t0 = [t for d in ranks[0]["draws"] for t in d["t"]]
    t1 = [t for d in ranks[1]["draws"] for t in d["t"]]
    assert t0 != t1  # ranks draw independently (generator seed * 1000 + rank)
    drawn = set(ranks[0]["coverage"]) | set(ranks[1]["coverage"])
    assert drawn == {p[0] for p in pieces}  # every piece gets trained
    assert ranks[0]["coverage"] != ranks[1]["coverage"]


def test_distillation_under_fsdp_and_data_free_under_ddp(worker_out: Path) -> None:
    ranks = [torch.load(worker_out / f"distill_fsdp_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["teacher_unchanged"] and ranks[1]["teacher_unchanged"]
    for name in ("model", "ema"):
        assert_states_equal(ranks[0][name], ranks[1][name])
        assert_states_equal(load_model(worker_out / "distill_fsdp" / "checkpoints" / "step_0000002" / name).state_dict(),
                            ranks[0][name])
    log = [json.loads(line) for line in (worker_out / "distill_fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["distill"] > 0 and r["feature"] > 0 for r in log)
    free = [torch.load(worker_out / f"data_free_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_states_equal(free[0]["model"], free[1]["model"])  # DDP replicas in sync
    assert torch.equal(free[0]["samples"], free[1]["samples"]) and free[0]["samples"].shape == (32, 1, 16, 16)
    cached = read_safetensors(worker_out / "data_free_ddp" / "teacher_samples" / "teacher_samples.safetensors")
    assert torch.equal(cached["samples"], free[0]["samples"])  # drawn once by rank 0, read by both


def test_lora_under_fsdp_trains_adapters_and_merges_and_resumes(worker_out: Path) -> None:
    from sparsedit.families.dit.sparsify import sparsify
    from sparsedit.train.lora import is_trainable, merge_lora_state

    ranks = [torch.load(worker_out / f"lora_fsdp_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert "DTensor" in ranks[0]["sharded"]  # the adapters really were sharded
    for name in ("model", "ema"):
        assert_states_equal(ranks[0][name], ranks[1][name])
        saved = load_model(worker_out / "lora_fsdp" / "checkpoints" / "step_0000002" / name).state_dict()
        assert_states_equal(saved, merge_lora_state(ranks[0][name], 1.0))  # the merged model (alpha = rank)
    fresh = sparsify(load_model(worker_out / "source"), layout=SPARSE_LAYOUT).state_dict()
    trained = ranks[0]["model"]
    frozen = {k.replace(".base_layer.", "."): v for k, v in trained.items() if not is_trainable(k)}
    assert_states_equal(frozen, {k: v for k, v in fresh.items() if not is_trainable(k)})  # adapters and merges move
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items() if "lora_B" in k)
    resumed = [torch.load(worker_out / f"lora_fsdp_resumed_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert resumed[0]["step"] == 3
    assert_states_equal(resumed[0]["model"], resumed[1]["model"])
    log = [json.loads(line) for line in (worker_out / "lora_fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# the fresh-run-dir race, simulated with two threads as ranks
# ------------------------------------------------------------------------------------------------


def test_fresh_run_dir_has_no_rank_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsedit.families.dit.model import DiT, dit_config
    from sparsedit.train import runs
    from sparsedit.train import trainer as T
    from sparsedit.train.data import DigitsDataset

    barrier = threading.Barrier(2, timeout=20)
    writing = threading.Event()  # rank 0 has started writing run.json
    checked = threading.Event()  # rank 1 is done looking at the run dir (it reached a barrier)

    class ThreadDist(T.Dist):
        def barrier(self) -> None:
            if self.rank == 1:
                checked.set()
            barrier.wait()

    real_write_json = runs.write_json

    def in_flight_write_json(path: Path, data: dict[str, Any]) -> None:
        # what atomic_write does: a temp file next to run.json, then a rename; hold it in flight
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        writing.set()
        checked.wait(timeout=3)
        os.unlink(tmp)
        real_write_json(path, data)

    monkeypatch.setattr(runs, "write_json", in_flight_write_json)  # _prepare_run_dir writes run.json there
    cfg = dit_config("DiT-S/2", 16, vae_downsample=1, in_channels=1, num_classes=10, hidden_size=32, depth=2,
                     num_heads=2, data_space="pixel")
    data = DigitsDataset(split="train", resolution=16)
    trainers = []
    for rank in (0, 1):
        trainer = T.Trainer(DiT(cfg), data, tmp_path / "run", T.TrainSettings(steps=1, batch_size=8), progress=False)
        trainer.dist = ThreadDist(rank=rank, world=2)
        trainers.append(trainer)
    errors: dict[int, BaseException] = {}

    def run(rank: int) -> None:
        if rank == 1:
            writing.wait(timeout=3)  # look while rank 0 writes, if rank 0 writes before a barrier
        try:
            trainers[rank]._prepare_run_dir()
        except Exception as err:  # reported by the main thread
            errors[rank] = err
            checked.set()
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if 1 in errors:
        raise errors[1]  # SparseditError: ... is not empty and is not a sparsedit run
    assert not errors, errors
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["steps"] == 1
