"""Compare two video models so that the comparison cannot flatter either (``sparsedit compare`` on Latte / SparseLatte,
Wan checkpoints).

Typical use: a Latte (A) and the SparseLatte made from it and fine-tuned (B); class-conditional (UCF101), unconditional
or text-to-video (``--prompt-embeds``). The rules, and why (docs/compare.md, "Video models"):

* **Same conditions, same noise.** Video ``i`` of seed ``s`` has label ``i % num_classes`` (class models) or prompt
  ``i`` (caption models), and starts from the draw :func:`~sparsedit.eval.compare_text.prompt_noise` ``(s, i)`` of
  shape ``(1, C, F, H, W)``, whatever the batch or device: families whose ``generate`` takes ``noise=`` (Wan) get it
  so; the others (Latte) sample that video alone from the generator seed ``noise_seed(s, i)``, which draws the same
  tensor and, for DDPM, the same later noise for A and B.
* **Several guidance values** (by the family's guidance rules, ``check_guidance``) and **several seeds**: every number
  is given per seed, with its mean and sample std.
* **A floor**: A against A itself with other noise (seed ``s + 1000``, same label or prompt), the scale on which B's
  distance from A means something; with ``i3d`` the FVD of B's set against A's next to FVD(A', A).

The settings live in :mod:`sparsedit.eval.compare_video_settings`, the rows, report and paired videos in
:mod:`sparsedit.eval.compare_video_report`. The numbers say how closely B reproduces A's videos, not whether they are
good.
"""

from __future__ import annotations

import dataclasses
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

from sparsedit.core.prompts import select_prompts
from sparsedit.errors import SparseditError
from sparsedit.eval.compare_report import prepare_out
from sparsedit.eval.compare_scoring import blas_threads
from sparsedit.eval.compare_text import FLOOR_OFFSET, noise_seed, prompt_noise
from sparsedit.eval.compare_text_report import point_label, point_name
from sparsedit.eval.compare_video_report import summarise_video, video_seed_row, write_video_outputs
from sparsedit.eval.compare_video_settings import (
    VideoCompareSettings,
    check_video_pair,
    is_video_model,
    resolve_video_settings,
)
from sparsedit.eval.macs import count_forward
from sparsedit.families import family_of

__all__ = ["FLOOR_OFFSET", "VideoCompareSettings", "check_video_pair", "compare_video_models", "fvd_note",
           "is_video_model", "resolve_video_settings"]

REPORT_FORMAT = 1


def fvd_note(n: int, seeds: int, clip_frames: int) -> str:
    """The caveats printed and written beside every FVD of a comparison."""
    return (f"FVD from N = {n} videos per set ({seeds} seed{'s' if seeds > 1 else ''}). FVD is biased upwards and "
            "noisy at small N (400-d covariances; StyleGAN-V and Latte use 2048 or more videos per set), so read the "
            "columns against each other at this N, never against published FVDs. The detector is piergiaj's "
            "rgb_imagenet.pt (DeepMind's released Kinetics-400 I3D), not StyleGAN-V's TorchScript export, so values "
            f"are not interchangeable with Latte's (docs/metrics.md). Clips: the first {clip_frames} frames of each "
            "video, resized to 224x224.")


# --------------------------------------------------------------------------------------------------
# Inputs


def _conditions(model: nn.Module, kind: str, s: VideoCompareSettings, prompt_embeds: Any,
                prompts: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what every video is sampled from: ``labels`` or ``text``; the report's description of it)."""
    if kind == "caption":
        from sparsedit.eval.compare_text import _prompt_set

        text, texts, where = _prompt_set(prompt_embeds, prompts, model, s.num_prompts)
        n = int(text["embeds"].shape[0])
        guided = any(c != 1.0 for c in s.cfg_scales or ())
        uncond = ("none (no classifier-free guidance)" if not guided else "the file's negative_embeds"
                  if "null_embeds" in text else "the model's own unconditional input (its stored null caption; Wan: "
                  "zeros), the file holds no negative_embeds")
        shown = [f"{i}: {texts[i]}" if texts else f"prompt {i}" for i in range(min(n, s.rows))]
        return {"text": text, "n": n}, {
            "kind": kind, "count": n, "source": where, "tokens": int(text["embeds"].shape[1]), "texts": texts,
            "unconditional": uncond, "unit": "prompt", "shown": shown,
            "description": f"{n} prompts from {where}; unconditional input: {uncond}"}
    assert s.num_samples is not None, "resolve_video_settings first"
    n = s.num_samples
    if kind == "class":
        from sparsedit.eval.sample_fid import balanced_labels

        classes = model.config.num_classes
        labels = balanced_labels(0, n, classes).tolist()
        return {"labels": labels, "n": n}, {
            "kind": kind, "count": n, "rule": "label(i) = i % num_classes", "unit": "label",
            "shown": [f"{i}: class {labels[i]}" for i in range(min(n, s.rows))],
            "description": f"{n} videos with class labels i % {classes}"}
    return {"labels": None, "n": n}, {  # an unconditional model ignores the label 0 it is handed
        "kind": kind, "count": n, "unit": "video index", "shown": [f"video {i}" for i in range(min(n, s.rows))],
        "description": f"none (an unconditional model), {n} videos"}


def _decoder(model: nn.Module, vae: Any, pipeline: Any, device: torch.device) -> tuple[nn.Module | None, str]:
    """(the family's VAE or None, where the videos come from, in words)."""
    family, config = family_of(model), model.config
    if vae is not None and pipeline is not None:
        raise SparseditError("give --vae DIR or --pipeline DIR (whose vae/ folder is used), not both")
    if config.data_space == "pixel":
        if vae is not None or pipeline is not None:
            raise SparseditError(f"this {config.model_type} works in pixel space and needs no VAE: drop --vae / --pipeline")
        return None, "pixel-space videos"
    source = vae
    if source is None and pipeline is not None:
        source = family.default_vae_dir(pipeline)
        if source is None:
            raise SparseditError(f"a {config.model_type} does not read its VAE from --pipeline; pass --vae DIR (e.g. the "
                                 "pipeline's vae/ folder)")
    if source is None:
        return None, "no VAE (--vae / --pipeline): compared in latent space only"
    if isinstance(source, nn.Module):
        decoder, where = source, "the VAE given in memory"
    else:
        decoder, where = family.load_vae(source, device), f"the VAE in {source}"
    return decoder.to(device).eval(), f"videos decoded by {where}, as the family decodes its samples"


def _decode(model: nn.Module, latents: Tensor, decoder: nn.Module | None) -> Tensor:
    """Model-space videos -> (N, C, F', H, W) in [-1, 1] as ``sparsedit sample`` decodes them
    (``family.decode_samples``: Latte frame by frame with an image VAE, Wan whole clips with its 3-D VAE)."""
    with torch.no_grad():
        return family_of(model).decode_samples(model, latents, decoder).float().clamp(-1, 1)


def _video_model(i3d: Any, model: nn.Module, decoder: nn.Module | None, pixels: bool, n: int,
                 device: torch.device) -> Any:
    """The I3D network of the optional FVD (None unless asked for), after refusing what FVD cannot score."""
    if i3d is None:
        return None
    from sparsedit.eval.metrics.fvd import CLIP_FRAMES, load_i3d

    if not pixels:
        raise SparseditError("FVD needs decoded videos: pass --vae DIR (these models work in latent space), or drop "
                             "--i3d")
    probe = torch.zeros(family_of(model).sample_shape(1), device=device)  # the frames of one decoded video
    frames = int(_decode(model, probe, decoder).shape[2])
    if frames < CLIP_FRAMES:
        raise SparseditError(f"FVD scores clips of {CLIP_FRAMES} frames and these videos have {frames}; drop --i3d")
    if n < 2:
        raise SparseditError(f"FVD needs at least 2 videos per set, got {n}; pass --num-samples 2 (or more prompts), "
                             "or drop --i3d")
    if isinstance(i3d, str | os.PathLike):
        return load_i3d(i3d, device)
    return i3d


# --------------------------------------------------------------------------------------------------
# The comparison


def compare_video_models(
    a: nn.Module,
    b: nn.Module,
    settings: VideoCompareSettings | None = None,
    *,
    prompt_embeds: str | os.PathLike[str] | dict[str, Tensor] | None = None,
    prompts: Sequence[str] | None = None,
    names: Sequence[str] = ("A", "B"),
    device: str | torch.device = "cpu",
    progress: bool = True,
    vae: str | os.PathLike[str] | nn.Module | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    i3d: Any = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Compare video models ``a`` and ``b`` (Latte / SparseLatte, Wan); returns the JSON-able report.

    Class-conditional and unconditional models sample ``settings.num_samples`` videos per set; caption models one
    per prompt of ``prompt_embeds`` (a prompt-embeddings file or the dict
    :func:`~sparsedit.core.prompts.read_prompt_embeds` returns; ``prompts``: their strings). Videos are decoded by the
    family (``load_vae``, ``decode_samples``: Latte frame by frame, Wan whole clips) with ``vae`` (a local VAE directory
    or module) or ``pipeline``'s ``vae/`` where the family reads one; pixel-space models need none; without one, latents
    are compared. ``i3d`` (the path of piergiaj's
    ``rgb_imagenet.pt``, or a loaded I3D / any callable mapping (B, 3, 16, 224, 224) clips to (B, D) features) adds
    FVDs; it needs decoded videos of at least 16 frames. With ``out``, writes ``compare.json``, ``compare.md`` and per
    guidance value ``paired_cfg{scale}.gif`` and ``.png`` (see :func:`~sparsedit.eval.compare_report.prepare_out`).
    """
    wall = time.perf_counter()
    if len(names) != 2 or not all(str(n).strip() for n in names):
        raise SparseditError(f"--names takes two non-empty names, got {list(names)}")
    kind = check_video_pair(a, b, prompt_embeds is not None)
    s = resolve_video_settings(settings or VideoCompareSettings(), a, b, kind)
    family = family_of(a)
    cond, described = _conditions(a, kind, s, prompt_embeds, prompts)
    dev = torch.device(device)
    out_dir = prepare_out(out, overwrite) if out is not None else None
    models = {"a": a.eval().to(dev), "b": b.eval().to(dev)}
    decoder, frames_from = _decoder(a, vae, pipeline, dev)
    pixels = decoder is not None or a.config.data_space == "pixel"
    video_model = _video_model(i3d, a, decoder, pixels, cond["n"], dev)
    points: list[tuple[float, None]] = [(c, None) for c in s.cfg_scales]  # type: ignore[union-attr]
    with blas_threads(torch.get_num_threads()):
        results, pairs, timing = _run(models, cond, s, points, (decoder, pixels), video_model, dev, progress)
    from sparsedit.eval.metrics.fvd import CLIP_FRAMES

    fvd: dict[str, Any] = {"available": video_model is not None}
    if video_model is not None:
        fvd.update(clip_frames=CLIP_FRAMES, num_videos=cond["n"], note=fvd_note(cond["n"], len(s.seeds), CLIP_FRAMES),
                   detector=f"I3D weights {i3d}" if isinstance(i3d, str | os.PathLike) else "an I3D given in memory")
    else:
        fvd["note"] = "no FVD: pass --i3d rgb_imagenet.pt (and a VAE for latent models)"
    text_len = int(cond["text"]["embeds"].shape[1]) if "text" in cond else None
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "kind": "video",
        "settings": dataclasses.asdict(s),
        "names": {"a": str(names[0]), "b": str(names[1])},
        "models": {m: {"class": type(model).__name__, "config": model.config.to_dict()} for m, model in models.items()},
        "conditioning": described,
        "frames": int(next(iter(pairs.values()))[0].shape[2]),  # of a decoded video (of the latents without a VAE)
        "latent_frames": family.frames,
        "fps": family.video_fps or 8,
        "space": "pixels" if pixels else "latents",
        "videos_from": frames_from,
        "noise_rule": ("video i, seed s: randn(1, C, F, H, W) from a CPU generator seeded with noise_seed(s, i) of "
                       "sparsedit.eval.compare_text, the same for A and B; the floor is A at seed s + "
                       f"{FLOOR_OFFSET} with the same label or prompt"),
        "floor_offset": FLOOR_OFFSET,
        "results": results,
        "fvd": fvd,
        "cost": _cost(models, s, points, text_len),
        "timing": timing,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                        "threads": torch.get_num_threads(), "device": str(dev)},
        "command": command,
    }
    if out_dir is not None:
        report["outputs"] = ["compare.json", "compare.md",
                             *(f"paired_{point_name(*p)}.{ext}" for p in points for ext in ("gif", "png"))]
    report["wall_seconds"] = time.perf_counter() - wall
    if out_dir is not None:
        write_video_outputs(out_dir, report, pairs)
    return report


def _sample(model: nn.Module, cond: dict[str, Any], rows: range, seed: int, cfg_scale: float,
            s: VideoCompareSettings, device: torch.device, name: str) -> Tensor:
    """Model-space videos of ``rows`` under ``seed``, float32 on the CPU (the copy waits for a GPU)."""
    family = family_of(model)
    kwargs: dict[str, Any] = dict(sampler=s.sampler, steps=s.steps, cfg_scale=cfg_scale, device=device, progress=False)
    if s.cfg_mode is not None:
        kwargs["cfg_mode"] = s.cfg_mode

    @torch.no_grad()
    def call(idx: list[int], **extra: Any) -> Tensor:
        if "text" in cond:
            part = {k: v.to(device) for k, v in select_prompts(cond["text"], idx).items()}
            return family.generate(model, text=part, **kwargs, **extra)
        labels = cond["labels"]
        return family.generate(model, labels=[labels[i] if labels else 0 for i in idx], **kwargs, **extra)

    if "noise" in inspect.signature(family.generate).parameters:
        noise = torch.cat([prompt_noise(model.config, seed, i) for i in rows]).to(device)
        out = call(list(rows), noise=noise, seed=seed)
    else:  # one video per call, its generator seeded by the noise rule: sample_batch draws prompt_noise's tensor
        out = torch.cat([call([i], seed=noise_seed(seed, i)) for i in rows])
    out = out.float().cpu()
    if not torch.isfinite(out).all():
        raise SparseditError(f"model {name}'s samples hold NaN or infinite values (a diverged fine-tune?); compare an "
                             "earlier checkpoint")
    return out


def _mse(x: Tensor, y: Tensor) -> np.ndarray:
    """Per-video, per-frame mean squared difference (N, F), float64."""
    return (x.double() - y.double()).pow(2).mean(dim=(1, 3, 4)).numpy()


def _features(video_model: Any, videos: Tensor, batch: int, device: torch.device) -> np.ndarray:
    from sparsedit.eval.metrics.fvd import i3d_features

    rgb = videos.expand(-1, 3, -1, -1, -1) if videos.shape[1] == 1 else videos
    return i3d_features(video_model, rgb, batch_size=batch, device=device)


def _run(models: dict[str, nn.Module], cond: dict[str, Any], s: VideoCompareSettings, points: list[tuple[float, None]],
         decoding: tuple[nn.Module | None, bool], video_model: Any, dev: torch.device,
         progress: bool) -> tuple[list[dict[str, Any]], dict, dict]:
    """Sample every (guidance, seed) set of A, B and the floor A'; returns the results, the first seed's pairs and the
    timing. Chunks of A, B and A' alternate, so a machine whose speed drifts slows them alike."""
    from tqdm.auto import tqdm

    decoder, pixels = decoding
    n = cond["n"]
    chunks = [range(k, min(k + s.batch_size, n)) for k in range(0, n, s.batch_size)]
    seconds, videos = {"a": 0.0, "b": 0.0}, {"a": 0, "b": 0}
    warm_up = len(points) * len(s.seeds) * len(chunks) > 1  # leave the first chunk untimed when there are others
    results, pairs = [], {}
    bar = tqdm(total=len(points) * len(s.seeds) * 3 * n, unit="video", desc="compare", file=sys.stderr,
               disable=not progress)
    try:
        for point in points:
            rows = []
            for seed in s.seeds:
                bar.set_postfix_str(f"{point_label(*point)}, seed {seed}")
                acc: dict[str, list[np.ndarray]] = {k: [] for k in ("lat_b", "lat_f", "lat_a", "pix_b", "pix_f")}
                feats: dict[str, list[np.ndarray]] = {"a": [], "b": [], "f": []}
                shown: dict[str, list[Tensor]] = {"a": [], "b": []}
                for rows_k in chunks:
                    lat = {}
                    for key, m, sd in (("a", "a", seed), ("b", "b", seed), ("f", "a", seed + FLOOR_OFFSET)):
                        start = time.perf_counter()
                        lat[key] = _sample(models[m], cond, rows_k, sd, point[0], s, dev, m.upper())
                        if not warm_up:  # the first chunk pays for kernel selection and caches: not timed
                            seconds[m] += time.perf_counter() - start
                            videos[m] += len(rows_k)
                        bar.update(len(rows_k))
                    warm_up = False
                    acc["lat_b"].append(_mse(lat["b"], lat["a"]))
                    acc["lat_f"].append(_mse(lat["f"], lat["a"]))
                    acc["lat_a"].append(lat["a"].double().pow(2).mean(dim=(1, 3, 4)).numpy())
                    vid = lat
                    if pixels:
                        vid = {k: _decode(models["a"], v.to(dev), decoder).cpu() for k, v in lat.items()}
                        acc["pix_b"].append(_mse(vid["b"], vid["a"]))
                        acc["pix_f"].append(_mse(vid["f"], vid["a"]))
                        if video_model is not None:
                            for k in feats:
                                feats[k].append(_features(video_model, vid[k], s.batch_size, dev))
                    if seed == s.seeds[0]:
                        for m in ("a", "b"):
                            shown[m].append(vid[m][: max(0, s.rows - sum(len(x) for x in shown[m]))])
                rows.append(video_seed_row(seed, FLOOR_OFFSET, {k: np.concatenate(v) for k, v in acc.items() if v},
                                           {k: np.concatenate(v) for k, v in feats.items() if v}))
                if seed == s.seeds[0]:
                    pairs[point] = (torch.cat(shown["a"]), torch.cat(shown["b"]), pixels)
            results.append(summarise_video(point, n, rows, pixels))
    finally:
        bar.close()
    timing = {"sampling_seconds": seconds, "videos_timed": videos,
              "seconds_per_video": {m: seconds[m] / videos[m] if videos[m] else None for m in seconds},
              "note": "model calls only (not decoding or scoring), measured in this one process; A's count includes "
                      "its floor samples; the first chunk of A, B and A' is a warm-up, not timed, when there are others"}
    return results, pairs, timing


def _cost(models: dict[str, nn.Module], s: VideoCompareSettings, points: list[tuple[float, None]],
          text_len: int | None) -> dict[str, Any]:
    """GMACs per model evaluation (at each step's token set, mean over the run) and per video."""
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
        "gmacs_per_video": {point_name(c, g): {m: v * (2 if c != 1.0 else 1) for m, v in per_run.items()}
                            for c, g in points},  # classifier-free guidance evaluates every step twice
        "params": params,
        "flops_ratio_a_over_b": per_forward["a"] / per_forward["b"],
        "steps": steps,
        "model_evaluations": f"{steps} {s.sampler} steps per video (x2 under classifier-free guidance)",
        "caption_tokens": text_len,
    }
