"""The MSViT recipe on a trained ViT, as `train/run_classification.py` arguments of its three stages.

1. `adapt`: fine-tune the ViT (converted to MSViT) with **random** splits at the target fine ratio (on the gathered
   path: with forced decisions there is no gate to reach, so only the active tokens are computed). A backbone trained
   on fine tokens alone has never seen a coarse token: on it, every mix of coarse and fine tokens is equally out of
   distribution, so a gate trained there learns nothing about which regions matter.
2. `gate`: freeze that backbone and train the gate with the compute-budget loss. The DynamicViT masked softmax lets the
   task loss reach the gate through both alternatives of a region; the budget loss needs a large weight (here 20):
   it is averaged over all `B x N_c` regions while the task loss is averaged over `B` images, and the task loss
   alone prefers splitting every region.
3. `joint`: fine-tune everything with the gate's own decisions.

Evaluation uses the fixed budget (`--fine_ratio_budget`): every image gets exactly `round(ratio * N_c)` split regions,
the ones with the highest gate logits.
"""

LEARNING_RATES = {"adapt": "2e-4", "gate": "1e-3", "joint": "2e-4"}


def budget_args(ratio: float) -> list[str]:
    """Aim the gate loss at `ratio` and evaluate with exactly that fraction of regions split."""
    return ["--target_fine_ratio", str(ratio), "--fine_ratio_budget", str(ratio)]


def gate_training_args(gate_loss_type: str = "ratio", gate_loss_weight: float = 20.0) -> list[str]:
    """How a learned gate trains: masked path with the masked softmax, and the weighted budget loss."""
    return [
        "--gate_loss_type", gate_loss_type, "--gate_loss_weight", str(gate_loss_weight),
        "--train_token_path", "masked", "--masked_path_attention", "masked_softmax",
    ]  # fmt: skip


def msvit_stage_args(
    backbone: str,
    folders: dict[str, str],
    ratio: float,
    epochs: dict[str, int],
    gate_loss_type: str = "ratio",
    gate_loss_weight: float = 20.0,
    stage_extra: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Stage name (`adapt`, `gate`, `joint`) -> arguments, for output folders `folders[stage]`.

    `backbone` is a ViT folder; each stage starts from `<folders[previous stage]>/model`. `stage_extra` appends
    arguments to a stage (ablations)."""
    sources = {"adapt": backbone, "gate": f"{folders['adapt']}/model", "joint": f"{folders['gate']}/model"}
    stage_args = {
        "adapt": ["--stage", "joint", "--split_policy", "random", "--train_token_path", "gathered"],
        "gate": ["--stage", "gate", *gate_training_args(gate_loss_type, gate_loss_weight)],
        "joint": ["--stage", "joint"],
    }  # fmt: skip
    return {
        stage: [
            *args,
            "--model_name_or_path",
            sources[stage],
            *budget_args(ratio),
            "--learning_rate",
            LEARNING_RATES[stage],
            "--num_train_epochs",
            str(epochs[stage]),
            *(stage_extra or {}).get(stage, []),
        ]  # fmt: skip
        for stage, args in stage_args.items()
    }
