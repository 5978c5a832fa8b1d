"""sparsedit: token sparsification for Diffusion Transformers (SparseDiT)."""

from __future__ import annotations

__version__ = "0.1.0"
