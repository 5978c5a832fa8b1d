"""Flow matching (sparsedit.diffusion.flow) against hand computations and diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsedit.diffusion import flow
from sparsedit.errors import SparseditError


def test_noising_and_loss_follow_the_straight_path() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.noised(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    pred = torch.randn(3, 4, 5, 5, generator=g)
    by_hand = torch.stack([((pred[i] - (noise[i] - x0[i])) ** 2).mean() for i in range(3)])
    assert torch.allclose(flow.flow_loss(pred, x0, noise), by_hand)
    w = torch.tensor([1.0, 2.0, 0.5])
    assert torch.allclose(flow.flow_loss(pred, x0, noise, w), by_hand * w)
    assert torch.allclose(flow.flow_loss(noise - x0, x0, noise), torch.zeros(3))  # the exact velocity costs nothing


def test_shifts_and_resolution_mu() -> None:
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    assert torch.allclose(flow.exponential_shift(s, 1.15), math.exp(1.15) / (math.exp(1.15) + 1 / s - 1))
    assert flow.resolution_mu(256) == pytest.approx(0.5) and flow.resolution_mu(4096) == pytest.approx(1.15)
    assert flow.resolution_mu(4096 // 4) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)


def test_training_sigmas_are_logit_normal_by_default() -> None:
    g = torch.Generator().manual_seed(0)
    s = flow.sample_sigmas(200_000, g)
    logits = torch.log(s / (1 - s))
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1) < 0.01
    u = flow.sample_sigmas(200_000, g, scheme="uniform")
    assert abs(u.mean().item() - 0.5) < 0.005
    shifted = flow.sample_sigmas(1000, torch.Generator().manual_seed(1), scheme="uniform", shift=3.0)
    plain = flow.sample_sigmas(1000, torch.Generator().manual_seed(1), scheme="uniform")
    assert torch.allclose(shifted, flow.shift_sigmas(plain, 3.0))
    with pytest.raises(SparseditError, match="unknown sigma sampling 'cosine'"):
        flow.sample_sigmas(4, scheme="cosine")


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sd3_sigmas_equal_the_scheduler(steps: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3 / SD3.5 scheduler config
    sched.set_timesteps(steps)
    assert torch.allclose(flow.euler_sigmas(steps, shift=3.0), sched.sigmas.float(), atol=1e-6)


@pytest.mark.parametrize("steps, tokens", [(4, 256), (28, 4096)])
def test_flux_sigmas_equal_the_pipeline_and_scheduler(steps: int, tokens: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = flow.resolution_mu(tokens)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # what FluxPipeline passes
    assert torch.allclose(flow.euler_sigmas(steps, mu=mu), sched.sigmas.float(), atol=1e-6)


def test_euler_sampling_equals_the_scheduler_steps() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g) / 2

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # any smooth velocity field of x and t
        return torch.einsum("oc,bchw->bohw", weight, x) * (t / 1000)[:, None, None, None] - x

    noise = torch.randn(2, 4, 3, 3, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x = noise
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t.expand(2)), t, x).prev_sample
    ours = flow.euler_sample(model_fn, noise, flow.euler_sigmas(6, shift=3.0))
    assert torch.allclose(ours, x, atol=1e-5)


def test_euler_sampling_refuses_no_steps() -> None:
    with pytest.raises(SparseditError, match="at least one step"):
        flow.euler_sigmas(0)


def test_logit_normal_density_integrates_to_one_and_vanishes_at_the_ends() -> None:
    s = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    assert flow.logit_normal_density(s).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert flow.logit_normal_density(torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0]
    x = torch.tensor([0.3])
    by_hand = math.exp(-math.log(0.3 / 0.7) ** 2 / 2) / (math.sqrt(2 * math.pi) * 0.3 * 0.7)
    assert flow.logit_normal_density(x).item() == pytest.approx(by_hand, rel=1e-6)


def test_flow_process_training_loss_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([250, 800])
    seen = {}

    def model(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        seen["x"], seen["t"] = x, tt
        return 0.5 * x

    proc = flow.FlowProcess()
    out = proc.training_losses(model, x0, t, noise=noise)
    sigma = torch.tensor([0.25, 0.8])
    xt = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
    assert torch.allclose(seen["x"], xt) and seen["t"].tolist() == [250.0, 800.0]  # the model sees the steps
    mse = ((0.5 * xt - (noise - x0)) ** 2).flatten(1).mean(1)
    assert torch.allclose(out["mse"], mse)
    assert torch.allclose(out["loss"], mse * flow.logit_normal_density(sigma))
    assert torch.equal(out["vb"], torch.zeros(2))
    uniform = flow.FlowProcess(weighting="uniform").training_losses(model, x0, t, noise=noise)
    assert torch.allclose(uniform["loss"], mse)
    with pytest.raises(SparseditError, match="Min-SNR"):
        proc.min_snr_weight(t, 5.0)
