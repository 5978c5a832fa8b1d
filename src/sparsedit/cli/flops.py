"""``sparsedit flops``: MACs per forward (and parameters) of a model of any family, dense or sparse.

Counts come from the model itself, built from its config on the meta device and run once per token set under
``FlopCounterMode`` (:mod:`sparsedit.eval.flops`): no weights are loaded and nothing is computed, so DiT-XL at
512 px takes about a second on a CPU (`time sparsedit flops --model DiT-XL/2 --image-size 512`: 2.8 s with the
1.3 s of start-up). For a sparse model the cost depends on the
sparse grid of each sampling step; the headline number is the mean over the steps of the given
sampling run, with the min, max and the distinct grids beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparsedit.cli.common import positive_int, rate
from sparsedit.core.layout import LAYOUT_HELP
from sparsedit.encoders.vae import VAE_DOWNSAMPLE
from sparsedit.families import family_of
from sparsedit.families.presets import PRESET_HELP, dense_config, is_sparse, resolve_preset, with_sparsity

SAMPLERS = ("ddpm", "ddim", "euler")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops", help="count MACs per forward and parameters (counted on the meta device)",
        description="Multiply-accumulates per forward pass of one image (the DiT paper's 'FLOPs'; classifier-free "
        "guidance doubles the batch, so a guided step costs twice this), by segment and op kind, and the parameter "
        "count. For a SparseDiT: the mean over the steps of a sampling run, plus min/max and the distinct grids.",
    )
    p.add_argument("--model", required=True, metavar="NAME_OR_CKPT",
                   help=f"{PRESET_HELP} (a sparse preset is its dense model with the paper's layout), or a checkpoint "
                   "(sparsedit directory, diffusers directory, official .pt)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="image size in pixels (default: 256 for presets, the checkpoint's own size otherwise; a "
                   "checkpoint's MACs at another size are counted at that size: the cost of running it there)")
    p.add_argument("--layout", default=None,
                   help=f"SparseDiT layout, {LAYOUT_HELP}; turns a DiT into a SparseDiT, overrides a SparseDiT's")
    p.add_argument("--r-min", type=rate, default=None, help="smallest pruning rate (default: the model's, else 0.61)")
    p.add_argument("--r-max", type=rate, default=None, help="largest pruning rate (default: the model's, else 0.86)")
    p.add_argument("--num-pieces", type=positive_int, default=None,
                   help="pieces of [T/4, T) (default: the model's, else one per distinct grid)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (default: 250 for DDPM-trained families, 28 for flow-matching ones)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="timestep spacing: ddpm = evenly spaced incl. both ends (DiT's '250'), ddim = "
                   "range(0, T, T/steps), euler = a flow-matching model's shifted Euler sigmas x 1000 (default: ddpm, "
                   "or euler for SD3 / FLUX)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------
# resolving --model into a config
# ------------------------------------------------------------------------------------------------


def _checkpoint_config(path: Path, image_size: int | None) -> Any:
    """The config of a checkpoint: config.json only for sparsedit directories, else a full load.

    ``image_size`` is passed to the loader for official files that cannot tell their size.
    """
    from sparsedit.core.checkpoint import CONFIG_NAME, config_from_dict, read_json
    from sparsedit.loading import detect_format, load_model

    if detect_format(path) == "sparsedit":
        return config_from_dict(read_json(path / CONFIG_NAME), str(path / CONFIG_NAME))
    return load_model(path, image_size=image_size).config


def resolve_config(args: argparse.Namespace) -> tuple[Any, str]:
    """(model config, display name) from the parsed arguments."""
    path = Path(args.model)
    if path.exists():
        config = _checkpoint_config(path, args.image_size)
        if args.image_size is not None:
            config = family_of(config).config_at_size(args.image_size)
        layout = args.layout
    else:
        config, layout = resolve_preset(args.model, args.image_size or 256)
        layout = args.layout or layout
    rates = {"r_min": args.r_min, "r_max": args.r_max, "num_pieces": args.num_pieces}
    return with_sparsity(config, layout, rates), args.model


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command prints, as one JSON-ready dict."""
    from sparsedit.eval.flops import schedule_macs
    config, name = resolve_config(args)
    sparse = is_sparse(config)
    family = family_of(config)
    sampler = args.sampler or family.default_sampling[0]
    timesteps = family.sampling_timesteps(sampler, args.steps or family.default_sampling[1])
    result = schedule_macs(config, timesteps)
    dense = schedule_macs(dense_config(config), timesteps)["gmacs"]
    factor = VAE_DOWNSAMPLE if config.data_space == "latent" else 1
    H, W = config.latent_hw
    out: dict[str, Any] = {
        "model": name,
        "model_type": config.model_type,
        "image_size": [H * factor, W * factor] if H != W else H * factor,
        "grid": list(config.grid),
        "layout": config.layout.as_string() if sparse else None,
        "r_min": config.r_min if sparse else None,
        "r_max": config.r_max if sparse else None,
        "num_pieces": getattr(config, "num_pieces", None),
        "sampler": sampler,
        "steps": len(timesteps),
        "unit": "GMACs per forward pass of one image (batch 1; classifier-free guidance doubles the batch)",
        **{k: result.get(k) for k in ("gmacs", "gmacs_min", "gmacs_max", "grids", "params", "by_segment", "by_kind",
                                     "by_part")},
        "dense_gmacs": dense,
        "reduction": 1.0 - result["gmacs"] / dense,
        "per_step": result["per_step"],
    }
    return out


def _frames(entry: dict[str, Any]) -> str:
    return f" x {entry['frames']} frames" if "frames" in entry else ""


def _fmt(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in parts.items())


def run(args: argparse.Namespace) -> int:
    out = measure(args)
    if args.json:
        print(json.dumps(out))
        return 0
    lines = [f"model: {out['model']} ({out['model_type']}), {out['image_size']} px, token grid "
             f"{out['grid'][0]}x{out['grid'][1]}, params {out['params'] / 1e6:.2f} M"]
    if out["layout"] is not None:
        lines.append(f"layout: {out['layout']} (P,K,g,s,r,d,T), r in [{out['r_min']}, {out['r_max']}], "
                     f"num_pieces {out['num_pieces']}")
    lines.append(f"sampling: {out['sampler']}, {out['steps']} steps")
    if out["layout"] is None:
        lines.append(f"GMACs per forward, per image: {out['gmacs']:.2f}")
    else:
        lines.append(f"GMACs per forward, per image: {out['gmacs']:.2f} (mean over steps; min {out['gmacs_min']:.2f}, "
                     f"max {out['gmacs_max']:.2f}); dense model {out['dense_gmacs']:.2f} "
                     f"({-100 * out['reduction']:+.1f}%)")
    lines.append("  (multiply-accumulates = linear + attention; classifier-free guidance doubles the batch)")
    if out["layout"] is not None:
        lines.append("grids:")
        lines.extend(f"  {g['grid'][0]:>3}x{g['grid'][1]:<3}{_frames(g)} {g['tokens']:>6} tokens  {g['steps']:>5} steps  "
                     f"{g['gmacs']:.2f} GMACs" for g in out["grids"])
    if out["by_segment"]:  # the video report has no per-segment breakdown
        lines.append(f"by segment (GMACs): {_fmt(out['by_segment'])}")
    if out["by_part"]:
        lines.append(f"  sdtm parts: {_fmt(out['by_part'])}")
    if out["by_kind"]:
        lines.append(f"by kind (GMACs): {_fmt(out['by_kind'])}  (other is not in the total)")
    print("\n".join(lines))
    return 0
