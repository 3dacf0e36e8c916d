import math

import pytest
import torch

from modeling_msvit import MSViTForImageClassification
from modeling_msvit.gate_losses import (
    MSViTGateLoss,
    batch_shaping_loss,
    cramer_von_mises,
    gaussian_cdf,
    generalized_batch_shaping_loss,
    relaxed_bernoulli_cdf,
)
from tests.conftest import STRAIGHT_THROUGH, tiny_config


def inverse_relaxed_bernoulli_cdf(q: torch.Tensor, mean: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid((torch.logit(q) + torch.logit(mean)) / temperature)


def test_relaxed_bernoulli_cdf_at_known_points():
    x = torch.tensor([0.1, 0.25, 0.5, 0.9])
    half, one, two = torch.tensor(0.5), torch.tensor(1.0), torch.tensor(2.0)
    torch.testing.assert_close(relaxed_bernoulli_cdf(x, half, one), x)  # mean 1/2, temperature 1: uniform
    # temperature 2: F(x) = x^2 / (x^2 + (1 - x)^2); at 1/4 that is 1/16 / (1/16 + 9/16) = 0.1
    torch.testing.assert_close(relaxed_bernoulli_cdf(torch.tensor(0.25), half, two), torch.tensor(0.1))
    for mean in (0.1, 0.3, 0.8):
        # P(X > 1/2) = 1 - F(1/2) = mean, whatever the temperature
        for temperature in (0.2, 1.0, 3.0):
            cdf = relaxed_bernoulli_cdf(torch.tensor(0.5), torch.tensor(mean), torch.tensor(temperature))
            torch.testing.assert_close(1 - cdf, torch.tensor(mean))


def test_probability_of_splitting_equals_the_prior_mean_by_sampling():
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(200_000, generator=generator)
    logistic = torch.log(uniform) - torch.log1p(-uniform)
    mean, temperature = torch.tensor(0.3), torch.tensor(0.5)
    samples = torch.sigmoid((torch.logit(mean) + logistic) / temperature)
    assert abs((samples > 0.5).float().mean().item() - 0.3) < 0.005
    empirical = (samples <= 0.2).float().mean()
    assert abs(empirical - relaxed_bernoulli_cdf(torch.tensor(0.2), mean, temperature)) < 0.005


def test_cramer_von_mises_by_hand():
    samples = torch.tensor([0.9, 0.1, 0.5])  # sorted: 0.1, 0.5, 0.9 against the uniform CDF F(x) = x
    expected = ((0.25 - 0.1) ** 2 + (0.5 - 0.5) ** 2 + (0.75 - 0.9) ** 2) / 3
    torch.testing.assert_close(cramer_von_mises(samples, lambda x: x), torch.tensor(expected))


def test_gaussian_cdf():
    torch.testing.assert_close(gaussian_cdf(torch.tensor(0.5), 0.5, 0.2), torch.tensor(0.5))
    torch.testing.assert_close(gaussian_cdf(torch.tensor(0.7), 0.5, 0.2), torch.tensor(0.8413447), atol=1e-6, rtol=0)


def test_losses_vanish_when_the_batch_matches_the_prior_and_grow_otherwise():
    batch = 9
    quantiles = torch.arange(1, batch + 1) / (batch + 1)
    means = torch.tensor([0.2, 0.4, 0.6, 0.8])
    temperatures = torch.tensor([1.0, 1.0, 1.5, 0.7])  # all matched values stay inside the [1e-3, 1 - 1e-3] clip
    matched = inverse_relaxed_bernoulli_cdf(quantiles[:, None], means, temperatures)  # (B, Nc)
    assert generalized_batch_shaping_loss(matched, means, temperatures) < 1e-12
    shifted = (matched + 0.05).clamp(max=0.99)
    assert generalized_batch_shaping_loss(shifted, means, temperatures) > 1e-4
    # the same values, each position under another position's prior, fit worse
    assert generalized_batch_shaping_loss(matched, means.flip(0), temperatures.flip(0)) > 1e-3

    shared = inverse_relaxed_bernoulli_cdf(torch.arange(1, 37) / 37, torch.tensor(0.3), torch.tensor(1.0))
    assert batch_shaping_loss(shared.reshape(9, 4), 0.3, 1.0) < 1e-12
    assert batch_shaping_loss(shared.reshape(9, 4), 0.6, 1.0) > 1e-3


@pytest.mark.parametrize("loss_type", ["gbas", "bas", "ratio"])
def test_gradients_are_finite_at_exactly_zero_and_one(loss_type):
    criterion = MSViTGateLoss(tiny_config(gate_loss_type=loss_type, **STRAIGHT_THROUGH))
    split_soft = torch.tensor([[0.0, 1.0] * 8, [1.0, 0.0] * 8, [0.5] * 16], requires_grad=True)
    loss = criterion(split_soft)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(split_soft.grad).all()
    for parameter in criterion.parameters():
        if parameter.requires_grad:
            assert torch.isfinite(parameter.grad).all()


def test_gbas_total_is_data_plus_hyperprior_plus_temperature_terms():
    config = tiny_config(
        target_fine_ratio=0.25, gbas_hyperprior_weight=2.0, gbas_temperature_weight=0.1, **STRAIGHT_THROUGH
    )
    model = MSViTForImageClassification(config)
    criterion = model.msvit.gate_criterion
    # initialised at the target, with the configured prior temperature and hyperprior std
    torch.testing.assert_close(criterion.prior_means, torch.full((16,), 0.25))
    torch.testing.assert_close(criterion.prior_temperatures, torch.full((16,), 0.5))
    torch.testing.assert_close(criterion.hyperprior_log_std.exp(), torch.tensor([0.2]))
    assert not criterion.hyperprior_log_std.requires_grad

    split_soft = torch.rand(6, 16)
    data = generalized_batch_shaping_loss(split_soft, criterion.prior_means, criterion.prior_temperatures)
    # all 16 means equal the target, where the hyperprior CDF is 1/2: mean_i (i/17 - 1/2)^2
    hyperprior = sum((i / 17 - 0.5) ** 2 for i in range(1, 17)) / 16
    expected = data + 2.0 * hyperprior + 0.1 * 0.5
    torch.testing.assert_close(criterion(split_soft), expected)


def test_gbas_priors_learn_in_training_and_are_saved(tmp_path, pixel_values):
    model = MSViTForImageClassification(tiny_config(gbas_hyperprior_learnable=True, **STRAIGHT_THROUGH)).train()
    criterion = model.msvit.gate_criterion
    with torch.no_grad():  # spread the means: at init they all sit at the hyperprior's median, where its std is moot
        criterion.prior_mean_logits.add_(torch.linspace(-1, 1, 16))
    outputs = model(pixel_values, labels=torch.arange(8) % 5)
    outputs.loss.backward()
    for parameter in (criterion.prior_mean_logits, criterion.prior_log_temperatures, criterion.hyperprior_log_std):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    reloaded = MSViTForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.msvit.gate_criterion.prior_means, criterion.prior_means)


def test_gbas_needs_the_configured_grid():
    criterion = MSViTGateLoss(tiny_config(**STRAIGHT_THROUGH))
    with pytest.raises(ValueError, match="one prior per coarse position"):
        criterion(torch.rand(4, 24))
    assert math.isfinite(MSViTGateLoss(tiny_config(gate_loss_type="bas"))(torch.rand(4, 24)).item())
