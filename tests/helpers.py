"""Plain helpers shared by several test modules (``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Overwrite every parameter with N(0, std^2), in place; returns ``module``.

    Zero-initialised layers (adaLN-Zero, the output projection, W1) would otherwise hide mapping
    errors: random weights give non-trivial adaLN shift/scale/gate and non-zero biases.
    """
    for p in module.parameters():
        p.normal_(0.0, std)
    return module
