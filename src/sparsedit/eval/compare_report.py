"""The outputs of :mod:`sparsedit.eval.compare`: the paired images, the output folder and the markdown report."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sparsedit.core.checkpoint import atomic_write, write_json
from sparsedit.core.images import to_uint8
from sparsedit.errors import SparseditError
from sparsedit.eval.compare_paired import cost_head, markdown_end

__all__ = [
    "HEADER_H",
    "LABEL_W",
    "LINE_H",
    "MAX_PAIR_ROWS",
    "OUTPUT_FILES",
    "PAIRED_RE",
    "PAIR_GAP",
    "PAIR_SEP",
    "paired_image",
    "paired_image_size",
    "paired_name",
    "prepare_out",
    "remove_own_outputs",
    "render_markdown",
    "results_table",
    "start_outputs",
    "write_report_files",
]

OUTPUT_FILES = ("compare.json", "compare.md")  # plus paired_cfg{scale}.png (caption models: paired_guidance{g}.png too)
# The paired-image names compare writes (and only those are replaced): cfg{c}, guidance{g} or cfg{c}_guidance{g}, as
# .png (video models: a frame strip) or .gif (video models: the paired videos).
PAIRED_RE = r"paired_(cfg[-+.0-9e]+(_guidance[-+.0-9e]+)?|guidance[-+.0-9e]+)\.(png|gif)"
MAX_PAIR_ROWS = 16  # classes shown in a paired image (all 10 for digits; the first 16 of ImageNet)
PAIR_GAP = 2  # px between A and B of one pair
PAIR_SEP = 8  # px between pairs, rows and borders
LABEL_W = 64  # px of the row-label column ("class 999")
HEADER_H = 44  # px of the header: two text lines and the A/B column marks
LINE_H = 14  # px of one line of Pillow's default font


# --------------------------------------------------------------------------------------------------
# Paired image


def paired_image_size(rows: int, per_class: int, h: int, w: int, scale: int) -> tuple[int, int]:
    """(height, width) of :func:`paired_image` for ``rows`` classes of ``per_class`` pairs of h x w images."""
    width = LABEL_W + per_class * (2 * w * scale + PAIR_GAP) + (per_class + 1) * PAIR_SEP
    height = HEADER_H + rows * h * scale + (rows + 1) * PAIR_SEP
    return height, width


def paired_image(images_a: torch.Tensor, images_b: torch.Tensor, labels: np.ndarray, per_class: int, scale: int,
                 header: Sequence[str]) -> np.ndarray:
    """One row per class (the first :data:`MAX_PAIR_ROWS` classes present), ``per_class`` pairs per row:
    A's sample, then B's sample from the same noise and label. (N, C, H, W) images in [-1, 1];
    returns an (H', W', 3) uint8 array; upscaled ``scale`` x by pixel repetition."""
    arr_a, arr_b = to_uint8(images_a), to_uint8(images_b)  # (N, h, w, C)
    if arr_a.shape[-1] == 1:
        arr_a, arr_b = np.repeat(arr_a, 3, axis=-1), np.repeat(arr_b, 3, axis=-1)
    _, h, w, _ = arr_a.shape
    classes = [int(c) for c in np.unique(labels)][:MAX_PAIR_ROWS]
    height, width = paired_image_size(len(classes), per_class, h, w, scale)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, line in enumerate(header[:2]):
        draw.text((PAIR_SEP, 4 + 14 * i), line, fill=(0, 0, 0), font=font)
    cell_w, cell_h = w * scale, h * scale
    pair_w = 2 * cell_w + PAIR_GAP
    for j in range(per_class):  # "A" over the left image of every pair, "B" over the right one
        x0 = LABEL_W + PAIR_SEP + j * (pair_w + PAIR_SEP)
        draw.text((x0, HEADER_H - 14), "A", fill=(0, 0, 160), font=font)
        draw.text((x0 + cell_w + PAIR_GAP, HEADER_H - 14), "B", fill=(160, 0, 0), font=font)
    for r, c in enumerate(classes):
        y0 = HEADER_H + PAIR_SEP + r * (cell_h + PAIR_SEP)
        draw.text((PAIR_SEP, y0 + cell_h // 2 - 6), f"class {c}", fill=(0, 0, 0), font=font)
        for j, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            x0 = LABEL_W + PAIR_SEP + j * (pair_w + PAIR_SEP)
            for dx, arr in ((0, arr_a), (cell_w + PAIR_GAP, arr_b)):
                big = arr[idx].repeat(scale, axis=0).repeat(scale, axis=1)  # nearest neighbour
                canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (x0 + dx, y0))
    return np.asarray(canvas)


def paired_name(cfg_scale: float) -> str:
    return f"paired_cfg{cfg_scale:g}.png"


# --------------------------------------------------------------------------------------------------
# Output folder


def prepare_out(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a non-empty ``out`` without ``overwrite`` (checked before any sampling; creates nothing)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SparseditError(f"--out {path} is a file; choose a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SparseditError(f"{path} is not empty; pass --overwrite (replaces only compare.json, compare.md and "
                             "its paired_*.png / .gif files there, other files are kept) or choose another --out")
    return path


def remove_own_outputs(path: Path) -> None:
    """Delete a previous run's outputs (only compare's own file names), so no stale paired image remains."""
    images = [p for p in path.glob("paired_*") if re.fullmatch(PAIRED_RE, p.name)]
    for own in [*(path / f for f in OUTPUT_FILES), *images]:
        own.unlink(missing_ok=True)


def start_outputs(out_dir: Path) -> None:
    """Create ``out_dir`` and delete a previous run's outputs there (:func:`remove_own_outputs`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_own_outputs(out_dir)


def write_report_files(out_dir: Path, markdown: str, data: dict[str, Any]) -> None:
    """compare.md, then compare.json (last: its presence marks a complete run); each atomic."""
    # errors=: a path that is not valid UTF-8 (Linux names are bytes) is written with escapes, not refused
    atomic_write(out_dir / "compare.md", lambda tmp: tmp.write_text(markdown, errors="backslashreplace"))
    write_json(out_dir / "compare.json", data)


# --------------------------------------------------------------------------------------------------
# Markdown


def _pm(summary: dict[str, Any] | None, digits: int, scale: float = 1.0) -> str:
    if summary is None:
        return "n/a"
    mean = f"{summary['mean'] * scale:.{digits}f}"
    return mean if summary["std"] is None else f"{mean} ± {summary['std'] * scale:.{digits}f}"


def _scale_label(c: float) -> str:
    return f"{c:g} (no guidance)" if c == 1.0 else f"{c:g}"


def results_table(report: dict[str, Any]) -> str:
    """The main table: one row per CFG scale, then the real floor."""
    digits = report["scorer"] == "digits"
    if digits:
        head = ["CFG scale", "FID A", "FID B", "FID ratio B/A", "accuracy A", "accuracy B", "gap B-A (points)",
                "paired RMSE", "verdict"]
    else:
        head = ["CFG scale", "FID A", "FID B", "FID ratio B/A", "sFID A", "sFID B", "IS A", "IS B", "precision A",
                "precision B", "recall A", "recall B", "paired RMSE", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        row = [_scale_label(r["cfg_scale"]), _pm(r["a"]["fid"], 2), _pm(r["b"]["fid"], 2), _pm(r["fid_ratio"], 3)]
        if digits:
            row += [_pm(r["a"]["accuracy"], 3), _pm(r["b"]["accuracy"], 3), _pm(r["accuracy_gap_points"], 1)]
        else:
            for k, d in (("sfid", 2), ("inception_score", 2), ("precision", 3), ("recall", 3)):
                row += [_pm(r["a"][k], d), _pm(r["b"][k], d)]
        lines.append("| " + " | ".join(row + [_pm(r.get("paired_rmse"), 3), r["verdict"]]) + " |")
    f = report["floor"]
    if f["available"]:
        label = f"real floor ({f['num_images']} real images per seed)"
        row = [label, _pm(f["fid"], 2), "", ""]
        if digits:
            row += [_pm(f["accuracy"], 3), "", ""]
        else:
            for k, d in (("sfid", 2), ("inception_score", 2), ("precision", 3), ("recall", 3)):
                row += [_pm(f[k], d), ""]
        lines.append("| " + " | ".join(row + ["", "what a model reproducing real data exactly would score"]) + " |")
    return "\n".join(lines)


def _sampling_text(s: dict[str, Any]) -> str:
    a = f"{s['sampler']} {s['steps']} steps"
    b = f"{s.get('sampler_b') or s['sampler']} {s.get('steps_b') or s['steps']} steps"
    if a == b:
        return a
    return (f"A samples with {a}, B with {b} (same x_T per sample; the samplers' later steps differ, so the pairs "
            "match in noise only at the start)")


def render_markdown(report: dict[str, Any]) -> str:
    """The readable report: settings in words, the table, the floor, per-class accuracy, cost."""
    s, names, f = report["settings"], report["names"], report["floor"]
    digits = report["scorer"] == "digits"
    seeds = ", ".join(str(x) for x in s["seeds"])
    ref = report["reference"]
    parts = [
        f"# Model comparison: A = {names['a']}, B = {names['b']}",
        "",
        f"A: {report['models']['a']['class']}, B: {report['models']['b']['class']}. Both models sample the **same "
        "noise and labels** (sample i has class i % num_classes; chunk k of seed s is drawn from a seed derived from "
        f"(s, k)). N = **{s['num_samples']} samples per model, per CFG scale, per seed**; seeds {seeds}; "
        f"{_sampling_text(s)}, cfg mode {s['cfg_mode']}, batch {s['batch_size']}. Every value is the "
        "mean ± sample std over the seeds; the FID ratio and the accuracy gap are taken per seed (A and B share "
        "that seed's noise), then averaged. All scales are shown side by side: guidance trades distribution match "
        "for class fidelity, and no single scale stands for a model.",
        "",
        f"Reference set: {ref['name']}, {ref['num_images']} images.",
    ]
    if digits:
        parts += [
            "Scores come from the small digits CNN shipped with sparsedit: **FID (digits-CNN features) is not "
            "ImageNet FID**; it is only comparable within this table (same network, reference set and N). Lower FID "
            "is better and it is biased upwards at small N. Accuracy = fraction of samples the CNN assigns to their "
            "intended class.",
        ]
    else:
        parts += ["Scores: ADM's evaluator (InceptionV3; FID and sFID lower is better, IS, precision and recall "
                  "higher). Comparable within this table (same N and reference)."]
    parts += ["", results_table(report), ""]
    if f["available"]:
        cap = (f" (capped: only {f['pool_size']} real images exist, so the floor is at N = {f['num_images']}, not "
               f"{s['num_samples']}; FID is biased upwards at smaller N)" if f["capped"] else "")
        parts.append(
            f"Real floor: per seed, {f['num_images']} distinct images drawn without replacement from {f['source']}, "
            f"scored against the same reference with the same function{cap}. It is what a model that reproduced "
            "its training data exactly would score at this N: model values near it are as good as this measurement "
            "can tell.")
    else:
        parts.append(f"Real floor: {f['note']}.")
    space = "pixels in [-1, 1]" if report["models"]["a"]["config"]["data_space"] == "pixel" else "latents"
    parts += ["", f"Paired RMSE: the root mean square difference between A's and B's samples of the same noise and "
              f"label ({space}); 0 means B reproduces A's samples, whatever the FIDs. It tells a drop-in replacement "
              "(small) from a model that has drifted to other images, better or worse (large)."]
    parts += ["", "Verdicts call a difference resolved only when it exceeds twice the standard deviation over seeds "
              "(a rule of thumb, not a significance test; with few seeds the std itself is rough). Per-seed values "
              "are in compare.json."]
    if digits:
        scales = [r["cfg_scale"] for r in report["results"]]
        head = ["class"] + [f"{m} @ {c:g}" for c in scales for m in ("A", "B")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        num_classes = len(report["results"][0]["a"]["per_class"])
        for k in range(num_classes):
            cells = [str(k)]
            for r in report["results"]:
                for m in ("a", "b"):
                    v = r[m]["per_class"][k]
                    cells.append("n/a" if v is None else f"{v:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        parts += ["", "## Per-class accuracy (mean over seeds)", "", *lines]
    c, t = report["cost"], report["timing"]
    cached = t["cached_sets"]
    parts += [
        *cost_head(c),
        f"| GMACs per forward (mean over the {c['timesteps']}) | {c['gmacs_per_forward']['a']:.4f} | "
        f"{c['gmacs_per_forward']['b']:.4f} |",
        f"| sampling wall seconds (all scales and seeds, sets sampled here) | {t['sampling_seconds']['a']:.1f} | "
        f"{t['sampling_seconds']['b']:.1f} |",
        f"| sets taken from the cache (not timed) | {cached['a']} | {cached['b']} |",
        "",
        f"FLOPs ratio A/B: **{c['flops_ratio_a_over_b']:.3f}x** per forward, **{c['run_flops_ratio_a_over_b']:.3f}x** "
        "per sampling run (with guidance both models run each forward on a doubled batch). Wall seconds were "
        "measured in this one process with the chunks of A and B alternating; they depend on the machine and its "
        "load.",
    ]
    images = [paired_name(r["cfg_scale"]) for r in report["results"]]
    if "outputs" in report:
        parts += ["", f"Paired images: {', '.join(f'`{i}`' for i in images)} (one row per class, each pair A | B "
                  f"from the same noise and label, seed {s['seeds'][0]})."]
    return markdown_end(parts, report)
