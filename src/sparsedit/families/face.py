"""The diffusers face of a sparsedit model: what every family's wrapper shares (see :mod:`sparsedit.interop`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError


class DiffusersFace(nn.Module):
    """What every wrapper shares: the wrapped model, a diffusers-style ``config``, ``dtype`` / ``device``,
    timestep batching and the output container.

    Subclasses name the sparsedit ``family`` they wrap, the ``pipelines`` whose transformer they replace,
    the ``checked_keys`` that must agree with the replaced transformer's config, and the config
    attributes beyond ``sample_size`` / ``in_channels`` / ``out_channels`` / ``patch_size`` (``extra_config``).
    """

    family: ClassVar[type[nn.Module]]
    pipelines: ClassVar[tuple[str, ...]]
    checked_keys: ClassVar[tuple[str, ...]] = ("sample_size", "in_channels", "out_channels")

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, self.family):
            raise SparseditError(
                f"{type(self).__name__} wraps a {self.family.__name__} (dense or sparse), not {type(model).__name__}"
            )
        cfg = model.config
        h, w = cfg.latent_hw
        if h != w:
            raise SparseditError(f"diffusers' {self.pipelines[0]} samples square latents; this model is {h}x{w}")
        self.model = model
        self.config = SimpleNamespace(sample_size=h, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                      patch_size=cfg.patch_size, **self.extra_config(model))

    def extra_config(self, model: Any) -> dict[str, Any]:
        return {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def batch_timesteps(timestep: Tensor | float | None, batch: int, device: torch.device) -> Tensor:
        """A Python number, a 0-d / (1,) tensor or a (B,) tensor -> (B,) timesteps on ``device``.

        The dtype is kept: a sparse model maps fractional (flow-matching) timesteps to its schedule itself.
        """
        if timestep is None:
            raise SparseditError("sparsedit models need the timestep; pass timestep= as diffusers pipelines do")
        t = torch.as_tensor(timestep, device=device).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise SparseditError(f"got {t.numel()} timesteps for a batch of {batch}; pass one or one per sample")
        return t

    @staticmethod
    def pack(out: Tensor, return_dict: bool) -> Any:
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
