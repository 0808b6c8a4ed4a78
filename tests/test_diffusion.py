"""Diffusion math against closed forms."""

import math

import numpy as np
import pytest
import torch

from sdm.diffusion import (
    GaussianDiffusion,
    ModelPrediction,
    beta_schedule,
    discretized_gaussian_log_likelihood,
    normal_kl,
    spaced_steps,
)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True)


def test_linear_schedule_endpoints_and_cosine_bounds():
    b = beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    c = beta_schedule("cosine", 1000)
    assert c.max() <= 0.999 and np.all(np.diff(c) >= -1e-12)
    # cosine alpha_bar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2) / cos^2(s/(1+s) * pi/2)
    ab = np.cumprod(1 - c)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    assert ab[499] == pytest.approx(f(500 / 1000) / f(0), rel=1e-6)


def test_q_sample_statistics(diffusion):
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7, dtype=torch.float64)
    for step in (0, 250, 999):
        t = torch.full((x0.shape[0],), step, dtype=torch.long)
        xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
        ab = diffusion.alphas_cumprod[step]
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.05, abs=1e-4)


def test_posterior_matches_bayes_rule(diffusion):
    torch.manual_seed(1)
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    xt = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    for step in (1, 10, 500, 999):
        t = torch.full((4,), step, dtype=torch.long)
        mean, var, logvar = diffusion.q_posterior(x0, xt, t)
        beta, ab_prev = diffusion.betas[step], diffusion.alphas_cumprod[step - 1]
        # product of N(x_{t-1}; sqrt(ab_prev) x0, 1 - ab_prev) and N(x_t; sqrt(1 - beta) x_{t-1}, beta)
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        expected_mean = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * xt / beta) / precision
        torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-9)
        assert var[0, 0, 0, 0].item() == pytest.approx(1 / precision, rel=1e-9)
        assert logvar[0, 0, 0, 0].item() == pytest.approx(math.log(1 / precision), rel=1e-9)


def test_posterior_log_variance_is_clipped_at_t0(diffusion):
    assert diffusion.posterior_variance[0] == 0
    assert diffusion.posterior_log_variance_clipped[0] == pytest.approx(math.log(diffusion.posterior_variance[1]))


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(2)
    m1, m2 = torch.randn(100), torch.randn(100)
    lv1, lv2 = torch.randn(100), torch.randn(100)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-6


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in ((0.0, -2.0), (0.5, -4.0), (-0.9, -1.0)):
        ll = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-3)
        # an interior bin equals the normal mass on [x - 1/255, x + 1/255] (up to the tanh CDF approximation)
        i = 100
        normal = torch.distributions.Normal(mean, math.exp(log_scale))
        exact = normal.cdf(bins[i] + 1 / 255) - normal.cdf(bins[i] - 1 / 255)
        assert ll[i].exp().item() == pytest.approx(exact.item(), abs=2e-3)


def test_respaced_process_keeps_alphas_cumprod(diffusion):
    keep = spaced_steps(1000, 50)
    assert len(keep) == 50 and keep[0] == 0 and keep[-1] == 999
    d = diffusion.respaced(keep)
    np.testing.assert_allclose(d.alphas_cumprod, diffusion.alphas_cumprod[keep], rtol=1e-12)
    assert d.model_timesteps(torch.tensor([0, 49])).tolist() == [0.0, 999.0]
    # respacing onto every step is the identity
    np.testing.assert_allclose(diffusion.respaced(np.arange(1000)).betas, diffusion.betas, rtol=1e-12)


def test_learned_range_variance_interpolates_between_beta_and_beta_tilde(diffusion):
    x = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    t = torch.tensor([300])
    eps = torch.zeros_like(x)
    hi = diffusion.model_log_variance(ModelPrediction(eps, torch.ones_like(x)), t, x)
    lo = diffusion.model_log_variance(ModelPrediction(eps, -torch.ones_like(x)), t, x)
    mid = diffusion.model_log_variance(ModelPrediction(eps, torch.zeros_like(x)), t, x)
    assert hi[0, 0, 0, 0].item() == pytest.approx(math.log(diffusion.betas[300]))
    assert lo[0, 0, 0, 0].item() == pytest.approx(diffusion.posterior_log_variance_clipped[300])
    assert mid[0, 0, 0, 0].item() == pytest.approx((hi + lo)[0, 0, 0, 0].item() / 2)


def test_hybrid_loss_weights_and_vlb_does_not_train_the_mean(diffusion):
    torch.manual_seed(3)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 400])
    xt = diffusion.q_sample(x0, t, noise)
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(out, x0, xt, t, noise, lambda_vlb=0.001)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * 1000 * terms["vb"])
    terms["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0  # eps channels get no gradient from the bound
    assert out.grad[:, 3:].abs().max() > 0
    # at t = 0 the bound is the decoder NLL, at t > 0 the posterior KL
    assert terms["vb"][0] > 0 and terms["vb"][1] > 0


def test_spaced_steps_rejects_out_of_range():
    with pytest.raises(ValueError):
        spaced_steps(1000, 0)
    with pytest.raises(ValueError):
        spaced_steps(1000, 1001)
