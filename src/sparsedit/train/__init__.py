"""Training and fine-tuning: the :class:`Trainer`, its settings and recipes, datasets and distillation."""

from __future__ import annotations

from sparsedit.families.latte.sparse import VideoPiece, VideoPieceSampler, video_pieces
from sparsedit.train.trainer import (
    DEFAULT_RECIPE,
    RECIPES,
    StepBatchSampler,
    Trainer,
    TrainSettings,
    check_model_fits_data,
    describe_recipe,
    init_distributed,
    list_checkpoints,
    open_dataset,
    text_conditioned,
    timestep_sampler,
)

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES",
    "StepBatchSampler",
    "TrainSettings",
    "Trainer",
    "VideoPiece",
    "VideoPieceSampler",
    "check_model_fits_data",
    "describe_recipe",
    "init_distributed",
    "list_checkpoints",
    "open_dataset",
    "text_conditioned",
    "timestep_sampler",
    "video_pieces",
]
