"""The segmentation results pipeline, end to end at a tiny size, and its target bookkeeping."""

import json

import pytest

from tests.test_data import requires_real_data
from train.segmentation_pipeline import README_END, README_START, check_target, main


TINY = [
    "--canvas_size", "32", "--patch_size", "4", "--coarse_patch_size", "8", "--hidden_size", "16", "--depth", "1",
    "--heads", "2", "--max_train_samples", "24", "--max_eval_samples", "8", "--batch_size", "8",
    "--fine_epochs", "1", "--adapt_epochs", "1", "--joint_epochs", "1", "--budgets", "0.25", "0.5",
    "--target_fine_ratio", "0.5", "--thresholds", "0.4",
]  # fmt: skip


def row(mean_iou: float, gmacs: float) -> dict:
    return {"mean_iou": mean_iou, "gmacs": gmacs}


def test_check_target_picks_the_cheapest_setting_within_one_point():
    validation = {
        "full-token": row(0.50, 10.0),  # trained for less: not the reference
        "full-token-matched": row(0.60, 10.0),
        "msvit": {
            "fine_ratio=0.25": row(0.55, 4.0),  # too inaccurate
            "fine_ratio=0.5": row(0.595, 5.5),  # within 1 point, 55 % of the GMACs
            "fine_ratio=0.75": row(0.61, 8.0),
        },
    }
    target = check_target(validation)
    assert target["cheapest_within_target_drop"]["setting"] == "fine_ratio=0.5"
    assert target["cheapest_within_target_drop"]["gmacs_ratio"] == pytest.approx(0.55)
    assert target["met"]
    validation["msvit"]["fine_ratio=0.5"] = row(0.58, 5.5)
    target = check_target(validation)
    assert target["cheapest_within_target_drop"]["setting"] == "fine_ratio=0.75" and not target["met"]


@requires_real_data
def test_pipeline_runs_every_stage_and_writes_the_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nPLACEHOLDER\n{README_END}\noutro\n")
    output, results_dir = tmp_path / "runs", tmp_path / "results"
    argv = [*TINY, "--output_dir", str(output), "--results_dir", str(results_dir), "--readme", str(readme)]
    report = main(argv)
    assert set(report["stage_seconds"]) == {
        "full-token", "all-coarse", "adapt", "gate", "joint", "full-token-matched", "budgets-validation",
        "budgets-test", "threshold-0.4-validation", "threshold-0.4-test",
    }  # fmt: skip
    assert set(report["validation"]["msvit"]) == {
        "fine_ratio=0.25", "fine_ratio=0.5", "threshold=0.5", "all_fine", "all_coarse", "threshold=0.4",
    }  # fmt: skip
    # 32 px, coarse 8: 16 regions of 4 fine tokens; a fixed budget gives exact token counts
    msvit = report["validation"]["msvit"]
    assert msvit["fine_ratio=0.25"]["tokens"] == 1 + 16 + 3 * 4
    assert msvit["all_fine"]["tokens"] == 1 + 64 and msvit["all_coarse"]["tokens"] == 1 + 16
    # the same MSViT weights all fine cost what the full-token model costs
    assert msvit["all_fine"]["gmacs"] == pytest.approx(report["validation"]["full-token"]["gmacs"])
    assert report["validation"]["full-token-matched"]["gmacs"] == report["validation"]["full-token"]["gmacs"]
    # the matched reference trains as many epochs as adapt + joint: 2 x (24 scenes / batch 8) steps
    assert report["validation"]["full-token-matched"]["step"] == 6
    assert set(report["test"]["msvit"]) == {"fine_ratio=0.5", "threshold=0.5", "threshold=0.4"}
    assert json.loads((results_dir / "results.json").read_text())["target"] == report["target"]
    for name in ("table.md", "miou_vs_gmacs.png", "predictions.png"):
        assert (results_dir / name).is_file(), name
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "PLACEHOLDER" not in text
    assert "| MSViT | fine ratio 0.25 (fixed budget) |" in text and "results/miou_vs_gmacs.png" in text

    # a second run reads the finished stages instead of training them again
    again = main(argv)
    assert set(again["stage_seconds"]) == {
        "budgets-validation", "budgets-test", "threshold-0.4-validation", "threshold-0.4-test",
    }  # fmt: skip
    assert again["validation"] == report["validation"]
