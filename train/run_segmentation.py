"""Train and evaluate MSViT semantic segmenters with Accelerate (one process here, DDP or FSDP on a cluster).

Data: Fashion-MNIST scenes (`train/segmentation_data.py`), several Fashion-MNIST items pasted on a black canvas with
a per-pixel mask (0 background, 1-10 the item classes, 255 ignored), generated offline from a fixed seed. Models take
3-channel images (grayscale replicated), so a trained model runs on any photo.

Stages (`--stage`):
- `scratch`: an MSViT segmenter from random weights. `--split_policy all_fine` gives the full-token (ViT) segmenter,
  `all_coarse` the all-coarse one, `random` / `centre` the baselines at `--target_fine_ratio`, `gate` the learned gate.
- `gate`: start from `--model_name_or_path` (a segmentation folder such as the all_fine scratch model, a ViT folder,
  converted with `from_vit`, or an MSViT classification folder, whose backbone is kept and decoder is new), freeze
  everything but the gate and its gBaS priors, and train them with the segmentation loss + gate loss.
- `joint`: fine-tune a whole segmenter (or a converted model) at a low learning rate.

    python -m msvit.train.run_segmentation --stage scratch --split_policy all_fine --output_dir outputs/seg-fine
    python -m msvit.train.run_segmentation --stage gate --model_name_or_path outputs/seg-fine/model \
        --target_fine_ratio 0.5 --output_dir outputs/seg-gate
    python -m msvit.train.run_segmentation --eval_only --model_name_or_path outputs/seg-gate/model \
        --eval_budgets 0.25 0.5 0.75 threshold all_fine all_coarse --output_dir outputs/seg-gate-budgets
    python -m msvit.train.run_segmentation --config configuration/training/segmentation-fine.yaml \
        --output_dir outputs/segmentation-fine  # a recipe; flags on the command line win
    accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml -m msvit.train.run_segmentation ...

The defaults (96 px canvases, 8 / 16 px patches, width 128, depth 4, linear decoder) train in minutes on two CPU
cores; `--canvas_size`, `--image_size`, the width flags and `--decoder_type mask_transformer` scale it up. From
Python: `train_segmenter(SegmentationArguments(stage="scratch", split_policy="all_fine", output_dir="outputs/x"))`.

Writes to `--output_dir`: `metrics.jsonl` (one JSON object per log step and evaluation), `checkpoints/step_N/`
(resumable with `--resume_from_checkpoint`), `model/` (weights and image processor), `results.json`, a Hub-ready
folder `hub/` with a model card built from the measured results, and `predictions.png` (validation images, gate
maps, predicted and true masks). `--eval_only` writes `budgets.json`: one evaluation per budget.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoImageProcessor, SegformerImageProcessorPil

from modeling_msvit import MSViTConfig, MSViTForSemanticSegmentation
from msvit.metrics import load_metric
from msvit.tools.export import image_processor_for
from msvit.train.arguments import CommonArguments, OptimisationArguments, parse_arguments, with_default
from msvit.train.evaluation import evaluate_segmenter, forced_split_kwargs
from msvit.train.reporting import export_trained_segmenter
from msvit.train.segmentation_data import (
    load_segmentation_splits,
    make_segmentation_transforms,
    scene_label_maps,
    segmentation_collate_fn,
)
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


Stage = Literal["scratch", "gate", "joint"]
STAGES = get_args(Stage)
FORCED_BUDGETS = ("all_fine", "all_coarse")
DEFAULT_BUDGETS = ("0.25", "0.5", "0.75", "threshold", *FORCED_BUDGETS)


def is_budget(text: str) -> bool:
    """Whether `text` is a `--eval_budgets` entry: a fine ratio in [0, 1], `threshold` (the gate threshold),
    `all_fine` or `all_coarse`."""
    if text in ("threshold", *FORCED_BUDGETS):
        return True
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


@dataclass(kw_only=True)
class SegmentationArguments(CommonArguments):
    """The arguments of `run_segmentation.py`: the shared ones (`train/arguments.py`) and its own."""

    stage: Stage | None = field(
        default=None, metadata={"help": "What to train (see the module docstring); not used with --eval_only."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Starting point (gate, joint, --eval_only): a segmentation folder, a ViT folder or an MSViT "
            "classification folder."
        },
    )
    dataset: str = field(
        default="fashion_mnist_scenes",
        metadata={
            "help": "fashion_mnist_scenes, or a Hub data set id with an image and a mask column "
            "(train/segmentation_data.py)."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input size of a new model (the image processor resizes); default: the canvas size rounded up to "
            "a multiple of the coarse patch. Converted and loaded models keep their own."
        },
    )
    canvas_size: int = field(default=96, metadata={"help": "Side of the composed scenes in pixels."})
    max_items: int = field(default=4, metadata={"help": "At most this many items per scene."})
    decoder_type: Literal["linear", "mask_transformer"] | None = field(
        default=None, metadata={"help": "Segmenter's linear decoder (default) or mask transformer."}
    )
    decoder_num_layers: int | None = field(
        default=None, metadata={"help": "Blocks of the mask transformer decoder (default 2)."}
    )
    num_train_epochs: int = with_default(OptimisationArguments, "num_train_epochs", 2)
    per_device_train_batch_size: int = with_default(OptimisationArguments, "per_device_train_batch_size", 64)
    per_device_eval_batch_size: int = with_default(OptimisationArguments, "per_device_eval_batch_size", 128)
    num_prediction_images: int = field(default=4, metadata={"help": "Validation images in predictions.png."})
    eval_only: bool = field(
        default=False,
        metadata={
            "help": "Evaluate --model_name_or_path at each of --eval_budgets on --eval_split (no training); writes "
            "budgets.json."
        },
    )
    eval_budgets: list[str] = field(
        default_factory=lambda: list(DEFAULT_BUDGETS),
        metadata={
            "help": "Fine ratios in [0, 1] (exactly that fraction of regions split per image), `threshold` (the gate "
            "threshold: the saved one, or --gate_threshold), `all_fine`, `all_coarse`."
        },
    )
    eval_split: Literal["validation", "test"] = field(default="validation", metadata={"help": "Split to measure."})

    def validate(self) -> None:
        super().validate()
        for spec in self.eval_budgets:
            if not is_budget(str(spec)):
                raise ValueError(
                    f"--eval_budgets: {spec!r} is not a budget: give a fine ratio in [0, 1], 'threshold', 'all_fine' "
                    "or 'all_coarse'."
                )
        if self.eval_only:
            if not self.model_name_or_path:
                raise ValueError("--eval_only needs --model_name_or_path (a trained segmentation folder).")
        elif self.stage is None:
            raise ValueError(f"--stage is required (one of {', '.join(STAGES)}) unless --eval_only.")
        elif self.stage == "scratch" and self.model_name_or_path:
            raise ValueError("--stage scratch trains from random weights; use --stage joint to fine-tune a model.")
        if self.stage in ("gate", "joint") and not self.model_name_or_path:
            raise ValueError(f"--stage {self.stage} needs --model_name_or_path (the model to start from).")
        if self.split_policy != "gate" and self.stage == "gate":
            raise ValueError("--split_policy replaces the gate: it applies to --stage scratch or joint.")


def build_model(args: SegmentationArguments) -> tuple[MSViTForSemanticSegmentation, SegformerImageProcessorPil]:
    """The segmenter of the stage and its image processor (a segmentation folder's own, else a new one)."""
    id2label, label2id = scene_label_maps()
    source = args.model_name_or_path
    source_config = AutoConfig.from_pretrained(source) if source else None
    is_segmenter = source_config is not None and "MSViTForSemanticSegmentation" in (source_config.architectures or [])
    decoder = {name: getattr(args, name) for name in ("decoder_type", "decoder_num_layers") if getattr(args, name)}
    if source and args.image_size:
        raise ValueError(f"--image_size sets the input size of a new model; {source} has its own.")
    if is_segmenter and decoder:
        raise ValueError(f"--decoder_type and --decoder_num_layers set a new decoder; {source} has its own.")
    overrides = msvit_overrides(args)
    if source is None:
        largest = args.largest_patch_size
        image_size = args.image_size or math.ceil(args.canvas_size / largest) * largest
        config = MSViTConfig(
            image_size=image_size,
            patch_size=args.patch_size,
            **{"coarse_patch_size": 2 * args.patch_size, **args.scale_fields()},
            **size_fields(args),
            num_channels=3,
            id2label=id2label,
            label2id=label2id,
            **decoder,
            **overrides,
        )
        model = MSViTForSemanticSegmentation(config)
    elif source_config.model_type == "vit":
        model = MSViTForSemanticSegmentation.from_vit(
            source, id2label=id2label, label2id=label2id, **decoder, **overrides, **args.scale_fields()
        )
    elif is_segmenter:
        model = MSViTForSemanticSegmentation.from_pretrained(source, **overrides)
    else:  # an MSViT classifier: its backbone, a new decoder
        model = MSViTForSemanticSegmentation.from_pretrained(
            source, id2label=id2label, label2id=label2id, **decoder, **overrides
        )
    if args.stage == "gate":
        freeze_all_but_gate(model)
    apply_budget(model, args)
    if is_segmenter:
        processor = AutoImageProcessor.from_pretrained(source)
    else:
        processor = image_processor_for(model.config, "image-segmentation")
    return model, processor


def training_inputs(batch: dict, args: SegmentationArguments, config) -> dict:
    """The model's arguments for one training batch: images and masks flipped together (from torch's global seed,
    which the loop sets per step), and the decisions of a non-gate `--split_policy`."""
    pixel_values, labels = batch["pixel_values"], batch["labels"]
    if not args.no_hflip:
        pixel_values, labels = random_hflip(pixel_values, labels)
    inputs = {"pixel_values": pixel_values, "labels": labels}
    forced = forced_split_kwargs(config, args.split_policy, pixel_values, config.target_fine_ratio)
    if forced:  # no gate to reach, so only the active tokens are computed
        inputs.update(forced, token_path="gathered")
    return inputs


def evaluate_budgets(
    model: torch.nn.Module, dataloader, accelerator: Accelerator, metric, budgets: Sequence[str]
) -> dict[str, dict]:
    """`evaluate_segmenter` results of one trained segmenter at each budget (see `is_budget`), keyed
    `fine_ratio=X`, `threshold=X`, `all_fine`, `all_coarse`. The model's own budget is restored afterwards."""
    config = accelerator.unwrap_model(model).config
    saved = config.fine_ratio_budget
    results = {}
    for spec in budgets:
        policy = spec if spec in FORCED_BUDGETS else "gate"
        if spec == "threshold":
            config.fine_ratio_budget, name = None, f"threshold={config.gate_threshold}"
        elif policy == "gate":
            config.fine_ratio_budget, name = float(spec), f"fine_ratio={float(spec)}"
        else:
            name = spec
        results[name] = evaluate_segmenter(
            model, dataloader, accelerator, metric, split_policy=policy, description=name
        )
    config.fine_ratio_budget = saved
    return results


def train_segmenter(args: SegmentationArguments) -> dict:
    """Train and evaluate as `args` say, or with `eval_only` evaluate at each budget; write the run's folder (see the
    module docstring) and return its results."""
    args.validate()
    accelerator = Accelerator(**accelerator_kwargs(args))
    set_seed(args.seed)

    dataset = load_segmentation_splits(
        args.dataset,
        seed=args.seed,
        data_dir=args.data_dir,
        canvas_size=args.canvas_size,
        max_items=args.max_items,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    model, processor = build_model(args)
    transform = make_segmentation_transforms(processor, num_channels=model.config.num_channels)
    train_dataloader, eval_dataloaders = make_dataloaders(dataset, transform, segmentation_collate_fn, args)
    metric = load_metric("mean_iou")

    if args.eval_only:
        model, dataloader = accelerator.prepare(model, eval_dataloaders[args.eval_split])
        results = evaluate_budgets(model, dataloader, accelerator, metric, args.eval_budgets)
        if accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "budgets.json").write_text(json.dumps(results, indent=2) + "\n")
        accelerator.end_training()
        return results

    def forward(batch: dict):
        return run.model(**training_inputs(batch, args, model.config))

    run = TrainingRun(args, accelerator, model, train_dataloader, eval_dataloaders, evaluate_segmenter, metric)
    run.train(forward)
    results = run.results("mean_iou", stage=args.stage, dataset=args.dataset, split_policy=args.split_policy)
    unwrapped = run.save(processor, results)
    if unwrapped is not None and not args.skip_export:
        validation = dataset["validation"].select(range(min(args.num_prediction_images, len(dataset["validation"]))))
        batch = segmentation_collate_fn(list(validation.with_transform(transform))) if len(validation) else {}
        export_trained_segmenter(unwrapped, processor, results, run.output_dir, args, list(validation["image"]), batch)
    accelerator.end_training()
    return results


def main(argv: list[str] | None = None) -> dict:
    """The command line (default: `sys.argv`), a `--config` recipe's values under it."""
    return train_segmenter(parse_arguments(SegmentationArguments, argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    main()
