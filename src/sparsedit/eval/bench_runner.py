"""One model of :mod:`sparsedit.eval.bench` prepared for timing (:class:`ModelRunner`): dtype, sparse tokens,
guidance, ``torch.compile`` and CUDA graphs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.eval.bench_setup import BenchSettings, Tokens
from sparsedit.families import family_of

__all__ = ["ModelRunner"]


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
