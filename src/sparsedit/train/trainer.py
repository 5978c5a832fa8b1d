"""Training and fine-tuning of every family: DiT / SparseDiT, PixArt-alpha / SparsePixArt, Latte / SparseLatte.

One loop serves single-process, DDP and FSDP runs (``torchrun``; gloo on CPU, nccl on GPU). A run
lives in one directory::

    RUN/run.json                    the settings (a re-run with the same settings resumes)
    RUN/metrics.jsonl               one JSON line per logged step (rank 0)
    RUN/checkpoints/step_0001000/   model/ and ema/ (sparsedit checkpoints), optimizer.pt,
                                    trainer.json, rng_rank{r}.pt -- written to a temp dir, then renamed
    RUN/samples/step_0001000.png    periodic EMA sample grids
    RUN/model/                      the final EMA model (a sparsedit checkpoint)

Resuming restores weights, EMA, optimizer, step and every RNG (per rank), and the data order is a
pure function of (seed, step), so on CPU a killed and resumed run logs the same losses step for
step as an uninterrupted one. Sparse batches (SparseDiT, SparsePixArt, SparseLatte) draw their
timesteps from one schedule piece per step and rank (:class:`sparsedit.core.schedule.PieceSampler`;
:class:`VideoPieceSampler` for SparseLatte's token sets), so each batch shares one token set.

What the model is conditioned on follows its family: class labels ``y`` (DiT, class-conditional or
unconditional Latte), or T5 caption embeddings ``encoder_hidden_states`` with their
``encoder_attention_mask`` (PixArt-alpha, Latte-T2V), read from the data set's items
(:class:`sparsedit.train.data.LatentsDataset`).

The parts of a run live in their own modules, all re-exported here: :mod:`sparsedit.train.settings`
(:class:`TrainSettings`, the recipes), :mod:`sparsedit.train.distributed` (:class:`Dist`),
:mod:`sparsedit.train.datasets` (:func:`open_dataset`, :func:`check_model_fits_data`, the batch order) and
:mod:`sparsedit.train.runs` (the run directory: checkpoints, resume, the metrics log).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sparsedit.core.checkpoint import replace_dir
from sparsedit.core.locking import run_lock
from sparsedit.core.schedule import Piece, PieceSampler
from sparsedit.errors import SparseditError, os_error_at
from sparsedit.families import family_of
from sparsedit.train.datasets import (
    StepBatchSampler,
    check_model_fits_data,
    describe_latents,
    open_dataset,
    text_conditioned,
)
from sparsedit.train.distill import (
    capture_block_outputs,
    check_samplable,
    check_teacher,
    feature_layers,
    feature_loss,
    output_loss,
    teacher_samples,
)
from sparsedit.train.distributed import Dist, init_distributed
from sparsedit.train.latents import LatentsDataset
from sparsedit.train.lora import add_lora, base_fingerprint
from sparsedit.train.runs import (
    LEGACY_SETTINGS,
    METRICS_FILE,
    RUN_FILE,
    RunDirMixin,
    list_checkpoints,
    step_dir_name,
)
from sparsedit.train.settings import DEFAULT_RECIPE, RECIPES, TrainSettings, describe_recipe

__all__ = [
    "DEFAULT_RECIPE",
    "LEGACY_SETTINGS",
    "LOSS_NAMES",
    "METRICS_FILE",
    "RECIPES",
    "RUN_FILE",
    "Dist",
    "StepBatchSampler",
    "TrainSettings",
    "Trainer",
    "check_model_fits_data",
    "describe_latents",
    "describe_recipe",
    "init_distributed",
    "list_checkpoints",
    "open_dataset",
    "step_dir_name",
    "text_conditioned",
    "timestep_sampler",
    "token_set_label",
]

# What a step logs: the total loss, the epsilon MSE (unweighted), the VLB term, the distillation terms.
LOSS_NAMES = ("loss", "mse", "vb", "distill", "feature")


# --------------------------------------------------------------------------------------------
# timesteps: one token set per batch
# --------------------------------------------------------------------------------------------


def timestep_sampler(model: nn.Module, generator: torch.Generator) -> PieceSampler | None:
    """The piece sampler of a sparse model (None for a dense one, whose timesteps are plain uniform)."""
    return family_of(model).timestep_sampler(generator)


def token_set_label(piece: Piece) -> str:
    """How the log names a piece's token set: ``5x5`` (grid), ``4x4x2f`` (grid x frames, SparseLatte)."""
    return piece.label


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


class Trainer(RunDirMixin):
    """Trains ``model`` on ``dataset`` in ``run_dir`` with ``settings``.

    Items are ``(x, label)`` for class-conditional models, ``(x, cond)`` with ``cond`` a dict holding
    ``encoder_hidden_states`` (L, D) and ``encoder_attention_mask`` (L,) for text-conditional ones
    (what :class:`sparsedit.train.data.LatentsDataset` returns for a directory with captions).

    ``teacher``: the dense model ``model`` was sparsified from, for distillation
    (``settings.distill_weight`` / ``feature_weight``; :mod:`sparsedit.train.distill`). It is frozen, sees
    the same ``(x_t, t, conditions)`` as the student (its condition dropout replays the student's
    random draws, so a dropped label is dropped for both) and is never saved with the student.

    ``prompts``: for data-free distillation (``settings.data_free``) of a caption model, the prompt embeddings the
    teacher's samples are drawn from (:func:`sparsedit.core.prompts.read_prompt_embeds`); pass ``dataset=None``.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, run_dir: str | Path, settings: TrainSettings,
                 run_info: dict[str, Any] | None = None, device: str | None = None,
                 vae_path: str | None = None, progress: bool = True, teacher: nn.Module | None = None,
                 prompts: dict[str, Tensor] | None = None):
        if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "to_dict"):
            raise SparseditError(f"Trainer takes a sparsedit model (a module with a .config), not a "
                                 f"{type(model).__name__}; build one or load it with sparsedit.load_model")
        if not isinstance(settings, TrainSettings):
            raise SparseditError(f"settings must be a TrainSettings, not a {type(settings).__name__}; e.g. "
                                 "TrainSettings(steps=1000, batch_size=32)")
        data_free = dataset is None and settings.data_free  # the teacher's samples are drawn later, in fit()
        if not data_free and (not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))
                              or isinstance(dataset, str | bytes)):
            raise SparseditError(f"dataset must be a map-style dataset (len() and [i]), not a {type(dataset).__name__}; "
                                 "see sparsedit.train.trainer.open_dataset")
        self.dist = init_distributed(device)
        settings.validate(self.dist.world)
        if self.dist.device.type == "cpu":
            # Denormal floats (tiny adaLN gradients, Adam moments) slow CPU kernels by an order of
            # magnitude; flushing them to zero is the usual CPU-training setting and stays deterministic.
            torch.set_flush_denormal(True)
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.dataset = dataset
        self.progress = progress
        self.vae_path = vae_path
        if prompts is not None and not settings.data_free:
            raise SparseditError("prompt embeddings are what data-free distillation samples the teacher from; add "
                                 "--data-free N or drop --prompt-embeds")
        self.prompts = prompts
        self.raw = model.to(self.dist.device)
        self.config = model.config
        self.run_info = {"settings": asdict(settings), "model": self.config.to_dict(), **(run_info or {})}
        if teacher is not None:
            self.run_info["teacher"] = {**self.run_info.get("teacher", {}), "model": teacher.config.to_dict()}
        if isinstance(dataset, LatentsDataset) and not settings.data_free:
            check_model_fits_data(self.config, describe_latents(dataset))
        self.family = family_of(self.config)  # asked every step: once is enough
        self.text = self.family.text_conditioned
        self.null_caption = self._dropout_caption(dataset)
        self.diffusion = self.family.training_process()
        self.gen = torch.Generator().manual_seed(settings.seed * 1000 + self.dist.rank)
        torch.manual_seed(settings.seed * 1000 + self.dist.rank)  # label dropout uses the global RNG
        self.pieces = self.family.timestep_sampler(self.gen)
        self.teacher, self.taps = self._set_up_teacher(teacher)
        # A LoRA run's frozen weights, fingerprinted once: a resume must start from the same ones.
        self.lora_base = None
        if settings.lora_rank:
            add_lora(self.raw, settings.lora_rank, settings.lora_alpha or None)
            self.lora_base = base_fingerprint(self.raw)
        self.raw.gradient_checkpointing = settings.grad_checkpointing
        self.ema = copy.deepcopy(self.raw).requires_grad_(False).eval()
        self.model, self.ema_wrapped = self._wrap()
        self.opt = torch.optim.AdamW(self._param_groups(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.step = 0
        self.last_ckpt: Path | None = None
        self.writer: Any = None

    # -- set-up ---------------------------------------------------------------------------------

    def _set_up_teacher(self, teacher: nn.Module | None) -> tuple[nn.Module | None, list[int]]:
        """The frozen teacher on this rank's device, and the layers whose features are distilled."""
        s = self.settings
        if teacher is None:
            if s.distills or s.data_free:
                raise SparseditError("--distill-weight / --feature-weight / --data-free need a teacher: the dense model "
                                     "the student was sparsified from (--teacher PATH; default with --layout: --init-from)")
            return None, []
        if not (s.distills or s.data_free):
            raise SparseditError("a teacher was given but --distill-weight, --feature-weight and --data-free are 0; "
                                 "set one of them")
        check_teacher(self.raw, teacher)
        if s.data_free:
            check_samplable(teacher, self.prompts)
        # Train mode only switches on condition dropout (no dropout layers in these models); the
        # teacher needs it to drop the same labels as the student (see train_step).
        teacher = teacher.to(self.dist.device).requires_grad_(False).train()
        return teacher, feature_layers(self.raw) if s.feature_weight > 0 else []

    def _teacher_dataset(self) -> Dataset:
        """``settings.data_free`` teacher samples: drawn by rank 0 into the run dir once, read by every rank."""
        cache = self.run_dir / "teacher_samples"
        if self.dist.main:
            teacher_samples(self.teacher, self.settings.data_free, cache, text=self.prompts, seed=self.settings.seed,
                            device=self.dist.device, progress=self.progress)
        self.dist.barrier()
        return teacher_samples(self.teacher, self.settings.data_free, cache, text=self.prompts, seed=self.settings.seed,
                               progress=False)

    def _param_groups(self) -> list[dict[str, Any]]:
        """All parameters at --lr, the recovery merges (W1, W2) at --lr x --merge-lr-scale."""
        merge, rest = [], []
        for name, p in self.raw.named_parameters():
            if p.requires_grad:  # a LoRA run trains its adapters and merges only
                (merge if ".merge_" in name else rest).append(p)
        groups = [{"params": rest}]
        if merge and self.settings.merge_lr_scale != 1.0:
            groups.append({"params": merge, "lr": self.settings.lr * self.settings.merge_lr_scale})
        else:
            rest.extend(merge)
        return groups

    def _dropout_caption(self, dataset: Dataset) -> Tensor | None:
        """The null caption that the trainer drops captions to, or None when it drops none itself.

        A PixArt with a stored null caption drops captions in train mode on its own (its
        ``CaptionEmbedder``), so the trainer must not drop them again. Latte-T2V and diffusers PixArt
        checkpoints store none: then the data set's ``null_caption`` (the embedded empty prompt) is used.
        """
        if not self.text or getattr(self.config, "class_dropout_prob", 0.0) == 0:
            return None
        if getattr(self.raw.y_embedder, "y_embedding", None) is not None:
            return None
        null = getattr(dataset, "null_caption", None)
        if null is None and self.prompts is not None and "null_embeds" in self.prompts:
            null = self.prompts["null_embeds"][0]  # data-free: the empty prompt of the prompt file
        if null is None:
            raise SparseditError(
                f"this {type(self.raw).__name__} stores no null caption, so caption dropout (p = "
                f"{self.config.class_dropout_prob}, for classifier-free guidance) needs one from the data: write the "
                "T5 embedding of the empty prompt with save_latents(..., null_caption=...)"
            )
        return null.float()

    def _wrap(self) -> tuple[nn.Module, nn.Module]:
        if self.dist.world == 1 and not self.settings.fsdp:
            return self.raw, self.ema
        if self.settings.fsdp:
            if not dist.is_initialized():
                raise SparseditError("--fsdp shards the model across processes: launch with "
                                     "`torchrun --nproc_per_node=N -m sparsedit train ...`")
            # FSDP2 (per-parameter sharding; works on CPU with gloo, unlike FSDP1): every block is a
            # unit, then the root. The EMA is sharded the same way, so its update is a shard-local lerp.
            from torch.distributed.fsdp import fully_shard

            for module in (self.raw, self.ema):
                for block in module.blocks:
                    fully_shard(block)
                fully_shard(module)
            return self.raw, self.ema
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DDP(self.raw, device_ids=ids), self.ema

    # -- the loop -------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        use_bf16 = self.settings.precision == "bf16" or (self.settings.precision == "auto"
                                                        and self.dist.device.type == "cuda")
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def _loader(self) -> Iterator[tuple[Tensor, Any]]:
        per_rank = self.settings.batch_size // (self.dist.world * self.settings.grad_accum)
        sampler = StepBatchSampler(len(self.dataset), per_rank, self.dist.rank, self.dist.world, self.settings.seed,
                                   self.step * self.settings.grad_accum, self.dataset)
        # An own generator: creating the loader must not consume the global RNG (which drives label
        # dropout and is restored on resume), or a resumed run would drift from an uninterrupted one.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.settings.num_workers,
                            generator=torch.Generator().manual_seed(self.settings.seed))
        return iter(loader)

    def _timesteps(self, n: int) -> tuple[Tensor, str]:
        if self.pieces is None:
            return torch.randint(0, self.diffusion.num_timesteps, (n,), generator=self.gen), "dense"
        t, piece = self.pieces.sample(n)
        return t, token_set_label(piece)

    def _model_kwargs(self, x: Tensor, cond: Any) -> dict[str, Any]:
        """The conditioning keyword arguments of the model call for one micro-batch ``x``."""
        dev = self.dist.device
        if not self.text:
            labels = cond.get("y") if isinstance(cond, dict) else cond
            if labels is None:
                if self.config.num_classes == 0:
                    return {}  # an unconditional Latte
                raise SparseditError(f"this {type(self.raw).__name__} is class-conditional but the data items carry no "
                                     "class labels; write them with save_latents(..., labels=...)")
            return {"y": labels.to(dev)}
        if not isinstance(cond, dict) or "encoder_hidden_states" not in cond:
            raise SparseditError(f"this {type(self.raw).__name__} is text-conditional but the data items carry no caption "
                                 "embeddings; write them with save_latents(..., captions=...)")
        caption = cond["encoder_hidden_states"].to(dev)  # (B, L, D)
        if self.null_caption is not None:
            # The CaptionEmbedder's rule: each caption becomes the null caption with probability p (the
            # global RNG, restored on resume); the prompt's mask is kept, as PixArt does.
            drop = torch.rand(caption.shape[0]) < self.config.class_dropout_prob
            caption = torch.where(drop.to(dev)[:, None, None], self.null_caption.to(caption), caption)
        kwargs = self.family.training_kwargs(cond, caption, dev)
        added = self.family.added_conditions(x.shape[-2:], x.shape[0], dev)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema = list(self.ema_wrapped.parameters())
        cur = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - self.settings.ema_decay_at(self.step))

    def _teacher_forward(self, x: Tensor, t: Tensor, noise: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, dict]:
        """The teacher's prediction (and tapped tokens) on the student's x_t, t and conditions.

        Run inside a forked RNG so that its label / caption dropout draws exactly what the student's
        forward then draws from the same state: a condition dropped for one is dropped for both.
        """
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        xt = self.diffusion.q_sample(x, t, noise)
        with torch.no_grad(), torch.random.fork_rng(devices=devices), \
                capture_block_outputs(self.teacher, self.taps, x.shape[0]) as feats:
            out = self.teacher(xt, self.diffusion.original_timesteps(t), **kwargs)
        return out, feats

    def train_step(self, batches: Iterator[tuple[Tensor, Any]]) -> dict[str, float]:
        s = self.settings
        self.model.train()
        totals = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        grid = ""
        for micro in range(s.grad_accum):
            x, cond = next(batches)
            x = x.to(self.dist.device)
            kwargs = self._model_kwargs(x, cond)
            t, grid = self._timesteps(x.shape[0])
            t = t.to(self.dist.device)
            noise = torch.randn(x.shape, generator=self.gen).to(self.dist.device)
            weight = self.diffusion.min_snr_weight(t, s.min_snr_gamma) if s.min_snr_gamma > 0 else None
            last = micro == s.grad_accum - 1
            sync_ctx = contextlib.nullcontext()
            if self.settings.fsdp:
                self.model.set_requires_gradient_sync(last)
            elif not last and hasattr(self.model, "no_sync"):
                sync_ctx = self.model.no_sync()
            with sync_ctx, self._autocast():
                if self.teacher is not None:
                    teacher_out, teacher_feats = self._teacher_forward(x, t, noise, kwargs)
                with capture_block_outputs(self.raw, self.taps, x.shape[0]) as feats:
                    losses = self.diffusion.training_losses(self.model, x, t, kwargs, noise, mse_weight=weight)
                zero = torch.zeros_like(losses["mse"])
                losses["distill"] = output_loss(losses["output"], teacher_out) if s.distill_weight > 0 else zero
                losses["feature"] = feature_loss(feats, teacher_feats) if self.taps else zero
                loss = (s.diffusion_weight * losses["loss"] + s.distill_weight * losses["distill"]
                        + s.feature_weight * losses["feature"]).mean()
            (loss / s.grad_accum).backward()
            parts = [loss] + [losses[name].mean() for name in LOSS_NAMES[1:]]
            totals += torch.stack([v.detach().double().cpu() for v in parts]) / s.grad_accum
        totals = self.dist.mean(totals.to(self.dist.device) if self.dist.device.type == "cuda" else totals).cpu()
        if not torch.isfinite(totals).all():
            last = self.last_ckpt or "none (no checkpoint yet)"
            raise SparseditError(f"loss became {totals[0].item()} at step {self.step + 1}; last good checkpoint: {last}. "
                                 "Lower --lr, enable --grad-clip, or check the data")
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._update_ema()
        self.step += 1
        return {**{name: v.item() for name, v in zip(LOSS_NAMES, totals, strict=True)}, "grid": grid}

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        path = self.run_dir / METRICS_FILE
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: name the log (resume drops a line cut in half)
            raise os_error_at(err, path) from None
        if self.writer is not None:
            for key in (*LOSS_NAMES, "steps_per_sec"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def _sample_grid(self) -> None:
        if not self.dist.main or self.settings.fsdp or not self.family.draws_training_grids():
            return  # an FSDP EMA is sharded; PixArt / Latte need captions or videos: sample a checkpoint instead
        from sparsedit.core.images import save_grid
        from sparsedit.diffusion.sampling import generate, to_images
        from sparsedit.encoders.vae import load_vae

        if self.config.data_space == "latent" and self.vae_path is None:
            return
        labels = [i % self.config.num_classes for i in range(min(self.config.num_classes, 10))]
        samples = generate(self.ema, labels, sampler="ddim", steps=25, seed=0, device=self.dist.device, progress=False,
                           cfg_scale=1.0)
        vae = (load_vae(self.vae_path, self.dist.device, latent_channels=self.config.in_channels)
               if self.config.data_space == "latent" else None)
        save_grid(to_images(self.ema, samples, vae), self.run_dir / "samples" / f"{step_dir_name(self.step)}.png")

    def fit(self) -> Path:
        """Train to ``settings.steps`` (resuming if the run dir has a checkpoint); returns the final EMA model dir."""
        if (self.settings.sample_every and self.family.draws_training_grids()
                and self.config.data_space == "latent"):
            if self.vae_path is None:
                raise SparseditError("--sample-every on a latent model needs --vae DIR to decode the grids; add it or "
                                     "drop --sample-every")
            from sparsedit.encoders.vae import load_vae

            load_vae(self.vae_path, "cpu", latent_channels=self.config.in_channels)  # a wrong VAE fails now, not later
        self._check_run_dir()  # before the lock creates the directory: a refused run creates nothing
        with run_lock(self.run_dir, "--run-dir") if self.dist.main else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> Path:
        s = self.settings
        self._prepare_run_dir()
        self._resume()
        if self.step > s.steps and self.dist.main:
            print(f"note: {self.run_dir} is already at step {self.step}, past --steps {s.steps}: nothing to train; "
                  "raise --steps to continue it")
        if s.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SparseditError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if s.sample_every and self.dist.main and not self.family.draws_training_grids():
            print(f"note: --sample-every draws no grids for a {type(self.raw).__name__} (it needs captions or writes "
                  "videos); sample a checkpoint with `sparsedit sample` instead")
        if s.data_free:
            self.dataset = self._teacher_dataset()
        batches = self._loader()
        bar = None
        if self.dist.main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=s.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        tick, tick_step = time.perf_counter(), self.step
        while self.step < s.steps:
            stats = self.train_step(batches)
            if self.step % s.log_every == 0 or self.step == s.steps:
                now = time.perf_counter()
                rate = (self.step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, self.step
                self._log({"step": self.step, **stats, "lr": s.lr, "steps_per_sec": rate})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", grid=stats["grid"])
            if self.step % s.ckpt_every == 0 or self.step == s.steps:
                self.save_checkpoint()
            if s.sample_every and self.step % s.sample_every == 0:
                self._sample_grid()
        if bar is not None:
            bar.close()
        out = self.run_dir / "model"
        if self.dist.main:
            final = list_checkpoints(self.run_dir)[-1] / "ema"
            tmp = self.run_dir / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(final, tmp)
                replace_dir(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.dist.barrier()
        if self.writer is not None:
            self.writer.close()
        return out
