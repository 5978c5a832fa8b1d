"""Compare two caption-conditioned image models so that the comparison cannot flatter either (``sparsedit compare
--prompt-embeds``).

Typical use: a dense SD3 / FLUX.1 / PixArt (A) and the sparse model made from it and fine-tuned (B). The rules, and
why (docs/compare.md, "Caption models"):

* **Same prompts, same noise.** The starting noise of prompt ``i`` under seed ``s`` is one draw of shape
  ``(1, C, H, W)`` from a CPU generator seeded with :func:`noise_seed` ``(s, i)`` (:func:`prompt_noise`), whatever
  the batch, the device or the model: SD3 and FLUX get it as ``noise=``, families whose ``generate`` takes no noise
  (PixArt) sample that prompt alone with that generator seed, which draws the same tensor.
* **Several guidance values** (CFG scales for SD3 / PixArt, FLUX.1-dev's guidance embedding, 1 for schnell) and
  **several seeds**; every number is given per seed, with its mean and sample std.
* **A floor**: A against A itself with other noise (seed ``s + 1000`` on the same prompt). It says how different two
  images of one prompt are when only the noise differs, so B's distance from A can be read on that scale.

The settings and the pair check live in :mod:`sparsedit.eval.compare_text_settings`, the summary, images and report in
:mod:`sparsedit.eval.compare_text_report`, the noise rule and the sampling loop, shared with video models, in
:mod:`sparsedit.eval.compare_paired`. The numbers say how closely B reproduces A's images (paired fidelity), not
whether either model's images are good.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.eval import compare_paired as paired
from sparsedit.eval.compare_paired import FLOOR_OFFSET, noise_seed, prompt_noise
from sparsedit.eval.compare_report import prepare_out
from sparsedit.eval.compare_scoring import ADM_BATCH, blas_threads
from sparsedit.eval.compare_sizes import same_size
from sparsedit.eval.compare_text_report import seed_row, summarise, write_text_outputs
from sparsedit.eval.compare_text_settings import (
    DEFAULT_FLUX_GUIDANCE,
    TextCompareSettings,
    check_text_pair,
    guidance_points,
    resolve_settings,
)
from sparsedit.families import family_of

__all__ = ["DEFAULT_FLUX_GUIDANCE", "FLOOR_OFFSET", "TextCompareSettings", "check_text_pair", "compare_text_models",
           "guidance_points", "noise_seed", "prompt_noise", "resolve_settings", "same_size"]

REPORT_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# Inputs


def _decoder(model: nn.Module, vae: Any, pipeline: Any, device: torch.device) -> tuple[nn.Module | None, str]:
    """(the family's VAE or None, where the images come from, in words)."""
    return paired.load_decoder(model, vae, pipeline, device, family_of(model).load_vae, "pixel-space samples",
                               "images decoded by {}")


def _feature_model(inception_weights: Any, feature_model: Any, pixels: bool, n: int, device: torch.device) -> Any:
    """The Inception network of the optional Fréchet distance (None unless asked for)."""
    if inception_weights is None and feature_model is None:
        return None
    if not pixels:
        raise SparseditError("the Fréchet distance needs images: pass --vae DIR or --pipeline DIR, or drop "
                             "--inception-weights")
    if n < 2:
        raise SparseditError(f"the Fréchet distance needs at least 2 prompts, got {n}; drop --inception-weights")
    if feature_model is not None:
        return feature_model
    from sparsedit.eval.metrics.inception import load_inception

    return load_inception(inception_weights, device)


# --------------------------------------------------------------------------------------------------
# The comparison


def compare_text_models(
    a: nn.Module,
    b: nn.Module,
    prompt_embeds: str | os.PathLike[str] | dict[str, Tensor],
    settings: TextCompareSettings | None = None,
    *,
    prompts: Sequence[str] | None = None,
    names: Sequence[str] = ("A", "B"),
    device: str | torch.device = "cpu",
    progress: bool = True,
    vae: str | os.PathLike[str] | nn.Module | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    feature_model: Any = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Compare caption models ``a`` and ``b`` on the prompts of ``prompt_embeds``; returns the JSON-able report.

    ``prompt_embeds``: a prompt-embeddings file (:mod:`sparsedit.core.prompts`) or the dict
    :func:`~sparsedit.core.prompts.read_prompt_embeds` returns (``prompts``: their strings, for the images). Images
    come from ``vae`` (a local AutoencoderKL directory or module) or ``pipeline``'s ``vae/`` folder; without either,
    latents are compared. ``image_size`` (pixels): sample both at that size (see :func:`same_size`, which also picks
    the sparse model's size for models of different sizes). ``inception_weights`` (or ``feature_model``, any callable returning ``pool`` features)
    adds the Fréchet distances. With ``out``, writes ``compare.json``, ``compare.md`` and one ``paired_*.png`` per
    guidance value (see :func:`~sparsedit.eval.compare_report.prepare_out` for ``overwrite``).
    """
    wall = time.perf_counter()
    paired.check_names(names)
    check_text_pair(a, b, sizes=False)
    a, b, size_note = same_size(a, b, image_size)
    check_text_pair(a, b)
    s = resolve_settings(settings or TextCompareSettings(), a)
    points = guidance_points(s)
    text, texts, where = paired.prompt_set(prompt_embeds, prompts, a, s.num_prompts)
    dev = torch.device(device)
    out_dir = prepare_out(out, overwrite) if out is not None else None
    decoder, images_from = _decoder(a, vae, pipeline, dev)
    pixels = decoder is not None or a.config.data_space == "pixel"
    n = int(text["embeds"].shape[0])
    inception = _feature_model(inception_weights, feature_model, pixels, n, dev)
    models = {"a": a.eval().to(dev), "b": b.eval().to(dev)}
    measures = _measures(models["a"], (decoder, pixels), inception, dev)
    with blas_threads(torch.get_num_threads()):
        results, pairs, timing = paired.run_pairs(models, {"text": text, "n": n}, s, points, measures, dev, progress)
    guided = any(c != 1.0 for c, _ in points)
    text_len = int(text["embeds"].shape[1])
    cost = paired.cost(models, s, points, text_len, "image", "x2 rows under classifier-free guidance")
    report: dict[str, Any] = {
        **paired.report_start(REPORT_FORMAT, "caption", s, names, models),
        "prompts": {"source": where, "count": n, "tokens": text_len, "texts": texts,
                    "unconditional": _unconditional(text, guided)},
        "space": "pixels" if pixels else "latents",
        "size": {"latent_hw": list(a.config.latent_hw), "note": size_note},
        "images_from": images_from,
        "noise_rule": ("prompt i, seed s: randn(1, C, H, W) from a CPU generator seeded with noise_seed(s, i) of "
                       "sparsedit.eval.compare_text, the same for A and B; the floor is A at seed s + "
                       f"{FLOOR_OFFSET} on the same prompt"),
        "results": results,
        **paired.report_end(cost, timing, dev, command),
    }
    outputs = ["compare.json", "compare.md", *(f"paired_{paired.point_name(c, g)}.png" for c, g in points)]
    return paired.finish(report, wall, out_dir, outputs, write_text_outputs, pairs)


def _unconditional(text: dict[str, Tensor], guided: bool) -> str:
    if not guided:
        return "none (no classifier-free guidance)"
    if "null_embeds" in text:
        return "the file's negative_embeds (and negative_pooled_embeds)"
    return ("the file holds no negative_embeds: the model's own default unconditional input (SD3: zeros, not the "
            "pipeline's encoded empty prompt; PixArt: its stored null caption)")


def _measures(model: nn.Module, decoding: tuple[Any, bool], inception: Any, dev: torch.device) -> paired.Measures:
    """How images are measured: per image over all pixels, decoded by the VAE, Inception pool features."""
    decoder, pixels = decoding
    family = family_of(model)

    def decode(x: Tensor) -> Tensor:
        return family.decode_samples(model, x.to(dev), decoder).float().cpu()  # as `sparsedit sample` decodes

    def features(images: Tensor) -> np.ndarray:
        from sparsedit.core.images import to_uint8
        from sparsedit.eval.metrics.adm import compute_features

        arr = to_uint8(images)
        arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
        return compute_features(arr, inception, ADM_BATCH, dev)["pool"]

    return paired.Measures(unit="image", bar_unit="img", reduce=lambda sq: sq.flatten(1).mean(1).numpy(),
                           decode=decode if pixels else None, features=features if inception is not None else None,
                           seed_row=seed_row, summarise=summarise,
                           note="model calls only (not decoding or scoring); A's count includes its floor samples; the "
                                "first chunk of A, B and A' is a warm-up, not timed, when there are others")
