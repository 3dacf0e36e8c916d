"""End-of-run artefacts of a trained MSViT: a Hub folder with the measured results in its card, and figures (gate
maps for classifiers; image, gate map, prediction and ground truth for segmenters)."""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch

from msvit.tools.export import TASKS, export_hub_folder, task_of
from msvit.tools.gate_map import render_gate_map, side_by_side, stacked
from msvit.train.evaluation import upsampled_argmax


if TYPE_CHECKING:  # the scripts import this module
    from msvit.train.run_classification import ClassificationArguments
    from msvit.train.run_segmentation import SegmentationArguments


COMPUTE_COLUMNS = (
    ("GMACs / image", lambda r: f"{r['gmacs']:.4f}"),
    ("tokens / image", lambda r: f"{r['tokens']:.1f}"),
    ("fine ratio", lambda r: f"{r.get('fine_ratio', 1.0):.3f}"),
)
# segmentation masks: background black, then one colour per class (cycled beyond 11); ignored pixels white
MASK_PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (170, 110, 40),
        (128, 128, 128),
    ],
    dtype=np.uint8,
)
IGNORE_COLOUR = (255, 255, 255)


def reported_split(results: dict) -> str:
    """The split a model card's headline figures come from: test when it was evaluated, else validation."""
    return "test" if "test" in results else "validation"


def results_table(results: dict, quality_columns: tuple[tuple[str, Callable[[dict], str]], ...]) -> str:
    """A markdown table with one row per evaluated split: its `quality_columns`, then the compute figures."""
    columns = (*quality_columns, *COMPUTE_COLUMNS)
    rows = [
        "| split | " + " | ".join(header for header, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for split in ("validation", "test"):
        if split in results:
            r = results[split]
            cells = " | ".join(cell(r) for _, cell in columns)
            rows.append(f"| {split} ({r['num_samples']} images) | {cells} |")
    return "\n".join(rows)


def results_markdown(results: dict) -> str:
    return results_table(results, (("top-1", lambda r: f"{100 * r['accuracy']:.2f} %"),))


def segmentation_results_markdown(results: dict, id2label: dict[int, str]) -> str:
    """The results table (mean IoU, pixel accuracy, compute) and the per-class IoU of the reported split."""
    table = results_table(
        results,
        (
            ("mean IoU", lambda r: f"{100 * r['mean_iou']:.2f} %"),
            ("pixel accuracy", lambda r: f"{100 * r['pixel_accuracy']:.2f} %"),
        ),
    )
    split = reported_split(results)
    per_class = ["| class | IoU |", "|---|---|"] + [
        f"| {id2label[index]} | {'n/a' if iou is None else f'{100 * iou:.2f} %'} |"
        for index, iou in enumerate(results[split]["per_category_iou"])
    ]
    return f"{table}\n\nPer-class IoU ({split}):\n\n" + "\n".join(per_class)


def model_index(model_name: str, dataset: str, split: str, task: str, metrics: list[dict]) -> list[dict]:
    """The Hub's `model-index` metadata of one model evaluated on `split` of `dataset` for `task`."""
    return [
        {
            "name": model_name,
            "results": [
                {
                    "task": {"type": task, "name": TASKS[task].name},
                    "dataset": {"type": dataset, "name": dataset, "split": split},
                    "metrics": metrics,
                }
            ],
        }
    ]


def export_hub(
    model,
    processor,
    results: dict,
    output_dir: Path,
    args: "ClassificationArguments | SegmentationArguments",
    *,
    script: str,
) -> Path:
    """Write `hub/`: the model, its processor and a card with the measured results of the reported split."""
    name = f"msvit-{output_dir.name}"
    task = task_of(model)
    split = reported_split(results)
    scores = results[split]
    if task == "image-segmentation":
        markdown = segmentation_results_markdown(results, model.config.id2label)
        metrics = [
            {"type": "mean_iou", "value": round(scores["mean_iou"], 4), "name": f"mean IoU ({split})"},
            {"type": "accuracy", "value": round(scores["pixel_accuracy"], 4), "name": f"pixel accuracy ({split})"},
        ]
    else:
        markdown = results_markdown(results)
        metrics = [{"type": "accuracy", "value": round(scores["accuracy"], 4), "name": f"top-1 ({split})"}]
    return export_hub_folder(
        model,
        output_dir / "hub",
        image_processor=processor,
        model_name=name,
        description=(
            f"Trained with `train/{script} --stage {args.stage}` on `{args.dataset}` "
            f"({results['steps']} steps, seed {args.seed}); split policy `{args.split_policy}`."
        ),
        results_markdown=markdown,
        model_index=model_index(name, args.dataset, split, task, metrics),
    )


def gate_map_panel(model, image: PIL.Image.Image, split_mask: torch.Tensor, scale: int) -> PIL.Image.Image:
    """`image`'s gate map at the model's input size, enlarged `scale` times."""
    size = (model.config.image_size, model.config.image_size)
    tree = model.base_model.scale_tree(size[1], size[0])
    panel = render_gate_map(image.convert("RGB").resize(size), split_mask, tree)
    return panel.resize((scale * size[0], scale * size[1]), resample=PIL.Image.NEAREST)


@torch.no_grad()
def gate_maps(model, processor, images: list, num_channels: int) -> PIL.Image.Image:
    """Gate maps of `images` (PIL) side by side, captioned with their token counts."""
    mode = "RGB" if num_channels == 3 else "L"
    pixel_values = processor([image.convert(mode) for image in images], return_tensors="pt")["pixel_values"]
    model.eval()
    outputs = model(pixel_values.to(model.device, model.dtype))
    panels = [gate_map_panel(model, image, mask, 4) for image, mask in zip(images, outputs.split_mask.cpu())]
    captions = [f"{int(count)} tokens" for count in outputs.token_counts]
    return side_by_side(panels, captions)


def export_trained_msvit(
    model, processor, validation, results: dict, output_dir: Path, args: "ClassificationArguments"
) -> Path:
    """Write `hub/` (model card with the measured results) and `gate_maps.png` of the first validation images."""
    folder = export_hub(model, processor, results, output_dir, args, script="run_classification.py")
    count = min(args.num_gate_map_images, len(validation))
    if count:
        images = [validation[i]["image"] for i in range(count)]
        gate_maps(model, processor, images, model.config.num_channels).save(output_dir / "gate_maps.png")
    return folder


def colour_mask(mask: torch.Tensor, ignore_index: int = 255) -> PIL.Image.Image:
    """An `(H, W)` class-index mask in `MASK_PALETTE` colours, `ignore_index` in `IGNORE_COLOUR`."""
    mask = mask.cpu().numpy()
    pixels = MASK_PALETTE[np.where(mask == ignore_index, 0, mask) % len(MASK_PALETTE)]
    pixels[mask == ignore_index] = IGNORE_COLOUR
    return PIL.Image.fromarray(pixels)


@torch.no_grad()
def prediction_sheet(model, images: list, pixel_values: torch.Tensor, labels: torch.Tensor) -> PIL.Image.Image:
    """One row per image: the image, its gate map, the predicted mask (argmax of the logits upsampled to the label
    size) and the ground truth. `images` are PIL, `pixel_values` and `labels` their processed tensors."""
    model.eval()
    outputs = model(pixel_values.to(model.device, model.dtype))
    predictions = upsampled_argmax(outputs, labels).cpu()
    scale = max(1, 256 // model.config.image_size)
    ignore_index = model.config.semantic_loss_ignore_index
    rows = []
    for image, split_mask, count, prediction, label in zip(
        images, outputs.split_mask.cpu(), outputs.token_counts, predictions, labels
    ):
        gate = gate_map_panel(model, image, split_mask, scale)
        panels = [
            image.convert("RGB").resize(gate.size, resample=PIL.Image.NEAREST),
            gate,
            *(
                colour_mask(mask, ignore_index).resize(gate.size, resample=PIL.Image.NEAREST)
                for mask in (prediction, label)
            ),
        ]
        rows.append(side_by_side(panels, ["image", f"gate: {int(count)} tokens", "prediction", "ground truth"]))
    return stacked(rows)


def export_trained_segmenter(
    model, processor, results: dict, output_dir: Path, args: "SegmentationArguments", images: list, batch: dict
) -> Path:
    """Write `hub/` (model card with the measured results) and `predictions.png` of `images` (PIL) and their
    processed `batch` (`pixel_values`, `labels`)."""
    folder = export_hub(model, processor, results, output_dir, args, script="run_segmentation.py")
    if images:
        prediction_sheet(model, images, batch["pixel_values"], batch["labels"]).save(output_dir / "predictions.png")
    return folder
