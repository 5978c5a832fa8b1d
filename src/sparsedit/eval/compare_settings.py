"""What :mod:`sparsedit.eval.compare` samples and scores (:class:`CompareSettings`), and which model pairs it takes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from sparsedit.diffusion.process import space_timesteps
from sparsedit.errors import SparseditError
from sparsedit.eval.sample_fid import FidSampling

__all__ = ["MODEL_TYPES", "CompareSettings", "check_pair", "is_digits_model"]

MODEL_TYPES = ("DiT", "SparseDiT")  # class-conditional image models that `generate` samples


@dataclass(frozen=True)
class CompareSettings:
    """What to sample and score; with the two models it determines every number of the report."""

    cfg_scales: tuple[float, ...] = (1.0, 1.5, 4.0)  # 1 = no guidance, 1.5 = DiT's FID scale, 4 = its visual one
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 1000  # per model, per scale, per seed
    sampler: str = "ddim"
    steps: int = 50
    cfg_mode: str = "first3"
    batch_size: int = 250
    per_class: int = 4  # pairs per class in the paired image
    scale: int = 4  # integer (nearest-neighbour) upscaling of the paired image
    sampler_b: str | None = None  # B's own sampler and steps (None: A's), e.g. DiT at 250 DDPM vs SparseDiT at 25 DDIM
    steps_b: int | None = None

    def __post_init__(self) -> None:
        from sparsedit.diffusion.samplers import SAMPLERS
        from sparsedit.families.dit.model import CFG_MODES

        for name in ("cfg_scales", "seeds"):  # a string would be split into characters
            if not isinstance(getattr(self, name), tuple | list):
                raise SparseditError(f"{name} must be a tuple or list, not {getattr(self, name)!r}; e.g. (0, 1, 2)")
        object.__setattr__(self, "cfg_scales", tuple(float(c) for c in self.cfg_scales))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.cfg_scales or len(set(self.cfg_scales)) != len(self.cfg_scales):
            raise SparseditError(f"--cfg-scales must be distinct values, got {list(self.cfg_scales)}; e.g. 1 1.5 4")
        if any(not math.isfinite(c) or c <= 0 for c in self.cfg_scales):
            raise SparseditError(f"--cfg-scales must be finite and > 0, got {list(self.cfg_scales)}; 1 = no guidance")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise SparseditError(f"--seeds must be distinct integers >= 0, got {list(self.seeds)}; e.g. 0 1 2")
        if self.num_samples < 2:
            raise SparseditError(f"--num-samples must be >= 2 (FID needs a covariance), got {self.num_samples}")
        for flag, value in (("--steps", self.steps), ("--steps-b", self.steps_b or 1), ("--batch-size", self.batch_size),
                            ("--per-class", self.per_class), ("--scale", self.scale)):
            if value < 1:
                raise SparseditError(f"{flag} must be >= 1, got {value}")
        for sampler in (self.sampler, self.sampler_b or self.sampler):
            if sampler not in SAMPLERS:
                raise SparseditError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.cfg_mode not in CFG_MODES:
            raise SparseditError(f"unknown cfg mode {self.cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
        for model in ("a", "b"):  # a step count the 1000-step diffusion cannot be respaced to fails now, not later
            self.timesteps(model)

    def timesteps(self, model: str) -> list[int]:
        """The original timesteps model ``"a"`` or ``"b"`` is evaluated at (the MACs count follows them)."""
        sampler, steps = self.sampling(model)
        return space_timesteps(1000, f"ddim{steps}" if sampler == "ddim" else steps)

    def sampling(self, model: str) -> tuple[str, int]:
        """(sampler, steps) of model ``"a"`` or ``"b"``."""
        if model == "b":
            return self.sampler_b or self.sampler, self.steps_b or self.steps
        return self.sampler, self.steps

    @property
    def same_sampling(self) -> bool:
        return self.sampling("a") == self.sampling("b")

    def spec(self, cfg_scale: float, seed: int, model: str = "a") -> FidSampling:
        """The chunk layout, labels and noise seeds of one (scale, seed) set of ``model``: sample-fid's shards.

        Both models share the layout, labels and seeds; with different samplers they still start from the
        same x_T, but a stochastic sampler's later draws (DDPM) no longer line up step for step.
        """
        sampler, steps = self.sampling(model)
        return FidSampling(num_samples=self.num_samples, batch_size=self.batch_size, steps=steps,
                           sampler=sampler, cfg_scale=cfg_scale, cfg_mode=self.cfg_mode, seed=seed)


# --------------------------------------------------------------------------------------------------
# Checks


def is_digits_model(config: Any) -> bool:
    """True for a model the digits CNN can score: pixel space, 10 classes, 1 or 3 channels, square side >= 8."""
    h, w = config.latent_hw
    return (config.data_space == "pixel" and config.num_classes == 10 and config.in_channels in (1, 3)
            and h == w and h >= 8)


def check_pair(a: nn.Module, b: nn.Module, settings: CompareSettings) -> None:
    """Refuse (one line) two models that cannot be compared sample for sample under ``settings``."""
    for name, model in (("A", a), ("B", b)):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if kind not in MODEL_TYPES:
            from sparsedit.eval.compare_video_settings import is_video_model

            if is_video_model(model):
                raise SparseditError(f"model {name} is a {kind}, a video model: compare it with compare_video_models "
                                     "(sparsedit.eval.compare_video), which `sparsedit compare` runs for video models")
            if _caption_model(model):
                raise SparseditError(f"model {name} is a {kind}, a caption-conditioned model: pass --prompt-embeds FILE "
                                     "(prompt embeddings, e.g. from `sparsedit encode-prompts`) to compare it on "
                                     "captions (docs/compare.md, 'Caption models')")
            raise SparseditError(f"model {name} is a {kind}; compare takes class-conditional DiT or SparseDiT models, "
                                 "or caption models (SD3, FLUX.1, PixArt) with --prompt-embeds")
        if model.config.num_classes < 1:
            raise SparseditError(f"model {name} is unconditional (num_classes 0); compare takes class-conditional models")
    ca, cb = a.config, b.config
    for field, what in (("num_classes", "class counts"), ("latent_hw", "input sizes"),
                        ("in_channels", "channel counts"), ("data_space", "data spaces")):
        va, vb = getattr(ca, field), getattr(cb, field)
        if va != vb:
            raise SparseditError(f"the models' {what} differ ({field} {va} for A, {vb} for B); compare two models "
                                 "of one task, e.g. a DiT and the SparseDiT sparsified from it")
    guided = [c for c in settings.cfg_scales if c != 1.0]
    for name, cfg in (("A", ca), ("B", cb)):
        if guided and cfg.class_dropout_prob <= 0:
            raise SparseditError(f"model {name} was trained without a null class, so it cannot use CFG scale "
                                 f"{guided[0]:g}; pass --cfg-scales 1")


def _caption_model(model: nn.Module) -> bool:
    """Whether ``model`` is a sparsedit model that samples from captions (SD3, FLUX.1, PixArt, Latte)."""
    from sparsedit.families import family_of

    try:
        return bool(family_of(model).text_conditioned)
    except SparseditError:  # not a sparsedit model
        return False
