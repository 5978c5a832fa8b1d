"""`sparsedit bench` on flow-matching families: the timed run is the pipeline's Euler run, each step on its grid."""

from __future__ import annotations

import pytest

import helpers
from sparsedit.diffusion.flow import euler_sigmas
from sparsedit.errors import SparseditError
from sparsedit.eval.bench import BenchSettings, bench_pair
from sparsedit.families.sd3 import SD3, SD3Config, sparsify_sd3

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny() -> SD3:
    cfg = SD3Config(input_size=16, hidden_size=32, depth=4, num_heads=2, in_channels=4, caption_channels=16,
                    pooled_channels=8, pos_embed_max_size=8)
    return helpers.randomize(SD3(cfg), 0.1).eval()


def test_a_flow_pair_times_the_euler_run_on_each_steps_grid() -> None:
    dense = tiny()
    sparse = sparsify_sd3(dense, "0,1,1,1,1,0,1").eval()
    settings = BenchSettings(steps=4, repeats=1, run_repeats=1, warmup=0)
    result = bench_pair(dense, sparse, settings)
    assert result["settings"]["sampler"] == "euler"
    expected = sorted((euler_sigmas(4, shift=3.0)[:-1] * 1000).tolist(), reverse=True)
    assert result["settings"]["timesteps"] == pytest.approx(expected, rel=1e-6)
    grids = [sparse.config.schedule.grid(min(round(t), 999), sparse.config.grid) for t in expected]
    assert result["models"]["b"]["run_grids"][0]["grid"] == list(min(grids, key=lambda g: g[0] * g[1]))
    assert result["pair"]["flops_ratio"]["run"] > 1  # the sparse model costs less over the run


def test_a_ddpm_sampler_is_refused_for_a_flow_model() -> None:
    with pytest.raises(SparseditError) as err:
        bench_pair(tiny(), tiny(), BenchSettings(steps=2, repeats=1, run_repeats=1, warmup=0, sampler="ddim"))
    helpers.one_line(err, "samples with euler, not ddim", "--sampler euler")
