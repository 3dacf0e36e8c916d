"""`transformers.Trainer` fine-tunes MSViT with plain `TrainingArguments` and no custom code, and keeps the gate's
compute budget: the model's loss (cross-entropy + `gate_loss_weight` x gBaS, the paper's straight-through
objective) is what the Trainer optimises. (The counterfactual objective's Trainer test is
`test_counterfactual_trainer.py`.)

The data is an `imagefolder` written here: 32x32 images of a textured square at a random place, red for one class and
blue for the other, loaded through `msvit.train.data` and scored by `msvit.metrics`.

The budget test starts both runs from the same model, saved with its gate at a 0.75 fine ratio, and fine-tunes it
towards `target_fine_ratio=0.25`: with the gate loss the gate ends near 0.25, with `gate_loss_weight=0` it stays where
it started (the straight-through cross-entropy gradient alone barely moves it). The measured quantity is the mean
split probability of held-out images, which is the expected fine ratio in training (a Gumbel-sigmoid sample exceeds
1/2 with probability `sigmoid(logit)`) and what gBaS steers. The eval-mode split fraction thresholds these
probabilities at `gate_threshold` and only follows the budget once the gate is nearly binary, which takes far longer
than a test (set `fine_ratio_budget` to pin the inference budget).
"""

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments, ViTImageProcessorPil

from modeling_msvit import MSViTConfig, MSViTForImageClassification
from msvit.metrics import make_compute_metrics
from msvit.train.data import class_names, collate_fn, load_classification_splits, make_transforms


IMAGE_SIZE = 32
START_FINE_RATIO, TARGET_FINE_RATIO = 0.75, 0.25
TOLERANCE = 0.1


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """`<dir>/<class>/<n>.png`: 32 images per class."""
    folder = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    checker = ((np.arange(16)[:, None] // 2 + np.arange(16)[None] // 2) % 2).astype(np.uint8)
    for label, channel in (("red", 0), ("blue", 2)):
        (folder / label).mkdir()
        for index in range(32):
            image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 20, dtype=np.uint8)
            top, left = rng.integers(0, IMAGE_SIZE - 16 + 1, size=2)
            image[top : top + 16, left : left + 16, channel] = 80 + 170 * checker
            image[top : top + 16, left : left + 16, 1] = 60 * checker
            PIL.Image.fromarray(image).save(folder / label / f"{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def data(image_folder, tmp_path_factory):
    """train (32 images), validation (16) and test (16) carved from the folder; transforms for the Trainer."""
    splits = load_classification_splits(
        f"imagefolder:{image_folder}", validation_size=16, seed=0, cache_dir=tmp_path_factory.mktemp("hf_cache")
    )
    processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=0.5, image_std=0.5)
    train = splits["train"].with_transform(make_transforms(processor, train=True))
    held_out = {
        split: splits[split].with_transform(make_transforms(processor, train=False))
        for split in ("validation", "test")
    }
    return {"labels": class_names(splits), "train": train, **held_out}


@pytest.fixture(scope="module")
def start_dir(data, tmp_path_factory):
    """A saved MSViT whose gate (bias and gBaS priors) sits at a 0.75 fine ratio."""
    labels = data["labels"]
    torch.manual_seed(0)
    config = MSViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        coarse_patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        gate_hidden_size=16,
        gate_objective="straight_through",
        gate_loss_type="gbas",
        target_fine_ratio=START_FINE_RATIO,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
    )
    folder = tmp_path_factory.mktemp("start")
    MSViTForImageClassification(config).save_pretrained(folder)
    return folder


def batch_of(dataset) -> dict[str, torch.Tensor]:
    return collate_fn([dataset[index] for index in range(len(dataset))])


@torch.no_grad()
def held_out_fine_ratios(model, data) -> tuple[float, float]:
    """(mean split probability, eval-mode split fraction) over the validation and test images."""
    model.eval()
    pixel_values = torch.cat([batch_of(data[split])["pixel_values"] for split in ("validation", "test")])
    outputs = model(pixel_values=pixel_values)
    return outputs.split_probs.mean().item(), outputs.split_mask.float().mean().item()


def make_trainer(model, data, output_dir, **overrides) -> Trainer:
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        max_steps=400,
        learning_rate=3e-2,
        lr_scheduler_type="linear",
        logging_steps=50,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,  # the transforms need the `image` column
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    args.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collate_fn,
        compute_metrics=make_compute_metrics("accuracy"),
    )


def fine_tune(start_dir, data, output_dir, gate_loss_weight: float) -> tuple[float, float, dict]:
    model = MSViTForImageClassification.from_pretrained(
        start_dir, target_fine_ratio=TARGET_FINE_RATIO, gate_loss_weight=gate_loss_weight
    )
    assert model.config.gate_loss_type == "gbas"
    start_probability, _ = held_out_fine_ratios(model, data)
    assert abs(start_probability - START_FINE_RATIO) < 0.02
    trainer = make_trainer(model, data, output_dir)
    trainer.train()
    assert all(np.isfinite(record["loss"]) for record in trainer.state.log_history if "loss" in record)
    metrics = trainer.evaluate()
    return (*held_out_fine_ratios(model, data), metrics)


def test_trainer_keeps_the_gate_budget(start_dir, data, tmp_path):
    probability, fraction, metrics = fine_tune(start_dir, data, tmp_path / "with_gate_loss", gate_loss_weight=1.0)
    control_probability, _, control_metrics = fine_tune(start_dir, data, tmp_path / "without", gate_loss_weight=0.0)
    report = (
        f"with gate loss: {probability:.3f} (eval-mode fraction {fraction:.3f}); without: {control_probability:.3f}"
    )
    assert abs(probability - TARGET_FINE_RATIO) < TOLERANCE, report
    assert abs(control_probability - TARGET_FINE_RATIO) > abs(probability - TARGET_FINE_RATIO) + 2 * TOLERANCE, report
    # the task itself is learnt in both runs, scored by msvit.metrics through the Trainer
    assert metrics["eval_accuracy"] >= 0.75 and control_metrics["eval_accuracy"] >= 0.75


def test_trainer_loss_includes_the_gate_loss(start_dir, data, tmp_path):
    model = MSViTForImageClassification.from_pretrained(
        start_dir, target_fine_ratio=TARGET_FINE_RATIO, gate_loss_weight=2.5
    )
    trainer = make_trainer(model, data, tmp_path)
    batch = batch_of(data["validation"])
    model.train()

    torch.manual_seed(1)
    outputs = model(**batch)
    assert outputs.gate_loss is not None and outputs.gate_loss.item() > 0
    expected = F.cross_entropy(outputs.logits, batch["labels"]) + 2.5 * outputs.gate_loss
    torch.testing.assert_close(outputs.loss, expected)

    # the loss the Trainer backpropagates and logs, from the same forward (same Gumbel noise); in training it passes
    # the number of labels of the (accumulated) batch, here one batch of one process
    for num_items_in_batch in (None, len(batch["labels"])):
        torch.manual_seed(1)
        trainer_loss, trainer_outputs = trainer.compute_loss(
            model, dict(batch), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        torch.testing.assert_close(trainer_loss, expected)
        torch.testing.assert_close(trainer_outputs.gate_loss, outputs.gate_loss)

    # evaluation (hard decisions at the budget or threshold) reports the task loss alone
    model.eval()
    with torch.no_grad():
        outputs = model(**batch)
    assert outputs.gate_loss is None
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, batch["labels"]))


def test_gate_loss_weight_does_not_grow_with_gradient_accumulation(start_dir, data, tmp_path):
    model = MSViTForImageClassification.from_pretrained(start_dir, target_fine_ratio=TARGET_FINE_RATIO)
    trainer = make_trainer(model, data, tmp_path, gradient_accumulation_steps=2)
    model.train()
    batch = batch_of(data["validation"])
    micro_batches = [{key: value[half::2] for key, value in batch.items()} for half in (0, 1)]
    num_items = len(batch["labels"])  # what Trainer counts over the two micro-batches of one optimisation step
    total, expected = 0.0, 0.0
    for index, micro_batch in enumerate(micro_batches):
        torch.manual_seed(index)
        loss = trainer.compute_loss(model, dict(micro_batch), num_items_in_batch=num_items)
        if not trainer.model_accepts_loss_kwargs:  # then Trainer.training_step divides by the accumulation steps
            loss = loss / len(micro_batches)
        total = total + loss
        torch.manual_seed(index)
        outputs = model(**micro_batch)  # the per-micro-batch mean loss, as without accumulation
        expected = expected + outputs.loss / len(micro_batches)
    torch.testing.assert_close(total, expected)
