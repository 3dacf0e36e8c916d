import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from modeling_msvit.mixed_scale_tokens import build_scale_tree
from msvit.experiments import photo_demo
from msvit.tools import export
from msvit.tools.gate_map import COARSE_COLOUR, INTERMEDIATE_COLOUR, SPLIT_COLOUR, render_gate_map
from tests.conftest import tiny_vit_config


def test_demo_writes_gate_maps_report_and_a_reloadable_hub_folder(tmp_path):
    report = photo_demo.main(["--output", str(tmp_path), "--budgets", "0.5"])
    assert {row["image"] for row in report["images"]} == set(photo_demo.PHOTOS)
    for row in report["images"]:
        assert row["tokens"] == 1 + 49 + 3 * row["split_regions"]
        assert (tmp_path / "gate_maps" / f"{row['image']}.png").is_file()
    assert report["fixed_budgets"] == [{"fine_ratio_budget": 0.5, "tokens": 1 + 49 + 3 * 24, "gmacs": 0.737}]
    assert report["remote_code_reload_max_abs_logit_delta"] <= 1e-5
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "msvit-tiny-hub" / "model.safetensors").is_file()


def test_export_cli_from_a_saved_vit(tmp_path, pixel_values):
    vit = ViTForImageClassification(tiny_vit_config(num_hidden_layers=1, num_labels=3)).eval()
    vit.save_pretrained(tmp_path / "vit")
    export.main(["--from-vit", str(tmp_path / "vit"), "--output", str(tmp_path / "hub"), "--coarse-patch-size", "16"])
    msvit = MSViTForImageClassification.from_pretrained(tmp_path / "hub").eval()
    assert msvit.config.coarse_patch_size == 16
    all_split = torch.ones(8, 4, dtype=torch.bool)
    assert (msvit(pixel_values, split_mask=all_split).logits - vit(pixel_values).logits).abs().max() <= 1e-4


def test_gate_map_dims_kept_regions_and_keeps_split_ones():
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    split_mask = torch.tensor([True, False, False, False])
    gate_map = render_gate_map(image, split_mask, build_scale_tree((4, 4), 2, 2))
    assert gate_map.size == (64, 64)
    assert gate_map.getpixel((8, 8)) == (200, 200, 200)  # inside a fine token of the split region
    assert gate_map.getpixel((48, 48)) == (90, 90, 90)  # inside a kept region: dimmed to 45 %


def two_scale_gate_map_reference(
    image: Image.Image, split_mask: torch.Tensor, coarse_grid: tuple[int, int], ratio: int
) -> Image.Image:
    """The two-scale `render_gate_map` the tree-based one replaced, verbatim: the reference it must match."""
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


@pytest.mark.parametrize(
    "image_size, fine_grid, ratio",
    [((64, 64), (4, 4), 2), ((96, 64), (4, 6), 2), ((48, 48), (6, 6), 3), ((224, 224), (14, 14), 2)],
)
def test_gate_map_with_two_scales_is_pixel_identical_to_the_two_scale_drawing(image_size, fine_grid, ratio):
    generator = torch.Generator().manual_seed(0)
    width, height = image_size
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels)
    tree = build_scale_tree(fine_grid, ratio, 2)
    coarse_grid = tree.level_grids[1]
    masks = [torch.zeros(tree.num_decisions, dtype=torch.bool), torch.ones(tree.num_decisions, dtype=torch.bool)]
    masks += [torch.rand(tree.num_decisions, generator=generator) < 0.5 for _ in range(4)]
    for split_mask in masks:
        expected = two_scale_gate_map_reference(image, split_mask, coarse_grid, ratio)
        assert np.array_equal(np.asarray(render_gate_map(image, split_mask, tree)), np.asarray(expected))


def test_gate_map_with_three_scales_dims_and_outlines_each_level():
    # 32 px image, 4 px finest patches: 2 x 2 top regions of 16 px over 4 x 4 cells of 8 px over 8 x 8 cells of 4 px;
    # decisions 0-3 are the top regions, 4 + 4 * j + k child k of region j
    image = Image.new("RGB", (32, 32), (200, 200, 200))
    tree = build_scale_tree((8, 8), 2, 3)
    split_mask = torch.zeros(tree.num_decisions, dtype=torch.bool)
    split_mask[[0, 4]] = True  # the top-left region, and its top-left 8 px child
    gate_map = render_gate_map(image, split_mask, tree)
    assert gate_map.size == (32, 32)
    # finest tokens (x, y in 0 ... 7): full brightness, orange outlines
    assert gate_map.getpixel((1, 1)) == (200, 200, 200)
    assert gate_map.getpixel((6, 5)) == (200, 200, 200)
    for corner in [(0, 0), (3, 3), (4, 0), (7, 7)]:
        assert gate_map.getpixel(corner) == SPLIT_COLOUR
    # the top-left region's kept 8 px children: dimmed to 72.5 %, sky-blue outlines
    for inside in [(11, 3), (3, 11), (12, 12)]:
        assert gate_map.getpixel(inside) == (145, 145, 145)
    for corner in [(8, 0), (15, 7), (0, 8), (15, 15)]:
        assert gate_map.getpixel(corner) == INTERMEDIATE_COLOUR
    # the three kept 16 px regions: dimmed to 45 %, white outlines
    for inside in [(24, 8), (8, 24), (24, 24)]:
        assert gate_map.getpixel(inside) == (90, 90, 90)
    for corner in [(16, 0), (31, 15), (0, 16), (31, 31)]:
        assert gate_map.getpixel(corner) == COARSE_COLOUR
    # marks under a kept node do not count
    stray = split_mask.clone()
    stray[4 + 4 * 3] = True  # a child of the kept bottom-right region
    assert np.array_equal(np.asarray(render_gate_map(image, stray, tree)), np.asarray(gate_map))
