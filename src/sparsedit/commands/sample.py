"""``sparsedit sample``: generate an image grid from any checkpoint."""

from __future__ import annotations

import argparse
import time

from sparsedit.commands.common import add_device_arg, add_model_args, add_sampling_args, check_device, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample an image grid from a DiT or SparseDiT checkpoint",
                       description="Sample one image per class label and save them as a PNG grid.")
    add_model_args(p)
    p.add_argument("--class-labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279],
                   help="one image per label (default: the 8 classes of the DiT sample grid)")
    add_sampling_args(p, cfg_scale=4.0, cfg_scale_help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, metavar="PATH", help="local AutoencoderKL directory (latent models only)")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparsedit.convert import load_model
    from sparsedit.images import save_grid
    from sparsedit.sampling import generate, to_images
    from sparsedit.vae import load_vae

    device = check_device(args.device)
    model = load_model(args.ckpt, model=args.model, image_size=args.image_size, device=device)
    # Fail on a missing VAE before spending minutes sampling.
    vae = load_vae(args.vae, device) if model.config.data_space == "latent" else None
    start = time.perf_counter()
    samples = generate(
        model, args.class_labels, sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale,
        cfg_mode=args.cfg_mode, seed=args.seed, device=device, progress=not args.no_progress,
    )
    path = save_grid(to_images(model, samples, vae), args.out, nrow=args.nrow)
    print(f"wrote {path} ({len(args.class_labels)} images, {args.sampler} {args.steps} steps, "
          f"cfg {args.cfg_scale:g}, seed {args.seed}, {time.perf_counter() - start:.1f}s)")
    return 0
