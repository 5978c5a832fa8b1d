"""The outputs of :mod:`sparsedit.eval.compare_text`: the numbers of one set and their summary over seeds, the paired
images (one row per prompt, A | B), the markdown report and the files (what video models share with them, from the
names of the guidance values to the report's cost section, is in :mod:`sparsedit.eval.compare_paired`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sparsedit.core.images import save_image, to_uint8
from sparsedit.errors import SparseditError
from sparsedit.eval import compare_paired as paired
from sparsedit.eval.compare_paired import json_safe, pm, point_label, point_name, spread_inf
from sparsedit.eval.compare_report import LINE_H, PAIR_GAP, PAIR_SEP, start_outputs, write_report_files

__all__ = ["SUMMARISED", "json_safe", "point_label", "point_name", "render_text_markdown", "seed_row", "spread_inf",
           "summarise", "text_paired_image", "text_paired_image_size", "text_results_table",
           "write_text_outputs"]

MIN_WIDTH = 360  # px: room for a readable prompt line above small images


# --------------------------------------------------------------------------------------------------
# The numbers of one set, and their summary over seeds


def _fd(x: np.ndarray, ref: np.ndarray) -> float | None:
    from sparsedit.eval.metrics.stats import feature_stats, frechet_distance

    try:
        return max(frechet_distance(*feature_stats(x), *feature_stats(ref)), 0.0)
    except SparseditError:  # degenerate covariances at this N: no number rather than a wrong one
        return None


def seed_row(seed: int, offset: int, acc: dict[str, np.ndarray], feats: dict[str, np.ndarray]) -> dict[str, Any]:
    """The numbers of one (guidance, seed) set: B vs A, and the floor A' vs A, on the same prompts."""
    row, mse_b, mse_f, scale = paired.distance_row(seed, offset, acc)
    per_b, per_f = np.sqrt(mse_b) / scale, np.sqrt(mse_f) / scale
    row["per_prompt"] = {"rmse": per_b.tolist(), "floor_rmse": per_f.tolist()}
    if feats:
        row["fd"], row["floor_fd"] = _fd(feats["b"], feats["f"]), _fd(feats["a"], feats["f"])
    return row


SUMMARISED = ("latent_rel_rmse", "floor_latent_rel_rmse", "pixel_rmse", "floor_pixel_rmse", "psnr_db", "floor_psnr_db",
              "rmse_ratio", "fd", "floor_fd")


def summarise(point: tuple[float, float | None], n: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"cfg_scale": point[0], "guidance": point[1], "label": point_label(*point),
                           "name": point_name(*point), "num_images": n, "per_seed": rows}
    out.update(paired.summarise_keys(rows, SUMMARISED))
    out["verdict"] = paired.reading(out, "images", exact="samples")
    return out


# --------------------------------------------------------------------------------------------------
# Paired image


def _ascii(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")  # the bitmap font has Latin-1 glyphs only


def text_paired_image_size(rows: int, h: int, w: int, scale: int, header_lines: int = 3) -> tuple[int, int]:
    """(height, width) of :func:`text_paired_image` for ``rows`` prompts of h x w images."""
    width = max(2 * w * scale + PAIR_GAP + 2 * PAIR_SEP, MIN_WIDTH)
    height = (header_lines + 1) * LINE_H + 4 + rows * (LINE_H + h * scale + PAIR_SEP) + PAIR_SEP
    return height, width


def text_paired_image(images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str], scale: int,
                      header: Sequence[str]) -> np.ndarray:
    """One row per prompt: its text, then A's image | B's image from the same noise. (N, C, H, W) images in [-1, 1];
    ``header``: up to 3 lines. Returns an (H', W', 3) uint8 array, upscaled ``scale`` x by pixel repetition."""
    arr_a, arr_b = to_uint8(images_a), to_uint8(images_b)
    if arr_a.shape[-1] == 1:
        arr_a, arr_b = np.repeat(arr_a, 3, axis=-1), np.repeat(arr_b, 3, axis=-1)
    n, h, w, _ = arr_a.shape
    cell_w, cell_h = w * scale, h * scale
    height, width = text_paired_image_size(n, h, w, scale, len(header[:3]))
    head_h = len(header[:3]) * LINE_H + LINE_H + 4
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    room = width - 2 * PAIR_SEP

    def line(xy: tuple[int, int], text: str, fill: tuple[int, int, int] = (0, 0, 0)) -> None:
        text = _ascii(text)
        if draw.textlength(text, font=font) > room:  # cut to fit, with an ellipsis (no glyph is under 2 px wide)
            text = text[: room // 2]
            while text and draw.textlength(text + "...", font=font) > room:
                text = text[:-1]
            text += "..."
        draw.text(xy, text, fill=fill, font=font)

    for i, text in enumerate(header[:3]):
        line((PAIR_SEP, 4 + LINE_H * i), text)
    draw.text((PAIR_SEP, head_h - LINE_H), "A", fill=(0, 0, 160), font=font)
    draw.text((PAIR_SEP + cell_w + PAIR_GAP, head_h - LINE_H), "B", fill=(160, 0, 0), font=font)
    for r in range(n):
        y0 = head_h + r * (LINE_H + cell_h + PAIR_SEP)
        line((PAIR_SEP, y0), f"{r}: {prompts[r]}" if r < len(prompts) else f"prompt {r}")
        for dx, arr in ((0, arr_a), (cell_w + PAIR_GAP, arr_b)):
            big = arr[r].repeat(scale, axis=0).repeat(scale, axis=1)
            canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (PAIR_SEP + dx, y0 + LINE_H))
    return np.asarray(canvas)


# --------------------------------------------------------------------------------------------------
# Markdown


def text_results_table(report: dict[str, Any]) -> str:
    """The main table: one row per guidance value."""
    pixels = report["space"] == "pixels"
    fd = any(r.get("fd") is not None or r.get("floor_fd") is not None for r in report["results"])
    head = ["guidance", "N images"]
    if pixels:
        head += ["PSNR B vs A (dB)", "floor PSNR A vs A' (dB)"]
    head += ["RMSE ratio B-A / floor", "latent rel. RMSE B vs A", "floor latent rel. RMSE"]
    head += ["FD B vs A'", "FD floor A vs A'"] if fd else []
    head += ["GMACs per image A / B", "reading"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cost = report["cost"]["gmacs_per_image"]
    for r in report["results"]:
        row = [r["label"], f"{r['num_images']} x {len(r['per_seed'])} seeds"]
        if pixels:
            row += [pm(r["psnr_db"], 2), pm(r["floor_psnr_db"], 2)]
        row += [pm(r["rmse_ratio"], 1, percent=True), pm(r["latent_rel_rmse"], 4), pm(r["floor_latent_rel_rmse"], 4)]
        row += [pm(r.get("fd"), 2), pm(r.get("floor_fd"), 2)] if fd else []
        c = cost[r["name"]]
        row += [f"{c['a']:.3g} / {c['b']:.3g}", r["verdict"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_text_markdown(report: dict[str, Any]) -> str:
    """The readable report of a caption-model comparison: settings in words, the table, what it means, cost."""
    s, names, p = report["settings"], report["names"], report["prompts"]
    seeds = ", ".join(str(x) for x in s["seeds"])
    pixels = report["space"] == "pixels"
    models = report["models"]
    parts = [
        f"# Model comparison on captions: A = {names['a']}, B = {names['b']}",
        "",
        f"A: {models['a']['class']}, B: {models['b']['class']}. Prompts: {p['count']} from {p['source']} "
        f"({p['tokens']} caption tokens{'' if p['texts'] else ', prompt strings not recorded'}). Both models sample "
        f"the **same prompts from the same noise**: prompt i under seed s starts from one seeded draw of (i, s). "
        f"Seeds {seeds}; {s['sampler']} {s['steps']} steps. Unconditional input: {p['unconditional']}. Every value is "
        "the mean ± sample std over the seeds; the guidance values are shown side by side.",
        "",
        f"Compared on: **{report['images_from']}**"
        + (f", at latent size {'x'.join(str(v) for v in report['size']['latent_hw'])}"
           + (f" ({report['size']['note']})" if report["size"]["note"] else "") + ".")
        + ("" if pixels else " No VAE was given, so no PSNR: the latents are compared, and the paired images show the "
                             "first three latent channels, not pictures."),
        "",
        text_results_table(report),
        "",
        "What the numbers mean:",
        "",
        "- **B vs A**: B's sample against A's sample of the same prompt and the same noise"
        + (": PSNR in dB of images in [-1, 1] (peak-to-peak 2, from the RMSE over all pixels of the set; ∞ when "
           "identical), and " if pixels else ": ")
        + "the latent relative RMSE, the RMSE of the latent difference over the RMS of A's latents (0 = identical).",
        f"- **Floor A vs A'**: A against A itself on the same prompt with other noise (seed s + "
        f"{s_floor(report)}). It is how far apart two images of one prompt are when only the noise differs, the scale on "
        "which B's distance means something: near 0 % of the floor, B reproduces A's images; near 100 %, B's images "
        "are as different from A's as a fresh draw of A is (same prompt, other picture).",
        "- **RMSE ratio** = RMSE(B, A) / RMSE(A', A), per seed, then averaged"
        + (" (on pixels)." if pixels else " (on latents)."),
    ]
    if any(r.get("fd") is not None for r in report["results"]):
        parts.append("- **FD**: the Fréchet distance (Inception pool features) of B's set and of A's set, each against "
                     "A' (A at the floor seeds, other noise); equal distributions give equal expected values. With few "
                     "prompts it is biased and rough: compare the two columns, never with published FIDs.")
    parts += [
        "",
        "This is **paired fidelity to A, not image quality**: a B that differs from A may be better or worse, and a "
        "B that matches A inherits A's faults. There is no real-data FID here: that needs a caption data set with "
        "its images.",
    ]
    c = report["cost"]
    parts += paired.cost_section(
        report, "image", f"the {c['model_evaluations'].split(' per')[0]}, {c['caption_tokens']} caption tokens",
        "Seconds per image count the model calls only (not decoding), measured in this one process with the chunks "
        "of A, B and A' alternating; A's include its floor samples; the first chunk of each is a warm-up and not timed. "
        "They depend on the machine and its load.")
    if "outputs" in report:
        images = [o for o in report["outputs"] if o.startswith("paired_")]
        parts += ["", f"Paired images: {', '.join(f'`{i}`' for i in images)} (one row per prompt, the first "
                  f"{s['rows']} prompts: A | B from the same noise, seed {s['seeds'][0]})."]
    return paired.markdown_end(parts, report)


def s_floor(report: dict[str, Any]) -> int:
    """The seed offset of the floor, read from the per-seed rows."""
    row = report["results"][0]["per_seed"][0]
    return int(row["floor_seed"] - row["seed"])


# --------------------------------------------------------------------------------------------------
# Files


def write_text_outputs(out_dir: Path, report: dict[str, Any], pairs: dict[tuple[float, float | None], tuple]) -> None:
    """Paired images, compare.md, then compare.json (last: its presence marks a complete run); each atomic."""
    start_outputs(out_dir)
    s, names, texts = report["settings"], report["names"], report["prompts"]["texts"] or []
    for (cfg_scale, guidance), (img_a, img_b, pixels) in pairs.items():
        if not pixels:
            img_a, img_b = paired.latent_preview(img_a), paired.latent_preview(img_b)
        what = "A | B, same noise" if pixels else "latents (3 channels), A | B, same noise"
        header = [f"{point_label(cfg_scale, guidance)}, seed {s['seeds'][0]}: {what}", f"A = {names['a']}",
                  f"B = {names['b']}"]
        image = text_paired_image(img_a, img_b, texts, s["scale"], header)
        save_image(image, out_dir / f"paired_{point_name(cfg_scale, guidance)}.png")
    write_report_files(out_dir, render_text_markdown(report), json_safe(report))
