"""What defines a training run besides the model and the data: :class:`TrainSettings` and the recovery recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsedit.errors import SparseditError

__all__ = ["DEFAULT_RECIPE", "RECIPES", "TrainSettings", "describe_recipe"]


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
    lora_rank: int = 0  # > 0: train rank-r adapters on the blocks' linear layers (and the merges), not every weight
    lora_alpha: float = 0.0  # adapter scale alpha / r; 0 means alpha = r
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
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise SparseditError("--lora-rank and --lora-alpha must be >= 0 (rank 0 trains every weight)")
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
