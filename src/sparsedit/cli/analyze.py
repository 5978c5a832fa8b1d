"""``sparsedit analyze``: attention-variance analysis of a DiT (paper Fig. 1b), the constant-map
experiment (Fig. 3) and, with ``--propose``, a SparseDiT layout and rate range for a compute budget.

Writes into ``--out``: ``attention_variance.{csv,json}``, ``attention_variance_heatmap.png``,
``attention_variance_lines.png``, ``constant_map.{csv,json,png}`` (with ``--max-k`` > 0),
``constant_map_samples.png`` (pixel models, or latent models with ``--vae``), ``proposal.json``
(with ``--propose``) and ``summary.json``, as one directory swapped in whole; ``--overwrite`` replaces an
earlier analysis. See docs/analyze.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from sparsedit.cli.common import (
    add_device_arg,
    add_model_args,
    check_device,
    finite_float,
    load_cli_model,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
    vae_for,
)
from sparsedit.core.checkpoint import check_output_dir, write_dir, write_json
from sparsedit.diffusion.samplers import SAMPLERS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="attention-variance analysis of a DiT and a proposed SparseDiT layout",
        description="Per layer and sampling step, the normalised variance of the attention maps (paper Fig. 1b; "
        "v = (N sum_j p_j^2 - 1)/(N - 1) per query row, 0 = uniform, 1 = one-hot, averaged over rows, heads and "
        "samples); the constant-attention-map experiment for the first k layers (Fig. 3); with --propose, a layout "
        "and pruning-rate range for a FLOPs budget and the `sparsedit sparsify` command that builds it.",
    )
    add_model_args(p)
    p.add_argument("--steps", type=positive_int, default=25, help="sampling steps (default 25)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler (default ddim)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class labels, one sample each per seed (default: 4 of DiT's sample classes for a "
                   "1000-class model, else the first 4 classes)")
    p.add_argument("--seeds", type=positive_int, default=2, help="number of seeds (seed, seed+1, ...; default 2)")
    p.add_argument("--seed", type=seed, default=0, help="first seed (default 0)")
    p.add_argument("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance scale (default 1 = off)")
    p.add_argument("--max-k", type=non_negative_int, default=4,
                   help="constant-map experiment for k = 0..K first layers (default 4; 0 skips it)")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="local AutoencoderKL directory: also decode the constant-map samples of a latent model")
    p.add_argument("--out", default="analysis", help="output directory (default ./analysis)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis at --out (whole)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    prop = p.add_argument_group("proposal")
    prop.add_argument("--propose", action="store_true", help="propose a SparseDiT layout and rate range")
    budget = prop.add_mutually_exclusive_group()
    budget.add_argument("--target-ratio", type=positive_float, default=None,
                        help="budget as a fraction of the dense DiT's GMACs (default 0.6 with --propose)")
    budget.add_argument("--target-gmacs", type=positive_float, default=None,
                        help="budget in GMACs per forward (mean over the sampling steps)")
    prop.add_argument("--var-threshold", type=positive_float, default=None,
                      help="a bottom layer is 'global' when its variance <= this x the median layer's (default 0.5)")
    prop.add_argument("--diff-tolerance", type=positive_float, default=None,
                      help="largest relative sample difference of the constant-map experiment at k = P (default 0.25)")
    prop.add_argument("--rate-spread", type=non_negative_float, default=None,
                      help="fix r_max - r_min (default: derived from the variance trend over the steps)")
    prop.add_argument("--sparse-out", default=None,
                      help="--out of the printed sparsify command (default OUT/sparse_dit)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_device_arg(p)
    p.set_defaults(func=run)


SUMMARY = "summary.json"
# Every file an analysis may write: --overwrite replaces a directory holding only these.
OUTPUTS = (SUMMARY, "attention_variance.csv", "attention_variance.json", "attention_variance_heatmap.png",
           "attention_variance_lines.png", "constant_map.csv", "constant_map.json", "constant_map.png",
           "constant_map_samples.png", "proposal.json")


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    write_json(path, data)
    return path


def run(args: argparse.Namespace) -> int:
    from sparsedit.core.images import save_grid
    from sparsedit.diffusion.sampling import parse_labels
    from sparsedit.errors import SparseditError
    from sparsedit.eval import analyze as an

    if (args.target_ratio is not None or args.target_gmacs is not None) and not args.propose:
        raise SparseditError("--target-ratio/--target-gmacs only apply with --propose")
    proposal_flags = [f"--{name.replace('_', '-')}" for name in ("sparse_out", "var_threshold", "diff_tolerance",
                                                                  "rate_spread") if getattr(args, name) is not None]
    if proposal_flags and not args.propose:
        raise SparseditError(f"{', '.join(proposal_flags)} shape(s) the layout proposal; add --propose or drop them")
    if args.vae is not None and args.max_k == 0:
        raise SparseditError("--vae decodes the constant-map samples, which --max-k 0 skips; drop --vae")
    if args.rate_spread is not None and not 0 <= args.rate_spread < 1:
        raise SparseditError(f"--rate-spread must be in [0, 1), got {args.rate_spread}")
    device = check_device(args.device)
    start = time.perf_counter()
    model = load_cli_model(args.ckpt, args, device=device)
    cfg = model.config
    if args.max_k > cfg.depth:
        raise SparseditError(f"--max-k {args.max_k} exceeds the model's depth {cfg.depth}")
    if not args.no_plots:
        an._pyplot()  # fail on a missing matplotlib before sampling
    vae = vae_for(model, args.vae, device) if args.vae is not None else None  # optional: only for sample images
    labels = args.classes if args.classes is not None else an.default_labels(cfg.num_classes)
    parse_labels(labels, cfg.num_classes)  # out-of-range classes are refused before sampling starts
    target_ratio = 0.6 if args.target_gmacs is None and args.target_ratio is None else args.target_ratio
    if args.propose:
        an.budget_gmacs(cfg, args.target_gmacs, target_ratio)  # a budget the model cannot use: refused now
    seeds = list(range(args.seed, args.seed + args.seeds))
    out = Path(args.out)
    check_output_dir(out, args.overwrite, marker=SUMMARY, what="analysis", owned=OUTPUTS)  # before sampling
    progress = not args.no_progress

    variance, reference = an.attention_variance(
        model, labels, seeds=seeds, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
        device=device, progress=progress,
    )
    constant, images = None, None
    if args.max_k > 0:
        constant = an.constant_map_experiment(
            model, labels, max_k=args.max_k, seeds=seeds, sampler=args.sampler, steps=args.steps,
            cfg_scale=args.cfg_scale, device=device, reference=reference, progress=progress,
        )
        if cfg.data_space == "pixel" or vae is not None:
            from sparsedit.diffusion.sampling import to_images

            first = [x[: len(labels)] for x in constant.samples]  # the first seed, every k: one row per k
            images = to_images(model, torch.cat(first).to(device), vae)

    summary: dict[str, Any] = {
        "ckpt": str(args.ckpt), "depth": cfg.depth, "tokens": cfg.grid[0] * cfg.grid[1],
        "definition": an.VARIANCE_DEFINITION, "layer_mean_variance": variance.layer_mean,
        "step_mean_variance": variance.step_mean, "timesteps": variance.timesteps,
        "constant_map": constant.rows() if constant is not None else None,
    }
    if args.propose:
        defaults = an.ProposeRule()
        rule = an.ProposeRule(var_threshold=args.var_threshold or defaults.var_threshold,
                              diff_tolerance=args.diff_tolerance or defaults.diff_tolerance,
                              rate_spread=args.rate_spread)
        proposal = an.propose(cfg, variance, constant, target_gmacs=args.target_gmacs, target_ratio=target_ratio,
                              rule=rule)
        sparse_out = args.sparse_out if args.sparse_out is not None else str(out / "sparse_dit")
        command = an.sparsify_command(proposal, args.ckpt, sparse_out, model=args.model, image_size=args.image_size)
        summary["proposal"] = {**proposal.to_dict(), "command": command}

    def write(tmp: Path) -> None:
        """Every file into ``tmp``; the directory then replaces ``out`` whole (a crash keeps the old analysis)."""
        files = [an.write_csv(tmp / "attention_variance.csv", variance.rows()),
                 _write_json(tmp / "attention_variance.json", variance.to_dict())]
        if not args.no_plots:
            files += an.plot_variance(variance, tmp / "attention_variance_heatmap.png",
                                      tmp / "attention_variance_lines.png")
        if constant is not None:
            files.append(an.write_csv(tmp / "constant_map.csv", constant.rows()))
            files.append(_write_json(tmp / "constant_map.json", constant.to_dict()))
            if not args.no_plots:
                files.append(an.plot_constant_map(constant, tmp / "constant_map.png"))
        if images is not None:
            files.append(save_grid(images, tmp / "constant_map_samples.png", nrow=len(labels)))
        if args.propose:
            files.append(_write_json(tmp / "proposal.json", summary["proposal"]))
        summary["files"] = [str(out / f.name) for f in files] + [str(out / SUMMARY)]
        _write_json(tmp / SUMMARY, summary)

    write_dir(out, write)
    elapsed = time.perf_counter() - start

    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"analysed {args.ckpt}: {cfg.depth} layers, {cfg.grid[0]}x{cfg.grid[1]} tokens, {args.sampler} "
          f"{args.steps} steps, {len(labels)} class(es) x {len(seeds)} seed(s), {elapsed:.1f}s")
    print("mean normalised attention variance per layer (0 = uniform, 1 = one-hot):")
    print("  " + " ".join(f"{v:.3f}" for v in variance.layer_mean))
    if constant is not None:
        print("constant maps in blocks 0..k-1, relative L2 difference of the samples vs k = 0:")
        print("  " + "  ".join(f"k={k}: {r:.3g}" for k, r in zip(constant.ks, constant.rel_l2, strict=True)))
    if args.propose:
        prop = summary["proposal"]
        print(f"proposal: layout {prop['layout']} (P,K,g,s,r,d,T), r in [{prop['r_min']:g}, {prop['r_max']:g}], "
              f"{prop['expected_gmacs']:.4g} GMACs per forward = {prop['expected_ratio']:.3f} x dense "
              f"{prop['dense_gmacs']:.4g} (budget {prop['target_gmacs']:.4g})")
        for line in prop["rationale"]:
            print(f"  - {line}")
        print(prop["command"])
    print(f"wrote {len(summary['files'])} files to {out}")
    return 0
