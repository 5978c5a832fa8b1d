"""``sparsedit bench``: throughput of two models side by side (default DiT-XL/2 vs SparseDiT-XL/2).

Any family works: DiT / SparseDiT, PixArt-alpha / SparsePixArt (random 120-token caption embeddings)
and Latte / SparseLatte (video latents; per-step sparse grid and frames), as presets or checkpoints.

Both models are built in one process and timed alternately after warm-up, per forward pass and per
full sampling run (the schedule's per-step grids included); see :mod:`sparsedit.eval.bench` for exactly
what each number covers. Progress goes to stderr, the table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sparsedit.cli.common import (
    add_device_arg,
    check_device,
    finite_float,
    non_negative_int,
    positive_int,
    rate,
    seed,
    threads,
)
from sparsedit.families.dit.model import CFG_MODES
from sparsedit.families.presets import PRESET_HELP

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="throughput of two models side by side (forward pass and full sampling run)",
        description="Time model A and model B in one process, interleaved A B A B after warm-up of every token "
        "grid: latency per forward pass (at one timestep) and seconds per full sampling run (every step on its "
        "scheduled grid, sampler arithmetic included), with median and spread, images/s, achieved GMAC/s "
        "(counted MACs / time) and the FLOPs ratio next to the speedup. Random weights are fine for speed. "
        "DiT, PixArt-alpha and Latte models (dense or sparse) are supported; e.g. --a PixArt-XL/2 --b "
        "SparsePixArt-XL/2, or --a Latte-XL/2 --b SparseLatte-XL/2 (16 frames). "
        "CPU defaults are light (batch 1, 10 steps, 3 forward repeats, 2 runs); CUDA defaults: batch 128, "
        "50 steps, 10 forward repeats, 3 runs.",
    )
    p.add_argument("--a", default="DiT-XL/2", metavar="PRESET_OR_CKPT",
                   help=f"model A: {PRESET_HELP}, or a checkpoint path (default DiT-XL/2)")
    p.add_argument("--b", default="SparseDiT-XL/2", metavar="PRESET_OR_CKPT",
                   help="model B, as --a (default SparseDiT-XL/2)")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="image size in pixels for presets (default 256; latent = size / 8); checkpoints keep "
                   "their own size and use this only when the file cannot tell")
    p.add_argument("--r-min", type=rate, default=None, help="sparse model's smallest pruning rate (default: the "
                   "model's; presets 0.61, SparseLatte 0.80); ignored for a dense model")
    p.add_argument("--r-max", type=rate, default=None, help="sparse model's largest pruning rate (default: the "
                   "model's; presets 0.86, SparseLatte 0.93); ignored for a dense model")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per forward (default 1 on CPU, "
                   "128 on CUDA); classifier-free guidance doubles the rows")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="model precision (default fp32)")
    add_device_arg(p)
    p.add_argument("--steps", type=positive_int, default=None, help="steps of the timed sampling run (default 10 on "
                   "CPU, 50 on CUDA)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler"), default=None,
                   help="respacing and update rule of the sampling run (default: ddpm, or euler for SD3 / FLUX)")
    p.add_argument("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance scale; != 1 doubles the "
                   "batch (default 1 = off)")
    p.add_argument("--cfg-mode", choices=CFG_MODES, default=None, help="guided channels (default first3)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed forwards per model (default 3 on CPU, "
                   "10 on CUDA)")
    p.add_argument("--run-repeats", type=non_negative_int, default=None,
                   help="timed sampling runs per model, 0 = forward only (default 2 on CPU, 3 on CUDA)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="untimed forwards per model and per "
                   "distinct grid before timing (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--run-warmup", type=non_negative_int, default=None,
                   help="untimed sampling runs per model before the timed ones (default 0 on CPU, 1 on CUDA)")
    p.add_argument("--t", type=non_negative_int, default=None, dest="forward_t",
                   help="timestep of the timed forward pass (default T/2 = 500; it picks a sparse model's grid)")
    p.add_argument("--quick", action="store_true",
                   help="smallest meaningful run for a loaded machine: 5 steps, 2 forward repeats, 1 run "
                   "(explicit flags still win)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models (dynamic=False: one graph per grid shape, all warmed up first)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                   "eager / aot_eager test the path without code generation)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture one CUDA graph per model and grid and replay it (CUDA only)")
    p.add_argument("--threads", type=threads, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the markdown table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparsedit.errors import SparseditError
    from sparsedit.eval.bench import DTYPES, BenchSettings, bench_pair, build_bench_model, format_markdown

    start = time.perf_counter()

    held: list[str] = []

    def early(msg: str) -> None:
        """Progress before the inputs are known to be good: held back, so that a refusal stays one line."""
        held.append(f"[{time.perf_counter() - start:6.1f}s] {msg}")

    def log(msg: str) -> None:
        for line in held:
            print(line, file=sys.stderr)
        held.clear()
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    device = check_device(args.device)
    if args.threads:  # 0 or unset: torch's own choice
        torch.set_num_threads(args.threads)
    if not args.compile and (args.compile_backend is not None or args.compile_mode is not None):
        raise SparseditError("--compile-backend / --compile-mode choose how --compile compiles; add --compile or drop "
                             "them")
    quick = {"steps": 5, "repeats": 2, "run_repeats": 1} if args.quick else {}
    given = {"batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
             "run_repeats": args.run_repeats, "warmup": args.warmup, "run_warmup": args.run_warmup}
    overrides = {**quick, **{k: v for k, v in given.items() if v is not None}}
    settings = BenchSettings.for_device(
        device, **overrides, dtype=DTYPES[args.dtype], sampler=args.sampler, cfg_scale=args.cfg_scale,
        cfg_mode=args.cfg_mode, forward_t=args.forward_t, compile=args.compile,
        compile_backend=args.compile_backend or "inductor", compile_mode=args.compile_mode, cuda_graphs=args.cuda_graphs,
        seed=args.seed,
    )
    models = []
    for spec in (args.a, args.b):
        early(f"building {spec} ({args.dtype}, {device})")
        models.append(build_bench_model(spec, args.image_size, args.r_min, args.r_max, device, settings.dtype))
    early("timing (A B A B ...)")
    result = bench_pair(*models, settings, names=(args.a, args.b), log=log)
    result["total_elapsed_s"] = time.perf_counter() - start
    log(f"done in {result['total_elapsed_s']:.1f} s (model building included)")
    if args.json:
        print(json.dumps(result))
    else:
        print(format_markdown(result))
        print(f"\ntotal elapsed {result['total_elapsed_s']:.1f} s (building the models included)")
    return 0
