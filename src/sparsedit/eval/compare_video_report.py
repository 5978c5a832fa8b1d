"""The outputs of :mod:`sparsedit.eval.compare_video`: the numbers of one (guidance, seed) set and their summary over
seeds, the paired videos (an animated GIF, A's row above B's, and a labelled PNG frame strip), the markdown report and
the files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sparsedit.core.images import save_image, to_uint8
from sparsedit.core.video import save_video_gif
from sparsedit.errors import SparseditError
from sparsedit.eval import compare_paired as paired
from sparsedit.eval.compare_paired import json_safe, latent_preview, pm, point_label, point_name, spread_inf
from sparsedit.eval.compare_report import LINE_H, PAIR_GAP, PAIR_SEP, start_outputs, write_report_files

__all__ = ["MAX_STRIP_FRAMES", "VIDEO_SUMMARISED", "latent_preview", "render_video_markdown", "strip_image",
           "summarise_video", "video_results_table", "video_seed_row", "write_video_outputs"]

MAX_STRIP_FRAMES = 16  # frames shown in a paired frame strip (evenly spaced when a video has more)
LABEL_W = 40  # px of the row-label column of a strip ("12 A")
VIDEO_SUMMARISED = ("latent_rel_rmse", "floor_latent_rel_rmse", "pixel_rmse", "floor_pixel_rmse", "psnr_db",
                    "floor_psnr_db", "rmse_ratio", "fvd_b_a", "fvd_b_floor", "fvd_floor")


# --------------------------------------------------------------------------------------------------
# The numbers of one set, and their summary over seeds


def _fd(x: np.ndarray | None, ref: np.ndarray | None) -> float | None:
    """FVD of two feature sets with StyleGAN-V's statistics; None when there are none or they are degenerate."""
    if x is None or ref is None:
        return None
    from sparsedit.eval.metrics.fvd import frechet_distance, fvd_stats

    try:
        return max(frechet_distance(*fvd_stats(x), *fvd_stats(ref)), 0.0)
    except SparseditError:  # degenerate covariances at this N: no number rather than a wrong one
        return None


def video_seed_row(seed: int, offset: int, acc: dict[str, np.ndarray], feats: dict[str, np.ndarray]) -> dict[str, Any]:
    """The numbers of one (guidance, seed) set: B vs A, and the floor A' vs A, on the same labels or prompts.

    ``acc``: per-video, per-frame mean squared differences (N, F): ``lat_b`` / ``lat_f`` (B / A' against A, latents),
    ``lat_a`` (A's mean square), and with pixels ``pix_b`` / ``pix_f``. ``feats``: I3D features of ``a``, ``b``, ``f``.
    """
    row, per_b, per_f, scale = paired.distance_row(seed, offset, acc)
    row["per_video"] = {"rmse": (np.sqrt(per_b.mean(1)) / scale).tolist(),
                        "floor_rmse": (np.sqrt(per_f.mean(1)) / scale).tolist()}
    row["per_frame"] = {"rmse": (np.sqrt(per_b.mean(0)) / scale).tolist(),
                        "floor_rmse": (np.sqrt(per_f.mean(0)) / scale).tolist()}
    if feats:
        row.update(fvd_b_a=_fd(feats["b"], feats["a"]), fvd_b_floor=_fd(feats["b"], feats["f"]),
                   fvd_floor=_fd(feats["f"], feats["a"]))
    return row


def summarise_video(point: tuple[float, None], n: int, rows: list[dict[str, Any]], pixels: bool) -> dict[str, Any]:
    """One guidance value: the per-seed rows, the mean ± std of every number, per-frame curves, a reading."""
    out: dict[str, Any] = {"cfg_scale": point[0], "label": point_label(*point), "name": point_name(*point),
                           "num_videos": n, "per_seed": rows}
    out.update(paired.summarise_keys(rows, VIDEO_SUMMARISED))
    frames = len(rows[0]["per_frame"]["rmse"])
    if pixels:  # PSNR per frame index, per seed, then the mean over seeds
        curve = {k: [spread_inf([paired.psnr(r["per_frame"][src][i]) for r in rows])["mean"] for i in range(frames)]
                 for k, src in (("b", "rmse"), ("floor", "floor_rmse"))}
        out["per_frame"] = {"metric": "psnr_db", **curve}
    else:
        curve = {k: [float(np.mean([r["per_frame"][src][i] for r in rows])) for i in range(frames)]
                 for k, src in (("b", "rmse"), ("floor", "floor_rmse"))}
        out["per_frame"] = {"metric": "latent_rel_rmse", **curve}
    out["verdict"] = paired.reading(out, "videos")
    return out


# --------------------------------------------------------------------------------------------------
# Paired videos


def _upscale(videos: torch.Tensor, scale: int) -> torch.Tensor:
    return videos if scale == 1 else videos.repeat_interleave(scale, -1).repeat_interleave(scale, -2)


def strip_image(videos_a: torch.Tensor, videos_b: torch.Tensor, labels: Sequence[str], scale: int,
                header: Sequence[str]) -> np.ndarray:
    """Two rows per video, A's frames then B's from the same noise, left to right (at most :data:`MAX_STRIP_FRAMES`,
    evenly spaced); ``labels`` name the videos (a class, a prompt), ``header`` up to 3 lines. (N, C, F, H, W) in
    [-1, 1]; returns an (H', W', 3) uint8 array, upscaled ``scale`` x by pixel repetition."""
    n, _, f, h, w = videos_a.shape
    keep = np.unique(np.linspace(0, f - 1, min(f, MAX_STRIP_FRAMES)).round().astype(int))
    cell_w, cell_h = w * scale, h * scale
    head_h = len(header[:3]) * LINE_H + 4
    block_h = LINE_H + 2 * cell_h + PAIR_GAP + PAIR_SEP
    width = max(LABEL_W + len(keep) * (cell_w + PAIR_GAP) + PAIR_SEP, 360)
    canvas = Image.new("RGB", (width, head_h + n * block_h + PAIR_SEP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def text(xy: tuple[int, int], line: str, fill: tuple[int, int, int] = (0, 0, 0)) -> None:
        line = line.encode("latin-1", "replace").decode("latin-1")  # the bitmap font has Latin-1 glyphs only
        room = width - xy[0] - PAIR_SEP
        while line and draw.textlength(line, font=font) > room:
            line = line[:-4] + "..." if len(line) > 4 else ""
        draw.text(xy, line, fill=fill, font=font)

    for i, line in enumerate(header[:3]):
        text((PAIR_SEP, 2 + LINE_H * i), line)
    for r in range(n):
        y0 = head_h + r * block_h
        text((PAIR_SEP, y0), labels[r] if r < len(labels) else f"video {r}")
        for k, (mark, color, videos) in enumerate((("A", (0, 0, 160), videos_a), ("B", (160, 0, 0), videos_b))):
            y = y0 + LINE_H + k * (cell_h + PAIR_GAP)
            draw.text((PAIR_SEP, y + cell_h // 2 - 6), mark, fill=color, font=font)
            frames = to_uint8(videos[r][:, torch.as_tensor(keep)].transpose(0, 1))  # (F', H, W, C)
            if frames.shape[-1] == 1:
                frames = np.repeat(frames, 3, axis=-1)
            for j, frame in enumerate(frames):
                big = frame.repeat(scale, axis=0).repeat(scale, axis=1)
                canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (LABEL_W + j * (cell_w + PAIR_GAP), y))
    return np.asarray(canvas)


# --------------------------------------------------------------------------------------------------
# Markdown


def video_results_table(report: dict[str, Any]) -> str:
    """The main table: one row per guidance value."""
    pixels = report["space"] == "pixels"
    fvd = report["fvd"]["available"]
    head = ["guidance", "N videos"]
    head += ["PSNR B vs A (dB)", "floor PSNR A vs A' (dB)"] if pixels else []
    space = "latent" if report["models"]["a"]["config"].get("data_space") != "pixel" else "sample"
    head += ["RMSE ratio B-A / floor", f"{space} rel. RMSE B vs A", f"floor {space} rel. RMSE"]
    head += ["FVD B vs A", "FVD B vs A'", "FVD floor A' vs A"] if fvd else []
    head += ["GMACs per video A / B", "reading"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cost = report["cost"]["gmacs_per_video"]
    for r in report["results"]:
        row = [r["label"], f"{r['num_videos']} x {len(r['per_seed'])} seeds"]
        row += [pm(r["psnr_db"], 2), pm(r["floor_psnr_db"], 2)] if pixels else []
        row += [pm(r["rmse_ratio"], 1, percent=True), pm(r["latent_rel_rmse"], 4), pm(r["floor_latent_rel_rmse"], 4)]
        row += [pm(r["fvd_b_a"], 2), pm(r["fvd_b_floor"], 2), pm(r["fvd_floor"], 2)] if fvd else []
        c = cost[r["name"]]
        row += [f"{c['a']:.3g} / {c['b']:.3g}", r["verdict"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _num(v: Any, digits: int) -> str:
    if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)):
        return "∞" if v in ("inf", math.inf) else "n/a"
    return f"{v:.{digits}f}"


def per_frame_table(report: dict[str, Any]) -> str:
    """Frame index down, B vs A and the floor per guidance value across."""
    results = report["results"]
    pixels = report["space"] == "pixels"
    what = "PSNR (dB)" if pixels else "latent rel. RMSE"
    head = ["frame", *(f"{r['label']}: {w}" for r in results for w in (f"B vs A {what}", "floor A vs A'"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(len(results[0]["per_frame"]["b"])):
        cells = [_num(r["per_frame"][k][i], 2 if pixels else 4) for r in results for k in ("b", "floor")]
        lines.append("| " + " | ".join([str(i), *cells]) + " |")
    return "\n".join(lines)


def render_video_markdown(report: dict[str, Any]) -> str:
    """The readable report of a video comparison: settings in words, the tables, what they mean, FVD caveats, cost."""
    s, names, models, cond = report["settings"], report["names"], report["models"], report["conditioning"]
    pixels, fvd = report["space"] == "pixels", report["fvd"]
    same = "" if cond["unit"] == "video index" else f" and the same {cond['unit']}"
    parts = [
        f"# Video model comparison: A = {names['a']}, B = {names['b']}",
        "",
        f"A: {models['a']['class']}, B: {models['b']['class']}; {report['frames']} {'' if pixels else 'latent '}frames "
        f"per video. Conditioning: "
        f"{cond['description']}. Both models sample **video i of seed s from the same noise**{same} (one seeded draw "
        f"of (i, s)). Seeds {', '.join(str(x) for x in s['seeds'])}; "
        f"{s['sampler']} {s['steps']} steps. Every value is the mean ± sample std over the seeds; the guidance values "
        "are shown side by side.",
        "",
        f"Compared on: **{report['videos_from']}**."
        + ("" if pixels else " No VAE was given, so no PSNR and no FVD: the latents are compared, and the paired videos "
                             "show the first three latent channels, not pictures."),
        "",
        video_results_table(report),
        "",
        "What the numbers mean:",
        "",
        f"- **B vs A**: B's video i against A's video i (the same noise{same})"
        + (": PSNR in dB of frames in [-1, 1] (peak-to-peak 2, from the RMSE over every pixel of every frame of the set;"
           " ∞ when identical), and " if pixels else ": ")
        + "the latent relative RMSE, the RMSE of the difference of the final latents (pixel-space models: of the "
        "unclamped samples) over the RMS of A's (0 = identical).",
        f"- **Floor A vs A'**: A against A itself with other noise{same} (seed s + {report['floor_offset']}). How far "
        "apart two of A's videos are when only the noise differs: "
        "near 0 % of the floor B reproduces A's videos; near 100 % B's videos are as different from A's as a fresh "
        "draw of A is.",
        "- **RMSE ratio** = RMSE(B, A) / RMSE(A', A), per seed, then averaged" + (" (on pixels)." if pixels else
                                                                                  " (on latents)."),
    ]
    if fvd["available"]:
        parts += [
            f"- **FVD** (I3D features of the first {fvd['clip_frames']} frames, StyleGAN-V's statistics): B's set "
            "against A's set (**paired**: B shares A's noise, which pulls it down), B's set against A' (unpaired), "
            "and the floor A' against A. If B's videos follow A's distribution, FVD(B, A') and the floor have the same "
            "expected value.",
            "",
            f"**FVD caveats.** {fvd['note']}",
        ]
    parts += ["", f"Per frame ({'PSNR in dB' if pixels else 'latent relative RMSE'}, mean over seeds): does B drift "
              "from A as the video goes on?", "", per_frame_table(report), "",
              "This is **paired fidelity to A, not video quality**: a B that differs from A may be better or worse, and "
              "a B that matches A inherits A's faults."]
    note = report["timing"]["note"]
    parts += paired.cost_section(report, "video", f"the run's {report['cost']['steps']} steps",
                                 f"{note[0].upper()}{note[1:]}; they depend on the machine and its load.")
    if "outputs" in report:
        gifs = [o for o in report["outputs"] if o.endswith(".gif")]
        parts += ["", f"Paired videos: {', '.join(f'`{g}`' for g in gifs)} (the first {len(cond['shown'])} videos of seed "
                  f"{s['seeds'][0]} playing side by side, A's row above B's) and the frame strips "
                  f"{', '.join(f'`{g[:-4]}.png`' for g in gifs)} (A's frames, then B's, for each video)."]
    return paired.markdown_end(parts, report)


# --------------------------------------------------------------------------------------------------
# Files


def write_video_outputs(out_dir: Path, report: dict[str, Any], pairs: dict[tuple[float, None], tuple]) -> None:
    """Paired GIFs and strips, compare.md, then compare.json (last: its presence marks a complete run); each atomic."""
    start_outputs(out_dir)
    s, names = report["settings"], report["names"]
    labels = report["conditioning"]["shown"]
    for point, (vid_a, vid_b, pixels) in pairs.items():
        if not pixels:
            vid_a, vid_b = latent_preview(vid_a), latent_preview(vid_b)
        k = vid_a.shape[0]
        both = _upscale(torch.cat([vid_a, vid_b]), s["scale"])
        save_video_gif(both, out_dir / f"paired_{point_name(*point)}.gif", report["fps"], nrow=k)
        what = "A above B, same noise" if pixels else "latents (3 channels), A above B, same noise"
        header = [f"{point_label(*point)}, seed {s['seeds'][0]}: {what}", f"A = {names['a']}", f"B = {names['b']}"]
        save_image(strip_image(vid_a, vid_b, labels, s["scale"], header), out_dir / f"paired_{point_name(*point)}.png")
    write_report_files(out_dir, render_video_markdown(report), json_safe(report))
