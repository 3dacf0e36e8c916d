"""Gate training and evaluation of split policies on a frozen backbone, on in-memory image tensors.

The typed entry points behind the gate study (`train/gate_study.py`) and the demo (`train/pipeline.py`): many gates
are trained on the same backbone and the same images, so the images are processed once and every model goes through
the same loop. Training goes through the model's own forward with labels (`model(pixel_values, labels).loss`), as
`Trainer` and `train/run_classification.py --stage gate` do: the loss already holds the gate objective.
"""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from train.evaluation import processed_pixel_values
from train.split_policies import forced_split_mask
from train.training_loop import freeze_all_but_gate


@dataclass
class GateTrainingArguments:
    """How a gate (or, for fine-tuning, the whole model) trains: AdamW, 5 % linear warm-up, cosine decay."""

    learning_rate: float
    epochs: int = 1
    batch_size: int = 128
    seed: int = 0
    max_grad_norm: float = 1.0


def train_on_tensors(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    args: GateTrainingArguments,
    *,
    gate_only: bool = True,
    split_policy: str | None = None,
    fine_ratio: float | None = None,
    description: str = "gate",
) -> list[float]:
    """Train an MSViT classifier through its own loss (`model(pixel_values, labels).loss`); returns every step's loss.

    `gate_only` freezes everything but the gate (a rule gate then has nothing to train and the model is returned
    unchanged); otherwise every parameter trains (fine-tuning). `split_policy` (see `train.split_policies`) forces the
    decisions of every batch, e.g. `"all_fine"` to fine-tune the plain ViT path. Every step re-seeds torch from
    `(seed, step)`, so layouts, flips and Gumbel noise are reproducible. The model is left in eval mode.
    """
    if gate_only:
        freeze_all_but_gate(model)
    else:
        model.requires_grad_(True)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not parameters:
        return []
    batches_per_epoch = math.ceil(len(pixel_values) / args.batch_size)
    total_steps = args.epochs * batches_per_epoch
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.0 if gate_only else 0.05)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, round(0.05 * total_steps)), total_steps)
    order_generator = torch.Generator().manual_seed(args.seed)
    losses = []
    model.train()
    with tqdm(total=total_steps, desc=description, leave=False) as progress:
        for _ in range(args.epochs):
            order = torch.randperm(len(pixel_values), generator=order_generator)
            for batch in order.split(args.batch_size):
                torch.manual_seed(args.seed * 1_000_003 + len(losses))
                split_mask = None
                if split_policy is not None:
                    grid = model.config.coarse_grid_size
                    split_mask = forced_split_mask(split_policy, len(batch), grid, fine_ratio or 0.0)
                loss = model(pixel_values=pixel_values[batch], labels=labels[batch], split_mask=split_mask).loss
                loss.backward()
                if args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def split_tensors(splits, image_processor, num_channels: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every split of a classification `DatasetDict` as `(pixel_values (N, C, H, W), labels (N,))`, processed once."""
    return {
        name: (
            processed_pixel_values(split, image_processor, num_channels),
            torch.as_tensor(split.with_format("numpy")["label"][:]),
        )
        for name, split in splits.items()
    }


def content_regions(pixel_values: torch.Tensor, coarse_patch_size: int) -> torch.Tensor:
    """`(N, Nc)` bool: the coarse regions that hold any pixel brighter than the darkest value of the images (on a
    translated canvas: the regions the item covers; all others are empty background)."""
    coarse = coarse_patch_size
    brightest = pixel_values.unfold(2, coarse, coarse).unfold(3, coarse, coarse).amax((1, 4, 5)).flatten(1)
    return brightest > pixel_values.amin()


@torch.no_grad()
def evaluate_split_policy(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    policy: str = "gate",
    fine_ratio: float | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 accuracy, mean GMACs and tokens per image, fine ratio, and the split rates on content and on empty
    regions of an MSViT classifier under a split policy.

    `policy`: `"gate"` (the model's own gate, at the fixed budget `fine_ratio`, or its saved budget/threshold when
    None), `"content"` (split exactly the regions that hold content: the clean canvas's oracle), or one of
    `train.split_policies` (`random`, `centre`, `all_fine`, `all_coarse`; random masks from a fixed seed).
    """
    model.eval()
    config = model.config
    content = content_regions(pixel_values, config.coarse_patch_size)
    saved_budget = (config.fine_ratio_budget, config.gate_threshold)
    if policy == "gate" and fine_ratio is not None:
        model.set_budget(fine_ratio=fine_ratio)
    generator = torch.Generator().manual_seed(1234)
    correct, token_counts, split_masks = 0, [], []
    try:
        for start in range(0, len(pixel_values), batch_size):
            batch = pixel_values[start : start + batch_size]
            if policy == "gate":
                split_mask = None
            elif policy == "content":
                split_mask = content[start : start + batch_size]
            else:
                split_mask = forced_split_mask(
                    policy, len(batch), config.coarse_grid_size, fine_ratio or 0.0, generator
                )
            outputs = model(pixel_values=batch, split_mask=split_mask)
            correct += (outputs.logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
            token_counts.append(outputs.token_counts)
            split_masks.append(outputs.split_mask)
    finally:
        config.fine_ratio_budget, config.gate_threshold = saved_budget
    counts, splits = torch.cat(token_counts), torch.cat(split_masks)
    return {
        "accuracy": correct / len(labels),
        "gmacs": model.compute_macs(counts).double().mean().item() / 1e9,
        "tokens": counts.double().mean().item(),
        "fine_ratio": splits.float().mean().item(),
        "split_rate_content": splits[content].float().mean().item(),
        "split_rate_empty": splits[~content].float().mean().item(),
    }
