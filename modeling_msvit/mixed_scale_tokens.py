# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""Pure tensor functions that turn gate decisions into MSViT's mixed-scale token sequences.

Notation: `B` images, a coarse grid of `Hc x Wc = Nc` regions in raster order, `r` fine patches per coarse side,
`Nf = Nc * r**2` fine patches, `P = channels * patch_size**2` values per (downscaled) patch.

Two token layouts are used, both without the CLS token:

* **candidate layout** (`Nc + Nf` tokens): every coarse region first (raster order), then the fine patches *grouped by
  their coarse parent*: the `r**2` children of region 0 in raster order, then those of region 1, and so on. Candidate
  `j < Nc` is coarse region `j`; candidate `Nc + j * r**2 + k` is child `k` of region `j`.
* **gathered layout** (one sequence per image, padded to the longest image of the batch): regions in raster order,
  each contributing its coarse token if kept or its `r**2` fine children if split. Positions past an image's length
  are padding, flagged in the returned validity mask.

The model never depends on the order of tokens (attention is permutation-equivariant and positions are encoded by
position embeddings); the orders are fixed so that outputs can be mapped back to the image grid.
"""

import torch
from torch.nn import functional as F


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut `(B, C, H, W)` images into raster-ordered patches `(B, (H/p)*(W/p), C*p*p)`.

    Each patch is flattened in `(channel, row, column)` order, the order of a `Conv2d(kernel=p, stride=p)` weight, so
    that `patches @ conv.weight.flatten(1).T + conv.bias` equals the convolution.
    """
    batch_size, channels, height, width = pixel_values.shape
    patches = pixel_values.reshape(
        batch_size, channels, height // patch_size, patch_size, width // patch_size, patch_size
    )
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, -1, channels * patch_size * patch_size)


def region_neighbourhoods(pixel_values: torch.Tensor, patch_size: int, ratio: int) -> torch.Tensor:
    """Every coarse region's 3 x 3 neighbourhood of coarse regions, area-downscaled by `r` to `patch_size` each:
    `(B, Nc, C * (3p)**2)` in raster order of the regions, each flattened in `(channel, row, column)` order. Outside
    the image the neighbourhood reads 0."""
    pooled = F.avg_pool2d(pixel_values, ratio)
    windows = F.unfold(pooled, kernel_size=3 * patch_size, stride=patch_size, padding=patch_size)
    return windows.transpose(1, 2)


def candidate_patches(pixel_values: torch.Tensor, patch_size: int, ratio: int) -> torch.Tensor:
    """All candidate patches `(B, Nc + Nf, C*p*p)` in candidate layout: the coarse regions area-downscaled by `r` to
    `patch_size` (raster order), then the fine patches grouped by parent (raster order inside each region).

    Each half is written straight into the output from a strided view of the image: one copy per pixel, no
    concatenation. The `r x r` area average is a sum of `r**2` strided views, exactly `avg_pool2d(pixel_values, r)`
    and 2-4x faster than that kernel on CPU.
    """
    batch_size, channels, height, width = pixel_values.shape
    coarse_h, coarse_w = height // (patch_size * ratio), width // (patch_size * ratio)
    num_coarse = coarse_h * coarse_w
    patches = pixel_values.new_empty(batch_size, num_coarse * (1 + ratio * ratio), channels * patch_size * patch_size)
    pixel_sum = sum(pixel_values[..., row::ratio, column::ratio] for row in range(ratio) for column in range(ratio))
    downscaled = (pixel_sum / (ratio * ratio)).view(batch_size, channels, coarse_h, patch_size, coarse_w, patch_size)
    patches[:, :num_coarse].view(batch_size, coarse_h, coarse_w, channels, patch_size, patch_size).copy_(
        downscaled.permute(0, 2, 4, 1, 3, 5)
    )
    fine = pixel_values.view(batch_size, channels, coarse_h, ratio, patch_size, coarse_w, ratio, patch_size)
    # (B, Hc, Wc, r, r, C, p, p): parent cell, then child row/column, then the patch itself
    patches[:, num_coarse:].view(batch_size, coarse_h, coarse_w, ratio, ratio, channels, patch_size, patch_size).copy_(
        fine.permute(0, 2, 5, 3, 6, 1, 4, 7)
    )
    return patches


def group_fine_grid(fine_grid: torch.Tensor, ratio: int) -> torch.Tensor:
    """Reorder a fine grid of vectors `(..., Hf, Wf, D)` into candidate order `(..., Nf, D)` (grouped by parent)."""
    *lead, fine_h, fine_w, dim = fine_grid.shape
    grid = fine_grid.reshape(*lead, fine_h // ratio, ratio, fine_w // ratio, ratio, dim)
    grid = grid.transpose(-3, -4)  # (..., Hc, Wc, r, r, D)
    return grid.reshape(*lead, -1, dim)


def pool_fine_grid(fine_grid: torch.Tensor, ratio: int) -> torch.Tensor:
    """Average each `r x r` block of a fine grid `(..., Hf, Wf, D)` into coarse vectors `(..., Nc, D)`, raster order.

    For position embeddings this is the linear interpolation at the coarse cell centres when `r = 2`.
    """
    grouped = group_fine_grid(fine_grid, ratio)
    return grouped.unflatten(-2, (-1, ratio * ratio)).mean(-2)


def token_counts(split_mask: torch.Tensor, ratio: int) -> torch.Tensor:
    """Tokens per image including CLS, `1 + Nc + (r**2 - 1) * #split`, from a `(B, Nc)` boolean split mask."""
    num_coarse = split_mask.shape[-1]
    return 1 + num_coarse + (ratio * ratio - 1) * split_mask.sum(-1)


def candidate_active_mask(split_mask: torch.Tensor, ratio: int) -> torch.Tensor:
    """Active candidates `(B, Nc + Nf)` bool: kept regions' coarse tokens and split regions' children."""
    return torch.cat([~split_mask, split_mask.repeat_interleave(ratio * ratio, dim=-1)], dim=-1)


def candidate_mask_values(split_values: torch.Tensor, ratio: int) -> torch.Tensor:
    """Per-candidate multipliers `(B, Nc + Nf)` from per-region split values `(B, Nc)`: `1 - m` coarse, `m` fine.

    With straight-through values `m` (exactly 0/1 forward, soft gradient) this is 1 on active tokens and routes the
    task gradient of every active token to the gate.
    """
    return torch.cat([1 - split_values, split_values.repeat_interleave(ratio * ratio, dim=-1)], dim=-1)


def gathered_token_index(
    split_mask: torch.Tensor, ratio: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate indices of each image's active tokens in gathered order, padded to a common length.

    Args:
        split_mask: `(B, Nc)` bool, True where a region is split.
        ratio: `r`, fine patches per coarse side.
        length: the padded length; `None` uses the longest image of the batch (one host synchronisation). Pass it when
            it is known statically (fixed-budget mode) to keep the computation free of data-dependent shapes.

    Returns:
        `index` `(B, L)` long into the candidate layout, and `valid` `(B, L)` bool, False on padding. Padding positions
        hold indices of inactive candidates, so gathering with `index` never reads out of range.
    """
    batch_size, num_coarse = split_mask.shape
    children = ratio * ratio
    device = split_mask.device
    cells = torch.arange(num_coarse, device=device)
    # per region, one slot for its coarse token followed by one per child: (Nc, 1 + r**2)
    slot_index = torch.cat(
        [cells[:, None], num_coarse + cells[:, None] * children + torch.arange(children, device=device)], dim=1
    ).flatten()
    slot_active = torch.cat([~split_mask[..., None], split_mask[..., None].expand(-1, -1, children)], dim=-1)
    slot_active = slot_active.flatten(1)
    # the permutation of a stable sort that moves active slots to the front, each group keeping its (region, child)
    # order, from two running counts (cumsum + scatter export to ONNX; a stable sort does not)
    active_rank = slot_active.cumsum(1) - 1
    counts = active_rank[:, -1] + 1
    inactive_rank = counts[:, None] + (~slot_active).cumsum(1) - 1
    destination = torch.where(slot_active, active_rank, inactive_rank)
    index = torch.empty_like(destination).scatter_(1, destination, slot_index.expand_as(destination))
    if length is None:
        length = int(counts.max())
    valid = torch.arange(length, device=device)[None, :] < counts[:, None]
    return index[:, :length], valid


def gather_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values[b, index[b, l]]` for `(B, N, D)` values (or `(N, D)` shared by all images) and a `(B, L)` index.

    One `index_select` over the flattened rows: on CPU it is an order of magnitude faster than `gather` with an index
    expanded over `D`, which reads one index per element.
    """
    if values.ndim == 2:
        return values.index_select(0, index.flatten()).unflatten(0, index.shape)
    batch_size, num_values, dim = values.shape
    rows = index + num_values * torch.arange(batch_size, device=index.device)[:, None]
    return values.reshape(-1, dim).index_select(0, rows.flatten()).unflatten(0, index.shape)


def packed_token_rows(token_counts: torch.Tensor, length: int, total: int) -> torch.Tensor:
    """Rows of every image's tokens in a padded batch flattened to `(B * L, D)`, image after image: `(total,)` long.

    Each image's tokens lead its padded sequence (positions `0 ... count - 1`: CLS, then the gathered layout), so
    `padded.flatten(0, 1).index_select(0, rows)` packs the batch into `(total, D)` with no padding.

    Args:
        token_counts: `(B,)` long, tokens per image (CLS included).
        length: `L`, the padded length.
        total: `token_counts.sum()`, read on the host by the caller: it sizes the result without another host
            synchronisation.
    """
    batch_size = token_counts.shape[0]
    starts = token_counts.cumsum(0) - token_counts
    # packed row t of image b sits at b * L + (t - starts[b])
    shift = torch.arange(batch_size, device=token_counts.device) * length - starts
    return torch.arange(total, device=token_counts.device) + shift.repeat_interleave(token_counts, output_size=total)


def padded_token_rows(token_counts: torch.Tensor, length: int) -> torch.Tensor:
    """The packed row each position of the padded batch reads: `(B, L)` long, the inverse of `packed_token_rows`.

    Padding positions read their image's last token, so that padding a packed `(total, D)` tensor is one gather
    (`gather_tokens(packed, rows)`) that never mixes images; what they hold is masked out of attention.
    """
    starts = token_counts.cumsum(0) - token_counts
    positions = torch.arange(length, device=token_counts.device)
    return starts[:, None] + torch.minimum(positions[None, :], token_counts[:, None] - 1)


def length_buckets(token_counts: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Indices of images grouped into batches of at most `batch_size` images of similar token counts.

    For inference whose order does not matter (evaluation): a ragged batch pays attention at the length of its
    longest image, so batches of similar lengths waste the least. The indices are sorted by count (stable) and cut
    into consecutive batches; `torch.cat(buckets).argsort()` restores the original order.
    """
    return list(token_counts.argsort(stable=True).split(batch_size))


def fine_cell_candidates(coarse_grid: tuple[int, int], ratio: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every fine grid cell in raster order, its own fine candidate and its coarse parent: two `(Hf * Wf,)` long
    tensors of candidate indices."""
    coarse_h, coarse_w = coarse_grid
    rows = torch.arange(coarse_h * ratio, device=device)[:, None]
    cols = torch.arange(coarse_w * ratio, device=device)[None, :]
    parent = (rows // ratio) * coarse_w + cols // ratio
    child = (rows % ratio) * ratio + cols % ratio
    num_coarse = coarse_h * coarse_w
    return (num_coarse + parent * ratio * ratio + child).flatten(), parent.flatten()


def tokens_to_grid(
    hidden_states: torch.Tensor,
    token_index: torch.Tensor,
    token_mask: torch.Tensor,
    coarse_grid: tuple[int, int],
    ratio: int,
) -> torch.Tensor:
    """Scatter a mixed-scale token sequence back onto the dense fine grid: `(B, D, Hf, Wf)`.

    A coarse token fills the `r x r` fine cells of its region, a fine token its own cell; CLS, padding and inactive
    candidates are dropped. Works for both execution paths, since it reads only which candidate each position holds.

    Args:
        hidden_states: `(B, L, D)` per-position vectors (encoder outputs, or anything computed per token).
        token_index: `(B, L)` long, 0 for CLS and `1 + c` for candidate `c` (as `MSViTModel` returns it).
        token_mask: `(B, L)` bool, True on active tokens (CLS included).
        coarse_grid: `(Hc, Wc)` of the input image.
        ratio: `r`, fine patches per coarse side.

    Every fine cell is covered by exactly one active token (its own fine token or its parent's coarse token) when the
    mask comes from one decision per region, as every MSViT output does.
    """
    batch_size, length, dim = hidden_states.shape
    num_coarse = coarse_grid[0] * coarse_grid[1]
    num_candidates = num_coarse * (1 + ratio * ratio)
    is_candidate = token_mask & (token_index > 0)
    # position of each active candidate in the sequence, -1 if inactive; one extra slot absorbs everything else
    slot = torch.where(is_candidate, token_index - 1, num_candidates)
    positions = torch.arange(length, device=token_index.device).expand(batch_size, -1)
    position_of = torch.full((batch_size, num_candidates + 1), -1, dtype=torch.long, device=token_index.device)
    position_of = position_of.scatter(1, slot, torch.where(is_candidate, positions, -1))[:, :num_candidates]
    fine, parent = fine_cell_candidates(coarse_grid, ratio, token_index.device)
    fine_position, parent_position = position_of[:, fine], position_of[:, parent]
    source = torch.where(fine_position >= 0, fine_position, parent_position)
    grid = gather_tokens(hidden_states, source)
    fine_h, fine_w = coarse_grid[0] * ratio, coarse_grid[1] * ratio
    return grid.transpose(1, 2).reshape(batch_size, dim, fine_h, fine_w)


def token_sizes(token_index: torch.Tensor, num_coarse: int, ratio: int) -> torch.Tensor:
    """Fine grid cells each candidate position stands for `(B, L)`, whether active or not: `r**2` for a coarse token,
    1 for a fine token and for CLS (index 0), from a `(B, L)` token index (`1 + c` for candidate `c`)."""
    is_coarse = (token_index > 0) & (token_index <= num_coarse)  # index 1 + c, so coarse c < Nc is <= Nc
    return torch.where(is_coarse, ratio * ratio, 1)


def token_cell_counts(
    token_index: torch.Tensor, token_mask: torch.Tensor, num_coarse: int, ratio: int
) -> torch.Tensor:
    """Fine grid cells each position stands for `(B, L)`: `r**2` for an active coarse token, 1 for an active fine
    token, 0 for CLS, padding and inactive candidates."""
    return torch.where(token_mask & (token_index > 0), token_sizes(token_index, num_coarse, ratio), 0)


def attention_key_bias(key_cells: torch.Tensor, dtype: torch.dtype, query_length: int) -> torch.Tensor:
    """Additive attention mask `(B, 1, query_length, L)` from the fine cells each key stands for `(B, L)`.

    A key that stands for `n` cells gets `log n` added to its scores (0 for a single cell): attending to it equals
    attending to `n` identical copies of it. A key with `n = 0` (padding, inactive candidates) gets the dtype's
    minimum, so it is never attended to. The query dimension is an expanded view (no memory), so that the mask
    indexes like a full 4D mask (as flex_attention's score_mod does).
    """
    bias = torch.log(key_cells.to(dtype)).clamp(min=torch.finfo(dtype).min)
    return bias[:, None, None, :].expand(-1, 1, query_length, -1)


def topk_split_mask(split_logits: torch.Tensor, num_split: int) -> torch.Tensor:
    """Split exactly `num_split` regions per image, those with the highest logits: `(B, Nc)` bool."""
    split_mask = torch.zeros_like(split_logits, dtype=torch.bool)
    if num_split == 0:
        return split_mask
    return split_mask.scatter(1, split_logits.topk(num_split, dim=1).indices, True)


__all__ = [
    "attention_key_bias",
    "candidate_active_mask",
    "candidate_mask_values",
    "candidate_patches",
    "fine_cell_candidates",
    "gather_tokens",
    "gathered_token_index",
    "group_fine_grid",
    "length_buckets",
    "packed_token_rows",
    "padded_token_rows",
    "patchify",
    "pool_fine_grid",
    "region_neighbourhoods",
    "token_cell_counts",
    "token_counts",
    "token_sizes",
    "tokens_to_grid",
    "topk_split_mask",
]
