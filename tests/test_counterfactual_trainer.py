"""A plain `transformers.Trainer` trains the counterfactual gate with no custom code, and the gate learns where
detail is.

The task needs fine tokens, in one region: each 32x32 image is dark except one 8x8 coarse region striped at a
one-pixel period, horizontally for class 0 and vertically for class 1. Area-downscaled to the fine patch size, both
stripe patterns become the same flat grey, so a coarse token cannot tell the classes apart, and splitting the
striped region is worth a lot while splitting an empty one is worth nothing. A backbone is first trained on fine
tokens only; then `Trainer` trains the gate on it, frozen, through `model(pixel_values, labels).loss`.
"""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_msvit import MSViTForImageClassification
from tests.conftest import tiny_config


NUM_COARSE = 16


def striped_images(num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images `(N, 1, 32, 32)`, labels `(N,)` and the striped region's index `(N,)`."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (num_images,), generator=generator)
    regions = torch.randint(0, NUM_COARSE, (num_images,), generator=generator)
    stripes = (torch.arange(8) % 2).float() * 2  # 0, 2, 0, 2, ...: mean 1 over any 2x2 block
    horizontal, vertical = stripes[:, None].expand(8, 8), stripes[None, :].expand(8, 8)
    images = torch.full((num_images, 1, 32, 32), -1.0)
    for index, (label, region) in enumerate(zip(labels.tolist(), regions.tolist())):
        row, column = divmod(region, 4)
        images[index, 0, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8] = vertical if label else horizontal
    return images, labels, regions


class StripedDataset(torch.utils.data.Dataset):
    def __init__(self, num_images: int, seed: int):
        self.images, self.labels, _ = striped_images(num_images, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


@pytest.fixture(scope="module")
def fine_token_backbone() -> MSViTForImageClassification:
    """An MSViT trained with every region split, i.e. a ViT/4 on the task."""
    torch.manual_seed(0)
    model = MSViTForImageClassification(tiny_config(num_channels=1, num_labels=2, train_token_path="gathered"))
    images, labels, _ = striped_images(2048, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    all_fine = torch.ones(64, NUM_COARSE, dtype=torch.bool)
    model.train()
    for _ in range(2):
        for batch in torch.randperm(len(labels)).split(64):
            model(images[batch], labels=labels[batch], split_mask=all_fine[: len(batch)]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def gate_orientation(model) -> tuple[float, float]:
    """(how often the striped region gets the image's highest split logit, accuracy at a one-region budget)."""
    images, labels, regions = striped_images(512, seed=99)
    model.eval()
    model.set_budget(fine_ratio=1 / NUM_COARSE)
    outputs = model(images)
    top_region = outputs.split_logits.argmax(1)
    return (top_region == regions).float().mean().item(), (outputs.logits.argmax(1) == labels).float().mean().item()


def test_trainer_teaches_the_counterfactual_gate_where_detail_is(fine_token_backbone, tmp_path):
    model = fine_token_backbone
    with torch.no_grad():
        all_fine = model(striped_images(512, seed=99)[0], split_mask=torch.ones(512, NUM_COARSE, dtype=torch.bool))
        assert (all_fine.logits.argmax(1) == striped_images(512, seed=99)[1]).float().mean() > 0.95
    # start from a gate that points the wrong way: a random MLP ranks the grey region consistently first or last
    if gate_orientation(model)[0] > 0.5:
        with torch.no_grad():
            model.msvit.embeddings.gate.layers[-1].weight.neg_()
    before, accuracy_before = gate_orientation(model)
    assert before < 0.1 and accuracy_before < 0.8

    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".gate." in name
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        max_steps=120,
        learning_rate=1e-2,
        warmup_steps=10,
        logging_steps=40,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=StripedDataset(1024, seed=1))
    trainer.train()
    after, accuracy_after = gate_orientation(model)
    assert after > 0.9, (before, after)
    assert accuracy_after > 0.9  # one split region, chosen by the gate, recovers the all-fine accuracy
    logged = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert logged[-1] < logged[0]
