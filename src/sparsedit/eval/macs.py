"""Counting the multiply-accumulates of one forward of any sparsedit model, from the model itself on the meta device.

:func:`count_forward` builds the model of a config on the meta device (no memory, nothing computed), runs one
forward of one sample with an explicit sparse token set (``Family.call``) and counts every op while it runs:

* ``linear`` and ``attention`` by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per MAC, halved):
  ``attention`` is the activation-activation matmuls (the meta device runs scaled-dot-product attention through its
  math path, so its ``Q K^T`` and ``A V`` arrive as bmm; CPU flash SDPA is counted too), ``linear`` every other
  matmul (Linear layers, convolutions). Bias additions are not matmuls and are not counted.
* ``other`` (docs/flops.md, "What other counts, exactly") in the same forward by :class:`_OtherCounter`, a
  ``TorchFunctionMode``: it sees the ``torch`` / ``Tensor`` calls as the model writes them, so an attention is one
  call (its softmax counts one per score; its query scaling and mask are inside it and free), a Linear's bias is
  inside ``F.linear`` (free), and ``a + b``, ``a.add_(b)`` and ``torch.add`` all resolve to ``add``. Only work on
  *token tensors* counts: tensors computed from the latent or from a family's token inputs (caption embeddings),
  so work on the conditioning vector (timestep, label, the adaLN ``1 + scale``) is free, as documented.

The counts are split by module: each block of ``model.blocks``, the family's final modules, and everything else
(the ``embed`` segment), by the running totals before and after each of those modules runs. A block call is a
pure function of the block and the shapes it gets, so each distinct one runs once: a repeat (the 12 sparse blocks
of SparseDiT-XL, the dense blocks shared by every token set) takes the recorded count and an empty output of the
recorded shape. Counts are cached per (config, token set, caption length). A new family gets its MACs from its
model and its :class:`~sparsedit.families.base.Family` adapter alone (docs/flops.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from sparsedit.families import Family, family_of

__all__ = ["KINDS", "ForwardCount", "count_forward", "count_params", "flop_counter", "meta_model", "resized",
           "split_flops"]

KINDS = ("linear", "attention", "other")
Cost = tuple[int, int, int]  # (linear, attention, other) MACs

# ``other`` per output element of each element-wise op on a token tensor (ops named as ``resolve_name`` ends them,
# in-place and reflected forms included: ``add_`` / ``__radd__`` -> ``add``). LayerNorm is 4 (fvcore's count).
_PER_OUTPUT = {
    **dict.fromkeys(("add", "sub", "mul", "div", "truediv", "neg", "gelu", "silu", "relu", "sigmoid", "tanh",
                     "softmax", "interpolate"), 1),
    "layer_norm": 4,
}
# Reductions and pooling: one op per *input* element (a mean reads N x D values and writes D).
_PER_INPUT = frozenset(("mean", "sum", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"))
_SDPA = "scaled_dot_product_attention"  # softmax: one op per attention score, heads x Nq x Nk
_TOKENS = "_sparsedit_tokens"  # the attribute that marks a token tensor while a count runs


@functools.cache  # a forward calls a few dozen distinct functions thousands of times
def _op_name(func: Any) -> str:
    """``torch.Tensor.__radd__`` -> ``add``, ``torch.Tensor.add_`` -> ``add``, ``torch.nn.functional.gelu`` -> ``gelu``."""
    name = (resolve_name(func) or getattr(func, "__name__", "")).rsplit(".", 1)[-1].strip("_")
    return name[1:] if name[:1] == "r" and name[1:] in _PER_OUTPUT else name


def _is_tokens(x: object) -> bool:
    return isinstance(x, Tensor) and getattr(x, _TOKENS, False)


class _OtherCounter(TorchFunctionMode):
    """Running total of the ``other`` ops of a forward: element-wise and reduction work on token tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        if not any(_is_tokens(a) for a in inputs):
            return out
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)]
        for o in outputs:  # what is computed from tokens is a token tensor too (views and copies included)
            setattr(o, _TOKENS, True)
        name = _op_name(func)
        if name == _SDPA:
            query, key = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key")))
            self.total += math.prod(query.shape[:-1]) * key.shape[-2]
        elif name in _PER_INPUT:
            self.total += inputs[0].numel()
        elif outputs:
            self.total += _PER_OUTPUT.get(name, 0) * outputs[0].numel()
        return out


def _cpu_flash_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                          **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU flash SDPA, which torch's registry lacks (it would count 0).

    The formula is passed to this counter only (``custom_mapping``), so torch's global registry is untouched,
    and skipped where a torch version registers the op itself.
    """
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {} if op is None or op in fc.flop_registry else {op: _cpu_flash_sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@functools.cache
def _attention_ops() -> frozenset[Any]:
    """The ops whose FLOPs are ``attention``: every SDPA kernel and the batched matmuls of its math path."""
    aten = torch.ops.aten
    names = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu", "bmm", "baddbmm")
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


def split_flops(counts: dict[Any, int]) -> tuple[int, int]:
    """(linear, attention) MACs of FlopCounterMode's per-op FLOPs (2 per MAC)."""
    attention = sum(v for op, v in counts.items() if op in _attention_ops())
    return (sum(counts.values()) - attention) // 2, attention // 2


# ------------------------------------------------------------------------------------------------
# the meta model and its inputs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """A config as a cache key: every field but those that only pick token sets (the family's
    ``cost_schedule_fields``: counts take explicit tokens), so the configs a rate search tries share one model
    and one count per token set. Configs themselves are mutable dataclasses, which do not hash."""

    key: str
    config: Any = field(compare=False)

    @classmethod
    def of(cls, config: Any) -> _Config:
        skip = family_of(config).cost_schedule_fields
        fields = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config) if f.name not in skip]
        return cls(f"{type(config).__qualname__}{fields!r}", config)


@functools.lru_cache(maxsize=32)  # a meta model holds no tensor data: a few MB of module objects at most
def _meta_model(config: _Config) -> nn.Module:
    from sparsedit.core.checkpoint import build_model

    family_of(config.config)  # registers the families, so build_model knows every model_type
    with torch.device("meta"):
        return build_model(config.config).eval()


def meta_model(config: Any) -> nn.Module:
    """The model of ``config`` on the meta device (shapes only, no memory), built once per config."""
    return _meta_model(_Config.of(config))


@functools.lru_cache(maxsize=1024)
def _params(config: _Config) -> int:
    return sum(p.numel() for p in _meta_model(config).parameters())


def count_params(config: Any) -> int:
    """Parameters of ``config``'s model (its buffers, such as position tables, are not parameters). Cached."""
    return _params(_Config.of(config))


def resized(config: Any, grid: tuple[int, int], frames: int | None) -> Any:
    """``config`` with another dense token grid (and frame count): the model as it runs at that size."""
    fam = family_of(config)
    if tuple(grid) == tuple(config.grid) and frames == fam.frames:
        return config
    p = config.patch_size
    return dataclasses.replace(config, input_size=(grid[0] * p, grid[1] * p), **fam.cost_size_fields(frames))


def _inputs(fam: Family, model: nn.Module, text_len: int | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One sample on the meta device: the latent, a timestep, the conditioning; token inputs marked."""
    x = torch.empty(fam.sample_shape(1), device="meta")
    t = torch.zeros(1, device="meta")  # any value: explicit tokens leave the schedule unused
    cond = {k: v.to("meta") for k, v in fam.cost_conditioning(model, text_len).items()}
    for z in [x, *(cond[k] for k in fam.cost_token_inputs if k in cond)]:
        setattr(z, _TOKENS, True)
    return x, t, cond


# ------------------------------------------------------------------------------------------------
# one forward, split by module
# ------------------------------------------------------------------------------------------------


class _Unkeyable(Exception):
    """A block argument the memo cannot describe by shape: that call runs."""


def _shape_key(obj: Any) -> Any:
    """What a block call's cost and output depend on: tensors by shape, dtype and token mark, the rest by value."""
    if isinstance(obj, Tensor):
        return Tensor, tuple(obj.shape), obj.dtype, _is_tokens(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj), tuple(_shape_key(o) for o in obj)
    if isinstance(obj, dict):
        return dict, tuple((k, _shape_key(v)) for k, v in obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. PixArt's per-block condition
        return type(obj), tuple(_shape_key(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    raise _Unkeyable


_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def _structure(block: nn.Module) -> tuple[Any, ...]:
    """A block as far as its cost goes: every submodule's class and settings (heads, upsample mode, ...) and every
    parameter's shape. Two blocks with equal structures cost the same on equal inputs."""
    if block not in _STRUCTURES:
        parts = []
        for name, m in block.named_modules():
            settings = []
            for k, v in sorted(vars(m).items()):
                if k.startswith("_") or isinstance(v, (Tensor, nn.Module)):
                    continue
                try:
                    hash(v)
                except TypeError:
                    continue  # containers of settings: none of ours changes a cost
                settings.append((k, v))
            params = tuple((n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False))
            parts.append((name, type(m), tuple(settings), params))
        _STRUCTURES[block] = tuple(parts)
    return _STRUCTURES[block]


@dataclass(frozen=True)
class _Empty:
    """A tensor a memo hit returns: empty, of the recorded shape (the next module only needs the shape)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    tokens: bool

    def make(self) -> Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device="meta")
        if self.tokens:
            setattr(out, _TOKENS, True)
        return out


# Block call -> (its cost, its output with every tensor as an _Empty); shared by every count.
_MEMO: dict[Any, tuple[Cost, Any]] = {}
_MEMO_SIZE = 20_000


class _Forward:
    """The running totals of one counted forward, and the cost of each module call it splits off them."""

    def __init__(self) -> None:
        self.flops = flop_counter()
        self.other = _OtherCounter()
        self.ran: list[Cost] = []  # the split-off calls that ran (a memo hit runs nothing): the totals hold them

    def now(self) -> Cost:
        return (*split_flops(self.flops.get_flop_counts().get("Global", {})), self.other.total)

    @contextmanager
    def running(self) -> Iterator[None]:
        with torch.no_grad(), self.flops, self.other:
            yield

    def measured(self, module: nn.Module, sink: list[Cost], memo: bool) -> Callable[..., Any]:
        """``module.forward`` adding the cost of every call to ``sink``; with ``memo``, each distinct call runs once."""
        forward = module.forward
        structure = _structure(module) if memo else None  # before the patch adds ``forward`` to its attributes

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                key = None if structure is None else (structure, _shape_key(args), _shape_key(kwargs))
            except _Unkeyable:
                key = None
            if key is not None and key in _MEMO:
                cost, (leaves, spec) = _MEMO[key]
                sink.append(cost)
                return tree_unflatten([v.make() if isinstance(v, _Empty) else v for v in leaves], spec)
            before = self.now()
            out = forward(*args, **kwargs)
            cost: Cost = tuple(a - b for a, b in zip(self.now(), before, strict=True))  # type: ignore[assignment]
            sink.append(cost)
            self.ran.append(cost)
            if key is not None:
                if len(_MEMO) >= _MEMO_SIZE:
                    _MEMO.clear()
                leaves, spec = tree_flatten(out)
                _MEMO[key] = (cost, ([_Empty(tuple(v.shape), v.dtype, _is_tokens(v)) if isinstance(v, Tensor) else v
                                      for v in leaves], spec))
            return out

        return call


@contextmanager
def _patched(modules: list[nn.Module], wrap: Callable[[nn.Module], Callable[..., Any]]) -> Iterator[None]:
    """Each module's ``forward`` replaced by ``wrap(module)`` (an instance attribute), restored afterwards."""
    for m in modules:
        m.forward = wrap(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in modules:
            del m.forward


@dataclass(frozen=True)
class ForwardCount:
    """MACs (linear, attention, other) of one forward of one sample: each block of ``model.blocks`` in order, the
    family's final modules, and everything else (embedders, position tables, layout changes: ``embed``)."""

    embed: Cost
    blocks: tuple[Cost, ...]
    final: Cost
    params: int


def count_forward(config: Any, tokens: Any = None, text_len: int | None = None) -> ForwardCount:
    """Count one forward of one sample of ``config``'s model with sparse ``tokens`` (None: dense) and
    ``text_len`` caption tokens (None: the family's default; ignored without captions). Cached."""
    return _count(_Config.of(config), _freeze(tokens), text_len)


def _freeze(tokens: Any) -> Any:
    """A token set as nested tuples (a grid read from JSON is a list)."""
    return tuple(_freeze(t) for t in tokens) if isinstance(tokens, (list, tuple)) else tokens


def _sum(costs: list[Cost]) -> Cost:
    return tuple(sum(c[k] for c in costs) for k in range(3))  # type: ignore[return-value]


@functools.lru_cache(maxsize=4096)
def _count(key: _Config, tokens: Any, text_len: int | None) -> ForwardCount:
    fam = family_of(key.config)
    model = _meta_model(key)
    x, t, cond = _inputs(fam, model, text_len)
    run = _Forward()
    block_list = list(model.blocks)  # type: ignore[arg-type]
    blocks: dict[nn.Module, list[Cost]] = {b: [] for b in block_list}
    final: list[Cost] = []
    finals = [model.get_submodule(name) for name in fam.cost_final_modules]
    with _patched(block_list, lambda b: run.measured(b, blocks[b], memo=True)), \
            _patched(finals, lambda m: run.measured(m, final, memo=False)), run.running():
        fam.call(model, x, t, cond, tokens)
    embed = tuple(a - b for a, b in zip(run.now(), _sum(run.ran), strict=True))
    return ForwardCount(embed, tuple(_sum(blocks[b]) for b in block_list), _sum(final), _params(key))  # type: ignore[arg-type]
