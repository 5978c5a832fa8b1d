"""What :mod:`sparsedit.eval.bench` times with: the statistics of timed samples, the settings and the models."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsedit.core.checkpoint import build_model
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.dit.model import CFG_MODES
from sparsedit.families.presets import is_sparse, preset_config, with_sparsity

Grid = tuple[int, int]
# The sparse token set of one model call: a grid (h, w) for DiT / PixArt, (grid, frames) for Latte;
# None for a dense model.
Tokens = Any
Clock = Callable[[], float]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLERS = ("ddpm", "ddim", "euler")  # euler: flow-matching families (SD3, FLUX)


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
    sampler: str | None = None  # None: the family's own (ddpm, or euler for flow-matching families)
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
        if self.sampler is not None and self.sampler not in SAMPLERS:
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
