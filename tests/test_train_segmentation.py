"""The segmentation training script end to end on tiny real runs (Fashion-MNIST scenes on 32 px canvases), and its
evaluation on models whose outputs are known."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from modeling_msvit import MSViTForImageClassification, MSViTForSemanticSegmentation, MSViTModel
from msvit.metrics import load_metric
from msvit.train.arguments import parse_arguments
from msvit.train.data import FASHION_MNIST_DIR
from msvit.train.evaluation import evaluate_segmenter
from msvit.train.run_segmentation import SegmentationArguments, build_model, main, training_inputs
from msvit.train.segmentation_data import scene_label_maps
from tests.conftest import tiny_config, tiny_vit_config


needs_data = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (make data, or apt-get install dataset-fashion-mnist)",
)
# 64 training scenes in batches of 16: 4 steps per epoch
TINY = [
    "--canvas_size", "32", "--patch_size", "4", "--coarse_patch_size", "8", "--hidden_size", "32",
    "--num_hidden_layers", "1", "--num_attention_heads", "2", "--max_train_samples", "64", "--max_eval_samples", "16",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--logging_steps", "2",
]  # fmt: skip
RECIPES_DIR = Path(__file__).resolve().parent.parent / "configuration" / "training"
NUM_LABELS = 11  # background and the 10 Fashion-MNIST classes
GATE_PARTS = (".gate.", ".gate_criterion.")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fine_model(tmp_path_factory):
    """A full-token segmenter trained for a few steps: the starting point of the gate stage and of budget runs."""
    torch.set_num_threads(1)
    output_dir = tmp_path_factory.mktemp("seg") / "fine"
    main([*TINY, "--stage", "scratch", "--split_policy", "all_fine", "--max_train_steps", "4", "--skip_test",
          "--skip_export", "--output_dir", str(output_dir)])  # fmt: skip
    return output_dir / "model"


@needs_data
def test_scratch_run_writes_its_outputs_and_plausible_records(tmp_path):
    torch.set_num_threads(1)
    results = main([*TINY, "--stage", "scratch", "--max_train_steps", "4", "--num_prediction_images", "2",
                    "--output_dir", str(tmp_path)])  # fmt: skip
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (tmp_path / "model" / name).is_file(), name
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("split", "train")) for r in records] == [
        (2, "train"), (4, "train"), (4, "validation"), (4, "test")
    ]  # fmt: skip
    assert all(0.0 < r["loss"] < 2 * math.log(NUM_LABELS) for r in records[:2])  # about log(11) from random weights
    for split in ("validation", "test"):
        scores = results[split]
        assert scores["num_samples"] == 16
        assert 0.0 <= scores["mean_iou"] <= scores["pixel_accuracy"] <= 1.0  # background dominates the pixels
        assert len(scores["per_category_iou"]) == NUM_LABELS
        assert 1 + 16 <= scores["tokens"] <= 1 + 64  # 4x4 coarse regions of 2x2 fine patches
        assert scores["fine_ratio"] == pytest.approx((scores["tokens"] - 17) / 48)
        assert len(scores["split_rate_per_position"]) == 16
    assert results["validation_curve"] == [{"step": 4, "mean_iou": results["validation"]["mean_iou"],
                                            "gmacs": results["validation"]["gmacs"]}]  # fmt: skip
    card = (tmp_path / "hub" / "README.md").read_text()
    assert 'type: "image-segmentation"' in card and 'type: "mean_iou"' in card
    assert f"{100 * results['test']['mean_iou']:.2f} %" in card and "| background |" in card
    assert MSViTForSemanticSegmentation.from_pretrained(tmp_path / "hub").config.num_labels == NUM_LABELS
    panel = 8 * 32  # panels are drawn at 256 // image_size times the model's resolution, captioned below
    assert Image.open(tmp_path / "predictions.png").size == (4 * panel + 3 * 4, 2 * (panel + 18))


@needs_data
def test_resume_with_gradient_accumulation_repeats_the_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    # 64 scenes in batches of 8, two per step: 4 steps per epoch, checkpoint mid-epoch; the gate's Gumbel noise and
    # the flips are drawn every batch, so the resumed run must re-seed exactly as the uninterrupted one did
    args = [*TINY, "--stage", "scratch", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
            "--max_train_steps", "6", "--checkpointing_steps", "3", "--skip_test", "--skip_export"]  # fmt: skip
    straight = main([*args, "--output_dir", str(tmp_path / "straight")])
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("model", "*.json"))
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_3"
    resumed = main([*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(checkpoint)])
    weights = {run: load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "resumed")}
    torch.testing.assert_close(weights["resumed"], weights["straight"], rtol=0, atol=1e-6)
    # the log: records kept from before the checkpoint and written after it are the uninterrupted run's, except the
    # training means logged at step 4, which after the resume cover step 4 only (the running sums are not saved)
    logs = {run: read_jsonl(tmp_path / run / "metrics.jsonl") for run in ("straight", "resumed")}
    assert [(r["step"], r.get("split", "train")) for r in logs["resumed"]] == [
        (2, "train"), (4, "train"), (4, "validation"), (6, "train"), (6, "validation")
    ]  # fmt: skip
    for run in logs.values():
        for record in run:
            record.pop("train_images_per_second", None)
    assert [logs["resumed"][index] for index in (0, 2, 3, 4)] == [logs["straight"][index] for index in (0, 2, 3, 4)]
    assert resumed["validation_curve"] == straight["validation_curve"]


@needs_data
def test_gate_stage_trains_only_the_gate(tmp_path, fine_model):
    torch.set_num_threads(1)
    main([*TINY, "--stage", "gate", "--model_name_or_path", str(fine_model), "--target_fine_ratio", "0.25",
          "--max_train_steps", "2", "--skip_test", "--skip_export", "--output_dir", str(tmp_path)])  # fmt: skip
    before = load_file(fine_model / "model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    gate_names = [name for name in after if any(part in name for part in GATE_PARTS)]
    assert gate_names and any(not torch.equal(after[name], before[name]) for name in gate_names)
    for name in after.keys() - gate_names:
        assert torch.equal(after[name], before[name]), name


@needs_data
def test_eval_only_measures_one_model_at_several_budgets(tmp_path, fine_model):
    torch.set_num_threads(1)
    budgets = ["0.25", "0.5", "threshold", "all_fine", "all_coarse"]
    results = main(["--eval_only", "--model_name_or_path", str(fine_model), "--canvas_size", "32",
                    "--max_train_samples", "16", "--max_eval_samples", "16", "--eval_budgets", *budgets,
                    "--output_dir", str(tmp_path)])  # fmt: skip
    assert list(results) == ["fine_ratio=0.25", "fine_ratio=0.5", "threshold=0.5", "all_fine", "all_coarse"]
    assert json.loads((tmp_path / "budgets.json").read_text()) == json.loads(json.dumps(results))
    # a fine-ratio budget splits exactly that many of the 16 regions, 3 extra tokens each
    assert [results[name]["tokens"] for name in ("fine_ratio=0.25", "fine_ratio=0.5", "all_fine", "all_coarse")] == [
        1 + 16 + 3 * 4, 1 + 16 + 3 * 8, 1 + 64, 1 + 16
    ]  # fmt: skip
    gmacs = [results[name]["gmacs"] for name in ("all_coarse", "fine_ratio=0.25", "fine_ratio=0.5", "all_fine")]
    assert gmacs == sorted(gmacs) and len(set(gmacs)) == 4
    assert all(0.0 <= scores["mean_iou"] <= 1.0 and scores["num_samples"] == 16 for scores in results.values())


def test_sources_convert_to_segmenters_with_their_backbone(tmp_path):
    vit = ViTForImageClassification(tiny_vit_config(num_channels=3))
    vit.save_pretrained(tmp_path / "vit")
    classifier = MSViTForImageClassification(tiny_config(num_channels=3))
    classifier.save_pretrained(tmp_path / "msvit")
    expected = {
        "vit": {
            name.replace("vit.", "msvit.", 1): t for name, t in vit.state_dict().items() if name.startswith("vit.")
        },
        "msvit": {name: t for name, t in classifier.state_dict().items() if name.startswith("msvit.")},
    }
    for source, backbone in expected.items():
        args = SegmentationArguments(stage="joint", model_name_or_path=str(tmp_path / source), output_dir="x")
        model, processor = build_model(args)
        assert isinstance(model, MSViTForSemanticSegmentation)
        assert model.config.id2label == scene_label_maps()[0] and model.config.num_labels == NUM_LABELS
        assert processor.size == {"height": 32, "width": 32} and not processor.do_reduce_labels
        weights = model.state_dict()
        for name, tensor in backbone.items():
            assert torch.equal(weights[name], tensor), (source, name)


def test_segmentation_recipes_chain_their_stages():
    stages = ("fine", "gate", "joint")
    parsed = {
        stage: parse_arguments(
            SegmentationArguments, ["--config", str(RECIPES_DIR / f"segmentation-{stage}.yaml"), "--output_dir", "x"]
        )
        for stage in stages
    }
    assert [parsed[stage].stage for stage in stages] == ["scratch", "gate", "joint"]
    assert parsed["fine"].split_policy == "all_fine" and parsed["gate"].gate_objective == "counterfactual"
    for stage, previous in zip(stages[1:], stages):
        assert parsed[stage].model_name_or_path == f"outputs/segmentation-{previous}/model"
    assert {args.dataset for args in parsed.values()} == {"fashion_mnist_scenes"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "scratch", "--model_name_or_path", "m"], "random weights"),
        (["--stage", "gate", "--model_name_or_path", "m", "--split_policy", "random"], "replaces the gate"),
        (["--stage", "joint"], "needs --model_name_or_path"),
        ([], "--stage is required"),
        (["--eval_only"], "--eval_only needs --model_name_or_path"),
        (["--eval_only", "--model_name_or_path", "m", "--eval_budgets", "half"], "not a budget"),
    ],
)
def test_bad_arguments_are_rejected(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_arguments(SegmentationArguments, [*argv, "--output_dir", "x"])
    assert message in capsys.readouterr().err


def test_training_batches_flip_each_mask_with_its_image():
    pixel_values = torch.randn(64, 3, 32, 32)
    labels = (pixel_values[:, 0] > 0).long()  # a mask that follows the image
    config = tiny_config(target_fine_ratio=0.25)  # 4x4 coarse regions
    args = SegmentationArguments(stage="scratch", output_dir="x")
    torch.manual_seed(0)
    inputs = training_inputs({"pixel_values": pixel_values, "labels": labels}, args, config)
    assert inputs.keys() == {"pixel_values", "labels"}  # the gate decides
    assert torch.equal(inputs["labels"], (inputs["pixel_values"][:, 0] > 0).long())
    flipped = (inputs["pixel_values"] != pixel_values).flatten(1).any(1)
    assert 16 < flipped.sum() < 48  # about half of the samples
    assert torch.equal(inputs["pixel_values"][flipped], pixel_values[flipped].flip(-1))
    assert torch.equal(inputs["labels"][flipped], labels[flipped].flip(-1))
    assert torch.equal(inputs["labels"][~flipped], labels[~flipped])
    # the same step seed gives the same flips; forced decisions take the gathered path
    args = SegmentationArguments(stage="scratch", split_policy="centre", output_dir="x")
    torch.manual_seed(0)
    forced = training_inputs({"pixel_values": pixel_values, "labels": labels}, args, config)
    assert torch.equal(forced["labels"], inputs["labels"]) and forced["token_path"] == "gathered"
    assert forced["split_mask"].sum(1).eq(4).all() and forced["split_mask"][:, [5, 6, 9, 10]].all()
    no_flip = SegmentationArguments(stage="scratch", no_hflip=True, output_dir="x")
    assert training_inputs({"pixel_values": pixel_values, "labels": labels}, no_flip, config)["labels"] is labels


class FixedSegmenter(torch.nn.Module):
    """Returns given logits, token counts and split masks, one batch after the other, and 1000 MACs per token."""

    def __init__(self, logits, token_counts, split_masks):
        super().__init__()
        self.config = SimpleNamespace(
            model_type="msvit", num_labels=3, semantic_loss_ignore_index=255, coarse_grid_size=(1, 2)
        )
        self.outputs = iter(zip(logits, token_counts, split_masks))

    def forward(self, pixel_values, **kwargs):
        logits, token_counts, split_mask = next(self.outputs)
        return SimpleNamespace(logits=logits, token_counts=token_counts, split_mask=split_mask)

    def compute_macs(self, token_counts):
        return 1000 * token_counts


def test_evaluate_segmenter_matches_a_hand_computation():
    # one image of 4x4 labels per batch; logits on a 2x2 grid, so each logit cell covers a 2x2 block of pixels
    # (bilinear upsampling keeps the argmax of the nearest cell: its weight is at least 9/16)
    predicted_cells = [torch.tensor([[0, 1], [2, 2]]), torch.tensor([[1, 1], [0, 2]])]
    labels = [
        torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 2, 2], [255, 255, 2, 2]]),
        torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 2], [0, 0, 2, 2]]),
    ]
    logits = [torch.nn.functional.one_hot(cells, 3).permute(2, 0, 1)[None].float() * 5 for cells in predicted_cells]
    model = FixedSegmenter(
        logits,
        token_counts=[torch.tensor([3]), torch.tensor([9])],
        split_masks=[torch.tensor([[False, False]]), torch.tensor([[True, True]])],
    )
    batches = [{"pixel_values": torch.zeros(1, 3, 4, 4), "labels": label[None]} for label in labels]
    results = evaluate_segmenter(model, batches, Accelerator(cpu=True), load_metric("mean_iou"))
    # by hand, over the 30 counted pixels (two ignored):
    # class 0: predicted 4 + 4 pixels, labelled 3 + 8, correct 3 + 4 -> IoU 7 / (8 + 11 - 7)
    # class 1: predicted 4 + 8, labelled 5 + 5, correct 4 + 4 -> IoU 8 / (12 + 10 - 8)
    # class 2: predicted 6 (8 minus 2 ignored) + 4, labelled 6 + 3, correct 6 + 3 -> IoU 9 / (10 + 9 - 9)
    per_class = [7 / 12, 8 / 14, 9 / 10]
    assert results["per_category_iou"] == pytest.approx(per_class)
    assert results["mean_iou"] == pytest.approx(sum(per_class) / 3)
    assert results["pixel_accuracy"] == pytest.approx((7 + 8 + 9) / 30)
    assert results["num_samples"] == 2
    assert results["gmacs"] == pytest.approx((3000 + 9000) / 2 / 1e9)
    assert results["tokens"] == 6.0 and results["fine_ratio"] == 0.5
    assert results["split_rate_per_position"] == [0.5, 0.5]


@pytest.mark.parametrize("policy, tokens", [("all_coarse", 1 + 16), ("all_fine", 1 + 64)])
def test_reported_gmacs_include_the_decoder(policy, tokens):
    id2label, label2id = scene_label_maps()
    torch.manual_seed(0)
    config = tiny_config(num_channels=3, num_labels=NUM_LABELS, id2label=id2label, label2id=label2id)
    model = MSViTForSemanticSegmentation(config)
    batches = [{"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 11, (2, 32, 32))}]
    results = evaluate_segmenter(model, batches, Accelerator(cpu=True), load_metric("mean_iou"), split_policy=policy)
    encoder = MSViTModel(config).compute_macs(torch.tensor([tokens])).item()
    linear_decoder = (tokens - 1) * config.hidden_size * NUM_LABELS  # class logits of every patch token
    assert results["tokens"] == tokens
    assert results["gmacs"] * 1e9 == pytest.approx(encoder + linear_decoder, rel=1e-12)
    mask_transformer = MSViTForSemanticSegmentation(
        tiny_config(
            num_channels=3,
            num_labels=NUM_LABELS,
            id2label=id2label,
            label2id=label2id,
            decoder_type="mask_transformer",
        )
    )
    heavier = evaluate_segmenter(
        mask_transformer, batches, Accelerator(cpu=True), load_metric("mean_iou"), split_policy=policy
    )
    assert heavier["gmacs"] * 1e9 > encoder + linear_decoder
