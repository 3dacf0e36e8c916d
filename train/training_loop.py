"""What the training scripts (`run_classification.py`, `run_segmentation.py`) share besides their arguments
(`arguments.py`): MSViT config overrides and budgets, seeded flips, the optimiser and schedule, exact resume, the
training loop with its progress bar, JSON-lines log and checkpoints, and saving the trained model.

A script's entry point (`train_classifier(args)`):

    accelerator = Accelerator(**accelerator_kwargs(args))
    ...  # data, model (with `msvit_overrides`, `apply_budget`, `freeze_all_but_gate`), data loaders, metric
    run = TrainingRun(args, accelerator, model, train_dataloader, eval_dataloaders, evaluate_classifier, metric)
    run.train(forward)  # forward(batch) -> model outputs with `.loss`, called after the step's re-seeding
    results = run.results("accuracy", stage=args.stage)
    unwrapped = run.save(processor, results)  # the trained model on the main process, None on the others
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from msvit.train.arguments import CommonArguments, ModelArguments, MSViTArguments
from msvit.train.evaluation import is_msvit


MSVIT_OVERRIDES = (
    "target_fine_ratio",
    "gate_type",
    "gate_residual_rule",
    "gate_input",
    "gate_objective",
    "counterfactual_flips",
    "counterfactual_target",
    "counterfactual_target_scale",
    "counterfactual_layouts",
    "gate_loss_type",
    "gate_loss_weight",
    "gate_temperature",
    "train_token_path",
    "masked_path_attention",
)

# The counterfactual objective's training layouts per stage: on a frozen backbone the gate learns a region's value
# best in every context; a backbone that trains must learn to read the layouts the gate will choose.
STAGE_LAYOUTS = {"gate": "uniform", "joint": "gate", "scratch": "gate"}


# ----------------------------------------------------------------------------------------------------------------
# model set-up


def size_fields(args: ModelArguments) -> dict:
    """Width and depth of a new model, from the model flags."""
    return dict(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
    )


def msvit_overrides(args: MSViTArguments) -> dict:
    """The MSViT config fields the arguments set, and the counterfactual layouts of the script's `stage` unless set
    (`STAGE_LAYOUTS`)."""
    overrides = {name: getattr(args, name) for name in MSVIT_OVERRIDES if getattr(args, name) is not None}
    stage_layouts = STAGE_LAYOUTS.get(getattr(args, "stage", None))
    if stage_layouts is not None:
        overrides.setdefault("counterfactual_layouts", stage_layouts)
    if args.separate_coarse_embedding:
        overrides["separate_coarse_embedding"] = True
    if args.no_size_aware_attention:
        overrides["size_aware_attention"] = False
    return overrides


def freeze_all_but_gate(model: torch.nn.Module) -> None:
    """Gate stage: only the gate and its loss's priors learn; the backbone (and head) stay as loaded."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".gate." in name or ".gate_criterion." in name


def apply_budget(model: torch.nn.Module, args: MSViTArguments) -> None:
    """The inference knobs `--gate_threshold` and `--fine_ratio_budget` (a fixed budget takes precedence)."""
    if args.gate_threshold is not None:
        model.set_budget(threshold=args.gate_threshold)
    if args.fine_ratio_budget is not None:
        model.set_budget(fine_ratio=args.fine_ratio_budget)


def random_hflip(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flip the same random half of the samples left-right in every tensor (batch first, width last): images and,
    for dense tasks, their label maps."""
    flip = torch.rand(len(tensors[0])) < 0.5
    return tuple(
        torch.where(flip.to(tensor.device).view(-1, *[1] * (tensor.ndim - 1)), tensor.flip(-1), tensor)
        for tensor in tensors
    )


def checkpoint_step(checkpoint: str | Path) -> int:
    """N of a `checkpoints/step_N` folder: the optimiser steps it holds."""
    return int(Path(checkpoint).name.removeprefix("step_"))


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The last `checkpoints/step_N` folder a run saved in `output_dir` (what an interrupted run resumes from), or
    None when it saved none."""
    checkpoints = sorted(Path(output_dir, "checkpoints").glob("step_*"), key=checkpoint_step)
    return str(checkpoints[-1]) if checkpoints else None


def step_seed(args: CommonArguments, epoch: int, batch_index: int, process_index: int) -> int:
    """A seed per (run, epoch, batch, process). Every training step re-seeds torch with it, so flips, Gumbel noise,
    dropout and random split masks depend on nothing else, and a resumed run repeats them exactly."""
    return (((args.seed * 1_000_003 + epoch) * 1_000_003 + batch_index) * 1_024 + process_index) % 2**63


# ----------------------------------------------------------------------------------------------------------------
# the run


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


def make_dataloaders(dataset, transform: Callable, collate_fn: Callable, args: CommonArguments) -> tuple:
    """The shuffled train loader and the validation and test loaders of `dataset` (a `DatasetDict`) through
    `transform`. One deterministic transform for every split: training flips happen in the loop, seeded per step, so
    that a resumed run sees exactly the same batches."""
    train_dataloader = DataLoader(
        dataset["train"].with_transform(transform),
        shuffle=True,
        batch_size=args.per_device_train_batch_size,
        collate_fn=collate_fn,
    )
    eval_dataloaders = {
        split: DataLoader(
            dataset[split].with_transform(transform), batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn
        )
        for split in ("validation", "test")
    }
    return train_dataloader, eval_dataloaders


def accelerator_kwargs(args: CommonArguments) -> dict:
    """`Accelerator(**accelerator_kwargs(args))`: the seedable sampler makes the data order a function of the seed
    and epoch, which exact resume relies on."""
    return dict(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


class TrainingRun:
    """One run of a training script: AdamW (no decay on biases and norms) with linear warm-up and cosine decay,
    `accelerator.prepare`, resume from `--resume_from_checkpoint`, the step loop and the evaluations.

    `evaluate` is `evaluate_classifier` or `evaluate_segmenter` (train/evaluation.py), run with `metric` under
    `--split_policy` (random and centre policies at the model's target fine ratio); `run.evaluate(split)` logs its
    results (the split rate of every coarse position stays out of the JSON-lines log) and returns the record.
    """

    def __init__(
        self,
        args: CommonArguments,
        accelerator: Accelerator,
        model: torch.nn.Module,
        train_dataloader,
        eval_dataloaders: dict,
        evaluate: Callable[..., dict],
        metric,
    ):
        self.args, self.accelerator, self.evaluate_fn, self.metric = args, accelerator, evaluate, metric
        self.fine_ratio = getattr(model.config, "target_fine_ratio", 0.5)  # a plain ViT has no gate
        self.output_dir = Path(args.output_dir)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": args.weight_decay},
                {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=args.learning_rate,
        )
        num_processes = accelerator.num_processes
        self.steps_per_epoch = math.ceil(len(train_dataloader) / num_processes / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        # the prepared scheduler steps once per process at every optimisation step
        scheduler = get_cosine_schedule_with_warmup(
            optimizer,
            num_warmup_steps=int(args.warmup_ratio * self.max_train_steps) * num_processes,
            num_training_steps=self.max_train_steps * num_processes,
        )
        self.model, self.optimizer, self.train_dataloader, self.scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, scheduler
        )
        self.eval_dataloaders = {split: accelerator.prepare(loader) for split, loader in eval_dataloaders.items()}
        if args.report_to != "none":
            accelerator.init_trackers("msvit", config={k: v for k, v in asdict(args).items() if v is not None})

        self.completed_steps, self.starting_epoch, self.resume_batches = 0, 0, 0
        if args.resume_from_checkpoint:
            accelerator.load_state(args.resume_from_checkpoint)
            self.completed_steps = checkpoint_step(args.resume_from_checkpoint)
            batches_done = self.completed_steps * args.gradient_accumulation_steps
            self.starting_epoch, self.resume_batches = divmod(batches_done, len(self.train_dataloader))
        self.logger = JsonLinesLogger(
            self.output_dir / "metrics.jsonl",
            accelerator.is_main_process,
            self.completed_steps if args.resume_from_checkpoint else None,
        )
        self.history = self.logger.validation_history
        self.train_seconds, self.train_images = 0.0, 0

    def evaluate(self, split: str) -> dict:
        results = self.evaluate_fn(
            self.model,
            self.eval_dataloaders[split],
            self.accelerator,
            self.metric,
            split_policy=self.args.split_policy,
            fine_ratio=self.fine_ratio,
            description=split,
        )
        record = {"split": split, "step": self.completed_steps, **results}
        self.logger.log({key: value for key, value in record.items() if key != "split_rate_per_position"})
        self.accelerator.log(
            {f"{split}/{key}": value for key, value in results.items() if isinstance(value, float)},
            step=self.completed_steps,
        )
        self.model.train()
        return record

    def train(self, forward: Callable[[dict], object]) -> None:
        """Run the steps left; `forward(batch)` returns the model's outputs (with `.loss`), after the step's seed."""
        args, accelerator, model = self.args, self.accelerator, self.model
        progress = tqdm(
            total=self.max_train_steps,
            initial=self.completed_steps,
            desc="train",
            disable=not accelerator.is_local_main_process,
        )
        # a plain ViT has no gate: its records carry the task loss only
        logged = ("loss", "gate_loss", "fine_ratio") if is_msvit(accelerator.unwrap_model(model)) else ("loss",)
        running = {**dict.fromkeys(logged, 0.0), "batches": 0}
        model.train()
        for epoch in range(self.starting_epoch, self.num_epochs):
            self.train_dataloader.set_epoch(epoch)
            skip = self.resume_batches if epoch == self.starting_epoch else 0
            batches = accelerator.skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader
            for batch_index, batch in enumerate(batches, start=skip):
                start = time.perf_counter()
                torch.manual_seed(step_seed(args, epoch, batch_index, accelerator.process_index))
                with accelerator.accumulate(model):
                    outputs = forward(batch)
                    accelerator.backward(outputs.loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        # the prepared model's parameters: FSDP2 replaces them, and frozen ones have no gradient
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                self.train_seconds += time.perf_counter() - start
                self.train_images += len(batch["pixel_values"])
                running["loss"] += outputs.loss.item()
                if "gate_loss" in running:
                    # forced split masks give no gate loss
                    running["gate_loss"] += 0.0 if outputs.gate_loss is None else outputs.gate_loss.item()
                    running["fine_ratio"] += outputs.split_mask.float().mean().item()
                running["batches"] += 1
                if not accelerator.sync_gradients:
                    continue
                self.completed_steps += 1
                progress.update(1)
                if self.completed_steps % args.logging_steps == 0 or self.completed_steps == self.max_train_steps:
                    means = torch.tensor([running[key] / running["batches"] for key in logged])
                    record = dict(zip(logged, accelerator.reduce(means, reduction="mean").tolist()))
                    record.update(
                        step=self.completed_steps,
                        epoch=epoch,
                        learning_rate=self.scheduler.get_last_lr()[0],
                        train_images_per_second=self.train_images / self.train_seconds,
                    )
                    self.logger.log(record)
                    accelerator.log(record, step=self.completed_steps)
                    progress.set_postfix({key: f"{record[key]:.3f}" for key in logged})
                    running = dict.fromkeys(running, 0.0)
                if args.checkpointing_steps and self.completed_steps % args.checkpointing_steps == 0:
                    accelerator.save_state(str(self.output_dir / "checkpoints" / f"step_{self.completed_steps}"))
                if args.eval_steps and self.completed_steps % args.eval_steps == 0:
                    self.history.append(self.evaluate("validation"))
                if self.completed_steps >= self.max_train_steps:
                    break
            if not args.eval_steps:
                self.history.append(self.evaluate("validation"))
            if self.completed_steps >= self.max_train_steps:
                break
        progress.close()

    def results(self, metric_name: str, **fields) -> dict:
        """`fields`, then the run's steps and training speed, the last validation record (evaluated now if the run
        had none), its validation curve of `metric_name` and GMACs, and (unless `--skip_test`) the test record."""
        results = {
            **fields,
            "steps": self.completed_steps,
            "train_images_per_second": self.train_images
            / max(self.train_seconds, 1e-9)
            * self.accelerator.num_processes,
            "validation": self.history[-1] if self.history else self.evaluate("validation"),
            "validation_curve": [{k: r[k] for k in ("step", metric_name, "gmacs")} for r in self.history],
        }
        if not self.args.skip_test:
            results["test"] = self.evaluate("test")
        return results

    def save(self, processor, results: dict) -> torch.nn.Module | None:
        """Write `model/` (weights and image processor) and `results.json`; return the trained model on the main
        process (reloaded whole after FSDP, whose sharded model cannot run on one process) and None on the others."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(self.model)  # on every process: gathers FSDP shards
        unwrapped = accelerator.unwrap_model(self.model)
        if not accelerator.is_main_process:
            return None
        unwrapped.save_pretrained(self.output_dir / "model", state_dict=state_dict, save_function=accelerator.save)
        processor.save_pretrained(self.output_dir / "model")
        (self.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if accelerator.distributed_type == DistributedType.FSDP:
            unwrapped = type(unwrapped).from_pretrained(self.output_dir / "model")
        return unwrapped
