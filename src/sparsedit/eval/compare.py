"""Compare two class-conditional models so that the comparison cannot flatter either (``sparsedit compare``).

Typical use: a DiT (A) and the SparseDiT made from it (B). The rules, and why (docs/compare.md):

* **Same noise, same labels.** Sample ``i`` of seed ``s`` has label ``i % num_classes``; chunk ``k``
  (samples ``k*B .. (k+1)*B - 1``) is drawn from the generator seed ``shard_seed(s, k)`` of
  :mod:`sparsedit.eval.sample_fid`, for both models. Any difference is the models', not the noise's.
* **Several guidance scales** (default 1, 1.5, 4), shown side by side: guidance trades distribution
  match for class fidelity, and one scale can flatter either model.
* **Several seeds** (default 0, 1, 2): every number comes as per-seed values, mean and sample std,
  and a verdict only calls a difference resolved when it exceeds twice the spread over seeds.
* **A real floor**: real images scored against the same reference with the same function, at the same
  N: the score of a model that reproduced its training data exactly.

Digits models (pixel space, 10 classes, 1 or 3 channels, square side >= 8) are scored with the shipped
digits CNN against the held-out test split of the embedded digits; other models with ADM's Inception
metrics against a user-given reference batch (:mod:`sparsedit.eval.metrics.adm`).

The parts live in :mod:`sparsedit.eval.compare_settings` (the settings, the pair check),
:mod:`sparsedit.eval.compare_scoring` (the scorers, the summary over seeds) and
:mod:`sparsedit.eval.compare_report` (the paired images, the markdown report); all are re-exported here, with
:func:`~sparsedit.eval.compare_text.compare_text_models`, the comparison of caption models (SD3, FLUX.1, PixArt), and
:func:`~sparsedit.eval.compare_video.compare_video_models`, the comparison of video models (Latte, Wan).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsedit.core.checkpoint import openable, write_safetensors
from sparsedit.core.images import save_image
from sparsedit.diffusion.sampling import generate, to_images
from sparsedit.errors import SparseditError
from sparsedit.eval.compare_paired import check_names, environment, finish
from sparsedit.eval.compare_report import (
    HEADER_H,
    LABEL_W,
    MAX_PAIR_ROWS,
    OUTPUT_FILES,
    PAIR_GAP,
    PAIR_SEP,
    paired_image,
    paired_image_size,
    paired_name,
    prepare_out,
    remove_own_outputs,
    render_markdown,
    results_table,
    start_outputs,
    write_report_files,
)
from sparsedit.eval.compare_scoring import (
    ADM_BATCH,
    AdmScorer,
    DigitsScorer,
    Features,
    aggregate,
    blas_threads,
    spread,
    verdict,
)
from sparsedit.eval.compare_settings import MODEL_TYPES, CompareSettings, check_pair, is_digits_model
from sparsedit.eval.compare_text import TextCompareSettings, compare_text_models
from sparsedit.eval.compare_video import VideoCompareSettings, compare_video_models
from sparsedit.eval.flops import schedule_macs
from sparsedit.eval.sample_fid import FidSampling, balanced_labels, manifest_settings, shard_seed, weights_sha256

__all__ = [
    "ADM_BATCH",
    "HEADER_H",
    "LABEL_W",
    "MAX_PAIR_ROWS",
    "MODEL_TYPES",
    "OUTPUT_FILES",
    "PAIR_GAP",
    "PAIR_SEP",
    "AdmScorer",
    "CompareSettings",
    "DigitsScorer",
    "TextCompareSettings",
    "VideoCompareSettings",
    "Features",
    "aggregate",
    "blas_threads",
    "cache_key",
    "cache_path",
    "check_pair",
    "compare_models",
    "compare_text_models",
    "compare_video_models",
    "floor_indices",
    "is_digits_model",
    "load_cached",
    "paired_image",
    "paired_image_size",
    "paired_name",
    "paired_rmse",
    "prepare_out",
    "remove_own_outputs",
    "render_markdown",
    "results_table",
    "spread",
    "verdict",
]

REPORT_FORMAT = 1
CACHE_FORMAT = 1
FLOOR_SALT = 0x5EED_F100  # mixed into the floor's seed so it is not the sampling seed itself


# --------------------------------------------------------------------------------------------------
# Sampling and the sample cache


def _sample_chunk(model: nn.Module, spec: FidSampling, k: int, device: torch.device) -> torch.Tensor:
    """Chunk ``k`` of a set in the model's space, float32 on the CPU: (n, C, H, W)."""
    start, stop = spec.shard_range(k)
    labels = torch.from_numpy(balanced_labels(start, stop, model.config.num_classes))
    out = generate(model, labels, sampler=spec.sampler, steps=spec.steps, eta=spec.eta, cfg_scale=spec.cfg_scale,
                   cfg_mode=spec.cfg_mode, seed=shard_seed(spec.seed, k), device=device, progress=False)
    return out.float().cpu()  # the copy to the CPU also waits for a GPU, so the timing is complete


def cache_key(model: nn.Module, spec: FidSampling, model_sha256: str, device: torch.device) -> dict[str, Any]:
    """Everything that determines a cached set of samples (the device type too: GPU kernels round differently)."""
    return {**manifest_settings(model, spec, model_sha256), "format": CACHE_FORMAT, "device_type": device.type,
            "content": "model-space samples, float32"}


def cache_path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"samples_{digest[:32]}.safetensors"


def load_cached(path: Path, key: dict[str, Any]) -> torch.Tensor | None:
    """The cached samples if ``path`` holds exactly ``key``'s set; None otherwise (then they are sampled again)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with openable(path) as name, safe_open(name, framework="pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != json.loads(json.dumps(key)):
                return None
            samples = f.get_tensor("samples")
    except Exception:  # unreadable or foreign file: sample again and replace it
        return None
    return samples if samples.shape[0] == key["num_samples"] else None


def _sample_sets(models: dict[str, nn.Module], specs: dict[str, FidSampling], device: torch.device,
                 cache: dict[str, Any], bar: Any) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """One (scale, seed) set of both models; the chunks of A and B alternate, so a machine whose speed
    drifts slows both alike. Returns the samples and the sampling seconds (None for a cached set)."""
    samples: dict[str, torch.Tensor] = {}
    seconds: dict[str, float | None] = {}
    paths: dict[str, tuple[Path, dict[str, Any]]] = {}
    for m, model in models.items():
        if cache["dir"] is not None:
            key = cache_key(model, specs[m], cache["sha"][m], device)
            paths[m] = (cache_path(cache["dir"], key), key)
            hit = load_cached(*paths[m])
            if hit is not None:
                samples[m], seconds[m] = hit, None
                bar.update(specs[m].num_shards)
    pending = [m for m in models if m not in samples]
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in pending}
    spent = dict.fromkeys(pending, 0.0)
    for k in range(specs["a"].num_shards):
        for m in pending:
            start = time.perf_counter()
            chunks[m].append(_sample_chunk(models[m], specs[m], k, device))
            spent[m] += time.perf_counter() - start
            bar.update(1)
    for m in pending:
        samples[m], seconds[m] = torch.cat(chunks[m]), spent[m]  # (N, C, H, W)
        if m in paths:
            path, key = paths[m]
            write_safetensors(path, {"samples": samples[m]}, metadata={"key": json.dumps(key, sort_keys=True)})
    return samples, seconds


# --------------------------------------------------------------------------------------------------
# The comparison


def _adm_scorer(config: Any, vae: Any, inception_weights: Any, ref: Any, real: Any, feature_model: Any,
                device: torch.device, progress: bool) -> tuple[AdmScorer, nn.Module | None]:
    """Check the files the Inception path needs (one line naming the missing one), then build the scorer."""
    from sparsedit.eval.metrics.adm import open_image_batch
    from sparsedit.eval.metrics.inception import find_inception_weights, load_inception

    if ref is None:
        raise SparseditError(
            "these are not digits models, so compare scores them with ADM's Inception metrics and needs --ref REF.npz, "
            "a reference batch such as VIRTUAL_imagenet256_labeled.npz from guided-diffusion's evaluations (see "
            "docs/metrics.md, 'Files you need')")
    paths = [Path(p) for p in (ref, real) if p is not None]
    for p in paths:
        with open_image_batch(p):  # names a missing or malformed batch before anything slow runs
            pass
    if feature_model is None:
        find_inception_weights(inception_weights)  # names the file and where to download it
    decoder = None
    if config.data_space == "latent":
        from sparsedit.encoders.vae import load_vae

        decoder = vae if isinstance(vae, nn.Module) else load_vae(vae, device, latent_channels=config.in_channels)
    elif vae is not None:
        raise SparseditError("these models work in pixel space; drop --vae")
    model = feature_model if feature_model is not None else load_inception(inception_weights, device)
    return AdmScorer(model, Path(ref), Path(real) if real is not None else None, device, progress), decoder


def _macs(models: dict[str, nn.Module], s: CompareSettings) -> dict[str, Any]:
    """GMACs per forward (mean under each model's own sampling timesteps) and per sampling run."""
    report, runs, steps_text = {}, {}, {}
    for m, model in models.items():
        sampler, _ = s.sampling(m)
        timesteps = s.timesteps(m)
        report[m] = schedule_macs(model.config, timesteps)
        runs[m] = report[m]["gmacs"] * len(timesteps)
        steps_text[m] = f"{len(timesteps)} {sampler} steps of 1000"
    return {
        "gmacs_per_forward": {m: r["gmacs"] for m, r in report.items()},
        "gmacs_min_max": {m: [r["gmacs_min"], r["gmacs_max"]] for m, r in report.items()},
        "gmacs_per_sample": runs,  # one unguided sampling run; guidance doubles both
        "params": {m: r["params"] for m, r in report.items()},
        "flops_ratio_a_over_b": report["a"]["gmacs"] / report["b"]["gmacs"],
        "run_flops_ratio_a_over_b": runs["a"] / runs["b"],
        "timesteps": steps_text["a"] if s.same_sampling else f"A: {steps_text['a']}; B: {steps_text['b']}",
    }


def paired_rmse(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square difference between A's and B's samples of the same noise and label, in the models'
    data space (pixels clamped to [-1, 1], or latents): 0 when B reproduces A's samples exactly. How far B
    has drifted from A, whatever their FIDs: a drop-in replacement keeps it small."""
    if model.config.data_space == "pixel":
        a, b = a.clamp(-1, 1), b.clamp(-1, 1)
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def _set_features(scorer: Any, model: nn.Module, samples: torch.Tensor, decoder: nn.Module | None, chunk: int,
                  device: torch.device) -> Features:
    """Features of one sampled set, decoded and featurised chunk by chunk (bounded memory for 256 px images)."""
    parts = [scorer.features(to_images(model, x.to(device), decoder).cpu()) for x in samples.split(chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def floor_indices(seed: int, pool_size: int, num_samples: int) -> np.ndarray:
    """The floor's real images for ``seed``: min(N, pool) distinct pool indices, a seeded draw without replacement."""
    n = min(num_samples, pool_size)
    return np.sort(np.random.default_rng([FLOOR_SALT, seed]).choice(pool_size, size=n, replace=False))


def _floor(scorer: Any, s: CompareSettings) -> dict[str, Any]:
    """Real-vs-real: per seed, min(N, pool) distinct real images (seeded draw without replacement)."""
    if scorer.pool is None:
        return {"available": False, "note": "no --real batch given, so no real floor: without it the FIDs have no "
                "real-vs-real scale to be read against (pass --real REAL.npz with real images, e.g. a slice of "
                "ImageNet val, at least N of them)"}
    size = int(next(iter(scorer.pool.values())).shape[0])
    n = min(s.num_samples, size)
    rows = []
    for seed in s.seeds:
        idx = floor_indices(seed, size, s.num_samples)
        labels = scorer.pool_labels[idx] if scorer.pool_labels is not None else None
        rows.append({"seed": seed, **scorer.score({k: v[idx] for k, v in scorer.pool.items()}, labels),
                     "indices_sha256": hashlib.sha256(idx.tobytes()).hexdigest()[:16]})
    summary = {k: spread([r[k] for r in rows]) for k in scorer.metrics if k in rows[0]}
    return {"available": True, "source": scorer.pool_name, "pool_size": size, "num_images": n,
            "capped": n < s.num_samples, "per_seed": rows, **summary}


def compare_models(
    a: nn.Module,
    b: nn.Module,
    settings: CompareSettings | None = None,
    *,
    names: Sequence[str] = ("A", "B"),
    device: str | torch.device = "cpu",
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | nn.Module | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    ref: str | os.PathLike[str] | None = None,
    real: str | os.PathLike[str] | None = None,
    feature_model: Any = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Compare ``a`` and ``b`` under ``settings``; returns the JSON-able report.

    Both models sample identical noise and labels for every (CFG scale, seed); they are put in eval
    mode and moved to ``device``. Digits models are scored with the digits CNN; other models need
    ``ref`` (an ADM reference ``.npz``), Inception weights (``inception_weights`` or where
    :func:`~sparsedit.eval.metrics.inception.find_inception_weights` looks; ``feature_model`` replaces the
    network, as in :func:`sparsedit.eval.metrics.adm.evaluate`), ``vae`` for latent models, and ``real``
    for the floor. ``cache_dir`` reuses sampled sets across runs. With ``out``, writes ``compare.json``,
    ``compare.md`` and ``paired_cfg{scale}.png`` there (see :func:`prepare_out` for ``overwrite``).
    """
    s = settings or CompareSettings()
    wall = time.perf_counter()
    check_names(names)
    check_pair(a, b, s)
    dev = torch.device(device)
    digits = is_digits_model(a.config)
    if digits and any(x is not None for x in (vae, inception_weights, ref, real, feature_model)):
        raise SparseditError("these are digits models, scored with the digits CNN against the held-out test split; "
                             "drop --vae/--inception-weights/--ref/--real")
    out_dir = prepare_out(out, overwrite) if out is not None else None
    models = {"a": a.eval().to(dev), "b": b.eval().to(dev)}
    with blas_threads(torch.get_num_threads()):  # scipy's BLAS on as many threads as torch (see blas_threads)
        decoder = None
        if digits:
            scorer: Any = DigitsScorer(a.config.latent_hw[0], a.config.num_classes)
        else:
            scorer, decoder = _adm_scorer(a.config, vae, inception_weights, ref, real, feature_model, dev, progress)
        sha = {m: weights_sha256(model) for m, model in models.items()} if cache_dir is not None else {}
        cache = {"dir": Path(cache_dir) if cache_dir is not None else None, "sha": sha}
        results, pairs, timing = _run_sets(models, scorer, decoder, s, dev, cache, progress)
        floor = _floor(scorer, s)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "settings": asdict(s),
        "names": {"a": str(names[0]), "b": str(names[1])},
        "models": {m: {"class": type(model).__name__, "config": model.config.to_dict(), "sha256": sha.get(m)}
                   for m, model in models.items()},
        "scorer": scorer.kind,
        "reference": scorer.reference,
        "label_rule": "label(i) = i % num_classes",
        "noise_rule": "chunk k of seed s: generator seed shard_seed(s, k) of sparsedit.eval.sample_fid, same for A and B",
        "results": results,
        "floor": floor,
        "cost": _macs(models, s),
        "timing": timing,
        "environment": environment(dev),
        "command": command,
    }
    return finish(report, wall, out_dir, [*OUTPUT_FILES, *(paired_name(c) for c in pairs)], _write_outputs, pairs)


def _run_sets(models: dict[str, nn.Module], scorer: Any, decoder: nn.Module | None, s: CompareSettings,
              dev: torch.device, cache: dict[str, Any], progress: bool) -> tuple[list[dict[str, Any]], dict, dict]:
    """Sample and score every (scale, seed) set of both models; returns the per-scale results, the
    first seed's pairs for the paired images, and the timing."""
    from tqdm.auto import tqdm

    num_classes = models["a"].config.num_classes
    labels = balanced_labels(0, s.num_samples, num_classes)  # the same for every set
    keep = np.concatenate([np.flatnonzero(labels == c)[: s.per_class] for c in range(min(num_classes, MAX_PAIR_ROWS))])
    seconds: dict[str, dict[str, float]] = {"a": {}, "b": {}}
    cached_sets = {"a": 0, "b": 0}
    results, pairs = [], {}
    bar = tqdm(total=len(s.cfg_scales) * len(s.seeds) * (2 * s.spec(1.0, 0).num_shards + 2), unit="chunk",
               desc="compare", file=sys.stderr, disable=not progress)
    try:
        for cfg_scale in s.cfg_scales:
            rows: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
            distances = []
            for seed in s.seeds:
                bar.set_postfix_str(f"cfg {cfg_scale:g} seed {seed}: sampling")
                specs = {m: s.spec(cfg_scale, seed, m) for m in ("a", "b")}
                samples, secs = _sample_sets(models, specs, dev, cache, bar)
                bar.set_postfix_str(f"cfg {cfg_scale:g} seed {seed}: scoring")
                distances.append(paired_rmse(models["a"], samples["a"], samples["b"]))
                for m in ("a", "b"):
                    if secs[m] is None:
                        cached_sets[m] += 1
                    else:
                        seconds[m][f"{cfg_scale:g}"] = seconds[m].get(f"{cfg_scale:g}", 0.0) + secs[m]
                    feats = _set_features(scorer, models[m], samples[m], decoder, s.batch_size, dev)
                    rows[m].append({"seed": seed, **scorer.score(feats, labels)})
                    bar.update(1)
                if seed == s.seeds[0]:  # the paired image uses the first seed's samples (no extra sampling)
                    pairs[cfg_scale] = (*(to_images(models[m], samples[m][keep].to(dev), decoder).cpu()
                                          for m in ("a", "b")), labels[keep])
            results.append({"cfg_scale": cfg_scale, "per_seed": rows, **aggregate(rows["a"], rows["b"]),
                            "paired_rmse": spread(distances)})
    finally:
        bar.close()
    timing = {"sampling_seconds": {m: sum(v.values()) for m, v in seconds.items()},
              "sampling_seconds_by_scale": seconds, "cached_sets": cached_sets}
    return results, pairs, timing


def _write_outputs(out_dir: Path, report: dict[str, Any], pairs: dict[float, tuple]) -> None:
    """Paired images, compare.md, then compare.json (last: its presence marks a complete run); all atomic."""
    start_outputs(out_dir)
    s, names = report["settings"], report["names"]
    for cfg_scale, (img_a, img_b, labels) in pairs.items():
        header = [f"CFG scale {cfg_scale:g}: each pair is A | B from the same noise and label (seed {s['seeds'][0]})",
                  f"A = {names['a']}    B = {names['b']}"]
        image = paired_image(img_a, img_b, labels, s["per_class"], s["scale"], header)
        save_image(image, out_dir / paired_name(cfg_scale))
    write_report_files(out_dir, render_markdown(report), report)
