"""Shared pytest fixtures: deterministic seeding and weight randomisation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import helpers


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def randomize() -> Callable[..., nn.Module]:
    """``randomize(module, std=0.2)``: overwrite every parameter with N(0, std^2), in place.

    Zero-initialised layers (adaLN-Zero, the output projection) would otherwise hide mapping errors.
    """
    return helpers.randomize


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-tensor tests on one intra-op thread (pool overhead dominates them).

    Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``; restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
