# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""Pure tensor functions that turn gate decisions into MSViT's mixed-scale token sequences.

**Scales.** MSViT's patch sizes `p_0 < p_1 < ... < p_{S-1}` (`config.patch_sizes`, finest first) grow by one factor
`r`: a cell of level `l >= 1` covers `r x r` cells of level `l - 1`. The cells form one tree per top-level cell (a
quadtree for `r = 2`); a node of level `l >= 1` is either kept as one token or split into its `r**2` children, and
a split node's children decide in turn (top-down). The cells of a level that its grid does not hold (at the image's
border, when the image is not a multiple of that level's size) belong to the next finer level, where they are roots:
at 224 px with 16/32/64 px patches, 3 x 3 top regions of 64 px and a border of 32 px roots. `ScaleTree` holds this
structure for one image size, and every function here reads it. Two scales are its simplest case: one level of
decisions, the coarse regions.

Notation: `B` images, `Hf x Wf` finest cells, `N` candidates (every node of every level), `D` decision nodes (the
nodes of levels >= 1, `D = Nc` coarse regions with two scales), `P = channels * p_0**2` values per patch, every patch
area-downscaled to `p_0`. The gate's logits and `split_mask` are `(B, D)`; a split mask means a node is split when it
and all its ancestors are marked (`close_splits`), so the marks under a kept node do not count.

Two token layouts are used, both without the CLS token:

* **candidate layout** (`N` tokens): levels from the largest down; within a level, the children of the level above
  in their parents' order (raster order inside each parent), then the level's own roots in raster order. The
  decision nodes are therefore candidates `0 ... D - 1`. With two scales and an image the coarse grid tiles:
  candidate `j < Nc` is coarse region `j`, and `Nc + j * r**2 + k` is child `k` of region `j`.
* **gathered layout** (one sequence per image, padded to the longest image of the batch): the active tokens in
  depth-first order: each root (in raster order of its top-left corner) contributes its token if kept, else its
  children's tokens in raster order, recursively. Positions past an image's length are padding, flagged in the
  returned validity mask.

The model never depends on the order of tokens (attention is permutation-equivariant and positions are encoded by
position embeddings); the orders are fixed so that outputs can be mapped back to the image grid.
"""

import functools
import operator
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F


# the tensors of a `ScaleTree`, kept as non-persistent buffers by the model for its configured image size
TREE_TENSORS = ("level", "parent", "cells", "grid_row", "slot_order", "cell_chain")


@dataclass(frozen=True)
class ScaleTree:
    """The static candidate structure of one image size (see the module docstring).

    Attributes:
        ratio: `r`, the factor between successive patch sizes.
        level_grids: per level (finest first), the `(rows, columns)` of its grid: `(Hf // r**l, Wf // r**l)`.
        num_decisions: `D`; candidates `0 ... D - 1` are the decision nodes.
        num_roots: tokens when nothing is split (CLS excluded).
        num_decision_roots: the decision nodes among the roots, which every layout can flip.
        level: `(N,)` each candidate's level, 0 the finest.
        parent: `(N,)` each candidate's parent (a decision node), `D` for roots.
        cells: `(N,)` the finest cells each candidate covers, `r**(2 * level)`.
        grid_row: `(N,)` each candidate's row in the level grids concatenated finest first, each in raster order
            (`grid_patches`).
        slot_order: `(N,)` the candidates in depth-first order (the gathered layout with every candidate active).
        cell_chain: `(S, Hf * Wf)` for every finest cell (raster order), the candidate covering it at each level, `N`
            where that level's grid does not hold it.
    """

    ratio: int
    level_grids: tuple[tuple[int, int], ...]
    num_decisions: int
    num_roots: int
    num_decision_roots: int
    level: torch.Tensor
    parent: torch.Tensor
    cells: torch.Tensor
    grid_row: torch.Tensor
    slot_order: torch.Tensor
    cell_chain: torch.Tensor

    @property
    def num_scales(self) -> int:
        return len(self.level_grids)

    @property
    def num_candidates(self) -> int:
        return self.level.shape[0]

    @property
    def fine_grid(self) -> tuple[int, int]:
        return self.level_grids[0]

    @property
    def num_fine(self) -> int:
        return self.level_grids[0][0] * self.level_grids[0][1]

    @property
    def decision_levels(self) -> torch.Tensor:
        """`(D,)` the level of every decision node (>= 1)."""
        return self.level[: self.num_decisions]

    @property
    def decision_rows(self) -> torch.Tensor:
        """`(D,)` each decision node's row in the grids of levels 1 ... S-1 concatenated (`by_decision`)."""
        return self.grid_row[: self.num_decisions] - self.num_fine

    def candidate_boxes(self) -> torch.Tensor:
        """`(N, 3)` long: each candidate's top row and left column on the finest grid, and its side, in finest
        cells."""
        sizes = [rows * columns for rows, columns in self.level_grids]
        offsets = self.level.new_tensor([sum(sizes[:level]) for level in range(self.num_scales)])[self.level]
        columns = self.level.new_tensor([columns for _, columns in self.level_grids])[self.level]
        within, side = self.grid_row - offsets, self.ratio**self.level
        return torch.stack([within // columns * side, within % columns * side, side], dim=1)

    def to(self, device) -> "ScaleTree":
        return replace(self, **{name: getattr(self, name).to(device) for name in TREE_TENSORS})


@functools.lru_cache(maxsize=32)
def _cpu_scale_tree(fine_grid: tuple[int, int], ratio: int, num_scales: int) -> ScaleTree:
    grids = [(fine_grid[0] // ratio**level, fine_grid[1] // ratio**level) for level in range(num_scales)]

    def in_grid(level: int, row: int, column: int) -> bool:
        return level < num_scales and row < grids[level][0] and column < grids[level][1]

    def children(level: int, row: int, column: int) -> list[tuple[int, int, int]]:
        return [(level - 1, ratio * row + a, ratio * column + b) for a in range(ratio) for b in range(ratio)]

    per_level, above = {}, []
    for level in reversed(range(num_scales)):
        nodes = [child for node in above for child in children(*node)]
        rows, columns = grids[level]
        nodes += [
            (level, row, column)
            for row in range(rows)
            for column in range(columns)
            if not in_grid(level + 1, row // ratio, column // ratio)
        ]
        per_level[level] = above = nodes
    candidates = [node for level in reversed(range(num_scales)) for node in per_level[level]]
    index = {node: position for position, node in enumerate(candidates)}
    num_decisions = sum(len(per_level[level]) for level in range(1, num_scales))
    offsets = [sum(rows * columns for rows, columns in grids[:level]) for level in range(num_scales)]

    roots = [node for node in candidates if not in_grid(node[0] + 1, node[1] // ratio, node[2] // ratio)]
    roots.sort(key=lambda node: (node[1] * ratio ** node[0], node[2] * ratio ** node[0]))
    slot_order = []

    def visit(node: tuple[int, int, int]) -> None:
        slot_order.append(index[node])
        if node[0] > 0:
            for child in children(*node):
                visit(child)

    for root in roots:
        visit(root)
    fine_rows, fine_columns = fine_grid
    cell_chain = [
        [
            index[(level, row // ratio**level, column // ratio**level)]
            if in_grid(level, row // ratio**level, column // ratio**level)
            else len(candidates)
            for row in range(fine_rows)
            for column in range(fine_columns)
        ]
        for level in range(num_scales)
    ]
    parent = [
        index[(level + 1, row // ratio, column // ratio)]
        if in_grid(level + 1, row // ratio, column // ratio)
        else num_decisions
        for level, row, column in candidates
    ]
    # built on the CPU explicitly: transformers may first build the model under a meta-device context
    return ScaleTree(
        ratio=ratio,
        level_grids=tuple(grids),
        num_decisions=num_decisions,
        num_roots=len(roots),
        num_decision_roots=sum(1 for root in roots if root[0] > 0),
        level=torch.tensor([level for level, _, _ in candidates], dtype=torch.long, device="cpu"),
        parent=torch.tensor(parent, dtype=torch.long, device="cpu"),
        cells=torch.tensor([ratio ** (2 * level) for level, _, _ in candidates], dtype=torch.long, device="cpu"),
        grid_row=torch.tensor(
            [offsets[level] + row * grids[level][1] + column for level, row, column in candidates],
            dtype=torch.long,
            device="cpu",
        ),
        slot_order=torch.tensor(slot_order, dtype=torch.long, device="cpu"),
        cell_chain=torch.tensor(cell_chain, dtype=torch.long, device="cpu").reshape(num_scales, -1),
    )


def build_scale_tree(fine_grid: tuple[int, int], ratio: int, num_scales: int, device=None) -> ScaleTree:
    """The `ScaleTree` of an image of `fine_grid` finest cells, with `num_scales` patch sizes growing by `ratio`."""
    return _cpu_scale_tree(tuple(fine_grid), ratio, num_scales).to(device)


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


def level_images(pixel_values: torch.Tensor, tree: ScaleTree, patch_size: int) -> list[torch.Tensor]:
    """The image seen at every level, finest first: level `l` is the part its grid holds, area-downscaled by `r**l`,
    so that its cells are `patch_size` px: `(B, C, rows_l * p, columns_l * p)`.

    Each level averages `r x r` blocks of the one before as a sum of `r**2` strided views: exactly `avg_pool2d`, and
    2-4x faster than that kernel on CPU.
    """
    ratio, images = tree.ratio, [pixel_values]
    for rows, columns in tree.level_grids[1:]:
        held = images[-1][..., : rows * ratio * patch_size, : columns * ratio * patch_size]
        views = [held[..., row::ratio, column::ratio] for row in range(ratio) for column in range(ratio)]
        images.append(functools.reduce(operator.add, views) / (ratio * ratio))
    return images


def grid_patches(images: list[torch.Tensor], tree: ScaleTree, patch_size: int) -> torch.Tensor:
    """Every level's cells as `patch_size` patches, `(B, G, P)`: the level grids concatenated finest first, each in
    raster order (`tree.grid_row` indexes it). Each level is written straight into the output, one copy per value."""
    batch_size, channels = images[0].shape[:2]
    sizes = [rows * columns for rows, columns in tree.level_grids]
    patches = images[0].new_empty(batch_size, sum(sizes), channels * patch_size * patch_size)
    start = 0
    for image, (rows, columns), size in zip(images, tree.level_grids, sizes):
        cells = image.view(batch_size, channels, rows, patch_size, columns, patch_size).permute(0, 2, 4, 1, 3, 5)
        patches[:, start : start + size].view(batch_size, rows, columns, channels, patch_size, patch_size).copy_(cells)
        start += size
    return patches


def level_regions(images: list[torch.Tensor], tree: ScaleTree, patch_size: int, full: bool) -> list[torch.Tensor]:
    """The regions of the decision levels (1 ... S-1), one `(B, rows_l * columns_l, F_l)` tensor per level in raster
    order: at full resolution (`full`, `F_l = C * p_l**2`) or at the second patch size `p_1` (`F = C * p_1**2`, the
    full resolution of level 1, area-downscaled above it)."""
    ratio, regions = tree.ratio, []
    for level, (rows, columns) in enumerate(tree.level_grids[1:], start=1):
        size = patch_size * ratio ** (level if full else 1)
        image = images[0 if full else level - 1][..., : rows * size, : columns * size]
        regions.append(patchify(image, size))
    return regions


def region_neighbourhoods(images: list[torch.Tensor], tree: ScaleTree, patch_size: int) -> list[torch.Tensor]:
    """Every decision node's 3 x 3 neighbourhood of same-level cells, each area-downscaled to `patch_size`: one
    `(B, rows_l * columns_l, C * (3p)**2)` tensor per decision level in raster order, each neighbourhood flattened in
    `(channel, row, column)` order. Outside the level's grid the neighbourhood reads 0."""
    return [
        F.unfold(image, kernel_size=3 * patch_size, stride=patch_size, padding=patch_size).transpose(1, 2)
        for image in images[1:]
    ]


def by_decision(per_level: list[torch.Tensor], tree: ScaleTree) -> torch.Tensor:
    """Per-level values `(B, rows_l * columns_l, ...)` of levels 1 ... S-1 (raster order) in decision order `(B, D,
    ...)`."""
    return torch.cat(per_level, dim=1).index_select(1, tree.decision_rows)


def grid_positions(fine_grid: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Position embeddings `(G, D)` of every level's cells, in the layout of `grid_patches` (`tree.grid_row` indexes
    it), from the finest grid's `(Hf, Wf, D)`: a level-`l` cell gets the average of the `r**l x r**l` finest cells it
    covers (for `r = 2` one level up, the linear interpolation at the cell's centre)."""
    dim = fine_grid.shape[-1]
    channels_first = fine_grid.permute(2, 0, 1)[None]
    levels = [fine_grid.reshape(-1, dim)] + [
        F.avg_pool2d(channels_first, tree.ratio**level).reshape(dim, -1).t() for level in range(1, tree.num_scales)
    ]
    return torch.cat(levels)


def _parent_values(values: torch.Tensor, tree: ScaleTree, root_value) -> torch.Tensor:
    """Each candidate's parent's value `(B, N)` from per-decision values `(B, D)`; `root_value` for roots."""
    padded = torch.cat([values, values.new_full((values.shape[0], 1), root_value)], dim=1)
    return padded[:, tree.parent]


def reachable_decisions(split_mask: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Decision nodes `(B, D)` bool whose decision counts: roots and children of split nodes."""
    return _parent_values(split_mask, tree, True)[:, : tree.num_decisions]


def close_splits(split_mask: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """The effective decisions `(B, D)` bool: a node is split when it and all its ancestors are marked."""
    for _ in range(tree.num_scales - 2):
        split_mask = split_mask & reachable_decisions(split_mask, tree)
    return split_mask


def _own_split(values: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Per-candidate values `(B, N)`: the decision nodes' own, 0 for the finest candidates."""
    return torch.cat([values, values.new_zeros(values.shape[0], tree.num_candidates - tree.num_decisions)], dim=1)


def candidate_active_mask(split_mask: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Active candidates `(B, N)` bool from effective decisions: nodes whose parent is split (or roots) and that are
    not split themselves."""
    return _parent_values(split_mask, tree, True) & ~_own_split(split_mask, tree)


def candidate_mask_values(split_values: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Per-candidate multipliers `(B, N)` from per-node split values `m` `(B, D)`: the product of the ancestors'
    `m` times `1 - m` of the node itself (a finest candidate has no `1 - m` factor). With two scales `1 - m` coarse,
    `m` fine.

    With straight-through values `m` (exactly 0/1 forward, soft gradient) this is 1 on active tokens and 0 elsewhere
    (marks under a kept node included), and routes the task gradient of every active token to the decisions above
    it.
    """
    reach = _parent_values(split_values, tree, 1.0)
    for _ in range(tree.num_scales - 2):
        reach = _parent_values(split_values * reach[:, : tree.num_decisions], tree, 1.0)
    return reach * (1 - _own_split(split_values, tree))


def token_counts(split_mask: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Tokens per image including CLS, `1 + roots + (r**2 - 1) * #split`, from effective decisions `(B, D)`."""
    return 1 + tree.num_roots + (tree.ratio**2 - 1) * split_mask.sum(-1)


def gathered_token_index(
    split_mask: torch.Tensor, tree: ScaleTree, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate indices of each image's active tokens in gathered order, padded to a common length.

    Args:
        split_mask: `(B, D)` bool effective decisions (`close_splits`).
        tree: the image size's `ScaleTree`.
        length: the padded length; `None` uses the longest image of the batch (one host synchronisation). Pass it when
            it is known statically (fixed-budget mode) to keep the computation free of data-dependent shapes.

    Returns:
        `index` `(B, L)` long into the candidate layout, and `valid` `(B, L)` bool, False on padding. Padding positions
        hold indices of inactive candidates, so gathering with `index` never reads out of range.
    """
    slot_active = candidate_active_mask(split_mask, tree)[:, tree.slot_order]
    # the permutation of a stable sort that moves active slots to the front, each group keeping its depth-first
    # order, from two running counts (cumsum + scatter export to ONNX; a stable sort does not)
    active_rank = slot_active.cumsum(1) - 1
    counts = active_rank[:, -1] + 1
    inactive_rank = counts[:, None] + (~slot_active).cumsum(1) - 1
    destination = torch.where(slot_active, active_rank, inactive_rank)
    index = torch.empty_like(destination).scatter_(1, destination, tree.slot_order.expand_as(destination))
    if length is None:
        length = int(counts.max())
    valid = torch.arange(length, device=split_mask.device)[None, :] < counts[:, None]
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


def tokens_to_grid(
    hidden_states: torch.Tensor, token_index: torch.Tensor, token_mask: torch.Tensor, tree: ScaleTree
) -> torch.Tensor:
    """Scatter a mixed-scale token sequence back onto the dense finest grid: `(B, D, Hf, Wf)`.

    A token of level `l` fills the `r**l x r**l` finest cells it covers, a finest token its own cell; CLS, padding and
    inactive candidates are dropped. Works for both execution paths, since it reads only which candidate each
    position holds.

    Args:
        hidden_states: `(B, L, D)` per-position vectors (encoder outputs, or anything computed per token).
        token_index: `(B, L)` long, 0 for CLS and `1 + c` for candidate `c` (as `MSViTModel` returns it).
        token_mask: `(B, L)` bool, True on active tokens (CLS included).
        tree: the image size's `ScaleTree` (`MSViTModel.scale_tree(height, width)`).

    Every finest cell is covered by exactly one active token when the mask comes from top-down decisions, as every
    MSViT output does.
    """
    batch_size, length, dim = hidden_states.shape
    num_candidates = tree.num_candidates
    is_candidate = token_mask & (token_index > 0)
    # position of each active candidate in the sequence, -1 if inactive; one extra slot (-1) absorbs everything else
    slot = torch.where(is_candidate, token_index - 1, num_candidates)
    positions = torch.arange(length, device=token_index.device).expand(batch_size, -1)
    position_of = torch.full((batch_size, num_candidates + 1), -1, dtype=torch.long, device=token_index.device)
    position_of = position_of.scatter(1, slot, torch.where(is_candidate, positions, -1))
    # each finest cell reads its own token, else the nearest active ancestor's
    source = position_of[:, tree.cell_chain[0]]
    for chain in tree.cell_chain[1:]:
        source = torch.where(source >= 0, source, position_of[:, chain])
    grid = gather_tokens(hidden_states, source)
    return grid.transpose(1, 2).reshape(batch_size, dim, *tree.fine_grid)


def token_sizes(token_index: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Finest grid cells each candidate position stands for `(B, L)`, whether active or not: `r**(2l)` for a token of
    level `l`, 1 for a finest token and for CLS (index 0), from a `(B, L)` token index (`1 + c` for candidate `c`)."""
    return torch.cat([tree.cells.new_ones(1), tree.cells])[token_index]


def token_cell_counts(token_index: torch.Tensor, token_mask: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Finest grid cells each position stands for `(B, L)`: `token_sizes` on active tokens, 0 for CLS, padding and
    inactive candidates."""
    return torch.where(token_mask & (token_index > 0), token_sizes(token_index, tree), 0)


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
    """Mark exactly `num_split` nodes per image, those with the highest logits: `(B, D)` bool."""
    split_mask = torch.zeros_like(split_logits, dtype=torch.bool)
    if num_split == 0:
        return split_mask
    return split_mask.scatter(1, split_logits.topk(num_split, dim=1).indices, True)


def top_down_key(scores: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Per-decision keys `(B, D)` whose ranking is top-down: the smaller of a node's score and the float just below its
    parent's key, so every child ranks strictly below its parent and any top-k set holds its nodes' ancestors. Taking
    nodes in this order is best-first expansion (always split the highest-scoring node whose parent is split). With
    two scales the key is the score itself."""
    if tree.num_scales == 2:
        return scores
    key = scores.float()
    for _ in range(tree.num_scales - 2):
        parent_key = _parent_values(key, tree, float("inf"))[:, : tree.num_decisions]
        key = torch.minimum(scores.float(), torch.nextafter(parent_key, torch.full_like(parent_key, -float("inf"))))
    return key


def ranked_split_mask(scores: torch.Tensor, num_split: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
    """Each image splits its `num_split` `(B, 1)` highest-scoring nodes top-down (`top_down_key`; ties in decision
    order): `(B, D)` effective decisions with a count per image. With two scales, its top-`num_split` regions."""
    rank = top_down_key(scores, tree).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return rank < num_split


def budget_split_mask(split_logits: torch.Tensor, num_split: int, tree: ScaleTree) -> torch.Tensor:
    """Split exactly `num_split` nodes per image, top-down by the gate's ranking (`top_down_key`), in one `topk`:
    `(B, D)` effective decisions. With two scales this is `topk_split_mask`."""
    return topk_split_mask(top_down_key(split_logits, tree), num_split)


__all__ = [
    "ScaleTree",
    "attention_key_bias",
    "budget_split_mask",
    "build_scale_tree",
    "by_decision",
    "candidate_active_mask",
    "candidate_mask_values",
    "close_splits",
    "gather_tokens",
    "gathered_token_index",
    "grid_patches",
    "grid_positions",
    "length_buckets",
    "level_images",
    "level_regions",
    "packed_token_rows",
    "padded_token_rows",
    "patchify",
    "ranked_split_mask",
    "reachable_decisions",
    "region_neighbourhoods",
    "token_cell_counts",
    "token_counts",
    "token_sizes",
    "tokens_to_grid",
    "top_down_key",
    "topk_split_mask",
]
