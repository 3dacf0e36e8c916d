"""The gate study driver end to end at a tiny size, and the split-policy evaluation it is built on."""

import json

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from modeling_msvit import MSViTForImageClassification
from tests.test_train_classification import needs_data
from train.gate_training import content_regions, evaluate_split_policy


def test_content_regions_and_split_rates_by_hand(config):
    pixel_values = torch.full((2, 3, 32, 32), -1.0)
    pixel_values[0, :, 0:4, 0:4] = 1.0  # region 0 of image 0 holds content
    pixel_values[1, :, 30:32, 30:32] = 0.5  # region 15 of image 1
    content = content_regions(pixel_values, 8)
    assert content.sum() == 2 and content[0, 0] and content[1, 15]

    model = MSViTForImageClassification(config).eval()
    labels = torch.tensor([0, 1])
    measured = evaluate_split_policy(model, pixel_values, labels, policy="content")
    assert measured["split_rate_content"] == 1.0 and measured["split_rate_empty"] == 0.0
    assert measured["tokens"] == 1 + 16 + 3 and measured["fine_ratio"] == 1 / 16
    measured = evaluate_split_policy(model, pixel_values, labels, policy="all_coarse")
    assert measured["tokens"] == 17 and measured["split_rate_content"] == 0.0
    model.set_budget(threshold=0.3)
    measured = evaluate_split_policy(model, pixel_values, labels, fine_ratio=0.25)
    assert measured["tokens"] == 1 + 16 + 3 * 4
    assert model.config.fine_ratio_budget is None and model.config.gate_threshold == 0.3  # the saved knob is restored


@needs_data
def test_gate_study_runs_resumes_and_rewrites_the_readme(tmp_path):
    from train.gate_study import README_END, README_START, main

    torch.set_num_threads(1)
    backbone = tmp_path / "vit"
    vit_config = ViTConfig(
        image_size=64, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    ViTForImageClassification(vit_config).save_pretrained(backbone)
    ViTImageProcessorPil(size={"height": 64, "width": 64}, image_mean=0.5, image_std=0.5).save_pretrained(backbone)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{README_START}\nold\n{README_END}\nafter\n")
    arguments = ["--backbone", str(backbone), "--output_dir", str(tmp_path / "study"), "--seeds", "0", "--ratios",
                 "0.5", "--max_train_samples", "64", "--max_eval_samples", "32",
                 "--readme", str(readme)]  # fmt: skip
    rows = main(arguments)
    fixed = {"all_fine", "all_coarse", "content"}
    at_ratio = {"random", "centre", "entropy", "std", "counterfactual", "straight_through"}
    ablations = {f"counterfactual ({name})" for name in ("flips=4", "target_scale=1", "layouts=uniform")}
    extra = {"all_fine, fine-tuned", "adapt + counterfactual"}
    assert {row["kind"] for row in rows.values()} == fixed | at_ratio | ablations | extra
    assert len(rows) == 2 * (len(fixed) + len(at_ratio)) + len(ablations) + len(extra)  # size-aware on and off
    for row in rows.values():
        expected_tokens = {"all_fine": 65, "all_fine, fine-tuned": 65, "all_coarse": 17}.get(
            row["kind"], 1 + 16 + 3 * 8
        )
        if row["kind"] != "content":
            assert row["test"]["tokens"] == expected_tokens
    # the rule gates have no weights: size-aware attention changes their accuracy, not their choices
    on, off = rows["entropy|size_aware=True|ratio=0.5"], rows["entropy|size_aware=False|ratio=0.5"]
    assert on["test"]["split_rate_content"] == off["test"]["split_rate_content"]
    text = readme.read_text()
    assert "old" not in text and "| counterfactual | on | 0.5 | 1 |" in text and text.endswith("after\n")

    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved == rows
    mtime = (tmp_path / "study" / "results.json").stat().st_mtime
    main(arguments)  # finished rows are not run again
    assert (tmp_path / "study" / "results.json").stat().st_mtime == mtime
