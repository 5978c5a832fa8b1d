"""The result of :func:`sparsedit.eval.bench.bench_pair` as markdown (:func:`format_markdown`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_markdown"]


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------


def _spread(st: dict[str, Any], unit: str, digits: int) -> str:
    f = f"{{:.{digits}f}}"
    return (f"{f.format(st['median'])} {unit} [{f.format(st['min'])}-{f.format(st['max'])}], "
            f"IQR {f.format(st['iqr'])}, n={st['n']}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_markdown(result: dict[str, Any]) -> str:
    """The result of :func:`bench_pair` as a markdown table with a settings line above it."""
    s, ma, mb, pair = result["settings"], result["models"]["a"], result["models"]["b"], result["pair"]
    machine = result["machine"]
    compiled = f"compiled ({s['compile_backend']})" if s["compile"] else "eager"
    head = (f"device {s['device']} ({machine['device_name']}, {machine['torch_threads']} threads), torch "
            f"{machine['torch']}, {s['dtype']}, batch {s['batch_size']}"
            + (f" (x2 rows: cfg {s['cfg_scale']:g})" if s["cfg_scale"] != 1.0 else "")
            + f", {compiled}, CUDA graphs {'on' if s['cuda_graphs'] else 'off'}; run = {s['steps']} {s['sampler']} "
            f"steps incl. sampler arithmetic; forward at t={ma['forward_t']}; load average "
            f"{result['load_average']['start']} -> {result['load_average']['end']}; elapsed {result['elapsed_s']:.1f} s")
    rows = [
        ("forward latency (median [min-max])",
         *(_spread(m["forward_ms"], "ms", 1) if "forward_ms" in m else "-" for m in (ma, mb)),
         f"speedup {_ratio(pair['speedup']['forward'])}"),
        ("samples/s (forward)", *(f"{m['images_per_sec']:.3f}" if "images_per_sec" in m else "-" for m in (ma, mb)),
         ""),
        ("GMACs/sample, forward (tokens)", *(f"{m['forward_gmacs']:.4g} ({_tokens(m['forward_grid'], m.get('forward_frames'))})"
                                              for m in (ma, mb)),
         f"FLOPs ratio {_ratio(pair['flops_ratio']['forward'])}"),
        ("achieved GMAC/s (forward)", *(f"{m['gmacs_per_sec']:.1f}" if "gmacs_per_sec" in m else "-"
                                        for m in (ma, mb)),
         f"speedup / FLOPs ratio {pair['speed_per_flops']['forward']:.2f}"
         if pair["speed_per_flops"]["forward"] is not None else ""),
        (f"sampling run, {s['steps']} steps (median [min-max])",
         *(_spread(m["run_s"], "s", 2) if "run_s" in m else "-" for m in (ma, mb)),
         f"speedup {_ratio(pair['speedup']['run'])}"),
        ("samples/s (run)", *(f"{m['run_images_per_sec']:.4f}" if "run_images_per_sec" in m else "-"
                             for m in (ma, mb)), ""),
        ("GMACs/sample/step, mean over run", f"{ma['gmacs']:.4g}", f"{mb['gmacs']:.4g}",
         f"FLOPs ratio {_ratio(pair['flops_ratio']['run'])}"),
        ("achieved GMAC/s (run)", *(f"{m['run_gmacs_per_sec']:.1f}" if "run_gmacs_per_sec" in m else "-"
                                    for m in (ma, mb)),
         f"speedup / FLOPs ratio {pair['speed_per_flops']['run']:.2f}"
         if pair["speed_per_flops"]["run"] is not None else ""),
        ("of which sampler only (s/run)", *(f"{m['sampler_s']['median']:.3f}" if "sampler_s" in m else "-"
                                            for m in (ma, mb)), ""),
        ("token sets in run (tokens: steps)", *(_grid_list(m) for m in (ma, mb)), ""),
    ]
    lines = [head, "", f"| | A: {ma['name']} | B: {mb['name']} | B vs A |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def _tokens(grid: Sequence[int], frames: int | None = None) -> str:
    """``h x w`` (a grid), ``h x w x f`` with frames (a video token set)."""
    return f"{grid[0]}x{grid[1]}" + ("" if frames is None else f"x{frames}f")


def _grid_list(m: dict[str, Any]) -> str:
    return ", ".join(f"{_tokens(g['grid'], g.get('frames'))}: {g['steps']}" for g in m["run_grids"])
