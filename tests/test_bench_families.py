"""``sparsedit bench`` for PixArt-alpha and Latte (dense and sparse), on tiny models.

What is checked: the runner's guided evaluation equals the model's own ``forward_with_cfg``; every
step of a sampling run uses the schedule's tokens for its timestep (grid, and frames for video);
the analytic MACs in the result are the flops module's; presets resolve to the same configs as
``sparsedit flops``; tables and the CLI work on saved checkpoints. Nothing asserts on time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from sparsedit.cli import bench as bench_cmd
from sparsedit.cli.common import Parser
from sparsedit.core.checkpoint import build_model, save_pretrained
from sparsedit.core.layout import LAYOUTS
from sparsedit.errors import SparseditError
from sparsedit.eval.bench import (
    BenchSettings,
    ModelRunner,
    bench_pair,
    build_bench_model,
    format_markdown,
    run_timesteps,
)
from sparsedit.eval.flops import latte_macs, pixart_macs, sparse_latte_macs, sparse_pixart_macs
from sparsedit.families.latte.model import Latte, LatteConfig
from sparsedit.families.latte.sparse import SparseLatte, SparseLatteConfig
from sparsedit.families.pixart.model import PixArt, PixArtConfig
from sparsedit.families.pixart.sparse import SparsePixArt, SparsePixArtConfig
from sparsedit.families.presets import preset_config

pytestmark = pytest.mark.usefixtures("single_thread")

LAYOUT = dict(pool_blocks=1, num_sdtm=1, gen_blocks=1, sparse_blocks=1, recovery_blocks=1, dense_blocks=1,
              top_blocks=1)
PIXART = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=48, depth=6, num_heads=2, caption_channels=32,
              null_caption_length=8)
# Latte: depth 10 = the video SDTM layout "2,1,2,2,2,0,2" (pool 2, gen 2, sparse 2, recover 2, top 2).
LATTE = dict(input_size=8, num_frames=4, patch_size=2, in_channels=4, hidden_size=48, depth=10, num_heads=2,
             num_classes=5)
TEXT = dict(conditioning="text", caption_channels=32)


def light(**kw: Any) -> BenchSettings:
    base: dict[str, Any] = dict(steps=4, repeats=2, run_repeats=1, warmup=1)
    base.update(kw)
    return BenchSettings(**base)


def pixart_pair() -> tuple[PixArt, SparsePixArt]:
    return (build_bench_model(PixArtConfig(**PIXART)),
            build_bench_model(SparsePixArtConfig(**PIXART, **LAYOUT, r_min=0.3, r_max=0.9)))


def latte_pair(text: bool = False) -> tuple[Latte, SparseLatte]:
    extra = TEXT if text else {}
    return (build_bench_model(LatteConfig(**LATTE, **extra)),
            build_bench_model(SparseLatteConfig(**LATTE, **extra, num_sdtm=1, r_min=0.3, r_max=0.9)))


class TokenRecorder:
    """Forward pre-hook recording (timestep, grid, frames) of every model call."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[int, Any, Any]] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls.append((int(args[1][0]), kwargs.get("grid"), kwargs.get("frames")))


# ------------------------------------------------------------------------------------------------
# the guided evaluation is the model's own classifier-free guidance
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_mode", ["first3", "all"])
def test_pixart_runner_equals_forward_with_cfg(cfg_mode: str) -> None:
    _, model = pixart_pair()
    runner = ModelRunner(model, light(cfg_scale=4.5, cfg_mode=cfg_mode, batch_size=2))
    x, cond = runner.inputs(seed=3)
    t = torch.full((4,), 700)
    grid = runner.grid_at(700)
    text = cond["encoder_hidden_states"]
    assert text.shape == (4, 120, 32) and cond["encoder_attention_mask"].shape == (4, 120)
    # the unconditional half is the stored null caption (8 tokens) padded to 120 masked tokens
    torch.testing.assert_close(text[2:, :8], model.y_embedder.y_embedding[None].expand(2, -1, -1))
    assert cond["encoder_attention_mask"][2:, 8:].sum() == 0 and cond["encoder_attention_mask"][:2].all()
    with torch.inference_mode():
        ours = runner(x, t, cond, grid)
        ref = model.forward_with_cfg(x, t, text[:2], 4.5, encoder_attention_mask=cond["encoder_attention_mask"][:2],
                                     null_embeds=text[2:], null_attention_mask=cond["encoder_attention_mask"][2:],
                                     cfg_mode=cfg_mode)  # the model picks the same grid from t itself
    torch.testing.assert_close(ours, ref)


def test_latte_runner_equals_forward_with_cfg() -> None:
    _, model = latte_pair()
    runner = ModelRunner(model, light(cfg_scale=3.0, cfg_mode="all", batch_size=2))
    x, cond = runner.inputs(seed=1)
    assert x.shape == (4, 4, 4, 8, 8) and cond["y"][2:].eq(5).all()  # null class = num_classes
    t = torch.full((4,), 900)
    grid, frames = runner.grid_at(900)
    with torch.inference_mode():
        ours = runner(x, t, cond, (grid, frames))
        ref = model.forward_with_cfg(x, t, cond["y"][:2], 3.0, grid=grid, frames=frames)
    torch.testing.assert_close(ours, ref)


def test_guidance_without_a_null_class_is_refused() -> None:
    model = build_bench_model(LatteConfig(**{**LATTE, "num_classes": 0}))
    with pytest.raises(SparseditError, match="unconditional"):
        ModelRunner(model, light(cfg_scale=2.0))
    model = build_bench_model(LatteConfig(**LATTE, class_dropout_prob=0.0))
    with pytest.raises(SparseditError, match="null class"):
        ModelRunner(model, light(cfg_scale=2.0))
    ModelRunner(build_bench_model(LatteConfig(**LATTE, **TEXT)), light(cfg_scale=2.0))  # captions: always guidable


# ------------------------------------------------------------------------------------------------
# runs follow the schedule; MACs are the flops module's
# ------------------------------------------------------------------------------------------------


def test_pixart_pair_runs_every_step_on_its_scheduled_grid() -> None:
    a, b = pixart_pair()
    recorder = TokenRecorder(b)
    result = bench_pair(a, b, light(cfg_scale=2.0), names=("PixArt", "SparsePixArt"))
    sched, dense = b.config.schedule, b.config.grid
    assert recorder.calls and all(g == sched.grid(t, dense) for t, g, _ in recorder.calls)
    assert len({g for _, g, _ in recorder.calls}) >= 3
    ma, mb = result["models"]["a"], result["models"]["b"]
    assert (ma["model_type"], mb["model_type"]) == ("PixArt", "SparsePixArt")
    fwd_grid = sched.grid(500, dense)
    assert mb["forward_grid"] == list(fwd_grid)
    assert ma["forward_gmacs"] == pytest.approx(pixart_macs(a.config).gmacs)
    assert mb["forward_gmacs"] == pytest.approx(sparse_pixart_macs(b.config, fwd_grid).gmacs)
    timesteps = run_timesteps(4)
    expected = sum(sparse_pixart_macs(b.config, sched.grid(t, dense)).gmacs for t in timesteps) / len(timesteps)
    assert mb["gmacs"] == pytest.approx(expected) and result["pair"]["flops_ratio"]["run"] > 1


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_latte_pair_runs_every_step_on_its_scheduled_tokens(text: bool) -> None:
    a, b = latte_pair(text)
    recorder = TokenRecorder(b)
    result = bench_pair(a, b, light(steps=5), names=("Latte", "SparseLatte"))
    cfg = b.config
    assert recorder.calls and all((g, f) == cfg.tokens_at(t) for t, g, f in recorder.calls)
    assert len({(g, f) for _, g, f in recorder.calls}) >= 3
    ma, mb = result["models"]["a"], result["models"]["b"]
    assert ma["frames"] == 4 and (ma["forward_grid"], ma["forward_frames"]) == ([4, 4], 4)
    grid, frames = cfg.tokens_at(500)
    assert (mb["forward_grid"], mb["forward_frames"]) == (list(grid), frames)
    assert ma["forward_gmacs"] == pytest.approx(latte_macs(a.config).gmacs)
    assert mb["forward_gmacs"] == pytest.approx(sparse_latte_macs(cfg, grid, frames).gmacs)
    assert sum(entry["steps"] for entry in mb["run_grids"]) == 5 and all("frames" in e for e in mb["run_grids"])
    table = format_markdown(result)
    assert f"({grid[0]}x{grid[1]}x{frames}f)" in table and "token sets in run" in table


# ------------------------------------------------------------------------------------------------
# building: presets, cheap init of the position tables
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [PixArtConfig(**PIXART), LatteConfig(**LATTE)], ids=["pixart", "latte"])
def test_cheap_init_rebuilds_the_position_tables(config: Any) -> None:
    fast = build_bench_model(config)
    reference = build_model(config)  # built normally: the tables come from __init__
    torch.testing.assert_close(fast.pos_embed, reference.pos_embed)
    if isinstance(config, LatteConfig):
        torch.testing.assert_close(fast.temp_embed, reference.temp_embed)
    assert all(torch.isfinite(b).all() for b in fast.buffers())


def test_family_presets_resolve_like_flops() -> None:
    sparse = preset_config("SparsePixArt-XL/2", 256, r_min=0.5, r_max=0.8)
    assert isinstance(sparse, SparsePixArtConfig) and (sparse.r_min, sparse.r_max, sparse.grid) == (0.5, 0.8, (16, 16))
    assert sparse.layout == LAYOUTS["SparseDiT-XL"]  # the paper's XL layout, as for SparseDiT-XL/2
    assert type(preset_config("PixArt-XL/2", 256, r_min=0.5)) is PixArtConfig  # rates ignored for a dense preset
    video = preset_config("SparseLatte-XL/2", 256)
    assert isinstance(video, SparseLatteConfig) and (video.num_frames, video.grid) == (16, (16, 16))
    small = build_bench_model("Latte-S/8", image_size=128)
    assert type(small) is Latte and small.config.grid == (2, 2) and not small.training
    with pytest.raises(SparseditError, match="neither an existing checkpoint path nor a preset"):
        build_bench_model("PixArt-XXL/2")


# ------------------------------------------------------------------------------------------------
# the command on saved checkpoints
# ------------------------------------------------------------------------------------------------


def test_cli_benches_saved_pixart_and_latte(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    parser = Parser(prog="sparsedit")  # sparsedit's parser: one-line errors, post-parse checks
    bench_cmd.register(parser.add_subparsers(dest="command"))
    for name, pair in (("pixart", pixart_pair()), ("latte", latte_pair(text=True))):
        dense = save_pretrained(pair[0], tmp_path / f"{name}-dense")
        sparse = save_pretrained(pair[1], tmp_path / f"{name}-sparse")
        args = parser.parse_args(["bench", "--a", str(dense), "--b", str(sparse), "--device", "cpu", "--steps", "3",
                                  "--repeats", "1", "--run-repeats", "1", "--cfg-scale", "2", "--r-max", "0.95",
                                  "--json"])
        assert args.func(args) == 0
        result = json.loads(capsys.readouterr().out)
        mb = result["models"]["b"]
        assert mb["model_type"] == type(pair[1]).__name__ and mb["r_max"] == 0.95
        assert result["settings"]["rows_per_forward"] == 2 and result["pair"]["speedup"]["run"] > 0
