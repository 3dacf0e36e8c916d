"""Ways to choose which regions are split, besides the learned gate (baselines for the evidence table).

Every policy returns a `(batch_size, D)` bool split mask over the decisions of a `ScaleTree` (the coarse regions in
raster order with two patch sizes) with exactly `round(fine_ratio * D)` splits per image, taken top-down in the order
of its scores (`top_down_key`: a region only under a split parent), or None for the learned gate. For fine-tuning,
`uniform_density_split_mask` instead gives every image its own uniformly random number of splits, taken in the order
of a policy's scores (`policy_scores`).
"""

from typing import Literal, get_args

import torch

from modeling_msvit.mixed_scale_tokens import ScaleTree, budget_split_mask, build_scale_tree, ranked_split_mask


SplitPolicy = Literal["gate", "random", "centre", "all_coarse", "all_fine"]
SPLIT_POLICIES = get_args(SplitPolicy)


def image_tree(config, pixel_values: torch.Tensor) -> ScaleTree:
    """The `ScaleTree` of an MSViT config at the size of `(B, C, H, W)` images, on the CPU (where masks are built)."""
    height, width = pixel_values.shape[-2:]
    fine_grid = (height // config.patch_size, width // config.patch_size)
    return build_scale_tree(fine_grid, config.scale_ratio, config.num_scales)


def centre_prior_order(tree: ScaleTree) -> torch.Tensor:
    """Decisions sorted by distance of their region's centre to the image centre (ties in decision order, so a parent
    before its children): `(D,)` indices."""
    boxes = tree.candidate_boxes()[: tree.num_decisions].to(torch.float64)
    fine_rows, fine_columns = tree.fine_grid
    rows = boxes[:, 0] + boxes[:, 2] / 2 - fine_rows / 2
    columns = boxes[:, 1] + boxes[:, 2] / 2 - fine_columns / 2
    return torch.sort(rows**2 + columns**2, stable=True).indices


def policy_scores(
    policy: str, batch_size: int, tree: ScaleTree, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`(batch_size, D)` scores whose order is the policy's preference: fresh uniform noise for `random`, minus the
    distance rank to the image centre for `centre`."""
    num_decisions = tree.num_decisions
    if policy == "random":
        return torch.rand(batch_size, num_decisions, generator=generator)
    if policy == "centre":
        rank = torch.empty(num_decisions).scatter_(
            0, centre_prior_order(tree), torch.arange(num_decisions, dtype=torch.float32)
        )
        return (-rank).expand(batch_size, -1)
    raise ValueError(f"policy_scores ranks the `random` and `centre` policies, got {policy!r}.")


def forced_split_mask(
    policy: str,
    batch_size: int,
    tree: ScaleTree,
    fine_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The split mask a non-gate policy imposes (None for `"gate"`).

    `random` draws a fresh uniformly random order of the regions per image (from `generator`), `centre` always
    splits the regions closest to the image centre (a fixed centre prior), `all_coarse` / `all_fine` split none / all.
    """
    if policy not in SPLIT_POLICIES:
        raise ValueError(f"Unknown split policy {policy!r}; choose from {SPLIT_POLICIES}.")
    if policy == "gate":
        return None
    num_decisions = tree.num_decisions
    if policy in ("all_coarse", "all_fine"):
        return torch.full((batch_size, num_decisions), policy == "all_fine")
    scores = policy_scores(policy, batch_size, tree, generator)
    if policy == "random":  # the lowest draws first: the regions every earlier version of this policy drew
        scores = -scores
    return budget_split_mask(scores, round(fine_ratio * num_decisions), tree)


def uniform_density_split_mask(
    scores: torch.Tensor, tree: ScaleTree, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each image splits its `k` highest-scoring regions top-down, `k` uniform in `0 .. D` (a fine ratio uniform in
    [0, 1]): layouts of every density, so one fine-tuning serves every budget. Ties keep decision order. (The
    counterfactual objective's `sample_training_layouts` is the Hub-side near twin: `k = round(uniform * D)`, ties
    broken at random.)"""
    batch_size, num_decisions = scores.shape
    num_split = torch.randint(0, num_decisions + 1, (batch_size, 1), generator=generator)
    return ranked_split_mask(scores, num_split, tree)
