"""Plot FID ratio and accuracy gap against fine-tuning steps from `sparsedit compare` reports.

Each report directory is named ``<recipe>_<steps>`` (anything after a further underscore is ignored)
and holds the ``compare.json`` of the source DiT (A) against that recipe's checkpoint (B). One panel
per guidance scale; one line per recipe. Used for docs/quality.png:

    python scripts/plot_quality.py runs/quality docs/quality.png --recipes paper min-snr distill
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", type=Path, help="directory of <recipe>_<steps>[_...]/compare.json")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--recipes", nargs="+", default=None, help="which recipes, in legend order (default: all)")
    p.add_argument("--goal", type=float, default=1.10, help="FID ratio goal line (default 1.10)")
    args = p.parse_args()

    curves: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(args.reports.glob("*/compare.json")):
        match = re.fullmatch(r"(.+?)_(\d+)(_.*)?", path.parent.name)
        if match:
            curves[match.group(1)][int(match.group(2))] = json.loads(path.read_text())
    recipes = args.recipes or sorted(curves)
    missing = [r for r in recipes if r not in curves]
    if missing:
        raise SystemExit(f"no reports for {', '.join(missing)} in {args.reports}")
    scales = [r["cfg_scale"] for r in next(iter(curves[recipes[0]].values()))["results"]]
    fig, axes = plt.subplots(2, len(scales), figsize=(4.2 * len(scales), 6.4), sharex=True)
    for col, scale in enumerate(scales):
        for recipe in recipes:
            steps = sorted(curves[recipe])
            res = [next(x for x in curves[recipe][s]["results"] if x["cfg_scale"] == scale) for s in steps]
            axes[0, col].plot(steps, [x["fid_ratio"]["mean"] for x in res], marker="o", label=recipe)
            axes[1, col].plot(steps, [x["accuracy_gap_points"]["mean"] for x in res], marker="o", label=recipe)
        axes[0, col].axhline(args.goal, color="k", ls="--", lw=0.8)
        axes[0, col].axhline(1.0, color="gray", lw=0.5)
        axes[1, col].axhline(-2.0, color="k", ls="--", lw=0.8)
        axes[1, col].axhline(0.0, color="gray", lw=0.5)
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(f"CFG {scale:g}")
        axes[1, col].set_xlabel("fine-tuning steps")
    axes[0, 0].set_ylabel(f"FID ratio B/A (log; dashed: {args.goal:g})")
    axes[1, 0].set_ylabel("accuracy gap B - A (points; dashed: -2)")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
