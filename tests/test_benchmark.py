"""The benchmark's bookkeeping: what it records, the targets it checks and the docs section it writes.

Timings themselves are not tested (the machine is shared); the run below is a tiny smoke run of the real script, with
the three-scale MSViT (16/32/64 px) beside the two-scale one: at 64 px one 64 px root region whose four 32 px children
decide in turn (D = 1 + 4 = 5 decision nodes, 1 root), and at 96 px that region plus a 32 px border of 5 roots (D =
1 + 4 + 5 = 10, 6 roots).
"""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import benchmark
from benchmarks.report import DOCS_END, DOCS_START, check_targets, write_table
from modeling_msvit import MSViTForImageClassification
from modeling_msvit.mixed_scale_tokens import build_scale_tree, close_splits, token_counts
from msvit.configuration import load_preset


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark")
    page = output / "docs" / "performance.md"  # one folder down, as in the repository
    page.parent.mkdir()
    page.write_text(f"# Title\n\n{DOCS_START}\nold table\n{DOCS_END}\n\n## Next\n")
    argv = ["--image_size", "64", "--batch_sizes", "1", "2", "--dtypes", "fp32", "--attn", "sdpa"]
    argv += ["--warmup", "0", "--repeats", "1", "--min_cell_seconds", "0", "--ragged_batch_sizes", "4"]
    argv += ["--ragged_attn", "sdpa", "eager", "flex_attention"]
    argv += ["--train_batch_size", "2", "--extra_image_sizes", "96", "--extra_batch_sizes", "2"]
    argv += ["--sections", "inference", "image_sizes", "ragged", "training"]
    argv += ["--output_dir", str(output), "--docs", str(page)]
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
    # the two-scale rows carry no model, as before the three-scale rows existed
    ragged = {(row["path"], row["attn"]): row for row in results["ragged"] if "model" not in row}
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


def test_three_scale_rows_have_hand_computed_tokens_and_compute_macs_ratios(run):
    results = json.loads((run / "results.json").read_text())
    msvits = results["protocol"]["msvits"]
    assert msvits["msvit"] == {
        "label": "2 scales (16/32)",
        "patch_sizes": [16, 32],
        "trees": {"64": {"decisions": 4, "roots": 4}, "96": {"decisions": 9, "roots": 9}},
    }
    assert msvits["msvit3"] == {
        "label": "3 scales (16/32/64)",
        "patch_sizes": [16, 32, 64],
        "trees": {"64": {"decisions": 5, "roots": 1}, "96": {"decisions": 10, "roots": 6}},
    }
    # 1 + roots + 3 * round(ratio * D) tokens (round half to even: 1.25 -> 1, 2.5 -> 2, 3.75 -> 4; 7.5 -> 8)
    expected = {
        ("inference", "msvit3"): [(0.0, 2), (0.25, 5), (0.5, 8), (0.75, 14), (1.0, 17)],
        ("image_sizes", "msvit3"): [(0.0, 7), (0.25, 13), (0.5, 22), (0.75, 31), (1.0, 37)],
        ("image_sizes", "msvit"): [(0.0, 10), (0.25, 16), (0.5, 22), (0.75, 31), (1.0, 37)],
    }
    for (section, model), counts in expected.items():
        rows = [row for row in results[section] if row["model"] == model and row["batch_size"] == 2]
        assert [(row["fine_ratio"], row["tokens"]) for row in rows] == counts, (section, model)
        image_size = rows[0].get("image_size", 64)
        config = load_preset(
            "msvit-tiny", image_size=image_size, num_labels=1000, patch_sizes=msvits[model]["patch_sizes"]
        )
        msvit = MSViTForImageClassification(config)
        vit16 = next(row for row in results[section] if row["model"] == "vit16" and row["batch_size"] == 2)
        assert vit16["tokens"] == 1 + (image_size // 16) ** 2 == counts[-1][1]  # every node split: the ViT/16's tokens
        for row in rows:
            macs = msvit.compute_macs(torch.tensor([row["tokens"]])).item()
            assert row["gmacs_per_image"] == pytest.approx(macs / 1e9)
            assert row["mac_speedup_vs_vit16"] == pytest.approx(vit16["gmacs_per_image"] / row["gmacs_per_image"])
            assert row["efficiency"] == pytest.approx(row["speedup_vs_vit16"] / row["mac_speedup_vs_vit16"])
        # a third size decides more regions than the coarse grid holds: its gate costs more at every ratio
        assert rows[-1]["mac_speedup_vs_vit16"] < 1.0 < rows[0]["mac_speedup_vs_vit16"]
    # at 96 px both MSViTs' layouts at ratios 0.5 ... 1 have the same tokens: the same MACs but for the gate
    two, three = ([row for row in results["image_sizes"] if row["model"] == m] for m in ("msvit", "msvit3"))
    assert all(a["mac_speedup_vs_vit16"] > b["mac_speedup_vs_vit16"] for a, b in zip(two[2:], three[2:]))
    # ragged: the fixed budget and the packed path of top-down layouts spread over ratios 0.25 ... 0.75 of D = 5
    ragged = [row for row in results["ragged"] if row.get("model") == "msvit3"]
    assert [(row["path"], row["attn"]) for row in ragged] == [
        ("fixed budget", "sdpa"),
        ("packed", "sdpa"),
        ("packed", "eager"),
        ("packed", "flex_attention"),
    ]
    config = load_preset("msvit-tiny", image_size=64, num_labels=1000, patch_sizes=[16, 32, 64])
    msvit = MSViTForImageClassification(config)
    vit16_macs = next(row for row in results["ragged"] if row["path"] == "vit16")["gmacs_per_image"]
    ragged_counts = torch.tensor([5, 8, 11, 14])  # 1, 2, 3, 4 splits (1.25, 1.92, 2.58, 3.75 rounded)
    for row in ragged:
        assert (row["tokens_min"], row["tokens_max"], row["tokens_mean"]) == (5, 14, 9.5)
        tokens = torch.tensor([8]) if row["path"] == "fixed budget" else ragged_counts  # 2 splits of 5 at 0.5
        macs = msvit.compute_macs(tokens).double().mean().item()
        assert row["mac_speedup_vs_vit16"] == pytest.approx(vit16_macs * 1e9 / macs)
        assert row["efficiency"] == pytest.approx(row["speedup_vs_vit16"] / row["mac_speedup_vs_vit16"])
    # the same targets for three scales as for two, labelled
    targets = [target["target"] for target in results["targets"]]
    assert "batch 1, fine ratio 1: time <= 1.05 x ViT/16" in targets
    assert "3 scales (16/32/64), batch 1, fine ratio 1: time <= 1.05 x ViT/16" in targets


def test_ragged_layouts_are_top_down_and_unchanged_for_two_scales():
    three = build_scale_tree((14, 14), 2, 3)  # 224 px, 16/32/64: D = 9 + 49 = 58, 22 roots
    masks = benchmark.ragged_split_mask(8, three, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(masks, close_splits(masks, three))  # every split node's parent is split
    splits = [14, 19, 23, 27, 31, 35, 39, 44]  # round(linspace(0.25, 0.75, 8) * 58)
    assert masks.sum(1).tolist() == splits
    assert token_counts(masks, three).tolist() == [1 + 22 + 3 * k for k in splits]
    # 448 px: 7 x 7 regions of 64 px, no border: D = 49 + 196, 49 roots; every node split = the ViT/16's 785 tokens
    large = build_scale_tree((28, 28), 2, 3)
    assert (large.num_decisions, large.num_roots) == (245, 49)
    assert token_counts(torch.ones(1, 245, dtype=torch.bool), large).item() == 1 + 28 * 28
    # with two scales (no parents) the layouts are the ones the benchmark always drew
    two = build_scale_tree((14, 14), 2, 2)
    generator = torch.Generator().manual_seed(0)
    ratios = torch.linspace(0.25, 0.75, 8)
    before = torch.rand(8, 49, generator=generator).argsort(1).argsort(1) < (ratios[:, None] * 49).round()
    assert torch.equal(benchmark.ragged_split_mask(8, two, 0.5, torch.Generator().manual_seed(0)), before)


def test_help_lists_the_three_scale_and_image_size_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(option in help_text for option in ("--three_scales", "--extra_image_sizes", "--extra_batch_sizes"))
    assert benchmark.parse_args([]).sections == ["inference", "image_sizes", "ragged", "training"]


def test_writes_table_plot_and_the_docs_section(run):
    table = (run / "table.md").read_text()
    assert "| 2 |" in table and "MSViT 0.5" in table and "**Targets**" in table
    assert "| fp32 | 4 | packed | flex_attention |" in table and "| fp32 | 4 | padded | sdpa |" in table
    assert (run / "speedup.png").stat().st_size > 10_000
    page = (run / "docs" / "performance.md").read_text()
    assert "old table" not in page and table in page
    assert page.startswith("# Title\n") and page.endswith(f"{DOCS_END}\n\n## Next\n")
    assert "![Speed-up vs fine ratio](../speedup.png)" in page  # relative to the page
    # the three-scale tables beside the two-scale ones, labelled, at the run's size and at 96 px
    assert table.count("*2 scales (16/32)*") == 3 and table.count("*3 scales (16/32/64)*") == 4
    assert "**Inference at 96 px, fp32, attn_implementation='sdpa'**" in table
    assert "3 scales (16/32/64): D = 10 decision nodes, 6 roots, tokens 0: 7, 0.25: 13, 0.5: 22" in table
    three_scale_header = "| batch | ViT/16 images/s | MSViT 0 | MSViT 0.25 | MSViT 0.5 | MSViT 0.75 | MSViT 1 |"
    assert table.count(three_scale_header) == 2
    assert (
        table.count("| fp32 | 4 | packed | flex_attention |") == 2 and table.count("| fp32 | 4 | padded | sdpa |") == 1
    )


def test_a_run_without_three_scales_reads_as_before(tmp_path):
    """The committed run's table and targets, regenerated from its results.json by today's report."""
    committed = ROOT / "benchmarks" / "results" / "cpu"
    results = json.loads((committed / "results.json").read_text())
    assert check_targets(results) == results["targets"]
    assert write_table(results, tmp_path / "table.md") == (committed / "table.md").read_text()


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
            {
                "dtype": "bf16",
                "model": "msvit3",
                "path": "packed",
                "attn": "sdpa",
                "batch_size": 8,
                "efficiency": 0.95,
            },
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


def test_three_scale_targets_are_checked_on_their_own_rows():
    three = dict(model="msvit3")
    results = {
        "protocol": {"msvits": {"msvit3": {"label": "3 scales (16/32/64)"}}},
        "inference": [
            inference_row(8, 0.5, 1.5, 1.6),  # two scales: 0.94
            inference_row(8, 0.5, 1.3, 1.6) | three,  # three scales: 0.81, its own worst cell
            inference_row(32, 0.75, 1.2, 1.25) | three,  # 0.96
            inference_row(1, 1.0, 1 / 1.04, 1.0),  # two scales: 4 % slower than the ViT/16 at batch 1
            inference_row(1, 0.5, 0.98, 1.6),  # two scales: slower than the ViT/16
            inference_row(1, 1.0, 1 / 1.06, 1.0) | three,  # three scales: 6 % slower
            inference_row(1, 0.5, 1.3, 1.6) | three,
        ],
        "ragged": [
            {"dtype": "fp32", "path": "packed", "attn": "sdpa", "batch_size": 8, "efficiency": 0.85},
            {
                "dtype": "fp32",
                "model": "msvit3",
                "path": "packed",
                "attn": "sdpa",
                "batch_size": 8,
                "efficiency": 0.91,
            },
        ],
    }
    targets = {target["target"].rsplit(":", 1)[0]: target for target in check_targets(results)}
    assert list(targets) == [
        "batch >= 8, fine ratio 0.25-0.75",
        "batch 1, fine ratio 1",
        "batch 1, fine ratio <= 0.75",
        "3 scales (16/32/64), batch >= 8, fine ratio 0.25-0.75",
        "3 scales (16/32/64), batch 1, fine ratio 1",
        "3 scales (16/32/64), batch 1, fine ratio <= 0.75",
        "ragged batch >= 8, packed",
        "3 scales (16/32/64), ragged batch >= 8, packed",
    ]
    assert targets["batch >= 8, fine ratio 0.25-0.75"]["met"]
    worst = targets["3 scales (16/32/64), batch >= 8, fine ratio 0.25-0.75"]
    assert (worst["measured"], worst["met"]) == ("worst 0.81 (batch 8, ratio 0.5)", False)
    assert targets["batch 1, fine ratio 1"]["met"]
    batch1 = targets["3 scales (16/32/64), batch 1, fine ratio 1"]
    assert (batch1["measured"], batch1["met"]) == ("1.060 x", False)
    assert not targets["batch 1, fine ratio <= 0.75"]["met"]
    assert targets["3 scales (16/32/64), batch 1, fine ratio <= 0.75"]["met"]
    assert not targets["ragged batch >= 8, packed"]["met"]
    assert targets["3 scales (16/32/64), ragged batch >= 8, packed"]["met"]
