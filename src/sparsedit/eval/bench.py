"""Throughput of two models side by side: per forward pass and per full sampling run.

Both models live in one process and are timed alternately (A B A B ...), after every token grid
either of them will use has been warmed up (compiled, CUDA-graph captured), so slow drifts of the
machine (thermal, other jobs) hit both alike. What is timed (throughput per
forward pass or per full sampling run, always saying which):

* **forward**: one model evaluation on ``batch_size`` images at timestep ``forward_t`` (default
  ``T // 2``), its sparse grid from the model's schedule at that timestep and passed explicitly. With
  classifier-free guidance the model runs on the doubled batch (2 x ``batch_size`` rows) and the
  guidance arithmetic is included; images/s still counts ``batch_size`` images.
* **run**: a full sampling run, ``sparsedit.diffusion.samplers.sample`` with ``steps`` respaced DDPM or DDIM
  steps (flow-matching families: the pipeline's Euler steps, ``sparsedit.diffusion.flow.euler_sample``),
  **including the sampler's arithmetic** (fp32 posterior mean / variance, noise); every step
  uses the grid the schedule gives its timestep. ``sampler_s`` times the same run with a model that
  returns a constant tensor, i.e. the sampler's own share.

MACs come from :mod:`sparsedit.eval.flops` (counted from the model on the meta device) (per image; a SparseDiT's per-step cost is the mean
over the run's steps), so achieved GMAC/s and the FLOPs ratio sit next to the measured speedup.
Timers: ``time.perf_counter`` with a CUDA synchronize on both sides; everything under
``torch.inference_mode()``.

The parts live in :mod:`sparsedit.eval.bench_setup` (statistics, settings, the models),
:mod:`sparsedit.eval.bench_runner` (one model prepared for timing) and :mod:`sparsedit.eval.bench_report`
(markdown); all are re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.encoders.vae import VAE_DOWNSAMPLE
from sparsedit.errors import SparseditError
from sparsedit.eval.bench_report import format_markdown
from sparsedit.eval.bench_runner import ModelRunner
from sparsedit.eval.bench_setup import (
    COMPILE_MODES,
    DTYPES,
    SAMPLERS,
    BenchSettings,
    Clock,
    Grid,
    Stats,
    Tokens,
    build_bench_model,
    cheap_init_,
    run_timesteps,
)
from sparsedit.eval.flops import forward_macs, schedule_macs

__all__ = [
    "COMPILE_MODES",
    "DTYPES",
    "SAMPLERS",
    "BenchSettings",
    "Clock",
    "Grid",
    "ModelRunner",
    "Stats",
    "Tokens",
    "bench_forward",
    "bench_pair",
    "bench_run",
    "build_bench_model",
    "cheap_init_",
    "format_markdown",
    "run_timesteps",
]

SCHEMA = "sparsedit.eval.bench/1"


# ------------------------------------------------------------------------------------------------
# timed units
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _raise_recompile_limit(needed: int) -> None:
    """Let dynamo keep one graph per grid: its per-function recompile limit defaults to 8."""
    import torch._dynamo as dynamo

    cfg = dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < needed:
            setattr(cfg, name, needed)


@dataclass
class _Contender:
    """A model with everything prepared for its timed forward and its timed sampling run."""

    runner: ModelRunner
    timesteps: list[int]
    forward_t: int
    x: Tensor
    cond: dict[str, Tensor]
    t: Tensor
    grids: list[Tokens]
    diffusion: Any
    sampler: str
    forward_s: list[float] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)
    sampler_s: list[float] = field(default_factory=list)
    warmup_forwards: int = 0
    warmup_s: float = 0.0

    @classmethod
    def prepare(cls, model: nn.Module, settings: BenchSettings, name: str) -> _Contender:
        from sparsedit.diffusion.process import create_diffusion

        runner = ModelRunner(model, settings, name)
        T = runner.num_timesteps
        forward_t = T // 2 if settings.forward_t is None else settings.forward_t
        if not 0 <= forward_t < T:
            raise SparseditError(f"forward timestep {forward_t} is outside [0, {T}); pick e.g. {T // 2}")
        family = runner.family
        sampler = settings.sampler or family.default_sampling[0]
        if sampler not in family.samplers:
            raise SparseditError(f"{name} samples with {' or '.join(family.samplers)}, not {sampler}; pass --sampler "
                                 f"{family.samplers[0]}")
        if sampler == "euler":  # flow matching: the pipeline's sigmas x 1000, noisiest first
            timesteps: list[Any] = sorted(family.sampling_timesteps(sampler, settings.steps), reverse=True)
        else:
            timesteps = run_timesteps(settings.steps, sampler, T)
        x, cond = runner.inputs(settings.seed)
        # Flow timesteps are fractional (sigma x 1000): the forward's t has the run's dtype, or a compiled model would
        # recompile for it inside the timed forward phase.
        t = torch.full((settings.rows,), forward_t, dtype=torch.float32 if sampler == "euler" else torch.long,
                       device=settings.device)
        diffusion = create_diffusion(None, learn_sigma=runner.config.learn_sigma, num_train_timesteps=T)
        return cls(runner, timesteps, forward_t, x, cond, t, runner.grids_for(timesteps), diffusion, sampler)

    @property
    def forward_grid(self) -> Tokens:
        return self.runner.grid_at(self.forward_t)

    def distinct_grids(self) -> list[Tokens]:
        """Every token set a timed call will use: the forward's, then the run's, each once."""
        seen: list[Tokens] = []
        for g in [self.forward_grid, *self.grids]:
            if g not in seen:
                seen.append(g)
        return seen

    def forward(self) -> Tensor:
        return self.runner(self.x, self.t, self.cond, self.forward_grid)

    def warm_up(self, clock: Clock) -> None:
        """``warmup`` untimed forwards at every distinct token set (compiles / captures there)."""
        s = self.runner.settings
        if s.compile:
            _raise_recompile_limit(len(self.distinct_grids()) + 2)
        start = clock()
        for grid in self.distinct_grids():
            t_value = self.forward_t if grid == self.forward_grid else self.timesteps[self.grids.index(grid)]
            dtype = torch.float32 if self.sampler == "euler" else torch.long  # flow timesteps are fractional
            t = torch.full((s.rows,), t_value, dtype=dtype, device=s.device)
            for _ in range(s.warmup):
                try:
                    self.runner(self.x, t, self.cond, grid)
                except SparseditError:
                    raise
                except Exception as err:
                    if not s.compile:
                        raise
                    raise SparseditError(
                        f"torch.compile (backend {s.to_dict()['compile_backend']!r}) failed for {self.runner.name}: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; try "
                        "--compile-backend aot_eager, or drop --compile"
                    ) from err
                self.warmup_forwards += 1
        _sync(s.device)
        self.warmup_s = clock() - start

    def sampling_run(self, model_fn: Callable[..., Tensor] | None = None) -> Tensor:
        """One full sampling run; each step's model call uses that step's scheduled tokens."""
        from sparsedit.diffusion.samplers import sample

        s = self.runner.settings
        grids: Iterator[Tokens] = iter(self.grids)

        def step(x: Tensor, t: Tensor) -> Tensor:
            grid = next(grids, "exhausted")  # the sampler visits self.timesteps in order: no device sync for t
            if grid == "exhausted":
                raise SparseditError(f"the sampler made more model calls than the {len(self.grids)} scheduled steps")
            return (self.runner if model_fn is None else model_fn)(x, t, self.cond, grid)

        if self.sampler == "euler":
            from sparsedit.diffusion.flow import T_SCALE, euler_sample

            sigmas = [t / T_SCALE for t in self.timesteps] + [0.0]
            out = euler_sample(step, self.x, sigmas)
        else:
            out = sample(step, tuple(self.x.shape), sampler=self.sampler, steps=s.steps, diffusion=self.diffusion,
                         noise=self.x, device=s.device, progress=False)
        if next(grids, "done") != "done":
            raise SparseditError(f"the sampler made fewer model calls than the {len(self.grids)} scheduled steps")
        return out

    def null_model(self) -> Callable[..., Tensor]:
        """A stand-in model returning a constant output of the right shape (times the sampler alone)."""
        c = self.runner.config
        zeros = torch.zeros(self.x.shape[0], c.out_channels, *self.x.shape[2:], device=self.x.device)
        return lambda x, t, cond, tokens: zeros


def _time(fn: Callable[[], Any], device: torch.device, clock: Clock) -> float:
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def _model_summary(c: _Contender, name: str, settings: BenchSettings) -> dict[str, Any]:
    config, family = c.runner.config, c.runner.family
    forward_gmacs = forward_macs(config, c.forward_grid).gmacs
    run_cost = schedule_macs(config, c.timesteps)
    rows, steps = settings.rows, len(c.timesteps)
    factor = VAE_DOWNSAMPLE if config.data_space == "latent" else 1
    h, w = config.latent_hw
    out: dict[str, Any] = {
        "name": name,
        "model_type": config.model_type,
        "params": sum(p.numel() for p in c.runner.model.parameters()),
        "dtype": str(c.runner.dtype).removeprefix("torch."),
        "image_size": [h * factor, w * factor],
        **({"frames": c.runner.family.frames} if c.runner.family.frames is not None else {}),
        "grid": list(config.grid),
        "r_min": getattr(config, "r_min", None),
        "r_max": getattr(config, "r_max", None),
        "forward_t": c.forward_t,
        **family.describe(c.forward_grid),
        "forward_gmacs": forward_gmacs,
        "gmacs": run_cost["gmacs"],
        "run_grids": run_cost["grids"],
        "warmup_forwards": c.warmup_forwards,
        "warmup_s": c.warmup_s,
    }
    if c.forward_s:
        fwd = Stats.of(c.forward_s, 1e3)
        med_s = fwd.median / 1e3
        out.update(forward_ms=fwd.to_dict(), images_per_sec=settings.batch_size / med_s,
                   gmacs_per_sec=forward_gmacs * rows / med_s)
    if c.run_s:
        run = Stats.of(c.run_s)
        out.update(run_s=run.to_dict(), run_images_per_sec=settings.batch_size / run.median,
                   run_gmacs_per_sec=run_cost["gmacs"] * steps * rows / run.median)
    if c.sampler_s:
        out["sampler_s"] = Stats.of(c.sampler_s).to_dict()
    return out


def _machine(settings: BenchSettings) -> dict[str, Any]:
    dev = settings.device
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ------------------------------------------------------------------------------------------------
# public entry points
# ------------------------------------------------------------------------------------------------


def bench_forward(
    model: nn.Module,
    batch_size: int,
    t: int,
    *,
    settings: BenchSettings | None = None,
    clock: Clock = time.perf_counter,
) -> Stats:
    """Forward-pass latency of one model at timestep ``t`` (milliseconds).

    ``settings`` supplies dtype handling, device, guidance, compile / CUDA graphs and the repeat counts;
    ``batch_size`` and ``t`` override its fields. Warm-up forwards are run first and not timed.
    """
    s = dataclasses.replace(settings or BenchSettings(device=next(model.parameters()).device),
                            batch_size=batch_size, forward_t=t, run_warmup=0)
    with torch.inference_mode():
        c = _Contender.prepare(model, s, "model")
        c.timesteps, c.grids = [], []  # forward only: warm up the forward's grid alone
        c.warm_up(clock)
        samples = [_time(c.forward, s.device, clock) for _ in range(s.repeats)]
    return Stats.of(samples, 1e3)


def bench_run(
    model: nn.Module,
    *,
    settings: BenchSettings | None = None,
    clock: Clock = time.perf_counter,
) -> Stats:
    """Seconds per full sampling run of one model (``settings.steps`` steps, sampler arithmetic included).

    Every grid of the run is warmed up first (``settings.warmup`` forwards each, untimed), then
    ``settings.run_warmup`` untimed runs, then ``settings.run_repeats`` (at least 1) timed runs.
    """
    s = settings or BenchSettings(device=next(model.parameters()).device)
    with torch.inference_mode():
        c = _Contender.prepare(model, s, "model")
        if s.warmup:
            c.warm_up(clock)
        for _ in range(s.run_warmup):
            c.sampling_run()
        samples = [_time(c.sampling_run, s.device, clock) for _ in range(max(1, s.run_repeats))]
    return Stats.of(samples)


def bench_pair(
    a: nn.Module,
    b: nn.Module,
    settings: BenchSettings | None = None,
    *,
    names: tuple[str, str] = ("A", "B"),
    clock: Clock = time.perf_counter,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``a`` and ``b`` in one process, interleaved A B A B, and return a JSON-ready dict.

    Order: warm-up of A's then B's grids (untimed); ``repeats`` x (forward A, forward B);
    ``run_warmup`` x (run A, run B) untimed; ``sampler_s``: one sampler-only run per model and repeat;
    ``run_repeats`` x (run A, run B). Keys: ``settings``, ``machine``, ``models`` (``a``/``b``: name,
    ``forward_ms`` (median/min/max/iqr/mean/n/samples), ``images_per_sec``, ``forward_gmacs``,
    ``gmacs_per_sec``, ``run_s``, ``run_images_per_sec``, ``gmacs`` (per image per step, mean over the
    run), ``run_gmacs_per_sec``, ``sampler_s`` ...), ``pair`` (``speedup`` and ``flops_ratio``, each
    ``{"forward", "run"}``, as A / B so > 1 means B is faster / cheaper; ``speed_per_flops`` =
    speedup / flops_ratio, 1.0 when time follows MACs exactly), ``order`` (every timed unit in the
    order it ran), ``load_average`` (start, end) and ``elapsed_s``.
    """
    s = settings or BenchSettings(device=next(a.parameters()).device)
    say = log or (lambda msg: None)
    start = clock()
    load_start = _load_average()
    order: list[dict[str, Any]] = []
    with torch.inference_mode():
        pair = [_Contender.prepare(a, s, names[0]), _Contender.prepare(b, s, names[1])]
        if pair[0].sampler != pair[1].sampler:
            raise SparseditError(f"{names[0]} samples with {pair[0].sampler} and {names[1]} with {pair[1].sampler}; "
                                 "compare models of one kind of process (pass --sampler to pick one both take)")
        s = dataclasses.replace(s, sampler=pair[0].sampler)  # the report names the sampler that ran
        keys = ("a", "b")
        for c in pair:
            say(f"warm-up {c.runner.name}: {s.warmup} forward(s) at each of {len(c.distinct_grids())} grid(s)"
                + (" (compiling)" if s.compile else ""))
            c.warm_up(clock)
        for i in range(s.repeats):
            say(f"forward {i + 1}/{s.repeats}")
            for key, c in zip(keys, pair, strict=True):
                c.forward_s.append(_time(c.forward, s.device, clock))
                order.append({"model": key, "phase": "forward", "repeat": i})
        for i in range(s.run_warmup):
            say(f"warm-up run {i + 1}/{s.run_warmup}")
            for c in pair:
                c.sampling_run()
        for i in range(s.run_repeats):
            for key, c in zip(keys, pair, strict=True):
                null = c.null_model()
                c.sampler_s.append(_time(lambda c=c, null=null: c.sampling_run(null), s.device, clock))
                order.append({"model": key, "phase": "sampler", "repeat": i})
        for i in range(s.run_repeats):
            say(f"sampling run {i + 1}/{s.run_repeats} ({s.steps} {pair[0].sampler} steps each)")
            for key, c in zip(keys, pair, strict=True):
                c.run_s.append(_time(c.sampling_run, s.device, clock))
                order.append({"model": key, "phase": "run", "repeat": i})
    models = {key: _model_summary(c, name, s) for key, c, name in zip(keys, pair, names, strict=True)}
    ma, mb = models["a"], models["b"]
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {**s.to_dict(), "rows_per_forward": s.rows, "timesteps": pair[0].timesteps,
                     "run_includes": "sampler arithmetic (fp32 DDPM/DDIM update) and every model call",
                     "forward_includes": "one model evaluation" + (" on the doubled batch + guidance" if s.guided else "")},
        "machine": _machine(s),
        "models": models,
        "pair": _pair_ratios(ma, mb),
        "order": order,
        "load_average": {"start": load_start, "end": _load_average()},
        "elapsed_s": clock() - start,
    }
    return result


def _pair_ratios(ma: dict[str, Any], mb: dict[str, Any]) -> dict[str, Any]:
    speedup: dict[str, float | None] = {"forward": None, "run": None}
    if "forward_ms" in ma and "forward_ms" in mb:
        speedup["forward"] = ma["forward_ms"]["median"] / mb["forward_ms"]["median"]
    if "run_s" in ma and "run_s" in mb:
        speedup["run"] = ma["run_s"]["median"] / mb["run_s"]["median"]
    flops = {"forward": ma["forward_gmacs"] / mb["forward_gmacs"], "run": ma["gmacs"] / mb["gmacs"]}
    per_flops = {k: (None if speedup[k] is None else speedup[k] / flops[k]) for k in flops}
    return {"speedup": speedup, "flops_ratio": flops, "speed_per_flops": per_flops}
