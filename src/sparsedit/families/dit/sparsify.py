"""DiT -> SparseDiT conversion with the paper's initialisation (paper Sec. 3.3).

Layer i <- layer i. Poolingformers keep V (the third chunk of ``qkv``), ``proj``, the MLP and adaLN
and drop Q and K; generation/recovery blocks reuse the source q/k/v/proj as cross-attention;
W1 = 0, W2 = I; embedders and the final layer are copied. Every target tensor is accounted for by
exactly one rule and every source tensor is either used or listed as dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.core.layout import Layout
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import DiT
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig


@dataclass(frozen=True)
class InitRule:
    """How one SparseDiT tensor is initialised: ``copy`` / ``slice`` of a source tensor, or ``zeros`` / ``identity``."""

    target: str
    rule: str
    source: str | None = None
    rows: tuple[int, int] | None = None  # for "slice": source rows [start, stop)
    note: str = "V of qkv"  # what a slice keeps, for describe()

    def describe(self) -> str:
        if self.rule == "copy":
            return f"{self.target} <- {self.source}"
        if self.rule == "slice":
            return f"{self.target} <- {self.source}[{self.rows[0]}:{self.rows[1]}] ({self.note})"
        return f"{self.target} <- {self.rule}"


def default_rule(key: str) -> InitRule:
    """The paper's rule for every tensor a family does not slice: the recovery merge W1 (``merge_sparse``) = 0 and
    W2 (``merge_dense``) = I with bias 0, anything else a copy of the same key of the source (layer i <- layer i)."""
    if ".merge_sparse." in key or key.endswith(".merge_dense.bias"):
        return InitRule(key, "zeros")
    if key.endswith(".merge_dense.weight"):
        return InitRule(key, "identity")
    return InitRule(key, "copy", key)


def init_rules(config: SparseDiTConfig, target_keys: list[str]) -> list[InitRule]:
    """One rule per SparseDiT state-dict key."""
    d = config.hidden_size
    rules = []
    for key in target_keys:
        if ".attn.v." in key:  # poolingformer value projection = rows [2D, 3D) of qkv
            rules.append(InitRule(key, "slice", key.replace(".attn.v.", ".attn.qkv."), (2 * d, 3 * d)))
        else:
            rules.append(default_rule(key))
    return rules


def sparsify(dit: DiT, config: SparseDiTConfig | None = None, *, layout: str | Layout | None = None,
             **schedule: Any) -> SparseDiT:
    """Build a :class:`SparseDiT` from ``dit`` with the paper's initialisation.

    Pass a full ``config``, or a ``layout`` (``"SparseDiT-XL/2"`` or ``"P,K,g,s,r,d,T"``) plus schedule
    options (``r_min``, ``r_max``, ``num_pieces``, ``upsample``) to derive it from the DiT's config.
    """
    model, _ = sparsify_with_rules(dit, config, layout=layout, **schedule)
    return model


def sparsify_with_rules(dit: DiT, config: SparseDiTConfig | None = None, *, layout: str | Layout | None = None,
                        **schedule: Any) -> tuple[SparseDiT, list[InitRule]]:
    """:func:`sparsify`, also returning the parameter-by-parameter initialisation map."""
    if isinstance(dit, SparseDiT) or type(dit) is not DiT:
        raise SparseditError(f"sparsify needs a dense DiT, got {type(dit).__name__}; pass the original DiT checkpoint")
    if isinstance(config, str):  # sparsify(dit, "SparseDiT-XL/2"): the natural call, spelled as the API takes it
        raise SparseditError(f"the second argument is a SparseDiTConfig; pass a layout by name: sparsify(dit, "
                             f"layout={config!r})")
    if config is not None and not isinstance(config, SparseDiTConfig):
        raise SparseditError(f"config must be a SparseDiTConfig, not a {type(config).__name__}; or pass layout=...")
    if config is not None and (layout is not None or schedule):
        raise SparseditError("give either a SparseDiTConfig or a layout with schedule options, not both")
    if config is None:
        if layout is None:
            raise SparseditError("give a SparseDiTConfig or a layout such as 'SparseDiT-XL/2'")
        config = SparseDiTConfig.from_dit(dit.config, layout, **schedule)
    src_cfg = {k: v for k, v in dit.config.to_dict().items() if k != "model_type"}
    dst_cfg = {k: v for k, v in config.to_dict().items() if k in src_cfg}
    mismatched = sorted(k for k in src_cfg if src_cfg[k] != dst_cfg[k])
    if mismatched:
        raise SparseditError(f"SparseDiT config differs from the source DiT in {', '.join(mismatched)}; derive it "
                             "with SparseDiTConfig.from_dit")
    model = SparseDiT(config)
    rules = initialise_from_dense(dit, model, source_name="DiT")
    return model, rules


def initialise_from_dense(dense: nn.Module, sparse: nn.Module, source_name: str = "model") -> list[InitRule]:
    """Fill the freshly built ``sparse`` model from ``dense`` by the paper's rule map (every family's sparsify).

    ``sparse`` ends in ``dense``'s dtype, in eval mode. Returns the rules, one per parameter of ``sparse``.
    """
    rules = init_rules(sparse.config, list(sparse.state_dict()))  # type: ignore[arg-type]  # only reads hidden_size
    apply_init_rules(dense.state_dict(), sparse, rules, pooled_qkv_keys(sparse.kinds), source_name=source_name)
    sparse.to(next(dense.parameters()).dtype).eval()
    return rules


def pooled_qkv_keys(kinds: list[str]) -> set[str]:
    """The ``attn.qkv`` tensors of the layers that become poolingformers.

    A poolingformer keeps only V (a slice of ``qkv``), so its Q and K rows are the one source part
    a conversion may leave unused.
    """
    return {f"blocks.{i}.attn.qkv.{s}" for i, kind in enumerate(kinds) if kind == "pool" for s in ("weight", "bias")}


def apply_init_rules(source_state: dict[str, Tensor], target_model: nn.Module, rules: list[InitRule],
                     droppable_keys: set[str], source_name: str = "model") -> None:
    """Initialise ``target_model`` from ``source_state`` by ``rules`` (one per target key) and load it strictly.

    Shared by every dense -> sparse conversion (DiT, PixArt, Latte). Every source tensor must be used
    by a rule or be listed in ``droppable_keys``; ``source_name`` names the source in errors.
    """
    target = target_model.state_dict()
    new_state: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        shape = target[rule.target].shape
        if rule.rule == "zeros":
            value = torch.zeros(shape)
        elif rule.rule == "identity":
            value = torch.eye(shape[0])
        else:
            if rule.source not in source_state:
                raise SparseditError(f"source {source_name} has no {rule.source} for {rule.target}; "
                                     "is it the right depth?")
            value = source_state[rule.source]
            if rule.rule == "slice":
                value = value[rule.rows[0] : rule.rows[1]]
            used.add(rule.source)
        if value.shape != shape:
            raise SparseditError(f"{rule.target}: shape {tuple(shape)} but the source gives {tuple(value.shape)}")
        new_state[rule.target] = value.clone()
    unexpected = sorted(set(source_state) - used - droppable_keys)
    if unexpected:
        raise SparseditError(f"source tensors left unused: {', '.join(unexpected[:6])}; the layout does not fit "
                             f"the {source_name}")
    target_model.load_state_dict(new_state, strict=True)


def build_sparse(dense: nn.Module, sparse_cls: Callable[[Any], nn.Module], config: Any,
                 rule_map: Callable[[Any, list[str]], list[InitRule]], droppable: Callable[[nn.Module], set[str]],
                 source_name: str, compute_dtype: torch.dtype | None = None) -> tuple[nn.Module, list[InitRule]]:
    """Build ``sparse_cls(config)`` without its random initialisation (on the meta device, then in ``dense``'s dtype
    and device: every tensor is set by a rule, and a 12 B model's random init would be minutes of waste), fill it
    from ``dense`` by ``rule_map`` (``droppable``: the source tensors it may leave unused) and return it in eval mode
    with the rules.

    ``compute_dtype`` (for sources of mixed dtypes, such as a bfloat16 Wan that keeps some tensors in float32): every
    parameter copied from the source keeps its source dtype and the new ones (the merges) take ``compute_dtype``.
    """
    weight = next(dense.parameters())
    with torch.device("meta"):
        sparse = sparse_cls(config)
    if compute_dtype is None:
        sparse = sparse.to_empty(device=weight.device).to(weight.dtype)
    else:
        sparse = sparse.to_empty(device=weight.device)
        source = dense.state_dict()
        with torch.no_grad():
            for name, param in sparse.named_parameters():
                param.data = param.data.to(source[name].dtype if name in source else compute_dtype)
    rules = rule_map(config, list(sparse.state_dict()))
    apply_init_rules(dense.state_dict(), sparse, rules, droppable(sparse), source_name=source_name)
    return sparse.eval(), rules
