"""Tests for sparsedit.diffusion.process: schedule, forward process, posterior, losses, respacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from sparsedit.diffusion.process import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)
from sparsedit.errors import SparseditError

T = 1000


def np_alphas_cumprod(num_timesteps: int = T) -> np.ndarray:
    """Independent float64 numpy version of the DiT linear schedule's cumulative product."""
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------


def test_linear_betas_matches_numpy_and_scales_with_length() -> None:
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    short = linear_betas(250)
    assert short.numel() == 250
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)


def test_schedule_constants_match_numpy() -> None:
    d = GaussianDiffusion(linear_betas(T))
    acp = np_alphas_cumprod()
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), acp, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy(), np.concatenate([[1.0], acp[:-1]]), rtol=1e-12)
    assert d.num_timesteps == T
    assert d.timestep_map == list(range(T))


# ------------------------------------------------------------------------------------------------
# Forward process
# ------------------------------------------------------------------------------------------------


def test_q_sample_exact_with_given_noise() -> None:
    d = create_diffusion()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=gen)
    noise = torch.randn(6, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = d.q_sample(x0, t, noise)
    acp = np_alphas_cumprod()[t.numpy()].reshape(-1, 1, 1, 1)
    expected = np.sqrt(acp) * x0.double().numpy() + np.sqrt(1.0 - acp) * noise.double().numpy()
    assert xt.dtype == torch.float32
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_q_sample_statistics_match_closed_form() -> None:
    d = create_diffusion()
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for step in (0, 100, 600, 999):
        t = torch.full((n,), step, dtype=torch.long)
        xt = d.q_sample(x0, t, torch.randn(n, 1, generator=gen, dtype=torch.float64))
        acp = np_alphas_cumprod()[step]
        # 5 standard errors of the sample mean / variance
        assert abs(xt.mean().item() - math.sqrt(acp) * 0.7) < 5 * math.sqrt((1 - acp) / n)
        assert abs(xt.var().item() - (1 - acp)) < 5 * (1 - acp) * math.sqrt(2 / n)
    mean, var, log_var = d.q_mean_variance(x0[:2], torch.tensor([3, 3]))
    acp3 = np_alphas_cumprod()[3]
    assert torch.allclose(mean, torch.full_like(mean, math.sqrt(acp3) * 0.7))
    assert torch.allclose(var, torch.full_like(var, 1 - acp3))
    assert torch.allclose(log_var, torch.full_like(var, math.log(1 - acp3)))


def test_predict_xstart_from_eps_inverts_q_sample() -> None:
    d = create_diffusion()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 2, 3, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(8, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(0, T, (8,), generator=gen)
    xt = d.q_sample(x0, t, noise)
    assert torch.allclose(d.predict_xstart_from_eps(xt, t, noise), x0, rtol=0, atol=1e-9)
    assert torch.allclose(d.predict_eps_from_xstart(xt, t, x0), noise, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Posterior and model parameterisation
# ------------------------------------------------------------------------------------------------


def test_posterior_matches_gaussian_conjugacy_in_numpy() -> None:
    """q(x_{t-1}|x_t,x_0) from Bayes' rule: prior N(sqrt(acp_prev) x0, 1-acp_prev), likelihood N(sqrt(a) x, b)."""
    d = create_diffusion()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 50, 700, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)

    betas = np.linspace(1e-4, 0.02, T)
    acp = np.cumprod(1 - betas)
    tn = t.numpy()
    b, a, acp_prev = betas[tn], 1 - betas[tn], acp[tn - 1]
    precision = 1.0 / (1.0 - acp_prev) + a / b
    expected_var = (1.0 / precision).reshape(-1, 1, 1)
    expected_mean = expected_var * (
        (np.sqrt(acp_prev) / (1.0 - acp_prev)).reshape(-1, 1, 1) * x0.numpy()
        + (np.sqrt(a) / b).reshape(-1, 1, 1) * xt.numpy()
    )
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(expected_var, var.shape), rtol=1e-9)
    np.testing.assert_allclose(log_var.numpy(), np.log(np.broadcast_to(expected_var, var.shape)), rtol=1e-9)


def test_posterior_at_t0_returns_x0_and_clipped_log_variance() -> None:
    d = create_diffusion()
    x0 = torch.randn(2, 1, 4, dtype=torch.float64)
    xt = torch.randn(2, 1, 4, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.tensor([0, 0]))
    assert torch.allclose(mean, x0)
    assert torch.all(var == 0)
    assert torch.allclose(log_var, torch.full_like(log_var, math.log(d.posterior_variance[1].item())))


def test_p_mean_variance_learned_range_interpolates_log_variance() -> None:
    d = create_diffusion()
    gen = torch.Generator().manual_seed(4)
    xt = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 5, 999])
    betas = np.linspace(1e-4, 0.02, T)
    acp = np.cumprod(1 - betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_var[0] = post_var[1]
    lo = np.log(post_var[t.numpy()]).reshape(-1, 1, 1)
    hi = np.log(betas[t.numpy()]).reshape(-1, 1, 1)
    for v_value, expected in ((-1.0, lo), (1.0, hi), (0.0, 0.5 * (lo + hi))):
        out = d.p_mean_variance(torch.cat([eps, torch.full_like(eps, v_value)], dim=1), xt, t)
        np.testing.assert_allclose(out["log_variance"].numpy(), np.broadcast_to(expected, xt.shape), rtol=1e-10)
        np.testing.assert_allclose(out["variance"].numpy(), np.exp(np.broadcast_to(expected, xt.shape)), rtol=1e-10)
    x0_pred = d.predict_xstart_from_eps(xt, t, eps)
    assert torch.allclose(out["pred_xstart"], x0_pred)
    assert torch.equal(out["eps"], eps)
    assert torch.allclose(out["mean"], d.q_posterior_mean_variance(x0_pred, xt, t)[0])
    clipped = d.p_mean_variance(torch.cat([eps * 50, eps], dim=1), xt, t, clip_denoised=True)
    assert clipped["pred_xstart"].abs().max() <= 1.0


def test_p_mean_variance_fixed_large() -> None:
    d = create_diffusion(learn_sigma=False)
    xt = torch.randn(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 999])
    out = d.p_mean_variance(torch.randn(3, 2, 4, dtype=torch.float64), xt, t)
    betas = np.linspace(1e-4, 0.02, T)
    acp = np.cumprod(1 - betas)
    post_var_1 = betas[1] * (1 - acp[0]) / (1 - acp[1])
    expected = np.array([post_var_1, betas[1], betas[999]]).reshape(-1, 1, 1)
    np.testing.assert_allclose(out["variance"].numpy(), np.broadcast_to(expected, xt.shape), rtol=1e-10)


def test_model_output_channel_mismatch_is_a_clear_error() -> None:
    d = create_diffusion(learn_sigma=True)
    xt = torch.randn(2, 4, 3, 3)
    with pytest.raises(SparseditError, match="learn_sigma"):
        d.p_mean_variance(torch.randn(2, 4, 3, 3), xt, torch.tensor([1, 1]))
    with pytest.raises(SparseditError, match="learn_sigma"):
        create_diffusion(learn_sigma=False).p_mean_variance(torch.randn(2, 8, 3, 3), xt, torch.tensor([1, 1]))


# ------------------------------------------------------------------------------------------------
# Gaussian helpers
# ------------------------------------------------------------------------------------------------


def test_normal_kl_zero_for_equal_and_matches_closed_form() -> None:
    gen = torch.Generator().manual_seed(5)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=gen, dtype=torch.float64) for _ in range(4))
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(100, dtype=torch.float64), atol=1e-14)
    s1, s2 = np.exp(0.5 * lv1.numpy()), np.exp(0.5 * lv2.numpy())
    expected = np.log(s2 / s1) + (s1**2 + (m1.numpy() - m2.numpy()) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(normal_kl(m1, lv1, m2, lv2).numpy(), expected, rtol=1e-10)
    assert torch.all(normal_kl(m1, lv1, m2, lv2) >= 0)
    # python floats are accepted for the log-variances
    assert torch.allclose(normal_kl(m1, 0.0, m1, 0.0), torch.zeros_like(m1))


def test_approx_cdf_close_to_exact() -> None:
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    np.testing.assert_allclose(approx_standard_normal_cdf(x).numpy(), norm.cdf(x.numpy()), atol=5e-4)


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.3, math.log(0.01)), (-0.9, math.log(1.5))])
def test_discretized_likelihood_sums_to_one_over_bins(mean: float, log_scale: float) -> None:
    bins = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(
        bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale)
    )
    assert torch.all(log_p <= 1e-12)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # a narrow Gaussian puts most mass on the bin nearest to its mean
    if log_scale < 0:
        assert bins[log_p.argmax()].item() == pytest.approx(mean, abs=1.0 / 255 + 1e-9)


# ------------------------------------------------------------------------------------------------
# Training losses
# ------------------------------------------------------------------------------------------------


def _constant_model(output: torch.Tensor):
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return output

    return model_fn


def test_training_losses_random_outputs_finite_nonnegative() -> None:
    d = create_diffusion()
    gen = torch.Generator().manual_seed(6)
    b = 16
    x0 = torch.rand(b, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(b, 3, 4, 4, generator=gen)
    t = torch.cat([torch.zeros(4, dtype=torch.long), torch.randint(1, T, (b - 4,), generator=gen)])
    eps = torch.randn(b, 3, 4, 4, generator=gen)
    v = torch.rand(b, 3, 4, 4, generator=gen) * 2 - 1
    losses = d.training_losses(_constant_model(torch.cat([eps, v], 1)), x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb", "output"}
    assert torch.equal(losses.pop("output"), torch.cat([eps, v], 1))  # the model's prediction, as given
    for value in losses.values():
        assert value.shape == (b,)
        assert torch.isfinite(value).all()
    assert torch.all(losses["vb"] >= 0)
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"])
    assert torch.allclose(losses["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))


def test_vb_is_zero_for_true_posterior_and_positive_otherwise() -> None:
    """With eps = true noise the model mean equals the posterior mean; v = -1 gives the posterior variance."""
    d = create_diffusion()
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(6, 2, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    exact = d.training_losses(_constant_model(torch.cat([noise, -torch.ones_like(noise)], 1)), x0, t, noise=noise)
    assert torch.allclose(exact["vb"], torch.zeros(6, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(exact["mse"], torch.zeros(6, dtype=torch.float64))
    wrong_var = d.training_losses(_constant_model(torch.cat([noise, torch.ones_like(noise)], 1)), x0, t, noise=noise)
    # beta_t and the posterior variance converge for large t, so the excess KL shrinks with t
    assert torch.all(wrong_var["vb"] > 0) and torch.all(wrong_var["vb"][:4] > 1e-6)


def test_vb_at_t0_is_decoder_nll_in_bits() -> None:
    d = create_diffusion()
    x0 = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(1, 1, 256)
    noise = torch.randn(1, 1, 256, dtype=torch.float64)
    t = torch.tensor([0])
    out = torch.cat([noise, torch.zeros_like(noise)], 1)
    vb = d.training_losses(_constant_model(out), x0, t, noise=noise)["vb"]
    # true noise => predicted mean is exactly x0 at t == 0; the NLL is that of a centred bin
    log_scale = 0.5 * d.p_mean_variance(out, d.q_sample(x0, t, noise), t)["log_variance"]
    sigma = log_scale.exp()[0, 0, 0].item()
    interior = math.log(norm.cdf(1 / 255 / sigma) - norm.cdf(-1 / 255 / sigma))
    edge = math.log(norm.cdf(1 / 255 / sigma))
    expected_bits = -(254 * interior + 2 * edge) / 256 / math.log(2)
    assert vb.item() == pytest.approx(expected_bits, rel=2e-3)


def test_vb_gradient_only_reaches_v_and_mse_only_eps() -> None:
    d = create_diffusion()
    gen = torch.Generator().manual_seed(8)
    x0 = torch.rand(4, 3, 2, 2, generator=gen) * 2 - 1
    t = torch.tensor([0, 3, 400, 999])
    output = torch.randn(4, 6, 2, 2, generator=gen).requires_grad_(True)
    losses = d.training_losses(_constant_model(output), x0, t, noise=torch.randn(4, 3, 2, 2, generator=gen))
    losses["vb"].sum().backward(retain_graph=True)
    assert torch.all(output.grad[:, :3] == 0)
    assert torch.all(output.grad[:, 3:].abs().sum(dim=(1, 2, 3)) > 0)
    output.grad = None
    losses["mse"].sum().backward()
    assert torch.all(output.grad[:, 3:] == 0)
    assert torch.all(output.grad[:, :3].abs().sum(dim=(1, 2, 3)) > 0)


def test_fixed_variance_has_zero_vb() -> None:
    d = create_diffusion(learn_sigma=False)
    x0 = torch.randn(2, 3, 4)
    noise = torch.randn(2, 3, 4)
    eps = torch.randn(2, 3, 4)
    losses = d.training_losses(_constant_model(eps), x0, torch.tensor([0, 10]), noise=noise)
    assert torch.all(losses["vb"] == 0)
    assert torch.allclose(losses["loss"], ((noise - eps) ** 2).mean(dim=(1, 2)))


def test_training_losses_respaced_maps_timesteps_and_rescales_vb() -> None:
    base = create_diffusion()
    d = create_diffusion("ddim250")
    seen: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(9)
    output = torch.randn(3, 4, 5, generator=gen)

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        assert torch.equal(y, torch.tensor([7, 8, 9]))
        return output

    x0 = torch.rand(3, 2, 5, generator=gen) * 2 - 1
    noise = torch.randn(3, 2, 5, generator=gen)
    t = torch.tensor([0, 1, 249])
    losses = d.training_losses(model_fn, x0, t, model_kwargs={"y": torch.tensor([7, 8, 9])}, noise=noise)
    assert seen[0].tolist() == [0, 4, 996]
    xt = d.q_sample(x0, t, noise)
    unscaled = d.vb_terms_bpd(output, x0, xt, t)
    assert torch.allclose(losses["vb"], unscaled * 250 / 1000)
    # the respaced q_sample is the base q_sample at the original index
    assert torch.allclose(xt, base.q_sample(x0, torch.tensor([0, 4, 996]), noise))


# ------------------------------------------------------------------------------------------------
# Respacing
# ------------------------------------------------------------------------------------------------


def test_respace_reproduces_alphas_cumprod() -> None:
    base = create_diffusion()
    kept = space_timesteps(T, 37)
    d = base.respace(kept)
    assert d.num_timesteps == 37 and d.timestep_map == kept
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np_alphas_cumprod()[kept], rtol=1e-12)
    acp = np_alphas_cumprod()
    prev = np.concatenate([[1.0], acp[kept][:-1]])
    np.testing.assert_allclose(d.betas.numpy(), 1 - acp[kept] / prev, rtol=1e-10)
    # respacing twice composes the maps
    twice = d.respace([0, 5, 36])
    assert twice.timestep_map == [kept[0], kept[5], kept[36]]
    np.testing.assert_allclose(twice.alphas_cumprod.numpy(), acp[twice.timestep_map], rtol=1e-10)
    # keeping everything changes nothing
    same = base.respace(range(T))
    assert torch.allclose(same.betas, base.betas, rtol=1e-12)
    with pytest.raises(SparseditError):
        base.respace([])
    with pytest.raises(SparseditError):
        base.respace([0, 1000])


def test_space_timesteps_even() -> None:
    for spec in ("250", 250, " 250 "):
        steps = space_timesteps(T, spec)
        assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
        assert steps == sorted(set(steps))
    for n in (1, 2, 7, 25, 100, 333, 999, 1000):
        steps = space_timesteps(T, n)
        assert len(steps) == n
        # each step is the rounded fractional position i * (T - 1) / (n - 1)
        ideal = np.arange(n) * ((T - 1) / (n - 1) if n > 1 else 1.0)
        assert np.all(np.abs(np.array(steps) - ideal) <= 0.5 + 1e-6)
    assert space_timesteps(T, 1000) == list(range(1000))


def test_space_timesteps_sections_and_ddim() -> None:
    steps = space_timesteps(T, "10,15,20")
    assert len(steps) == 45
    # sections are [0, 334), [334, 667), [667, 1000)
    assert [s for s in steps if s < 334][0] == 0 and [s for s in steps if s < 334][-1] == 333
    assert len([s for s in steps if 334 <= s < 667]) == 15 and len([s for s in steps if s >= 667]) == 20
    assert steps[-1] == 999
    assert space_timesteps(T, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(T, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(T, "ddim1000") == list(range(1000))


@pytest.mark.parametrize(
    "spec", [0, "0", 1001, "1001", "abc", "", "ddim", "ddim0", "ddimx", "ddim300", "10,,5", "-3", 2.5]
)
def test_space_timesteps_bad_specs(spec: object) -> None:
    with pytest.raises(SparseditError) as info:
        space_timesteps(T, spec)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and len(message) > 20


def test_ddim_error_suggests_reachable_counts() -> None:
    with pytest.raises(SparseditError, match="ddim250 or ddim334"):
        space_timesteps(T, "ddim300")


def test_create_diffusion() -> None:
    for steps in (None, ""):
        d = create_diffusion(steps)
        assert d.num_timesteps == 1000 and d.learn_sigma
    d = create_diffusion("ddim50", learn_sigma=False)
    assert d.num_timesteps == 50 and not d.learn_sigma and d.timestep_map == list(range(0, 1000, 20))
    d = create_diffusion(100, num_train_timesteps=500)
    assert d.num_timesteps == 100 and d.timestep_map[-1] == 499
    with pytest.raises(SparseditError):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    with pytest.raises(SparseditError):
        GaussianDiffusion(torch.tensor([0.1, 0.2]), timestep_map=[0])
