"""Train and evaluate ViT / MSViT image classifiers with Accelerate (one process here, DDP or FSDP on a cluster).

Stages (`--stage`):
- `backbone`: a plain transformers `ViTForImageClassification` from scratch (or from `--model_name_or_path`) at one
  patch size: the base model for MSViT at the fine patch size, and the fixed-scale baselines.
- `gate`: convert a ViT folder with `MSViTForImageClassification.from_vit`, freeze the backbone, and train the gate
  and its gBaS priors with cross-entropy + gate loss.
- `joint`: fine-tune a whole MSViT (or a converted ViT) at a low learning rate.
- `scratch`: an MSViT trained end to end from random weights.
`--split_policy random|centre|all_coarse|all_fine` replaces the gate's decisions (baselines).

    python -m train.run_classification --stage backbone --dataset translated_fashion_mnist --patch_size 8 \
        --output_dir outputs/vit-fine
    python -m train.run_classification --stage gate --model_name_or_path outputs/vit-fine/model \
        --dataset translated_fashion_mnist --target_fine_ratio 0.5 --output_dir outputs/msvit-gate
    accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml -m train.run_classification ...

Writes to `--output_dir`: `metrics.jsonl` (one JSON object per log step and evaluation), `checkpoints/step_N/`
(`accelerator.save_state`, resumable with `--resume_from_checkpoint`), `model/` (weights and image processor),
`results.json`, and for MSViT a Hub-ready folder `hub/` with a model card built from the measured results and
`gate_maps.png`.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    get_cosine_schedule_with_warmup,
)

from modeling_msvit import MSViTConfig, MSViTForImageClassification
from train.data import class_names, collate_fn, load_classification_splits, make_transforms
from train.evaluation import evaluate_classifier, is_msvit
from train.metrics import load_metric
from train.recipes import load_recipe
from train.reporting import export_trained_msvit
from train.split_policies import SPLIT_POLICIES, forced_split_mask


STAGES = ("backbone", "gate", "joint", "scratch")
MSVIT_OVERRIDES = (
    "target_fine_ratio",
    "gate_loss_type",
    "gate_loss_weight",
    "gate_temperature",
    "train_token_path",
    "masked_path_attention",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--config", help="A training recipe (configuration/training/*.yaml); flags given here override its values.")
    add("--stage", choices=STAGES, required=True, help="What to train (see the module docstring).")
    add(
        "--model_name_or_path", help="Starting point: a ViT folder (backbone, gate, joint) or an MSViT folder (joint)."
    )
    add("--output_dir", required=True, help="Where checkpoints, logs, the model and the results go.")
    # data
    add(
        "--dataset",
        default="translated_fashion_mnist",
        help="fashion_mnist, translated_fashion_mnist, imagefolder:<dir> or a Hub data set id.",
    )
    add("--data_dir", help="Folder of the Fashion-MNIST IDX files (default: the Debian package's).")
    add("--validation_size", type=float, default=5000, help="Validation images carved from train (or a fraction).")
    add("--max_train_samples", type=int, help="Train on a fixed random subset of this size.")
    add("--max_eval_samples", type=int, help="Evaluate on fixed random subsets of this size.")
    add(
        "--image_size",
        type=int,
        help="Model input size (the image processor resizes); default: the data's size "
        "rounded up to a multiple of the coarse patch (64 for translated Fashion-MNIST, 32 for Fashion-MNIST).",
    )
    add("--no_hflip", action="store_true", help="Disable random horizontal flips in training.")
    # model
    add("--patch_size", type=int, default=8, help="(Fine) patch size of a new model.")
    add("--coarse_patch_size", type=int, help="MSViT coarse patch size (default: twice the patch size).")
    add("--hidden_size", type=int, default=128, help="Width of a new model.")
    add("--num_hidden_layers", type=int, default=4, help="Depth of a new model.")
    add("--num_attention_heads", type=int, default=4, help="Heads of a new model.")
    add("--intermediate_size", type=int, help="MLP size of a new model (default: 4 x width).")
    add("--target_fine_ratio", type=float, help="MSViT: fraction of regions the gate loss aims to split.")
    add("--gate_loss_type", choices=("gbas", "bas", "ratio"), help="MSViT: compute-budget loss.")
    add("--gate_loss_weight", type=float, help="MSViT: weight of the gate loss.")
    add("--train_token_path", choices=("masked", "gathered"), help="MSViT: execution path in training.")
    add(
        "--masked_path_attention",
        choices=("key_mask", "masked_softmax"),
        help="MSViT: how the masked path hides inactive tokens (masked_softmax: DynamicViT's, gradient from both).",
    )
    add("--gate_temperature", type=float, help="MSViT: Gumbel-sigmoid temperature in training.")
    add("--separate_coarse_embedding", action="store_true", help="MSViT ablation: own coarse patch embedding.")
    add("--split_policy", choices=SPLIT_POLICIES, default="gate", help="Who decides the splits (baselines).")
    add("--gate_threshold", type=float, help="MSViT: inference threshold on the split probability.")
    add("--fine_ratio_budget", type=float, help="MSViT: split exactly this fraction of regions at inference.")
    # optimisation
    add("--learning_rate", type=float, default=1e-3, help="Peak learning rate (AdamW).")
    add("--weight_decay", type=float, default=0.05, help="AdamW weight decay.")
    add("--num_train_epochs", type=int, default=6, help="Epochs (ignored when --max_train_steps is set).")
    add("--max_train_steps", type=int, help="Total optimisation steps.")
    add(
        "--warmup_ratio", type=float, default=0.05, help="Fraction of steps of linear warm-up before the cosine decay."
    )
    add("--per_device_train_batch_size", type=int, default=128, help="Batch size per process in training.")
    add("--per_device_eval_batch_size", type=int, default=256, help="Batch size per process in evaluation.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimisation step.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    add(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        help="Mixed precision mode (default: the `accelerate launch` config's, else no).",
    )
    add("--seed", type=int, default=0, help="Seed of everything: weights, data order, flips, Gumbel noise.")
    # bookkeeping
    add("--logging_steps", type=int, default=20, help="Log training metrics every N steps.")
    add("--eval_steps", type=int, help="Evaluate on validation every N steps (default: every epoch).")
    add("--checkpointing_steps", type=int, help="Save a resumable checkpoint every N steps.")
    add("--resume_from_checkpoint", help="A checkpoints/step_N folder to continue from (exactly).")
    add("--report_to", default="none", help="Also log to this tracker (e.g. tensorboard), via Accelerate.")
    add("--num_gate_map_images", type=int, default=8, help="Validation images drawn in gate_maps.png (MSViT).")
    add("--skip_test", action="store_true", help="Do not evaluate on the test split at the end.")
    add("--skip_export", action="store_true", help="Do not write the Hub folder and gate maps.")
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--config")
    config = recipe.parse_known_args(argv)[0].config
    args = parser.parse_args((load_recipe(config) if config else []) + argv)  # later flags win
    if args.stage in ("gate", "joint") and not args.model_name_or_path:
        parser.error(f"--stage {args.stage} needs --model_name_or_path.")
    if args.split_policy != "gate" and args.stage in ("backbone", "gate"):
        parser.error("--split_policy applies to MSViT backbone training (--stage joint or scratch).")
    return args


def default_image_size(args: argparse.Namespace, dataset) -> int:
    if args.image_size:
        return args.image_size
    width, height = dataset["train"][0]["image"].size
    coarse = args.coarse_patch_size or 2 * args.patch_size
    return math.ceil(max(width, height) / coarse) * coarse


def msvit_overrides(args: argparse.Namespace) -> dict:
    overrides = {name: getattr(args, name) for name in MSVIT_OVERRIDES if getattr(args, name) is not None}
    if args.separate_coarse_embedding:
        overrides["separate_coarse_embedding"] = True
    return overrides


def build_model(args: argparse.Namespace, labels: list[str], num_channels: int, image_size: int):
    """The model of the stage and its image processor."""
    label_maps = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    source = args.model_name_or_path
    source_type = AutoConfig.from_pretrained(source).model_type if source else None
    processor = None
    if source and (Path(source) / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(source)
    sizes = dict(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
        image_size=image_size,
        num_channels=num_channels,
        **label_maps,
    )
    if args.stage == "backbone":
        if source:
            model = ViTForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **label_maps)
        else:
            model = ViTForImageClassification(ViTConfig(patch_size=args.patch_size, **sizes))
    elif args.stage == "scratch":
        coarse = args.coarse_patch_size or 2 * args.patch_size
        config = MSViTConfig(patch_size=args.patch_size, coarse_patch_size=coarse, **sizes, **msvit_overrides(args))
        model = MSViTForImageClassification(config)
    elif source_type == "vit":
        overrides = msvit_overrides(args)
        if args.coarse_patch_size:
            overrides["coarse_patch_size"] = args.coarse_patch_size
        model = MSViTForImageClassification.from_vit(source, **overrides)
    else:
        model = MSViTForImageClassification.from_pretrained(source, **msvit_overrides(args))
    if args.stage == "gate":
        # only the gate and its loss's priors learn; the backbone stays as converted
        for name, parameter in model.named_parameters():
            parameter.requires_grad = ".gate." in name or ".gate_criterion." in name
    if is_msvit(model) and args.gate_threshold is not None:
        model.set_budget(threshold=args.gate_threshold)
    if is_msvit(model) and args.fine_ratio_budget is not None:  # a fixed budget takes precedence at inference
        model.set_budget(fine_ratio=args.fine_ratio_budget)
    if processor is None:
        size = model.config.image_size
        processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=0.5, image_std=0.5)
    return model, processor


def random_hflip(pixel_values: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = torch.rand(len(pixel_values)) < 0.5
    return torch.where(flip.to(pixel_values.device)[:, None, None, None], pixel_values.flip(-1), pixel_values)


def step_seed(args: argparse.Namespace, epoch: int, batch_index: int, process_index: int) -> int:
    """A seed per (run, epoch, batch, process). Every training step re-seeds torch with it, so flips, Gumbel noise,
    dropout and random split masks depend on nothing else, and a resumed run repeats them exactly."""
    return (((args.seed * 1_000_003 + epoch) * 1_000_003 + batch_index) * 1_024 + process_index) % 2**63


class JsonLinesLogger:
    """Appends one JSON object per line. A fresh run starts the file anew; a run resumed at step N keeps the records
    up to step N (those after it are repeated by the resumed run) and hands back its validation records."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.kept = []
        if resume_step is not None and path.is_file():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.kept = [record for record in records if record["step"] <= resume_step]
        if enabled:
            path.write_text("".join(json.dumps(record) + "\n" for record in self.kept))

    @property
    def validation_history(self) -> list[dict]:
        return [record for record in self.kept if record.get("split") == "validation"]

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    dataset = load_classification_splits(
        args.dataset,
        validation_size=int(args.validation_size) if args.validation_size >= 1 else args.validation_size,
        seed=args.seed,
        data_dir=args.data_dir,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    labels = class_names(dataset)
    num_channels = 1 if dataset["train"][0]["image"].mode == "L" else 3
    model, processor = build_model(args, labels, num_channels, default_image_size(args, dataset))
    num_channels = model.config.num_channels

    # one deterministic transform for every split: training flips happen in the loop, seeded per step, so that a
    # resumed run sees exactly the same batches
    transform = make_transforms(processor, train=False, num_channels=num_channels)
    train_dataloader = DataLoader(
        dataset["train"].with_transform(transform),
        shuffle=True,
        batch_size=args.per_device_train_batch_size,
        collate_fn=collate_fn,
    )
    eval_dataloaders = {
        split: DataLoader(
            dataset[split].with_transform(transform),
            batch_size=args.per_device_eval_batch_size,
            collate_fn=collate_fn,
        )
        for split in ("validation", "test")
    }

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    decay = [parameter for parameter in trainable if parameter.ndim >= 2]
    no_decay = [parameter for parameter in trainable if parameter.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * max_train_steps) * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    eval_dataloaders = {split: accelerator.prepare(loader) for split, loader in eval_dataloaders.items()}
    if args.report_to != "none":
        accelerator.init_trackers("msvit", config={k: v for k, v in vars(args).items() if v is not None})

    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        completed_steps = int(Path(args.resume_from_checkpoint).name.removeprefix("step_"))
        batches_done = completed_steps * args.gradient_accumulation_steps
        starting_epoch, resume_batches = divmod(batches_done, len(train_dataloader))
    logger = JsonLinesLogger(
        output_dir / "metrics.jsonl",
        accelerator.is_main_process,
        completed_steps if args.resume_from_checkpoint else None,
    )
    metric = load_metric("accuracy")
    unwrapped = accelerator.unwrap_model(model)
    grid = getattr(unwrapped.config, "coarse_grid_size", None)
    fine_ratio = getattr(unwrapped.config, "target_fine_ratio", 0.5)
    history = logger.validation_history

    def evaluate(split: str) -> dict:
        results = evaluate_classifier(
            model,
            eval_dataloaders[split],
            accelerator,
            metric,
            split_policy=args.split_policy,
            fine_ratio=fine_ratio,
            description=split,
        )
        record = {"split": split, "step": completed_steps, **results}
        logger.log({key: value for key, value in record.items() if key != "split_rate_per_position"})
        accelerator.log(
            {f"{split}/{key}": value for key, value in results.items() if isinstance(value, float)},
            step=completed_steps,
        )
        model.train()
        return record

    progress = tqdm(
        total=max_train_steps, initial=completed_steps, desc="train", disable=not accelerator.is_local_main_process
    )
    train_seconds, train_images = 0.0, 0
    # a plain ViT has no gate: its records carry the task loss only
    logged = ("loss", "gate_loss", "fine_ratio") if is_msvit(unwrapped) else ("loss",)
    running = {**dict.fromkeys(logged, 0.0), "batches": 0}
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        skip = resume_batches if epoch == starting_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            start = time.perf_counter()
            torch.manual_seed(step_seed(args, epoch, batch_index, accelerator.process_index))
            with accelerator.accumulate(model):
                pixel_values = batch["pixel_values"]
                if not args.no_hflip:
                    pixel_values = random_hflip(pixel_values)
                kwargs = {}
                if grid is not None:
                    split_mask = forced_split_mask(args.split_policy, len(pixel_values), grid, fine_ratio)
                    if split_mask is not None:
                        kwargs["split_mask"] = split_mask.to(pixel_values.device)
                outputs = model(pixel_values=pixel_values, labels=batch["labels"], **kwargs)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    # the prepared model's parameters: FSDP2 replaces them, and frozen ones have no gradient
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            train_seconds += time.perf_counter() - start
            train_images += len(pixel_values)
            running["loss"] += outputs.loss.item()
            if "gate_loss" in running:
                # forced split masks give no gate loss
                running["gate_loss"] += 0.0 if outputs.gate_loss is None else outputs.gate_loss.item()
                running["fine_ratio"] += outputs.split_mask.float().mean().item()
            running["batches"] += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                means = torch.tensor([running[key] / running["batches"] for key in logged])
                record = dict(zip(logged, accelerator.reduce(means, reduction="mean").tolist()))
                record.update(
                    step=completed_steps,
                    epoch=epoch,
                    learning_rate=scheduler.get_last_lr()[0],
                    train_images_per_second=train_images / train_seconds,
                )
                logger.log(record)
                accelerator.log(record, step=completed_steps)
                progress.set_postfix({key: f"{record[key]:.3f}" for key in logged})
                running = dict.fromkeys(running, 0.0)
            if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
                accelerator.save_state(str(output_dir / "checkpoints" / f"step_{completed_steps}"))
            if args.eval_steps and completed_steps % args.eval_steps == 0:
                history.append(evaluate("validation"))
            if completed_steps >= max_train_steps:
                break
        if not args.eval_steps:
            history.append(evaluate("validation"))
        if completed_steps >= max_train_steps:
            break
    progress.close()

    results = {
        "stage": args.stage,
        "dataset": args.dataset,
        "split_policy": args.split_policy,
        "steps": completed_steps,
        "train_images_per_second": train_images / max(train_seconds, 1e-9) * accelerator.num_processes,
        "validation": history[-1] if history else evaluate("validation"),
        "validation_curve": [{k: r[k] for k in ("step", "accuracy", "gmacs")} for r in history],
    }
    if not args.skip_test:
        results["test"] = evaluate("test")
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # on every process: gathers FSDP shards
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir / "model", state_dict=state_dict, save_function=accelerator.save)
        processor.save_pretrained(output_dir / "model")
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if is_msvit(unwrapped) and not args.skip_export:
            if accelerator.distributed_type == DistributedType.FSDP:  # a sharded model cannot run on one process
                unwrapped = type(unwrapped).from_pretrained(output_dir / "model")
            export_trained_msvit(unwrapped, processor, dataset["validation"], results, output_dir, args)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
