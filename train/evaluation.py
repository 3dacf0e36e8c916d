"""Evaluation shared by the training scripts: accuracy through a local `evaluate` module, measured compute, and
side-by-side inference throughput."""

import statistics
import time
from collections.abc import Callable

import datasets
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from modeling_msvit.macs_msvit import vit_macs_for_config
from train.data import make_transforms
from train.split_policies import forced_split_mask


def is_msvit(model: torch.nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "msvit"


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    dataloader,
    accelerator: Accelerator,
    metric,
    *,
    split_policy: str = "gate",
    fine_ratio: float = 0.5,
    description: str = "eval",
) -> dict:
    """Top-1 accuracy, average per-image GMACs and tokens, and (MSViT) the split rate of every coarse position.

    Predictions from every process are gathered with `gather_for_metrics`, so each sample counts exactly once.
    A non-gate `split_policy` forces the decisions (random masks come from a fixed seed, so every evaluation sees
    the same ones).
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    msvit = is_msvit(unwrapped)
    generator = torch.Generator().manual_seed(1234)
    token_counts, split_masks, num_samples = [], [], 0
    for batch in tqdm(dataloader, desc=description, disable=not accelerator.is_local_main_process, leave=False):
        kwargs = {}
        if msvit:
            split_mask = forced_split_mask(
                split_policy, len(batch["labels"]), unwrapped.config.coarse_grid_size, fine_ratio, generator
            )
            if split_mask is not None:
                kwargs["split_mask"] = split_mask.to(batch["pixel_values"].device)
        outputs = model(pixel_values=batch["pixel_values"], **kwargs)
        predictions, references = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
        metric.add_batch(predictions=predictions.cpu(), references=references.cpu())
        num_samples += len(references)
        if msvit:
            counts, splits = accelerator.gather_for_metrics((outputs.token_counts, outputs.split_mask))
            token_counts.append(counts.cpu())
            split_masks.append(splits.cpu())
    results = {"accuracy": metric.compute()["accuracy"], "num_samples": num_samples}
    if msvit:
        counts = torch.cat(token_counts)
        splits = torch.cat(split_masks).float()
        results.update(
            gmacs=unwrapped.compute_macs(counts).double().mean().item() / 1e9,
            tokens=counts.double().mean().item(),
            fine_ratio=splits.mean().item(),
            split_rate_per_position=[round(rate, 4) for rate in splits.mean(0).tolist()],
        )
    else:
        num_patches = (unwrapped.config.image_size // unwrapped.config.patch_size) ** 2
        gmacs = vit_macs_for_config(unwrapped.config, num_labels=unwrapped.config.num_labels) / 1e9
        results.update(gmacs=gmacs, tokens=1 + num_patches)
    return results


def processed_pixel_values(dataset: datasets.Dataset, image_processor, num_channels: int) -> torch.Tensor:
    """Every image of `dataset` through `image_processor`, as one `(N, num_channels, H, W)` tensor."""
    transform = make_transforms(image_processor, train=False, num_channels=num_channels)
    return dataset.with_transform(transform)[: len(dataset)]["pixel_values"]


@torch.no_grad()
def interleaved_images_per_second(
    runners: dict[str, Callable[[torch.Tensor], object]],
    inputs: dict[str, torch.Tensor],
    batch_size: int,
    repeats: int,
) -> dict[str, float]:
    """Median inference images/s of each runner (a model or any callable on a batch) over its `inputs`, timed in
    `repeats` interleaved repetitions (runner 1, runner 2, ..., runner 1, ...) after one warm-up pass."""
    seconds = {name: [] for name in runners}
    for repeat in range(repeats + 1):
        for name, runner in runners.items():
            start = time.perf_counter()
            for batch in inputs[name].split(batch_size):
                runner(batch)
            if repeat:  # the first pass is warm-up
                seconds[name].append(time.perf_counter() - start)
    return {name: len(inputs[name]) / statistics.median(values) for name, values in seconds.items()}
