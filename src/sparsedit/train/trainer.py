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
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sparsedit.core.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    config_from_dict,
    error_in_place_of,
    read_json,
    read_safetensors,
    replace_dir,
    write_json,
    write_safetensors,
)
from sparsedit.core.locking import LOCK_NAME, run_lock
from sparsedit.core.schedule import Piece, PieceSampler
from sparsedit.diffusion.process import create_diffusion
from sparsedit.diffusion.vae import VAE_DOWNSAMPLE
from sparsedit.errors import CheckpointError, SparseditError, os_error_at
from sparsedit.families import family_of
from sparsedit.families.pixart.model import size_conditions
from sparsedit.train.data import LatentsDataset
from sparsedit.train.distill import (
    capture_block_outputs,
    check_samplable,
    check_teacher,
    feature_layers,
    feature_loss,
    output_loss,
    teacher_samples,
)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# What a step logs: the total loss, the epsilon MSE (unweighted), the VLB term, the distillation terms.
LOSS_NAMES = ("loss", "mse", "vb", "distill", "feature")


@dataclass
class TrainSettings:
    """Everything that defines a run besides the model and the data (saved in ``run.json``)."""

    steps: int = 1000
    batch_size: int = 32  # global, summed over ranks and accumulation steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay at update n = min(ema_decay, (1 + n) / (10 + n)): short runs get a usable EMA
    min_snr_gamma: float = 0.0  # > 0: weight the epsilon MSE by min(SNR, gamma) / SNR (Min-SNR; the authors use 5)
    diffusion_weight: float = 1.0  # weight of the diffusion loss (MSE + VLB)
    distill_weight: float = 0.0  # > 0: output distillation from a teacher (MSE to its prediction)
    feature_weight: float = 0.0  # > 0: feature distillation on the dense tokens after every SDTM and the last block
    merge_lr_scale: float = 1.0  # learning-rate multiplier of the recovery merge layers (W1, W2), new in a SparseDiT
    data_free: int = 0  # > 0: train on this many samples of the teacher instead of the data (cached in the run dir)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1
    grad_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    seed: int = 0
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0 disables periodic sample grids
    num_workers: int = 0
    fsdp: bool = False
    tensorboard: bool = False

    def validate(self, world_size: int) -> None:
        positive = ("steps", "batch_size", "grad_accum", "ckpt_every", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SparseditError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1 or self.grad_clip < 0:
            raise SparseditError("need --lr > 0, 0 <= --ema-decay < 1 and --grad-clip >= 0")
        weights = ("min_snr_gamma", "diffusion_weight", "distill_weight", "feature_weight", "data_free")
        negative = [f"--{name.replace('_', '-')}" for name in weights if getattr(self, name) < 0]
        if negative or self.merge_lr_scale <= 0:
            raise SparseditError(f"{', '.join(negative) or '--merge-lr-scale'} must be >= 0 (--merge-lr-scale > 0)")
        if self.diffusion_weight + self.distill_weight + self.feature_weight == 0:
            raise SparseditError("every loss weight is 0; keep --diffusion-weight > 0 or add --distill-weight")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise SparseditError(f"--precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.batch_size % (world_size * self.grad_accum):
            raise SparseditError(
                f"--batch-size {self.batch_size} is not divisible by world size {world_size} x --grad-accum "
                f"{self.grad_accum}; pick a multiple of {world_size * self.grad_accum}"
            )

    @property
    def distills(self) -> bool:
        return self.distill_weight > 0 or self.feature_weight > 0

    def ema_decay_at(self, n: int) -> float:
        """The EMA decay of update ``n`` (0-based): with warm-up, ``min(ema_decay, (1 + n) / (10 + n))``."""
        return min(self.ema_decay, (1 + n) / (10 + n)) if self.ema_warmup else self.ema_decay


# Named recovery recipes for fine-tuning a freshly sparsified model (values of TrainSettings fields);
# docs/quality.md measures each on the embedded benchmark and explains the default.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},  # the diffusion loss only, as in the paper
    "min-snr": {"min_snr_gamma": 5.0},  # + Min-SNR-5 weighting of the MSE, as in the authors' training code
    "distill": {"distill_weight": 1.0},  # + output distillation from the dense source
    "distill-feature": {"distill_weight": 1.0, "feature_weight": 1.0},  # + feature distillation
    "data-free": {"distill_weight": 1.0, "data_free": 2000},  # output distillation on 2,000 teacher samples
}
DEFAULT_RECIPE = "min-snr"  # what `sparsedit train --init-from DENSE --layout ...` uses (docs/quality.md)


def describe_recipe(name: str) -> str:
    """``distill_weight=1.0, ...`` (or ``diffusion loss only``) for help texts and reports."""
    return ", ".join(f"{k}={v}" for k, v in RECIPES[name].items()) or "diffusion loss only"


def _config_fields(saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """A model config saved in run.json, rebuilt so that fields added since (with defaults equal to the old
    behaviour, e.g. the SparseDiT recovery switches) compare equal to a fresh config's."""
    if saved is None:
        return None
    try:
        return json.loads(json.dumps(config_from_dict(saved).to_dict()))
    except SparseditError:
        return saved


# Settings added after runs were first written: a run.json without them was made with these values.
LEGACY_SETTINGS = {"ema_warmup": False, "min_snr_gamma": 0.0, "diffusion_weight": 1.0, "distill_weight": 0.0,
                   "feature_weight": 0.0, "merge_lr_scale": 1.0, "data_free": 0}


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: Tensor) -> Tensor:
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group set up by ``torchrun`` (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise SparseditError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


# --------------------------------------------------------------------------------------------
# data: the order is a pure function of (seed, step) so that resuming needs no loader state
# --------------------------------------------------------------------------------------------


class StepBatchSampler:
    """Yields this rank's index batches from ``start_step`` on: epoch e is ``randperm(n, seed + e)``
    split across ranks; incomplete batches at an epoch's end are dropped."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start_step: int, dataset: Any = None):
        self.per_epoch = n // (batch * world)
        if self.per_epoch == 0:
            raise SparseditError(f"the data set has {n} items, fewer than one global batch of {batch * world}; "
                                 "lower --batch-size or add data")
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start = start_step
        self.dataset = dataset

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)  # fresh posterior samples for latent moments
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            mine = perm[self.rank :: self.world]
            for k in range(offset, self.per_epoch):
                yield mine[k * self.batch : (k + 1) * self.batch].tolist()
            step += self.per_epoch - offset


# --------------------------------------------------------------------------------------------
# timesteps: one token set per batch
# --------------------------------------------------------------------------------------------


def timestep_sampler(model: nn.Module, generator: torch.Generator) -> PieceSampler | None:
    """The piece sampler of a sparse model (None for a dense one, whose timesteps are plain uniform)."""
    return family_of(model).timestep_sampler(generator)


def token_set_label(piece: Piece) -> str:
    """How the log names a piece's token set: ``5x5`` (grid), ``4x4x2f`` (grid x frames, SparseLatte)."""
    return piece.label


def text_conditioned(config: Any) -> bool:
    """PixArt-alpha and Latte-T2V take T5 caption embeddings; DiT and class/unconditional Latte take labels."""
    return family_of(config).text_conditioned


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "trainer.json").exists())


def _rng_state(gen: torch.Generator) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _save_tensors_pickle(obj: Any, path: Path) -> None:
    """``torch.save`` of a resume file, atomically. torch reports a failed write (a full disk) as a bare
    ``RuntimeError`` ("unexpected pos ..."): it is given back as the ``OSError`` it is, naming the file."""

    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            full = shutil.disk_usage(tmp.parent).free < 16 * 2**20
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(code, os.strerror(code) if full else f"torch.save failed: {_first_line(err)}",
                          str(path)) from None

    atomic_write(path, write)


def _load_tensors_pickle(path: Path) -> Any:
    """``torch.load`` of a resume file with ``weights_only=True`` (tensors and plain containers, nothing
    executed); a missing, empty, truncated or foreign file is a :class:`CheckpointError`."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged or not a sparsedit resume file ({_first_line(err)})") from None


def _set_rng_state(state: dict[str, Tensor], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` on ``dataset`` in ``run_dir`` with ``settings``.

    Items are ``(x, label)`` for class-conditional models, ``(x, cond)`` with ``cond`` a dict holding
    ``encoder_hidden_states`` (L, D) and ``encoder_attention_mask`` (L,) for text-conditional ones
    (what :class:`sparsedit.train.data.LatentsDataset` returns for a directory with captions).

    ``teacher``: the dense model ``model`` was sparsified from, for distillation
    (``settings.distill_weight`` / ``feature_weight``; :mod:`sparsedit.train.distill`). It is frozen, sees
    the same ``(x_t, t, conditions)`` as the student (its condition dropout replays the student's
    random draws, so a dropped label is dropped for both) and is never saved with the student.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, run_dir: str | Path, settings: TrainSettings,
                 run_info: dict[str, Any] | None = None, device: str | None = None,
                 vae_path: str | None = None, progress: bool = True, teacher: nn.Module | None = None):
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
        self.raw = model.to(self.dist.device)
        self.config = model.config
        self.run_info = {"settings": asdict(settings), "model": self.config.to_dict(), **(run_info or {})}
        if teacher is not None:
            self.run_info["teacher"] = {**self.run_info.get("teacher", {}), "model": teacher.config.to_dict()}
        if isinstance(dataset, LatentsDataset) and not settings.data_free:
            check_model_fits_data(self.config, describe_latents(dataset))
        self.text = text_conditioned(self.config)
        self.null_caption = self._dropout_caption(dataset)
        self.diffusion = create_diffusion(None, learn_sigma=self.config.learn_sigma)
        self.gen = torch.Generator().manual_seed(settings.seed * 1000 + self.dist.rank)
        torch.manual_seed(settings.seed * 1000 + self.dist.rank)  # label dropout uses the global RNG
        self.pieces = timestep_sampler(model, self.gen)
        self.teacher, self.taps = self._set_up_teacher(teacher)
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
            check_samplable(teacher)
        # Train mode only switches on condition dropout (no dropout layers in these models); the
        # teacher needs it to drop the same labels as the student (see train_step).
        teacher = teacher.to(self.dist.device).requires_grad_(False).train()
        return teacher, feature_layers(self.raw) if s.feature_weight > 0 else []

    def _teacher_dataset(self) -> Dataset:
        """``settings.data_free`` teacher samples: drawn by rank 0 into the run dir once, read by every rank."""
        cache = self.run_dir / "teacher_samples"
        if self.dist.main:
            teacher_samples(self.teacher, self.settings.data_free, cache, seed=self.settings.seed,
                            device=self.dist.device, progress=self.progress)
        self.dist.barrier()
        return teacher_samples(self.teacher, self.settings.data_free, cache, seed=self.settings.seed, progress=False)

    def _param_groups(self) -> list[dict[str, Any]]:
        """All parameters at --lr, the recovery merges (W1, W2) at --lr x --merge-lr-scale."""
        merge, rest = [], []
        for name, p in self.raw.named_parameters():
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
        if not self.text or self.config.class_dropout_prob == 0:
            return None
        if getattr(self.raw.y_embedder, "y_embedding", None) is not None:
            return None
        null = getattr(dataset, "null_caption", None)
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

    def _check_run_dir(self) -> None:
        """Refuse a run dir that holds another run or something else (reads only; see :meth:`_prepare_run_dir`)."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise SparseditError(f"the run directory {self.run_dir} is a file; choose a directory path")
        run_file = self.run_dir / RUN_FILE
        # A run that never wrote a checkpoint (it stopped on bad data, say) has nothing to resume: the corrected
        # command starts it afresh instead of being refused as "a different run".
        ckpts = self.run_dir / "checkpoints"
        if run_file.exists() and ckpts.is_dir() and any(p.name.startswith(("step_", "damaged-")) for p in ckpts.iterdir()):
            saved = read_json(run_file)
            saved["settings"] = {**LEGACY_SETTINGS, **saved.get("settings", {})}
            mine = json.loads(json.dumps(self.run_info))
            ignore = {"steps", "ckpt_every", "keep_last", "log_every", "sample_every", "num_workers", "tensorboard"}
            diff = sorted(
                k for k in set(saved.get("settings", {})) | set(mine["settings"])
                if k not in ignore and saved.get("settings", {}).get(k) != mine["settings"].get(k)
            )
            if _config_fields(saved.get("model")) != mine["model"]:
                diff.append("model config")
            if saved.get("data") != mine.get("data"):
                diff.append("data")
            if saved.get("teacher") != mine.get("teacher"):
                diff.append("teacher")
            if diff:
                raise SparseditError(f"{self.run_dir} holds a different run (differs in {', '.join(diff)}); use a new "
                                     "--run-dir, or repeat the original command to resume it")
        elif not run_file.exists() and self.run_dir.exists() and any(p.name != LOCK_NAME for p in self.run_dir.iterdir()):
            raise SparseditError(f"{self.run_dir} is not empty and is not a sparsedit run; choose a new --run-dir")

    def _prepare_run_dir(self) -> None:
        """Under the run lock: check again (another process may have started the run meanwhile), write
        ``run.json`` and remove what a killed process left half-written."""
        self._check_run_dir()
        self.dist.barrier()  # every rank has checked before rank 0 creates anything
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / RUN_FILE, self.run_info)
            # Temporary directories of a killed process; ours to remove, since we hold the lock.
            for stale in [*(self.run_dir / "checkpoints").glob(".step_*.tmp"), self.run_dir / ".model.tmp"]:
                shutil.rmtree(stale, ignore_errors=True)
        self.dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------

    def _full_state(self, module: nn.Module) -> dict[str, Tensor]:
        if self.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw_of(module).state_dict().items()}

    def raw_of(self, module: nn.Module) -> nn.Module:
        return module.module if hasattr(module, "module") and not self.settings.fsdp else module

    def save_checkpoint(self) -> Path:
        """Write step dir atomically (temp dir + rename); keeps the last ``keep_last``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        root = self.run_dir / "checkpoints"
        final = root / step_dir_name(self.step)
        tmp = root / f".{final.name}.tmp"
        model_sd = self._full_state(self.model)
        ema_sd = self._full_state(self.ema_wrapped)
        opt_sd = get_optimizer_state_dict(self.model, self.opt,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        try:
            _save_tensors_pickle(_rng_state(self.gen), tmp / f"rng_rank{self.dist.rank}.pt")
            self.dist.barrier()
            if self.dist.main:
                for name, sd in (("model", model_sd), ("ema", ema_sd)):
                    (tmp / name).mkdir()
                    write_safetensors(tmp / name / WEIGHTS_NAME, sd, metadata={"format": "pt"})
                    write_json(tmp / name / CONFIG_NAME, self.config.to_dict())
                _save_tensors_pickle(opt_sd, tmp / "optimizer.pt")
                write_json(tmp / "trainer.json", {"step": self.step, "world_size": self.dist.world})
                replace_dir(tmp, final)
        except OSError as err:  # a full disk, say: the earlier checkpoints stay, the half-written one goes
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error_in_place_of(err, tmp, final) from None
        except BaseException:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.dist.main:
            for old in list_checkpoints(self.run_dir)[: -self.settings.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        self.last_ckpt = final
        return final

    def load_checkpoint(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        info = read_json(path / "trainer.json")
        if not isinstance(info.get("step"), int) or step_dir_name(info["step"]) != path.name:
            raise CheckpointError(f"{path / 'trainer.json'} says step {info.get('step')!r}, not the step of {path.name}")
        if info.get("world_size") != self.dist.world:
            raise SparseditError(f"{path} was written by {info.get('world_size')} ranks, this run has {self.dist.world}; "
                                 "resume with the same number of processes")
        opts = StateDictOptions(full_state_dict=True)
        for module, name in ((self.model, "model"), (self.ema_wrapped, "ema")):
            state = read_safetensors(path / name / WEIGHTS_NAME)
            try:
                if self.settings.fsdp:
                    set_model_state_dict(module, state, options=opts)
                else:
                    self.raw_of(module).load_state_dict(state)
            except (KeyError, RuntimeError, ValueError) as err:
                raise CheckpointError(f"{path / name / WEIGHTS_NAME} does not fit the model ({_first_line(err)})") from None
        opt_state = _load_tensors_pickle(path / "optimizer.pt")
        try:
            set_optimizer_state_dict(self.model, self.opt, opt_state, options=opts)
            _set_rng_state(_load_tensors_pickle(path / f"rng_rank{self.dist.rank}.pt"), self.gen)
            self.step = int(info["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path} holds a damaged optimizer or RNG state ({_first_line(err)})") from None
        self.last_ckpt = path

    def _resume(self) -> None:
        """Load the newest checkpoint that loads on every rank; damaged newer ones are moved aside, saying why."""
        skipped: list[str] = []
        for path in reversed(list_checkpoints(self.run_dir)):
            try:
                self.load_checkpoint(path)
                problem = ""
            except CheckpointError as err:
                problem = str(err)
            if self.dist.world > 1:  # every rank must resume from the same step
                ok = torch.tensor([0.0 if problem else 1.0], device=self.dist.device)
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                problem = problem or ("" if ok.item() else "another rank could not load it")
            if not problem:
                if self.dist.main:
                    print(f"resuming {self.run_dir} from step {self.step} ({path.name})")
                self._truncate_metrics()
                return
            skipped.append(path.name)
            if self.dist.main:
                aside = path.with_name(f"damaged-{path.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)  # out of the way of the next save and of keep_last
                print(f"warning: skipping checkpoint {path.name}: {problem}; moved it to {aside.name}")
            self.dist.barrier()
        if skipped:
            raise CheckpointError(f"no checkpoint in {self.run_dir / 'checkpoints'} loads (all moved aside as damaged-*); "
                                  "use a new --run-dir to start over")
        self._truncate_metrics()  # a fresh start: the log of a run that stopped before its first checkpoint goes

    def _truncate_metrics(self) -> None:
        """Drop log lines past the resumed step (they are logged again), and damaged ones: a process killed
        while appending leaves half a line."""
        path = self.run_dir / METRICS_FILE
        if not self.dist.main or not path.exists():
            return
        keep, damaged = [], 0
        for raw in path.read_bytes().splitlines():
            try:
                record = json.loads(raw.decode("utf-8"))
                step = record["step"] if isinstance(record, dict) else None
            except (UnicodeDecodeError, ValueError, KeyError):
                step = None
            if not isinstance(step, int):
                damaged += bool(raw.strip())
            elif step <= self.step:
                keep.append(raw.decode("utf-8"))
        if damaged:
            print(f"warning: dropped {damaged} damaged line(s) from {path}")
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))

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
        mask = cond.get("encoder_attention_mask")
        kwargs: dict[str, Any] = {"encoder_hidden_states": caption,
                                  "encoder_attention_mask": None if mask is None else mask.to(dev)}
        if getattr(self.config, "use_additional_conditions", False):  # PixArt-1024-MS
            kwargs["added_cond_kwargs"] = size_conditions(x.shape[-2:], x.shape[0], dev)
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
        if not self.dist.main or self.settings.fsdp or not family_of(self.raw).draws_training_grids():
            return  # an FSDP EMA is sharded; PixArt / Latte need captions or videos: sample a checkpoint instead
        from sparsedit.core.images import save_grid
        from sparsedit.diffusion.sampling import generate, to_images
        from sparsedit.diffusion.vae import load_vae

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
        if (self.settings.sample_every and family_of(self.raw).draws_training_grids()
                and self.config.data_space == "latent"):
            if self.vae_path is None:
                raise SparseditError("--sample-every on a latent model needs --vae DIR to decode the grids; add it or "
                                     "drop --sample-every")
            from sparsedit.diffusion.vae import load_vae

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
        if s.sample_every and self.dist.main and not family_of(self.raw).draws_training_grids():
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


# --------------------------------------------------------------------------------------------
# what to train on, and what to train
# --------------------------------------------------------------------------------------------


def open_dataset(spec: str, image_size: int | None = None, channels: int = 1, seed: int = 0) -> tuple[Dataset, dict]:
    """``"digits"`` (embedded), a latents directory (``sparsedit extract-latents``) or an image folder.

    Returns the data set and a description (kind, resolution, channels, classes, data_space).
    """
    from sparsedit.train import data as D

    path = Path(spec)
    if spec == "digits":
        res = image_size or 16
        ds = D.DigitsDataset(split="train", resolution=res, channels=channels)
        info = {"kind": "digits", "resolution": res, "channels": channels, "num_classes": 10, "data_space": "pixel"}
    elif path.is_dir() and (path / D.META_FILE).exists():
        ds = D.LatentsDataset(path, seed=seed, apply_scale_factor=True)
        info = describe_latents(ds)
        if image_size is not None and image_size != info.get("resolution"):
            raise SparseditError(f"--image-size {image_size}: the latents in {path} were made at "
                                 f"{info.get('resolution')} px; drop --image-size or extract latents at that size")
    elif path.is_dir():
        res = image_size or 32
        ds = D.ImageFolderDataset(path, resolution=res, channels=3 if channels == 1 else channels)
        info = {"kind": "folder", "resolution": res, "channels": 3 if channels == 1 else channels,
                "num_classes": len(ds.classes), "data_space": "pixel"}
    else:
        raise SparseditError(f"--data {spec!r} is neither 'digits' nor a directory; pass 'digits', an image folder "
                             "(one subfolder per class) or a latents directory from `sparsedit extract-latents`")
    info["path"] = spec if spec == "digits" else str(path.resolve())
    return ds, info


def describe_latents(ds: LatentsDataset) -> dict[str, Any]:
    """What a latents directory holds, as :func:`open_dataset` records it (frames and captions only when present)."""
    c, *_, h, w = ds.latent_shape
    info: dict[str, Any] = {"kind": "latents", "resolution": int(ds.meta.get("resolution", h * VAE_DOWNSAMPLE)),
                            "latent_size": [h, w], "channels": c, "num_classes": ds.num_classes, "data_space": "latent"}
    if ds.num_frames is not None:
        info["num_frames"] = ds.num_frames
    if ds.caption_shape is not None:
        info.update(caption_shape=list(ds.caption_shape), labels=ds.labels is not None,
                    null_caption=ds.null_caption is not None)
    return info


def _conditioning_problems(config: Any, info: dict) -> list[str]:
    """Why the data cannot condition the model: labels for class models, T5 captions for text models."""
    caption = info.get("caption_shape")
    if not text_conditioned(config):
        if config.num_classes and not info.get("labels", True):
            return ["a class-conditional model vs data without class labels"]
        if config.num_classes < info["num_classes"]:
            return [f"{config.num_classes} classes vs {info['num_classes']} in the data"]
        return []
    if caption is None:
        return ["a text-conditional model vs data without caption embeddings (save_latents(..., captions=...))"]
    if caption[1] != config.caption_channels:
        return [f"caption width {config.caption_channels} vs {caption[1]} in the data"]
    null_length = getattr(config, "null_caption_length", 0)
    if null_length and config.class_dropout_prob and caption[0] != null_length:
        # The model drops captions to its stored null caption, which needs captions of the same length.
        return [f"{null_length} caption tokens (its null caption's length) vs {caption[0]} in the data"]
    return []


def check_model_fits_data(config: Any, info: dict) -> None:
    """A one-line error listing every way ``config`` does not fit the data described by ``info``."""
    size = info.get("latent_size") or [info["resolution"]] * 2
    problems = []
    if config.in_channels != info["channels"]:
        problems.append(f"{config.in_channels} input channels vs {info['channels']} in the data")
    if list(config.latent_hw) != list(size):
        problems.append(f"input size {config.latent_hw} vs {tuple(size)} in the data")
    frames = info.get("num_frames")
    model_frames = family_of(config).frames
    if model_frames is not None and frames != model_frames:
        problems.append(f"{model_frames} frames vs {frames or 'no frames (images)'} in the data")
    elif model_frames is None and frames is not None:
        problems.append(f"an image model vs videos of {frames} frames in the data")
    problems += _conditioning_problems(config, info)
    if config.data_space != info["data_space"]:
        problems.append(f"a {config.data_space}-space model vs {info['data_space']} data")
    if problems:
        raise SparseditError(f"the model does not fit the data: {'; '.join(problems)}; pick matching --data/--image-size")
