"""The main job (`make demo`): a ViT, then MSViT's split policies on it frozen, then the same short fine-tuning for
the full-token model and the best gate; accuracy, GMACs and throughput side by side. Translated Fashion-MNIST 64x64.

    python -m msvit.experiments.pipeline  # the embedded default: under 10 minutes on 2 idle CPU cores
    python -m msvit.experiments.pipeline --max_train_samples 55000 --backbone_epochs 20 --hidden_size 128

1. `backbone`: a transformers `ViTForImageClassification` at the fine patch size, from scratch
   (`train/run_classification.py --stage backbone`). A backbone trained beforehand is reused.
2. On that backbone, frozen, converted with `from_vit` (size-aware attention on), at the same fine ratio (fixed
   budget): all fine, all coarse, random regions, the training-free entropy and std gates, the paper's
   straight-through gate, the counterfactual gate and the residual gate (the better rule on validation plus a learned
   correction); the learned ones are trained here on the frozen backbone (`train/gate_training.py`).
3. The same fine-tuning (`--finetune_epochs` at learning rate 2e-4) for the all-fine model and for the gated row with
   the best validation accuracy, which is then exported as a Hub folder with its gate maps.

`report.md` / `report.json`: every row's test top-1, measured GMACs per image, tokens, how often it splits regions
that hold the item and empty ones, and inference images/s measured side by side in this process (interleaved
repetitions, median) relative to the ViT.
"""

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoImageProcessor, HfArgumentParser, ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from modeling_msvit.configuration_msvit import GATE_RULES as RULES
from modeling_msvit.macs_msvit import vit_macs_for_config
from msvit.tools.export import export_hub_folder
from msvit.train.data import load_classification_splits
from msvit.train.evaluation import interleaved_images_per_second
from msvit.train.gate_training import GateTrainingArguments, evaluate_split_policy, split_tensors, train_on_tensors
from msvit.train.msvit_recipe import GATE_LEARNING_RATES, GATE_RECIPES, residual_gate_recipe
from msvit.train.reporting import gate_maps
from msvit.train.run_classification import ClassificationArguments, train_classifier
from msvit.train.split_policies import forced_split_mask


DATASET = "translated_fashion_mnist"


@dataclass
class PipelineArguments:
    output_dir: str = field(default="outputs/pipeline", metadata={"help": "Where every stage and the report go."})
    max_train_samples: int = field(default=16384, metadata={"help": "Training images (a fixed random subset)."})
    max_eval_samples: int = field(default=2000, metadata={"help": "Validation and test images (fixed subsets)."})
    patch_size: int = field(default=8, metadata={"help": "Fine patch size of the backbone."})
    coarse_patch_size: int = field(default=16, metadata={"help": "MSViT coarse patch size."})
    hidden_size: int = field(default=96, metadata={"help": "Backbone width."})
    depth: int = field(default=4, metadata={"help": "Backbone depth."})
    heads: int = field(default=3, metadata={"help": "Attention heads."})
    fine_ratio: float = field(default=0.5, metadata={"help": "Fraction of regions split by every gated row."})
    backbone_epochs: int = field(default=7, metadata={"help": "Epochs of backbone training."})
    gate_epochs: int = field(default=1, metadata={"help": "Epochs of gate training on the frozen backbone."})
    finetune_epochs: int = field(default=1, metadata={"help": "Epochs of the shared fine-tuning."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    timing_images: int = field(default=1024, metadata={"help": "Test images of the throughput comparison."})
    timing_repeats: int = field(default=9, metadata={"help": "Interleaved timing repetitions (median reported)."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage."})


def train_backbone(args: PipelineArguments, folder: Path) -> Path:
    """The ViT backbone (reused when `folder` already holds a finished run)."""
    if not (folder / "results.json").is_file():
        train_classifier(
            ClassificationArguments(
                stage="backbone",
                dataset=DATASET,
                patch_size=args.patch_size,
                hidden_size=args.hidden_size,
                num_hidden_layers=args.depth,
                num_attention_heads=args.heads,
                num_train_epochs=args.backbone_epochs,
                learning_rate=1e-3,
                max_train_samples=args.max_train_samples,
                max_eval_samples=args.max_eval_samples,
                per_device_train_batch_size=args.batch_size,
                seed=args.seed,
                logging_steps=20,
                output_dir=str(folder),
            )
        )
    return folder / "model"


def forced_runner(model, policy: str, fine_ratio: float):
    """Inference under a fixed split policy, as timed: the masks are made per batch like the gate's decisions."""
    grid = model.config.coarse_grid_size
    return lambda batch: model(batch, split_mask=forced_split_mask(policy, len(batch), grid, fine_ratio))


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(PipelineArguments).parse_args_into_dataclasses(args=argv)
    output = Path(args.output_dir)
    stage_seconds = {}
    start = time.perf_counter()
    backbone = train_backbone(args, output / "backbone")
    stage_seconds["backbone"] = round(time.perf_counter() - start, 1)

    vit = ViTForImageClassification.from_pretrained(backbone).eval()
    processor = AutoImageProcessor.from_pretrained(backbone)
    splits = load_classification_splits(
        DATASET, seed=args.seed, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples
    )
    data = split_tensors(splits, processor, vit.config.num_channels)

    def converted(**overrides) -> MSViTForImageClassification:
        torch.manual_seed(args.seed)  # the gate's initial weights
        # the budget is the model's own setting: a rule gate also fine-tunes on the layouts it is evaluated with
        return MSViTForImageClassification.from_vit(
            vit,
            coarse_patch_size=args.coarse_patch_size,
            target_fine_ratio=args.fine_ratio,
            fine_ratio_budget=args.fine_ratio,
            **overrides,
        ).eval()

    def trained(description: str, model, learning_rate: float, epochs: int, **options):
        start = time.perf_counter()
        training = GateTrainingArguments(learning_rate, epochs=epochs, batch_size=args.batch_size, seed=args.seed)
        train_on_tensors(model, *data["train"], training, description=description, **options)
        stage_seconds[description] = round(time.perf_counter() - start, 1)
        return model

    ratio = args.fine_ratio
    gate_epochs = args.gate_epochs
    # name -> (model, split policy)
    frozen = {
        "all fine": (converted(), "all_fine"),
        "all coarse": (converted(), "all_coarse"),
        "random regions": (converted(), "random"),
        **{f"training-free {rule} gate": (converted(gate_type=rule), "gate") for rule in RULES},
    }
    rows = {name: measure(model, policy, ratio, data) for name, (model, policy) in frozen.items()}
    # the residual gate starts from the rule that scores best on validation
    rule = max(RULES, key=lambda rule: rows[f"training-free {rule} gate"]["validation"]["accuracy"])
    learned = {
        "straight-through gate (paper)": "straight_through",
        "counterfactual gate": "counterfactual",
        f"residual gate ({rule} + learned correction)": "residual",
    }
    for name, objective in learned.items():
        recipe = residual_gate_recipe(rule) if objective == "residual" else GATE_RECIPES[objective]
        model = trained(name, converted(**recipe), GATE_LEARNING_RATES[objective], gate_epochs)
        frozen[name] = (model, "gate")
        rows[name] = measure(model, "gate", ratio, data)
    gated = [name for name, (_, policy) in frozen.items() if policy == "gate"]
    best = max(gated, key=lambda name: rows[name]["validation"]["accuracy"])

    finetune = dict(learning_rate=2e-4, epochs=args.finetune_epochs, gate_only=False)
    all_fine = trained("fine-tune all fine", copy.deepcopy(frozen["all fine"][0]), split_policy="all_fine", **finetune)
    best_model = trained(f"fine-tune {best}", copy.deepcopy(frozen[best][0]), **finetune)
    tuned = {"all fine, fine-tuned": (all_fine, "all_fine"), f"{best}, fine-tuned": (best_model, "gate")}
    rows.update({name: measure(model, policy, ratio, data) for name, (model, policy) in tuned.items()})
    for name in rows:
        rows[name]["frozen"] = name in frozen

    print("\n== timing ==")
    runners = {"ViT (backbone)": vit}
    for name, (model, policy) in {**frozen, **tuned}.items():
        model.set_budget(fine_ratio=ratio)
        runners[name] = model if policy == "gate" else forced_runner(model, policy, ratio)
    timing = data["test"][0][: args.timing_images]
    throughput = interleaved_images_per_second(runners, dict.fromkeys(runners, timing), 64, args.timing_repeats)
    for name, row in rows.items():
        row["speedup_vs_vit"] = throughput[name] / throughput["ViT (backbone)"]

    best_model.set_budget(fine_ratio=ratio)
    export_hub_folder(best_model, output / "msvit" / "hub", image_processor=processor, model_name="msvit-demo")
    images = [splits["validation"][index]["image"] for index in range(8)]
    gate_maps(best_model, processor, images, best_model.config.num_channels).save(output / "msvit" / "gate_maps.png")

    vit_test = evaluate_vit(vit, *data["test"])
    report = {
        "settings": asdict(args),
        "vit": {**vit_test, "gmacs": vit_macs_for_config(vit.config, num_labels=vit.config.num_labels) / 1e9},
        "rows": rows,
        "best_gate": best,
        "images_per_second": throughput,
        "stage_seconds": stage_seconds,
        "torch_threads": torch.get_num_threads(),
    }
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "report.md").write_text(render_report(report, output))
    print("\n" + render_report(report, output))
    return report


def measure(model, policy: str, ratio: float, data: dict) -> dict:
    return {
        split: evaluate_split_policy(model, *data[split], policy=policy, fine_ratio=ratio)
        for split in ("validation", "test")
    }


@torch.no_grad()
def evaluate_vit(vit, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict:
    predictions = torch.cat([vit(batch).logits.argmax(-1) for batch in pixel_values.split(256)])
    return {
        "accuracy": (predictions == labels).float().mean().item(),
        "tokens": 1 + vit.config.image_size**2 // vit.config.patch_size**2,
    }


def render_report(report: dict, output: Path) -> str:
    settings, rows = report["settings"], report["rows"]
    ratio = settings["fine_ratio"]
    lines = [
        f"# MSViT demo report (Translated Fashion-MNIST 64x64, {settings['max_train_samples']} training images)",
        "",
        f"Backbone: ViT/{settings['patch_size']}, width {settings['hidden_size']}, depth {settings['depth']}, "
        f"{settings['backbone_epochs']} epochs: test top-1 {100 * report['vit']['accuracy']:.2f} %. MSViT: coarse "
        f"patch {settings['coarse_patch_size']}, size-aware attention; gated rows split exactly {ratio:.0%} of the "
        f"regions of every image. Test set: {settings['max_eval_samples']} images. Throughput: batch 64, median "
        f"of {settings['timing_repeats']} interleaved repetitions, {report['torch_threads']} torch threads, relative "
        "to transformers' ViT on the same images.",
        "",
        "| model | backbone | test top-1 | GMACs / image | tokens | split rate: item / empty regions | speed vs ViT |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        test = row["test"]
        lines.append(
            f"| {name} | {'frozen' if row['frozen'] else 'fine-tuned'} | {100 * test['accuracy']:.2f} % "
            f"| {test['gmacs']:.4f} | {test['tokens']:.1f} "
            f"| {test['split_rate_content']:.2f} / {test['split_rate_empty']:.2f} | {row['speedup_vs_vit']:.2f}x |"
        )
    validation = {name: row["validation"]["accuracy"] for name, row in rows.items() if row["frozen"]}
    gated = sorted((name for name in validation if "gate" in name), key=lambda name: validation[name], reverse=True)
    runner_up = f", ahead of `{gated[1]}` ({100 * validation[gated[1]]:.2f} %)" if len(gated) > 1 else ""
    lines += [
        "",
        f"Exported: `{report['best_gate']}`, the gate with the best validation top-1 on the frozen backbone "
        f"({100 * validation[report['best_gate']]:.2f} %{runner_up}), fine-tuned; it is exported to "
        f"{output / 'msvit' / 'hub'} with its gate maps in {output / 'msvit' / 'gate_maps.png'}.",
        f"Stage times (s): {report['stage_seconds']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
