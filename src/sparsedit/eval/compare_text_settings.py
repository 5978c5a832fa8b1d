"""What :mod:`sparsedit.eval.compare_text` samples (:class:`TextCompareSettings`, the guidance axis of a family) and which
caption-model pairs it takes, at which size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from sparsedit.errors import SparseditError
from sparsedit.eval.compare_paired import check_cfg_mode, check_counts, settle_axes
from sparsedit.families import family_of

__all__ = ["DEFAULT_FLUX_GUIDANCE", "TextCompareSettings", "check_text_pair", "guidance_points", "resolve_settings"]

DEFAULT_FLUX_GUIDANCE = (2.5, 3.5)  # FLUX.1-dev's guidance embedding: a lower value and FluxPipeline's default


@dataclass(frozen=True)
class TextCompareSettings:
    """What to sample; None fields take the family's defaults (see :func:`resolve_settings`)."""

    cfg_scales: tuple[float, ...] | None = None  # SD3 (3.5, 7), PixArt (2, 4): half and all of the default; FLUX (1,)
    guidance: tuple[float, ...] | None = None  # FLUX.1-dev's guidance embedding values (default 2.5, 3.5)
    seeds: tuple[int, ...] = (0, 1, 2)
    sampler: str | None = None  # the family's default sampling run (SD3 / FLUX: euler)
    steps: int | None = None
    num_prompts: int | None = None  # the first N prompts of the file (None: all)
    batch_size: int = 4  # prompts per model call (flow families; the noise does not depend on it)
    rows: int = 8  # prompts shown in each paired image
    scale: int = 1  # integer upscaling of the paired images
    cfg_mode: str = "first3"  # PixArt's guidance on the first 3 latent channels (as the original); SD3 / FLUX ignore it

    def __post_init__(self) -> None:
        settle_axes(self, (("cfg_scales", "--cfg-scales"), ("guidance", "--guidance")), "3.5 7")
        check_cfg_mode(self.cfg_mode)
        check_counts(("--steps", self.steps), ("--num-prompts", self.num_prompts), ("--batch-size", self.batch_size),
                     ("--rows", self.rows), ("--scale", self.scale))


def resolve_settings(settings: TextCompareSettings, model: nn.Module) -> TextCompareSettings:
    """``settings`` with the family's defaults filled in, after refusing what the family cannot do."""
    family, config = family_of(model), model.config
    distilled = bool(getattr(config, "guidance_embeds", False))
    sampler = settings.sampler or family.default_sampling[0]
    if sampler not in family.samplers:
        raise SparseditError(f"a {config.model_type} samples with {' or '.join(family.samplers)} here, not {sampler}; "
                             f"use --sampler {family.samplers[0]}")
    takes_cfg = _takes_cfg(family)
    cfg = settings.cfg_scales
    if cfg is None:
        base = family.default_cfg_scale
        cfg = (base / 2, base) if takes_cfg and base > 2 else (1.0,)
    if not takes_cfg and cfg != (1.0,):
        extra = ("; set its guidance embedding with --guidance instead, e.g. --guidance 2.5 3.5" if distilled else "")
        raise SparseditError(f"a {config.model_type}{' (FLUX.1-dev)' if distilled else ''} takes no classifier-free "
                             f"guidance: --cfg-scales must be 1, got {' '.join(f'{c:g}' for c in cfg)}{extra}")
    guidance = settings.guidance
    if guidance is not None and not distilled:
        raise SparseditError(f"--guidance feeds FLUX.1-dev's guidance embedding; this {config.model_type} has none: "
                             "drop --guidance (use --cfg-scales)")
    if guidance is None and distilled:
        guidance = DEFAULT_FLUX_GUIDANCE
    steps = settings.steps or family.default_sampling[1]
    return dataclasses.replace(settings, cfg_scales=tuple(cfg), guidance=guidance, sampler=sampler, steps=steps)


def _takes_cfg(family: Any) -> bool:
    try:
        family.check_guidance("model")
    except SparseditError:
        return False
    return True


def guidance_points(settings: TextCompareSettings) -> list[tuple[float, float | None]]:
    """The guidance axis of resolved ``settings``: (CFG scale, guidance-embedding value or None) pairs."""
    assert settings.cfg_scales is not None, "resolve_settings first"
    return [(c, g) for c in settings.cfg_scales for g in (settings.guidance or (None,))]


# --------------------------------------------------------------------------------------------------
# Checks


def check_text_pair(a: nn.Module, b: nn.Module, sizes: bool = True) -> None:
    """Refuse (one line) two models that cannot be compared prompt for prompt and noise for noise (``sizes``: their
    input sizes too)."""
    fams = {}
    for name, model in (("A", a), ("B", b)):
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None)
        if not isinstance(kind, str):
            raise SparseditError(f"model {name} is a {type(model).__name__}, not a sparsedit model; load it with "
                                 "sparsedit.load_model")
        fam = family_of(model)
        if not fam.text_conditioned:
            raise SparseditError(f"model {name} is a {kind}, a class-conditional model: drop --prompt-embeds (compare "
                                 "samples class models by label)")
        if fam.frames is not None:
            raise SparseditError(f"model {name} is a {kind}, a video model: compare it with compare_video_models "
                                 "(sparsedit.eval.compare_video), which `sparsedit compare` runs for video models")
        fams[name] = fam
    if fams["A"].name != fams["B"].name:
        raise SparseditError(f"A is a {a.config.model_type} and B a {b.config.model_type}: different model families; "
                             "compare a model with one made from it (e.g. FLUX and the SparseFLUX sparsified from it)")
    if sizes and tuple(a.config.latent_hw) != tuple(b.config.latent_hw):
        raise SparseditError(f"the models' input sizes differ (latent_hw {tuple(a.config.latent_hw)} for A, "
                             f"{tuple(b.config.latent_hw)} for B); pass --image-size PX to sample both at one size "
                             "(SD3 / FLUX.1 run at any size), or compare models of one size")
    for field, what in (("in_channels", "latent channels"), ("caption_channels", "caption widths"),
                        ("pooled_channels", "pooled-vector widths"), ("data_space", "data spaces"),
                        ("guidance_embeds", "guidance embeddings (FLUX.1-dev vs schnell)")):
        va, vb = getattr(a.config, field, None), getattr(b.config, field, None)
        if va != vb:
            raise SparseditError(f"the models' {what} differ ({field} {va} for A, {vb} for B); compare two models of "
                                 "one task, e.g. a model and the sparse model sparsified from it")


