"""CUDA-only checks: the bf16, compiled and CUDA-graph paths agree with fp32 eager, at full model size.

Skipped without a GPU (CI has none). Run on a GPU machine with ``pytest -q tests/test_gpu.py``;
results are recorded in docs/BENCHMARKS.md. Weights are random (:func:`sparsedit.eval.bench.cheap_init_`,
N(0, 0.02^2), so no layer is zero-initialised and every block contributes); inputs are seeded.

Tolerances: bf16 keeps 8 mantissa bits, and with random weights the error grows through the blocks;
on an H100 (torch 2.11) the relative L2 error of the guided output was 2.4% (SparseDiT-XL/2,
SparseLatte-XL/2), 3.6% (SparsePixArt-XL/2) and 5.4% (DiT-XL/2), so the bound is 10% (a wrong
dtype path gives ~100%). inductor reorders fp32 reductions only (seen: 2-3e-6; bound 1e-4); a
replayed CUDA graph runs the very same kernels (exactly equal).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sparsedit.eval.bench import BenchSettings, ModelRunner, build_bench_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PRESETS = [("SparseDiT-XL/2", 256), ("DiT-XL/2", 256), ("SparsePixArt-XL/2", 256), ("SparseLatte-XL/2", 256)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(autouse=True)
def exact_fp32() -> Any:
    """fp32 means fp32 here: no TF32 matmuls (they would be the error being measured)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def evaluate(model: torch.nn.Module, settings: BenchSettings, t: int) -> torch.Tensor:
    runner = ModelRunner(model, settings)
    x, cond = runner.inputs(seed=0)
    tt = torch.full((settings.rows,), t, device=settings.device)
    with torch.inference_mode():
        return runner(x, tt, cond, runner.grid_at(t)).float()


@pytest.mark.parametrize("preset,size", PRESETS, ids=[p for p, _ in PRESETS])
def test_bf16_compiled_and_graphs_match_fp32_eager(preset: str, size: int, record_property: Any) -> None:
    batch = 1 if "Latte" in preset else 4
    model = build_bench_model(preset, size, device="cuda")
    base = dict(device="cuda", batch_size=batch, cfg_scale=4.0)
    refs = {t: evaluate(model, BenchSettings(**base), t) for t in (999, 100)}  # two different sparse grids
    for ref in refs.values():
        assert torch.isfinite(ref).all() and ref.abs().mean() > 0
    compiled = evaluate(model, BenchSettings(**base, compile=True), 999)  # one compile per test: XL takes a while
    record_property("compiled_rel_err", rel_err(compiled, refs[999]))
    assert rel_err(compiled, refs[999]) < 1e-4
    graphs = ModelRunner(model, BenchSettings(**base, cuda_graphs=True))
    x, cond = graphs.inputs(seed=0)
    for t, ref in refs.items():
        tt = torch.full((graphs.settings.rows,), t, device="cuda")
        with torch.inference_mode():
            first = graphs(x, tt, cond, graphs.grid_at(t)).float()  # captured here
            replay = graphs(x, tt, cond, graphs.grid_at(t)).float()
        torch.testing.assert_close(replay, first, rtol=0, atol=0)
        assert rel_err(first, ref) < 1e-4
    model.to(torch.bfloat16)
    for t, ref in refs.items():
        half = evaluate(model, BenchSettings(**base, dtype=torch.bfloat16), t)
        record_property(f"bf16_rel_err_t{t}", rel_err(half, ref))
        assert rel_err(half, ref) < 0.1


def test_cuda_fp32_matches_cpu_fp32(record_property: Any) -> None:
    """The same weights and inputs on CPU and GPU (fp32, no TF32) give the same SparseDiT-B/2 output."""
    model = build_bench_model("SparseDiT-B/2", 256)
    settings = BenchSettings(batch_size=2)
    cpu = evaluate(model, settings, 500)
    gpu = evaluate(model.cuda(), BenchSettings(batch_size=2, device="cuda"), 500).cpu()
    record_property("cuda_vs_cpu_rel_err", rel_err(gpu, cpu))
    assert rel_err(gpu, cpu) < 1e-5
