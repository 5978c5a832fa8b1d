"""What :mod:`sparsedit.eval.compare_video` samples (:class:`VideoCompareSettings`, filled in per family by
:func:`resolve_video_settings`) and which video-model pairs it takes (:func:`check_video_pair`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from sparsedit.errors import SparseditError
from sparsedit.eval.compare_paired import check_cfg_mode, check_counts, settle_axes
from sparsedit.families import family_of

__all__ = ["DEFAULT_NUM_VIDEOS", "VideoCompareSettings", "check_video_pair", "conditioning_kind", "is_video_model",
           "resolve_video_settings", "video_cfg_scales"]

DEFAULT_NUM_VIDEOS = 16  # videos per set of a class-conditional or unconditional model


@dataclass(frozen=True)
class VideoCompareSettings:
    """What to sample; None fields take the family's defaults (see :func:`resolve_video_settings`)."""

    cfg_scales: tuple[float, ...] | None = None  # class models (1, default), caption models (default / 2, default)
    seeds: tuple[int, ...] = (0, 1, 2)
    sampler: str | None = None  # the family's default sampling run (Latte: ddpm 250, Wan: euler 50)
    steps: int | None = None
    num_samples: int | None = None  # class / unconditional models: videos per set (default 16); label(i) = i % classes
    num_prompts: int | None = None  # caption models: the first N prompts of the file (None: all)
    batch_size: int = 2  # videos per model call (families whose generate takes noise; the noise does not depend on it)
    rows: int = 4  # videos shown in each paired GIF and frame strip
    scale: int = 1  # integer upscaling of the paired videos
    cfg_mode: str | None = None  # None: the family's own (Latte guides all channels, as its release)

    def __post_init__(self) -> None:
        settle_axes(self, (("cfg_scales", "--cfg-scales"),), "1 4")
        if self.cfg_mode is not None:
            check_cfg_mode(self.cfg_mode)
        check_counts(("--steps", self.steps), ("--num-samples", self.num_samples), ("--num-prompts", self.num_prompts),
                     ("--batch-size", self.batch_size), ("--rows", self.rows), ("--scale", self.scale))


# --------------------------------------------------------------------------------------------------
# Which models


def is_video_model(model: Any) -> bool:
    """True for a sparsedit model whose samples are videos (its family has ``frames``): Latte, Wan."""
    if not isinstance(getattr(getattr(model, "config", None), "model_type", None), str):
        return False
    try:
        return family_of(model).frames is not None
    except SparseditError:  # an unknown model_type
        return False


def conditioning_kind(model: nn.Module) -> str:
    """``"caption"`` (text-to-video), ``"class"`` (class labels) or ``"unconditional"``."""
    if family_of(model).text_conditioned:
        return "caption"
    return "class" if getattr(model.config, "num_classes", 0) > 0 else "unconditional"


def check_video_pair(a: nn.Module, b: nn.Module, captions: bool) -> str:
    """Refuse (one line) two models that cannot be compared video for video; returns their conditioning kind.
    ``captions``: whether prompt embeddings were given."""
    for name, model in (("A", a), ("B", b)):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if not isinstance(kind, str):
            raise SparseditError(f"model {name} is a {type(model).__name__}, not a sparsedit model; load it with "
                                 "sparsedit.load_model")
        if not is_video_model(model):
            raise SparseditError(f"model {name} is a {kind}, an image model; compare it with another image model "
                                 "(video comparison takes two video models, e.g. Latte and SparseLatte)")
    fa, fb = family_of(a), family_of(b)
    if fa.name != fb.name:
        raise SparseditError(f"A is a {a.config.model_type} and B a {b.config.model_type}: different model families; "
                             "compare a model with one made from it (e.g. a Latte and the SparseLatte sparsified from it)")
    kinds = {conditioning_kind(a), conditioning_kind(b)}
    if len(kinds) > 1:
        raise SparseditError(f"A is {conditioning_kind(a)}-conditioned and B {conditioning_kind(b)}-conditioned; "
                             "compare two models of one task")
    kind = kinds.pop()
    if kind == "caption" and not captions:
        raise SparseditError(f"model A is a {a.config.model_type}, a text-to-video model: pass --prompt-embeds FILE "
                             "(prompt embeddings, e.g. from `sparsedit encode-prompts`) to compare it on captions")
    if kind != "caption" and captions:
        raise SparseditError(f"model A is a {kind}{'-conditional' if kind == 'class' else ''} "
                             f"{a.config.model_type}, not a caption model: drop --prompt-embeds")
    if fa.frames != fb.frames:
        raise SparseditError(f"the models' frame counts differ ({fa.frames} for A, {fb.frames} for B); compare two "
                             "models of one task, e.g. a Latte and the SparseLatte sparsified from it")
    fields = [("latent_hw", "input sizes"), ("in_channels", "channel counts"), ("data_space", "data spaces"),
              ("caption_channels", "caption widths") if kind == "caption" else ("num_classes", "class counts")]
    for field, what in fields:
        va, vb = getattr(a.config, field, None), getattr(b.config, field, None)
        if va != vb:
            raise SparseditError(f"the models' {what} differ ({field} {va} for A, {vb} for B); compare two models of "
                                 "one task, e.g. a Latte and the SparseLatte sparsified from it")
    return kind


# --------------------------------------------------------------------------------------------------
# The family's defaults


def video_cfg_scales(family: Any, kind: str) -> tuple[float, ...]:
    """The default guidance axis: class models 1 and the family's scale (Latte: 1, 4), caption models half and all
    of it (Wan: 2.5, 5), unconditional models 1."""
    base = family.default_cfg_scale
    if kind == "unconditional" or base <= 1:
        return (1.0,)
    if kind == "caption":
        return (base / 2, base) if base > 2 else (1.0, base)
    return (1.0, base)


def resolve_video_settings(settings: VideoCompareSettings, a: nn.Module, b: nn.Module,
                           kind: str) -> VideoCompareSettings:
    """``settings`` with the family's defaults filled in, after refusing what the models cannot do."""
    family, config = family_of(a), a.config
    sampler = settings.sampler or family.default_sampling[0]
    if sampler not in family.samplers:
        raise SparseditError(f"a {config.model_type} samples with {' or '.join(family.samplers)} here, not {sampler}; "
                             f"use --sampler {family.samplers[0]}")
    if kind == "caption" and settings.num_samples is not None:
        raise SparseditError("--num-samples counts the videos of a class or unconditional model; a caption model "
                             "makes one video per prompt: use --num-prompts N")
    if kind != "caption" and settings.num_prompts is not None:
        raise SparseditError(f"--num-prompts is for caption models; this {config.model_type} is {kind}"
                             f"{'-conditional' if kind == 'class' else ''}: use --num-samples N")
    cfg = settings.cfg_scales or video_cfg_scales(family, kind)
    guided = [c for c in cfg if c != 1.0]
    if guided:
        for name, model in (("A", a), ("B", b)):
            try:
                family_of(model).check_guidance(f"model {name}")
            except SparseditError as err:  # the family's words, with compare's flag
                raise SparseditError(f"{str(err).replace('--cfg-scale ', '--cfg-scales ')} (asked for CFG scale "
                                     f"{guided[0]:g}); pass --cfg-scales 1") from None
    num = settings.num_samples or (DEFAULT_NUM_VIDEOS if kind != "caption" else None)
    return dataclasses.replace(settings, cfg_scales=tuple(cfg), sampler=sampler,
                               steps=settings.steps or family.default_sampling[1], num_samples=num)
