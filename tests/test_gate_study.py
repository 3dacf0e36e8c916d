"""The gate study driver end to end at a tiny size, and the split-policy evaluation and training layouts it is
built on."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from modeling_msvit import MSViTForImageClassification
from modeling_msvit.mixed_scale_tokens import build_scale_tree, close_splits
from msvit.train.gate_training import (
    GateTrainingArguments,
    content_regions,
    evaluate_split_policy,
    forced_layouts,
    train_on_tensors,
)
from msvit.train.split_policies import centre_prior_order, policy_scores, uniform_density_split_mask
from tests.test_train_classification import needs_data


def test_content_regions_and_split_rates_by_hand(config):
    pixel_values = torch.full((2, 3, 32, 32), -1.0)
    pixel_values[0, :, 0:4, 0:4] = 1.0  # region 0 of image 0 holds content
    pixel_values[1, :, 30:32, 30:32] = 0.5  # region 15 of image 1
    content = content_regions(pixel_values, build_scale_tree((8, 8), 2, 2), 4)
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

    # with the item's regions given, other content is clutter; the oracle splits the item's regions only
    item = torch.zeros(2, 16, dtype=torch.bool)
    item[0, 0] = True
    measured = evaluate_split_policy(model, pixel_values, labels, policy="content", item_regions=item)
    assert measured["split_rate_content"] == 1.0 and measured["split_rate_clutter"] == 0.0
    assert measured["tokens"] == (1 + 16 + 3 + 1 + 16) / 2
    measured = evaluate_split_policy(model, pixel_values, labels, policy="all_fine", item_regions=item)
    assert measured["split_rate_clutter"] == 1.0 and measured["split_rate_empty"] == 1.0
    assert "split_rate_clutter" not in evaluate_split_policy(model, pixel_values, labels, policy="all_fine")
    # a threshold above every split probability splits nothing; below every one, everything
    probabilities = model(pixel_values).split_probs
    high = (probabilities.max().item() + 1) / 2
    assert evaluate_split_policy(model, pixel_values, labels, threshold=high)["tokens"] == 17
    low = probabilities.min().item() / 2
    assert evaluate_split_policy(model, pixel_values, labels, threshold=low)["tokens"] == 65


def test_uniform_density_layouts_follow_the_policy_order(config):
    torch.manual_seed(0)
    scores = torch.randn(4000, 16)
    tree = build_scale_tree((8, 8), 2, 2)
    layouts = uniform_density_split_mask(scores, tree)
    counts = layouts.sum(1)
    assert set(counts.tolist()) == set(range(17))  # every density from all coarse to all fine
    assert abs(counts.float().mean().item() - 8) < 0.3
    # the k split regions are the k highest-scoring ones
    rank = scores.argsort(1, descending=True).argsort(1)
    assert torch.equal(layouts, rank < counts[:, None])

    centre = policy_scores("centre", 3, tree)
    assert torch.equal(centre.argsort(1, descending=True)[0], centre_prior_order(tree))
    random = policy_scores("random", 2, tree, torch.Generator().manual_seed(0))
    assert random.shape == (2, 16) and not torch.equal(random[0], random[1])
    with pytest.raises(ValueError, match="random"):
        policy_scores("all_fine", 2, tree)
    # three sizes: every density, each layout top-down (a region only under a split parent)
    three = build_scale_tree((8, 8), 2, 3)
    layouts = uniform_density_split_mask(torch.randn(4000, three.num_decisions), three)
    assert set(layouts.sum(1).tolist()) == set(range(three.num_decisions + 1))
    assert torch.equal(layouts, close_splits(layouts, three))

    # a rule gate's own ranking: its highest-entropy regions are split first
    model = MSViTForImageClassification(config.__class__(**{**config.to_dict(), "gate_type": "entropy"}))
    pixel_values = torch.rand(64, 3, 32, 32) * 2 - 1
    layouts = forced_layouts(model, pixel_values, "gate", None, uniform_density=True)
    logits = model(pixel_values, split_mask=layouts).split_logits
    kept, split = logits.masked_fill(layouts, -1e9).amax(1), logits.masked_fill(~layouts, 1e9).amin(1)
    both = layouts.any(1) & ~layouts.all(1)
    assert (split[both] >= kept[both]).all()


@pytest.mark.parametrize("gate_only", [True, False])
def test_fine_tuning_trains_the_backbone_on_the_gates_own_layouts(config, gate_only):
    """A gate on a frozen backbone learns from uniformly random layouts (the default); fine-tuning the whole model
    switches the counterfactual objective to the layouts the gate chooses, which the backbone then learns to read."""
    torch.manual_seed(0)
    model = MSViTForImageClassification(config)
    assert model.config.gate_objective == "counterfactual" and model.config.counterfactual_layouts == "uniform"
    backbone = model.msvit.layers[0].attention.o_proj.weight.clone()
    pixel_values, labels = torch.rand(16, 3, 32, 32) * 2 - 1, torch.arange(16) % 5
    train_on_tensors(model, pixel_values, labels, GateTrainingArguments(1e-3, batch_size=8), gate_only=gate_only)
    assert model.config.counterfactual_layouts == ("uniform" if gate_only else "gate")
    assert torch.equal(model.msvit.layers[0].attention.o_proj.weight, backbone) == gate_only


def test_runs_of_other_seeds_share_a_results_file_without_losing_rows(tmp_path):
    from msvit.experiments.gate_study import merge_results

    path = tmp_path / "results.json"
    first = {"all_fine|frozen|-|seed=0": {"value": None}}
    # two runs start from the same file and each adds its own seed's rows to its stale copy
    rows_a, _ = merge_results(path, first, {"all_fine": 1.0})
    rows_b = dict(rows_a)
    rows_a, _ = merge_results(path, {**rows_a, "random|frozen|ratio=0.5|seed=1": {"value": 0.5}}, {})
    rows_b, throughput = merge_results(path, {**rows_b, "random|frozen|ratio=0.5|seed=2": {"value": 0.5}}, {})
    expected = {*first, "random|frozen|ratio=0.5|seed=1", "random|frozen|ratio=0.5|seed=2"}
    assert set(rows_b) == expected and throughput == {"all_fine": 1.0}
    assert set(json.loads(path.read_text())["rows"]) == expected
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.json"]  # written in place of the file, atomically


@needs_data
def test_gate_study_runs_resumes_and_writes_its_table(tmp_path):
    from msvit.experiments.gate_study import main

    torch.set_num_threads(1)
    backbone = tiny_backbone(tmp_path)
    arguments = ["--backbone", str(backbone), "--output_dir", str(tmp_path / "study"), "--seeds", "0", "1",
                 "--ratios", "0.5", "--thresholds", "0.01", "--max_train_samples", "64", "--gate_train_samples", "32",
                 "--max_eval_samples", "32", "--timing_images", "32", "--timing_repeats", "1"]  # fmt: skip
    rows = main(arguments)
    kinds = {(row["kind"], row["tuning"], row["budget"]) for row in rows.values()}
    frozen = {
        "all_fine", "all_coarse", "content", "random", "centre", "entropy", "std", "counterfactual", "residual",
        "straight_through",
    }  # fmt: skip
    ablations = {
        "counterfactual (size-aware attention off)", "counterfactual (flips=4)", "counterfactual (target_scale=10)",
        "counterfactual (layouts=gate)", "straight_through (gBaS)", "straight_through (BaS)",
    }  # fmt: skip
    finetuned = frozen - {"content"}
    assert {kind for kind, tuning, _ in kinds if tuning == "frozen"} == frozen | ablations
    assert {kind for kind, tuning, _ in kinds if tuning == "fine-tuned"} == finetuned
    thresholds = {(kind, tuning) for kind, tuning, budget in kinds if budget == "threshold"}
    assert thresholds == {("counterfactual", "frozen"), ("entropy", "frozen"), ("counterfactual", "fine-tuned")}
    # seeded rows twice, deterministic ones once
    assert len([name for name in rows if name.startswith("counterfactual|fine-tuned|ratio=0.5")]) == 2
    assert len([name for name in rows if name.startswith("centre|frozen")]) == 1
    # the gates trained once have every seed's rows before the straight-through gates train
    order = list(rows)
    assert order.index("residual|frozen|ratio=0.5|seed=1") < order.index("straight_through|frozen|ratio=0.5|seed=0")
    for name, row in rows.items():
        expected_tokens = {"all_fine": 65, "all_coarse": 17}.get(row["kind"], 1 + 16 + 3 * 8)
        if row["budget"] != "threshold" and row["kind"] != "content":
            assert row["test"]["tokens"] == expected_tokens, name
    for seed in (0, 1):  # the entropy gate's threshold matches the counterfactual gate's fine ratio on validation
        reference = rows[f"counterfactual|frozen|threshold=0.01|seed={seed}"]["validation"]["fine_ratio"]
        matched = rows[f"entropy|frozen|threshold=0.01|seed={seed}"]["validation"]["fine_ratio"]
        assert abs(matched - reference) <= 0.05
    assert "| counterfactual | frozen | fine ratio 0.5 | 2 |" in (tmp_path / "study" / "table.md").read_text()

    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved["rows"] == rows and saved["throughput"]["all_fine"] > 0
    assert (tmp_path / "study" / "gates" / "counterfactual-seed=1.safetensors").is_file()
    mtime = (tmp_path / "study" / "results.json").stat().st_mtime
    main(arguments)  # finished rows are not run again
    assert (tmp_path / "study" / "results.json").stat().st_mtime == mtime


def test_gate_study_processes_the_whole_training_split_only_to_fine_tune(tmp_path):
    """The gates' subset is processed on its own, and equals the same images of the whole split processed at once."""
    from msvit.experiments.gate_study import GateStudy, GateStudyArguments

    arguments = ["--backbone", str(tiny_backbone(tmp_path)), "--output_dir", str(tmp_path / "study"),
                 "--max_train_samples", "48", "--gate_train_samples", "20", "--max_eval_samples", "8"]  # fmt: skip
    (args,) = HfArgumentParser(GateStudyArguments).parse_args_into_dataclasses(args=arguments)
    study = GateStudy(args)
    assert "train_data" not in vars(study)  # not processed yet
    pixel_values, labels = study.train_data
    assert pixel_values.shape == (48, 1, 64, 64) and labels.shape == (48,)
    subset = torch.randperm(48, generator=torch.Generator().manual_seed(args.data_seed))[:20]
    assert torch.equal(study.gate_data[0], pixel_values[subset]) and torch.equal(study.gate_data[1], labels[subset])


@needs_data
def test_gate_study_on_the_cluttered_bench_reports_clutter(tmp_path):
    from msvit.experiments.gate_study import main

    torch.set_num_threads(1)
    rows = main([
        "--backbone", str(tiny_backbone(tmp_path)), "--output_dir", str(tmp_path / "study"), "--seeds", "0",
        "--ratios", "0.5", "--dataset", "cluttered_translated_fashion_mnist", "--max_train_samples", "32",
        "--gate_train_samples", "32", "--max_eval_samples", "32", "--timing_images", "32", "--timing_repeats", "1",
        "--no_finetune", "--no_ablations",
    ])  # fmt: skip
    oracle = rows["content|frozen|-"]["test"]
    assert oracle["split_rate_content"] == 1.0 and oracle["split_rate_clutter"] == 0.0
    assert 0.0 < rows["all_fine|frozen|-"]["test"]["split_rate_clutter"] == 1.0
    assert not any(row["tuning"] == "fine-tuned" for row in rows.values())
    assert "/ other content /" in (tmp_path / "study" / "table.md").read_text()


@needs_data
def test_gate_study_on_the_textured_bench_starts_the_residual_gate_from_the_best_rule(tmp_path):
    from msvit.experiments.gate_study import RESIDUAL_ABLATIONS, best_training_free_rule, main

    torch.set_num_threads(1)
    rows = main([
        "--backbone", str(tiny_backbone(tmp_path)), "--output_dir", str(tmp_path / "study"), "--seeds", "0",
        "--ratios", "0.25", "0.5", "--dataset", "textured_translated_fashion_mnist", "--background_contrast", "0.6",
        "--max_train_samples", "32", "--gate_train_samples", "32", "--max_eval_samples", "32", "--timing_images",
        "32", "--timing_repeats", "1", "--no_finetune", "--no_ablations", "--residual_ablations",
    ])  # fmt: skip
    # no region of a textured canvas is empty: the background is the other content
    assert all("split_rate_empty" not in row["test"] for row in rows.values())
    assert rows["all_fine|frozen|-"]["test"]["split_rate_clutter"] == 1.0
    assert "split rate: item / other content |" in (tmp_path / "study" / "table.md").read_text()
    kinds = {row["kind"] for row in rows.values()}
    assert set(RESIDUAL_ABLATIONS) <= kinds and "residual" in kinds
    # the residual gate starts from the rule that won on validation; its ablation from the other one
    rule = best_training_free_rule(rows, [0.25, 0.5])
    accuracy = {
        name: sum(rows[f"{name}|frozen|ratio={ratio}"]["validation"]["accuracy"] for ratio in (0.25, 0.5))
        for name in ("entropy", "std")
    }
    assert accuracy[rule] == max(accuracy.values())
    gates = tmp_path / "study" / "gates"
    assert "rule_scale" in load_file(gates / "residual-seed=0.safetensors")
    assert "rule_scale" not in load_file(gates / "residual_(no_rule)-seed=0.safetensors")
    assert "layers.0.weight" in load_file(gates / "residual_(other_rule)-seed=0.safetensors")
    with pytest.raises(ValueError, match="No training-free rule"):
        best_training_free_rule(rows, [0.75])


@needs_data
def test_gate_study_with_three_scales_on_the_sparse_bench(tmp_path, monkeypatch):
    """8 / 16 / 32 px on the tiny ViT/8's 64 px input: 2 x 2 top regions over 4 x 4 regions (D = 20 decisions)."""
    from msvit.experiments import gate_study
    from msvit.experiments.gate_study import PER_LEVEL_RESIDUAL, main

    token_paths = {}

    def train_on_tensors(model, *args, description, **options):
        losses = train(model, *args, description=description, **options)
        token_paths[description] = model.config.train_token_path
        return losses

    train = gate_study.train_on_tensors
    monkeypatch.setattr(gate_study, "train_on_tensors", train_on_tensors)
    torch.set_num_threads(1)
    rows = main([
        "--backbone", str(tiny_backbone(tmp_path)), "--output_dir", str(tmp_path / "study"), "--seeds", "0",
        "--ratios", "0.5", "--dataset", "sparse_translated_fashion_mnist", "--patch_sizes", "8", "16", "32",
        "--max_train_samples", "32", "--gate_train_samples", "32", "--max_eval_samples", "32", "--timing_images",
        "32", "--timing_repeats", "1", "--finetune_kinds", "all_coarse", "std", "--no_ablations",
    ])  # fmt: skip
    assert {row["kind"] for row in rows.values() if row["tuning"] == "fine-tuned"} == {"all_coarse", "std"}
    # fine-tuning on forced layouts runs on the gathered path; the straight-through gate trains on the masked one
    assert token_paths["fine-tune all_coarse"] == token_paths["fine-tune std"] == "gathered"
    assert token_paths["straight_through gate, seed 0"] == "masked"
    for name, row in rows.items():
        expected_tokens = {"all_fine": 65, "all_coarse": 5}.get(row["kind"], 1 + 4 + 3 * 10)
        if row["budget"] != "threshold" and row["kind"] != "content":
            assert row["test"]["tokens"] == expected_tokens, name
    # the oracle splits exactly the regions that hold the item, at every level: every one, and nothing empty
    oracle = rows["content|frozen|-"]["test"]
    assert oracle["split_rate_content"] == 1.0 and oracle["split_rate_empty"] == 0.0
    assert {"residual", PER_LEVEL_RESIDUAL, "counterfactual", "straight_through", "entropy", "random"} <= {
        row["kind"] for row in rows.values()
    }
    # the residual gate's recipe has one prior logit for both levels; the row that takes it back, one per level
    gates = tmp_path / "study" / "gates"
    assert load_file(gates / "residual-seed=0.safetensors")["split_logit_bias"].shape == (1,)
    assert load_file(gates / "residual_(a_prior_per_level)-seed=0.safetensors")["split_logit_bias"].shape == (2,)


def test_gate_study_names_the_policies_it_can_fine_tune():
    from msvit.experiments.gate_study import GateStudyArguments

    with pytest.raises(ValueError, match=r"unknown policies \['oracle'\]; choose from \('all_fine'"):
        GateStudyArguments(backbone="vit", finetune_kinds=["std", "oracle"])


def tiny_backbone(tmp_path):
    backbone = tmp_path / "vit"
    vit_config = ViTConfig(
        image_size=64, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    ViTForImageClassification(vit_config).save_pretrained(backbone)
    ViTImageProcessorPil(size={"height": 64, "width": 64}, image_mean=0.5, image_std=0.5).save_pretrained(backbone)
    return backbone
