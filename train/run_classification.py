"""Train and evaluate ViT / MSViT image classifiers with Accelerate (one process here, DDP or FSDP on a cluster).

Stages (`--stage`):
- `backbone`: a plain transformers `ViTForImageClassification` from scratch (or from `--model_name_or_path`) at one
  patch size: the base model for MSViT at the fine patch size, and the fixed-scale baselines.
- `gate`: convert a ViT folder with `MSViTForImageClassification.from_vit`, freeze the backbone, and train the gate
  with its objective (`--gate_objective`: counterfactual region flips by default, or the paper's straight-through
  estimator with a budget loss, whose gBaS priors then train too).
- `joint`: fine-tune a whole MSViT (or a converted ViT) at a low learning rate.
- `scratch`: an MSViT trained end to end from random weights.
`--split_policy random|centre|all_coarse|all_fine` replaces the gate's decisions (baselines).

    python -m msvit.train.run_classification --stage backbone --dataset translated_fashion_mnist --patch_size 8 \
        --output_dir outputs/vit-fine
    python -m msvit.train.run_classification --stage gate --model_name_or_path outputs/vit-fine/model \
        --dataset translated_fashion_mnist --learning_rate 1e-2 --fine_ratio_budget 0.5 --output_dir outputs/msvit-gate
    python -m msvit.train.run_classification --config configuration/training/translated-fmnist-gate.yaml \
        --output_dir outputs/translated-fmnist-gate  # a recipe; flags on the command line win
    accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml -m msvit.train.run_classification ...

From Python: `train_classifier(ClassificationArguments(stage="backbone", output_dir="outputs/vit-fine"))`.

Writes to `--output_dir`: `metrics.jsonl` (one JSON object per log step and evaluation), `checkpoints/step_N/`
(`accelerator.save_state`, resumable with `--resume_from_checkpoint`), `model/` (weights and image processor),
`results.json`, and for MSViT a Hub-ready folder `hub/` with a model card built from the measured results and
`gate_maps.png`.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from modeling_msvit import MSViTConfig, MSViTForImageClassification
from msvit.metrics import load_metric
from msvit.train.arguments import CommonArguments, OptimisationArguments, parse_arguments, with_default
from msvit.train.data import class_names, collate_fn, load_classification_splits, make_transforms
from msvit.train.evaluation import evaluate_classifier, forced_split_kwargs, is_msvit
from msvit.train.reporting import export_trained_msvit
from msvit.train.training_loop import (
    TrainingRun,
    accelerator_kwargs,
    apply_budget,
    freeze_all_but_gate,
    make_dataloaders,
    msvit_overrides,
    random_hflip,
    size_fields,
)


Stage = Literal["backbone", "gate", "joint", "scratch"]
STAGES = get_args(Stage)


@dataclass(kw_only=True)
class ClassificationArguments(CommonArguments):
    """The arguments of `run_classification.py`: the shared ones (`train/arguments.py`) and its own."""

    stage: Stage | None = field(default=None, metadata={"help": "What to train (see the module docstring); required."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Starting point: a ViT folder (backbone, gate, joint) or an MSViT folder (joint)."},
    )
    dataset: str = field(
        default="translated_fashion_mnist",
        metadata={
            "help": "fashion_mnist, translated_fashion_mnist (or its cluttered_ / textured_ / sparse_ variant; "
            "sparse_: 56 px items on 192 px canvases), imagefolder:<dir> or a Hub data set id."
        },
    )
    background_contrast: float = field(
        default=1.0,
        metadata={"help": "textured_translated_fashion_mnist: backgrounds span [0, contrast] of the pixel range."},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Model input size (the image processor resizes); default: the data's size rounded up to a "
            "multiple of the coarse patch (64 for translated Fashion-MNIST, 192 for its sparse variant, 32 for "
            "Fashion-MNIST)."
        },
    )
    validation_size: float = field(
        default=5000, metadata={"help": "Validation images carved from train (or a fraction)."}
    )
    num_train_epochs: int = with_default(OptimisationArguments, "num_train_epochs", 6)
    per_device_train_batch_size: int = with_default(OptimisationArguments, "per_device_train_batch_size", 128)
    per_device_eval_batch_size: int = with_default(OptimisationArguments, "per_device_eval_batch_size", 256)
    num_gate_map_images: int = field(default=8, metadata={"help": "Validation images drawn in gate_maps.png (MSViT)."})

    def validate(self) -> None:
        super().validate()
        if self.stage is None:
            raise ValueError(f"--stage is required: one of {', '.join(STAGES)} (see --help).")
        if self.stage in ("gate", "joint") and not self.model_name_or_path:
            raise ValueError(f"--stage {self.stage} needs --model_name_or_path (the model to start from).")
        if self.split_policy != "gate" and self.stage in ("backbone", "gate"):
            raise ValueError("--split_policy applies to MSViT backbone training (--stage joint or scratch).")


def default_image_size(args: ClassificationArguments, dataset) -> int:
    if args.image_size:
        return args.image_size
    width, height = dataset["train"][0]["image"].size
    largest = args.largest_patch_size
    return math.ceil(max(width, height) / largest) * largest


def build_model(args: ClassificationArguments, labels: list[str], num_channels: int, image_size: int):
    """The model of the stage and its image processor."""
    label_maps = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    source = args.model_name_or_path
    source_type = AutoConfig.from_pretrained(source).model_type if source else None
    processor = None
    if source and (Path(source) / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(source)
    sizes = dict(**size_fields(args), image_size=image_size, num_channels=num_channels, **label_maps)
    if args.stage == "backbone":
        if source:
            model = ViTForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **label_maps)
        else:
            model = ViTForImageClassification(ViTConfig(patch_size=args.patch_size, **sizes))
    elif args.stage == "scratch":
        scales = {"coarse_patch_size": 2 * args.patch_size, **args.scale_fields()}
        config = MSViTConfig(patch_size=args.patch_size, **scales, **sizes, **msvit_overrides(args))
        model = MSViTForImageClassification(config)
    elif source_type == "vit":
        model = MSViTForImageClassification.from_vit(source, **msvit_overrides(args), **args.scale_fields())
    else:
        model = MSViTForImageClassification.from_pretrained(source, **msvit_overrides(args))
    if args.stage == "gate":
        freeze_all_but_gate(model)
    if is_msvit(model):
        apply_budget(model, args)
    if processor is None:
        size = model.config.image_size
        processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=0.5, image_std=0.5)
    return model, processor


def train_classifier(args: ClassificationArguments) -> dict:
    """Train and evaluate as `args` say; write the run's folder (see the module docstring) and return its results."""
    args.validate()
    accelerator = Accelerator(**accelerator_kwargs(args))
    set_seed(args.seed)

    dataset = load_classification_splits(
        args.dataset,
        validation_size=int(args.validation_size) if args.validation_size >= 1 else args.validation_size,
        seed=args.seed,
        background_contrast=args.background_contrast,
        data_dir=args.data_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    labels = class_names(dataset)
    num_channels = 1 if dataset["train"][0]["image"].mode == "L" else 3
    model, processor = build_model(args, labels, num_channels, default_image_size(args, dataset))
    num_channels = model.config.num_channels

    transform = make_transforms(processor, train=False, num_channels=num_channels)
    train_dataloader, eval_dataloaders = make_dataloaders(dataset, transform, collate_fn, args)
    msvit = is_msvit(model)
    metric = load_metric("accuracy")

    def forward(batch: dict):
        pixel_values = batch["pixel_values"]
        if not args.no_hflip:
            (pixel_values,) = random_hflip(pixel_values)
        kwargs = forced_split_kwargs(model.config, args.split_policy, pixel_values, run.fine_ratio) if msvit else {}
        return run.model(pixel_values=pixel_values, labels=batch["labels"], **kwargs)

    run = TrainingRun(args, accelerator, model, train_dataloader, eval_dataloaders, evaluate_classifier, metric)
    run.train(forward)
    results = run.results("accuracy", stage=args.stage, dataset=args.dataset, split_policy=args.split_policy)
    unwrapped = run.save(processor, results)
    if unwrapped is not None and is_msvit(unwrapped) and not args.skip_export:
        export_trained_msvit(unwrapped, processor, dataset["validation"], results, run.output_dir, args)
    accelerator.end_training()
    return results


def main(argv: list[str] | None = None) -> dict:
    """The command line (default: `sys.argv`), a `--config` recipe's values under it."""
    return train_classifier(parse_arguments(ClassificationArguments, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    main()
