import json

import torch
from PIL import Image
from transformers import ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from msvit.experiments import photo_demo
from msvit.tools import export
from msvit.tools.gate_map import render_gate_map
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
    gate_map = render_gate_map(image, split_mask, (2, 2), ratio=2)
    assert gate_map.size == (64, 64)
    assert gate_map.getpixel((8, 8)) == (200, 200, 200)  # inside a fine token of the split region
    assert gate_map.getpixel((48, 48)) == (90, 90, 90)  # inside a kept region: dimmed to 45 %
