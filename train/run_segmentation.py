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
    accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml -m msvit.train.run_segmentation ...

The defaults (96 px canvases, 8 / 16 px patches, width 128, depth 4, linear decoder) train in minutes on two CPU
cores; `--canvas_size`, `--image_size`, the width flags and `--decoder_type mask_transformer` scale it up.

Writes to `--output_dir`: `metrics.jsonl` (one JSON object per log step and evaluation), `checkpoints/step_N/`
(resumable with `--resume_from_checkpoint`), `model/` (weights and image processor), `results.json`, a Hub-ready
folder `hub/` with a model card built from the measured results, and `predictions.png` (validation images, gate
maps, predicted and true masks). `--eval_only` writes `budgets.json`: one evaluation per budget.
"""

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoImageProcessor, SegformerImageProcessorPil

from modeling_msvit import MSViTConfig, MSViTForSemanticSegmentation
from msvit.metrics import load_metric
from msvit.tools.export import image_processor_for
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
    add_bookkeeping_arguments,
    add_data_arguments,
    add_model_arguments,
    add_msvit_arguments,
    add_optimisation_arguments,
    apply_budget,
    freeze_all_but_gate,
    make_dataloaders,
    msvit_overrides,
    parse_with_recipe,
    random_hflip,
    size_fields,
)


STAGES = ("scratch", "gate", "joint")
FORCED_BUDGETS = ("all_fine", "all_coarse")
DEFAULT_BUDGETS = ("0.25", "0.5", "0.75", "threshold", *FORCED_BUDGETS)


def budget(text: str) -> str:
    """A `--eval_budgets` entry: a fine ratio in [0, 1], `threshold` (the gate threshold), `all_fine` or
    `all_coarse`."""
    if text in ("threshold", *FORCED_BUDGETS):
        return text
    try:
        fine_ratio = float(text)
    except ValueError:
        fine_ratio = math.nan
    if not 0.0 <= fine_ratio <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: give a fine ratio in [0, 1], 'threshold', 'all_fine' or 'all_coarse'."
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--config", help="A training recipe (configuration/training/*.yaml); flags given here override its values.")
    add("--stage", choices=STAGES, help="What to train (see the module docstring); not used with --eval_only.")
    add(
        "--model_name_or_path",
        help="Starting point (gate, joint, --eval_only): a segmentation folder, a ViT folder or an MSViT "
        "classification folder.",
    )
    add("--output_dir", required=True, help="Where checkpoints, logs, the model and the results go.")
    data = add_data_arguments(
        parser,
        dataset="fashion_mnist_scenes",
        dataset_help="fashion_mnist_scenes, or a Hub data set id with an image and a mask column "
        "(train/segmentation_data.py).",
        image_size_help="Input size of a new model (the image processor resizes); default: the canvas size rounded "
        "up to a multiple of the coarse patch. Converted and loaded models keep their own.",
    )
    data.add_argument("--canvas_size", type=int, default=96, help="Side of the composed scenes in pixels.")
    data.add_argument("--max_items", type=int, default=4, help="At most this many items per scene.")
    add_model_arguments(parser)
    decoder = parser.add_argument_group("decoder (of a new segmentation head)")
    decoder.add_argument(
        "--decoder_type",
        choices=("linear", "mask_transformer"),
        help="Segmenter's linear decoder (default) or mask transformer.",
    )
    decoder.add_argument("--decoder_num_layers", type=int, help="Blocks of the mask transformer decoder (default 2).")
    add_msvit_arguments(parser)
    add_optimisation_arguments(parser, train_batch_size=64, eval_batch_size=128, num_train_epochs=2)
    outputs = add_bookkeeping_arguments(parser)
    outputs.add_argument("--num_prediction_images", type=int, default=4, help="Validation images in predictions.png.")
    evaluation = parser.add_argument_group("evaluation only")
    evaluation.add_argument(
        "--eval_only",
        action="store_true",
        help="Evaluate --model_name_or_path at each of --eval_budgets on --eval_split (no training); writes "
        "budgets.json.",
    )
    evaluation.add_argument(
        "--eval_budgets",
        nargs="+",
        type=budget,
        default=list(DEFAULT_BUDGETS),
        help="Fine ratios in [0, 1] (exactly that fraction of regions split per image), `threshold` (the gate "
        "threshold: the saved one, or --gate_threshold), `all_fine`, `all_coarse`.",
    )
    evaluation.add_argument(
        "--eval_split", choices=("validation", "test"), default="validation", help="Split to measure."
    )
    args = parse_with_recipe(parser, argv)
    if args.eval_only:
        if not args.model_name_or_path:
            parser.error("--eval_only needs --model_name_or_path (a trained segmentation folder).")
    elif args.stage is None:
        parser.error(f"--stage is required (one of {', '.join(STAGES)}) unless --eval_only.")
    elif args.stage == "scratch" and args.model_name_or_path:
        parser.error("--stage scratch trains from random weights; use --stage joint to fine-tune a model.")
    if args.split_policy != "gate" and args.stage == "gate":
        parser.error("--split_policy replaces the gate: it applies to --stage scratch or joint.")
    return args


def build_model(args: argparse.Namespace) -> tuple[MSViTForSemanticSegmentation, SegformerImageProcessorPil]:
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
        coarse = args.coarse_patch_size or 2 * args.patch_size
        image_size = args.image_size or math.ceil(args.canvas_size / coarse) * coarse
        config = MSViTConfig(
            image_size=image_size,
            patch_size=args.patch_size,
            coarse_patch_size=coarse,
            **size_fields(args),
            num_channels=3,
            id2label=id2label,
            label2id=label2id,
            **decoder,
            **overrides,
        )
        model = MSViTForSemanticSegmentation(config)
    elif source_config.model_type == "vit":
        if args.coarse_patch_size:
            overrides["coarse_patch_size"] = args.coarse_patch_size
        model = MSViTForSemanticSegmentation.from_vit(
            source, id2label=id2label, label2id=label2id, **decoder, **overrides
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


def training_inputs(batch: dict, args: argparse.Namespace, config) -> dict:
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
    """`evaluate_segmenter` results of one trained segmenter at each budget (see `budget`), keyed
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
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


if __name__ == "__main__":
    main()
