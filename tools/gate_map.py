"""Draw MSViT gate maps: which token of which scale stands for each part of the image.

Every active token's box is outlined, and its pixels are dimmed by its level: the finest tokens keep full brightness
and are outlined in orange, the largest ones are dimmed to 45 % and outlined in white, the levels between (three or
more patch sizes) are dimmed linearly in between and outlined in sky blue. With two patch sizes this is the classic
picture: kept coarse regions dimmed and outlined white, split ones bright with their fine tokens outlined orange.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw

from modeling_msvit.mixed_scale_tokens import ScaleTree, candidate_active_mask, close_splits


SPLIT_COLOUR = (255, 140, 0)  # the finest tokens
INTERMEDIATE_COLOUR = (0, 190, 255)  # the levels between the finest and the largest (three or more patch sizes)
COARSE_COLOUR = (255, 255, 255)  # the largest tokens
FINEST_BRIGHTNESS = 1.0
COARSEST_BRIGHTNESS = 0.45


def level_brightness(num_scales: int) -> np.ndarray:
    """The brightness factor of each level's tokens `(S,)`, finest first: 1.0 down to 0.45, linearly."""
    return np.linspace(FINEST_BRIGHTNESS, COARSEST_BRIGHTNESS, num_scales)


def level_colour(level: int, num_scales: int) -> tuple[int, int, int]:
    """The outline colour of a level's tokens: orange for the finest, white for the largest, sky blue between."""
    if level == 0:
        return SPLIT_COLOUR
    return COARSE_COLOUR if level == num_scales - 1 else INTERMEDIATE_COLOUR


def active_token_cells(split_mask: torch.Tensor, tree: ScaleTree) -> list[tuple[int, int, int, int, int]]:
    """The active tokens of one image as `(level, top, left, bottom, right)` finest-grid cells (bottom and right
    exclusive), in candidate order, from its `(D,)` decisions (marks under a kept node are ignored)."""
    tree = tree.to("cpu")
    split_mask = close_splits(split_mask.reshape(1, -1).bool().cpu(), tree)
    active = candidate_active_mask(split_mask, tree)[0].numpy()
    level, (top, left, span) = tree.level.numpy(), tree.candidate_boxes().numpy().T
    return [
        (int(level[c]), int(top[c]), int(left[c]), int(top[c] + span[c]), int(left[c] + span[c]))
        for c in np.flatnonzero(active)
    ]


def render_gate_map(image: Image.Image, split_mask: torch.Tensor, tree: ScaleTree) -> Image.Image:
    """Overlay one image's decisions on `image` (already at the model's input size).

    Args:
        image: the image the model saw, at its input size.
        split_mask: `(D,)` the image's effective decisions, as a model's `split_mask` holds them (one per decision
            node of `tree`; with two patch sizes, the coarse regions in raster order).
        tree: the input size's `ScaleTree` (`model.base_model.scale_tree(height, width)`).

    Each active token is outlined in its level's colour and its pixels scaled by its level's brightness
    (`level_colour`, `level_brightness`): the finest tokens full brightness in orange, the largest dimmed to 45 % in
    white, any levels between dimmed in between in sky blue.
    """
    fine_h, fine_w = tree.fine_grid
    width, height = image.size
    cell_h, cell_w = height / fine_h, width / fine_w
    tokens = active_token_cells(split_mask, tree)
    brightness = level_brightness(tree.num_scales)
    cell_brightness = np.full((fine_h, fine_w), brightness[0])
    for level, top, left, bottom, right in tokens:
        cell_brightness[top:bottom, left:right] = brightness[level]
    # the finest cell of every pixel row and column
    pixel_rows = np.minimum(np.arange(height) * fine_h // height, fine_h - 1)
    pixel_columns = np.minimum(np.arange(width) * fine_w // width, fine_w - 1)
    dim = cell_brightness[pixel_rows[:, None], pixel_columns[None, :]][..., None]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    canvas = Image.fromarray((pixels * dim).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for level, top, left, bottom, right in tokens:
        box = (left * cell_w, top * cell_h, right * cell_w - 1, bottom * cell_h - 1)
        draw.rectangle(box, outline=level_colour(level, tree.num_scales))
    return canvas


def side_by_side(panels: list[Image.Image], captions: list[str], caption_height: int = 18) -> Image.Image:
    """Concatenate same-height panels horizontally with a caption under each."""
    width = sum(panel.width for panel in panels) + 4 * (len(panels) - 1)
    height = max(panel.height for panel in panels) + caption_height
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    left = 0
    for panel, caption in zip(panels, captions):
        sheet.paste(panel, (left, 0))
        draw.text((left + 4, panel.height + 3), caption, fill=(0, 0, 0))
        left += panel.width + 4
    return sheet


def stacked(rows: list[Image.Image], titles: list[str] | None = None, title_height: int = 16) -> Image.Image:
    """Stack images vertically, left-aligned, each under its title when `titles` are given."""
    band = title_height if titles else 0
    sheet = Image.new("RGB", (max(row.width for row in rows), sum(row.height + band for row in rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    top = 0
    for index, row in enumerate(rows):
        if titles:
            draw.text((4, top + 2), titles[index], fill=(0, 0, 0))
        sheet.paste(row, (0, top + band))
        top += row.height + band
    return sheet
