"""One resolution for both models of a paired comparison (caption and video modes)."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from sparsedit.encoders.vae import VAE_DOWNSAMPLE
from sparsedit.errors import SparseditError
from sparsedit.families import family_of

__all__ = ["same_size"]


def _px(hw: tuple[int, ...]) -> str:
    h, w = (v * VAE_DOWNSAMPLE for v in hw)
    return f"{h}x{w} px"


def same_size(a: nn.Module, b: nn.Module, image_size: int | None) -> tuple[nn.Module, nn.Module, str | None]:
    """A and B at one resolution, and a note on what was changed (None: nothing).

    ``image_size`` (pixels) resizes both, each as its family maps a pixel size (``config_at_size``: a square for SD3 /
    FLUX.1, 480 -> 480 x 832 for Wan); families that run only at their checkpoint's size are refused when that differs.
    Without it, two models of different sizes of which exactly one is sparse are both sampled at the sparse model's
    size: the size it was sparsified and fine-tuned at. Resized models are shallow copies (same weights); the models
    passed in keep their configs.
    """
    hw = {m: tuple(model.config.latent_hw) for m, model in (("A", a), ("B", b))}
    if image_size is not None:
        want = {m: tuple(family_of(model).config_at_size(image_size).latent_hw) for m, model in (("A", a), ("B", b))}
        note = f"both models sampled at {image_size} px (--image-size)"
    elif hw["A"] != hw["B"]:
        sparse = [model for model in (a, b) if family_of(model).sparse]
        if len(sparse) != 1 or not all(family_of(model).any_size for model in (a, b)):
            return a, b, None  # the pair check names the difference and --image-size
        target = tuple(sparse[0].config.latent_hw)
        want = {"A": target, "B": target}
        note = (f"A's config is {_px(hw['A'])} and B's {_px(hw['B'])}: both sampled at {_px(target)}, the sparse "
                "model's size (--image-size chooses another)")
    else:
        return a, b, None
    out = []
    for m, model in (("A", a), ("B", b)):
        if hw[m] != want[m]:
            if not family_of(model).any_size:
                raise SparseditError(f"a {model.config.model_type} runs at its checkpoint's size ({_px(hw[m])}), not "
                                     f"{image_size} px: drop --image-size (SD3 / FLUX.1 / Wan run at any size)")
            model = copy.copy(model)  # the same modules and weights; its own config
            model.config = dataclasses.replace(model.config, input_size=want[m])
        out.append(model)
    return out[0], out[1], note
