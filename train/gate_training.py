"""Gate training and evaluation of split policies on a frozen backbone, on in-memory image tensors.

The typed entry points behind the gate study (`experiments/gate_study.py`) and the demo (`experiments/pipeline.py`):
many gates are trained on the same backbone and the same images, so the images are processed once and every model goes
through the same loop. Training goes through the model's own forward with labels
(`model(pixel_values, labels).loss`), as `Trainer` and `train/run_classification.py --stage gate` do: the loss already
holds the gate objective.
"""

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from modeling_msvit.mixed_scale_tokens import ScaleTree, by_decision
from msvit.train.data import CLEAN_CANVASES, load_classification_splits
from msvit.train.evaluation import processed_pixel_values
from msvit.train.split_policies import forced_split_mask, image_tree, policy_scores, uniform_density_split_mask
from msvit.train.training_loop import STAGE_LAYOUTS, freeze_all_but_gate


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
    uniform_density: bool = False,
    description: str = "gate",
) -> list[float]:
    """Train an MSViT classifier through its own loss (`model(pixel_values, labels).loss`); returns every step's loss.

    `gate_only` freezes everything but the gate (a rule gate then has nothing to train and the model is returned
    unchanged); otherwise every parameter trains (fine-tuning), and the counterfactual objective samples its layouts
    by the gate's ranking, as in the scripts' joint stage (`STAGE_LAYOUTS`). `split_policy` (see
    `msvit.train.split_policies`) forces the decisions of every batch, e.g. `"all_fine"` to fine-tune the plain ViT
    path, and trains on the gathered path (the masked path's loss on the active tokens only: forced decisions need no
    gradient through the gate; 20x faster for all coarse with three scales); with `uniform_density` every image
    instead splits a uniformly random number of regions in the policy's order (`random`, `centre`, or `gate`: the
    model's own split logits, for a training-free gate), so one fine-tuning serves every budget. Every step re-seeds
    torch from `(seed, step)`, so layouts, flips and Gumbel noise are reproducible. The model is left in eval mode.
    """
    if gate_only:
        freeze_all_but_gate(model)
    else:
        model.requires_grad_(True)
        model.config.counterfactual_layouts = STAGE_LAYOUTS["joint"]
    if split_policy is not None:
        model.config.train_token_path = "gathered"
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
                split_mask = forced_layouts(model, pixel_values[batch], split_policy, fine_ratio, uniform_density)
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


def forced_layouts(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    split_policy: str | None,
    fine_ratio: float | None,
    uniform_density: bool,
) -> torch.Tensor | None:
    """The split mask `train_on_tensors` imposes on a batch (None: the model decides)."""
    if split_policy is None:
        return None
    tree = image_tree(model.config, pixel_values)
    if not uniform_density:
        return forced_split_mask(split_policy, len(pixel_values), tree, fine_ratio or 0.0)
    if split_policy == "gate":
        with torch.no_grad():  # the gate's scores, from the gate alone
            scores = model.base_model.embeddings.predict_split_logits(pixel_values)
    else:
        scores = policy_scores(split_policy, len(pixel_values), tree)
    return uniform_density_split_mask(scores, tree)


def split_tensors(splits, image_processor, num_channels: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every split of a classification `DatasetDict` as `(pixel_values (N, C, H, W), labels (N,))`, processed once."""
    return {
        name: (
            processed_pixel_values(split, image_processor, num_channels),
            torch.as_tensor(split.with_format("numpy")["label"][:]),
        )
        for name, split in splits.items()
    }


def translated_item_regions(dataset: str, image_processor, config, load: dict) -> dict[str, torch.Tensor | None]:
    """Validation and test `(N, D)` bool item regions of a translated canvas data set, for the gate's decisions of an
    MSViT `config` (`load`: the keyword arguments of `load_classification_splits` that chose its images): for a data
    set composed on another one's canvases (`CLEAN_CANVASES`: cluttered, textured), the regions with content on its
    clean canvas, which holds the same items at the same places. None for clean canvases (translated, sparse) and any
    other data set, where every region with content is the item's."""
    clean_dataset = CLEAN_CANVASES.get(dataset)
    if clean_dataset is None:
        return {"validation": None, "test": None}
    clean = load_classification_splits(clean_dataset, **load)
    regions = {}
    for split in ("validation", "test"):
        pixel_values = processed_pixel_values(clean[split], image_processor, config.num_channels)
        regions[split] = content_regions(pixel_values, image_tree(config, pixel_values), config.patch_size)
    return regions


def with_new_gate(model: torch.nn.Module, **overrides) -> torch.nn.Module:
    """A copy of an MSViT with its config changed by `overrides` (e.g. another gate) and a fresh gate: every other
    weight is the model's own."""
    config = type(model.config).from_dict({**model.config.to_dict(), **overrides})
    fresh = type(model)(config)
    kept = {name: tensor for name, tensor in model.state_dict().items() if ".embeddings.gate." not in name}
    missing, unexpected = fresh.load_state_dict(kept, strict=False)
    missing = [name for name in missing if ".embeddings.gate." not in name]
    if missing or unexpected:
        raise ValueError(f"The new config changes more than the gate: missing {missing}, unexpected {unexpected}.")
    return fresh.to(model.dtype).eval()


def content_regions(pixel_values: torch.Tensor, tree: ScaleTree, patch_size: int) -> torch.Tensor:
    """`(N, D)` bool: the regions of the gate's decisions (the coarse regions with two patch sizes) that hold any
    pixel brighter than the darkest value of the images (on a translated canvas: the regions the item covers; all
    others are empty background)."""
    brightest = pixel_values.amax(1, keepdim=True)
    per_level = []
    for level, (rows, columns) in enumerate(tree.level_grids[1:], start=1):
        size = patch_size * tree.ratio**level
        per_level.append(F.max_pool2d(brightest[..., : rows * size, : columns * size], size).flatten(1))
    return by_decision(per_level, tree) > pixel_values.amin()


@torch.no_grad()
def evaluate_split_policy(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    policy: str = "gate",
    fine_ratio: float | None = None,
    threshold: float | None = None,
    item_regions: torch.Tensor | None = None,
    seed: int = 1234,
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 accuracy, mean GMACs and tokens per image, fine ratio, and the split rates on item, clutter and empty
    regions of an MSViT classifier under a split policy.

    `policy`: `"gate"` (the model's own gate, at the fixed budget `fine_ratio` or the `threshold`, or its saved
    budget/threshold when both are None), `"content"` (split exactly the item's regions: the oracle), or one of
    `msvit.train.split_policies` (`random`, `centre`, `all_fine`, `all_coarse`; random masks from `seed`).

    `item_regions` `(N, Nc)` bool marks the regions that hold the item (default: every region with content, right
    for clean canvases); content elsewhere is clutter (`split_rate_clutter`, reported when there is any).
    `split_rate_content` is the split rate on the item's regions.
    """
    model.eval()
    config = model.config
    tree = image_tree(config, pixel_values)
    content = content_regions(pixel_values, tree, config.patch_size)
    item = content if item_regions is None else item_regions
    saved_budget = (config.fine_ratio_budget, config.gate_threshold)
    if policy == "gate" and (fine_ratio, threshold) != (None, None):
        model.set_budget(fine_ratio=fine_ratio, threshold=threshold)
    generator = torch.Generator().manual_seed(seed)
    correct, token_counts, split_masks = 0, [], []
    try:
        for start in tqdm(range(0, len(pixel_values), batch_size), desc=f"evaluate ({policy})", leave=False):
            batch = pixel_values[start : start + batch_size]
            if policy == "gate":
                split_mask = None
            elif policy == "content":
                split_mask = item[start : start + batch_size]
            else:
                split_mask = forced_split_mask(policy, len(batch), tree, fine_ratio or 0.0, generator)
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
        **split_rates(splits, content, item),
    }


def split_rates(splits: torch.Tensor, content: torch.Tensor, item: torch.Tensor | None = None) -> dict[str, float]:
    """How often `(N, Nc)` decisions split the item's regions (`split_rate_content`; `item` defaults to every region
    with `content`), and, where there are any, empty regions (`split_rate_empty`) and content outside the item
    (`split_rate_clutter`: clutter fragments, or a textured background, where no region is empty)."""
    item = content if item is None else item
    groups = {"split_rate_content": item, "split_rate_empty": ~content, "split_rate_clutter": content & ~item}
    return {name: splits[regions].float().mean().item() for name, regions in groups.items() if regions.any()}


@torch.no_grad()
def split_probabilities(model: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`(N, Nc)` split probabilities of an MSViT's gate, from the gate alone."""
    model.eval()
    gate_logits = model.base_model.embeddings.predict_split_logits
    return torch.cat([torch.sigmoid(gate_logits(batch)) for batch in pixel_values.split(batch_size)])
