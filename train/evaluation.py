"""Evaluation shared by the training scripts: accuracy and mean IoU through local `evaluate` modules, measured
compute, and side-by-side inference throughput."""

import math
import statistics
import time
from collections.abc import Callable

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from modeling_msvit.macs_msvit import vit_macs_for_config
from msvit.train.data import make_transforms
from msvit.train.split_policies import forced_split_mask, image_tree


def is_msvit(model: torch.nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "msvit"


def forced_split_kwargs(
    config, policy: str, pixel_values: torch.Tensor, fine_ratio: float, generator: torch.Generator | None = None
) -> dict:
    """`{"split_mask": (B, D) bool}` on the images' device for a non-gate split policy, `{}` for the gate."""
    if policy == "gate":
        return {}
    split_mask = forced_split_mask(policy, len(pixel_values), image_tree(config, pixel_values), fine_ratio, generator)
    return {"split_mask": split_mask.to(pixel_values.device)}


@torch.no_grad()
def evaluation_loop(
    model: torch.nn.Module,
    dataloader,
    accelerator: Accelerator,
    metric,
    predict: Callable[[object, torch.Tensor], torch.Tensor],
    *,
    split_policy: str = "gate",
    fine_ratio: float = 0.5,
    description: str = "eval",
) -> tuple[int, dict | None]:
    """Run `model` in eval mode over `dataloader` and feed `metric` with `predict(outputs, labels)` against the labels.

    Predictions, labels, token counts and split masks from every process are gathered with `gather_for_metrics`, so
    each sample counts exactly once. A non-gate `split_policy` forces an MSViT's decisions (random masks come from a
    fixed seed, so every evaluation sees the same ones). Returns the number of samples and, for an MSViT, the mean
    GMACs per image (`model.compute_macs` of each image's own token count: gate, embeddings, encoder and head or
    decoder), mean tokens, fine ratio and the split rate of every coarse position; None for a plain ViT.
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    msvit = is_msvit(unwrapped)
    generator = torch.Generator().manual_seed(1234)
    token_counts, split_masks, num_samples = [], [], 0
    for batch in tqdm(dataloader, desc=description, disable=not accelerator.is_local_main_process, leave=False):
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        kwargs = {}
        if msvit:
            kwargs = forced_split_kwargs(unwrapped.config, split_policy, pixel_values, fine_ratio, generator)
        outputs = model(pixel_values=pixel_values, **kwargs)
        predictions, references = accelerator.gather_for_metrics((predict(outputs, labels), labels))
        metric.add_batch(predictions=predictions.cpu().numpy(), references=references.cpu().numpy())
        num_samples += len(references)
        if msvit:
            counts, splits = accelerator.gather_for_metrics((outputs.token_counts, outputs.split_mask))
            token_counts.append(counts.cpu())
            split_masks.append(splits.cpu())
    if not msvit:
        return num_samples, None
    counts = torch.cat(token_counts)
    splits = torch.cat(split_masks).float()
    return num_samples, {
        "gmacs": unwrapped.compute_macs(counts).double().mean().item() / 1e9,
        "tokens": counts.double().mean().item(),
        "fine_ratio": splits.mean().item(),
        "split_rate_per_position": [round(rate, 4) for rate in splits.mean(0).tolist()],
    }


def evaluate_classifier(model: torch.nn.Module, dataloader, accelerator: Accelerator, metric, **options) -> dict:
    """Top-1 accuracy, average per-image GMACs and tokens, and (MSViT) the fine ratio and the split rate of every
    coarse position. `options`: `split_policy`, `fine_ratio`, `description` of `evaluation_loop`."""
    num_samples, compute = evaluation_loop(
        model, dataloader, accelerator, metric, lambda outputs, labels: outputs.logits.argmax(-1), **options
    )
    results = {"accuracy": metric.compute()["accuracy"], "num_samples": num_samples}
    if compute is None:
        config = accelerator.unwrap_model(model).config
        num_patches = (config.image_size // config.patch_size) ** 2
        compute = {"gmacs": vit_macs_for_config(config, num_labels=config.num_labels) / 1e9, "tokens": 1 + num_patches}
    return {**results, **compute}


def upsampled_argmax(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel predictions `(B, H, W)`: the argmax of the logits upsampled bilinearly to the label size (as in the
    training loss)."""
    logits = F.interpolate(outputs.logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)


def evaluate_segmenter(model: torch.nn.Module, dataloader, accelerator: Accelerator, metric, **options) -> dict:
    """Mean IoU, per-class IoU (indexed by label id; None for a class absent from both predictions and labels) and
    pixel accuracy of `upsampled_argmax` through the local `mean_iou` metric (pixels labelled
    `config.semantic_loss_ignore_index` do not count), and the compute figures of `evaluation_loop`. `options`:
    `split_policy`, `fine_ratio`, `description` of `evaluation_loop`."""
    num_samples, compute = evaluation_loop(model, dataloader, accelerator, metric, upsampled_argmax, **options)
    config = accelerator.unwrap_model(model).config
    scores = metric.compute(num_labels=config.num_labels, ignore_index=config.semantic_loss_ignore_index)
    return {
        "mean_iou": float(scores["mean_iou"]),
        "pixel_accuracy": float(scores["overall_accuracy"]),
        "mean_accuracy": float(scores["mean_accuracy"]),
        "per_category_iou": [None if math.isnan(iou) else float(iou) for iou in scores["per_category_iou"]],
        "num_samples": num_samples,
        **compute,
    }


def processed_pixel_values(
    dataset: datasets.Dataset, image_processor, num_channels: int, chunk_size: int = 1024
) -> torch.Tensor:
    """Every image of `dataset` through `image_processor`, as one `(N, num_channels, H, W)` tensor, processed
    `chunk_size` images at a time into the result: the peak memory stays near the result's own, not three times it
    (decoded images, per-batch arrays and the stacked copy at once)."""
    transformed = dataset.with_transform(make_transforms(image_processor, train=False, num_channels=num_channels))
    first = transformed[:chunk_size]["pixel_values"]
    pixel_values = first.new_empty((len(dataset), *first.shape[1:]))
    pixel_values[:chunk_size] = first
    for start in range(chunk_size, len(dataset), chunk_size):
        pixel_values[start : start + chunk_size] = transformed[start : start + chunk_size]["pixel_values"]
    return pixel_values


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
