"""`sparsedit bench` on flow-matching families (SD3, FLUX.1, Wan): the timed run is the pipeline's Euler run, each step
on its grid, and a compiled pair compiles once per token set."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import helpers
from sparsedit.diffusion.flow import euler_sigmas
from sparsedit.errors import SparseditError
from sparsedit.eval.bench import BenchSettings, bench_pair
from sparsedit.families import family_of
from sparsedit.families.flux import Flux, FluxConfig, sparsify_flux
from sparsedit.families.sd3 import SD3, SD3Config, sparsify_sd3
from sparsedit.families.wan import Wan, WanConfig, sparsify_wan

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


def tiny_flux() -> Flux:
    cfg = FluxConfig(input_size=16, in_channels=4, hidden_size=32, depth_double=2, depth_single=2, num_heads=2,
                     axes_dims_rope=(4, 6, 6), caption_channels=16, pooled_channels=8, guidance_embeds=True,
                     max_sequence_length=7)
    return helpers.randomize(Flux(cfg), 0.1).eval()


def tiny_wan() -> Wan:
    cfg = WanConfig(input_size=(8, 12), num_frames=4, in_channels=4, out_channels=4, hidden_size=32, depth=4,
                    num_heads=2, ffn_dim=40, caption_channels=16, freq_dim=32, rope_max_seq_len=32,
                    max_sequence_length=7)
    return helpers.randomize(Wan(cfg), 0.1).eval()


def sparse_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = {"sd3": tiny, "flux": tiny_flux, "wan": tiny_wan}[family]()
    sparsify = {"sd3": sparsify_sd3, "flux": sparsify_flux, "wan": sparsify_wan}[family]
    return dense, sparsify(dense, "0,1,1,1,1,0,1").eval()


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_compiled_flow_pairs_keep_one_graph_per_grid(family: str) -> None:
    """`bench --compile` on SD3 / FLUX / Wan pairs: a counting backend (no code generation) sees one graph for the
    dense model and one per distinct sparse token set of the Euler run, all compiled in the warm-up (no recompiles
    while timed)."""
    torch._dynamo.reset()
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    dense, sparse = sparse_pair(family)
    steps = 4
    fam = family_of(sparse)
    grids = {fam.tokens_at(t) for t in fam.sampling_timesteps("euler", steps)}
    assert len(grids) > 1  # the run crosses grids: a recompile per step would show
    at_warmup: list[int] = []

    def log(msg: str) -> None:
        if msg.startswith("forward"):
            at_warmup.append(len(graphs))

    settings = BenchSettings(steps=steps, repeats=1, run_repeats=1, warmup=1, compile=True, forward_t=500,
                             compile_backend=counting_backend)
    bench_pair(dense, sparse, settings, log=log)
    forward_grid = {fam.tokens_at(500)}
    assert len(graphs) == 1 + len(grids | forward_grid)
    assert at_warmup == [len(graphs)]  # nothing compiled after the warm-up
    torch._dynamo.reset()
