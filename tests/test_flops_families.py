"""`sparsedit flops` for the PixArt-alpha and Latte families (presets, --layout, sparse schedules)."""

from __future__ import annotations

import json

import pytest

from sparsedit.cli import main
from sparsedit.diffusion.process import space_timesteps
from sparsedit.eval.flops import latte_macs, pixart_macs, sparse_pixart_macs
from sparsedit.families.latte.model import latte_config
from sparsedit.families.pixart.model import pixart_config
from sparsedit.families.pixart.sparse import SparsePixArtConfig


def flops_json(capsys, *args: str) -> dict:
    assert main(["flops", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_pixart_preset_is_the_analytic_count(capsys):
    out = flops_json(capsys, "--model", "PixArt-XL/2", "--image-size", "256")
    assert out["model_type"] == "PixArt" and out["layout"] is None
    assert out["gmacs"] == pytest.approx(pixart_macs(pixart_config(256)).total / 1e9)
    assert out["gmacs"] == pytest.approx(out["dense_gmacs"])


def test_sparse_pixart_mean_over_the_sampling_run(capsys):
    out = flops_json(capsys, "--model", "SparsePixArt-XL/2", "--image-size", "256", "--steps", "100")
    cfg = SparsePixArtConfig.from_pixart(pixart_config(256), "SparseDiT-XL")
    steps = space_timesteps(1000, "100")
    grids = cfg.schedule.grids_for_timesteps(steps, cfg.grid)
    expected = sum(sparse_pixart_macs(cfg, g).total for g in grids) / len(grids) / 1e9
    assert out["gmacs"] == pytest.approx(expected)
    assert out["dense_gmacs"] == pytest.approx(pixart_macs(pixart_config(256)).total / 1e9)
    assert sum(g["steps"] for g in out["grids"]) == 100


def test_latte_and_sparse_latte(capsys):
    dense = flops_json(capsys, "--model", "Latte-XL/2", "--image-size", "256")
    assert dense["gmacs"] == pytest.approx(latte_macs(latte_config("Latte-XL/2", 256)).total / 1e9)
    sparse = flops_json(capsys, "--model", "SparseLatte-XL/2", "--image-size", "256")
    assert sparse["layout"] == "2,4,2,2,2,0,2" and sparse["dense_gmacs"] == pytest.approx(dense["gmacs"])
    assert sparse["gmacs_min"] <= sparse["gmacs"] <= sparse["gmacs_max"] < dense["gmacs"]
    assert all("frames" in g for g in sparse["grids"])
    # --layout on the dense preset gives the same model as the sparse preset
    same = flops_json(capsys, "--model", "Latte-XL/2", "--image-size", "256", "--layout", "SparseLatte-XL",
                      "--r-min", "0.8", "--r-max", "0.93")
    assert same["gmacs"] == pytest.approx(sparse["gmacs"])


def test_rates_without_a_layout_are_refused(capsys):
    assert main(["flops", "--model", "PixArt-XL/2", "--r-min", "0.5"]) == 2
    assert "add --layout" in capsys.readouterr().err
