import pytest
import torch
from torch.nn import functional as F

from modeling_msvit.mixed_scale_tokens import (
    candidate_active_mask,
    candidate_mask_values,
    candidate_patches,
    gathered_token_index,
    group_fine_grid,
    patchify,
    pool_fine_grid,
    region_neighbourhoods,
    token_counts,
    topk_split_mask,
)


def test_patchify_matches_strided_convolution():
    pixels = torch.randn(2, 3, 12, 8)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    expected = conv(pixels).flatten(2).transpose(1, 2)
    actual = F.linear(patchify(pixels, 4), conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_region_neighbourhoods_by_hand():
    # one channel, r = 2, p = 1: a 4x6 image is a 2x3 grid of coarse regions, each downscaled to one value
    pixels = torch.arange(24.0).reshape(1, 1, 4, 6)
    regions = F.avg_pool2d(pixels, 2)[0, 0]  # [[3.5, 5.5, 7.5], [15.5, 17.5, 19.5]]
    neighbourhoods = region_neighbourhoods(pixels, patch_size=1, ratio=2)
    assert neighbourhoods.shape == (1, 6, 9)
    # region (0, 0): its 3x3 neighbourhood in raster order, 0 outside the image
    torch.testing.assert_close(
        neighbourhoods[0, 0], torch.tensor([0, 0, 0, 0, regions[0, 0], regions[0, 1], 0, regions[1, 0], regions[1, 1]])
    )
    # region (1, 1), the centre of the bottom row: the whole top row, itself and its two neighbours
    torch.testing.assert_close(neighbourhoods[0, 4], torch.cat([regions.flatten(), torch.zeros(3)]))
    # each neighbourhood's centre is the region itself, downscaled as the coarse candidates are
    pixels = torch.randn(2, 3, 16, 24)
    centre = region_neighbourhoods(pixels, patch_size=4, ratio=2).view(2, 6, 3, 12, 12)[..., 4:8, 4:8]
    torch.testing.assert_close(centre.flatten(2), candidate_patches(pixels, 4, 2)[:, :6])


def test_fine_candidates_are_grouped_by_parent():
    # one channel, 1x1 patches, r = 2, a 4x6 image whose pixel value is its raster index
    pixels = torch.arange(24.0).reshape(1, 1, 4, 6)
    fine = candidate_patches(pixels, patch_size=1, ratio=2)[0, 6:, 0]
    # coarse grid 2x3; region 0 covers pixels (0,0),(0,1),(1,0),(1,1); region 1 starts at column 2; ...
    expected = [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11, 12, 13, 18, 19, 14, 15, 20, 21, 16, 17, 22, 23]
    assert fine.tolist() == expected


def test_coarse_candidates_are_the_area_averages():
    pixels = torch.randn(2, 3, 16, 24)
    candidates = candidate_patches(pixels, patch_size=4, ratio=2)  # regions of 8x8 -> 4x4, a 2x3 coarse grid
    assert candidates.shape == (2, 6 + 24, 3 * 4 * 4)
    region = pixels[1, :, 8:16, 0:8]  # region 3 (second row, first column)
    expected = region.reshape(3, 4, 2, 4, 2).mean(dim=(2, 4)).flatten()
    torch.testing.assert_close(candidates[1, 3], expected)
    torch.testing.assert_close(candidates[:, :6], patchify(F.avg_pool2d(pixels, 2), 4), rtol=0, atol=1e-6)


def test_group_and_pool_fine_grid_by_hand():
    grid = torch.arange(16.0).reshape(4, 4, 1)  # fine grid 4x4, r = 2 -> coarse 2x2
    assert group_fine_grid(grid, 2)[:, 0].tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert pool_fine_grid(grid, 2)[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_gathered_token_index_by_hand():
    split_mask = torch.tensor([[False, True, False, True], [False, False, False, False]])
    index, valid = gathered_token_index(split_mask, ratio=2)
    # candidates: coarse 0..3, children of region j at 4 + 4j .. 4 + 4j + 3
    assert index[0].tolist() == [0, 8, 9, 10, 11, 2, 16, 17, 18, 19]
    assert index[1, :4].tolist() == [0, 1, 2, 3]
    assert valid.tolist() == [[True] * 10, [True] * 4 + [False] * 6]
    assert token_counts(split_mask, 2).tolist() == [11, 5]


def test_gathered_token_index_with_static_length_and_padding_in_range():
    split_mask = torch.rand(5, 16) > 0.5
    index, valid = gathered_token_index(split_mask, ratio=3, length=16 * 9)
    assert index.shape == (5, 16 * 9) and int(index.max()) < 16 + 16 * 9
    assert valid.sum(1).tolist() == (token_counts(split_mask, 3) - 1).tolist()
    # the gathered set of each image is exactly its active candidates
    active = candidate_active_mask(split_mask, 3)
    for image in range(5):
        assert sorted(index[image][valid[image]].tolist()) == active[image].nonzero().flatten().tolist()


@pytest.mark.parametrize("ratio", [2, 3])
def test_token_counts_corner_cases(ratio):
    num_coarse = 6
    all_coarse = torch.zeros(1, num_coarse, dtype=torch.bool)
    all_fine = torch.ones(1, num_coarse, dtype=torch.bool)
    assert token_counts(all_coarse, ratio).item() == 1 + num_coarse
    assert token_counts(all_fine, ratio).item() == 1 + num_coarse * ratio**2


def test_candidate_mask_values_route_gradient_to_both_scales():
    split_values = torch.tensor([[0.0, 1.0]], requires_grad=True)
    values = candidate_mask_values(split_values, ratio=2)
    assert values.tolist() == [[1.0, 0.0, 0, 0, 0, 0, 1, 1, 1, 1]]
    values.sum().backward()
    assert split_values.grad.tolist() == [[3.0, 3.0]]  # -1 from the coarse token, +4 from the children


def test_topk_split_mask_splits_exactly_k():
    logits = torch.randn(4, 16)
    mask = topk_split_mask(logits, 5)
    assert mask.sum(1).tolist() == [5] * 4
    assert torch.all(logits[mask].reshape(4, 5).min(1).values >= logits.masked_fill(mask, -1e9).max(1).values)
    assert topk_split_mask(logits, 0).sum() == 0
