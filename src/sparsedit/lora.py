"""Users' diffusers LoRAs on sparsedit models: :func:`load_lora` merges a LoRA into a dense or sparse SD3 / FLUX
(and PixArt) in place and returns a :class:`LoraReport` of what landed where (docs/lora.md).

A diffusers LoRA (what ``pipe.load_lora_weights`` reads: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``,
optionally ``.alpha`` or diffusers' ``lora_adapter_metadata`` header) names modules of the diffusers transformer. Each
module's delta ``scale * alpha / r * B @ A`` (alpha = r when the file gives none, as PEFT and diffusers do) is first
placed on the *dense* model's tensors through the family's own diffusers key map (``family.diffusers_key_map()``:
our tensor <- rows of diffusers tensors concatenated along dim 0, the map the checkpoint converter uses), then on
the model's tensors through the family's rule map (``family.init_rules``): a sparse tensor copied or sliced from a
dense one gets the same rows of that tensor's delta, so layer i of a sparse model gets exactly the delta of layer i
of its source. Rows a sparse block does not keep (the image queries of a poolingformer) are dropped and reported.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.families import family_of

# What a LoRA key ends with -> its part of the module's adapter. PEFT / diffusers names first; ".lora.down" /
# ".lora.up" are diffusers' older names, ".lora_down" / ".lora_up" kohya's (read when the module path is dotted).
_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".lora.down.weight": "A",
          ".lora.up.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
_DORA = (".lora_magnitude_vector", ".dora_scale")
_TRANSFORMER_PREFIXES = ("transformer.", "base_model.model.")  # diffusers pipeline files; PEFT's adapter_model
_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
               "adapter_model.bin")
_KIND_NAMES = {"pool": "poolingformer"}
_KIND_NOTES = {"pool": ": its image attention is the uniform map, which needs no image queries or keys"}


@dataclass
class LoraReport:
    """What :func:`load_lora` did. ``applied``: the LoRA layers (diffusers module names, one A/B pair each) whose
    delta was merged, in whole or in part; ``dropped``: (module, why) for deltas, or rows of one, that have no place
    in this model; ``ignored``: (key, why) for LoRA keys that were not understood (text encoders, unknown modules);
    ``changed``: our tensors that changed."""

    model_type: str
    scale: float
    applied: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def num_applied(self) -> int:
        return len(self.applied)

    def summary(self) -> str:
        lines = [f"merged {len(self.applied)} LoRA layer(s) at scale {self.scale:g} into {len(self.changed)} tensor(s) "
                 f"of the {self.model_type}"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)}: " + "; ".join(f"{m} ({why})" for m, why in self.dropped))
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} key(s): " + "; ".join(f"{k} ({why})" for k, why in self.ignored))
        return "\n".join(lines)

    __str__ = summary


@dataclass
class _Layer:
    """One LoRA layer: its A and B (and optional bias of B, alpha) and the keys they came from."""

    module: str
    A: Tensor | None = None
    B: Tensor | None = None
    bias: Tensor | None = None
    alpha: float | None = None
    keys: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# reading a LoRA
# ------------------------------------------------------------------------------------------------


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """A LoRA file (or a directory holding ``pytorch_lora_weights.safetensors``, PEFT's ``adapter_model.safetensors``,
    or their ``.bin`` forms) -> (state dict, adapter config or None): diffusers' ``lora_adapter_metadata`` header,
    or PEFT's ``adapter_config.json`` beside the weights."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in _FILE_NAMES if (path / name).is_file()]
        if not found:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise SparseditError(f"{path} holds no pytorch_lora_weights.safetensors and {len(found)} other "
                                     ".safetensors files; pass the LoRA file itself")
        path = found[0]
    if not path.is_file():
        raise SparseditError(f"{path} does not exist; pass a LoRA .safetensors file or the directory holding it")
    config = None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open has no __iter__
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path} ({err}); the file is truncated or not safetensors") from None
        if header.get("lora_adapter_metadata"):
            try:
                config = json.loads(header["lora_adapter_metadata"])
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}: its lora_adapter_metadata header is not JSON ({err})") from None
    else:
        from sparsedit.core.formats import read_torch_file

        state = read_torch_file(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a LoRA state dict")
    beside = path.parent / "adapter_config.json"
    if config is None and beside.is_file():
        config = json.loads(beside.read_text())
    return state, config


def _adapter_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The transformer's part of a LoRA config: diffusers prefixes its metadata keys with ``transformer.``."""
    if not config:
        return {}
    if any(k.startswith("transformer.") for k in config):
        return {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    return config


def _parse(state: dict[str, Tensor]) -> tuple[dict[str, _Layer], list[tuple[str, str]]]:
    """LoRA keys -> layers by diffusers module name; keys that are not transformer LoRA parts -> (key, why)."""
    layers: dict[str, _Layer] = {}
    ignored: list[tuple[str, str]] = []
    for key, value in state.items():
        if key.startswith("text_encoder"):
            ignored.append((key, "text encoder: not part of the transformer; load it into the pipeline's text encoder"))
            continue
        if key.startswith(("lora_unet_", "lora_te", "lora_transformer_", "diffusion_model.", "unet.")):
            ignored.append((key, "not diffusers' naming (kohya / original / UNet); convert it first, docs/lora.md"))
            continue
        if any(tag in key for tag in _DORA):
            raise SparseditError(f"{key} is a DoRA magnitude: DoRA LoRAs cannot be merged as a weight delta here; "
                                 "merge it into the diffusers model with peft and load that instead")
        name = next((p for p in _TRANSFORMER_PREFIXES if key.startswith(p)), "")
        rest = key[len(name):]
        suffix = next((s for s in _PARTS if rest.endswith(s)), None)
        if suffix is None:
            ignored.append((key, "not a LoRA A / B / alpha tensor"))
            continue
        module = rest[: -len(suffix)]
        layer = layers.setdefault(module, _Layer(module))
        part = _PARTS[suffix]
        layer.keys[part] = key
        if part == "alpha":
            layer.alpha = float(value)
        else:
            setattr(layer, part, value)
    return layers, ignored


def _scaling(layer: _Layer, rank: int, config: dict[str, Any]) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA): alpha from the layer's ``.alpha`` key, else the config's
    ``alpha_pattern`` (matched as PEFT does) or ``lora_alpha``, else the rank."""
    alpha = layer.alpha
    if alpha is None:
        pattern = config.get("alpha_pattern") or {}
        hit = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", layer.module)), None)
        alpha = pattern[hit] if hit is not None else config.get("lora_alpha", rank)
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


# ------------------------------------------------------------------------------------------------
# the maps: diffusers module -> dense tensor rows -> the model's tensors
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of a diffusers tensor are rows ``[offset, offset + stop - start)`` of our dense ``ours``."""

    ours: str
    offset: int
    start: int
    stop: int


def _dense_shapes(family: Any, model: nn.Module) -> dict[str, torch.Size]:
    """The tensor shapes of the dense model ``model`` is (or came from), built on the meta device for a sparse one."""
    if not family.sparse:
        return {k: v.shape for k, v in model.state_dict().items()}
    dense_cls = family.model_types()[family.dense_type][1]
    with torch.device("meta"):
        dense = dense_cls(family.dense_config())
    return {k: v.shape for k, v in dense.state_dict().items()}


def _inverse_map(key_map: dict[str, list[tuple[str, int, int | None]]],
                 shapes: dict[str, torch.Size]) -> tuple[dict[str, list[_Piece]], dict[str, int]]:
    """diffusers tensor -> where its rows sit in our dense tensors, and its number of rows."""
    pieces: dict[str, list[_Piece]] = {}
    rows: dict[str, int] = {}
    for ours, theirs in key_map.items():
        offset = 0
        for name, start, stop in theirs:
            stop = shapes[ours][0] if stop is None else stop
            pieces.setdefault(name, []).append(_Piece(ours, offset, start, stop))
            rows[name] = max(rows.get(name, 0), stop)
            offset += stop - start
        if offset != shapes[ours][0]:  # a map that does not tile the tensor is a bug, not the user's doing
            raise AssertionError(f"diffusers key map of {ours}: {offset} rows, the tensor has {shapes[ours][0]}")
    return pieces, rows


def _targets(family: Any, model: nn.Module, shapes: dict[str, torch.Size]) -> dict[str, list[tuple[str, int, int]]]:
    """Dense tensor -> the model's tensors initialised from it, with the dense rows ``[a, b)`` each one holds."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    if not family.sparse:
        return {k: [(k, 0, s[0] if len(s) else 1)] for k, s in shapes.items()}
    for rule in family.init_rules(model):
        if rule.rule not in ("copy", "slice") or rule.source is None:
            continue  # zeros / identity: new tensors (the recovery merges) that no source layer had
        shape = shapes[rule.source]
        a, b = rule.rows if rule.rule == "slice" and rule.rows is not None else (0, shape[0] if len(shape) else 1)
        out.setdefault(rule.source, []).append((rule.target, a, b))
    return out


def _why_dropped(family: Any, ours: str, lo: int, hi: int) -> str:
    parts = ours.split(".")
    if family.sparse and parts[0] == "blocks" and parts[1].isdigit():
        kind = family.block_kinds()[int(parts[1])]
        return (f"lands on rows {lo}:{hi} of {ours}, which block {parts[1]} ({_KIND_NAMES.get(kind, kind)}) of the "
                f"{family.sparse_type} does not keep{_KIND_NOTES.get(kind, '')}")
    return f"lands on rows {lo}:{hi} of {ours}, which the {family.config.model_type} does not keep"


# ------------------------------------------------------------------------------------------------
# the one call
# ------------------------------------------------------------------------------------------------


def load_lora(model: nn.Module, lora: str | Path | dict[str, Tensor], scale: float = 1.0, *,
              adapter_config: dict[str, Any] | None = None) -> LoraReport:
    """Merge a diffusers-format LoRA into ``model`` (a dense or sparse SD3 / FLUX / PixArt) **in place**.

    ``lora``: a ``pytorch_lora_weights.safetensors`` (or the directory holding it, PEFT's ``adapter_model``
    files, a ``.bin``), or its state dict. Each layer adds ``scale * alpha / r * B @ A`` to the weights it targets
    (and ``scale * alpha / r * lora_B.bias`` to the bias with PEFT's ``lora_bias``); alpha comes from ``.alpha``
    keys, the file's ``lora_adapter_metadata`` / ``adapter_config.json`` or ``adapter_config`` (``lora_alpha``,
    ``alpha_pattern``, ``use_rslora``), else alpha = r. A sparse model gets, tensor by tensor, the rows of its
    source tensor's delta that its rule map copies; the rest is dropped and reported. A LoRA whose shapes do not
    fit is refused before anything changes. Undo with ``load_lora(model, lora, scale=-scale)`` (equal to float
    rounding) or by reloading the model.
    """
    family = family_of(model)
    key_map_of = getattr(family, "diffusers_key_map", None)
    if key_map_of is None:
        raise SparseditError(f"LoRAs are read for SD3, FLUX and PixArt models, not a {family.config.model_type}: its "
                             "family has no diffusers key map")
    name = "the LoRA" if isinstance(lora, dict) else str(lora)
    if isinstance(lora, dict):
        state, file_config = lora, None
    else:
        state, file_config = read_lora(lora)
    config = _adapter_config(adapter_config if adapter_config is not None else file_config)
    if config.get("use_dora"):
        raise SparseditError(f"{name} is a DoRA adapter (use_dora): it cannot be merged as a weight delta here; merge "
                             "it into the diffusers model with peft and load that instead")
    layers, ignored = _parse(state)
    shapes = _dense_shapes(family, model)
    pieces, theirs_rows = _inverse_map(key_map_of(), shapes)
    targets = _targets(family, model, shapes)
    kind = family.config.model_type
    dense_name = family.dense_type

    # Check everything first: a refused LoRA leaves the model untouched.
    # (layer, weight or bias, scaling, where its rows go); each delta is made only when it is added (a full-size
    # float32 delta of every targeted weight at once would be the model's size again)
    plan: list[tuple[_Layer, str, float, list[_Piece]]] = []
    for module, layer in layers.items():
        if layer.A is None or layer.B is None:
            have = next(iter(layer.keys.values()))
            if layer.A is None and layer.B is None:  # an alpha alone
                ignored.append((have, "an alpha without lora_A / lora_B"))
                continue
            raise SparseditError(f"LoRA key {have} has no {'lora_B' if layer.B is None else 'lora_A'} partner; the "
                                 "file is incomplete")
        weight = f"{module}.weight"
        if weight not in pieces or len(shapes[pieces[weight][0].ours]) < 2:
            ignored.extend((k, f"{module} is no Linear / Conv of a {dense_name} of this size") for k in layer.keys.values())
            continue
        A, B = layer.A, layer.B
        rank = A.shape[0]
        in_shape = tuple(shapes[pieces[weight][0].ours][1:])
        if B.ndim not in (2, 4) or B.shape[1] != rank or B.shape[2:] not in ((), (1, 1)):
            raise SparseditError(f"LoRA key {layer.keys['B']} has shape {tuple(B.shape)}, not ({theirs_rows[weight]}, "
                                 f"{rank}) to match its lora_A of rank {rank}; the file is not a LoRA diffusers reads")
        if B.shape[0] != theirs_rows[weight]:
            raise SparseditError(f"LoRA key {layer.keys['B']} has {B.shape[0]} outputs but {module} of this {kind} has "
                                 f"{theirs_rows[weight]}: the LoRA is for another model")
        if tuple(A.shape[1:]) != in_shape:
            raise SparseditError(f"LoRA key {layer.keys['A']} has shape {tuple(A.shape)} but {module} of this {kind} "
                                 f"takes {in_shape}: the LoRA is for another model")
        factor = scale * _scaling(layer, rank, config)
        plan.append((layer, "weight", factor, pieces[weight]))
        if layer.bias is not None:
            bias = f"{module}.bias"
            if bias not in pieces:
                raise SparseditError(f"LoRA key {layer.keys['bias']} adds a bias to {module}, which has none in this "
                                     f"{kind}")
            if tuple(layer.bias.shape) != (theirs_rows[bias],):
                raise SparseditError(f"LoRA key {layer.keys['bias']} has shape {tuple(layer.bias.shape)} but {module} "
                                     f"of this {kind} has {theirs_rows[bias]} outputs: the LoRA is for another model")
            plan.append((layer, "bias", factor, pieces[bias]))
    if not plan:
        first = ", ".join(k for k, _ in ignored[:3]) or "no keys"
        raise SparseditError(f"{name} holds no LoRA layer of a {dense_name} transformer ({first}); is it a diffusers "
                             f"LoRA for this model?")

    report = LoraReport(kind, scale, ignored=ignored)
    ours_state = model.state_dict()
    changed: set[str] = set()
    applied: dict[str, None] = {}
    device = next(iter(ours_state.values())).device
    with torch.no_grad():
        for layer, part_name, factor, where in plan:
            delta = _delta(layer, part_name, factor, device)
            for piece in where:
                lo_piece, hi_piece = piece.offset, piece.offset + piece.stop - piece.start
                kept: list[tuple[int, int]] = []
                for target, a, b in targets.get(piece.ours, []):
                    lo, hi = max(lo_piece, a), min(hi_piece, b)
                    if lo >= hi:
                        continue
                    part = delta[piece.start + lo - lo_piece: piece.start + hi - lo_piece]
                    tensor = ours_state[target]
                    tensor[lo - a: hi - a] += part.to(device=tensor.device, dtype=tensor.dtype)
                    kept.append((lo, hi))
                    changed.add(target)
                    applied[layer.module] = None
                for lo, hi in _gaps(lo_piece, hi_piece, kept):  # listed even where B is zero there: never silent
                    report.dropped.append((layer.module, _why_dropped(family, piece.ours, lo, hi)))
    report.applied = list(applied)
    report.changed = sorted(changed)
    return report


def _delta(layer: _Layer, part: str, factor: float, device: torch.device) -> Tensor:
    """``factor * B @ A`` in float32 on ``device``, shaped as the layer's weight (a conv's kernel: ``B`` is 1 x 1), or
    ``factor * lora_B.bias`` for ``part`` "bias"."""
    assert layer.A is not None and layer.B is not None
    if part == "bias":
        assert layer.bias is not None
        return layer.bias.detach().to(device, torch.float32) * factor
    A = layer.A.detach().to(device, torch.float32)
    B = layer.B.detach().to(device, torch.float32)
    return (B.flatten(1) @ A.flatten(1)).mul_(factor).view(B.shape[0], *A.shape[1:])


def _gaps(lo: int, hi: int, kept: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[lo, hi)`` that no interval of ``kept`` covers."""
    out, at = [], lo
    for a, b in sorted(kept):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return out
