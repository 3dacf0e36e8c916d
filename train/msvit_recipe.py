"""The MSViT recipe on a trained ViT, as keyword arguments of `ClassificationArguments` (`train/run_classification.py`)
or `SegmentationArguments` (`train/run_segmentation.py`).

1. `gate`: convert the ViT with `from_vit` (size-aware attention on, so the frozen backbone already reads mixed
   layouts correctly), freeze it, and train the gate. The default objective is the counterfactual one: the gate's
   logit regresses the measured loss drop of splitting each flipped region (one extra no-grad forward per step, no
   backward pass through the backbone). The paper's straight-through objective (`objective="straight_through"`) trains
   on the masked path with the DynamicViT masked softmax and the ratio budget loss at weight 20.
2. `joint`: fine-tune everything with the gate's own decisions.

An `adapt` stage (fine-tuning the converted ViT on random splits before the gate) is kept as an option,
`epochs["adapt"] > 0`: it made up for the missing size-aware attention bias, and the gate study measures whether it
still pays (`experiments/gate_study.py`).

Evaluation uses the fixed budget (`fine_ratio_budget`): every image gets exactly `round(ratio * N_c)` split regions,
the ones with the highest gate logits.
"""

import math


# How a learned gate trains, as MSViT config fields: counterfactual region flips on the gathered path; the residual
# gate, the same objective on a gate that starts as a training-free rule (`gate_residual_rule`, chosen per backbone:
# `residual_gate_recipe`), reads the full-resolution region, measures 8 flips per image from one shared layout pass
# (a lower-variance target) and, with more than two patch sizes, has one prior logit for every level; or the paper's
# straight-through estimator on the masked path with the masked softmax and the weighted budget loss. `gate_study.py`
# and the demo build models from these; the scripts get them as arguments (`gate_training_args`).
COUNTERFACTUAL = dict(gate_objective="counterfactual", train_token_path="gathered")
GATE_RECIPES = {
    "counterfactual": COUNTERFACTUAL,
    "residual": dict(COUNTERFACTUAL, gate_input="pixels", counterfactual_flips=8, gate_prior_per_level=False),
    "straight_through": dict(
        gate_objective="straight_through",
        gate_loss_type="ratio",
        gate_loss_weight=20.0,
        train_token_path="masked",
        masked_path_attention="masked_softmax",
    ),
}
GATE_LEARNING_RATES = {"counterfactual": 1e-2, "residual": 1e-2, "straight_through": 1e-3}
LEARNING_RATES = {"adapt": 2e-4, "joint": 2e-4}


def residual_gate_recipe(rule: str) -> dict:
    """The residual gate's config fields on a backbone whose best training-free rule (on validation) is `rule`."""
    return dict(GATE_RECIPES["residual"], gate_residual_rule=rule)


def predicted_drop_threshold(config, drop: float) -> float:
    """The split-probability threshold of a counterfactual gate that splits where the predicted loss drop exceeds
    `drop` nats: its logit is `counterfactual_target_scale` times the predicted drop."""
    return 1 / (1 + math.exp(-config.counterfactual_target_scale * drop))


def budget_args(ratio: float) -> dict:
    """Aim the gate at `ratio` and evaluate with exactly that fraction of regions split."""
    return dict(target_fine_ratio=ratio, fine_ratio_budget=ratio)


def gate_training_args(
    objective: str = "counterfactual", gate_loss_type: str = "ratio", gate_loss_weight: float = 20.0
) -> dict:
    """`GATE_RECIPES[objective]` as training-script arguments; the budget loss's type and weight apply to the
    straight-through objective."""
    if objective not in GATE_RECIPES:
        raise ValueError(f"Unknown gate objective {objective!r}; choose from {tuple(GATE_RECIPES)}.")
    recipe = dict(GATE_RECIPES[objective])
    if objective == "straight_through":
        recipe.update(gate_loss_type=gate_loss_type, gate_loss_weight=gate_loss_weight)
    return recipe


def msvit_stage_args(
    backbone: str,
    folders: dict[str, str],
    ratio: float,
    epochs: dict[str, int],
    objective: str = "counterfactual",
    gate_loss_type: str = "ratio",
    gate_loss_weight: float = 20.0,
    stage_extra: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Stage name (`adapt` when `epochs["adapt"] > 0`, `gate`, `joint`) -> arguments, for output folders
    `folders[stage]`.

    `backbone` is a ViT folder; each stage starts from `<folders[previous stage]>/model`. `stage_extra` adds
    arguments to a stage (ablations)."""
    adapt = epochs.get("adapt", 0) > 0
    stage_args = {
        "adapt": dict(stage="joint", split_policy="random", train_token_path="gathered"),
        "gate": dict(stage="gate", **gate_training_args(objective, gate_loss_type, gate_loss_weight)),
        "joint": dict(stage="joint"),
    }
    if not adapt:
        del stage_args["adapt"]
    sources = {
        "adapt": backbone,
        "gate": f"{folders['adapt']}/model" if adapt else backbone,
        "joint": f"{folders['gate']}/model",
    }
    learning_rates = {**LEARNING_RATES, "gate": GATE_LEARNING_RATES[objective]}
    return {
        stage: {
            **args,
            "model_name_or_path": sources[stage],
            **budget_args(ratio),
            "learning_rate": learning_rates[stage],
            "num_train_epochs": epochs[stage],
            **(stage_extra or {}).get(stage, {}),
        }
        for stage, args in stage_args.items()
    }
