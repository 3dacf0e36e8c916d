"""Training recipes (`configuration/training/`, `msvit.train.recipes`) and Accelerate launch configs
(`configuration/accelerate/`): every file loads, the recipes' arguments are accepted by
`msvit.train.run_classification`, and each Accelerate config gives the environment `accelerate launch` would hand
to the script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers import ViTConfig, ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from msvit.experiments.segmentation_pipeline import SegmentationPipelineArguments, training_stages
from msvit.train.msvit_recipe import msvit_stage_args
from msvit.train.recipes import RecipeError, load_recipe, recipe_to_args
from msvit.train.run_classification import parse_args
from msvit.train.run_segmentation import parse_args as parse_segmentation_args
from tests.conftest import tiny_config


REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_DIR = REPO_ROOT / "configuration" / "training"
ACCELERATE_DIR = REPO_ROOT / "configuration" / "accelerate"
RECIPES = sorted(TRAINING_DIR.glob("*.yaml")) + sorted(TRAINING_DIR.glob("*.json"))
ACCELERATE_CONFIGS = sorted(ACCELERATE_DIR.glob("*.yaml"))

# what each recipe must set (the rest of its arguments keep run_classification's defaults)
EXPECTED = {
    "translated-fmnist-backbone-fine": dict(
        stage="backbone",
        dataset="translated_fashion_mnist",
        patch_size=8,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_train_epochs=20,
        per_device_train_batch_size=128,
        learning_rate=1e-3,
    ),
    "translated-fmnist-backbone-coarse": dict(
        stage="backbone",
        dataset="translated_fashion_mnist",
        patch_size=16,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_train_epochs=20,
        per_device_train_batch_size=128,
        learning_rate=1e-3,
    ),
    "translated-fmnist-gate": dict(
        stage="gate",
        dataset="translated_fashion_mnist",
        learning_rate=1e-2,
        num_train_epochs=1,
        target_fine_ratio=0.5,
        fine_ratio_budget=0.5,
        gate_objective="counterfactual",
        train_token_path="gathered",
        model_name_or_path="outputs/translated-fmnist-backbone-fine/model",
    ),
    "translated-fmnist-joint": dict(
        stage="joint",
        dataset="translated_fashion_mnist",
        learning_rate=2e-4,
        num_train_epochs=2,
        fine_ratio_budget=0.5,
        model_name_or_path="outputs/translated-fmnist-gate/model",
    ),
    "segmentation-fine": dict(
        stage="scratch",
        split_policy="all_fine",
        dataset="fashion_mnist_scenes",
        patch_size=8,
        coarse_patch_size=16,
        decoder_type="linear",
        num_train_epochs=6,
        learning_rate=1e-3,
    ),
    "segmentation-gate": dict(
        stage="gate",
        learning_rate=1e-2,
        num_train_epochs=1,
        fine_ratio_budget=0.4,
        gate_objective="counterfactual",
        train_token_path="gathered",
        model_name_or_path="outputs/segmentation-fine/model",
    ),
    "segmentation-joint": dict(
        stage="joint",
        learning_rate=2e-4,
        num_train_epochs=3,
        fine_ratio_budget=0.4,
        model_name_or_path="outputs/segmentation-gate/model",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# training recipes


def test_every_expected_recipe_exists():
    assert {path.stem for path in RECIPES} >= set(EXPECTED)


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_recipe_arguments_are_accepted_by_the_training_script(path):
    args = load_recipe(path)
    assert args and all(isinstance(arg, str) for arg in args)
    # each recipe goes to the script it is written for
    script_parse_args = parse_segmentation_args if path.stem.startswith("segmentation-") else parse_args
    parsed = script_parse_args([*args, "--output_dir", "x"])
    assert parsed.output_dir == "x"
    for key, value in EXPECTED.get(path.stem, {}).items():
        assert getattr(parsed, key) == value, key


@pytest.mark.parametrize("stage", ["gate", "joint"])
def test_yaml_recipes_are_the_python_msvit_recipe(stage):
    """The YAML files and train/msvit_recipe.py (used by msvit.experiments.evidence) train the same way."""
    folders = {"gate": "outputs/translated-fmnist-gate"}
    backbone = "outputs/translated-fmnist-backbone-fine/model"
    stage_extra = {"gate": ["--coarse_patch_size", "16"]}
    python_args = msvit_stage_args(backbone, folders, 0.5, {"gate": 1, "joint": 2}, stage_extra=stage_extra)[stage]
    from_python = vars(parse_args([*python_args, "--output_dir", "x"]))
    from_yaml = vars(
        parse_args(["--config", str(TRAINING_DIR / f"translated-fmnist-{stage}.yaml"), "--output_dir", "x"])
    )
    assert from_python == {**from_yaml, "config": None}


@pytest.mark.parametrize("stage", ["fine", "gate", "joint"])
def test_segmentation_yaml_recipes_are_the_pipeline_stages(stage):
    """The segmentation YAML files train as `make segmentation` (experiments/segmentation_pipeline.py at its defaults,
    linear decoder) does: the same arguments but for the folders, the pipeline's export and test switches and the
    YAML's checkpoints."""
    stages = training_stages(SegmentationPipelineArguments(), "linear")
    assert list(stages) == ["full-token", "all-coarse", "gate", "joint", "full-token-matched"]  # no adapt stage
    pipeline_stage = {"fine": "full-token", "gate": "gate", "joint": "joint"}[stage]
    from_pipeline = vars(parse_segmentation_args([*stages[pipeline_stage], "--output_dir", "x"]))
    from_yaml = vars(
        parse_segmentation_args(["--config", str(TRAINING_DIR / f"segmentation-{stage}.yaml"), "--output_dir", "x"])
    )
    ignored = {"config", "model_name_or_path", "skip_export", "skip_test", "checkpointing_steps"}
    assert {key: value for key, value in from_pipeline.items() if key not in ignored} == {
        key: value for key, value in from_yaml.items() if key not in ignored
    }


def test_command_line_arguments_after_a_recipe_win():
    args = load_recipe(TRAINING_DIR / "translated-fmnist-gate.yaml")
    parsed = parse_args([*args, "--model_name_or_path", "elsewhere", "--learning_rate", "0.01", "--output_dir", "x"])
    assert parsed.model_name_or_path == "elsewhere" and parsed.learning_rate == 0.01


def test_recipe_values_become_arguments(tmp_path):
    recipe = {"stage": "scratch", "learning_rate": 0.001, "patch_size": 8, "no_hflip": True, "skip_test": False}
    recipe["gate_threshold"] = None
    expected = ["--stage", "scratch", "--learning_rate", "0.001", "--patch_size", "8", "--no_hflip"]
    assert recipe_to_args(recipe) == expected
    (tmp_path / "r.yaml").write_text(
        "stage: scratch\nlearning_rate: 1.0e-3\npatch_size: 8\nno_hflip: true\nskip_test: false\ngate_threshold:\n"
    )
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    assert load_recipe(tmp_path / "r.yaml") == expected == load_recipe(tmp_path / "r.json")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_recipe(tmp_path / "empty.yaml") == []
    assert parse_args([*expected, "--output_dir", "x"]).no_hflip


@pytest.mark.parametrize(
    "recipe, message",
    [
        (["--stage", "gate"], "mapping"),
        ({"--stage": "gate"}, "without dashes"),
        ({"learning-rate": 0.1}, "not a flag name"),
        ({"dataset": ["a", "b"]}, "holds a list"),
        ({"learning_rate": float("nan")}, "non-finite"),
    ],
)
def test_bad_recipes_are_rejected_with_the_key(recipe, message):
    with pytest.raises(RecipeError, match=message):
        recipe_to_args(recipe)


def test_recipes_command_line(tmp_path):
    path = TRAINING_DIR / "translated-fmnist-backbone-fine.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "msvit.train.recipes", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == load_recipe(path)
    (tmp_path / "spaces.yaml").write_text("dataset: imagefolder:/data/my images\n")
    result = subprocess.run(
        [sys.executable, "-m", "msvit.train.recipes", str(tmp_path / "spaces.yaml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "word splitting" in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Accelerate launch configs


def launch_environment(config_file: Path, *cli: str) -> tuple[object, dict[str, str]]:
    """The parsed arguments and the environment `accelerate launch --config_file <config_file> <cli> -m
    msvit.train.run_classification` would start the script with (nothing is started)."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(config_file), *cli, "-m", "msvit.train.run_classification", "--stage", "scratch"]
    )
    args, _, _ = _validate_launch_command(args)
    if args.use_fsdp or args.multi_gpu:
        return args, prepare_multi_gpu_env(args)
    _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


def test_every_expected_accelerate_config_exists():
    assert {path.name for path in ACCELERATE_CONFIGS} >= {"cpu.yaml", "multi_gpu_ddp.yaml", "fsdp.yaml"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_config_loads_and_launches(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    # every fsdp_config key must be a launch option: `accelerate launch` copies unknown ones without a word
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= launch_options
    args, env = launch_environment(path)
    assert env["ACCELERATE_MIXED_PRECISION"] == config.mixed_precision
    assert int(args.num_processes) == config.num_processes


def test_cpu_config():
    config = load_config_from_file(str(ACCELERATE_DIR / "cpu.yaml"))
    assert config.distributed_type == DistributedType.NO and config.use_cpu and config.num_processes == 1
    args, env = launch_environment(ACCELERATE_DIR / "cpu.yaml")
    assert env["ACCELERATE_USE_CPU"] == "True" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert not (args.multi_gpu or args.use_fsdp)


def test_multi_gpu_ddp_config():
    config = load_config_from_file(str(ACCELERATE_DIR / "multi_gpu_ddp.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU and not config.use_cpu
    args, env = launch_environment(ACCELERATE_DIR / "multi_gpu_ddp.yaml")
    assert args.multi_gpu and args.nproc_per_node == "8" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_USE_FSDP" not in env


def fsdp_wrapped(env: dict[str, str], model) -> list[str]:
    """Names of the modules the launch environment's FSDP2 auto-wrap policy gives their own FSDP unit."""
    with patch_environment(**{key: value for key, value in env.items() if key.startswith("FSDP_")}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.reshard_after_forward is True and not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return [name for name, module in model.named_modules() if policy(module)]


def test_fsdp_config_wraps_each_transformer_layer():
    config = load_config_from_file(str(ACCELERATE_DIR / "fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "bf16"
    args, env = launch_environment(ACCELERATE_DIR / "fsdp.yaml")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"

    msvit = MSViTForImageClassification(tiny_config(num_hidden_layers=3))
    wrapped = fsdp_wrapped(env, msvit)
    assert len(wrapped) == 3
    assert all(type(msvit.get_submodule(name)).__name__ == "MSViTLayer" for name in wrapped)

    # --stage backbone trains a transformers ViT: the documented command-line override wraps its layers instead
    vit = ViTForImageClassification(
        ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    )
    _, vit_env = launch_environment(ACCELERATE_DIR / "fsdp.yaml", "--fsdp_transformer_layer_cls_to_wrap", "ViTLayer")
    wrapped = fsdp_wrapped(vit_env, vit)
    assert len(wrapped) == 2 and all(type(vit.get_submodule(name)).__name__ == "ViTLayer" for name in wrapped)
    with pytest.raises(ValueError, match="MSViTLayer"):  # why the file does not list both classes
        fsdp_wrapped(env, vit)
