"""The segmentation results pipeline, end to end at a tiny size, and its target bookkeeping."""

import functools
import json
import math
import shutil

import pytest

from modeling_msvit import MSViTConfig
from msvit.experiments.segmentation_pipeline import (
    DOCS_END,
    DOCS_START,
    SegmentationPipelineArguments,
    check_target,
    gate_thresholds,
    main,
)
from msvit.train import run_segmentation
from tests.test_data import requires_real_data


TINY = [
    "--canvas_size", "32", "--patch_size", "4", "--coarse_patch_size", "8", "--hidden_size", "16", "--depth", "1",
    "--heads", "2", "--max_train_samples", "24", "--max_eval_samples", "8", "--batch_size", "8",
    "--fine_epochs", "1", "--joint_epochs", "2", "--budgets", "0.25", "0.5", "--target_fine_ratio", "0.5",
    "--threshold_drops", "0.01",
]  # fmt: skip


def row(mean_iou: float, gmacs: float) -> dict:
    return {"mean_iou": mean_iou, "gmacs": gmacs}


def test_check_target_picks_the_cheapest_setting_within_one_point():
    reference = row(0.60, 10.0)
    rows = {
        "fine_ratio=0.25": row(0.55, 4.0),  # too inaccurate
        "fine_ratio=0.5": row(0.595, 5.5),  # within 1 point, 55 % of the GMACs
        "fine_ratio=0.75": row(0.61, 8.0),
    }
    target = check_target(rows, reference)
    assert target["cheapest_within_target_drop"]["setting"] == "fine_ratio=0.5"
    assert target["cheapest_within_target_drop"]["gmacs_ratio"] == pytest.approx(0.55)
    assert target["cheapest_within_target_drop"]["miou_drop"] == pytest.approx(0.005)
    assert target["met"]
    rows["fine_ratio=0.5"] = row(0.58, 5.5)
    target = check_target(rows, reference)
    assert target["cheapest_within_target_drop"]["setting"] == "fine_ratio=0.75" and not target["met"]
    assert check_target(rows, row(0.70, 10.0))["cheapest_within_target_drop"] is None


def test_gate_thresholds_are_predicted_loss_drops_for_a_counterfactual_gate():
    config = MSViTConfig(counterfactual_target_scale=20.0)
    counterfactual = SegmentationPipelineArguments(threshold_drops=[0.0, 0.05])
    # the split logit is target_scale x the predicted drop: 0.05 nats -> logit 1
    assert gate_thresholds(counterfactual, config) == {
        "threshold_drop=0.0": 0.5,
        "threshold_drop=0.05": pytest.approx(1 / (1 + math.exp(-1.0))),
    }
    straight_through = SegmentationPipelineArguments(gate_objective="straight_through", thresholds=[0.3, 0.5])
    assert gate_thresholds(straight_through, config) == {"threshold=0.3": 0.3, "threshold=0.5": 0.5}


@requires_real_data
def test_pipeline_runs_every_stage_of_both_decoders_and_writes_the_results(tmp_path, monkeypatch, capsys):
    # every stage reads the same scenes: compose them once
    loader = functools.cache(run_segmentation.load_segmentation_splits)
    monkeypatch.setattr(run_segmentation, "load_segmentation_splits", loader)
    page = tmp_path / "docs" / "segmentation.md"  # one folder down, as in the repository
    page.parent.mkdir()
    page.write_text(f"intro\n{DOCS_START}\nPLACEHOLDER\n{DOCS_END}\noutro\n")
    output, results_dir = tmp_path / "runs", tmp_path / "results"
    argv = [*TINY, "--output_dir", str(output), "--results_dir", str(results_dir), "--docs", str(page),
            "--checkpointing_steps", "3"]  # fmt: skip
    report = main(argv)
    evaluations = [
        f"{model}-{name}"
        for model in ("gate", "joint", "gate-on-matched")
        for name in (
            "budgets-validation",
            "budgets-test",
            "threshold_drop=0.01-validation",
            "threshold_drop=0.01-test",
        )
    ]
    stages = ["full-token", "all-coarse", "gate", "joint", "full-token-matched", "gate-on-matched", *evaluations]
    decoders = ("linear", "mask_transformer")
    assert set(report["stage_seconds"]) == {f"{decoder}/{name}" for decoder in decoders for name in stages}
    assert list(report["decoders"]) == list(decoders)
    gate_config = json.loads((output / "linear" / "gate" / "model" / "config.json").read_text())
    assert gate_config["gate_objective"] == "counterfactual" and gate_config["size_aware_attention"]
    assert gate_config["decoder_type"] == "linear"
    mask_config = json.loads((output / "mask_transformer" / "joint" / "model" / "config.json").read_text())
    assert mask_config["decoder_type"] == "mask_transformer"
    # the drop threshold becomes a split probability through the model's target scale (1): sigmoid(0.01)
    probability = 1 / (1 + math.exp(-0.01))
    for decoder in decoders:
        results = report["decoders"][decoder]
        validation = results["validation"]
        assert set(validation["msvit"]) == set(results["target"]) == {"frozen", "fine-tuned", "frozen-matched"}
        for tuning, msvit in validation["msvit"].items():
            assert set(msvit) == {"fine_ratio=0.25", "fine_ratio=0.5", "all_fine", "all_coarse", "threshold_drop=0.01"}
            assert msvit["threshold_drop=0.01"]["gate_threshold"] == pytest.approx(probability)
            # 32 px, coarse 8: 16 regions of 4 fine tokens; a fixed budget gives exact token counts
            assert msvit["fine_ratio=0.25"]["tokens"] == 1 + 16 + 3 * 4
            assert msvit["all_fine"]["tokens"] == 1 + 64 and msvit["all_coarse"]["tokens"] == 1 + 16
            # the same MSViT weights all fine cost what the full-token model costs
            assert msvit["all_fine"]["gmacs"] == pytest.approx(validation["full-token"]["gmacs"])
            assert set(results["test"]["msvit"][tuning]) == {"fine_ratio=0.5", "threshold_drop=0.01"}
        # a frozen MSViT is its full-token model with a gate: all fine, it scores what that model scores
        for tuning, reference in (("frozen", "full-token"), ("frozen-matched", "full-token-matched")):
            all_fine = validation["msvit"][tuning]["all_fine"]["mean_iou"]
            assert all_fine == pytest.approx(validation[reference]["mean_iou"], abs=1e-6)
        # each target compares with its reference: the frozen MSViT with the full-token model, the others with the
        # full-token model trained as long
        references = (
            ("frozen", "full-token"),
            ("fine-tuned", "full-token-matched"),
            ("frozen-matched", "full-token-matched"),
        )
        for tuning, reference in references:
            assert results["target"][tuning] == check_target(validation["msvit"][tuning], validation[reference])
        assert validation["full-token-matched"]["gmacs"] == validation["full-token"]["gmacs"]
        # the matched reference trains as many epochs as joint (no adapt; the gate's leaves the backbone frozen):
        # 2 x (24 scenes / batch 8) steps, as the joint stage
        assert validation["full-token-matched"]["step"] == 6
        assert json.loads((output / decoder / "joint" / "results.json").read_text())["validation"]["step"] == 6
    # the mask transformer's decoder costs more than the linear one
    full_gmacs = {decoder: report["decoders"][decoder]["validation"]["full-token"]["gmacs"] for decoder in decoders}
    assert full_gmacs["mask_transformer"] > full_gmacs["linear"]
    saved = json.loads((results_dir / "results.json").read_text())
    assert saved["decoders"]["mask_transformer"]["target"] == report["decoders"]["mask_transformer"]["target"]
    for name in ("table.md", "miou_vs_gmacs.png", "predictions-linear.png", "predictions-mask_transformer.png"):
        assert (results_dir / name).is_file(), name
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "PLACEHOLDER" not in text
    assert "| linear | MSViT, frozen backbone | fine ratio 0.25 (fixed budget) |" in text
    assert (
        "| mask transformer | MSViT, fine-tuned (joint) | gate threshold: predicted loss drop > 0.01 nats (p > 0.502) "
        in text
    )
    assert "Linear decoder, MSViT, frozen backbone, validation:" in text
    # figures linked relative to the page
    assert "](../results/miou_vs_gmacs.png)" in text and "](../results/predictions-mask_transformer.png)" in text

    # a second run reads the finished stages instead of training them again
    again = main(argv)
    # ... and keeps the time each took when it ran; the evaluations run (and are timed) again
    trained = {f"{decoder}/{name}" for decoder in decoders for name in stages if name not in evaluations}
    assert set(again["stage_seconds"]) == set(report["stage_seconds"])
    assert {name: again["stage_seconds"][name] for name in trained} == {
        name: report["stage_seconds"][name] for name in trained
    }
    assert again["decoders"] == report["decoders"]

    # an interrupted stage resumes from its last checkpoint and ends where the uninterrupted one did
    joint = output / "linear" / "joint"
    finished = json.loads((joint / "results.json").read_text())
    (joint / "results.json").unlink()
    shutil.rmtree(joint / "checkpoints" / "step_6")
    capsys.readouterr()
    resumed = main(argv)
    assert "== linear/joint (resuming from step_3) ==" in capsys.readouterr().out
    assert set(resumed["stage_seconds"]) == set(report["stage_seconds"])
    assert {name: resumed["stage_seconds"][name] for name in trained - {"linear/joint"}} == {
        name: report["stage_seconds"][name] for name in trained - {"linear/joint"}
    }
    records = [json.loads(line) for line in (joint / "metrics.jsonl").read_text().splitlines()]
    # the log keeps the first epoch's evaluation and the resumed run writes the rest once
    assert [(record.get("split", "train"), record["step"]) for record in records] == [
        ("validation", 3), ("train", 6), ("validation", 6), ("test", 6)
    ]  # fmt: skip
    again_validation = json.loads((joint / "results.json").read_text())["validation"]
    for metric in ("mean_iou", "pixel_accuracy", "step"):
        assert again_validation[metric] == pytest.approx(finished["validation"][metric], abs=1e-6), metric
