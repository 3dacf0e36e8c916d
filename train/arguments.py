"""The training scripts' arguments as dataclasses, and `parse_arguments`, which reads them with
`transformers.HfArgumentParser` from the command line and a `--config` recipe.

`run_classification.ClassificationArguments` and `run_segmentation.SegmentationArguments` compose the groups below
(data, model, MSViT gate and budget, optimisation, bookkeeping) through `CommonArguments` and add their own fields.
A field is at once a flag (`patch_size` -> `--patch_size 8`), a key of a recipe (`configuration/training/*.yaml`:
`patch_size: 8`) and a keyword of the dataclass, so a run is started either way:

    python -m msvit.train.run_classification --config configuration/training/translated-fmnist-gate.yaml \
        --output_dir outputs/translated-fmnist-gate
    train_classifier(ClassificationArguments(stage="backbone", output_dir="outputs/vit"))  # run_classification.py

A recipe's values replace the defaults and flags given on the command line win over them; a key that is not a field
is an error. `validate()` checks what a single field cannot (required fields, combinations); the scripts call it
before anything runs.
"""

from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml
from transformers import HfArgumentParser

from msvit.configuration import RECIPES_DIR
from msvit.train.split_policies import SplitPolicy


@dataclass(kw_only=True)
class DataArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files (default: the Debian package's)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a fixed random subset of this size."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on fixed random subsets of this size."}
    )
    no_hflip: bool = field(default=False, metadata={"help": "Disable random horizontal flips in training."})


@dataclass(kw_only=True)
class ModelArguments:
    patch_size: int = field(default=8, metadata={"help": "(Fine) patch size of a new model."})
    coarse_patch_size: int | None = field(
        default=None, metadata={"help": "MSViT coarse patch size (default: twice the patch size)."}
    )
    patch_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": "MSViT with more than two patch sizes, finest first from --patch_size, e.g. 16 32 64 (replaces "
            "--coarse_patch_size; a region tree decided top-down)."
        },
    )
    hidden_size: int = field(default=128, metadata={"help": "Width of a new model."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Depth of a new model."})
    num_attention_heads: int = field(default=4, metadata={"help": "Heads of a new model."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "MLP size of a new model (default: 4 x width)."}
    )

    def scale_fields(self) -> dict:
        """The MSViT config fields of the patch sizes these arguments set: `patch_sizes`, else `coarse_patch_size`
        (nothing when neither is given)."""
        if self.patch_sizes:
            if self.patch_sizes[0] != self.patch_size:
                raise ValueError(
                    f"--patch_sizes starts at the finest patch, --patch_size ({self.patch_size}); got "
                    f"{self.patch_sizes}."
                )
            return {"patch_sizes": list(self.patch_sizes)}
        return {"coarse_patch_size": self.coarse_patch_size} if self.coarse_patch_size else {}

    @property
    def largest_patch_size(self) -> int:
        """The largest MSViT patch, which image sizes are rounded up to."""
        if self.patch_sizes:
            return self.patch_sizes[-1]
        return self.coarse_patch_size or 2 * self.patch_size


@dataclass(kw_only=True)
class MSViTArguments:
    """MSViT config fields (None keeps the model's own value), the split policy and the inference budget."""

    target_fine_ratio: float | None = field(
        default=None,
        metadata={"help": "MSViT, straight-through objective: fraction of regions the gate loss aims to split."},
    )
    gate_type: Literal["learned", "entropy", "std"] | None = field(
        default=None,
        metadata={"help": "MSViT: the learned gate, or a training-free rule on the region's pixels (entropy, std)."},
    )
    gate_residual_rule: Literal["std", "entropy"] | None = field(
        default=None,
        metadata={
            "help": "MSViT learned gate: start as this training-free rule and learn a correction (residual gate)."
        },
    )
    gate_input: Literal["downscaled_pixels", "pixels", "neighbourhood", "coarse_embedding"] | None = field(
        default=None,
        metadata={
            "help": "MSViT learned gate: what it reads of each region (pixels: at full resolution; neighbourhood: "
            "also the 3 x 3 regions around it, downscaled)."
        },
    )
    gate_objective: Literal["counterfactual", "straight_through"] | None = field(
        default=None,
        metadata={
            "help": "MSViT: how the gate learns: counterfactual region flips, or the paper's straight-through + "
            "budget loss."
        },
    )
    counterfactual_flips: int | None = field(
        default=None, metadata={"help": "MSViT counterfactual objective: regions flipped per image."}
    )
    counterfactual_target: Literal["task_loss", "all_fine_kl"] | None = field(
        default=None,
        metadata={
            "help": "MSViT counterfactual objective: the flips' loss drop measured on the task loss, or label-free "
            "as the KL divergence from the all-fine prediction."
        },
    )
    counterfactual_target_scale: float | None = field(
        default=None, metadata={"help": "MSViT counterfactual objective: logit = scale x loss drop."}
    )
    counterfactual_layouts: Literal["uniform", "gate"] | None = field(
        default=None,
        metadata={
            "help": "MSViT counterfactual objective: training layouts uniformly random or by the gate's ranking "
            "(default: uniformly random in the gate stage, by the gate's ranking in the joint and scratch stages, "
            "where the backbone learns to read them)."
        },
    )
    no_size_aware_attention: bool = field(
        default=False,
        metadata={
            "help": "MSViT ablation: no log(r^2) attention bias on coarse keys (the behaviour of models saved before "
            "it)."
        },
    )
    gate_loss_type: Literal["gbas", "bas", "ratio"] | None = field(
        default=None, metadata={"help": "MSViT straight-through objective: budget loss."}
    )
    gate_loss_weight: float | None = field(default=None, metadata={"help": "MSViT: weight of the gate loss."})
    train_token_path: Literal["masked", "gathered"] | None = field(
        default=None, metadata={"help": "MSViT: execution path in training."}
    )
    masked_path_attention: Literal["key_mask", "masked_softmax"] | None = field(
        default=None,
        metadata={
            "help": "MSViT: how the masked path hides inactive tokens (masked_softmax: DynamicViT's, gradient from "
            "both)."
        },
    )
    gate_temperature: float | None = field(
        default=None, metadata={"help": "MSViT: Gumbel-sigmoid temperature in training."}
    )
    separate_coarse_embedding: bool = field(
        default=False, metadata={"help": "MSViT ablation: own coarse patch embedding."}
    )
    split_policy: SplitPolicy = field(default="gate", metadata={"help": "Who decides the splits (baselines)."})
    gate_threshold: float | None = field(
        default=None, metadata={"help": "MSViT: inference threshold on the split probability."}
    )
    fine_ratio_budget: float | None = field(
        default=None, metadata={"help": "MSViT: split exactly this fraction of regions at inference."}
    )


@dataclass(kw_only=True)
class OptimisationArguments:
    """The epochs and batch sizes have no default here: each script sets its own (`with_default`)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    num_train_epochs: int = field(metadata={"help": "Epochs (ignored with --max_train_steps)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Total optimisation steps."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Fraction of steps of linear warm-up before the cosine decay."}
    )
    per_device_train_batch_size: int = field(metadata={"help": "Batch size per process, training."})
    per_device_eval_batch_size: int = field(metadata={"help": "Batch size per process, evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimisation step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Mixed precision mode (default: the `accelerate launch` config's, else no)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything: weights, data order, flips, Gumbel noise."})


@dataclass(kw_only=True)
class BookkeepingArguments:
    output_dir: str | None = field(
        default=None, metadata={"help": "Where checkpoints, logs, the model and the results go (required)."}
    )
    logging_steps: int = field(default=20, metadata={"help": "Log training metrics every N steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate on validation every N steps (default: every epoch)."}
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint every N steps."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoints/step_N folder to continue from (exactly)."}
    )
    report_to: str = field(
        default="none", metadata={"help": "Also log to this tracker (e.g. tensorboard), via Accelerate."}
    )
    skip_test: bool = field(default=False, metadata={"help": "Do not evaluate on the test split at the end."})
    skip_export: bool = field(default=False, metadata={"help": "Do not write the Hub folder and the figures."})


@dataclass(kw_only=True)
class CommonArguments(BookkeepingArguments, OptimisationArguments, MSViTArguments, ModelArguments, DataArguments):
    """The fields both training scripts take."""

    def validate(self) -> None:
        """Raise `ValueError`, saying what is expected, when the arguments cannot make a run."""
        for name, annotation in get_type_hints(type(self)).items():
            # a recipe's values are the parser's defaults, which argparse does not check against the choices
            literal = next((arg for arg in (annotation, *get_args(annotation)) if get_origin(arg) is Literal), None)
            value = getattr(self, name)
            if literal is not None and value is not None and value not in get_args(literal):
                raise ValueError(f"--{name} is {value!r}; choose one of {', '.join(map(str, get_args(literal)))}.")
        if not self.output_dir:
            raise ValueError("--output_dir is required: the folder for checkpoints, logs, the model and the results.")


def with_default(group: type, name: str, default) -> Field:
    """The field `name` of the dataclass `group`, with its help and a script's own default."""
    return field(default=default, metadata=group.__dataclass_fields__[name].metadata)


Arguments = TypeVar("Arguments", bound=CommonArguments)


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file, or the name of one the package ships (`translated-fmnist-gate` ->
    `configuration/training/translated-fmnist-gate.yaml`), so that recipes run from an installed package too."""
    path = Path(name_or_path)
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.exists() and path.suffix == "" and shipped.is_file():
        return shipped
    return path


def load_recipe(parser: HfArgumentParser, path: str | Path) -> CommonArguments:
    """The recipe file at `path` (`.yaml`, `.yml` or `.json`, or a shipped recipe's name) as the dataclass of
    `parser`."""
    path = recipe_path(path)
    readers = {".yaml": parser.parse_yaml_file, ".yml": parser.parse_yaml_file, ".json": parser.parse_json_file}
    if path.suffix not in readers:
        shipped = ", ".join(sorted(recipe.stem for recipe in RECIPES_DIR.glob("*.yaml")))
        raise ValueError(f"{path}: a recipe is a .yaml, .yml or .json file, or the name of a shipped one ({shipped}).")
    (dataclass_type,) = parser.dataclass_types
    try:
        (recipe,) = readers[path.suffix](path)
    except OSError as error:
        raise ValueError(f"{path}: cannot read the recipe ({error.strerror}).") from None
    # AttributeError: a file that does not hold a mapping (a list, or nothing)
    except (ValueError, AttributeError, yaml.YAMLError) as error:
        allowed = ", ".join(field.name for field in fields(dataclass_type))
        raise ValueError(
            f"{path} is not a recipe of {dataclass_type.__name__}: {error}. A recipe maps argument names (the flags "
            f"without dashes) to values; allowed keys: {allowed}."
        ) from None
    return recipe


def parse_arguments(
    dataclass_type: type[Arguments], argv: list[str] | None = None, description: str | None = None
) -> Arguments:
    """`argv` (default: the command line) as `dataclass_type`, validated; errors exit with argparse's usage message."""
    parser = HfArgumentParser(dataclass_type, description=description)
    parser.add_argument(
        "--config",
        help="A training recipe (.yaml, .yml or .json), or the name of one in configuration/training/ (e.g. "
        "translated-fmnist-gate): its values replace the defaults, and flags given here override them.",
    )
    config = parser.parse_known_args(argv)[0].config
    if config:
        try:
            parser.set_defaults(**asdict(load_recipe(parser, config)))
        except ValueError as error:
            parser.error(f"--config {error}")
    values = vars(parser.parse_args(argv))
    del values["config"]
    args = dataclass_type(**values)
    try:
        args.validate()
    except ValueError as error:
        parser.error(str(error))
    return args
