"""Every split policy on one pretrained ViT, frozen and after equal fine-tuning: which regions each policy picks,
and what that costs in accuracy, GMACs and speed.

    python -m msvit.experiments.gate_study --backbone results/evidence/vit-p8/model \
        --output_dir results/evidence/shared

The backbone (a transformers ViT/8 trained on Translated Fashion-MNIST 64x64, the evidence run `vit-p8`, or on its
cluttered variant with `--dataset cluttered_translated_fashion_mnist`) is converted with
`from_vit(vit, coarse_patch_size=16)` (size-aware attention on). On it, for every seed:

- **frozen** (the plug-in use of a pretrained ViT): all fine, all coarse, the item's own regions (the oracle), random
  and centre regions, the training-free rules (entropy, std), the paper's straight-through gate (ratio loss x 20,
  trained per budget), and the counterfactual and residual gates (trained once; with more than two patch sizes, the
  residual gate with a prior logit per level as well). Budgets: fine ratios `--ratios` (fixed budget: exactly
  `round(ratio * 16)` split regions per image) and, for the counterfactual gate, `--thresholds` (split where the
  predicted loss drop exceeds that many nats), with the entropy gate at the thresholds that match its fine ratio;
- **fine-tuned**: the same policies (or those of `--finetune_kinds`) after the same fine-tuning of the whole model
  (`--finetune_epochs` at `--finetune_learning_rate`, every training image). All fine and all coarse fine-tune on
  their own layouts; random, centre and the rules on their own ranking at uniformly random densities (one
  fine-tuning serves every budget), all on the gathered path; the counterfactual and residual gates with their own
  objective (which then samples the gate's own ranking at uniformly random densities too, and keeps training the
  gate); the straight-through gate with its own objective at its budget;
- **ablations** at fine ratio 0.5, frozen: size-aware attention off, counterfactual flips, target scale and layout
  sampling, and the straight-through gate's budget loss (gBaS, BaS against the ratio loss).

Gates train on a fixed subset of `--gate_train_samples` images, one epoch. The gates trained once (counterfactual,
residual) have their frozen rows for every seed before the straight-through gates (one per budget) train, so a run cut
short already has their means over seeds. Each row gives validation and test top-1,
GMACs, tokens, fine ratio and how often it splits the item's regions, clutter regions and empty ones; inference
throughput relative to the ViT is measured side by side per budget. `results.json` is written after every row (a
rerun skips finished rows; trained gates are kept in `gates/`), then `table.md`. Runs of different `--seeds` may share
one `--output_dir` at the same time: every write merges the rows the others wrote (`merge_results`).
"""

import fcntl
import functools
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, HfArgumentParser, ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from modeling_msvit.configuration_msvit import GATE_RULES
from msvit.train.data import TRANSLATED_DATASETS, load_classification_splits
from msvit.train.evaluation import interleaved_images_per_second
from msvit.train.gate_training import (
    GateTrainingArguments,
    evaluate_split_policy,
    split_probabilities,
    split_tensors,
    train_on_tensors,
    translated_item_regions,
)
from msvit.train.msvit_recipe import (
    GATE_LEARNING_RATES,
    GATE_RECIPES,
    predicted_drop_threshold,
    residual_gate_recipe,
)


# kind -> (objective, config overrides), frozen, at fine ratio 0.5
ABLATIONS = {
    "counterfactual (size-aware attention off)": ("counterfactual", dict(size_aware_attention=False)),
    "counterfactual (flips=4)": ("counterfactual", dict(counterfactual_flips=4)),
    "counterfactual (target_scale=10)": ("counterfactual", dict(counterfactual_target_scale=10.0)),
    "counterfactual (layouts=gate)": ("counterfactual", dict(counterfactual_layouts="gate")),
    "straight_through (gBaS)": ("straight_through", dict(gate_loss_type="gbas")),
    "straight_through (BaS)": ("straight_through", dict(gate_loss_type="bas")),
}
# kind -> changes to the residual gate's recipe (None: start from the other rule), frozen, first seed, every budget:
# each design choice taken back
RESIDUAL_ABLATIONS = {
    "residual (no rule)": dict(gate_residual_rule=None),
    "residual (other rule)": None,  # the rule that lost on validation, known once the rules are measured
    "residual (flips=1)": dict(counterfactual_flips=1),
    "residual (downscaled input)": dict(gate_input="downscaled_pixels"),
    "residual (neighbourhood input)": dict(gate_input="neighbourhood"),
    "residual (label-free target)": dict(counterfactual_target="all_fine_kl"),
}
# with more than two patch sizes, the residual gate with a prior logit per level as well (every seed, frozen)
PER_LEVEL_RESIDUAL = "residual (a prior per level)"
FIXED_POLICIES = ("all_fine", "all_coarse")
KIND_NAMES = {
    "content": "item's regions (oracle)",
    "entropy": "entropy (training-free)",
    "std": "std (training-free)",
}
RANKED_POLICIES = ("random", "centre")
# split rates: the item's regions, other content (clutter, or a textured background) and empty regions
SPLIT_RATES = {"split_rate_content": "item", "split_rate_clutter": "other content", "split_rate_empty": "empty"}
# the training-free rules (APT's entropy, and the pixel standard deviation): the baseline every learned gate must beat
RULES = GATE_RULES
LEARNED_GATES = ("counterfactual", "residual", "straight_through")
FINETUNED_KINDS = (*FIXED_POLICIES, *RANKED_POLICIES, *RULES, *LEARNED_GATES)


@dataclass
class GateStudyArguments:
    backbone: str = field(metadata={"help": "Folder of the transformers ViT (with its image processor)."})
    output_dir: str = field(default="results/evidence/shared", metadata={"help": "Where the results go."})
    dataset: str = field(
        default="translated_fashion_mnist",
        metadata={
            "help": "The backbone's data set: translated canvases, clean, cluttered, textured or sparse (56 px items "
            "on 192 px canvases).",
            "choices": TRANSLATED_DATASETS,
        },
    )
    background_contrast: float = field(
        default=1.0, metadata={"help": "textured_translated_fashion_mnist: the backgrounds' contrast."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of every trained row."})
    ratios: list[float] = field(
        # 0.4 costs about 52 % of all fine's GMACs on the evidence's ViT/8: the "<= 60 %" target's budget
        default_factory=lambda: [0.25, 0.4, 0.5, 0.75],
        metadata={"help": "Fine-ratio budgets."},
    )
    thresholds: list[float] = field(
        # every empty region has the same input, hence one predicted drop: about 0.055 nats on the evidence's ViT/8
        # (splitting empty regions still helps a backbone trained on fine tokens only), so lower thresholds split all
        default_factory=lambda: [0.08, 0.2],
        metadata={"help": "Counterfactual gate: split where the predicted loss drop exceeds this many nats."},
    )
    coarse_patch_size: int = field(default=16, metadata={"help": "Coarse patch size of the converted MSViT."})
    patch_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": "More than two patch sizes, finest first (the backbone's patch first); replaces the coarse one."
        },
    )
    gate_train_samples: int = field(default=20000, metadata={"help": "Training images of every gate."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Training images (default: all)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on subsets (smoke tests)."})
    epochs: int = field(default=1, metadata={"help": "Epochs of every gate."})
    finetune_epochs: int = field(default=1, metadata={"help": "Epochs of every fine-tuning."})
    finetune_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of every fine-tuning."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the validation split and the training subsets."})
    finetune: bool = field(default=True, metadata={"help": "Also run the fine-tuned rows."})
    ablations: bool = field(default=True, metadata={"help": "Also run the ablations (at fine ratio 0.5)."})
    residual_ablations: bool = field(
        default=False, metadata={"help": "Also run the residual gate's ablations (first seed, every budget)."}
    )
    finetune_kinds: list[str] | None = field(
        default=None,
        metadata={"help": f"Fine-tune only these policies, of {', '.join(FINETUNED_KINDS)} (default: every one)."},
    )
    timing_images: int = field(default=1024, metadata={"help": "Test images of the throughput comparison."})
    timing_repeats: int = field(default=5, metadata={"help": "Interleaved timing repetitions (median)."})

    def __post_init__(self):
        unknown = sorted(set(self.finetune_kinds or ()) - set(FINETUNED_KINDS))
        if unknown:
            raise ValueError(f"`finetune_kinds` holds unknown policies {unknown}; choose from {FINETUNED_KINDS}.")


def best_training_free_rule(rows: dict[str, dict], ratios: list[float]) -> str:
    """The training-free rule with the best mean validation top-1 over the budgets on the frozen backbone (a study's
    rows, of the rules measured at every budget): the residual gate's starting point."""
    accuracy = {}
    for rule in RULES:
        measured = [rows.get(row_name(rule, "frozen", ratio_budget(ratio))) for ratio in ratios]
        if None not in measured:
            accuracy[rule] = statistics.mean(row["validation"]["accuracy"] for row in measured)
    if not accuracy:
        raise ValueError(f"No training-free rule ({', '.join(RULES)}) has frozen rows at every budget {ratios}.")
    return max(accuracy, key=accuracy.get)


def gate_path(output_dir: Path, kind: str, ratios: list[float] | None, seed: int) -> Path:
    """Where a study keeps a trained gate: one per (kind, seed), and per budget for gates trained towards one."""
    budget = "" if ratios is None else "-ratio=" + ",".join(map(str, ratios))
    return Path(output_dir) / "gates" / f"{kind.replace(' ', '_')}{budget}-seed={seed}.safetensors"


def row_name(kind: str, tuning: str, budget: str, seed: int | None = None) -> str:
    return f"{kind}|{tuning}|{budget}" + ("" if seed is None else f"|seed={seed}")


def ratio_budget(ratio: float) -> str:
    return f"ratio={ratio}"


def merge_results(path: Path, rows: dict[str, dict], throughput: dict[str, dict]) -> tuple[dict, dict]:
    """Write `rows` and `throughput` to the study's `results.json` at `path`, merged with what it holds, and return the
    merged state. Rows are only ever added, never changed, so the union is every writer's work: runs of other seeds
    writing to the same file lose nothing. The directory is locked for the read and the write, and the file is
    replaced atomically, so a reader never sees half a file."""
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        rows = {**saved.get("rows", {}), **rows}
        throughput = {**saved.get("throughput", {}), **throughput}
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps({"rows": rows, "throughput": throughput}, indent=1))
        partial.replace(path)
    finally:
        os.close(directory)  # releases the lock
    return rows, throughput


class GateStudy:
    def __init__(self, args: GateStudyArguments):
        self.args = args
        self.output_dir = Path(args.output_dir)
        (self.output_dir / "gates").mkdir(parents=True, exist_ok=True)
        self.results_path = self.output_dir / "results.json"
        saved = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.rows, self.throughput = saved.get("rows", {}), saved.get("throughput", {})
        self.vit = ViTForImageClassification.from_pretrained(args.backbone).eval()
        processor = AutoImageProcessor.from_pretrained(args.backbone)
        load = dict(
            seed=args.data_seed, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples
        )
        splits = load_classification_splits(args.dataset, background_contrast=args.background_contrast, **load)
        self.train_split, self.processor = splits["train"], processor
        self.data = split_tensors(
            {split: splits[split] for split in ("validation", "test")}, processor, self.num_channels
        )
        self.items = translated_item_regions(args.dataset, processor, self.model().config, load)
        generator = torch.Generator().manual_seed(args.data_seed)
        subset = torch.randperm(len(self.train_split), generator=generator)[: args.gate_train_samples]
        # only the gates' images are processed up front: the whole training split (8 GB of tensors on the sparse
        # bench) waits for the first fine-tuning, `train_data`
        gate_split = self.train_split.select(subset.tolist())
        self.gate_data = split_tensors({"train": gate_split}, processor, self.num_channels)["train"]

    @functools.cached_property
    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training image and label, processed: what each fine-tuning trains on."""
        return split_tensors({"train": self.train_split}, self.processor, self.num_channels)["train"]

    @property
    def num_channels(self) -> int:
        return self.vit.config.num_channels

    def model(self, **overrides) -> MSViTForImageClassification:
        overrides = {"size_aware_attention": True, **overrides}
        sizes = {"patch_sizes": self.args.patch_sizes} if self.args.patch_sizes else {}
        return MSViTForImageClassification.from_vit(
            self.vit, coarse_patch_size=self.args.coarse_patch_size, **sizes, **overrides
        ).eval()

    def save(self) -> None:
        self.rows, self.throughput = merge_results(self.results_path, self.rows, self.throughput)

    def record(self, name: str, model, *, policy: str = "gate", value: float | None = None, **row) -> None:
        """Evaluate `model` on validation and test under the row's policy and budget, and store the row."""
        budget = row.get("budget")
        options = dict(policy=policy, seed=1234 + row.get("seed", 0))
        if budget == "ratio":
            options["fine_ratio"] = value
        elif budget == "threshold":
            options["threshold"] = value
        measured = {
            split: evaluate_split_policy(model, *self.data[split], item_regions=self.items[split], **options)
            for split in ("validation", "test")
        }
        self.rows[name] = {**row, "value": value, **measured}
        self.save()
        test = measured["test"]
        rates = "/".join(f"{test[key]:.2f}" for key in SPLIT_RATES if key in test)
        groups = "/".join(group for key, group in SPLIT_RATES.items() if key in test)
        print(f"{name}: test {100 * test['accuracy']:.2f} %, {groups} split {rates}, {test['gmacs']:.4f} GMACs")

    def trained_gate(
        self, kind: str, objective: str, seed: int, ratios: list[float] | None = None, **overrides
    ) -> MSViTForImageClassification:
        """A gate trained on the frozen backbone, kept in `gates/` (`gate_path`) for later rows and reruns."""
        torch.manual_seed(seed)  # the gate's initial weights
        model = self.model(**{**GATE_RECIPES[objective], **overrides})
        gate = model.msvit.embeddings.gate
        path = gate_path(self.output_dir, kind, ratios, seed)
        if path.is_file():
            gate.load_state_dict(load_file(path))
            return model
        training = GateTrainingArguments(GATE_LEARNING_RATES[objective], epochs=self.args.epochs, seed=seed)
        train_on_tensors(model, *self.gate_data, training, description=f"{kind} gate, seed {seed}")
        save_file({key: value.contiguous() for key, value in gate.state_dict().items()}, path)
        return model

    def finetuned(self, model, seed: int, description: str, **options) -> MSViTForImageClassification:
        torch.manual_seed(seed)
        training = GateTrainingArguments(self.args.finetune_learning_rate, epochs=self.args.finetune_epochs, seed=seed)
        train_on_tensors(model, *self.train_data, training, gate_only=False, description=description, **options)
        return model

    def missing(self, names: list[str]) -> bool:
        return not all(name in self.rows for name in names)

    def run(self) -> None:
        args = self.args
        # the gates trained once come first for every seed: a study cut short still has their means over seeds
        for seed in args.seeds:
            self.frozen_rows(seed)
        for seed in args.seeds:
            self.straight_through_rows(seed)
        if args.ablations:
            for seed in args.seeds:
                self.ablation_rows(seed)
        if args.residual_ablations:
            self.residual_ablation_rows(args.seeds[0])
        self.measure_throughput()
        if args.finetune:
            for seed in args.seeds:
                self.finetuned_rows(seed)
        table = summary_table(self.rows, self.throughput)
        (self.output_dir / "table.md").write_text(table)

    def frozen_rows(self, seed: int) -> None:
        args, tuning = self.args, "frozen"
        if seed == args.seeds[0]:  # deterministic rows: one seed
            for policy in (*FIXED_POLICIES, "content"):
                name = row_name(policy, tuning, "-")
                if name not in self.rows:
                    self.record(name, self.model(), policy=policy, kind=policy, tuning=tuning, budget=None)
            for ratio in args.ratios:
                for kind, policy, overrides in (
                    ("centre", "centre", {}),
                    *((rule, "gate", {"gate_type": rule}) for rule in RULES),
                ):
                    name = row_name(kind, tuning, ratio_budget(ratio))
                    if name not in self.rows:
                        model = self.model(**overrides)
                        self.record(name, model, policy=policy, value=ratio, kind=kind, tuning=tuning, budget="ratio")
        for ratio in args.ratios:
            name = row_name("random", tuning, ratio_budget(ratio), seed)
            if name not in self.rows:
                self.record(
                    name, self.model(), policy="random", value=ratio, kind="random", tuning=tuning, budget="ratio",
                    seed=seed,
                )  # fmt: skip
        counterfactual = self.gate_rows("counterfactual", seed)
        if counterfactual is not None:
            self.threshold_rows(counterfactual, "counterfactual", tuning, seed)
        recipe = residual_gate_recipe(self.best_rule())
        self.gate_rows("residual", seed, **recipe)
        if self.args.patch_sizes is not None and len(self.args.patch_sizes) > 2:  # the recipe's one prior, taken back
            self.gate_rows("residual", seed, kind=PER_LEVEL_RESIDUAL, **{**recipe, "gate_prior_per_level": True})
        self.matched_entropy_rows(tuning, seed)

    def straight_through_rows(self, seed: int) -> None:
        """Frozen rows of the paper's straight-through gate: one gate trained per budget."""
        for ratio in self.args.ratios:
            self.gate_rows("straight_through", seed, ratios=[ratio], target_fine_ratio=ratio)

    def gate_rows(
        self, objective: str, seed: int, ratios: list[float] | None = None, kind: str | None = None, **overrides
    ) -> MSViTForImageClassification | None:
        """Frozen rows of a learned gate at each ratio; returns the gate's model when any row was missing."""
        kind = kind or objective
        ratios = ratios or self.args.ratios
        # the thresholds are the counterfactual gate's own rows, not its ablations'
        with_thresholds = objective == "counterfactual" and not overrides
        names, thresholds = self.gate_row_names(kind, "frozen", ratios, seed, with_thresholds)
        if not self.missing([*names.values(), *thresholds]):
            return None
        # a straight-through gate trains towards its budget, a counterfactual one serves every budget
        model = self.trained_gate(kind, objective, seed, self.trained_ratios(objective, ratios), **overrides)
        for ratio, name in names.items():
            if name not in self.rows:
                self.record(name, model, value=ratio, kind=kind, tuning="frozen", budget="ratio", seed=seed)
        return model

    def gate_row_names(
        self, kind: str, tuning: str, ratios: list[float], seed: int, with_thresholds: bool
    ) -> tuple[dict[float, str], list[str]]:
        """A learned gate's row names: one per fine ratio, and one per threshold when it is measured at thresholds."""
        names = {ratio: row_name(kind, tuning, ratio_budget(ratio), seed) for ratio in ratios}
        thresholds = [row_name(kind, tuning, f"threshold={t}", seed) for t in self.args.thresholds]
        return names, thresholds if with_thresholds else []

    @staticmethod
    def trained_ratios(objective: str, ratios: list[float]) -> list[float] | None:
        return ratios if objective == "straight_through" else None

    def threshold_rows(self, model, kind: str, tuning: str, seed: int) -> None:
        """The counterfactual gate at each threshold of predicted loss drop (`predicted_drop_threshold`)."""
        for nats in self.args.thresholds:
            name = row_name(kind, tuning, f"threshold={nats}", seed)
            if name not in self.rows:
                probability = predicted_drop_threshold(model.config, nats)
                self.record(
                    name, model, value=probability, kind=kind, tuning=tuning, budget="threshold", seed=seed,
                    threshold_nats=nats,
                )  # fmt: skip

    def matched_entropy_rows(self, tuning: str, seed: int) -> None:
        """The entropy gate at the thresholds that give it, on validation, the counterfactual gate's fine ratio at each
        of its thresholds (same seed): matched GMACs."""
        entropy = None
        for nats in self.args.thresholds:
            reference = self.rows.get(row_name("counterfactual", tuning, f"threshold={nats}", seed))
            name = row_name("entropy", tuning, f"threshold={nats}", seed)
            if reference is None or name in self.rows:
                continue
            if entropy is None:
                entropy = self.model(gate_type="entropy")
                probabilities = split_probabilities(entropy, self.data["validation"][0]).flatten()
            quantile = 1 - reference["validation"]["fine_ratio"]
            probability = min(max(torch.quantile(probabilities, quantile).item(), 1e-6), 1 - 1e-6)
            self.record(
                name, entropy, value=probability, kind="entropy", tuning=tuning, budget="threshold", seed=seed,
                threshold_nats=nats,
            )  # fmt: skip

    def best_rule(self) -> str:
        return best_training_free_rule(self.rows, self.args.ratios)

    def residual_ablation_rows(self, seed: int) -> None:
        rule = self.best_rule()
        for kind, changes in RESIDUAL_ABLATIONS.items():
            if changes is None:
                changes = {"gate_residual_rule": next(other for other in RULES if other != rule)}
            self.gate_rows("residual", seed, kind=kind, **{**residual_gate_recipe(rule), **changes})

    def ablation_rows(self, seed: int) -> None:
        for kind, (objective, overrides) in ABLATIONS.items():
            overrides = dict(overrides)
            if objective == "straight_through":
                overrides["target_fine_ratio"] = 0.5
            self.gate_rows(objective, seed, ratios=[0.5], kind=kind, **overrides)

    def finetuned_rows(self, seed: int) -> None:
        args, tuning = self.args, "fine-tuned"
        for policy in filter(self.finetunes, FIXED_POLICIES):
            name = row_name(policy, tuning, "-", seed)
            if name not in self.rows:
                model = self.finetuned(self.model(), seed, f"fine-tune {policy}", split_policy=policy)
                self.record(name, model, policy=policy, kind=policy, tuning=tuning, budget=None, seed=seed)
        ranked = {policy: (policy, {}) for policy in RANKED_POLICIES}
        ranked.update({rule: ("gate", {"gate_type": rule}) for rule in RULES})
        for kind, (policy, overrides) in ranked.items():
            names = {ratio: row_name(kind, tuning, ratio_budget(ratio), seed) for ratio in args.ratios}
            if not self.finetunes(kind) or not self.missing(list(names.values())):
                continue
            model = self.finetuned(
                self.model(**overrides), seed, f"fine-tune {kind}", split_policy=policy, uniform_density=True
            )
            for ratio, name in names.items():
                self.record(
                    name, model, policy=policy, value=ratio, kind=kind, tuning=tuning, budget="ratio", seed=seed
                )
        self.finetuned_gate("counterfactual", seed, args.ratios)
        self.finetuned_gate("residual", seed, args.ratios, **residual_gate_recipe(self.best_rule()))
        for ratio in args.ratios:
            self.finetuned_gate("straight_through", seed, [ratio], target_fine_ratio=ratio)

    def finetunes(self, kind: str) -> bool:
        return self.args.finetune_kinds is None or kind in self.args.finetune_kinds

    def finetuned_gate(self, objective: str, seed: int, ratios: list[float], **overrides) -> None:
        """The frozen rows' gate, then the whole model fine-tuned with the gate's own objective."""
        tuning = "fine-tuned"
        names, thresholds = self.gate_row_names(objective, tuning, ratios, seed, objective == "counterfactual")
        if not self.finetunes(objective) or not self.missing([*names.values(), *thresholds]):
            return
        gate = self.trained_gate(objective, objective, seed, self.trained_ratios(objective, ratios), **overrides)
        # one flip per image while the backbone trains: every gate's fine-tuning then costs the same
        gate.config.counterfactual_flips = 1
        model = self.finetuned(gate, seed, f"fine-tune {objective}")
        for ratio, name in names.items():
            self.record(name, model, value=ratio, kind=objective, tuning=tuning, budget="ratio", seed=seed)
        if objective == "counterfactual":
            self.threshold_rows(model, objective, tuning, seed)

    def measure_throughput(self) -> None:
        """Inference images/s relative to the ViT, side by side on the same test images: the MSViT (learned gate) at
        every budget, all fine, all coarse, and the entropy gate at 0.5. Measured again, all side by side, when a
        budget was added."""
        if all(ratio_budget(ratio) in self.throughput for ratio in self.args.ratios):
            return
        pixels = self.data["test"][0][: self.args.timing_images]
        runners = {"vit": self.vit, "all_fine": self.model(), "all_coarse": self.model(fine_ratio_budget=0.0)}
        runners["all_fine"].set_budget(fine_ratio=1.0)
        for ratio in self.args.ratios:
            runners[ratio_budget(ratio)] = self.model(fine_ratio_budget=ratio)
        runners["entropy|ratio=0.5"] = self.model(gate_type="entropy", fine_ratio_budget=0.5)
        with torch.no_grad():
            speed = interleaved_images_per_second(
                runners, dict.fromkeys(runners, pixels), 128, self.args.timing_repeats
            )
        self.throughput = {name: value / speed["vit"] for name, value in speed.items() if name != "vit"} | {
            "threads": torch.get_num_threads(),
            "repeats": self.args.timing_repeats,
        }
        self.save()


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def throughput_of(row: dict, throughput: dict) -> str:
    key = row["kind"] if row["kind"] in FIXED_POLICIES else None
    if row["budget"] == "ratio":
        key = "entropy|ratio=0.5" if row["kind"] == "entropy" and row["value"] == 0.5 else ratio_budget(row["value"])
    return f"{throughput[key]:.2f}x" if key in throughput else "-"


def group_rows(rows: dict[str, dict]) -> dict[tuple, list[dict]]:
    """Rows by (kind, tuning, budget): the seeds of one table line."""
    groups: dict[tuple, list[dict]] = {}
    for name, row in rows.items():
        groups.setdefault(tuple(name.split("|")[:3]), []).append(row)
    return groups


def summary_table(rows: dict[str, dict], throughput: dict) -> str:
    """Markdown: one line per (policy, frozen or fine-tuned, budget), mean ± std over seeds."""
    groups = group_rows(rows)
    rates = [key for key in SPLIT_RATES if any(key in row["test"] for row in rows.values())]
    lines = [
        "| split policy | backbone | budget | seeds | validation top-1 (%) | test top-1 (%) | GMACs | tokens "
        f"| split rate: {' / '.join(SPLIT_RATES[key] for key in rates)} | throughput vs its ViT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def order(item):
        (kind, tuning, budget), group = item
        value = group[0]["value"]
        return (tuning != "frozen", group[0]["budget"] or "", -1 if value is None else value, kind)

    for (kind, tuning, budget), group in sorted(groups.items(), key=order):
        test = [row["test"] for row in group]
        rate_text = " / ".join(
            f"{statistics.mean(measured.get(rate, 0.0) for measured in test):.2f}" for rate in rates
        )
        budget_text = budget.replace("ratio=", "fine ratio ").replace("threshold=", "predicted drop > ")
        if budget.startswith("threshold"):
            budget_text += " nats" if kind != "entropy" else " nats (matched fine ratio)"
        lines.append(
            f"| {KIND_NAMES.get(kind, kind)} | {tuning} | {budget_text} | {len(group)} "
            f"| {mean_std([row['validation']['accuracy'] for row in group])} "
            f"| {mean_std([measured['accuracy'] for measured in test])} "
            f"| {statistics.mean(measured['gmacs'] for measured in test):.4f} "
            f"| {statistics.mean(measured['tokens'] for measured in test):.1f} "
            f"| {rate_text} | {throughput_of(group[0], throughput)} |"
        )
    return "\n".join(lines) + "\n"


def run_study(args: GateStudyArguments) -> dict[str, dict]:
    """Run (or resume) the study; returns its rows."""
    study = GateStudy(args)
    (study.output_dir / "arguments.json").write_text(json.dumps(asdict(args), indent=1))
    study.run()
    return study.rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    (args,) = HfArgumentParser(GateStudyArguments).parse_args_into_dataclasses(args=argv)
    return run_study(args)


if __name__ == "__main__":
    main()
