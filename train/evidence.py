"""The evidence runs on Translated Fashion-MNIST 64x64: every model of the results table, then the table and the plot.

    python -m train.evidence --output_dir results/evidence            # hours on 2 CPU cores; resumable
    python -m train.evidence --output_dir results/evidence --only vit-p8 vit-p16

Each run is `train/run_classification.py` with the arguments listed in `experiments()`, written to
`<output_dir>/<name>/`; a run whose `results.json` exists is skipped and an interrupted one resumes from its last
checkpoint, so the command can be stopped and started again. Fine patch 8 / coarse 16 (8x8 fine, 4x4 coarse
grid); by default 20,000 training images, width 96, depth 4, 3 heads, batch 128, AdamW with warm-up and cosine
decay, one seed (flags change them). The shared backbone is the fine ViT (`vit-p8`); every model on it gets the same
backbone fine-tuning (`--finetune_epochs` at learning rate 2e-4; see `experiments()` for how an MSViT spends them).
At the end, `table.md`, `table.json`, `accuracy_vs_gmacs.png`, `learning_curves.png` and `gate_maps.png` summarise
the test results, with inference throughput measured side by side in one process (median of interleaved
repetitions) relative to the fine ViT.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

import modeling_msvit  # noqa: F401  (registers MSViT with the Auto classes)
from train.data import load_classification_splits
from train.evaluation import interleaved_images_per_second, processed_pixel_values
from train.gate_training import content_regions
from train.msvit_recipe import budget_args, gate_training_args, msvit_stage_args
from train.reporting import gate_maps
from train.run_classification import main as run_classification


RATIOS = (0.25, 0.5, 0.75)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", default="results/evidence", help="Folder of all runs and the summary.")
    add("--backbone_epochs", type=int, default=12, help="Epochs of every model trained from scratch.")
    add("--gate_epochs", type=int, default=2, help="Epochs of gate training on the frozen backbone.")
    add("--finetune_epochs", type=int, default=2, help="Epochs of the shared fine-tuning on the backbone.")
    add(
        "--gate_loss_type",
        default="ratio",
        choices=("gbas", "bas", "ratio"),
        help="Budget loss of the straight-through MSViT rows.",
    )
    add("--gate_loss_weight", type=float, default=20.0, help="Budget loss weight of the straight-through rows.")
    add("--max_train_samples", type=int, default=20000, help="Training images (a fixed random subset of the 55k).")
    add("--max_eval_samples", type=int, help="Evaluate on subsets (smoke tests).")
    add("--hidden_size", type=int, default=96, help="Width of every model.")
    add("--depth", type=int, default=4, help="Depth of every model.")
    add("--heads", type=int, default=3, help="Attention heads of every model.")
    add("--seed", type=int, default=0, help="Seed of every run.")
    add("--checkpointing_steps", type=int, default=157, help="Checkpoint every N steps; an interrupted run resumes.")
    add("--only", nargs="*", help="Run only these experiments (and summarise what exists).")
    add("--timing_images", type=int, default=1024, help="Test images of the throughput comparison.")
    add("--timing_repeats", type=int, default=5, help="Interleaved timing repetitions (median reported).")
    return parser.parse_args(argv)


def experiments(args: argparse.Namespace) -> dict[str, list[str]]:
    """Name -> run_classification arguments, in dependency order.

    Every model on the shared backbone gets `finetune_epochs` of backbone fine-tuning. An MSViT first trains its
    gate on the frozen backbone (`gate-*`, counterfactual objective; `gate-*-straight-through` for the paper's
    objective), then fine-tunes everything with the gate's decisions (`msvit-*`). Gated models are evaluated with the
    fixed budget (`--fine_ratio_budget`), so that every row at a ratio has exactly the same token count.
    """
    out = Path(args.output_dir)
    model = lambda name: str(out / name / "model")  # noqa: E731
    from_scratch = ["--num_train_epochs", str(args.backbone_epochs), "--learning_rate", "1e-3"]
    backbone = ["--stage", "backbone", *from_scratch]
    finetune = ["--learning_rate", "2e-4", "--num_train_epochs", str(args.finetune_epochs)]
    forced = ["--stage", "joint", "--model_name_or_path", model("vit-p8"), "--train_token_path", "gathered"]
    epochs = {"gate": args.gate_epochs, "joint": args.finetune_epochs}
    runs = {
        "vit-p8": [*backbone, "--patch_size", "8"],
        "vit-p16": [*backbone, "--patch_size", "16"],
        "vit-p8-32px": [*backbone, "--patch_size", "8", "--image_size", "32"],
        "all-fine": [*forced, "--split_policy", "all_fine", *finetune],
        "all-coarse": [*forced, "--split_policy", "all_coarse", *finetune],
    }  # fmt: skip

    def gated(
        name: str, ratio: float, stage_extra: dict[str, list[str]] | None = None, objective: str = "counterfactual"
    ) -> None:
        """gate-* -> msvit-* at `ratio`."""
        suffix = f"{ratio}-{name}" if name else f"{ratio}"
        folders = {"gate": str(out / f"gate-{suffix}")}
        stages = msvit_stage_args(
            model("vit-p8"), folders, ratio, epochs, objective, args.gate_loss_type, args.gate_loss_weight, stage_extra
        )
        runs[f"gate-{suffix}"] = stages["gate"]
        runs[f"msvit-{suffix}"] = stages["joint"]

    for ratio in RATIOS:
        gated("", ratio)
        gated("straight-through", ratio, objective="straight_through")
        for policy in ("random", "centre"):
            runs[f"{policy}-{ratio}"] = [*forced, "--split_policy", policy, *budget_args(ratio), *finetune]
    straight_through_ablations = {
        "gbas": ["--gate_loss_type", "gbas"],
        "bas": ["--gate_loss_type", "bas"],
        "ratio-loss": ["--gate_loss_type", "ratio"],
        "key-mask": ["--masked_path_attention", "key_mask"],
        "gathered-training": ["--train_token_path", "gathered"],
    }
    for name, extra in straight_through_ablations.items():
        if extra[:2] != ["--gate_loss_type", args.gate_loss_type]:
            gated(f"straight-through-{name}", 0.5, {"gate": extra}, objective="straight_through")
    gated("separate-coarse", 0.5, {"gate": ["--separate_coarse_embedding"]})
    for ratio in (0.5, *RATIOS):  # 0.5 first: the from-scratch runs are the longest
        runs[f"scratch-{ratio}"] = [
            "--stage", "scratch", *from_scratch, "--patch_size", "8", *budget_args(ratio), *gate_training_args(),
        ]  # fmt: skip
    return runs


def common_args(args: argparse.Namespace) -> list[str]:
    common = [
        "--dataset", "translated_fashion_mnist", "--hidden_size", str(args.hidden_size),
        "--num_hidden_layers", str(args.depth), "--num_attention_heads", str(args.heads),
        "--per_device_train_batch_size", "128", "--seed", str(args.seed), "--logging_steps", "50",
        "--checkpointing_steps", str(args.checkpointing_steps),
    ]  # fmt: skip
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name):
            common += [f"--{name}", str(getattr(args, name))]
    return common


def split_rates_on_content(model, pixel_values: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """How often the gate splits regions that contain part of the item vs empty (all-background) regions.

    On a translated canvas the background is the darkest value; a region holds content when any pixel is brighter."""
    content = content_regions(pixel_values, model.config.coarse_patch_size)
    splits = torch.cat(
        [model(pixel_values[i : i + batch_size]).split_mask for i in range(0, len(pixel_values), batch_size)]
    )
    return {
        "split_rate_content": splits[content].float().mean().item(),
        "split_rate_empty": splits[~content].float().mean().item(),
    }


@torch.no_grad()
def measure_on_test(
    folders: dict[str, Path], budgets: dict[str, float], gated: set[str], args: argparse.Namespace, reference: str
) -> dict[str, dict[str, float]]:
    """Inference images/s of every model over the same test images, interleaved, relative to `reference`; for the
    `gated` models also their split rates on content and on empty regions.

    `budgets` gives a fixed fine ratio for MSViTs trained with forced decisions (random, centre, all-coarse,
    all-fine), so that they are timed with the token counts they were evaluated with."""
    test = load_classification_splits("translated_fashion_mnist", seed=args.seed, max_eval_samples=args.timing_images)
    inputs, models, processed = {}, {}, {}
    for name, folder in folders.items():
        models[name] = AutoModelForImageClassification.from_pretrained(folder).eval()
        if name in budgets:
            models[name].set_budget(fine_ratio=budgets[name])
        processor = AutoImageProcessor.from_pretrained(folder)
        # most models share one image processor: process the test images once per distinct processor
        key = (processor.to_json_string(), models[name].config.num_channels)
        if key not in processed:
            processed[key] = processed_pixel_values(test["test"], processor, models[name].config.num_channels)
        inputs[name] = processed[key]
    speed = interleaved_images_per_second(models, inputs, 128, args.timing_repeats)
    measured = {name: {"throughput_vs_vit_p8": value / speed[reference]} for name, value in speed.items()}
    for name in gated:
        measured[name].update(split_rates_on_content(models[name], inputs[name]))
    return measured


def summarise(args: argparse.Namespace) -> list[dict]:
    out = Path(args.output_dir)
    done = {path.parent.name: json.loads(path.read_text()) for path in sorted(out.glob("*/results.json"))}
    rows = []
    for name, results in done.items():
        test = results.get("test") or results["validation"]
        config = AutoConfig.from_pretrained(out / name / "model")
        rows.append({
            "name": name,
            "stage": results["stage"],
            "split_policy": results["split_policy"],
            "target_fine_ratio": getattr(config, "target_fine_ratio", None) if config.model_type == "msvit" else None,
            "test_accuracy": test["accuracy"],
            "gmacs": test["gmacs"],
            "tokens": test["tokens"],
            "fine_ratio": test.get("fine_ratio"),
            "validation_curve": results["validation_curve"],
        })  # fmt: skip
    if "vit-p8" in done:
        budgets = {
            row["name"]: row["fine_ratio"]
            for row in rows
            if row["split_policy"] != "gate" and row["fine_ratio"] is not None
        }
        gated = {row["name"] for row in rows if row["split_policy"] == "gate" and row["fine_ratio"] is not None}
        measured = measure_on_test(
            {row["name"]: out / row["name"] / "model" for row in rows}, budgets, gated, args, "vit-p8"
        )
        for row in rows:
            row.update(measured[row["name"]])
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"Translated Fashion-MNIST 64x64, test set ({args.max_eval_samples or 10000} images), seed {args.seed}, "
        f"width {args.hidden_size}, depth {args.depth}. Throughput: inference, batch 128, "
        f"{torch.get_num_threads()} CPU threads, median of {args.timing_repeats} interleaved repetitions.",
        "",
        "| model | test top-1 | GMACs / image | tokens / image | fine ratio | split rate: item / empty regions "
        "| throughput vs ViT/8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fine = "" if row["fine_ratio"] is None else f"{row['fine_ratio']:.2f}"
        rates = f"{row['split_rate_content']:.2f} / {row['split_rate_empty']:.2f}" if "split_rate_empty" in row else ""
        speed = f"{row['throughput_vs_vit_p8']:.2f}x" if "throughput_vs_vit_p8" in row else ""
        lines.append(
            f"| {row['name']} | {100 * row['test_accuracy']:.2f} % | {row['gmacs']:.4f} | {row['tokens']:.1f} | "
            f"{fine} | {rates} | {speed} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "accuracy_vs_gmacs.png")
    plot_learning_curves([row for row in rows if row["stage"] in ("backbone", "scratch")], out / "learning_curves.png")
    gated_maps([f"msvit-{ratio}" for ratio in RATIOS if f"msvit-{ratio}" in done], args, out / "gate_maps.png")
    return rows


def plot_learning_curves(rows: list[dict], path: Path) -> None:
    """Validation top-1 per epoch of the models trained from scratch: did they plateau?"""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        curve = [100 * point["accuracy"] for point in row["validation_curve"]]
        axes.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=row["name"])
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation top-1 (%)")
    axes.set_title("Models trained from scratch (cosine schedule)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def gated_maps(names: list[str], args: argparse.Namespace, path: Path, num_images: int = 6) -> None:
    """One row of gate maps per model, on the same first test images."""
    if not names:
        return
    test = load_classification_splits("translated_fashion_mnist", seed=args.seed, max_eval_samples=num_images)["test"]
    images = [test[i]["image"] for i in range(num_images)]
    rows = []
    for name in names:
        folder = Path(args.output_dir) / name / "model"
        model = AutoModelForImageClassification.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder)
        rows.append(gate_maps(model, processor, images, model.config.num_channels))
    sheet = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), (255, 255, 255))
    for index, row in enumerate(rows):
        sheet.paste(row, (0, sum(previous.height for previous in rows[:index])))
    sheet.save(path)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    families = {"vit": "black", "msvit": "tab:orange", "random": "tab:blue", "adapt": "tab:cyan",
                "centre": "tab:green", "scratch": "tab:red", "all": "tab:gray", "gate": "tab:purple"}  # fmt: skip
    for row in rows:
        family = next((key for key in families if row["name"].startswith(key)), "all")
        axes.scatter(row["gmacs"], 100 * row["test_accuracy"], color=families[family])
        axes.annotate(row["name"], (row["gmacs"], 100 * row["test_accuracy"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")  # fmt: skip
    axes.set_xlabel("GMACs per image (measured average)")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title("Translated Fashion-MNIST 64x64")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.output_dir)
    runs = experiments(args)
    unknown = set(args.only or []) - set(runs)
    if unknown:
        raise ValueError(f"Unknown experiments {sorted(unknown)}; known: {', '.join(runs)}.")
    for name, run_args in runs.items():
        if args.only and name not in args.only:
            continue
        if (out / name / "results.json").is_file():
            print(f"== {name}: done, skipped")
            continue
        checkpoints = sorted((out / name / "checkpoints").glob("step_*"), key=lambda path: int(path.name[5:]))
        resume = ["--resume_from_checkpoint", str(checkpoints[-1])] if checkpoints else []
        print(f"== {name}" + (f" (resuming from {checkpoints[-1].name})" if checkpoints else ""))
        run_classification([*common_args(args), *run_args, *resume, "--output_dir", str(out / name), "--skip_export"])
    return summarise(args)


if __name__ == "__main__":
    main()
