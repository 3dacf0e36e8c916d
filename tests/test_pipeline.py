"""The main job (`experiments/pipeline.py`) end to end on tiny runs: on a backbone it trains, and on a saved
DeiT-style ViT with an image folder; its report, export choice, Hub export and README summary."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTImageProcessorPil,
    ViTConfig,
    ViTForImageClassification,
)

from modeling_msvit import MSViTForImageClassification
from msvit.experiments.pipeline import README_END, README_START, Pipeline, main, parse_arguments, resized_vit, row_key
from msvit.train.gate_training import with_new_gate
from tests.test_hub_export import REMOTE_LOGITS, load_in_clean_process
from tests.test_train_classification import needs_data


TINY = ["--hidden_size", "32", "--depth", "1", "--heads", "2", "--batch_size", "32", "--gate_train_samples", "64",
        "--timing_images", "32", "--timing_repeats", "1"]  # fmt: skip
GATES = ("entropy rule (training-free)", "std rule (training-free)", "straight-through gate (paper)",
         "counterfactual gate")  # fmt: skip


def cheapest_within(rows: list[dict], gated: set[str], floor: float) -> dict:
    within = [row for row in rows if row["policy"] in gated and row["validation"]["accuracy"] >= floor]
    return min(within, key=lambda row: (row["validation"]["gmacs"], -row["validation"]["accuracy"]))


@needs_data
def test_pipeline_trains_a_backbone_and_reports_every_policy(tmp_path):
    torch.set_num_threads(1)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nPLACEHOLDER\n{README_END}\nrest\n")
    pipeline = Pipeline(parse_arguments(
        ["--output_dir", str(tmp_path / "run"), "--train_backbone", "--max_train_samples", "96", "--max_eval_samples",
         "32", "--backbone_epochs", "1", "--fine_ratios", "0.25", "0.5", "--max_accuracy_drop", "5",
         "--readme", str(readme), *TINY]
    ))  # fmt: skip
    report = pipeline.run()
    rows = {(row["policy"], row["budget"]): row for row in report["rows"]}
    # converted with size-aware attention, all fine is the backbone's own forward
    assert rows["all fine", "-"]["test"]["accuracy"] == report["backbone"]["test_accuracy"]
    assert rows["all fine", "-"]["test"]["tokens"] == 65 and rows["all coarse", "-"]["test"]["tokens"] == 17
    residual = next(name for name, _ in rows if name.startswith("residual gate"))
    # it starts from the rule with the better mean validation top-1 at the fixed budgets
    mean = {rule: sum(rows[f"{rule} rule (training-free)", f"ratio={ratio}"]["validation"]["accuracy"]
                      for ratio in (0.25, 0.5)) for rule in ("entropy", "std")}  # fmt: skip
    assert residual == f"residual gate ({max(mean, key=mean.get)} + learned correction)"
    for name in ("random regions", *GATES, residual):
        for ratio, splits in ((0.25, 4), (0.5, 8)):  # 16 regions of 16 px on the 64 px canvas
            assert rows[name, f"ratio={ratio}"]["test"]["tokens"] == 1 + 16 + 3 * splits
    # the thresholds: ragged counts between all coarse and all fine, fewer for a higher threshold
    thresholds = [(name, "drop>0.08", "drop>0.2") for name in ("counterfactual gate", residual)]
    thresholds += [(f"{rule} rule (training-free)", "score>0.1", "score>0.3") for rule in ("entropy", "std")]
    for name, low, high in thresholds:
        assert 17 <= rows[name, high]["test"]["tokens"] <= rows[name, low]["test"]["tokens"] <= 65
    assert all(row["speedup_vs_backbone"] > 0 for row in report["rows"])
    # what is timed is each row's own setting (one model serves every budget of its policy)
    pixel_values = pipeline.data["test"][0]
    runners = {row_key(row): pipeline.runner(row) for row in report["rows"]}  # all made first, as timed
    for row in report["rows"]:
        with torch.no_grad():
            tokens = runners[row_key(row)](pixel_values).token_counts.double().mean().item()
        assert tokens == pytest.approx(row["test"]["tokens"]), row_key(row)
    assert rows["all fine", "-"]["test"]["gmacs"] > rows["counterfactual gate", "ratio=0.5"]["test"]["gmacs"]
    # the export: the cheapest gated setting within 5 points of all fine on validation
    exported = report["exported"]
    floor = rows["all fine", "-"]["validation"]["accuracy"] - 0.05
    assert exported["validation_floor"] == pytest.approx(floor)
    chosen = cheapest_within(report["rows"], {*GATES, residual}, floor)
    assert (exported["policy"], exported["budget"]) == (chosen["policy"], chosen["budget"])
    output = tmp_path / "run"
    for name in ("report.md", "report.json", "accuracy_vs_gmacs.png", "gate_maps.png"):
        assert (output / name).is_file()
    assert (output / "report.md").read_text().count("\n| ") == 1 + len(report["rows"])
    summary = readme.read_text()
    assert summary.startswith(f"intro\n{README_START}\n") and summary.endswith(f"{README_END}\nrest\n")
    assert "PLACEHOLDER" not in summary and "| all fine | - |" in summary and "Exported" in summary
    # the Hub folder reloads with its own code in a clean process, at the exported budget
    hub = output / "msvit" / "hub"
    PIL.Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype("uint8")).save(
        hub.parent / "photo.png"
    )
    remote = load_in_clean_process(hub, tmp_path, REMOTE_LOGITS)
    local = MSViTForImageClassification.from_pretrained(hub).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], local(remote["pixel_values"]).logits[0])
    config = json.loads((hub / "config.json").read_text())
    if "ratio=" in exported["budget"]:
        assert config["fine_ratio_budget"] == float(exported["budget"].split("=")[1])
    assert exported["policy"] in (hub / "README.md").read_text()
    # an MSViT folder is a backbone too: its own (learned) gate joins the policies
    backbone = output / "backbone" / "model"
    MSViTForImageClassification.from_vit(backbone, size_aware_attention=True).save_pretrained(tmp_path / "msvit-in")
    AutoImageProcessor.from_pretrained(backbone).save_pretrained(tmp_path / "msvit-in")
    report = main(["--model_name_or_path", str(tmp_path / "msvit-in"), "--output_dir", str(tmp_path / "msvit"),
                   "--max_eval_samples", "32", "--fine_ratios", "0.5", *TINY])  # fmt: skip
    rows = {(row["policy"], row["budget"]): row for row in report["rows"]}
    assert rows["the backbone's own gate", "ratio=0.5"]["test"]["tokens"] == 41
    assert report["backbone"]["model_type"] == "msvit"


def write_image_folder(folder, per_class: int = 10) -> None:
    """Two classes of 36x36 RGB photos: a bright or a dark square on noise, at a random place."""
    rng = np.random.default_rng(0)
    for value, name in ((230, "bright"), (20, "dark")):
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = (rng.random((36, 36, 3)) * 120 + 60).astype("uint8")
            top, left = rng.integers(0, 20, size=2)
            pixels[top : top + 14, left : left + 14] = value
            PIL.Image.fromarray(pixels).save(folder / name / f"{index}.png")


def save_deit_style_vit(folder, num_labels: int = 2) -> None:
    """A non-distilled DeiT as transformers saves one: a ViT checkpoint with DeiT's processor (resize, centre crop)."""
    labels = ["bright", "dark", "grey"][:num_labels]
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, id2label=dict(enumerate(labels)),
                       label2id={name: index for index, name in enumerate(labels)})  # fmt: skip
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    DeiTImageProcessorPil(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )


def test_pipeline_on_a_saved_deit_and_an_image_folder(tmp_path):
    torch.set_num_threads(1)
    write_image_folder(tmp_path / "images")
    save_deit_style_vit(tmp_path / "deit")
    run = ["--model_name_or_path", str(tmp_path / "deit"), "--dataset", f"imagefolder:{tmp_path / 'images'}",
           "--validation_size", "0.2", "--fine_ratios", "0.5", *TINY]  # fmt: skip
    report = main([*run, "--output_dir", str(tmp_path / "run")])
    rows = {(row["policy"], row["budget"]): row for row in report["rows"]}
    assert rows["all fine", "-"]["test"]["accuracy"] == report["backbone"]["test_accuracy"]
    assert rows["all fine", "-"]["test"]["tokens"] == 17 and rows["all coarse", "-"]["test"]["tokens"] == 5
    assert rows["entropy rule (training-free)", "ratio=0.5"]["test"]["tokens"] == 1 + 4 + 3 * 2
    assert "split rate" not in (tmp_path / "run" / "report.md").read_text()  # no items known in photos
    # saved without its processor: resized to the model's size and normalised as the training scripts do
    (tmp_path / "deit" / "preprocessor_config.json").unlink()
    report = main([*run, "--output_dir", str(tmp_path / "bare")])
    assert report["rows"][0]["test"]["tokens"] == 17
    assert (tmp_path / "run" / "msvit" / "hub" / "model.safetensors").is_file()
    # --image_size: the images and the ViT's position embeddings at 48 px (9 coarse regions of 16 px)
    report = main([*run, "--output_dir", str(tmp_path / "run48"), "--image_size", "48"])
    rows = {(row["policy"], row["budget"]): row for row in report["rows"]}
    assert report["backbone"]["image_size"] == 48 and rows["all fine", "-"]["test"]["tokens"] == 37
    assert rows["all fine", "-"]["test"]["accuracy"] == report["backbone"]["test_accuracy"]


def test_pipeline_explains_what_it_cannot_run(tmp_path):
    write_image_folder(tmp_path / "images", per_class=5)
    data = ["--dataset", f"imagefolder:{tmp_path / 'images'}", "--validation_size", "0.2", "--output_dir",
            str(tmp_path / "run")]  # fmt: skip
    save_deit_style_vit(tmp_path / "three", num_labels=3)
    with pytest.raises(ValueError, match="classifies 3 classes, the data set has 2 .* --train_backbone"):
        main(["--model_name_or_path", str(tmp_path / "three"), *data])
    save_deit_style_vit(tmp_path / "deit")
    with pytest.raises(ValueError, match="not a multiple of the coarse patch 16"):
        main(["--model_name_or_path", str(tmp_path / "deit"), "--image_size", "40", *data])
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)  # fmt: skip
    DeiTForImageClassification(config).save_pretrained(tmp_path / "distilled")
    with pytest.raises(ValueError, match="distillation"):
        main(["--model_name_or_path", str(tmp_path / "distilled"), *data])
    with pytest.raises(ValueError, match="fractions strictly between 0 and 1"):
        main(["--fine_ratios", "0.5", "1.0", *data])


def test_resized_vit_is_transformers_interpolation_of_its_position_embeddings():
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    vit = ViTForImageClassification(config).eval()
    resized = resized_vit(vit, 48)
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = vit(pixel_values, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(resized(pixel_values).logits, expected)
    assert resized.config.image_size == 48 and vit.config.image_size == 32
    with pytest.raises(ValueError, match="not a multiple of the ViT's patch size 8"):
        resized_vit(vit, 44)


def test_with_new_gate_keeps_every_other_weight():
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    msvit = MSViTForImageClassification.from_vit(ViTForImageClassification(config)).eval()
    rule = with_new_gate(msvit, gate_type="std", fine_ratio_budget=0.5)
    assert rule.config.gate_type == "std" and msvit.config.gate_type == "learned"
    pixel_values = torch.randn(2, 3, 32, 32)
    all_fine = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            rule(pixel_values, split_mask=all_fine).logits, msvit(pixel_values, split_mask=all_fine).logits
        )
    with pytest.raises(ValueError, match="changes more than the gate"):
        with_new_gate(msvit, num_hidden_layers=2)
