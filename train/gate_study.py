"""Gates on a frozen, pretrained ViT: which regions each split policy picks, and what that costs in accuracy.

    python -m train.gate_study --backbone results/evidence/vit-p8/model --output_dir results/gate_study

The backbone (a transformers ViT/8 trained on Translated Fashion-MNIST 64x64, e.g. the evidence run `vit-p8`) is
converted with `from_vit(vit, coarse_patch_size=16)` and never trained again. On it, at fine ratios `--ratios`
(fixed budget: every image gets exactly `round(ratio * 16)` split regions), with size-aware attention on and off:

- fixed layouts: all fine, all coarse, random regions, centre regions, and the regions that hold the item (the clean
  canvas's oracle, with its own per-image count);
- the training-free gates (`gate_type="entropy"`, `"std"`);
- learned gates, for every seed: the counterfactual objective (trained once, evaluated at every ratio) and the
  paper's straight-through objective with today's recipe (masked softmax, ratio loss x 20, trained per ratio);
- counterfactual ablations at size-aware attention on: flips per image, target scale, layout sampling.

Each row gives validation and test top-1, GMACs, tokens, fine ratio and how often the policy splits regions that
hold the item and empty ones. `results.json` is written after every row (a rerun skips finished rows), then
`table.md`. Training uses `--max_train_samples` images of the training split, one epoch per gate.
"""

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoImageProcessor, HfArgumentParser, ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from train.data import load_classification_splits
from train.evaluation import processed_pixel_values
from train.gate_training import GateTrainingArguments, evaluate_split_policy, train_on_tensors


# the two gate objectives as this study trains them: the counterfactual objective's defaults, and the paper's
# straight-through objective with the recipe that `--stage gate` used before (masked softmax, ratio loss x 20)
COUNTERFACTUAL = dict(gate_objective="counterfactual", train_token_path="gathered")
STRAIGHT_THROUGH = dict(
    gate_objective="straight_through",
    gate_loss_type="ratio",
    gate_loss_weight=20.0,
    train_token_path="masked",
    masked_path_attention="masked_softmax",
)
LEARNING_RATES = {"counterfactual": 1e-2, "straight_through": 1e-3}
ABLATIONS = {
    "flips=4": dict(counterfactual_flips=4),
    "target_scale=1": dict(counterfactual_target_scale=1.0),
    "layouts=uniform": dict(counterfactual_layouts="uniform"),
}


@dataclass
class GateStudyArguments:
    backbone: str = field(metadata={"help": "Folder of the transformers ViT (with its image processor)."})
    output_dir: str = field(default="results/gate_study", metadata={"help": "Where results.json and table.md go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of the learned gates."})
    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5], metadata={"help": "Fine ratios (budgets)."})
    coarse_patch_size: int = field(default=16, metadata={"help": "Coarse patch size of the converted MSViT."})
    max_train_samples: int = field(default=20000, metadata={"help": "Training images of the gates."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on subsets (smoke tests)."})
    epochs: int = field(default=1, metadata={"help": "Epochs of every gate."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the validation split and the training subset."})
    ablations: bool = field(default=True, metadata={"help": "Also run the counterfactual ablations."})


class GateStudy:
    def __init__(self, args: GateStudyArguments):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.output_dir / "results.json"
        self.rows = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.vit = ViTForImageClassification.from_pretrained(args.backbone).eval()
        processor = AutoImageProcessor.from_pretrained(args.backbone)
        splits = load_classification_splits(
            "translated_fashion_mnist",
            seed=args.data_seed,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
        )
        num_channels = self.vit.config.num_channels
        self.data = {
            name: (
                processed_pixel_values(splits[name], processor, num_channels),
                torch.as_tensor(splits[name].with_format("numpy")["label"][:]),
            )
            for name in ("train", "validation", "test")
        }

    def model(self, size_aware: bool, **overrides) -> MSViTForImageClassification:
        return MSViTForImageClassification.from_vit(
            self.vit, coarse_patch_size=self.args.coarse_patch_size, size_aware_attention=size_aware, **overrides
        ).eval()

    def record(self, name: str, model, *, train_seconds: float | None = None, **row) -> None:
        """Evaluate `model` on validation and test under the row's policy and store the row."""
        policy = dict(policy=row.get("policy", "gate"), fine_ratio=row.get("ratio"))
        measured = {
            split: evaluate_split_policy(model, *self.data[split], **policy) for split in ("validation", "test")
        }
        self.rows[name] = {**row, "train_seconds": train_seconds, **measured}
        self.results_path.write_text(json.dumps(self.rows, indent=1))
        test = measured["test"]
        print(
            f"{name}: test {100 * test['accuracy']:.2f} %, content/empty split "
            f"{test['split_rate_content']:.2f}/{test['split_rate_empty']:.2f}, {test['gmacs']:.4f} GMACs"
        )

    def trained_gate(self, objective: str, size_aware: bool, seed: int, **overrides):
        recipe = COUNTERFACTUAL if objective == "counterfactual" else STRAIGHT_THROUGH
        torch.manual_seed(seed)  # the gate's initial weights
        model = self.model(size_aware, **{**recipe, **overrides})
        training = GateTrainingArguments(LEARNING_RATES[objective], epochs=self.args.epochs, seed=seed)
        start = time.perf_counter()
        train_on_tensors(model, *self.data["train"], training, description=f"{objective} gate, seed {seed}")
        return model, time.perf_counter() - start

    def run(self) -> None:
        args = self.args
        for size_aware in (True, False):
            attention = {"size_aware": size_aware}
            for policy in ("all_fine", "all_coarse", "content"):
                name = f"{policy}|size_aware={size_aware}"
                if name not in self.rows:
                    self.record(name, self.model(size_aware), kind=policy, policy=policy, **attention)
            for ratio in args.ratios:
                for policy in ("random", "centre"):
                    name = f"{policy}|size_aware={size_aware}|ratio={ratio}"
                    if name not in self.rows:
                        self.record(name, self.model(size_aware), kind=policy, policy=policy, ratio=ratio, **attention)
                for rule in ("entropy", "std"):
                    name = f"{rule}|size_aware={size_aware}|ratio={ratio}"
                    if name not in self.rows:
                        self.record(name, self.model(size_aware, gate_type=rule), kind=rule, ratio=ratio, **attention)
            for seed in args.seeds:
                self.learned("counterfactual", size_aware, seed, args.ratios)
                for ratio in args.ratios:
                    self.learned("straight_through", size_aware, seed, [ratio], target_fine_ratio=ratio)
        if args.ablations:
            for ablation, overrides in ABLATIONS.items():
                for seed in args.seeds:
                    self.learned("counterfactual", True, seed, [0.5], ablation=ablation, **overrides)
        (self.output_dir / "table.md").write_text(summary_table(self.rows, args.seeds))

    def learned(
        self, objective: str, size_aware: bool, seed: int, ratios: list[float], ablation: str = "", **overrides
    ) -> None:
        kind = objective + (f" ({ablation})" if ablation else "")
        names = {ratio: f"{kind}|size_aware={size_aware}|ratio={ratio}|seed={seed}" for ratio in ratios}
        if all(name in self.rows for name in names.values()):
            return
        model, seconds = self.trained_gate(objective, size_aware, seed, **overrides)
        for ratio, name in names.items():
            self.record(name, model, train_seconds=seconds, kind=kind, ratio=ratio, seed=seed, size_aware=size_aware)


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def summary_table(rows: dict[str, dict], seeds: list[int]) -> str:
    """Markdown: one line per (policy, size-aware attention, ratio), learned gates as mean ± std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows.values():
        groups.setdefault((row["kind"], row["size_aware"], row.get("ratio")), []).append(row)
    lines = [
        "| split policy | size-aware attention | fine ratio (budget) | seeds | validation top-1 (%) | test top-1 (%) "
        "| GMACs | split rate: item regions | split rate: empty regions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, size_aware, ratio), group in sorted(
        groups.items(), key=lambda item: (not item[0][1], item[0][2] or -1, item[0][0])
    ):
        test = [row["test"] for row in group]
        lines.append(
            f"| {kind} | {'on' if size_aware else 'off'} | {'-' if ratio is None else ratio} | {len(group)} "
            f"| {mean_std([row['validation']['accuracy'] for row in group])} "
            f"| {mean_std([measured['accuracy'] for measured in test])} "
            f"| {statistics.mean(measured['gmacs'] for measured in test):.4f} "
            f"| {mean_std([measured['split_rate_content'] for measured in test], 1)} "
            f"| {mean_std([measured['split_rate_empty'] for measured in test], 1)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(GateStudyArguments).parse_args_into_dataclasses(args=argv)
    study = GateStudy(args)
    (study.output_dir / "arguments.json").write_text(json.dumps(asdict(args), indent=1))
    study.run()
    return study.rows


if __name__ == "__main__":
    main()
