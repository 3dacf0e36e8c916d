"""End-of-run artefacts of a trained MSViT: a Hub folder with the measured results in its card, and gate maps."""

import argparse
from pathlib import Path

import torch

from tools.export import export_hub_folder
from tools.gate_map import render_gate_map, side_by_side


def results_markdown(results: dict) -> str:
    rows = ["| split | top-1 | GMACs / image | tokens / image | fine ratio |", "|---|---|---|---|---|"]
    for split in ("validation", "test"):
        if split in results:
            r = results[split]
            rows.append(
                f"| {split} ({r['num_samples']} images) | {100 * r['accuracy']:.2f} % | {r['gmacs']:.4f} | "
                f"{r['tokens']:.1f} | {r.get('fine_ratio', 1.0):.3f} |"
            )
    return "\n".join(rows)


def model_index(model_name: str, dataset: str, results: dict) -> list[dict]:
    split = "test" if "test" in results else "validation"
    metrics = [{"type": "accuracy", "value": round(results[split]["accuracy"], 4), "name": f"top-1 ({split})"}]
    return [
        {
            "name": model_name,
            "results": [
                {
                    "task": {"type": "image-classification", "name": "Image Classification"},
                    "dataset": {"type": dataset, "name": dataset, "split": split},
                    "metrics": metrics,
                }
            ],
        }
    ]


@torch.no_grad()
def gate_maps(model, processor, images: list, num_channels: int) -> "PIL.Image.Image":  # noqa: F821
    """Gate maps of `images` (PIL) side by side, captioned with their token counts."""
    mode = "RGB" if num_channels == 3 else "L"
    pixel_values = processor([image.convert(mode) for image in images], return_tensors="pt")["pixel_values"]
    model.eval()
    outputs = model(pixel_values.to(model.device, model.dtype))
    size = (model.config.image_size, model.config.image_size)
    panels = [
        render_gate_map(
            image.convert("RGB").resize(size), split_mask, model.config.coarse_grid_size, model.config.scale_ratio
        ).resize((4 * size[0], 4 * size[1]), resample=0)  # fmt: skip
        for image, split_mask in zip(images, outputs.split_mask.cpu())
    ]
    captions = [f"{int(count)} tokens" for count in outputs.token_counts]
    return side_by_side(panels, captions)


def export_trained_msvit(
    model, processor, validation, results: dict, output_dir: Path, args: argparse.Namespace
) -> Path:
    """Write `hub/` (model card with the measured results) and `gate_maps.png` of the first validation images."""
    name = f"msvit-{output_dir.name}"
    folder = export_hub_folder(
        model,
        output_dir / "hub",
        image_processor=processor,
        model_name=name,
        description=(
            f"Trained with `train/run_classification.py --stage {args.stage}` on `{args.dataset}` "
            f"({results['steps']} steps, seed {args.seed}); split policy `{args.split_policy}`."
        ),
        results_markdown=results_markdown(results),
        model_index=model_index(name, args.dataset, results),
    )
    count = min(args.num_gate_map_images, len(validation))
    if count:
        images = [validation[i]["image"] for i in range(count)]
        gate_maps(model, processor, images, model.config.num_channels).save(output_dir / "gate_maps.png")
    return folder
