"""``sparsedit sample-fid``: N class-balanced samples in resumable shards, packed into an ADM ``.npz``.

Runs single-process or under ``torchrun`` (one process per GPU); see docs/sample_fid.md. Also
runnable as ``python -m sparsedit.cli.sample_fid ...`` with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from sparsedit.cli.common import (
    Parser,
    add_device_arg,
    add_model_args,
    add_sampling_args,
    check_device,
    load_cli_model,
    positive_int,
    run_command,
    seed,
    vae_for,
)
from sparsedit.core.checkpoint import check_output_file


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample-fid", help="sample N class-balanced images for FID (torchrun-parallel, resumable)",
        description=("Sample N images with balanced class labels (label of sample i = i %% num_classes) into "
                     "resumable shards OUT/shards/shard_K.npz, then pack them into an ADM .npz for `sparsedit eval`. "
                     "Launch with torchrun to use several GPUs or processes."),
    )
    add_model_args(p)
    p.add_argument("--num-samples", type=positive_int, required=True, metavar="N", help="number of images, e.g. 50000")
    p.add_argument("--batch-size", type=positive_int, required=True, metavar="B",
                   help="images per shard and per sampling batch (fixes the shard layout; keep it when resuming)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: manifest.json, shards/ and the packed .npz")
    add_sampling_args(p, cfg_scale=1.5, cfg_scale_help="classifier-free guidance scale (default 1.5; 1 = off)")
    p.add_argument("--seed", type=seed, default=0, help="global seed; shard k uses a seed derived from (seed, k)")
    p.add_argument("--vae", default=None, metavar="PATH", help="local AutoencoderKL directory (latent models only)")
    p.add_argument("--pack", default=None, metavar="OUT.npz",
                   help="packed batch path (default DIR/samples_N.npz); an existing file is kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --pack file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device_arg(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from sparsedit._version import __version__
    from sparsedit.eval.sample_fid import FidSampling, manifest_settings, sample_fid, weights_sha256
    from sparsedit.train.trainer import init_distributed

    if args.pack is not None:  # refuse to destroy a user's file before sampling
        check_output_file(args.pack, "--pack", (".npz",), args.overwrite)
    spec = FidSampling(
        num_samples=args.num_samples, batch_size=args.batch_size, steps=args.steps, sampler=args.sampler,
        eta=args.eta, cfg_scale=args.cfg_scale, cfg_mode=args.cfg_mode, seed=args.seed,
    )
    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(args.device)
    try:
        # Single process: honour e.g. --device cuda:1; under torchrun each rank takes cuda:LOCAL_RANK.
        device = check_device(args.device) if env.world == 1 else env.device
        model = load_cli_model(args.ckpt, args)  # on CPU, to hash it there
        vae = vae_for(model, args.vae, "cpu")  # fail on a missing (or needless) VAE before sampling anything
        vae_sha = None if vae is None else weights_sha256(vae)
        vae = None if vae is None else vae.to(device)
        settings = manifest_settings(model, spec, weights_sha256(model), vae_sha)
        model = model.to(device)
        info = {"ckpt": str(args.ckpt), "vae": args.vae, "sparsedit_version": __version__}
        start = time.perf_counter()
        path = sample_fid(
            model, spec, args.out, vae=vae, device=device, rank=env.rank, world=env.world, barrier=env.barrier,
            pack=args.pack, settings=settings, info=info, progress=not args.no_progress,
        )
        if path is not None:
            print(f"wrote {path} ({spec.num_samples} images, {spec.num_shards} shards of {spec.batch_size}, "
                  f"{spec.sampler} {spec.steps} steps, cfg {spec.cfg_scale:g}, seed {spec.seed}, "
                  f"{env.world} process(es), {time.perf_counter() - start:.1f}s)")
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sparsedit.cli.sample_fid ARGS``: the sub-command on its own, same exit codes."""
    parser = Parser(prog="sparsedit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sample-fid", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
