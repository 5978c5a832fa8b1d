"""Compare two video models so that the comparison cannot flatter either (``sparsedit compare`` on Latte / SparseLatte,
Wan checkpoints).

Typical use: a Latte (A) and the SparseLatte made from it and fine-tuned (B); class-conditional (UCF101), unconditional
or text-to-video (``--prompt-embeds``). The rules, and why (docs/compare.md, "Video models"):

* **Same conditions, same noise.** Video ``i`` of seed ``s`` has label ``i % num_classes`` (class models) or prompt
  ``i`` (caption models), and starts from the draw :func:`~sparsedit.eval.compare_paired.prompt_noise` ``(s, i)`` of
  shape ``(1, C, F, H, W)``, whatever the batch or device: families whose ``generate`` takes ``noise=`` (Wan) get it
  so; the others (Latte) sample that video alone from the generator seed ``noise_seed(s, i)``, which draws the same
  tensor and, for DDPM, the same later noise for A and B.
* **Several guidance values** (by the family's guidance rules, ``check_guidance``) and **several seeds**: every number
  is given per seed, with its mean and sample std.
* **A floor**: A against A itself with other noise (seed ``s + 1000``, same label or prompt), the scale on which B's
  distance from A means something; with ``i3d`` the FVD of B's set against A's next to FVD(A', A).

The settings live in :mod:`sparsedit.eval.compare_video_settings`, the rows, report and paired videos in
:mod:`sparsedit.eval.compare_video_report`, the sampling loop shared with caption models in
:mod:`sparsedit.eval.compare_paired`. The numbers say how closely B reproduces A's videos, not whether they are
good.
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
from sparsedit.eval.compare_paired import FLOOR_OFFSET
from sparsedit.eval.compare_report import prepare_out
from sparsedit.eval.compare_scoring import blas_threads
from sparsedit.eval.compare_sizes import same_size
from sparsedit.eval.compare_video_report import summarise_video, video_seed_row, write_video_outputs
from sparsedit.eval.compare_video_settings import (
    VideoCompareSettings,
    check_video_pair,
    is_video_model,
    resolve_video_settings,
)
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
        text, texts, where = paired.prompt_set(prompt_embeds, prompts, model, s.num_prompts)
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
    return paired.load_decoder(model, vae, pipeline, device, family_of(model).load_vae, "pixel-space videos",
                               "videos decoded by {}, as the family decodes its samples")


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
    image_size: int | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Compare video models ``a`` and ``b`` (Latte / SparseLatte, Wan); returns the JSON-able report.

    ``image_size`` (pixels, Wan: 480 -> 480 x 832): sample both at that size; without it a dense and a sparse model
    of different sizes sample at the sparse model's (:func:`~sparsedit.eval.compare_sizes.same_size`).

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
    paired.check_names(names)
    a, b, size_note = same_size(a, b, image_size)
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
    measures = _measures(models["a"], (decoder, pixels), video_model, s.batch_size, dev)
    with blas_threads(torch.get_num_threads()):
        results, pairs, timing = paired.run_pairs(models, cond, s, points, measures, dev, progress)
    from sparsedit.eval.metrics.fvd import CLIP_FRAMES

    fvd: dict[str, Any] = {"available": video_model is not None}
    if video_model is not None:
        fvd.update(clip_frames=CLIP_FRAMES, num_videos=cond["n"], note=fvd_note(cond["n"], len(s.seeds), CLIP_FRAMES),
                   detector=f"I3D weights {i3d}" if isinstance(i3d, str | os.PathLike) else "an I3D given in memory")
    else:
        fvd["note"] = "no FVD: pass --i3d rgb_imagenet.pt (and a VAE for latent models)"
    text_len = int(cond["text"]["embeds"].shape[1]) if "text" in cond else None
    cost = paired.cost(models, s, points, text_len, "video", "x2 under classifier-free guidance", steps_key=True)
    report: dict[str, Any] = {
        **paired.report_start(REPORT_FORMAT, "video", s, names, models),
        "conditioning": described,
        "frames": int(next(iter(pairs.values()))[0].shape[2]),  # of a decoded video (of the latents without a VAE)
        "latent_frames": family.frames,
        "size": {"latent_hw": list(a.config.latent_hw), "note": size_note},
        "fps": family.video_fps or 8,
        "space": "pixels" if pixels else "latents",
        "videos_from": frames_from,
        "noise_rule": ("video i, seed s: randn(1, C, F, H, W) from a CPU generator seeded with noise_seed(s, i) of "
                       "sparsedit.eval.compare_text, the same for A and B; the floor is A at seed s + "
                       f"{FLOOR_OFFSET} with the same label or prompt"),
        "floor_offset": FLOOR_OFFSET,
        "results": results,
        "fvd": fvd,
        **paired.report_end(cost, timing, dev, command),
    }
    outputs = ["compare.json", "compare.md",
               *(f"paired_{paired.point_name(*p)}.{ext}" for p in points for ext in ("gif", "png"))]
    return paired.finish(report, wall, out_dir, outputs, write_video_outputs, pairs)


def _measures(model: nn.Module, decoding: tuple[nn.Module | None, bool], video_model: Any, batch: int,
              dev: torch.device) -> paired.Measures:
    """How videos are measured: per video and frame, decoded as the family decodes its samples, I3D features."""
    decoder, pixels = decoding

    def decode(x: Tensor) -> Tensor:
        return _decode(model, x.to(dev), decoder).cpu()

    def features(videos: Tensor) -> np.ndarray:
        from sparsedit.eval.metrics.fvd import i3d_features

        rgb = videos.expand(-1, 3, -1, -1, -1) if videos.shape[1] == 1 else videos
        return i3d_features(video_model, rgb, batch_size=batch, device=dev)

    return paired.Measures(unit="video", bar_unit="video", reduce=lambda sq: sq.mean(dim=(1, 3, 4)).numpy(),
                           decode=decode if pixels else None,
                           features=features if video_model is not None else None, seed_row=video_seed_row,
                           summarise=lambda point, n, rows: summarise_video(point, n, rows, pixels),
                           note="model calls only (not decoding or scoring), measured in this one process; A's "
                                "count includes its floor samples; the first chunk of A, B and A' is a warm-up, not "
                                "timed, when there are others")
