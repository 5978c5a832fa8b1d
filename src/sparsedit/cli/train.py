"""``sparsedit train``: train a DiT from scratch, or fine-tune any checkpoint ``load_model`` reads (DiT,
PixArt-alpha, Latte), optionally sparsified first (SparseDiT, SparsePixArt, SparseLatte).

Single process: ``sparsedit train ...``; several: ``torchrun --nproc_per_node=N -m sparsedit train ...``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from sparsedit.cli.common import (
    check_device,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
    unit_float,
)
from sparsedit.cli.sparsify import add_rate_args
from sparsedit.core.blocks import UPSAMPLE_MODES
from sparsedit.core.layout import LAYOUT_HELP
from sparsedit.train.trainer import DEFAULT_RECIPE, RECIPES, TrainSettings, describe_recipe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DiT or fine-tune a DiT / PixArt / Latte (sparsified with --layout)",
                       description="Train a DiT from scratch (--model) or fine-tune a checkpoint (--init-from CKPT): a "
                       "DiT, PixArt-alpha or Latte, sparsified first with --layout (SparseDiT, SparsePixArt, "
                       "SparseLatte). PixArt and text Latte train on latents directories with T5 caption embeddings, "
                       "Latte on video latents. Re-running the same command in the same --run-dir resumes from its "
                       "last checkpoint.")
    src = p.add_argument_group("model")
    src.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint (any format load_model reads)")
    src.add_argument("--layout", help="sparsify the --init-from DiT / PixArt / Latte first (as `sparsedit sparsify`): "
                     f"{LAYOUT_HELP}")
    add_rate_args(src)
    src.add_argument("--num-pieces", type=positive_int, default=None, help="not for Latte (continuous schedule)")
    src.add_argument("--upsample", choices=UPSAMPLE_MODES, default=None, help="with --layout (default nearest)")
    src.add_argument("--model", metavar="PRESET", help="train from scratch: a preset such as DiT-S/2")
    src.add_argument("--hidden-size", type=positive_int, help="override the preset's hidden size")
    src.add_argument("--depth", type=positive_int, help="override the preset's depth")
    src.add_argument("--num-heads", type=positive_int, help="override the preset's number of heads")
    src.add_argument("--no-learn-sigma", action="store_true", help="fixed variance (the model outputs C channels)")
    src.add_argument("--init-gain", type=positive_float, default=None,
                     help="from scratch: xavier gain of the linear layers (default 1, DiT's; the SparseDiT authors' "
                     "train.py uses 0.5)")
    rec = p.add_argument_group("recovery recipe (docs/quality.md compares them)")
    rec.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                     help=f"a named set of the options below; default with --layout: {DEFAULT_RECIPE}, else paper. "
                     "Options given explicitly override the recipe's values. "
                     + "; ".join(f"{name}: {describe_recipe(name)}" for name in RECIPES))
    rec.add_argument("--teacher", metavar="CKPT", default=None,
                     help="the dense model to distil from (default with --layout: the --init-from model)")
    rec.add_argument("--distill-weight", type=non_negative_float, default=None,
                     help="weight of the output distillation loss (MSE to the teacher's prediction)")
    rec.add_argument("--feature-weight", type=non_negative_float, default=None,
                     help="weight of the feature distillation loss (dense tokens after every SDTM and the last block)")
    rec.add_argument("--diffusion-weight", type=non_negative_float, default=None,
                     help="weight of the diffusion loss (default 1)")
    rec.add_argument("--min-snr-gamma", type=non_negative_float, default=None,
                     help="Min-SNR-gamma weighting of the epsilon MSE (0 = off; the authors' code uses 5)")
    rec.add_argument("--merge-lr-scale", type=positive_float, default=None,
                     help="learning-rate multiplier of the recovery merge layers W1, W2 (default 1)")
    rec.add_argument("--lora-rank", type=non_negative_int, default=None, metavar="R",
                     help="train rank-R LoRA adapters on the blocks' linear layers plus the merge layers instead of every "
                     "weight (checkpoints hold the merged model; default 0 = every weight)")
    rec.add_argument("--lora-alpha", type=non_negative_float, default=None,
                     help="LoRA scale alpha (the delta is alpha / R x B A; default R)")
    rec.add_argument("--data-free", type=non_negative_int, default=None, metavar="N",
                     help="train on N samples of the teacher instead of --data (cached in the run directory): by class "
                     "label for DiT, from --prompt-embeds for caption models (PixArt, SD3, FLUX.1)")
    rec.add_argument("--prompt-embeds", metavar="FILE", default=None,
                     help="with --data-free: the prompts (`sparsedit encode-prompts` writes the file) the caption "
                     "model's teacher samples are drawn from, in turn")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="'digits' (embedded, the default), an image folder (class = subfolder) or a latents directory (images or "
                      "videos, with labels and/or T5 caption embeddings; sparsedit.train.data.save_latents)")
    data.add_argument("--image-size", type=positive_int, help="pixel resolution for 'digits' / image folders")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None,
                      help="image channels for 'digits' (default 1); other data sets have their own")
    run = p.add_argument_group("run")
    run.add_argument("--run-dir", required=True, help="directory for checkpoints, logs and samples")
    run.add_argument("--steps", type=positive_int, default=TrainSettings.steps)
    run.add_argument("--batch-size", type=positive_int, default=TrainSettings.batch_size, help="global batch size")
    run.add_argument("--lr", type=positive_float, default=TrainSettings.lr)
    run.add_argument("--weight-decay", type=non_negative_float, default=TrainSettings.weight_decay)
    run.add_argument("--ema-decay", type=unit_float, default=TrainSettings.ema_decay)
    run.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=TrainSettings.ema_warmup,
                     help="EMA decay min(--ema-decay, (1+n)/(10+n)) at update n, so short runs get a usable EMA "
                     "(default: on)")
    run.add_argument("--grad-clip", type=non_negative_float, default=TrainSettings.grad_clip, help="max grad norm (0 = off)")
    run.add_argument("--grad-accum", type=positive_int, default=TrainSettings.grad_accum)
    run.add_argument("--grad-checkpointing", action="store_true")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    run.add_argument("--seed", type=seed, default=0)
    run.add_argument("--ckpt-every", type=positive_int, default=TrainSettings.ckpt_every)
    run.add_argument("--keep-last", type=positive_int, default=TrainSettings.keep_last)
    run.add_argument("--log-every", type=positive_int, default=TrainSettings.log_every)
    run.add_argument("--sample-every", type=non_negative_int, default=0,
                     help="write an EMA sample grid every N steps (0 = off)")
    run.add_argument("--num-workers", type=non_negative_int, default=0)
    run.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (under torchrun)")
    run.add_argument("--tensorboard", action="store_true")
    run.add_argument("--vae", default=None, help="local VAE for sample grids of latent models")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def build_model(args: argparse.Namespace, info: dict):  # noqa: ANN201
    """The model to train, from --init-from (+ --layout, converted as `sparsedit sparsify` does) or from a preset."""
    from sparsedit.cli.sparsify import _convert
    from sparsedit.errors import SparseditError
    from sparsedit.families.dit.model import dit_config
    from sparsedit.loading import load_model

    if args.init_from and args.model:
        raise SparseditError("give either --init-from (fine-tune) or --model (from scratch), not both")
    made_by_layout = [f"--{name.replace('_', '-')}" for name in ("r_min", "r_max", "num_pieces", "upsample")
                      if getattr(args, name, None) is not None]
    if made_by_layout and not args.layout:
        raise SparseditError(f"{', '.join(made_by_layout)} shape(s) the sparse model that --layout makes; add --layout "
                             "or drop them (a sparse --init-from keeps its own settings)")
    if args.init_from:
        if args.init_gain is not None:
            raise SparseditError("--init-gain sets a from-scratch initialisation; drop it with --init-from")
        fixed = [flag for flag, value in (("--hidden-size", args.hidden_size), ("--depth", args.depth),
                                          ("--num-heads", args.num_heads), ("--no-learn-sigma", args.no_learn_sigma))
                 if value]
        if fixed:
            raise SparseditError(f"{', '.join(fixed)} set(s) a from-scratch architecture; the --init-from checkpoint "
                                 "fixes its own: drop them")
        model = load_model(args.init_from, image_size=args.image_size if info["data_space"] == "latent" else None)
        if args.layout:
            model = _convert(model, args)  # DiT -> SparseDiT, PixArt -> SparsePixArt, Latte -> SparseLatte
        return model.train()
    if not args.model:
        raise SparseditError("give --model PRESET to train from scratch or --init-from CKPT to fine-tune")
    if args.layout:
        raise SparseditError("--layout needs --init-from: a SparseDiT is initialised from a trained DiT")
    from sparsedit.families.dit.model import DiT

    overrides = {k: getattr(args, k) for k in ("hidden_size", "depth", "num_heads") if getattr(args, k)}
    # The model's input is the data itself: pixels, or latents of whatever size the VAE produced.
    size = info["latent_size"][0] if info["data_space"] == "latent" else info["resolution"]
    cfg = dit_config(args.model, size, vae_downsample=1, in_channels=info["channels"],
                     num_classes=info["num_classes"], learn_sigma=not args.no_learn_sigma,
                     data_space=info["data_space"], **overrides)
    return DiT(cfg, init_gain=args.init_gain or 1.0).train()


def recipe_settings(args: argparse.Namespace, min_snr: bool = True) -> TrainSettings:
    """The run's settings: the defaults, then the recipe's values, then every option given explicitly. The default
    recipe of a sparsified model is DEFAULT_RECIPE where the family's process takes Min-SNR weighting (DDPM models),
    else the paper's (flow matching: SD3, FLUX.1)."""
    recipe = args.recipe or (DEFAULT_RECIPE if args.init_from and args.layout and min_snr else "paper")
    values = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name, None) is not None}
    return TrainSettings(**{**RECIPES[recipe], **values})


def load_teacher(args: argparse.Namespace, info: dict, settings: TrainSettings):  # noqa: ANN201
    """The dense teacher for distillation: --teacher, else the --init-from model (the student's source)."""
    from sparsedit.errors import SparseditError
    from sparsedit.loading import load_model

    if not settings.distills:
        if args.teacher:
            raise SparseditError("--teacher needs --distill-weight or --feature-weight > 0 (or a distilling --recipe)")
        return None
    path = args.teacher or (args.init_from if args.layout else None)
    if path is None:
        raise SparseditError("distillation needs the dense source model: pass --teacher CKPT (or fine-tune with "
                             "--init-from DENSE --layout ..., whose --init-from is the teacher)")
    return load_model(path, image_size=args.image_size if info["data_space"] == "latent" else None).eval()


def run_train(args: argparse.Namespace) -> int:
    import torch

    from sparsedit.errors import SparseditError
    from sparsedit.families import family_of
    from sparsedit.families.presets import is_sparse
    from sparsedit.train.trainer import Trainer, check_model_fits_data, open_dataset

    if args.device is not None:
        check_device(args.device)  # an unknown or absent device is an error, never a silent CPU run
    if args.prompt_embeds is not None:
        # Data-free distillation of a caption model: the teacher's samples of these prompts are the data.
        if not args.data_free:
            raise SparseditError("--prompt-embeds gives the prompts of data-free distillation; add --data-free N")
        if args.data is not None or args.channels is not None:
            raise SparseditError("--data-free with --prompt-embeds trains on the teacher's samples of those prompts; "
                                 "drop --data / --channels")
        dataset, info = None, {"data_space": "latent", "data_free_prompts": args.prompt_embeds}
    else:
        args.data = args.data or "digits"
        if args.channels is not None and args.data != "digits":
            raise SparseditError(f"--channels applies to the embedded digits; {args.data} has its own channels: drop it")
        dataset, info = open_dataset(args.data, args.image_size, args.channels or 1, args.seed)
    if args.vae is not None and info["data_space"] != "latent":
        raise SparseditError("--vae decodes the sample grids of latent models; this data is pixels: drop --vae")
    if args.vae is not None and not args.sample_every:
        raise SparseditError("--vae only decodes the --sample-every grids; add --sample-every N or drop --vae")
    torch.manual_seed(args.seed)  # the initialisation of a from-scratch model is part of the run
    model = build_model(args, info)
    family = family_of(model)
    prompts = None
    if dataset is None:
        from sparsedit.core.prompts import read_prompt_embeds

        if not family.text_conditioned:
            raise SparseditError(f"a {type(model).__name__} takes no prompts: drop --prompt-embeds (its data-free "
                                 "samples are drawn by class label)")

        prompts = read_prompt_embeds(args.prompt_embeds, model.config.caption_channels,
                                     model.config.pooled_channels if family.pooled_text else None)
    else:
        check_model_fits_data(model.config, info)
    if args.merge_lr_scale is not None and not is_sparse(model.config):
        raise SparseditError("--merge-lr-scale sets the learning rate of a sparse model's merge layers; this "
                             f"{type(model).__name__} has none: drop it")
    settings = recipe_settings(args, family.min_snr)
    teacher = load_teacher(args, info, settings)
    source = ({"init_from": args.init_from, "layout": args.layout} if args.init_from
              else {"preset": args.model, "init_gain": args.init_gain or 1.0})
    run_info = {"data": info, "source": source}
    if teacher is not None:
        run_info["teacher"] = {"path": args.teacher or args.init_from}
    trainer = Trainer(model, dataset, args.run_dir, settings, run_info=run_info, device=args.device,
                      vae_path=args.vae, progress=not args.no_progress, teacher=teacher, prompts=prompts)
    out = trainer.fit()
    if trainer.dist.main:
        print(f"done: {trainer.step} steps; final EMA model in {out}")
    return 0
