"""Training recipes (`configuration/training/`, read by `msvit.train.arguments.parse_arguments`) and Accelerate launch
configs (`configuration/accelerate/`): every recipe is accepted by the script it is written for, flags override it,
bad recipes and arguments are refused with a message that says what to fix, and each Accelerate config gives the
environment `accelerate launch` would hand to the script."""

import json
import re
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers import HfArgumentParser, ViTConfig, ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from msvit.experiments.segmentation_pipeline import SegmentationPipelineArguments, training_stages
from msvit.train.arguments import load_recipe, parse_arguments
from msvit.train.msvit_recipe import msvit_stage_args
from msvit.train.run_classification import ClassificationArguments, train_classifier
from msvit.train.run_segmentation import SegmentationArguments
from msvit.train.training_loop import msvit_overrides
from tests.conftest import tiny_config


REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_DIR = REPO_ROOT / "configuration" / "training"
ACCELERATE_DIR = REPO_ROOT / "configuration" / "accelerate"
RECIPES = sorted(TRAINING_DIR.glob("*.yaml")) + sorted(TRAINING_DIR.glob("*.json"))
ACCELERATE_CONFIGS = sorted(ACCELERATE_DIR.glob("*.yaml"))

# what each recipe must set (the rest of its arguments keep the script's defaults)
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


def script_arguments(path):
    """The arguments dataclass of the script a recipe is written for."""
    return SegmentationArguments if path.stem.startswith("segmentation-") else ClassificationArguments


def parse(dataclass_type, *argv):
    return parse_arguments(dataclass_type, list(argv))


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_recipe_is_accepted_by_its_training_script(path):
    dataclass_type = script_arguments(path)
    parsed = parse(dataclass_type, "--config", str(path), "--output_dir", "x")
    assert isinstance(parsed, dataclass_type) and parsed.output_dir == "x"
    for key, value in EXPECTED.get(path.stem, {}).items():
        assert getattr(parsed, key) == value, key
    # every value comes from the recipe or, where it says nothing, from the script's defaults
    recipe = yaml.safe_load(path.read_text())
    defaults = dataclass_type(output_dir="x")
    for field in fields(dataclass_type):
        expected = recipe[field.name] if field.name in recipe else getattr(defaults, field.name)
        assert getattr(parsed, field.name) == expected, field.name


@pytest.mark.parametrize("stage", ["gate", "joint"])
def test_yaml_recipes_are_the_python_msvit_recipe(stage):
    """The YAML files and train/msvit_recipe.py (used by msvit.experiments.evidence) train the same way."""
    folders = {"gate": "outputs/translated-fmnist-gate"}
    backbone = "outputs/translated-fmnist-backbone-fine/model"
    stage_extra = {"gate": {"coarse_patch_size": 16}}
    python_args = msvit_stage_args(backbone, folders, 0.5, {"gate": 1, "joint": 2}, stage_extra=stage_extra)[stage]
    from_python = ClassificationArguments(**python_args, output_dir="x")
    from_yaml = parse(
        ClassificationArguments, "--config", str(TRAINING_DIR / f"translated-fmnist-{stage}.yaml"), "--output_dir", "x"
    )
    assert from_python == from_yaml


@pytest.mark.parametrize("stage", ["fine", "gate", "joint"])
def test_segmentation_yaml_recipes_are_the_pipeline_stages(stage):
    """The segmentation YAML files train as `make segmentation` (experiments/segmentation_pipeline.py at its defaults,
    linear decoder) does: the same arguments but for the folders, the pipeline's export and test switches and the
    YAML's checkpoints."""
    stages = training_stages(SegmentationPipelineArguments(), "linear")
    # no adapt stage; the second gate stage is the first on another backbone
    assert list(stages) == ["full-token", "all-coarse", "gate", "joint", "full-token-matched", "gate-on-matched"]
    assert stages["gate-on-matched"] == {
        **stages["gate"],
        "model_name_or_path": stages["gate-on-matched"]["model_name_or_path"],
    }
    assert stages["gate-on-matched"]["model_name_or_path"].endswith("full-token-matched/model")
    pipeline_stage = {"fine": "full-token", "gate": "gate", "joint": "joint"}[stage]
    from_pipeline = asdict(SegmentationArguments(**stages[pipeline_stage], output_dir="x"))
    from_yaml = asdict(
        parse(SegmentationArguments, "--config", str(TRAINING_DIR / f"segmentation-{stage}.yaml"), "--output_dir", "x")
    )
    ignored = {"model_name_or_path", "skip_export", "skip_test", "checkpointing_steps"}
    assert {key: value for key, value in from_pipeline.items() if key not in ignored} == {
        key: value for key, value in from_yaml.items() if key not in ignored
    }


def test_command_line_flags_override_the_recipe():
    recipe = str(TRAINING_DIR / "translated-fmnist-gate.yaml")
    # before or after --config: the command line wins, the recipe's other values stay
    for argv in (
        ["--config", recipe, "--model_name_or_path", "elsewhere", "--learning_rate", "0.02", "--output_dir", "x"],
        ["--model_name_or_path", "elsewhere", "--learning_rate", "0.02", "--config", recipe, "--output_dir", "x"],
    ):
        parsed = parse(ClassificationArguments, *argv)
        assert parsed.model_name_or_path == "elsewhere" and parsed.learning_rate == 0.02
        assert parsed.stage == "gate" and parsed.fine_ratio_budget == 0.5 and parsed.coarse_patch_size == 16
        assert parsed.per_device_train_batch_size == 128 and parsed.gate_objective == "counterfactual"
    # flags the recipe does not set keep the script's defaults
    assert parsed.weight_decay == 0.05 and parsed.seed == 0 and parsed.split_policy == "gate"


@pytest.mark.parametrize(
    ("stage", "flags", "layouts"),
    [
        ("gate", [], "uniform"),  # a frozen backbone: the gate learns each region's value in every context
        ("joint", [], "gate"),  # the backbone trains: on the layouts the gate will choose
        ("scratch", [], "gate"),
        ("joint", ["--counterfactual_layouts", "uniform"], "uniform"),  # the flag wins
        ("backbone", [], None),  # a plain ViT: no MSViT field
    ],
)
def test_counterfactual_layouts_follow_the_stage(stage, flags, layouts):
    parsed = parse(ClassificationArguments, "--stage", stage, "--model_name_or_path", "x", *flags, "--output_dir", "x")
    assert msvit_overrides(parsed).get("counterfactual_layouts") == layouts


def test_a_shipped_recipe_is_found_by_name(tmp_path, monkeypatch):
    by_path = parse(
        ClassificationArguments, "--config", str(TRAINING_DIR / "translated-fmnist-gate.yaml"), "--output_dir", "x"
    )
    monkeypatch.chdir(tmp_path)  # names resolve from the package, not the working directory
    assert parse(ClassificationArguments, "--config", "translated-fmnist-gate", "--output_dir", "x") == by_path
    (tmp_path / "translated-fmnist-gate").mkdir()  # an existing path is never replaced by a shipped recipe
    with pytest.raises(
        ValueError, match=r"or the name of a shipped one \(segmentation-fine, .*translated-fmnist-joint\)"
    ):
        load_recipe(HfArgumentParser(ClassificationArguments), "translated-fmnist-gate")


def test_yaml_and_json_recipes_give_the_same_values(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "stage: scratch\nlearning_rate: 1e-3  # YAML reads this as text: the flag's type converts it\n"
        "patch_size: 8\nno_hflip: true\nskip_test: false\ngate_threshold:\ngate_type: entropy\n"
    )
    values = {"stage": "scratch", "learning_rate": 0.001, "patch_size": 8, "no_hflip": True, "skip_test": False}
    (tmp_path / "r.json").write_text(json.dumps({**values, "gate_threshold": None, "gate_type": "entropy"}))
    from_yaml = parse(ClassificationArguments, "--config", str(tmp_path / "r.yaml"), "--output_dir", "x")
    from_json = parse(ClassificationArguments, "--config", str(tmp_path / "r.json"), "--output_dir", "x")
    assert from_yaml == from_json
    assert (from_json.stage, from_json.learning_rate, from_json.patch_size) == ("scratch", 0.001, 8)
    assert from_json.no_hflip is True and from_json.skip_test is False and from_json.gate_threshold is None
    assert from_json.gate_type == "entropy" and isinstance(from_yaml.learning_rate, float)
    # `.yml` is YAML too
    (tmp_path / "r.yml").write_text((tmp_path / "r.yaml").read_text())
    assert parse(ClassificationArguments, "--config", str(tmp_path / "r.yml"), "--output_dir", "x") == from_yaml


def test_bool_flags_on_the_command_line_and_in_recipes(tmp_path):
    assert parse(ClassificationArguments, "--stage", "scratch", "--output_dir", "x").no_hflip is False
    bare = parse(ClassificationArguments, "--stage", "scratch", "--no_hflip", "--skip_test", "--output_dir", "x")
    assert bare.no_hflip is True and bare.skip_test is True and bare.skip_export is False
    (tmp_path / "flip.yaml").write_text("stage: scratch\nno_hflip: true\nskip_export: true\n")
    config = ["--config", str(tmp_path / "flip.yaml"), "--output_dir", "x"]
    from_recipe = parse(ClassificationArguments, *config)
    assert from_recipe.no_hflip is True and from_recipe.skip_export is True
    # a recipe's true is turned off with an explicit value
    overridden = parse(ClassificationArguments, *config, "--no_hflip", "false")
    assert overridden.no_hflip is False and overridden.skip_export is True
    segmentation = parse(SegmentationArguments, "--eval_only", "--model_name_or_path", "m", "--output_dir", "x")
    assert segmentation.eval_only is True and segmentation.stage is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("stage: scratch\nlerning_rate: 0.1\n", "lerning_rate"),
        ("stage: scratch\nlearning-rate: 0.1\n", "learning-rate"),
        ("- stage\n- scratch\n", "not a recipe"),
        ("# nothing\n", "not a recipe"),
        ("stage: [scratch\n", "not a recipe"),
    ],
)
def test_bad_recipes_are_refused_with_the_file_and_the_allowed_keys(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_recipe(HfArgumentParser(ClassificationArguments), path)
    assert str(path) in str(error.value) and "allowed keys: " in str(error.value)
    assert "learning_rate, " in str(error.value) and "num_gate_map_images" in str(error.value)
    # on the command line: argparse's usage error, exit status 2
    with pytest.raises(SystemExit) as exit_info:
        parse(ClassificationArguments, "--config", str(path), "--output_dir", "x")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_recipe_files_that_cannot_be_read(tmp_path):
    parser = HfArgumentParser(ClassificationArguments)
    with pytest.raises(ValueError, match="cannot read the recipe"):
        load_recipe(parser, tmp_path / "missing.yaml")
    (tmp_path / "recipe.toml").write_text("stage = 'scratch'\n")
    with pytest.raises(ValueError, match=r"a recipe is a \.yaml, \.yml or \.json file"):
        load_recipe(parser, tmp_path / "recipe.toml")
    (tmp_path / "bad.json").write_text("{stage: scratch}")
    with pytest.raises(ValueError, match="bad.json is not a recipe of ClassificationArguments"):
        load_recipe(parser, tmp_path / "bad.json")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(stage="scratch"), "--output_dir is required"),
        (dict(output_dir="x"), "--stage is required: one of backbone, gate, joint, scratch"),
        (dict(stage="gate", output_dir="x"), "--stage gate needs --model_name_or_path"),
        (dict(stage="joint", output_dir="x"), "--stage joint needs --model_name_or_path"),
        (dict(stage="backbone", split_policy="random", output_dir="x"), "--stage joint or scratch"),
        (dict(stage="bakbone", output_dir="x"), "--stage is 'bakbone'; choose one of backbone, gate, joint, scratch"),
        (dict(stage="scratch", mixed_precision="fp8", output_dir="x"), "--mixed_precision is 'fp8'"),
    ],
)
def test_classification_validate_says_what_is_expected(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClassificationArguments(**arguments).validate()
    # the typed entry point refuses them before starting anything
    with pytest.raises(ValueError, match=re.escape(message)):
        train_classifier(ClassificationArguments(**arguments))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(stage="scratch", model_name_or_path="m"), "random weights; use --stage joint"),
        (dict(stage="gate", model_name_or_path="m", split_policy="all_fine"), "--split_policy replaces the gate"),
        (dict(stage="gate"), "--stage gate needs --model_name_or_path"),
        (dict(), "--stage is required (one of scratch, gate, joint) unless --eval_only"),
        (dict(eval_only=True), "--eval_only needs --model_name_or_path"),
        (dict(eval_only=True, model_name_or_path="m", eval_budgets=["0.5", "1.5"]), "'1.5' is not a budget"),
        (dict(stage="scratch", decoder_type="fpn"), "--decoder_type is 'fpn'; choose one of linear, mask_transformer"),
    ],
)
def test_segmentation_validate_says_what_is_expected(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SegmentationArguments(**arguments, output_dir="x").validate()


def test_validate_errors_are_usage_errors_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(ClassificationArguments, "--stage", "gate", "--output_dir", "x")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "error: --stage gate needs --model_name_or_path" in err
    # choices are checked for a recipe's values too (argparse checks only the command line's)
    (tmp_path / "typo.yaml").write_text("stage: bakbone\n")
    with pytest.raises(SystemExit):
        parse(ClassificationArguments, "--config", str(tmp_path / "typo.yaml"), "--output_dir", "x")
    assert "--stage is 'bakbone'" in capsys.readouterr().err
    # and the recipe does not stand in for a missing --output_dir
    with pytest.raises(SystemExit):
        parse(ClassificationArguments, "--config", str(TRAINING_DIR / "translated-fmnist-gate.yaml"))
    assert "--output_dir is required" in capsys.readouterr().err


def test_help_lists_the_recipe_and_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(SegmentationArguments, "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--stage", "--eval_budgets", "--no_hflip", "--per_device_train_batch_size"):
        assert flag in out
    assert "Batch size per process, training. (default: 64)" in " ".join(out.split())


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
