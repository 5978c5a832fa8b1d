"""The outputs of :mod:`sparsedit.eval.compare_text`: names of the guidance values, the summary over seeds, the paired
images (one row per prompt, A | B), the markdown report and the files."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sparsedit.core.checkpoint import atomic_write, write_json
from sparsedit.core.images import save_image, to_uint8
from sparsedit.errors import SparseditError
from sparsedit.eval.compare_report import PAIR_GAP, PAIR_SEP, remove_own_outputs

__all__ = ["SUMMARISED", "json_safe", "point_label", "point_name", "render_text_markdown", "seed_row", "spread_inf",
           "summarise", "text_paired_image", "text_paired_image_size", "text_results_table",
           "write_text_outputs"]

LINE_H = 14  # px of one line of Pillow's default font
MIN_WIDTH = 360  # px: room for a readable prompt line above small images


def point_label(cfg_scale: float, guidance: float | None) -> str:
    """How the report names one guidance value: ``cfg 7``, ``guidance 3.5``, ``cfg 1 (no guidance)``."""
    if guidance is None:
        return "cfg 1 (no guidance)" if cfg_scale == 1.0 else f"cfg {cfg_scale:g}"
    return f"guidance {guidance:g}" if cfg_scale == 1.0 else f"cfg {cfg_scale:g}, guidance {guidance:g}"


def point_name(cfg_scale: float, guidance: float | None) -> str:
    """The file-name part of one guidance value: ``cfg7``, ``guidance3.5``, ``cfg2_guidance3.5``."""
    if guidance is None:
        return f"cfg{cfg_scale:g}"
    return f"guidance{guidance:g}" if cfg_scale == 1.0 else f"cfg{cfg_scale:g}_guidance{guidance:g}"


def spread_inf(values: Sequence[float]) -> dict[str, Any]:
    """Per-seed values, mean and sample std (None for one seed); an infinite value (PSNR of identical images)
    makes the mean infinite and the std None."""
    vals = [float(v) for v in values]
    if not all(math.isfinite(v) for v in vals):
        return {"per_seed": vals, "mean": math.inf if all(v == math.inf for v in vals) else math.nan, "std": None}
    return {"per_seed": vals, "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None}


def json_safe(obj: Any) -> Any:
    """``obj`` with infinite floats as the strings ``"inf"`` / ``"-inf"`` and NaN as None: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# The numbers of one set, and their summary over seeds


def _rmse(mse: np.ndarray) -> float:
    return float(np.sqrt(mse.mean()))


def _psnr(rmse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2); infinite for identical images."""
    return math.inf if rmse == 0 else 20 * math.log10(2.0 / rmse)


def _fd(x: np.ndarray, ref: np.ndarray) -> float | None:
    from sparsedit.eval.metrics.stats import feature_stats, frechet_distance

    try:
        return max(frechet_distance(*feature_stats(x), *feature_stats(ref)), 0.0)
    except SparseditError:  # degenerate covariances at this N: no number rather than a wrong one
        return None


def seed_row(seed: int, offset: int, acc: dict[str, np.ndarray], feats: dict[str, np.ndarray]) -> dict[str, Any]:
    """The numbers of one (guidance, seed) set: B vs A, and the floor A' vs A, on the same prompts."""
    norm = math.sqrt(float(acc["lat_a"].mean()))
    row: dict[str, Any] = {"seed": seed, "floor_seed": seed + offset,
                           "latent_rel_rmse": _rmse(acc["lat_b"]) / norm if norm else None,
                           "floor_latent_rel_rmse": _rmse(acc["lat_f"]) / norm if norm else None}
    if "pix_b" in acc:
        rb, rf = _rmse(acc["pix_b"]), _rmse(acc["pix_f"])
        row.update(pixel_rmse=rb, floor_pixel_rmse=rf, psnr_db=_psnr(rb), floor_psnr_db=_psnr(rf))
        per_b, per_f = np.sqrt(acc["pix_b"]), np.sqrt(acc["pix_f"])
    else:
        rb, rf = row["latent_rel_rmse"], row["floor_latent_rel_rmse"]
        scale = norm or 1.0
        per_b, per_f = np.sqrt(acc["lat_b"]) / scale, np.sqrt(acc["lat_f"]) / scale
    row["rmse_ratio"] = rb / rf if rf else None
    row["per_prompt"] = {"rmse": per_b.tolist(), "floor_rmse": per_f.tolist()}
    if feats:
        row["fd"], row["floor_fd"] = _fd(feats["b"], feats["f"]), _fd(feats["a"], feats["f"])
    return row


SUMMARISED = ("latent_rel_rmse", "floor_latent_rel_rmse", "pixel_rmse", "floor_pixel_rmse", "psnr_db", "floor_psnr_db",
              "rmse_ratio", "fd", "floor_fd")


def summarise(point: tuple[float, float | None], n: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"cfg_scale": point[0], "guidance": point[1], "label": point_label(*point),
                           "name": point_name(*point), "num_images": n, "per_seed": rows}
    for key in SUMMARISED:
        values = [r.get(key) for r in rows]
        out[key] = spread_inf(values) if values and all(v is not None for v in values) else None
    out["verdict"] = _verdict(out)
    return out


def _verdict(r: dict[str, Any]) -> str:
    """Plain words on B's distance from A, on the floor's scale; they claim nothing about image quality."""
    ratio = r["rmse_ratio"]
    rmse = r["pixel_rmse"] or r["latent_rel_rmse"]
    if rmse is not None and all(v == 0 for v in rmse["per_seed"]):
        return "B reproduces A's samples exactly"
    if ratio is None:
        return "no floor to read B's distance against (A ignores its noise)"
    mean, std = ratio["mean"], ratio["std"]
    if std is None:
        return f"B-vs-A distance is {mean:.0%} of the floor (one seed: no spread)"
    if mean + 2 * std < 1:
        return f"B stays closer to A's images than a new noise draw of A ({mean:.0%} ± {std:.0%} of the floor)"
    return f"B differs from A's images about as much as a new noise draw of A, or more ({mean:.0%} ± {std:.0%})"


# --------------------------------------------------------------------------------------------------
# Paired image


def _latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """Latents (N, C, h, w) as pseudo-images in [-1, 1]: the first 3 channels, each scaled by 2.5 std."""
    x = latents[:, :3] if latents.shape[1] >= 3 else latents[:, :1].expand(-1, 3, -1, -1)
    return (x / (2.5 * x.std().clamp_min(1e-8))).clamp(-1, 1)


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


def _pm(summary: dict[str, Any] | None, digits: int, percent: bool = False) -> str:
    if summary is None:
        return "n/a"
    mean, std = summary["mean"], summary["std"]
    if isinstance(mean, str) or not math.isfinite(mean):
        return "∞ (identical)" if mean in ("inf", math.inf) else "mixed (some seeds identical)"
    scale = 100 if percent else 1
    text = f"{mean * scale:.{digits}f}{'%' if percent else ''}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}{'%' if percent else ''}"


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
            row += [_pm(r["psnr_db"], 2), _pm(r["floor_psnr_db"], 2)]
        row += [_pm(r["rmse_ratio"], 1, percent=True), _pm(r["latent_rel_rmse"], 4), _pm(r["floor_latent_rel_rmse"], 4)]
        row += [_pm(r.get("fd"), 2), _pm(r.get("floor_fd"), 2)] if fd else []
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
    c, t = report["cost"], report["timing"]
    parts += [
        "",
        "## Cost",
        "",
        "| | A | B |",
        "|---|---|---|",
        f"| parameters (M) | {c['params']['a'] / 1e6:.2f} | {c['params']['b'] / 1e6:.2f} |",
        f"| GMACs per model evaluation (mean over the {c['model_evaluations'].split(' per')[0]}, {c['caption_tokens']} "
        f"caption tokens) | {c['gmacs_per_forward']['a']:.4g} | {c['gmacs_per_forward']['b']:.4g} |",
        f"| sampling seconds per image (measured here) | {t['seconds_per_image']['a']:.3g} | "
        f"{t['seconds_per_image']['b']:.3g} |",
        "",
        f"FLOPs ratio A/B: **{c['flops_ratio_a_over_b']:.3f}x** per model evaluation; {c['model_evaluations']}. "
        "Seconds per image count the model calls only (not decoding), measured in this one process with the chunks "
        "of A, B and A' alternating; A's include its floor samples; the first chunk of each is a warm-up and not timed. "
        "They depend on the machine and its load.",
    ]
    if "outputs" in report:
        images = [o for o in report["outputs"] if o.startswith("paired_")]
        parts += ["", f"Paired images: {', '.join(f'`{i}`' for i in images)} (one row per prompt, the first "
                  f"{s['rows']} prompts: A | B from the same noise, seed {s['seeds'][0]})."]
    env = report["environment"]
    parts += ["", f"Environment: Python {env['python']}, torch {env['torch']}, {env['platform']}, {env['threads']} "
              f"threads, {env['device']}; {report['wall_seconds']:.0f}s in all."]
    if report.get("command"):
        parts += ["", "```", report["command"], "```"]
    return "\n".join(parts) + "\n"


def s_floor(report: dict[str, Any]) -> int:
    """The seed offset of the floor, read from the per-seed rows."""
    row = report["results"][0]["per_seed"][0]
    return int(row["floor_seed"] - row["seed"])


# --------------------------------------------------------------------------------------------------
# Files


def write_text_outputs(out_dir: Path, report: dict[str, Any], pairs: dict[tuple[float, float | None], tuple]) -> None:
    """Paired images, compare.md, then compare.json (last: its presence marks a complete run); each atomic."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_own_outputs(out_dir)
    s, names, texts = report["settings"], report["names"], report["prompts"]["texts"] or []
    for (cfg_scale, guidance), (img_a, img_b, pixels) in pairs.items():
        if not pixels:
            img_a, img_b = _latent_preview(img_a), _latent_preview(img_b)
        what = "A | B, same noise" if pixels else "latents (3 channels), A | B, same noise"
        header = [f"{point_label(cfg_scale, guidance)}, seed {s['seeds'][0]}: {what}", f"A = {names['a']}",
                  f"B = {names['b']}"]
        image = text_paired_image(img_a, img_b, texts, s["scale"], header)
        save_image(image, out_dir / f"paired_{point_name(cfg_scale, guidance)}.png")
    markdown = render_text_markdown(report)
    atomic_write(out_dir / "compare.md", lambda tmp: tmp.write_text(markdown, errors="backslashreplace"))
    write_json(out_dir / "compare.json", json_safe(report))
