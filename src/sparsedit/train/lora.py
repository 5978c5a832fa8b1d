"""LoRA fine-tuning: low-rank adapters (peft) on the linear layers of the reused blocks, full training of the new
recovery merges, and plain sparsedit checkpoints with the adapters merged in.

With ``TrainSettings(lora_rank=r)`` the trainer adds a rank-r adapter (peft's ``LoraConfig``, ``lora_alpha`` = r
unless given) to every ``nn.Linear`` inside ``model.blocks`` except the merge layers (W1 / W2), freezes everything
else but the merges, and so trains a 12 B FLUX's few million adapter weights on one GPU. Every checkpoint's ``model``
and ``ema`` directories hold the weights with the adapters merged (loadable, samplable, exportable like any other);
``trainable.safetensors`` beside them holds the adapters and merges themselves, which is all a resume needs: the
frozen weights never change, so they come from the model the resumed run is started with (checked by a fingerprint).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError

TRAINABLE_FILE = "trainable.safetensors"


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers that get adapters: every ``nn.Linear`` inside the blocks that the forward calls as
    a module, but the recovery merges (trained in full).

    Sparse blocks use some weights by slices (a generation block's queries from the sparse tokens, keys and values
    from the dense ones, through one ``qkv`` weight); an adapter on such a layer would never act. Which layers are
    called is found by running the model's architecture once on the meta device (no memory, nothing computed).
    """
    from sparsedit.core.checkpoint import build_model
    from sparsedit.families import family_of

    family = family_of(model)
    with torch.device("meta"):
        probe = build_model(model.config).eval()
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, name=name: called.add(name))
             for name, m in probe.blocks.named_modules() if isinstance(m, nn.Linear) and "merge_" not in name]
    x = torch.empty(family.sample_shape(1), device="meta")
    cond = {k: v.to("meta") for k, v in family.cost_conditioning(probe, None).items()}
    tokens = family.token_sets()[0] if family.sparse else None
    try:
        with torch.no_grad():
            family.call(probe, x, torch.zeros(1, device="meta"), cond, tokens)
    finally:
        for h in hooks:
            h.remove()
    return [f"blocks.{name}" for name in sorted(called)]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> int:
    """Inject rank-``rank`` adapters (in place) and leave only adapters and merges trainable; returns their count."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise SparseditError("--lora-rank needs the peft package: pip install peft") from None
    targets = lora_targets(model)
    if not targets:
        raise SparseditError(f"a {type(model).__name__} has no linear layers in its blocks to put adapters on")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_trainable(name: str) -> bool:
    """The parameters a LoRA run trains: the adapters and the recovery merges."""
    return "lora_" in name or ".merge_" in name


def merge_lora_state(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A LoRA model's full state dict (peft key names) -> the plain one (sparsedit key names), every adapter's delta
    ``scaling * B @ A`` added to its weight, as peft's ``get_delta_weight`` computes it. Works on any full state dict,
    so also on the one gathered from an FSDP-sharded model."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        value = value.detach()
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            value = value + ((b.detach() @ a.detach()) * scaling).to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value.cpu()
    return out


def lora_scaling(rank: int, alpha: float | None) -> float:
    """peft's adapter scale ``alpha / r`` (alpha defaults to r)."""
    return (alpha or rank) / rank


def merged_state(model: nn.Module) -> dict[str, Tensor]:
    """The plain state dict of ``model`` (sparsedit key names) with every adapter's delta added to its weight."""
    scales = {module.scaling["default"] for module in model.modules() if hasattr(module, "scaling")}
    if len(scales) > 1:
        raise SparseditError(f"the adapters of this model have different scales {sorted(scales)}; merge them one by one")
    return merge_lora_state(model.state_dict(), scales.pop() if scales else 1.0)


def base_fingerprint(model: nn.Module) -> float:
    """A number that changes when the frozen weights differ: resuming on another base model would be silently wrong."""
    total = 0.0
    for name, p in model.named_parameters():
        if not is_trainable(name):
            total += float(p.detach().double().abs().sum())
    return total
