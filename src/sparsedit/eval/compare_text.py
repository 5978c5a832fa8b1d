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
:mod:`sparsedit.eval.compare_text_report`. The numbers say how closely B reproduces A's images (paired fidelity), not
whether either model's images are good.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsedit.core.prompts import prompt_list, read_prompt_embeds, select_prompts
from sparsedit.diffusion.sampling import to_images
from sparsedit.errors import SparseditError
from sparsedit.eval.compare_report import prepare_out
from sparsedit.eval.compare_scoring import blas_threads
from sparsedit.eval.compare_text_report import point_label, point_name, seed_row, summarise, write_text_outputs
from sparsedit.eval.compare_text_settings import (
    DEFAULT_FLUX_GUIDANCE,
    TextCompareSettings,
    check_text_pair,
    guidance_points,
    resolve_settings,
    same_size,
)
from sparsedit.eval.macs import count_forward
from sparsedit.families import family_of

__all__ = ["DEFAULT_FLUX_GUIDANCE", "FLOOR_OFFSET", "TextCompareSettings", "check_text_pair", "compare_text_models",
           "guidance_points", "noise_seed", "prompt_noise", "resolve_settings", "same_size"]

REPORT_FORMAT = 1
FLOOR_OFFSET = 1000  # the floor compares A at seed s with A at seed s + FLOOR_OFFSET on the same prompt
ADM_BATCH = 64


# --------------------------------------------------------------------------------------------------
# The noise rule


def noise_seed(seed: int, prompt: int) -> int:
    """The generator seed of prompt ``prompt``'s starting noise under ``seed``: a 63-bit hash of the pair."""
    digest = hashlib.sha256(f"sparsedit-compare-text:{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_noise(config: Any, seed: int, prompt: int) -> Tensor:
    """The starting noise (1, C, H, W) of prompt ``prompt`` under ``seed``, on the CPU: the same for A, B and every
    batch layout."""
    shape = family_of(config).sample_shape(1)
    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(noise_seed(seed, prompt)))


# --------------------------------------------------------------------------------------------------
# Checks and inputs


def _prompt_set(source: Any, prompts: Sequence[str] | None, model: nn.Module,
                num_prompts: int | None) -> tuple[dict[str, Tensor], list[str] | None, str]:
    """(the ``text`` rows, their prompt strings or None, where they came from)."""
    family, config = family_of(model), model.config
    pooled = config.pooled_channels if family.pooled_text else None
    if isinstance(source, dict):
        text, where = dict(source), "prompt embeddings given in memory"
        missing = [k for k in ("embeds", *(("pooled",) if pooled else ())) if text.get(k) is None]
        if missing:
            raise SparseditError(f"the prompt embeddings lack {', '.join(missing)}; pass the dict read_prompt_embeds "
                                 "returns")
        n = int(text["embeds"].shape[0])
        text = {k: v.expand(n, *v.shape[1:]) if k.startswith("null_") and v.shape[0] == 1 else v
                for k, v in text.items() if v is not None}  # one negative for every prompt, as the file reader does
    else:
        text, where = read_prompt_embeds(source, config.caption_channels, pooled), str(source)
        recorded = prompt_list(source)
        if prompts is None and recorded is not None and len(recorded) == text["embeds"].shape[0]:
            prompts = recorded
    n = int(text["embeds"].shape[0])
    if prompts is not None and (isinstance(prompts, str) or len(prompts) != n):
        raise SparseditError(f"prompts: give one string per row of the embeddings ({n}), got "
                             f"{1 if isinstance(prompts, str) else len(prompts)}")
    texts = [str(p) for p in prompts] if prompts is not None else None
    if num_prompts is not None:
        if num_prompts > n:
            raise SparseditError(f"--num-prompts {num_prompts}, but {where} holds {n} prompts; pass at most {n}")
        text = select_prompts(text, range(num_prompts))
        texts = texts[:num_prompts] if texts is not None else None
    dtype = next(model.parameters()).dtype
    text = {k: v.to(dtype) if v.is_floating_point() else v for k, v in text.items()}
    return text, texts, where


def _decoder(model: nn.Module, vae: Any, pipeline: Any, device: torch.device) -> tuple[Any, Any, str]:
    """(the VAE or None, its latent scaling, where the images come from, in words)."""
    family, config = family_of(model), model.config
    if vae is not None and pipeline is not None:
        raise SparseditError("give --vae DIR or --pipeline DIR (whose vae/ folder is used), not both")
    if config.data_space == "pixel":
        if vae is not None or pipeline is not None:
            raise SparseditError(f"this {config.model_type} works in pixel space and needs no VAE: drop --vae / --pipeline")
        return None, None, "pixel-space samples"
    source = vae
    if source is None and pipeline is not None:
        source = family.default_vae_dir(pipeline)
        if source is None:
            raise SparseditError(f"a {config.model_type} does not read its VAE from --pipeline; pass --vae DIR (e.g. the "
                                 "pipeline's vae/ folder)")
    if source is None:
        return None, None, "no VAE (--vae / --pipeline): compared in latent space only"
    if isinstance(source, nn.Module):
        decoder, where = source, "the VAE given in memory"
    else:
        from sparsedit.encoders.vae import load_vae

        decoder, where = load_vae(source, device, latent_channels=config.in_channels), f"the VAE in {source}"
    decoder = decoder.to(device).eval()
    return decoder, family.latent_scaling(decoder), f"images decoded by {where}"


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
    if len(names) != 2 or not all(str(n).strip() for n in names):
        raise SparseditError(f"--names takes two non-empty names, got {list(names)}")
    check_text_pair(a, b, sizes=False)
    a, b, size_note = same_size(a, b, image_size)
    check_text_pair(a, b)
    s = resolve_settings(settings or TextCompareSettings(), a)
    points = guidance_points(s)
    text, texts, where = _prompt_set(prompt_embeds, prompts, a, s.num_prompts)
    dev = torch.device(device)
    out_dir = prepare_out(out, overwrite) if out is not None else None
    decoder, scaling, images_from = _decoder(a, vae, pipeline, dev)
    pixels = decoder is not None or a.config.data_space == "pixel"
    n = int(text["embeds"].shape[0])
    inception = _feature_model(inception_weights, feature_model, pixels, n, dev)
    models = {"a": a.eval().to(dev), "b": b.eval().to(dev)}
    with blas_threads(torch.get_num_threads()):
        results, pairs, timing = _run(models, text, s, points, (decoder, scaling, pixels), inception, dev, progress)
    guided = any(c != 1.0 for c, _ in points)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "kind": "caption",
        "settings": dataclasses.asdict(s),
        "names": {"a": str(names[0]), "b": str(names[1])},
        "models": {m: {"class": type(model).__name__, "config": model.config.to_dict()} for m, model in models.items()},
        "prompts": {"source": where, "count": n, "tokens": int(text["embeds"].shape[1]), "texts": texts,
                    "unconditional": _unconditional(text, guided)},
        "space": "pixels" if pixels else "latents",
        "size": {"latent_hw": list(a.config.latent_hw), "note": size_note},
        "images_from": images_from,
        "noise_rule": ("prompt i, seed s: randn(1, C, H, W) from a CPU generator seeded with noise_seed(s, i) of "
                       "sparsedit.eval.compare_text, the same for A and B; the floor is A at seed s + "
                       f"{FLOOR_OFFSET} on the same prompt"),
        "results": results,
        "cost": _cost(models, s, points, int(text["embeds"].shape[1])),
        "timing": timing,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                        "threads": torch.get_num_threads(), "device": str(dev)},
        "command": command,
    }
    if out_dir is not None:
        report["outputs"] = ["compare.json", "compare.md", *(f"paired_{point_name(c, g)}.png" for c, g in points)]
    report["wall_seconds"] = time.perf_counter() - wall
    if out_dir is not None:
        write_text_outputs(out_dir, report, pairs)
    return report


def _unconditional(text: dict[str, Tensor], guided: bool) -> str:
    if not guided:
        return "none (no classifier-free guidance)"
    if "null_embeds" in text:
        return "the file's negative_embeds (and negative_pooled_embeds)"
    return ("the file holds no negative_embeds: the model's own default unconditional input (SD3: zeros, not the "
            "pipeline's encoded empty prompt; PixArt: its stored null caption)")


def _sample(model: nn.Module, text: dict[str, Tensor], rows: range, seed: int, point: tuple[float, float | None],
            s: TextCompareSettings, device: torch.device, name: str) -> Tensor:
    """Model-space samples of prompts ``rows`` under ``seed``, float32 on the CPU (the copy waits for a GPU)."""
    family = family_of(model)
    part = {k: v.to(device) for k, v in select_prompts(text, list(rows)).items()}
    if point[1] is not None:
        part["guidance"] = point[1]  # type: ignore[assignment]
    kwargs = dict(sampler=s.sampler, steps=s.steps, cfg_scale=point[0], cfg_mode=s.cfg_mode, device=device,
                  progress=False)
    if "noise" in inspect.signature(family.generate).parameters:
        noise = torch.cat([prompt_noise(model.config, seed, i) for i in rows]).to(device)
        out = family.generate(model, text=part, noise=noise, seed=seed, **kwargs)
    else:  # one prompt per call, its generator seeded by the noise rule: sample_batch draws prompt_noise's tensor
        outs = []
        for j, i in enumerate(rows):
            one = {k: v[j:j + 1] if isinstance(v, Tensor) else v for k, v in part.items()}
            outs.append(family.generate(model, text=one, seed=noise_seed(seed, i), **kwargs))
        out = torch.cat(outs)
    out = out.float().cpu()
    if not torch.isfinite(out).all():
        raise SparseditError(f"model {name}'s samples hold NaN or infinite values (a diverged fine-tune?); compare an "
                             "earlier checkpoint")
    return out


def _mse(x: Tensor, y: Tensor) -> np.ndarray:
    """Per-row mean squared difference, float64."""
    return (x.double() - y.double()).pow(2).flatten(1).mean(1).numpy()


def _run(models: dict[str, nn.Module], text: dict[str, Tensor], s: TextCompareSettings,
         points: list[tuple[float, float | None]], decoding: tuple[Any, Any, bool], inception: Any,
         dev: torch.device, progress: bool) -> tuple[list[dict[str, Any]], dict, dict]:
    """Sample every (guidance, seed) set of A, B and the floor A'; returns the results, the first seed's pairs and the
    timing. Chunks of A, B and A' alternate, so a machine whose speed drifts slows them alike."""
    from tqdm.auto import tqdm

    decoder, scaling, pixels = decoding
    n = int(text["embeds"].shape[0])
    chunks = [range(k, min(k + s.batch_size, n)) for k in range(0, n, s.batch_size)]
    seconds, images = {"a": 0.0, "b": 0.0}, {"a": 0, "b": 0}
    warm_up = len(points) * len(s.seeds) * len(chunks) > 1  # leave the first chunk untimed when there are others
    results, pairs = [], {}
    bar = tqdm(total=len(points) * len(s.seeds) * 3 * n, unit="img", desc="compare", file=sys.stderr,
               disable=not progress)
    try:
        for point in points:
            rows = []
            for seed in s.seeds:
                bar.set_postfix_str(f"{point_label(*point)}, seed {seed}")
                acc: dict[str, list[Any]] = {k: [] for k in ("lat_b", "lat_f", "lat_a", "pix_b", "pix_f")}
                feats: dict[str, list[np.ndarray]] = {"a": [], "b": [], "f": []}
                shown: dict[str, list[Tensor]] = {"a": [], "b": []}
                for rows_k in chunks:
                    lat = {}
                    for key, m, sd in (("a", "a", seed), ("b", "b", seed), ("f", "a", seed + FLOOR_OFFSET)):
                        start = time.perf_counter()
                        lat[key] = _sample(models[m], text, rows_k, sd, point, s, dev, m.upper())
                        if not warm_up:  # the first chunk pays for kernel selection and caches: not timed
                            seconds[m] += time.perf_counter() - start
                            images[m] += len(rows_k)
                        bar.update(len(rows_k))
                    warm_up = False
                    acc["lat_b"].append(_mse(lat["b"], lat["a"]))
                    acc["lat_f"].append(_mse(lat["f"], lat["a"]))
                    acc["lat_a"].append(lat["a"].double().pow(2).flatten(1).mean(1).numpy())
                    img = lat
                    if pixels:
                        img = {k: to_images(models["a"], v.to(dev), decoder, scaling).float().cpu() for k, v in lat.items()}
                        acc["pix_b"].append(_mse(img["b"], img["a"]))
                        acc["pix_f"].append(_mse(img["f"], img["a"]))
                        if inception is not None:
                            from sparsedit.core.images import to_uint8
                            from sparsedit.eval.metrics.adm import compute_features

                            for k in feats:
                                arr = to_uint8(img[k])
                                arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
                                feats[k].append(compute_features(arr, inception, ADM_BATCH, dev)["pool"])
                    if seed == s.seeds[0]:
                        for m in ("a", "b"):
                            shown[m].append(img[m][: max(0, s.rows - sum(len(x) for x in shown[m]))])
                rows.append(seed_row(seed, FLOOR_OFFSET, {k: np.concatenate(v) for k, v in acc.items() if v},
                                      {k: np.concatenate(v) for k, v in feats.items() if v}))
                if seed == s.seeds[0]:
                    pairs[point] = (torch.cat(shown["a"]), torch.cat(shown["b"]), pixels)
            results.append(summarise(point, n, rows))
    finally:
        bar.close()
    timing = {"sampling_seconds": seconds, "images_timed": images,
              "seconds_per_image": {m: seconds[m] / images[m] for m in seconds},
              "note": "model calls only (not decoding or scoring); A's count includes its floor samples; the first "
                      "chunk of A, B and A' is a warm-up, not timed, when there are others"}
    return results, pairs, timing


def _cost(models: dict[str, nn.Module], s: TextCompareSettings, points: list[tuple[float, float | None]],
          text_len: int) -> dict[str, Any]:
    """GMACs per model evaluation (mean over the run's timesteps, at the file's caption length) and per image."""
    per_forward, per_run, params, steps = {}, {}, {}, 0
    for m, model in models.items():
        family = family_of(model)
        assert s.sampler is not None and s.steps is not None
        timesteps = family.sampling_timesteps(s.sampler, s.steps)
        totals = []
        for t in timesteps:
            count = count_forward(model.config, family.tokens_at(t), text_len)
            totals.append(sum(c[0] + c[1] for c in (count.embed, *count.blocks, count.final)) / 1e9)
            params[m] = count.params
        per_forward[m], per_run[m], steps = sum(totals) / len(totals), sum(totals), len(timesteps)
    return {
        "gmacs_per_forward": per_forward,
        "gmacs_per_image": {point_name(c, g): {m: v * (2 if c != 1.0 else 1) for m, v in per_run.items()}
                            for c, g in points},  # classifier-free guidance runs every step on a doubled batch
        "params": params,
        "flops_ratio_a_over_b": per_forward["a"] / per_forward["b"],
        "model_evaluations": f"{steps} {s.sampler} steps per image (x2 rows under classifier-free guidance)",
        "caption_tokens": text_len,
    }
