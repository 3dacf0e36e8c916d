"""Ways to choose which coarse regions are split, besides the learned gate (baselines for the evidence table).

Every policy returns a `(batch_size, Nc)` bool split mask in raster order with exactly `round(fine_ratio * Nc)`
splits per image, or None for the learned gate. For fine-tuning, `uniform_density_split_mask` instead gives every
image its own uniformly random number of splits, taken in the order of a policy's scores (`policy_scores`).
"""

from typing import Literal, get_args

import torch


SplitPolicy = Literal["gate", "random", "centre", "all_coarse", "all_fine"]
SPLIT_POLICIES = get_args(SplitPolicy)


def centre_prior_order(coarse_grid: tuple[int, int]) -> torch.Tensor:
    """Regions sorted by distance of their centre to the image centre (ties in raster order): `(Nc,)` indices."""
    grid_h, grid_w = coarse_grid
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w) + 0.5 - grid_h / 2
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w) + 0.5 - grid_w / 2
    return torch.sort((rows**2 + cols**2).flatten(), stable=True).indices


def forced_split_mask(
    policy: str,
    batch_size: int,
    coarse_grid: tuple[int, int],
    fine_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The split mask a non-gate policy imposes (None for `"gate"`).

    `random` draws a fresh uniformly random set of regions per image (from `generator`), `centre` always splits the
    regions closest to the image centre (a fixed centre prior), `all_coarse` / `all_fine` split none / all.
    """
    if policy not in SPLIT_POLICIES:
        raise ValueError(f"Unknown split policy {policy!r}; choose from {SPLIT_POLICIES}.")
    if policy == "gate":
        return None
    num_coarse = coarse_grid[0] * coarse_grid[1]
    num_split = {"all_coarse": 0, "all_fine": num_coarse}.get(policy, round(fine_ratio * num_coarse))
    split_mask = torch.zeros(batch_size, num_coarse, dtype=torch.bool)
    if policy == "random":
        chosen = torch.rand(batch_size, num_coarse, generator=generator).argsort(dim=1)[:, :num_split]
    else:
        chosen = centre_prior_order(coarse_grid)[:num_split].expand(batch_size, -1)
    return split_mask.scatter(1, chosen, True)


def policy_scores(
    policy: str, batch_size: int, coarse_grid: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """`(batch_size, Nc)` scores whose order is the policy's preference: fresh uniform noise for `random`, minus the
    distance rank to the image centre for `centre`."""
    num_coarse = coarse_grid[0] * coarse_grid[1]
    if policy == "random":
        return torch.rand(batch_size, num_coarse, generator=generator)
    if policy == "centre":
        order = centre_prior_order(coarse_grid)
        rank = torch.empty(num_coarse).scatter_(0, order, torch.arange(num_coarse, dtype=torch.float32))
        return (-rank).expand(batch_size, -1)
    raise ValueError(f"policy_scores ranks the `random` and `centre` policies, got {policy!r}.")


def uniform_density_split_mask(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image splits its `k` highest-scoring regions, `k` uniform in `0 .. Nc` (a fine ratio uniform in [0, 1]):
    layouts of every density, so one fine-tuning serves every budget. Ties keep raster order. (The counterfactual
    objective's `sample_training_layouts` is the Hub-side near twin: `k = round(uniform * Nc)`, ties broken at
    random.)"""
    batch_size, num_coarse = scores.shape
    num_split = torch.randint(0, num_coarse + 1, (batch_size, 1), generator=generator)
    rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return rank < num_split
