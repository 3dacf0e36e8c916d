"""Training recipes: YAML (or JSON) files of `train/run_classification.py` arguments, turned into command-line args.

A recipe is a mapping from flag names without the leading dashes to values (`configuration/training/*.yaml`):

    stage: backbone
    patch_size: 8
    learning_rate: 1.0e-3
    no_hflip: true        # a boolean: true gives the bare flag `--no_hflip`, false (or null) leaves it out

`load_recipe(path)` returns the arguments (`["--stage", "backbone", "--patch_size", "8", ...]`), and
`python -m msvit.train.recipes FILE` prints them on one line for the shell:

    python -m msvit.train.run_classification $(python -m msvit.train.recipes configuration/training/x.yaml) \
        --output_dir out

Arguments given after the recipe's win (argparse keeps the last value of a flag), so a recipe is a set of defaults.
This module imports nothing heavy, so that the `$(...)` above costs no time.
"""

import json
import math
import re
import sys
from pathlib import Path

import yaml


KEY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
SHELL_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


class RecipeError(ValueError):
    """A recipe file that cannot be turned into command-line arguments; the message names the file and the key."""


def _format_value(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value}")
        return repr(value)  # shortest text that reads back as the same float: 0.001, 1e-05
    return str(value)


def recipe_to_args(recipe: dict, source: str = "recipe") -> list[str]:
    """Command-line arguments from a recipe mapping (see the module docstring)."""
    if not isinstance(recipe, dict):
        raise RecipeError(
            f"{source}: a recipe must be a mapping of flag names to values, got {type(recipe).__name__}."
        )
    args = []
    for key, value in recipe.items():
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            raise RecipeError(
                f"{source}: key {key!r} is not a flag name; write flags without dashes, e.g. `learning_rate: 1.0e-3`."
            )
        if value is None or value is False:
            continue
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, (int, float, str)):
            try:
                args += [f"--{key}", _format_value(value)]
            except ValueError as error:
                raise RecipeError(f"{source}: key {key!r}: {error}.") from None
        else:
            raise RecipeError(
                f"{source}: key {key!r} holds a {type(value).__name__}; values are numbers, strings or booleans."
            )
    return args


def load_recipe(path: str | Path) -> list[str]:
    """The command-line arguments of the recipe file at `path` (`.yaml`, `.yml` or `.json`)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    return recipe_to_args({} if recipe is None else recipe, source=str(path))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(f"usage: python -m msvit.train.recipes FILE\n\n{__doc__.split(chr(10) + chr(10))[0]}", file=sys.stderr)
        return 2
    try:
        args = load_recipe(argv[0])
    except (OSError, RecipeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # `$(...)` splits on whitespace and does not undo quoting, so only plain words can travel that way
    unsafe = [arg for arg in args if not SHELL_SAFE.fullmatch(arg)]
    if unsafe:
        print(
            f"error: {argv[0]}: value(s) {unsafe} would not survive `$(python -m msvit.train.recipes ...)` word "
            "splitting; use msvit.train.recipes.load_recipe from Python instead.",
            file=sys.stderr,
        )
        return 1
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
