"""The diffusion process, its samplers and sampling helpers, apart from the models (which know nothing of diffusion)."""

from __future__ import annotations

from sparsedit.diffusion import process as _process
from sparsedit.diffusion.process import *  # noqa: F403  (the process is what `sparsedit.diffusion` always offered)

__all__ = list(_process.__all__)
