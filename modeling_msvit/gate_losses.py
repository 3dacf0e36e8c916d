# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""How a learned gate trains: the paper's compute-budget losses (straight-through objective) and the counterfactual
region-flip objective.

**Counterfactual objective.** The value of splitting region `j` of an image is measurable directly: the drop of the
task loss when `j` is split instead of kept, all other regions fixed. A training step samples a layout per image
(`sample_training_layouts`: a random density, then uniformly random regions or the gate's own ranking), picks regions
to flip (`sample_flips`), runs the flipped layouts once more without gradients, and regresses each flipped region's
split logit on `scale * loss drop` (`counterfactual_regression_loss`). The layout's own forward pass is shared by
all its flips.

**Straight-through objective** (the paper's). All budget losses take `split_soft` of shape `(B, Nc)`: the relaxed
(Gumbel-sigmoid) split value of every coarse region in a batch, in (0, 1). With more than two patch sizes `Nc` reads
`D`, every decision of the region tree (`mixed_scale_tokens`), and a "region" any of its nodes. They shape the
*distribution* of these values, not only their mean:

* **batch-shaping (BaS)**: the Cramér–von Mises distance between the empirical distribution of all `B * Nc` values
  and one shared prior;
* **generalized batch-shaping (gBaS)**, the paper's loss: one prior per coarse position `k`, a Relaxed-Bernoulli
  with learned mean `mu_k` and temperature `tau_k`, each compared with that position's `B` values; a Gaussian
  hyperprior centred on the target fine ratio, compared with the set `{mu_k}` by the same criterion; and an L1 term on
  `{tau_k}` that favours peaky (nearly binary) priors;
* **ratio**: `(mean split value - target) ** 2`.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from .mixed_scale_tokens import ScaleTree, build_scale_tree, ranked_split_mask


CDF_CLIP = 1e-3


def relaxed_bernoulli_cdf(x: torch.Tensor, mean: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """CDF of a Relaxed-Bernoulli (binary Concrete) variable, `sigmoid(temperature * logit(x) - logit(mean))`.

    `X = sigmoid((logit(mean) + L) / temperature)` with `L` standard logistic, so `P(X > 1/2) = mean`, and a small
    temperature concentrates the mass near 0 and 1. `x` is clipped to `[1e-3, 1 - 1e-3]`, which keeps the loss and
    its gradient finite at exactly 0 and 1.
    """
    x = x.clamp(CDF_CLIP, 1 - CDF_CLIP)
    return torch.sigmoid(temperature * torch.logit(x) - torch.logit(mean))


def gaussian_cdf(x: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf((x - mean) / (std * math.sqrt(2.0))))


def cramer_von_mises(samples: torch.Tensor, cdf: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Cramér–von Mises criterion along the last dimension: `mean_i (i / (N + 1) - F(x_(i))) ** 2`.

    `samples` is `(..., N)`; each row is sorted, `x_(i)` is its `i`-th smallest value (`i = 1..N`) and `F = cdf`
    is applied elementwise (it may broadcast over the leading dimensions). Returns `(...)`.
    """
    sorted_samples = samples.sort(dim=-1).values
    num_samples = samples.shape[-1]
    empirical = torch.arange(1, num_samples + 1, device=samples.device, dtype=samples.dtype) / (num_samples + 1)
    return ((empirical - cdf(sorted_samples)) ** 2).mean(-1)


def ratio_loss(split_soft: torch.Tensor, target_fine_ratio: float) -> torch.Tensor:
    """`(mean soft split value - target) ** 2` over the batch and all regions."""
    return (split_soft.mean() - target_fine_ratio) ** 2


def batch_shaping_loss(split_soft: torch.Tensor, mean: float, temperature: float) -> torch.Tensor:
    """BaS: all `B * Nc` values against one shared Relaxed-Bernoulli prior."""
    mean_t = split_soft.new_tensor(mean)
    temperature_t = split_soft.new_tensor(temperature)
    return cramer_von_mises(split_soft.flatten(), lambda x: relaxed_bernoulli_cdf(x, mean_t, temperature_t))


def generalized_batch_shaping_loss(
    split_soft: torch.Tensor, prior_means: torch.Tensor, prior_temperatures: torch.Tensor
) -> torch.Tensor:
    """gBaS data term: position `k`'s `B` values against its own prior `(mu_k, tau_k)`, averaged over positions.

    `split_soft` is `(B, Nc)`; `prior_means` and `prior_temperatures` are `(Nc,)`.
    """
    per_position = cramer_von_mises(
        split_soft.transpose(0, 1),
        lambda x: relaxed_bernoulli_cdf(x, prior_means[:, None], prior_temperatures[:, None]),
    )
    return per_position.mean()


def sample_training_layouts(split_logits: torch.Tensor, mode: str, tree: ScaleTree) -> torch.Tensor:
    """Training layouts `(B, D)` bool for the counterfactual objective.

    Each image gets a fine ratio uniform in [0, 1] (so the gate learns the value of a region in sparse and in dense
    layouts alike, and one training serves every budget) and splits that many regions: those with the highest
    `split_logits` (`"gate"`: exactly the layouts the gate chooses at a fixed budget, so a backbone fine-tuned
    alongside learns to read them) or uniformly random ones (`"uniform"`). Ties are broken at random. Exploration
    comes from the random densities and the random flips, not from noise on the ranking: the logits are loss drops
    of a few hundredths of a nat, which any fixed-scale noise would drown. No gradient flows. With more than two patch
    sizes the regions are taken top-down in that order (`top_down_key`): each layout splits exactly that many, every
    one under a split parent.
    """
    batch_size, num_decisions = split_logits.shape
    num_split = torch.round(torch.rand(batch_size, 1, device=split_logits.device) * num_decisions)
    scores = split_logits.detach().float() if mode == "gate" else torch.zeros_like(split_logits, dtype=torch.float32)
    shuffle = torch.rand_like(scores).argsort(dim=1)  # a random order among equal scores
    order = shuffle.gather(1, scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))
    place = order.argsort(dim=1)  # each region's place in the order
    return ranked_split_mask(-place.float(), num_split, tree)


def sample_flips(reachable: torch.Tensor, num_flips: int, guaranteed: int) -> torch.Tensor:
    """`(B, K)` distinct random decisions per image to flip, among those that count (`reachable` `(B, D)`: every
    region with two patch sizes, the roots and the children of split regions with more). `K = min(num_flips,
    guaranteed)`, `guaranteed` the decisions that count in every layout (the roots)."""
    num_flips = min(num_flips, guaranteed)
    scores = torch.rand(reachable.shape, device=reachable.device).masked_fill(~reachable, 2.0)
    return scores.argsort(dim=1)[:, :num_flips]


def flipped_layouts(split_mask: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """`(B * K, D)` layouts: image `b`'s layout with decision `flips[b, k]` flipped, in `(b, k)` order. Flipping a
    split region to kept leaves its descendants' marks, which then no longer count (`close_splits`)."""
    flip = torch.zeros(*flips.shape, split_mask.shape[1], dtype=torch.bool, device=split_mask.device)
    flip.scatter_(2, flips[..., None], True)
    return (split_mask[:, None, :] ^ flip).flatten(0, 1)


def split_loss_drop(
    split_mask: torch.Tensor, flips: torch.Tensor, layout_losses: torch.Tensor, flipped_losses: torch.Tensor
) -> torch.Tensor:
    """Loss drop of splitting each flipped region, `loss(region kept) - loss(region split)`: `(B, K)`.

    `layout_losses` `(B,)` are the per-image losses of the sampled layouts, `flipped_losses` `(B, K)` those of the
    flipped layouts (`flipped_layouts` order)."""
    was_split = split_mask.gather(1, flips)
    layout_losses = layout_losses[:, None]
    return torch.where(was_split, flipped_losses - layout_losses, layout_losses - flipped_losses)


def counterfactual_regression_loss(
    predicted_logits: torch.Tensor, loss_drop: torch.Tensor, target_scale: float
) -> torch.Tensor:
    """Mean squared error of the flipped regions' split logits `(B, K)` against `target_scale * loss_drop`."""
    return ((predicted_logits.float() - target_scale * loss_drop.detach().float()) ** 2).mean()


class MSViTGateLoss(nn.Module):
    """The straight-through objective's budget loss selected by `config.gate_loss_type`, holding gBaS's learnable
    priors (one per coarse position; only under that objective, the only one that uses them).

    Returns the unweighted loss; the heads add `config.gate_loss_weight` times it to the task loss.
    """

    def __init__(self, config):
        super().__init__()
        self.loss_type = config.gate_loss_type
        uses_priors = config.gate_objective == "straight_through" and config.gate_type == "learned"
        self.target = config.target_fine_ratio
        self.prior_temperature = config.gate_prior_temperature
        self.hyperprior_weight = config.gbas_hyperprior_weight
        self.temperature_weight = config.gbas_temperature_weight
        # one prior per decision of the configured image size's region tree (per coarse region with two sizes)
        self.num_coarse = build_scale_tree(config.fine_grid_size, config.scale_ratio, config.num_scales).num_decisions
        if self.loss_type == "gbas" and uses_priors:
            # stored as logit(mu_k) and log(tau_k): unconstrained parameters for valid priors
            self.prior_mean_logits = nn.Parameter(torch.zeros(self.num_coarse))
            self.prior_log_temperatures = nn.Parameter(torch.zeros(self.num_coarse))
            # shape (1,), not a scalar: FSDP2 cannot shard 0-d parameters
            self.hyperprior_log_std = nn.Parameter(torch.zeros(1), requires_grad=config.gbas_hyperprior_learnable)

    @property
    def prior_means(self) -> torch.Tensor:
        return torch.sigmoid(self.prior_mean_logits)

    @property
    def prior_temperatures(self) -> torch.Tensor:
        return self.prior_log_temperatures.exp()

    def forward(self, split_soft: torch.Tensor) -> torch.Tensor:
        split_soft = split_soft.float()
        if self.loss_type == "ratio":
            return ratio_loss(split_soft, self.target)
        if self.loss_type == "bas":
            return batch_shaping_loss(split_soft, self.target, self.prior_temperature)
        if split_soft.shape[1] != self.num_coarse:
            raise ValueError(
                f"gBaS holds one prior per coarse position of the configured image size ({self.num_coarse} regions) "
                f"but got {split_soft.shape[1]} regions; train at the configured image size or use "
                "gate_loss_type='bas' or 'ratio'."
            )
        means, temperatures = self.prior_means, self.prior_temperatures
        data_term = generalized_batch_shaping_loss(split_soft, means, temperatures)
        std = self.hyperprior_log_std.exp()
        hyperprior_term = cramer_von_mises(means, lambda x: gaussian_cdf(x, self.target, std))
        return data_term + self.hyperprior_weight * hyperprior_term + self.temperature_weight * temperatures.mean()


__all__ = [
    "MSViTGateLoss",
    "batch_shaping_loss",
    "counterfactual_regression_loss",
    "cramer_von_mises",
    "flipped_layouts",
    "gaussian_cdf",
    "generalized_batch_shaping_loss",
    "ratio_loss",
    "relaxed_bernoulli_cdf",
    "sample_flips",
    "sample_training_layouts",
    "split_loss_drop",
]
