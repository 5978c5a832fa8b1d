"""Tests for the throughput benchmark (sparsedit.eval.bench) and the ``sparsedit bench`` command.

Everything runs on tiny models; nothing asserts on measured time. Where timing logic is checked
(warm-up excluded, speedup arithmetic) a fake clock advanced by forward hooks replaces
``time.perf_counter``, so the expected numbers are exact.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

from sparsedit.cli import bench as bench_cmd
from sparsedit.cli.common import Parser
from sparsedit.core.checkpoint import save_pretrained
from sparsedit.core.layers import sincos_pos_embed_2d
from sparsedit.errors import SparseditError
from sparsedit.eval.bench import (
    BenchSettings,
    Stats,
    bench_forward,
    bench_pair,
    bench_run,
    build_bench_model,
    format_markdown,
    run_timesteps,
)
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig

TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10)
LAYOUT = dict(pool_blocks=1, num_sdtm=1, gen_blocks=1, sparse_blocks=1, recovery_blocks=1, dense_blocks=1,
              top_blocks=1)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_dit() -> DiT:
    return build_bench_model(DiTConfig(**TINY))


def tiny_sparse(r_min: float = 0.3, r_max: float = 0.9) -> SparseDiT:
    """8 x 8 dense grid; r in [0.3, 0.9] gives several distinct sparse grids over a short run."""
    return build_bench_model(SparseDiTConfig(**TINY, **LAYOUT, r_min=r_min, r_max=r_max))


def light(**kw: Any) -> BenchSettings:
    base: dict[str, Any] = dict(steps=4, repeats=2, run_repeats=2, warmup=1)
    base.update(kw)
    return BenchSettings(**base)


class FakeClock:
    """A clock that only moves when a test's hook moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GridRecorder:
    """Forward pre-hook recording (timestep, grid) of every model call."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[int, tuple[int, int] | None]] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = args[1]
        self.calls.append((int(t[0]), kwargs.get("grid")))


# ------------------------------------------------------------------------------------------------
# statistics and helpers
# ------------------------------------------------------------------------------------------------


def test_stats_median_spread_and_scale() -> None:
    st = Stats.of([0.004, 0.001, 0.003, 0.002], scale=1e3)
    assert st.median == pytest.approx(2.5)
    assert (st.min, st.max) == (pytest.approx(1.0), pytest.approx(4.0))
    assert st.iqr == pytest.approx(3.25 - 1.75)  # numpy's linear quantiles
    assert st.n == 4 and st.samples == pytest.approx((4.0, 1.0, 3.0, 2.0))  # samples keep their order
    single = Stats.of([0.5])
    assert (single.median, single.iqr, single.n) == (0.5, 0.0, 1)
    with pytest.raises(SparseditError):
        Stats.of([])


def test_run_timesteps_follow_the_sampler_order() -> None:
    assert run_timesteps(5) == [999, 749, 500, 250, 0]
    assert run_timesteps(10, "ddim") == list(range(900, -1, -100))


def test_settings_validation() -> None:
    with pytest.raises(SparseditError, match="CUDA graphs need a CUDA device"):
        BenchSettings(cuda_graphs=True)
    with pytest.raises(SparseditError, match="sampler"):
        BenchSettings(sampler="dpm++")
    with pytest.raises(SparseditError, match="warm-up"):
        BenchSettings(compile=True, warmup=0)
    assert BenchSettings(cfg_scale=1.5, batch_size=3).rows == 6
    cpu = BenchSettings.for_device("cpu")
    assert (cpu.batch_size, cpu.steps, cpu.repeats, cpu.run_repeats) == (1, 10, 3, 2)


# ------------------------------------------------------------------------------------------------
# building models
# ------------------------------------------------------------------------------------------------


def test_presets_build_on_meta_with_cheap_init() -> None:
    model = build_bench_model("SparseDiT-S/8", image_size=256, r_min=0.5, r_max=0.8)
    assert isinstance(model, SparseDiT) and not model.training
    assert (model.config.r_min, model.config.r_max) == (0.5, 0.8)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() and p.abs().sum() > 0 for p in model.parameters())
    torch.testing.assert_close(model.pos_embed, sincos_pos_embed_2d(384, 4, 4)[None])
    dense = build_bench_model("DiT-S/8", image_size=256, r_min=0.5, r_max=0.8)  # rates ignored for a DiT
    assert type(dense) is DiT and dense.config.grid == (4, 4)
    with torch.inference_mode():
        out = model(torch.randn(1, 4, 32, 32), torch.tensor([900]), torch.tensor([3]))
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()
    half = build_bench_model("DiT-S/8", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(SparseditError, match="neither an existing checkpoint path nor a preset"):
        build_bench_model("DiT-XXL/2")
    with pytest.raises(SparseditError, match="SparseDiT preset"):
        build_bench_model("SparseDiT-XXL/2")


# ------------------------------------------------------------------------------------------------
# bench_pair: schema, order, warm-up, grids
# ------------------------------------------------------------------------------------------------

MODEL_KEYS = {"forward_ms", "images_per_sec", "run_s", "gmacs", "gmacs_per_sec", "forward_gmacs",
              "run_images_per_sec", "run_gmacs_per_sec", "sampler_s", "run_grids", "forward_grid", "params"}
STATS_KEYS = {"median", "min", "max", "iqr", "mean", "n", "samples"}


def test_json_schema() -> None:
    a, b = tiny_dit(), tiny_sparse()
    result = bench_pair(a, b, light(), names=("dense", "sparse"))
    result = json.loads(json.dumps(result))  # JSON-ready
    assert {"schema", "settings", "machine", "models", "pair", "order", "load_average", "elapsed_s"} <= set(result)
    for key, name in (("a", "dense"), ("b", "sparse")):
        m = result["models"][key]
        assert MODEL_KEYS <= set(m) and m["name"] == name
        for stats, n in (("forward_ms", 2), ("run_s", 2), ("sampler_s", 2)):
            assert set(m[stats]) == STATS_KEYS and m[stats]["n"] == n
            assert m[stats]["min"] <= m[stats]["median"] <= m[stats]["max"] and m[stats]["iqr"] >= 0
        assert m["images_per_sec"] == pytest.approx(1 / (m["forward_ms"]["median"] / 1e3))
        assert m["gmacs_per_sec"] == pytest.approx(m["forward_gmacs"] / (m["forward_ms"]["median"] / 1e3))
        assert m["run_gmacs_per_sec"] == pytest.approx(m["gmacs"] * 4 / m["run_s"]["median"])
    ma, mb = result["models"]["a"], result["models"]["b"]
    assert ma["forward_grid"] == [8, 8] and mb["forward_grid"] == list(b.config.schedule.grid(500, (8, 8)))
    pair = result["pair"]
    assert pair["speedup"]["forward"] == pytest.approx(ma["forward_ms"]["median"] / mb["forward_ms"]["median"])
    assert pair["speedup"]["run"] == pytest.approx(ma["run_s"]["median"] / mb["run_s"]["median"])
    assert pair["flops_ratio"]["run"] == pytest.approx(ma["gmacs"] / mb["gmacs"]) and pair["flops_ratio"]["run"] > 1
    assert pair["flops_ratio"]["forward"] == pytest.approx(ma["forward_gmacs"] / mb["forward_gmacs"])
    assert pair["speed_per_flops"]["run"] == pytest.approx(pair["speedup"]["run"] / pair["flops_ratio"]["run"])
    s = result["settings"]
    assert (s["dtype"], s["device"], s["batch_size"], s["compile"], s["cuda_graphs"]) == ("fp32", "cpu", 1, False, False)
    assert s["timesteps"] == run_timesteps(4) and "sampler arithmetic" in s["run_includes"]


def test_interleaved_order_a_b_a_b() -> None:
    result = bench_pair(tiny_dit(), tiny_sparse(), light(repeats=3, run_repeats=2))
    for phase, n in (("forward", 3), ("run", 2)):
        seen = [(o["model"], o["repeat"]) for o in result["order"] if o["phase"] == phase]
        assert seen == [(m, i) for i in range(n) for m in ("a", "b")]
    phases = [o["phase"] for o in result["order"]]
    assert phases.index("run") > max(i for i, p in enumerate(phases) if p == "forward")  # forwards first


def _distinct_grids(model: SparseDiT, timesteps: list[int], forward_t: int = 500) -> set[tuple[int, int]]:
    sched, dense = model.config.schedule, model.config.grid
    return {sched.grid(forward_t, dense), *sched.grids_for_timesteps(timesteps, dense)}


def test_warmup_is_excluded_from_timing() -> None:
    """Warm-up forwards cost 1000 s on the fake clock, timed ones 1 s (A) and 0.5 s (B)."""
    clock = FakeClock()
    a, b = tiny_dit(), tiny_sparse()
    steps, warmup = 4, 2
    n_warm = {"a": warmup * 1, "b": warmup * len(_distinct_grids(b, run_timesteps(steps)))}
    seen = Counter[str]()

    def cost(key: str, timed: float) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            seen[key] += 1
            clock.now += 1000.0 if seen[key] <= n_warm[key] else timed
        return hook

    a.register_forward_pre_hook(cost("a", 1.0))
    b.register_forward_pre_hook(cost("b", 0.5))
    result = bench_pair(a, b, light(steps=steps, warmup=warmup, repeats=3, run_repeats=2), clock=clock)
    ma, mb = result["models"]["a"], result["models"]["b"]
    assert (ma["warmup_forwards"], mb["warmup_forwards"]) == (n_warm["a"], n_warm["b"])
    assert ma["warmup_s"] == pytest.approx(1000.0 * n_warm["a"])
    assert ma["forward_ms"]["samples"] == [1000.0] * 3 and mb["forward_ms"]["samples"] == [500.0] * 3
    assert ma["run_s"]["samples"] == [4.0, 4.0] and mb["run_s"]["samples"] == [2.0, 2.0]
    assert ma["sampler_s"]["max"] == 0.0  # the sampler-only runs never call the model
    assert result["pair"]["speedup"] == {"forward": 2.0, "run": 2.0}
    assert seen == {"a": n_warm["a"] + 3 + 2 * steps, "b": n_warm["b"] + 3 + 2 * steps}


@pytest.mark.parametrize(("sampler", "steps", "cfg"), [("ddpm", 10, 1.0), ("ddim", 10, 4.0)])
def test_run_uses_the_schedule_grid_of_every_step(sampler: str, steps: int, cfg: float) -> None:
    model = tiny_sparse()
    recorder = GridRecorder(model)
    settings = light(sampler=sampler, steps=steps, cfg_scale=cfg, warmup=0, run_repeats=1, batch_size=2)
    stats = bench_run(model, settings=settings)
    assert stats.n == 1
    timesteps = run_timesteps(steps, sampler)
    expected = model.config.schedule.grids_for_timesteps(timesteps, model.config.grid)
    assert len(set(expected)) >= 3  # the run really changes grid
    assert Counter(g for _, g in recorder.calls) == Counter(expected)
    assert [t for t, _ in recorder.calls] == timesteps
    assert all(g == model.config.schedule.grid(t, model.config.grid) for t, g in recorder.calls)


def test_pair_warms_every_grid_before_timing() -> None:
    b = tiny_sparse()
    recorder = GridRecorder(b)
    steps = 6
    bench_pair(tiny_dit(), b, light(steps=steps, repeats=1, run_repeats=1, warmup=1))
    grids = _distinct_grids(b, run_timesteps(steps))
    warm = [g for _, g in recorder.calls[: len(grids)]]
    assert set(warm) == grids and len(warm) == len(grids)
    timed_run = [g for _, g in recorder.calls[len(grids) + 1:]]
    assert timed_run == b.config.schedule.grids_for_timesteps(run_timesteps(steps), b.config.grid)


def test_bench_forward_and_run_single_model() -> None:
    model = tiny_sparse()
    recorder = GridRecorder(model)
    stats = bench_forward(model, 3, 100, settings=light(repeats=4, warmup=2))
    assert stats.n == 4 and stats.min <= stats.median <= stats.max
    assert len(recorder.calls) == 2 + 4
    assert {g for _, g in recorder.calls} == {model.config.schedule.grid(100, model.config.grid)}
    run = bench_run(tiny_dit(), settings=light(steps=3, run_repeats=2, warmup=0))
    assert run.n == 2


def test_cfg_needs_a_null_class() -> None:
    model = build_bench_model(DiTConfig(**TINY, class_dropout_prob=0.0))
    with pytest.raises(SparseditError, match="null class"):
        bench_forward(model, 1, 500, settings=light(cfg_scale=4.0))


# ------------------------------------------------------------------------------------------------
# torch.compile: one graph per grid shape
# ------------------------------------------------------------------------------------------------


def test_compile_keeps_one_graph_per_grid() -> None:
    """A counting backend (no code generation) shows one compiled graph per distinct grid, all in warm-up."""
    torch._dynamo.reset()  # no graphs cached by an earlier test
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    b = tiny_sparse()
    steps = 2  # timesteps 999 and 0; the forward at t=0 adds no third grid
    grids = _distinct_grids(b, run_timesteps(steps), forward_t=0)
    assert len(grids) == 2
    a = tiny_dit()
    settings = light(steps=steps, repeats=1, run_repeats=1, forward_t=0, compile=True,
                     compile_backend=counting_backend)
    compiled_at_warmup: list[int] = []

    def log(msg: str) -> None:
        if msg.startswith("forward"):  # the first timed phase starts
            compiled_at_warmup.append(len(graphs))

    result = bench_pair(a, b, settings, log=log)
    assert len(graphs) == 1 + len(grids)  # DiT: one graph; SparseDiT: one per grid
    assert compiled_at_warmup == [1 + len(grids)]  # nothing compiled after the warm-up
    assert result["settings"]["compile"] and result["settings"]["compile_backend"] == "counting_backend"
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# markdown and the command
# ------------------------------------------------------------------------------------------------


def test_markdown_table_renders() -> None:
    result = bench_pair(tiny_dit(), tiny_sparse(), light(cfg_scale=1.5), names=("DiT-tiny", "SparseDiT-tiny"))
    text = format_markdown(result)
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| | A: DiT-tiny | B: SparseDiT-tiny | B vs A |" and table[1] == "|---|---|---|---|"
    assert all(line.count("|") == 5 for line in table)
    assert "speedup" in text and "FLOPs ratio" in text and "GMAC/s" in text and "cfg 1.5" in text
    assert "eager" in lines[0] and "cpu" in lines[0]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    bench_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    try:
        code = args.func(args)
    except SparseditError as err:
        code, err_text = 2, str(err)
        return code, capsys.readouterr().out, err_text
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_with_checkpoints_json_and_table(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dense = save_pretrained(tiny_dit(), tmp_path / "dense")
    sparse = save_pretrained(tiny_sparse(), tmp_path / "sparse")
    common = ["--a", str(dense), "--b", str(sparse), "--device", "cpu", "--steps", "3", "--repeats", "2",
              "--run-repeats", "1"]
    code, out, err = run_cli([*common, "--json", "--r-max", "0.95"], capsys)
    assert code == 0 and "timing (A B A B" in err
    result = json.loads(out)
    assert result["models"]["b"]["r_max"] == 0.95 and result["models"]["a"]["r_max"] is None
    assert result["settings"]["steps"] == 3 and result["total_elapsed_s"] >= result["elapsed_s"]
    code, out, _ = run_cli([*common, "--quick"], capsys)
    assert code == 0 and "| B vs A |" in out and "3 ddpm steps" in out and "total elapsed" in out


def test_cli_cuda_graphs_on_cpu_says_they_need_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--device", "cpu", "--cuda-graphs"], capsys)
    assert code == 2 and "CUDA graphs need a CUDA device" in err
