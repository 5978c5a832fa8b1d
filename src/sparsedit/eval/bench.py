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
  steps, **including the sampler's arithmetic** (fp32 posterior mean / variance, noise); every step
  uses the grid the schedule gives its timestep. ``sampler_s`` times the same run with a model that
  returns a constant tensor, i.e. the sampler's own share.

Analytic MACs come from :mod:`sparsedit.eval.flops` (per image; a SparseDiT's per-step cost is the mean
over the run's steps), so achieved GMAC/s and the FLOPs ratio sit next to the measured speedup.
Timers: ``time.perf_counter`` with a CUDA synchronize on both sides; everything under
``torch.inference_mode()``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.core.checkpoint import build_model
from sparsedit.diffusion.vae import VAE_DOWNSAMPLE
from sparsedit.errors import SparseditError
from sparsedit.eval.flops import forward_macs, schedule_macs
from sparsedit.families import family_of
from sparsedit.families.dit.model import CFG_MODES
from sparsedit.families.presets import is_sparse, preset_config, with_sparsity

__all__ = [
    "DTYPES",
    "BenchSettings",
    "ModelRunner",
    "Stats",
    "bench_forward",
    "bench_pair",
    "bench_run",
    "build_bench_model",
    "cheap_init_",
    "format_markdown",
    "run_timesteps",
]

Grid = tuple[int, int]
# The sparse token set of one model call: a grid (h, w) for DiT / PixArt, (grid, frames) for Latte;
# None for a dense model.
Tokens = Any
Clock = Callable[[], float]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLERS = ("ddpm", "ddim")
SCHEMA = "sparsedit.eval.bench/1"


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Summary of timed samples (all in one unit): median, min, max, interquartile range, mean, n."""

    median: float
    min: float
    max: float
    iqr: float
    mean: float
    n: int
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: Sequence[float], scale: float = 1.0) -> Stats:
        """Stats of ``samples`` multiplied by ``scale`` (e.g. 1e3 for seconds -> milliseconds)."""
        if not samples:
            raise SparseditError("no timed samples; use at least one repeat")
        values = sorted(float(v) * scale for v in samples)
        return cls(
            median=statistics.median(values), min=values[0], max=values[-1],
            iqr=_quantile(values, 0.75) - _quantile(values, 0.25), mean=statistics.fmean(values), n=len(values),
            samples=tuple(float(v) * scale for v in samples),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "iqr": self.iqr, "mean": self.mean,
                "n": self.n, "samples": list(self.samples)}


# ------------------------------------------------------------------------------------------------
# settings and models
# ------------------------------------------------------------------------------------------------


# torch.compile's modes (None: its default).
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class BenchSettings:
    """How to benchmark. The defaults are the light CPU ones (see ``for_device`` for CUDA's).

    ``repeats`` timed forwards and ``run_repeats`` timed sampling runs per model, interleaved;
    ``warmup`` untimed forwards per model and per distinct grid before any timing (this is where
    ``compile`` compiles and ``cuda_graphs`` captures, one graph per grid); ``run_warmup`` untimed
    sampling runs per model before the timed runs. ``forward_t`` (default ``T // 2``) is the
    timestep of the timed forward pass.
    """

    batch_size: int = 1
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    steps: int = 10
    sampler: str = "ddpm"
    cfg_scale: float = 1.0
    cfg_mode: str = "first3"
    repeats: int = 3
    run_repeats: int = 2
    warmup: int = 1
    run_warmup: int = 0
    forward_t: int | None = None
    compile: bool = False
    compile_backend: str | Callable[..., Any] = "inductor"
    compile_mode: str | None = None
    cuda_graphs: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.sampler not in SAMPLERS:
            raise SparseditError(f"unknown sampler {self.sampler!r} for bench; choose one of {', '.join(SAMPLERS)}")
        if self.cfg_mode not in CFG_MODES:
            raise SparseditError(f"unknown cfg mode {self.cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
        for name in ("batch_size", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise SparseditError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("run_repeats", "warmup", "run_warmup"):
            if getattr(self, name) < 0:
                raise SparseditError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.compile and isinstance(self.compile_backend, str):
            backends = torch.compiler.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise SparseditError(f"unknown torch.compile backend {self.compile_backend!r}; use one of "
                                     f"{', '.join(b for b in backends if 'TESTING' not in b)}")
        if self.compile_mode not in COMPILE_MODES:
            raise SparseditError(f"unknown torch.compile mode {self.compile_mode!r}; use one of "
                                 f"{', '.join(m for m in COMPILE_MODES if m)}")
        if self.compile and self.warmup < 1:
            raise SparseditError("--compile needs at least one warm-up forward per grid (it compiles there)")
        if self.cuda_graphs and self.device.type != "cuda":
            raise SparseditError(
                f"CUDA graphs need a CUDA device, but the device is {self.device.type}; drop --cuda-graphs "
                "(or run with --device cuda on a GPU machine)"
            )

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def rows(self) -> int:
        """Batch rows of one model evaluation: ``batch_size``, doubled under classifier-free guidance."""
        return self.batch_size * (2 if self.guided else 1)

    @classmethod
    def for_device(cls, device: str | torch.device, **overrides: Any) -> BenchSettings:
        """Defaults for ``device``: light on CPU; on CUDA batch 128 and more repeats (paper-like)."""
        dev = torch.device(device)
        base: dict[str, Any] = {"device": dev}
        if dev.type == "cuda":
            base.update(batch_size=128, steps=50, repeats=10, run_repeats=3, warmup=3, run_warmup=1)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dtype"] = next(k for k, v in DTYPES.items() if v == self.dtype)
        d["device"] = str(self.device)
        if not isinstance(self.compile_backend, str):
            d["compile_backend"] = getattr(self.compile_backend, "__name__", type(self.compile_backend).__name__)
        return d


@torch.no_grad()
def cheap_init_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Fill every parameter and buffer with a tiled block of N(0, std^2) values, then rebuild the tables.

    Meant for models built on the meta device and ``to_empty``'d: drawing ~700 M fresh random numbers
    costs more than the whole CPU benchmark's warm-up, while speed does not depend on the values (as
    long as they are finite and not denormal, which uninitialised memory might be). Buffers (PixArt's
    null caption, the sin-cos tables) are filled too; the position tables are then recomputed.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 20, generator=gen) * std).to(device)
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    for i, p in enumerate(tensors):
        flat = p.view(-1)
        offset = (i * 7919) % pool.numel()  # different tensors start at different places of the pool
        tiled = torch.cat([pool[offset:], pool[:offset]])
        for start in range(0, flat.numel(), tiled.numel()):
            chunk = flat[start:start + tiled.numel()]
            chunk.copy_(tiled[: chunk.numel()])
    if hasattr(model, "config"):
        family_of(model).reset_buffers(model)
    return model


def _with_rates(config: Any, r_min: float | None, r_max: float | None) -> Any:
    """A sparse config with the given rates (None keeps the model's); a dense config unchanged (they do not apply)."""
    return with_sparsity(config, None, {"r_min": r_min, "r_max": r_max}) if is_sparse(config) else config


def build_bench_model(
    spec: str | Path | Any,
    image_size: int = 256,
    r_min: float | None = None,
    r_max: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A model to benchmark, in eval mode on ``device`` in ``dtype``.

    ``spec``: a preset of any family (``"DiT-XL/2"``, ``"SparseDiT-XL/2"``, ``"PixArt-XL/2"``,
    ``"SparseLatte-XL/2"``, ... see :mod:`sparsedit.families.presets`; random weights, built on the meta
    device and filled by :func:`cheap_init_`), a checkpoint path (anything
    :func:`sparsedit.loading.load_model` reads; ``image_size`` only helps files that cannot tell),
    a config (built like a preset) or a ready model. ``r_min`` / ``r_max`` replace a sparse model's
    pruning-rate range and are ignored for a dense one (so one pair of flags serves both sides).
    """
    if isinstance(spec, (str, Path)) and Path(spec).exists():
        from sparsedit.loading import load_model

        spec = load_model(spec, image_size=image_size, device=device, dtype=dtype)
    if isinstance(spec, nn.Module):
        if is_sparse(getattr(spec, "config", None)):
            spec.config = _with_rates(spec.config, r_min, r_max)
        return spec.to(device=device, dtype=dtype).eval()
    if isinstance(spec, (str, Path)):
        config = preset_config(str(spec), image_size, r_min=r_min, r_max=r_max)
    else:
        config = _with_rates(spec, r_min, r_max)
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device=device)
    cheap_init_(model)
    return model.to(dtype=dtype).eval()


def run_timesteps(steps: int, sampler: str = "ddpm", num_timesteps: int = 1000) -> list[int]:
    """Original timesteps of a ``steps``-step DDPM / DDIM run, in the order the sampler visits them."""
    from sparsedit.diffusion.process import space_timesteps

    spec: str | int = f"ddim{steps}" if sampler == "ddim" else steps
    return sorted(space_timesteps(num_timesteps, spec), reverse=True)


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


# ------------------------------------------------------------------------------------------------
# calling a model the way it is timed
# ------------------------------------------------------------------------------------------------


class ModelRunner:
    """One model prepared for timing: dtype cast, explicit sparse tokens, guidance, compile, CUDA graphs.

    ``runner(x, t, cond, tokens)`` is one model evaluation (under guidance: on ``cat([x[:B/2], x[:B/2]])``
    followed by the guidance arithmetic, as ``forward_with_cfg`` does) and returns the output in
    ``x.dtype``. ``cond`` is the family's conditioning dict (:meth:`Family.conditioning`). A sparse
    model always gets its tokens explicitly, so a compiled model keeps one graph per token shape
    (``dynamic=False``) and a CUDA graph is captured per token set.
    """

    def __init__(self, model: nn.Module, settings: BenchSettings, name: str = "model"):
        self.family = family_of(model)
        if settings.guided:
            self.family.check_guidance(name)
        self.model = model
        self.settings = settings
        self.name = name
        self.config = self.family.config
        self.sparse = self.family.sparse
        self.dtype = next(model.parameters()).dtype
        self.num_timesteps = self.config.num_timesteps if self.sparse else 1000
        self.calls = 0
        self._fn: Callable[..., Tensor] = model
        if settings.compile:
            if not hasattr(torch, "compile"):
                raise SparseditError("this torch has no torch.compile; drop --compile")
            import torch._dynamo as dynamo

            if not dynamo.is_dynamo_supported():
                raise SparseditError("torch.compile is not supported on this Python / platform; drop --compile")
            self._fn = torch.compile(model, backend=settings.compile_backend, mode=settings.compile_mode, dynamic=False)
        self._graphs: dict[tuple[Any, ...], tuple[Tensor, Tensor, dict[str, Tensor], Tensor, Any]] = {}
        self._pool = torch.cuda.graph_pool_handle() if settings.cuda_graphs else None

    # -- sparse tokens -------------------------------------------------------------------------

    def grid_at(self, t: int) -> Tokens:
        """Sparse tokens the schedule gives timestep ``t`` (None for a dense model)."""
        return self.family.tokens_at(t)

    def grids_for(self, timesteps: Sequence[int]) -> list[Tokens]:
        return [self.grid_at(t) for t in timesteps]

    # -- one evaluation ------------------------------------------------------------------------

    def _evaluate(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        s = self.settings
        if s.guided:
            half = x[: len(x) // 2]
            x = torch.cat([half, half])
        cond = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in cond.items()}
        out = self.family.call(self._fn, x.to(self.dtype), t, cond, tokens)
        if s.guided:
            n = 3 if s.cfg_mode == "first3" else self.config.in_channels
            eps, rest = out[:, :n], out[:, n:]
            guided_cond, uncond = eps.chunk(2, dim=0)
            guided = uncond + s.cfg_scale * (guided_cond - uncond)
            out = torch.cat([torch.cat([guided, guided]), rest], dim=1)
        return out

    def _capture(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> tuple[Any, ...]:
        static = (x.clone(), t.clone(), {k: v.clone() for k, v in cond.items()})
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # allocator / cuBLAS workspaces settle before capture
                self._evaluate(*static, tokens)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._evaluate(*static, tokens)
        return (*static, out, graph)

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        self.calls += 1
        if not self.settings.cuda_graphs:
            return self._evaluate(x, t, cond, tokens).to(x.dtype)
        key = (tokens, tuple(x.shape), x.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, t, cond, tokens)
        sx, st, scond, out, graph = self._graphs[key]
        sx.copy_(x)
        st.copy_(t)
        for k, v in cond.items():
            scond[k].copy_(v)
        graph.replay()
        return out.to(x.dtype)

    # -- inputs --------------------------------------------------------------------------------

    def inputs(self, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """(noise x in fp32 with ``rows`` rows, the family's conditioning dict), on the device."""
        s = self.settings
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.family.sample_shape(s.rows), generator=gen)
        cond = self.family.conditioning(self.model, s.batch_size, s.guided, gen)
        return x.to(s.device), {k: v.to(s.device) for k, v in cond.items()}


# ------------------------------------------------------------------------------------------------
# timed units
# ------------------------------------------------------------------------------------------------


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
        timesteps = run_timesteps(settings.steps, settings.sampler, T)
        x, cond = runner.inputs(settings.seed)
        t = torch.full((settings.rows,), forward_t, dtype=torch.long, device=settings.device)
        diffusion = create_diffusion(None, learn_sigma=runner.config.learn_sigma, num_train_timesteps=T)
        return cls(runner, timesteps, forward_t, x, cond, t, runner.grids_for(timesteps), diffusion)

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
            t = torch.full((s.rows,), t_value, dtype=torch.long, device=s.device)
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

        out = sample(step, tuple(self.x.shape), sampler=s.sampler, steps=s.steps, diffusion=self.diffusion,
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
            say(f"sampling run {i + 1}/{s.run_repeats} ({s.steps} {s.sampler} steps each)")
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


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------


def _spread(st: dict[str, Any], unit: str, digits: int) -> str:
    f = f"{{:.{digits}f}}"
    return (f"{f.format(st['median'])} {unit} [{f.format(st['min'])}-{f.format(st['max'])}], "
            f"IQR {f.format(st['iqr'])}, n={st['n']}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_markdown(result: dict[str, Any]) -> str:
    """The result of :func:`bench_pair` as a markdown table with a settings line above it."""
    s, ma, mb, pair = result["settings"], result["models"]["a"], result["models"]["b"], result["pair"]
    machine = result["machine"]
    compiled = f"compiled ({s['compile_backend']})" if s["compile"] else "eager"
    head = (f"device {s['device']} ({machine['device_name']}, {machine['torch_threads']} threads), torch "
            f"{machine['torch']}, {s['dtype']}, batch {s['batch_size']}"
            + (f" (x2 rows: cfg {s['cfg_scale']:g})" if s["cfg_scale"] != 1.0 else "")
            + f", {compiled}, CUDA graphs {'on' if s['cuda_graphs'] else 'off'}; run = {s['steps']} {s['sampler']} "
            f"steps incl. sampler arithmetic; forward at t={ma['forward_t']}; load average "
            f"{result['load_average']['start']} -> {result['load_average']['end']}; elapsed {result['elapsed_s']:.1f} s")
    rows = [
        ("forward latency (median [min-max])",
         *(_spread(m["forward_ms"], "ms", 1) if "forward_ms" in m else "-" for m in (ma, mb)),
         f"speedup {_ratio(pair['speedup']['forward'])}"),
        ("samples/s (forward)", *(f"{m['images_per_sec']:.3f}" if "images_per_sec" in m else "-" for m in (ma, mb)),
         ""),
        ("GMACs/sample, forward (tokens)", *(f"{m['forward_gmacs']:.4g} ({_tokens(m['forward_grid'], m.get('forward_frames'))})"
                                              for m in (ma, mb)),
         f"FLOPs ratio {_ratio(pair['flops_ratio']['forward'])}"),
        ("achieved GMAC/s (forward)", *(f"{m['gmacs_per_sec']:.1f}" if "gmacs_per_sec" in m else "-"
                                        for m in (ma, mb)),
         f"speedup / FLOPs ratio {pair['speed_per_flops']['forward']:.2f}"
         if pair["speed_per_flops"]["forward"] is not None else ""),
        (f"sampling run, {s['steps']} steps (median [min-max])",
         *(_spread(m["run_s"], "s", 2) if "run_s" in m else "-" for m in (ma, mb)),
         f"speedup {_ratio(pair['speedup']['run'])}"),
        ("samples/s (run)", *(f"{m['run_images_per_sec']:.4f}" if "run_images_per_sec" in m else "-"
                             for m in (ma, mb)), ""),
        ("GMACs/sample/step, mean over run", f"{ma['gmacs']:.4g}", f"{mb['gmacs']:.4g}",
         f"FLOPs ratio {_ratio(pair['flops_ratio']['run'])}"),
        ("achieved GMAC/s (run)", *(f"{m['run_gmacs_per_sec']:.1f}" if "run_gmacs_per_sec" in m else "-"
                                    for m in (ma, mb)),
         f"speedup / FLOPs ratio {pair['speed_per_flops']['run']:.2f}"
         if pair["speed_per_flops"]["run"] is not None else ""),
        ("of which sampler only (s/run)", *(f"{m['sampler_s']['median']:.3f}" if "sampler_s" in m else "-"
                                            for m in (ma, mb)), ""),
        ("token sets in run (tokens: steps)", *(_grid_list(m) for m in (ma, mb)), ""),
    ]
    lines = [head, "", f"| | A: {ma['name']} | B: {mb['name']} | B vs A |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def _tokens(grid: Sequence[int], frames: int | None = None) -> str:
    """``h x w`` (a grid), ``h x w x f`` with frames (a video token set)."""
    return f"{grid[0]}x{grid[1]}" + ("" if frames is None else f"x{frames}f")


def _grid_list(m: dict[str, Any]) -> str:
    return ", ".join(f"{_tokens(g['grid'], g.get('frames'))}: {g['steps']}" for g in m["run_grids"])
