"""The main job: backbone -> gate -> joint -> evaluate -> export -> gate maps -> report, on Translated Fashion-MNIST.

    python -m train.pipeline                       # the embedded default, about 10 minutes on 2 CPU cores
    python -m train.pipeline --max_train_samples 55000 --backbone_epochs 20 --hidden_size 128 --depth 4

A plain ViT at the fine patch size is trained from scratch, then the MSViT recipe of `train/msvit_recipe.py` runs on
it: the converted model is fine-tuned on random splits, its gate is trained on that frozen backbone, then everything is
fine-tuned with the gate's decisions. The report compares the MSViT with its own ViT
backbone: test accuracy, measured GMACs per image, and inference throughput measured side by side in this process
(interleaved repetitions, median).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from train.data import load_classification_splits
from train.evaluation import interleaved_images_per_second, processed_pixel_values
from train.msvit_recipe import msvit_stage_args
from train.run_classification import main as run_stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", default="outputs/pipeline", help="Where every stage and the report go.")
    add("--dataset", default="translated_fashion_mnist", help="Data set (see train/data.py).")
    add("--max_train_samples", type=int, default=16384, help="Training images (a fixed random subset).")
    add("--max_eval_samples", type=int, default=2000, help="Validation and test images (fixed random subsets).")
    add("--patch_size", type=int, default=8, help="Fine patch size of the backbone.")
    add("--coarse_patch_size", type=int, default=16, help="MSViT coarse patch size.")
    add("--hidden_size", type=int, default=96, help="Backbone width.")
    add("--depth", type=int, default=4, help="Backbone depth.")
    add("--heads", type=int, default=3, help="Attention heads.")
    add("--target_fine_ratio", type=float, default=0.5, help="Fraction of regions the gate loss aims to split.")
    add("--backbone_epochs", type=int, default=4, help="Epochs of backbone training.")
    add("--adapt_epochs", type=int, default=1, help="Epochs of backbone fine-tuning on random splits.")
    add("--gate_epochs", type=int, default=1, help="Epochs of gate training (frozen backbone).")
    add("--joint_epochs", type=int, default=2, help="Epochs of joint fine-tuning.")
    add("--batch_size", type=int, default=128, help="Training batch size.")
    add("--timing_images", type=int, default=1024, help="Test images used for the throughput comparison.")
    add("--timing_repeats", type=int, default=5, help="Interleaved timing repetitions (the median is reported).")
    add("--seed", type=int, default=0, help="Seed of every stage.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    common = [
        "--dataset", args.dataset, "--max_train_samples", str(args.max_train_samples),
        "--max_eval_samples", str(args.max_eval_samples), "--per_device_train_batch_size", str(args.batch_size),
        "--seed", str(args.seed), "--logging_steps", "10",
    ]  # fmt: skip
    stage_seconds = {}

    def stage(name: str, extra: list[str]) -> dict:
        print(f"\n== {name} ==")
        start = time.perf_counter()
        results = run_stage([*common, *extra, "--output_dir", str(output / name)])
        stage_seconds[name] = round(time.perf_counter() - start, 1)
        return results

    vit = stage("backbone", [
        "--stage", "backbone", "--patch_size", str(args.patch_size), "--hidden_size", str(args.hidden_size),
        "--num_hidden_layers", str(args.depth), "--num_attention_heads", str(args.heads),
        "--num_train_epochs", str(args.backbone_epochs), "--learning_rate", "1e-3",
    ])  # fmt: skip
    folders = {name: str(output / name) for name in ("adapt", "gate")}
    epochs = {"adapt": args.adapt_epochs, "gate": args.gate_epochs, "joint": args.joint_epochs}
    extra = {"adapt": ["--coarse_patch_size", str(args.coarse_patch_size), "--skip_export"], "gate": ["--skip_export"]}
    stages = msvit_stage_args(
        str(output / "backbone" / "model"), folders, args.target_fine_ratio, epochs, stage_extra=extra
    )
    results = {name: stage(name, stage_args) for name, stage_args in stages.items()}
    adapt, gate, joint = results["adapt"], results["gate"], results["joint"]

    print("\n== timing ==")
    test = load_classification_splits(args.dataset, seed=args.seed, max_eval_samples=args.timing_images)["test"]
    msvit = MSViTForImageClassification.from_pretrained(output / "joint" / "model").eval()
    baseline = ViTForImageClassification.from_pretrained(output / "backbone" / "model").eval()
    processor = AutoImageProcessor.from_pretrained(output / "joint" / "model")
    pixel_values = processed_pixel_values(test, processor, msvit.config.num_channels)
    all_fine = torch.ones(1, msvit.config.coarse_grid_size[0] * msvit.config.coarse_grid_size[1], dtype=torch.bool)
    runners = {
        "vit": baseline,
        # the same MSViT code with every region split: separates the token savings from implementation overheads
        "msvit_all_fine": lambda batch: msvit(batch, split_mask=all_fine.expand(len(batch), -1)),
        "msvit": msvit,
    }
    inputs = dict.fromkeys(runners, pixel_values)
    throughput = interleaved_images_per_second(runners, inputs, 64, args.timing_repeats)

    report = {
        "settings": vars(args),
        "stage_seconds": stage_seconds,
        "vit": {
            "test_accuracy": vit["test"]["accuracy"],
            "gmacs": vit["test"]["gmacs"],
            "tokens": vit["test"]["tokens"],
        },
        "msvit_random_splits": {"test_accuracy": adapt["test"]["accuracy"], "gmacs": adapt["test"]["gmacs"]},
        "msvit_gate_only": {"test_accuracy": gate["test"]["accuracy"], "gmacs": gate["test"]["gmacs"]},
        "msvit": {
            "test_accuracy": joint["test"]["accuracy"],
            "gmacs": joint["test"]["gmacs"],
            "tokens": joint["test"]["tokens"],
            "fine_ratio": joint["test"]["fine_ratio"],
        },
        "images_per_second": throughput,
        "torch_threads": torch.get_num_threads(),
    }
    report["msvit"]["gmacs_vs_vit"] = report["msvit"]["gmacs"] / report["vit"]["gmacs"]
    report["msvit"]["speedup_vs_vit"] = throughput["msvit"] / throughput["vit"]
    report["msvit"]["speedup_vs_all_fine"] = throughput["msvit"] / throughput["msvit_all_fine"]
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "report.md").write_text(render_report(report, output))
    print("\n" + render_report(report, output))
    return report


def render_report(report: dict, output: Path) -> str:
    vit, msvit, speed = report["vit"], report["msvit"], report["images_per_second"]
    settings = report["settings"]
    lines = [
        f"# MSViT pipeline report ({settings['dataset']}, {settings['max_train_samples']} training images)",
        "",
        f"Backbone: ViT/{settings['patch_size']}, width {settings['hidden_size']}, depth {settings['depth']}; "
        f"MSViT coarse patch {settings['coarse_patch_size']}, target fine ratio {settings['target_fine_ratio']}.",
        f"Test set: {settings['max_eval_samples']} images. Throughput: batch 64, median of "
        f"{settings['timing_repeats']} interleaved repetitions, {report['torch_threads']} torch threads.",
        "",
        "| model | test top-1 | GMACs / image | tokens / image | images / s |",
        "|---|---|---|---|---|",
        f"| ViT/{settings['patch_size']} (backbone) | {100 * vit['test_accuracy']:.2f} % | {vit['gmacs']:.4f} | "
        f"{vit['tokens']:.1f} | {speed['vit']:.0f} |",
        f"| MSViT, random splits (adapt stage) | {100 * report['msvit_random_splits']['test_accuracy']:.2f} % | "
        f"{report['msvit_random_splits']['gmacs']:.4f} | | |",
        f"| MSViT, gate trained on that frozen backbone | {100 * report['msvit_gate_only']['test_accuracy']:.2f} % | "
        f"{report['msvit_gate_only']['gmacs']:.4f} | | |",
        f"| MSViT, fine-tuned (fine ratio {msvit['fine_ratio']:.2f}) | {100 * msvit['test_accuracy']:.2f} % | "
        f"{msvit['gmacs']:.4f} | {msvit['tokens']:.1f} | {speed['msvit']:.0f} |",
        "",
        f"MSViT uses {100 * msvit['gmacs_vs_vit']:.0f} % of the ViT's MACs. Throughput ratios on this machine: "
        f"{msvit['speedup_vs_all_fine']:.2f}x the same MSViT with every region split ({speed['msvit_all_fine']:.0f} "
        f"images/s; the token savings alone) and {msvit['speedup_vs_vit']:.2f}x transformers' ViT (which also "
        "differs in per-layer overheads that dominate at this tiny size).",
        f"Stage times (s): {report['stage_seconds']}. Gate maps: {output / 'joint' / 'gate_maps.png'}; "
        f"Hub folder: {output / 'joint' / 'hub'}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
