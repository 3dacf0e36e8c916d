"""The main job on the embedded default: an MSViT (untrained gate) end to end on real photos.

    python -m msvit.experiments.photo_demo [--preset msvit-tiny] [--output outputs/demo]

For each of scikit-image's `astronaut`, `coffee`, `chelsea` and `rocket` photos: the gate's decisions, the token
count, the MACs against a ViT/16 of the same size, and a gate-map PNG. Then the model is exported as a Hub folder,
reloaded with `trust_remote_code=True` in a clean process, and its logits compared with the original's.
The weights are freshly initialised (no pretrained weights can be downloaded here), so the decisions show the
mechanism, not learned semantics.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from modeling_msvit import MSViTForImageClassification
from msvit.configuration import load_preset
from msvit.tools.export import compute_summary, export_hub_folder, image_processor_for, remote_code_logits
from msvit.tools.gate_map import render_gate_map, side_by_side


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run an MSViT end to end on real photos and export it.")
    parser.add_argument("--preset", default="msvit-tiny", help="Model preset from configuration/models/.")
    parser.add_argument("--output", default="outputs/demo", help="Folder for gate maps, report and Hub folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random initialisation.")
    parser.add_argument(
        "--budgets", type=float, nargs="*", default=[0.25, 0.5, 0.75], help="Fine-ratio budgets to report."
    )
    return parser.parse_args(argv)


def load_photos() -> list[Image.Image]:
    try:
        from skimage import data  # the photos ship inside scikit-image, an optional dependency
    except ImportError as error:
        raise ImportError(
            "The photo demo reads its photos from scikit-image: pip install 'msvit[experiments]'."
        ) from error
    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output = Path(args.output)
    (output / "gate_maps").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = load_preset(args.preset)
    model = MSViTForImageClassification(config).eval()
    processor = image_processor_for(config)
    images = load_photos()
    pixel_values = processor(images=images, return_tensors="pt").pixel_values

    start = time.perf_counter()
    with torch.no_grad():
        outputs = model(pixel_values)
    seconds = time.perf_counter() - start
    macs = model.compute_macs(outputs.token_counts)
    summary = compute_summary(model)
    vit_gmacs = float(summary["vit_gmacs"])
    num_coarse = outputs.split_mask.shape[1]

    size = (processor.size["width"], processor.size["height"])
    tree = model.base_model.scale_tree(size[1], size[0])
    rows, panels, captions = [], [], []
    for name, image, split_mask, count, image_macs in zip(
        PHOTOS, images, outputs.split_mask, outputs.token_counts, macs
    ):
        gate_map = render_gate_map(image.resize(size), split_mask, tree)
        gate_map.save(output / "gate_maps" / f"{name}.png")
        panels.append(gate_map)
        captions.append(f"{name}: {int(split_mask.sum())}/{num_coarse} split, {int(count)} tokens")
        rows.append(
            {
                "image": name,
                "split_regions": int(split_mask.sum()),
                "fine_ratio": round(float(split_mask.float().mean()), 3),
                "tokens": int(count),
                "gmacs": round(image_macs.item() / 1e9, 3),
                "macs_vs_vit16": round(image_macs.item() / 1e9 / vit_gmacs, 3),
            }
        )
    side_by_side(panels, captions).save(output / "gate_maps.png")

    budgets = []
    for budget in args.budgets:
        model.set_budget(fine_ratio=budget)
        with torch.no_grad():
            counts = model(pixel_values).token_counts
        budgets.append({"fine_ratio_budget": budget, "tokens": int(counts[0]), "gmacs": round(
            model.compute_macs(counts)[0].item() / 1e9, 3)})  # fmt: skip
    model.set_budget(threshold=model.config.gate_threshold)

    hub_folder = export_hub_folder(model, output / f"{args.preset}-hub", description=(
        "Randomly initialised weights written by the repository's demo; the gate is untrained."))  # fmt: skip
    reloaded = remote_code_logits(hub_folder, pixel_values)
    reload_delta = (reloaded - outputs.logits).abs().max().item()

    report = {
        "preset": args.preset,
        "images": rows,
        "fixed_budgets": budgets,
        "vit16_gmacs": vit_gmacs,
        "token_range": [summary["min_tokens"], summary["max_tokens"]],
        "forward_seconds_batch_of_4": round(seconds, 3),
        "hub_folder": str(hub_folder),
        "remote_code_reload_max_abs_logit_delta": reload_delta,
    }
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, output)
    if reload_delta > 1e-5:
        raise SystemExit(f"Reloaded model differs from the original (max |delta logit| = {reload_delta:.2e}).")
    return report


def print_report(report: dict, output: Path) -> None:
    print(f"\nMSViT {report['preset']} (untrained gate) on {len(report['images'])} photos")
    print(f"{'image':<10} {'split':>7} {'tokens':>7} {'GMACs':>7} {'vs ViT/16':>10}")
    for row in report["images"]:
        print(
            f"{row['image']:<10} {row['split_regions']:>7} {row['tokens']:>7} {row['gmacs']:>7.3f} "
            f"{row['macs_vs_vit16']:>9.0%}"
        )
    print(f"ViT/16 of the same size: {report['vit16_gmacs']:.3f} GMACs, {report['token_range'][1]} tokens")
    for row in report["fixed_budgets"]:
        print(f"fixed budget {row['fine_ratio_budget']:.2f}: {row['tokens']} tokens, {row['gmacs']:.3f} GMACs")
    delta = report["remote_code_reload_max_abs_logit_delta"]
    print(f"Hub folder: {report['hub_folder']} (reloaded with trust_remote_code, max |delta logit| = {delta:.1e})")
    print(f"Gate maps: {output / 'gate_maps.png'} and {output / 'gate_maps'}/")


if __name__ == "__main__":
    main()
