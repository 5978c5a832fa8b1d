"""What the flow-matching families (SD3, FLUX) share: Euler sampling runs on t = sigma * 1000, the rectified-flow
training process, and the pooled text vector beside the caption in every training forward."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from sparsedit.errors import SparseditError
from sparsedit.families.base import Family


class FlowFamily(Family):
    """A :class:`Family` of flow-matching text-to-image models; subclasses give their pipelines' sigmas."""

    samplers: ClassVar[tuple[str, ...]] = ("euler",)  # flow matching: t = sigma * 1000

    @property
    def text_conditioned(self) -> bool:
        return True

    def run_sigmas(self, steps: int) -> Tensor:
        """The ``steps + 1`` sigmas (ending at 0) of the family's pipeline run at this config's resolution."""
        raise NotImplementedError

    def sampling_timesteps(self, sampler: str, steps: int) -> list[float]:
        """The model timesteps ``sigma * 1000`` of a ``steps``-step Euler run (the final sigma 0 is no model call), in
        increasing order."""
        from sparsedit.diffusion.flow import T_SCALE

        if sampler not in self.samplers:
            raise SparseditError(f"a {self.dense_type} is a flow-matching model: it samples with euler (sigmas x 1000), "
                                 f"not {sampler}; use --sampler euler")
        return sorted(float(s) * T_SCALE for s in self.run_sigmas(steps)[:-1])

    def training_process(self) -> Any:
        from sparsedit.diffusion.flow import FlowProcess

        # Rectified flow with SD3's logit-normal(0, 1) sigma weighting (the published FLUX fine-tuning recipes use it
        # too); the resolution shift of FLUX's sampling is not applied to training.
        return FlowProcess(weighting="logit-normal")

    def training_kwargs(self, cond: dict[str, Any], caption: Tensor, device: torch.device) -> dict[str, Any]:
        pooled = cond.get("pooled_projections")
        if pooled is None:
            raise SparseditError(f"this {self.dense_type} also takes the pooled CLIP vector: each data item's conditions "
                                 f"need 'pooled_projections' (B, {self.config.pooled_channels}) beside "
                                 "'encoder_hidden_states'")
        return {"encoder_hidden_states": caption, "pooled_projections": pooled.to(device=device, dtype=caption.dtype)}
