"""`sparsedit flops --json` for every preset, pinned: a refactor of how MACs are counted must not move a number.

The golden file holds the JSON the command printed for every preset (DiT, SparseDiT, PixArt, SparsePixArt,
Latte, SparseLatte; 256 and 512 px; DDPM 250 and DDIM 50; SD3 / SD3.5 and FLUX.1, dense and sparse, at 1024 px over
a 28-step Euler run; Wan2.1-T2V-1.3B and its SparseWan at 480p, 81 frames, over a 50-step Euler run). MACs are integer counts, so the file is the same on
every machine. After a deliberate change of what is counted, regenerate it and explain the change in the commit:

    SPARSEDIT_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_flops_golden.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from sparsedit.cli import flops as flops_cmd
from sparsedit.cli.common import Parser
from sparsedit.families.dit.model import DIT_PRESETS
from sparsedit.families.latte.model import LATTE_PRESETS

GOLDEN = Path(__file__).parent / "golden" / "flops_presets.json"
PRESETS = [*DIT_PRESETS, *(f"Sparse{name}" for name in DIT_PRESETS), "PixArt-XL/2", "SparsePixArt-XL/2",
           *LATTE_PRESETS, "SparseLatte-XL/2"]
RUNS = [("256", "ddpm", "250"), ("512", "ddim", "50")]
# Flow-matching families (SD3, FLUX): the pipelines' Euler run at their native 1024 px.
FLOW_PRESETS = ["SD3-medium", "SD3.5-medium", "SD3.5-large", "SparseSD3-medium", "SparseSD3.5-medium",
                "SparseSD3.5-large", "FLUX.1-dev", "FLUX.1-schnell", "SparseFLUX.1-dev", "SparseFLUX.1-schnell"]
FLOW_RUNS = [("1024", "euler", "28")]
# Wan (video): the 1.3B at 480p (480 x 832), 81 frames, WanPipeline's 50 Euler steps.
VIDEO_FLOW_PRESETS = ["Wan2.1-T2V-1.3B", "SparseWan2.1-T2V-1.3B"]
VIDEO_FLOW_RUNS = [("480", "euler", "50")]


def measure(preset: str, size: str, sampler: str, steps: str) -> dict:
    parser = Parser(prog="sparsedit")
    flops_cmd.register(parser.add_subparsers(dest="command"))
    args: argparse.Namespace = parser.parse_args(["flops", "--model", preset, "--image-size", size, "--sampler", sampler,
                                                  "--steps", steps, "--json"])
    return json.loads(json.dumps(flops_cmd.measure(args)))  # exactly what --json prints


def current() -> dict[str, dict]:
    runs = ([(preset, run) for preset in PRESETS for run in RUNS] + [(p, run) for p in FLOW_PRESETS for run in FLOW_RUNS]
            + [(p, run) for p in VIDEO_FLOW_PRESETS for run in VIDEO_FLOW_RUNS])
    return {f"{preset} {size}px {sampler}{steps}": measure(preset, size, sampler, steps)
            for preset, (size, sampler, steps) in runs}


def test_flops_json_of_every_preset_is_unchanged() -> None:
    now = current()
    if os.environ.get("SPARSEDIT_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(now) == sorted(golden)
    changed = [key for key in golden if now[key] != golden[key]]
    assert not changed, f"flops --json changed for {len(changed)} runs, e.g. {changed[:3]}"
