"""Draw MSViT gate maps: which coarse regions stay one token and which are split into fine tokens."""

import numpy as np
import torch
from PIL import Image, ImageDraw


SPLIT_COLOUR = (255, 140, 0)
COARSE_COLOUR = (255, 255, 255)


def render_gate_map(
    image: Image.Image, split_mask: torch.Tensor, coarse_grid: tuple[int, int], ratio: int
) -> Image.Image:
    """Overlay the decisions on `image` (already at the model's input size).

    Kept regions are dimmed and outlined in white (one coarse token each); split regions keep full brightness and
    show their `ratio x ratio` fine tokens outlined in orange. `split_mask` is `(Nc,)` in raster order.
    """
    grid_h, grid_w = coarse_grid
    width, height = image.size
    cell_h, cell_w = height / grid_h, width / grid_w
    split = split_mask.reshape(grid_h, grid_w).cpu().numpy()
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    dim = np.kron(np.where(split, 1.0, 0.45), np.ones((round(cell_h), round(cell_w))))[..., None]
    canvas = Image.fromarray((pixels * dim).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for row in range(grid_h):
        for col in range(grid_w):
            top, left = row * cell_h, col * cell_w
            if split[row, col]:
                fine_h, fine_w = cell_h / ratio, cell_w / ratio
                for a in range(ratio):
                    for b in range(ratio):
                        box = (
                            left + b * fine_w,
                            top + a * fine_h,
                            left + (b + 1) * fine_w - 1,
                            top + (a + 1) * fine_h - 1,
                        )
                        draw.rectangle(box, outline=SPLIT_COLOUR)
            else:
                draw.rectangle((left, top, left + cell_w - 1, top + cell_h - 1), outline=COARSE_COLOUR)
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
