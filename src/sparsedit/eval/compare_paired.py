"""What the compare modes share: noise rule, inputs, the A / B / A' sampling loop, cost, report frame and numbers."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsedit.core.prompts import prompt_list, read_prompt_embeds, select_prompts
from sparsedit.errors import SparseditError
from sparsedit.eval.macs import count_forward
from sparsedit.families import family_of

__all__ = ["FLOOR_OFFSET", "Measures", "check_cfg_mode", "check_counts", "check_names", "cost", "cost_head",
           "cost_section", "distance_row", "environment", "finish", "json_safe", "latent_preview", "load_decoder",
           "markdown_end", "noise_seed", "pm", "point_label", "point_name", "prompt_noise", "prompt_set", "psnr",
           "reading", "report_end", "report_start", "run_pairs", "sample_rows", "settle_axes", "spread_inf",
           "summarise_keys"]

FLOOR_OFFSET = 1000  # the floor compares A at seed s with A at seed s + FLOOR_OFFSET on the same prompt or label

Point = tuple[float, float | None]  # (CFG scale, guidance-embedding value or None): one value of the guidance axis


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
# Settings and inputs


def settle_axes(settings: Any, scales: Sequence[tuple[str, str]], example: str) -> None:
    """Check a frozen settings' guidance axes (``scales``: (field, flag) pairs; floats, ``example`` in the message) and
    seeds (ints), and store them as tuples."""
    for name in (*(field for field, _ in scales), "seeds"):
        value = getattr(settings, name)
        if value is not None and not isinstance(value, tuple | list):
            raise SparseditError(f"{name} must be a tuple or list, not {value!r}; e.g. (0, 1, 2)")
    for name, flag in scales:
        value = getattr(settings, name)
        if value is None:
            continue
        value = tuple(float(v) for v in value)
        object.__setattr__(settings, name, value)
        if not value or len(set(value)) != len(value) or any(not math.isfinite(v) or v <= 0 for v in value):
            raise SparseditError(f"{flag} takes distinct finite values > 0, got {list(value)}; e.g. {example}")
    object.__setattr__(settings, "seeds", tuple(int(s) for s in settings.seeds))
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds) or min(settings.seeds) < 0:
        raise SparseditError(f"--seeds must be distinct integers >= 0, got {list(settings.seeds)}; e.g. 0 1 2")


def check_cfg_mode(cfg_mode: Any) -> None:
    from sparsedit.families.dit.model import CFG_MODES

    if cfg_mode not in CFG_MODES:
        raise SparseditError(f"unknown cfg mode {cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")


def check_counts(*counts: tuple[str, int | None]) -> None:
    """Refuse a (flag, value) whose value is below 1 (None: not given)."""
    for flag, value in counts:
        if value is not None and value < 1:
            raise SparseditError(f"{flag} must be >= 1, got {value}")


def check_names(names: Sequence[str]) -> None:
    if len(names) != 2 or not all(str(n).strip() for n in names):
        raise SparseditError(f"--names takes two non-empty names, got {list(names)}")


def prompt_set(source: Any, prompts: Sequence[str] | None, model: nn.Module,
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


def load_decoder(model: nn.Module, vae: Any, pipeline: Any, device: torch.device,
                 load: Callable[[Any, torch.device], nn.Module], pixel_words: str,
                 decoded_words: str) -> tuple[nn.Module | None, str]:
    """(the VAE from ``vae`` or ``pipeline`` (a module, or a directory read by ``load``) or None, where the samples
    come from, in words: ``pixel_words`` for a pixel-space model, ``decoded_words`` with ``{}`` naming the VAE)."""
    family, config = family_of(model), model.config
    if vae is not None and pipeline is not None:
        raise SparseditError("give --vae DIR or --pipeline DIR (whose vae/ folder is used), not both")
    if config.data_space == "pixel":
        if vae is not None or pipeline is not None:
            raise SparseditError(f"this {config.model_type} works in pixel space and needs no VAE: drop --vae / --pipeline")
        return None, pixel_words
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
        decoder, where = load(source, device), f"the VAE in {source}"
    return decoder.to(device).eval(), decoded_words.format(where)


# --------------------------------------------------------------------------------------------------
# Sampling A, B and the floor A'


def sample_rows(model: nn.Module, cond: dict[str, Any], rows: range, seed: int, point: Point, s: Any,
                device: torch.device, name: str) -> Tensor:
    """Model-space samples of ``rows`` under ``seed`` (prompts of ``cond["text"]``, else labels of ``cond["labels"]``,
    None: unconditional), float32 on the CPU (the copy waits for a GPU)."""
    family = family_of(model)
    kwargs: dict[str, Any] = dict(sampler=s.sampler, steps=s.steps, cfg_scale=point[0], device=device, progress=False)
    if s.cfg_mode is not None:  # None: the family's own
        kwargs["cfg_mode"] = s.cfg_mode

    @torch.no_grad()
    def call(idx: list[int], **extra: Any) -> Tensor:
        if "text" in cond:
            part: dict[str, Any] = {k: v.to(device) for k, v in select_prompts(cond["text"], idx).items()}
            if point[1] is not None:  # FLUX.1-dev's guidance embedding
                part["guidance"] = point[1]
            return family.generate(model, text=part, **kwargs, **extra)
        labels = cond["labels"]
        return family.generate(model, labels=[labels[i] if labels else 0 for i in idx], **kwargs, **extra)

    if "noise" in inspect.signature(family.generate).parameters:
        noise = torch.cat([prompt_noise(model.config, seed, i) for i in rows]).to(device)
        out = call(list(rows), noise=noise, seed=seed)
    else:  # one sample per call, its generator seeded by the noise rule: sample_batch draws prompt_noise's tensor
        out = torch.cat([call([i], seed=noise_seed(seed, i)) for i in rows])
    out = out.float().cpu()
    if not torch.isfinite(out).all():
        raise SparseditError(f"model {name}'s samples hold NaN or infinite values (a diverged fine-tune?); compare an "
                             "earlier checkpoint")
    return out


@dataclass(frozen=True)
class Measures:
    """What one kind of sample is measured by: the parts of :func:`run_pairs` in which images and videos differ."""

    unit: str  # "image" or "video": the timing's keys
    bar_unit: str  # the progress bar's unit
    reduce: Callable[[Tensor], np.ndarray]  # float64 squared values -> their mean per sample: (N,) or (N, F)
    decode: Callable[[Tensor], Tensor] | None  # model-space samples -> pixels on the CPU; None: latents only
    features: Callable[[Tensor], np.ndarray] | None  # pixels -> features of the Fréchet distance; None: none
    seed_row: Callable[[int, int, dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, Any]]
    summarise: Callable[[Point, int, list[dict[str, Any]]], dict[str, Any]]
    note: str  # what the timing covers


def run_pairs(models: dict[str, nn.Module], cond: dict[str, Any], s: Any, points: Sequence[Point], me: Measures,
              dev: torch.device, progress: bool) -> tuple[list[dict[str, Any]], dict, dict]:
    """Sample every (guidance, seed) set of A, B and the floor A' (``cond["n"]`` samples each); returns the results,
    the first seed's pairs and the timing. Chunks of A, B and A' alternate, so a machine whose speed drifts slows them
    alike."""
    from tqdm.auto import tqdm

    n, pixels = cond["n"], me.decode is not None

    def mse(x: Tensor, y: Tensor) -> np.ndarray:
        return me.reduce((x.double() - y.double()).pow(2))

    chunks = [range(k, min(k + s.batch_size, n)) for k in range(0, n, s.batch_size)]
    seconds, counts = {"a": 0.0, "b": 0.0}, {"a": 0, "b": 0}
    warm_up = len(points) * len(s.seeds) * len(chunks) > 1  # leave the first chunk untimed when there are others
    results, pairs = [], {}
    bar = tqdm(total=len(points) * len(s.seeds) * 3 * n, unit=me.bar_unit, desc="compare", file=sys.stderr,
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
                        lat[key] = sample_rows(models[m], cond, rows_k, sd, point, s, dev, m.upper())
                        if not warm_up:  # the first chunk pays for kernel selection and caches: not timed
                            seconds[m] += time.perf_counter() - start
                            counts[m] += len(rows_k)
                        bar.update(len(rows_k))
                    warm_up = False
                    acc["lat_b"].append(mse(lat["b"], lat["a"]))
                    acc["lat_f"].append(mse(lat["f"], lat["a"]))
                    acc["lat_a"].append(me.reduce(lat["a"].double().pow(2)))
                    out = lat
                    if me.decode is not None:
                        out = {k: me.decode(v) for k, v in lat.items()}
                        acc["pix_b"].append(mse(out["b"], out["a"]))
                        acc["pix_f"].append(mse(out["f"], out["a"]))
                        if me.features is not None:
                            for k in feats:
                                feats[k].append(me.features(out[k]))
                    if seed == s.seeds[0]:
                        for m in ("a", "b"):
                            shown[m].append(out[m][: max(0, s.rows - sum(len(x) for x in shown[m]))])
                rows.append(me.seed_row(seed, FLOOR_OFFSET, {k: np.concatenate(v) for k, v in acc.items() if v},
                                        {k: np.concatenate(v) for k, v in feats.items() if v}))
                if seed == s.seeds[0]:
                    pairs[point] = (torch.cat(shown["a"]), torch.cat(shown["b"]), pixels)
            results.append(me.summarise(point, n, rows))
    finally:
        bar.close()
    timing = {"sampling_seconds": seconds, f"{me.unit}s_timed": counts,
              f"seconds_per_{me.unit}": {m: seconds[m] / counts[m] if counts[m] else None for m in seconds},
              "note": me.note}
    return results, pairs, timing


def cost(models: dict[str, nn.Module], s: Any, points: Sequence[Point], text_len: int | None, unit: str,
         guided: str, steps_key: bool = False) -> dict[str, Any]:
    """GMACs per model evaluation (at each step's token set and ``text_len`` caption tokens, mean over the run's
    timesteps) and per ``unit``; ``guided``: how guidance doubles the evaluations, in words."""
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
    out: dict[str, Any] = {
        "gmacs_per_forward": per_forward,
        f"gmacs_per_{unit}": {point_name(c, g): {m: v * (2 if c != 1.0 else 1) for m, v in per_run.items()}
                              for c, g in points},  # classifier-free guidance evaluates every step twice
        "params": params,
        "flops_ratio_a_over_b": per_forward["a"] / per_forward["b"],
    }
    if steps_key:
        out["steps"] = steps
    out["model_evaluations"] = f"{steps} {s.sampler} steps per {unit} ({guided})"
    out["caption_tokens"] = text_len
    return out


# --------------------------------------------------------------------------------------------------
# The report's frame


def environment(dev: torch.device) -> dict[str, Any]:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "device": str(dev)}


def report_start(fmt: int, kind: str, settings: Any, names: Sequence[str],
                 models: dict[str, nn.Module]) -> dict[str, Any]:
    """The first entries of a report: its format, kind, settings, names and models."""
    return {"format": fmt, "kind": kind, "settings": dataclasses.asdict(settings),
            "names": {"a": str(names[0]), "b": str(names[1])},
            "models": {m: {"class": type(model).__name__, "config": model.config.to_dict()}
                       for m, model in models.items()}}


def report_end(cost: dict[str, Any], timing: dict[str, Any], dev: torch.device, command: str | None) -> dict[str, Any]:
    """The last entries of a report: cost, timing, environment and command."""
    return {"cost": cost, "timing": timing, "environment": environment(dev), "command": command}


def finish(report: dict[str, Any], wall: float, out_dir: Path | None, outputs: list[str],
           write: Callable[[Path, dict[str, Any], dict], None], pairs: dict) -> dict[str, Any]:
    """``report`` with its outputs and wall seconds (since ``wall``), written to ``out_dir`` by ``write`` if given."""
    if out_dir is not None:
        report["outputs"] = outputs
    report["wall_seconds"] = time.perf_counter() - wall
    if out_dir is not None:
        write(out_dir, report, pairs)
    return report


def cost_head(c: dict[str, Any]) -> list[str]:
    """The start of a report's cost section: its heading, the table's head and its parameter counts."""
    return ["", "## Cost", "", "| | A | B |", "|---|---|---|",
            f"| parameters (M) | {c['params']['a'] / 1e6:.2f} | {c['params']['b'] / 1e6:.2f} |"]


def cost_section(report: dict[str, Any], unit: str, mean_over: str, timing_words: str) -> list[str]:
    """The cost section of a caption or video report: parameters, GMACs per model evaluation (mean over
    ``mean_over``), the seconds per ``unit`` measured here, the FLOPs ratio, then ``timing_words``."""
    c, t = report["cost"], report["timing"]
    seconds = t[f"seconds_per_{unit}"]
    return [*cost_head(c),
            f"| GMACs per model evaluation (mean over {mean_over}) | {c['gmacs_per_forward']['a']:.4g} | "
            f"{c['gmacs_per_forward']['b']:.4g} |",
            f"| sampling seconds per {unit} (measured here) | {seconds['a']:.3g} | {seconds['b']:.3g} |",
            "",
            f"FLOPs ratio A/B: **{c['flops_ratio_a_over_b']:.3f}x** per model evaluation; {c['model_evaluations']}. "
            + timing_words]


def markdown_end(parts: list[str], report: dict[str, Any]) -> str:
    """``parts`` and the environment (and command) lines of ``report``, as one markdown text."""
    env = report["environment"]
    parts = [*parts, "", f"Environment: Python {env['python']}, torch {env['torch']}, {env['platform']}, "
             f"{env['threads']} threads, {env['device']}; {report['wall_seconds']:.0f}s in all."]
    if report.get("command"):
        parts += ["", "```", report["command"], "```"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# Names, numbers and words


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


def psnr(rmse: float) -> float:
    """PSNR in dB of images or frames in [-1, 1] (peak-to-peak 2); infinite for identical ones."""
    return math.inf if rmse == 0 else 20 * math.log10(2.0 / rmse)


def _rmse(mse: np.ndarray) -> float:
    return float(np.sqrt(mse.mean()))


def distance_row(seed: int, offset: int, acc: dict[str, np.ndarray]) -> tuple[dict[str, Any], np.ndarray,
                                                                               np.ndarray, float]:
    """The distances of one (guidance, seed) set that every kind of sample has: B vs A and the floor A' vs A.

    ``acc``: mean squared differences per sample, ``lat_b`` / ``lat_f`` (B / A' against A, model space), ``lat_a``
    (A's mean square), and with pixels ``pix_b`` / ``pix_f``. Returns the row, the mean squares of B and of A' that the
    per-sample numbers come from (pixels if any, else latents) and their divisor (1, or the RMS of A's latents)."""
    norm = math.sqrt(float(acc["lat_a"].mean()))
    row: dict[str, Any] = {"seed": seed, "floor_seed": seed + offset,
                           "latent_rel_rmse": _rmse(acc["lat_b"]) / norm if norm else None,
                           "floor_latent_rel_rmse": _rmse(acc["lat_f"]) / norm if norm else None}
    if "pix_b" in acc:
        rb, rf = _rmse(acc["pix_b"]), _rmse(acc["pix_f"])
        row.update(pixel_rmse=rb, floor_pixel_rmse=rf, psnr_db=psnr(rb), floor_psnr_db=psnr(rf))
        mse_b, mse_f, scale = acc["pix_b"], acc["pix_f"], 1.0
    else:
        rb, rf = row["latent_rel_rmse"], row["floor_latent_rel_rmse"]
        mse_b, mse_f, scale = acc["lat_b"], acc["lat_f"], norm or 1.0
    row["rmse_ratio"] = rb / rf if rf else None
    return row, mse_b, mse_f, scale


def summarise_keys(rows: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """The :func:`spread_inf` over seeds of each of ``keys`` (None where a seed has no value)."""
    out: dict[str, Any] = {}
    for key in keys:
        values = [r.get(key) for r in rows]
        out[key] = spread_inf(values) if values and all(v is not None for v in values) else None
    return out


def reading(r: dict[str, Any], unit: str, exact: str | None = None) -> str:
    """Plain words on B's distance from A, on the floor's scale; they claim nothing about the quality of A's ``unit``
    (``exact``: the word of the exact-match reading, default ``unit``)."""
    ratio = r["rmse_ratio"]
    rmse = r["pixel_rmse"] or r["latent_rel_rmse"]
    if rmse is not None and all(v == 0 for v in rmse["per_seed"]):
        return f"B reproduces A's {exact or unit} exactly"
    if ratio is None:
        return "no floor to read B's distance against (A ignores its noise)"
    mean, std = ratio["mean"], ratio["std"]
    if std is None:
        return f"B-vs-A distance is {mean:.0%} of the floor (one seed: no spread)"
    if mean + 2 * std < 1:
        return f"B stays closer to A's {unit} than a new noise draw of A ({mean:.0%} ± {std:.0%} of the floor)"
    return f"B differs from A's {unit} about as much as a new noise draw of A, or more ({mean:.0%} ± {std:.0%})"


def pm(summary: dict[str, Any] | None, digits: int, percent: bool = False) -> str:
    """``mean ± std`` of a :func:`spread_inf` summary, as the markdown tables show it."""
    if summary is None:
        return "n/a"
    mean, std = summary["mean"], summary["std"]
    if isinstance(mean, str) or not math.isfinite(mean):
        return "∞ (identical)" if mean in ("inf", math.inf) else "mixed (some seeds identical)"
    scale = 100 if percent else 1
    text = f"{mean * scale:.{digits}f}{'%' if percent else ''}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}{'%' if percent else ''}"


def latent_preview(latents: Tensor) -> Tensor:
    """Latents (N, C, h, w) or latent videos (N, C, F, h, w) as pseudo-pixels in [-1, 1]: the first 3 channels,
    scaled by 2.5 std."""
    x = latents[:, :3] if latents.shape[1] >= 3 else latents[:, :1].expand(-1, 3, *latents.shape[2:])
    return (x / (2.5 * x.std().clamp_min(1e-8))).clamp(-1, 1)
