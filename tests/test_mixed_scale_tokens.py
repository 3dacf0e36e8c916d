import pytest
import torch
from torch.nn import functional as F

from modeling_msvit.mixed_scale_tokens import (
    budget_split_mask,
    build_scale_tree,
    by_decision,
    candidate_active_mask,
    candidate_mask_values,
    close_splits,
    gathered_token_index,
    grid_patches,
    grid_positions,
    level_images,
    level_regions,
    patchify,
    region_neighbourhoods,
    token_counts,
    token_sizes,
    tokens_to_grid,
    topk_split_mask,
)


def candidate_patches(pixels: torch.Tensor, patch_size: int, tree) -> torch.Tensor:
    return grid_patches(level_images(pixels, tree, patch_size), tree, patch_size)[:, tree.grid_row]


def test_patchify_matches_strided_convolution():
    pixels = torch.randn(2, 3, 12, 8)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    expected = conv(pixels).flatten(2).transpose(1, 2)
    actual = F.linear(patchify(pixels, 4), conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_region_neighbourhoods_by_hand():
    # one channel, r = 2, p = 1: a 4x6 image is a 2x3 grid of coarse regions, each downscaled to one value
    pixels = torch.arange(24.0).reshape(1, 1, 4, 6)
    tree = build_scale_tree((4, 6), 2, 2)
    regions = F.avg_pool2d(pixels, 2)[0, 0]  # [[3.5, 5.5, 7.5], [15.5, 17.5, 19.5]]
    (neighbourhoods,) = region_neighbourhoods(level_images(pixels, tree, 1), tree, patch_size=1)
    assert neighbourhoods.shape == (1, 6, 9)
    # region (0, 0): its 3x3 neighbourhood in raster order, 0 outside the image
    torch.testing.assert_close(
        neighbourhoods[0, 0], torch.tensor([0, 0, 0, 0, regions[0, 0], regions[0, 1], 0, regions[1, 0], regions[1, 1]])
    )
    # region (1, 1), the centre of the bottom row: the whole top row, itself and its two neighbours
    torch.testing.assert_close(neighbourhoods[0, 4], torch.cat([regions.flatten(), torch.zeros(3)]))
    # each neighbourhood's centre is the region itself, downscaled as the coarse candidates are
    pixels = torch.randn(2, 3, 16, 24)
    tree = build_scale_tree((4, 6), 2, 2)
    (context,) = region_neighbourhoods(level_images(pixels, tree, 4), tree, patch_size=4)
    centre = context.view(2, 6, 3, 12, 12)[..., 4:8, 4:8]
    torch.testing.assert_close(centre.flatten(2), candidate_patches(pixels, 4, tree)[:, :6])


def test_fine_candidates_are_grouped_by_parent():
    # one channel, 1x1 patches, r = 2, a 4x6 image whose pixel value is its raster index
    pixels = torch.arange(24.0).reshape(1, 1, 4, 6)
    fine = candidate_patches(pixels, 1, build_scale_tree((4, 6), 2, 2))[0, 6:, 0]
    # coarse grid 2x3; region 0 covers pixels (0,0),(0,1),(1,0),(1,1); region 1 starts at column 2; ...
    expected = [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11, 12, 13, 18, 19, 14, 15, 20, 21, 16, 17, 22, 23]
    assert fine.tolist() == expected


def test_coarse_candidates_are_the_area_averages():
    pixels = torch.randn(2, 3, 16, 24)
    candidates = candidate_patches(pixels, 4, build_scale_tree((4, 6), 2, 2))  # 8x8 regions -> 4x4, 2x3 grid
    assert candidates.shape == (2, 6 + 24, 3 * 4 * 4)
    region = pixels[1, :, 8:16, 0:8]  # region 3 (second row, first column)
    expected = region.reshape(3, 4, 2, 4, 2).mean(dim=(2, 4)).flatten()
    torch.testing.assert_close(candidates[1, 3], expected)
    torch.testing.assert_close(candidates[:, :6], patchify(F.avg_pool2d(pixels, 2), 4), rtol=0, atol=1e-6)


def test_two_scale_tree_by_hand():
    tree = build_scale_tree((4, 4), 2, 2)
    assert (tree.num_decisions, tree.num_roots, tree.num_candidates) == (4, 4, 20)
    assert tree.parent.tolist() == [4] * 4 + [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4  # 4 = no parent
    assert tree.slot_order.tolist() == [0, 4, 5, 6, 7, 1, 8, 9, 10, 11, 2, 12, 13, 14, 15, 3, 16, 17, 18, 19]
    grid = torch.arange(16.0).reshape(4, 4, 1)
    # positions: coarse cells average their children, fine cells are grouped by parent
    positions = grid_positions(grid, tree)[tree.grid_row, 0].tolist()
    assert positions == [2.5, 4.5, 10.5, 12.5, 0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_three_scale_tree_with_a_border_by_hand():
    """A 6 x 6 finest grid, r = 2: level 1 is 3 x 3, level 2 is 1 x 1 (covering level-1 cells (0..1, 0..1)); the
    five other level-1 cells are roots, as 224 px with 64 px top regions leaves a 32 px border."""
    tree = build_scale_tree((6, 6), 2, 3)
    assert tree.level_grids == ((6, 6), (3, 3), (1, 1))
    assert (tree.num_decisions, tree.num_roots, tree.num_decision_roots, tree.num_candidates) == (10, 6, 6, 46)
    # candidate order: the top cell, its 4 children, the 5 level-1 roots (raster), then the finest cells by parent
    assert tree.level[:10].tolist() == [2] + [1] * 9
    assert tree.parent[:10].tolist() == [10, 0, 0, 0, 0, 10, 10, 10, 10, 10]
    assert tree.cells[:10].tolist() == [16] + [4] * 9
    grid = torch.arange(36.0).reshape(6, 6, 1)
    positions = grid_positions(grid, tree)[tree.grid_row, 0]
    assert positions[0].item() == grid[:4, :4].mean().item()
    # the level-1 roots in raster order: (0, 2), (1, 2), (2, 0), (2, 1), (2, 2)
    assert positions[5:10].tolist() == [
        grid[r : r + 2, c : c + 2].mean().item() for r, c in ((0, 4), (2, 4), (4, 0), (4, 2), (4, 4))
    ]
    # depth first: the top cell, its first child, that child's 4 finest cells, ...
    assert tree.slot_order[:7].tolist() == [0, 1, 10, 11, 12, 13, 2]
    # every finest cell has one candidate per level, and the level-2 one only inside the top cell
    assert (tree.cell_chain[2] < tree.num_candidates).sum().item() == 16


def test_close_splits_and_active_candidates_three_scales():
    tree = build_scale_tree((4, 4), 2, 3)  # one top cell, 4 level-1 children, 16 finest cells
    marked = torch.tensor([[False, True, True, False, False], [True, True, False, False, True]])
    closed = close_splits(marked, tree)
    # image 0 keeps the top cell, so its children's marks do not count
    assert closed.tolist() == [[False] * 5, [True, True, False, False, True]]
    active = candidate_active_mask(closed, tree)
    assert active[0].nonzero().flatten().tolist() == [0]
    # image 1: children 2 and 3 kept, 1 and 4 split into their finest cells
    assert active[1, :5].tolist() == [False, False, True, True, False]
    assert active[1].sum().item() == 2 + 8
    assert token_counts(closed, tree).tolist() == [1 + 1, 1 + 1 + 3 * 3]
    index, valid = gathered_token_index(closed, tree)
    assert valid.sum(1).tolist() == [1, 10]
    sizes = token_sizes(torch.cat([torch.zeros(2, 1, dtype=torch.long), index + 1], 1), tree)
    assert sizes[1].tolist() == [1, 1, 1, 1, 1, 4, 4, 1, 1, 1, 1]  # CLS, child 1's cells, children 2 and 3, child 4's


def test_candidate_mask_values_multiply_the_ancestors():
    tree = build_scale_tree((4, 4), 2, 3)
    split_values = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]], requires_grad=True)
    values = candidate_mask_values(split_values, tree)
    expected_active = candidate_active_mask(split_values.detach() > 0.5, tree)
    assert torch.equal(values.detach() > 0.5, expected_active) and values.detach().sum().item() == 3 + 4
    values.sum().backward()
    # the top decision hears from every token under it: -1 (itself) + 4 children's (1 - m) + m * 4 for each split one
    assert split_values.grad[0, 0].item() == -1 + 4 - 1 + 4


def test_budget_split_mask_is_top_down():
    tree = build_scale_tree((4, 4), 2, 3)
    # a child scores above its kept parent: the budget still splits the parent first
    logits = torch.tensor([[0.0, 5.0, -1.0, -2.0, -3.0]])
    assert budget_split_mask(logits, 1, tree).tolist() == [[True, False, False, False, False]]
    assert budget_split_mask(logits, 2, tree).tolist() == [[True, True, False, False, False]]
    # ties between a parent and its children also resolve parent first
    assert budget_split_mask(torch.zeros(1, 5), 1, tree).tolist() == [[True, False, False, False, False]]
    logits = torch.randn(64, tree.num_decisions)
    for num_split in range(6):
        mask = budget_split_mask(logits, num_split, tree)
        assert torch.equal(mask, close_splits(mask, tree)) and mask.sum(1).eq(num_split).all()
    # two scales: the plain top-k of the logits
    two = build_scale_tree((8, 8), 2, 2)
    logits = torch.randn(4, 16)
    assert torch.equal(budget_split_mask(logits, 5, two), topk_split_mask(logits, 5))


def test_tokens_to_grid_three_scales_by_hand():
    tree = build_scale_tree((4, 4), 2, 3)
    split = close_splits(torch.tensor([[True, True, False, False, False]]), tree)
    index, valid = gathered_token_index(split, tree)
    token_index = torch.cat([torch.zeros(1, 1, dtype=torch.long), index + 1], 1)
    hidden = torch.arange(token_index.shape[1], dtype=torch.float32)[None, :, None]
    grid = tokens_to_grid(hidden, token_index, torch.ones_like(token_index, dtype=torch.bool), tree)
    # child 1 (top-left 2x2) split into 4 finest tokens 1..4, children 2, 3, 4 kept as tokens 5, 6, 7
    assert grid[0, 0].tolist() == [[1, 2, 5, 5], [3, 4, 5, 5], [6, 6, 7, 7], [6, 6, 7, 7]]


def test_level_regions_read_each_level():
    pixels = torch.randn(2, 1, 24, 24)
    tree = build_scale_tree((6, 6), 2, 3)  # 4 px patches: 8 px level 1 (3 x 3), 16 px level 2 (1 x 1)
    images = level_images(pixels, tree, 4)
    full = level_regions(images, tree, 4, full=True)
    assert [regions.shape[1:] for regions in full] == [(9, 64), (1, 256)]
    torch.testing.assert_close(full[1][:, 0], pixels[:, 0, :16, :16].flatten(1))
    second = level_regions(images, tree, 4, full=False)  # every region at 8 px
    torch.testing.assert_close(second[1][:, 0], F.avg_pool2d(pixels[:, :, :16, :16], 2).flatten(1))
    torch.testing.assert_close(second[0], full[0])
    # decision order: the top cell first, then level 1's children of it, then its roots
    ordered = by_decision([regions.mean(-1) for regions in second], tree)
    torch.testing.assert_close(ordered[:, 0], second[1][:, 0].mean(-1))
    torch.testing.assert_close(ordered[:, 1:5], second[0][:, [0, 1, 3, 4]].mean(-1))


def test_gathered_token_index_by_hand():
    tree = build_scale_tree((4, 4), 2, 2)
    split_mask = torch.tensor([[False, True, False, True], [False, False, False, False]])
    index, valid = gathered_token_index(split_mask, tree)
    # candidates: coarse 0..3, children of region j at 4 + 4j .. 4 + 4j + 3
    assert index[0].tolist() == [0, 8, 9, 10, 11, 2, 16, 17, 18, 19]
    assert index[1, :4].tolist() == [0, 1, 2, 3]
    assert valid.tolist() == [[True] * 10, [True] * 4 + [False] * 6]
    assert token_counts(split_mask, tree).tolist() == [11, 5]


@pytest.mark.parametrize(("ratio", "num_scales"), [(3, 2), (2, 3)])
def test_gathered_token_index_with_static_length_and_padding_in_range(ratio, num_scales):
    tree = build_scale_tree((12, 12), ratio, num_scales)
    split_mask = close_splits(torch.rand(5, tree.num_decisions) > 0.3, tree)
    index, valid = gathered_token_index(split_mask, tree, length=tree.num_fine)
    assert index.shape == (5, tree.num_fine) and int(index.max()) < tree.num_candidates
    assert valid.sum(1).tolist() == (token_counts(split_mask, tree) - 1).tolist()
    # the gathered set of each image is exactly its active candidates, which cover every finest cell once
    active = candidate_active_mask(split_mask, tree)
    for image in range(5):
        assert sorted(index[image][valid[image]].tolist()) == active[image].nonzero().flatten().tolist()
        assert tree.cells[active[image]].sum().item() == tree.num_fine


@pytest.mark.parametrize("ratio", [2, 3])
def test_token_counts_corner_cases(ratio):
    tree = build_scale_tree((2 * ratio, 3 * ratio), ratio, 2)
    all_coarse = torch.zeros(1, 6, dtype=torch.bool)
    all_fine = torch.ones(1, 6, dtype=torch.bool)
    assert token_counts(all_coarse, tree).item() == 1 + 6
    assert token_counts(all_fine, tree).item() == 1 + 6 * ratio**2


def test_candidate_mask_values_route_gradient_to_both_scales():
    split_values = torch.tensor([[0.0, 1.0]], requires_grad=True)
    values = candidate_mask_values(split_values, build_scale_tree((2, 4), 2, 2))
    assert values.tolist() == [[1.0, 0.0, 0, 0, 0, 0, 1, 1, 1, 1]]
    values.sum().backward()
    assert split_values.grad.tolist() == [[3.0, 3.0]]  # -1 from the coarse token, +4 from the children


def test_topk_split_mask_splits_exactly_k():
    logits = torch.randn(4, 16)
    mask = topk_split_mask(logits, 5)
    assert mask.sum(1).tolist() == [5] * 4
    assert torch.all(logits[mask].reshape(4, 5).min(1).values >= logits.masked_fill(mask, -1e9).max(1).values)
    assert topk_split_mask(logits, 0).sum() == 0
