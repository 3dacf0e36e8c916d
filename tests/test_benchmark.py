"""The benchmark's bookkeeping: what it records, the targets it checks and the docs section it writes.

Timings themselves are not tested (the machine is shared); the run below is a tiny smoke run of the real script.
"""

import json

import pytest

from benchmarks import benchmark
from benchmarks.report import DOCS_END, DOCS_START, check_targets


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark")
    page = output / "docs" / "performance.md"  # one folder down, as in the repository
    page.parent.mkdir()
    page.write_text(f"# Title\n\n{DOCS_START}\nold table\n{DOCS_END}\n\n## Next\n")
    argv = ["--image_size", "64", "--batch_sizes", "1", "2", "--dtypes", "fp32", "--attn", "sdpa"]
    argv += ["--warmup", "0", "--repeats", "1", "--min_cell_seconds", "0", "--ragged_batch_sizes", "4"]
    argv += ["--ragged_attn", "sdpa", "eager", "flex_attention"]
    argv += ["--train_batch_size", "2"]
    argv += ["--sections", "inference", "ragged", "training", "--output_dir", str(output), "--docs", str(page)]
    benchmark.main(argv)
    return output


def test_records_token_counts_and_mac_ratios_of_every_forced_fine_ratio(run):
    results = json.loads((run / "results.json").read_text())
    # 64 px: a 2x2 coarse grid, so ratios 0 ... 1 split 0 ... 4 regions: 1 + 4 + 3k tokens
    rows = [row for row in results["inference"] if row["model"] == "msvit" and row["batch_size"] == 2]
    assert [(row["fine_ratio"], row["tokens"]) for row in rows] == [
        (0.0, 5),
        (0.25, 8),
        (0.5, 11),
        (0.75, 14),
        (1.0, 17),
    ]
    vit16 = next(row for row in results["inference"] if row["model"] == "vit16" and row["batch_size"] == 2)
    assert vit16["tokens"] == 17 and vit16["speedup_vs_vit16"] == 1.0
    for row in rows:
        assert row["mac_speedup_vs_vit16"] == pytest.approx(vit16["gmacs_per_image"] / row["gmacs_per_image"])
        assert row["efficiency"] == pytest.approx(row["speedup_vs_vit16"] / row["mac_speedup_vs_vit16"])
        assert len(row["seconds_all"]) == 1
    # all fine: the gate, the gather and the head cost a little more than the ViT/16
    assert rows[-1]["mac_speedup_vs_vit16"] < 1.0 < rows[0]["mac_speedup_vs_vit16"]
    ragged = {(row["path"], row["attn"]): row for row in results["ragged"]}
    attentions = ("sdpa", "eager", "flex_attention")
    assert list(ragged) == [("vit16", "sdpa"), ("fixed budget", "sdpa")] + [
        (path, attn) for attn in attentions for path in ("padded", "packed")
    ]
    for row in ragged.values():
        # four images spread over ratios 0.25 ... 0.75 of 4 regions: 1 ... 3 splits
        assert (row["dtype"], row["batch_size"], row["tokens_min"], row["tokens_max"]) == ("fp32", 4, 8, 14)
        assert row["efficiency"] == pytest.approx(row["speedup_vs_vit16"] / row["mac_speedup_vs_vit16"])
    # packed and padded run the same tokens: the same MACs, below the ViT/16's
    assert ragged[("packed", "sdpa")]["mac_speedup_vs_vit16"] == ragged[("padded", "sdpa")]["mac_speedup_vs_vit16"] > 1
    assert [row["path"] for row in results["training"]] == [
        "vit16",
        "masked (key mask)",
        "masked (masked softmax)",
        "gathered",
        "counterfactual (gathered, 1 flip)",
    ]
    assert results["machine"]["threads"] >= 1 and results["protocol"]["repeats"] == 1


def test_writes_table_plot_and_the_docs_section(run):
    table = (run / "table.md").read_text()
    assert "| 2 |" in table and "MSViT 0.5" in table and "**Targets**" in table
    assert "| fp32 | 4 | packed | flex_attention |" in table and "| fp32 | 4 | padded | sdpa |" in table
    assert (run / "speedup.png").stat().st_size > 10_000
    page = (run / "docs" / "performance.md").read_text()
    assert "old table" not in page and table in page
    assert page.startswith("# Title\n") and page.endswith(f"{DOCS_END}\n\n## Next\n")
    assert "![Speed-up vs fine ratio](../speedup.png)" in page  # relative to the page


def inference_row(batch_size: int, fine_ratio: float, speedup: float, mac_speedup: float) -> dict:
    return {
        "dtype": "fp32",
        "attn": "sdpa",
        "model": "msvit",
        "batch_size": batch_size,
        "fine_ratio": fine_ratio,
        "speedup_vs_vit16": speedup,
        "mac_speedup_vs_vit16": mac_speedup,
        "efficiency": speedup / mac_speedup,
    }


def test_targets_name_the_worst_cell_and_whether_it_is_met():
    results = {
        "inference": [
            inference_row(8, 0.5, 1.6, 1.7),  # 0.94 of the MAC speed-up
            inference_row(32, 0.25, 2.0, 2.5),  # 0.80: the worst cell
            inference_row(32, 0.0, 1.0, 4.4),  # ratio 0 is outside the target's range
            inference_row(1, 1.0, 1 / 1.04, 1.0),  # 4 % slower than the ViT/16 at batch 1
            inference_row(1, 0.75, 0.99, 1.25),  # slower than the ViT/16
        ],
        "training": [{"path": "masked (key mask)", "attn": "sdpa", "time_vs_vit16": 1.25}],
        "ragged": [
            {"dtype": "bf16", "path": "packed", "attn": "sdpa", "batch_size": 8, "efficiency": 0.93},
            {"dtype": "bf16", "path": "packed", "attn": "sdpa", "batch_size": 32, "efficiency": 0.88},
            {"dtype": "bf16", "path": "padded", "attn": "sdpa", "batch_size": 32, "efficiency": 0.70},  # not a target
            {"dtype": "bf16", "path": "packed", "attn": "eager", "batch_size": 32, "efficiency": 0.50},  # nor this
        ],
    }
    targets = {target["target"].split(":")[0]: target for target in check_targets(results)}
    efficiency = targets["batch >= 8, fine ratio 0.25-0.75"]
    assert efficiency["measured"] == "worst 0.80 (batch 32, ratio 0.25)" and not efficiency["met"]
    assert targets["batch 1, fine ratio 1"]["measured"] == "1.040 x" and targets["batch 1, fine ratio 1"]["met"]
    assert not targets["batch 1, fine ratio <= 0.75"]["met"]
    assert targets["training step, masked (key mask), all tokens"]["met"]
    ragged = targets["ragged batch >= 8, packed"]
    assert (ragged["dtype"], ragged["measured"], ragged["met"]) == ("bf16", "worst 0.88 (batch 32)", False)
