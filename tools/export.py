"""Write a Hub-ready MSViT folder: safetensors weights, config with a complete `auto_map`, the flat modeling files,
`preprocessor_config.json` and a model card.

    python -m msvit.tools.export --preset msvit-tiny --output outputs/msvit-tiny-hub
    python -m msvit.tools.export --model path/to/msvit --output outputs/msvit-hub
    python -m msvit.tools.export --from-vit path/to/vit --output outputs/msvit-from-vit \
        --coarse-patch-size 32
    python -m msvit.tools.export --preset msvit-tiny --task semantic-segmentation --num-labels 11 \
        --output outputs/seg-hub

The folder loads anywhere with `AutoModelForImageClassification` (or `AutoModelForSemanticSegmentation`)
`.from_pretrained(folder, trust_remote_code=True)` and `pipeline("image-classification" | "image-segmentation",
model=folder, trust_remote_code=True)`, and can be uploaded as is.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from string import Template
from typing import NamedTuple

import torch
from transformers import AutoConfig, SegformerImageProcessorPil, ViTImageProcessorPil

from modeling_msvit import (
    MSViTConfig,
    MSViTForImageClassification,
    MSViTForSemanticSegmentation,
    MSViTPreTrainedModel,
)
from modeling_msvit.configuration_msvit import AUTO_MAP
from modeling_msvit.macs_msvit import vit_macs_for_config
from msvit.configuration import load_preset


MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
MODELING_FILES = (
    "configuration_msvit.py",
    "modeling_msvit.py",
    "mixed_scale_tokens.py",
    "macs_msvit.py",
    "gate_losses.py",
)


class Task(NamedTuple):
    """What a head serves: its Auto class, its model card template and the task's name in the Hub's metadata."""

    auto_class: str
    template: str
    name: str


# per pipeline task, keyed by its Hub id
TASKS = {
    "image-classification": Task(
        "AutoModelForImageClassification", "msvit-image-classification.md", "Image Classification"
    ),
    "image-segmentation": Task(
        "AutoModelForSemanticSegmentation", "msvit-semantic-segmentation.md", "Image Segmentation"
    ),
}


def task_of(model: MSViTPreTrainedModel) -> str:
    return "image-segmentation" if isinstance(model, MSViTForSemanticSegmentation) else "image-classification"


def image_processor_for(
    config: MSViTConfig, task: str = "image-classification", **kwargs
) -> ViTImageProcessorPil | SegformerImageProcessorPil:
    """The image processor of a head, resizing to the model's image size with mean/std 0.5 unless given:
    `ViTImageProcessorPil` for classification, `SegformerImageProcessorPil` (resizes masks too, and has
    `post_process_semantic_segmentation`) for segmentation."""
    fine_height, fine_width = config.fine_grid_size
    size = {"height": fine_height * config.patch_size, "width": fine_width * config.patch_size}
    if task == "image-segmentation":
        kwargs = {"image_mean": 0.5, "image_std": 0.5, "do_reduce_labels": False, **kwargs}
        return SegformerImageProcessorPil(size=size, **kwargs)
    return ViTImageProcessorPil(size=size, **kwargs)


def compute_summary(model: MSViTPreTrainedModel) -> dict:
    """Token and GMAC ranges of a model, for model cards and reports (the ViT figure has the same head)."""
    config = model.config
    tree = model.base_model.embeddings.configured_tree
    min_tokens, max_tokens = 1 + tree.num_roots, 1 + tree.num_fine
    macs = model.compute_macs(torch.tensor([min_tokens, max_tokens]))
    vit = vit_macs_for_config(config) + int(model._head_macs(torch.tensor(max_tokens)))
    return {
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "min_gmacs": f"{macs[0].item() / 1e9:.3f}",
        "max_gmacs": f"{macs[1].item() / 1e9:.3f}",
        "vit_gmacs": f"{vit / 1e9:.3f}",
    }


def gate_description(config) -> str:
    """What scores the regions and how it was trained, in words."""
    if config.gate_type != "learned":
        return f"training-free rule: the region's pixel {config.gate_type}"
    objective = {"counterfactual": "counterfactual region flips", "straight_through": "straight-through + budget loss"}
    return (
        f"{config.gate_num_layers}-layer MLP on {config.gate_input.replace('_', ' ')}, "
        f"trained with {objective[config.gate_objective]}"
    )


def render_model_card(
    model: MSViTPreTrainedModel,
    *,
    model_name: str,
    repo_id: str,
    description: str = "",
    results_markdown: str = "",
    model_index: list[dict] | None = None,
) -> str:
    """Fill the head's template from `model_cards/` with the model's configuration and measured results."""
    config = model.config
    index_yaml = ""
    if model_index:
        index_yaml = "model-index:\n" + "\n".join(_yaml_lines(model_index, indent=1))
    values = {
        "model_name": model_name,
        "repo_id": repo_id,
        "description": description or "Weights: see the results section for how they were trained.",
        "results": results_markdown or "No evaluation results were recorded for these weights.",
        "model_index": index_yaml,
        "children": config.scale_ratio**2,
        "patch_sizes": " / ".join(str(size) for size in config.scale_sizes),
        "scales_note": (
            f" With {config.num_scales} patch sizes the regions form a tree: a split region's children decide in "
            f"turn, top-down, down to {config.patch_size}x{config.patch_size}."
            if config.num_scales > 2
            else ""
        ),
        "image_size": config.image_size,
        "gate": gate_description(config),
        "attention": "size-aware (log r² added to coarse keys' scores)" if config.size_aware_attention else "plain",
        **{
            name: getattr(config, name)
            for name in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "patch_size",
                "coarse_patch_size",
                "gate_threshold",
                "decoder_type",
                "num_labels",
            )
        },
        **compute_summary(model),
    }
    template = TASKS[task_of(model)].template
    return Template((MODEL_CARDS_DIR / template).read_text()).substitute(values)


def _yaml_lines(value, indent: int) -> list[str]:
    """Minimal YAML for the model-index (lists of dicts of scalars), enough for the Hub's metadata parser."""
    pad = "  " * indent
    lines = []
    if isinstance(value, list):
        for item in value:
            sub = _yaml_lines(item, indent + 1)
            lines.append(f"{pad}- {sub[0].strip()}")
            lines.extend(sub[1:])
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (list, dict)):
                lines.append(f"{pad}{key}:")
                lines.extend(_yaml_lines(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {json.dumps(item)}")
    return lines


def export_hub_folder(
    model: MSViTPreTrainedModel,
    output_dir: str | Path,
    *,
    image_processor: ViTImageProcessorPil | SegformerImageProcessorPil | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    description: str = "",
    results_markdown: str = "",
    model_index: list[dict] | None = None,
) -> Path:
    """Write `model` as a Hub-ready folder and return its path."""
    output_dir = Path(output_dir)
    model_name = model_name or output_dir.name
    model.save_pretrained(output_dir)
    # `save_pretrained` records the saved class; make sure every Auto class is mapped whatever was saved
    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {**AUTO_MAP, **config.get("auto_map", {})}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    missing = [name for name in MODELING_FILES if not (output_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"save_pretrained did not copy {missing}; import `modeling_msvit` before exporting.")
    (image_processor or image_processor_for(model.config, task_of(model))).save_pretrained(output_dir)
    card = render_model_card(
        model,
        model_name=model_name,
        repo_id=repo_id or model_name,
        description=description,
        results_markdown=results_markdown,
        model_index=model_index,
    )
    (output_dir / "README.md").write_text(card)
    return output_dir


# Run in a fresh interpreter with the repository package blocked, so only the folder's own code can be used.
_REMOTE_LOGITS = """
import sys
sys.modules["modeling_msvit"] = None
import torch
import transformers
folder, inputs, out, auto_class = sys.argv[1:5]
model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
assert "transformers_modules" in type(model).__module__, type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load(inputs)).logits, out)
"""


def remote_code_logits(
    folder: str | Path, pixel_values: torch.Tensor, task: str = "image-classification"
) -> torch.Tensor:
    """Logits of the exported folder loaded with `trust_remote_code=True` (through the task's Auto class) in a clean,
    offline subprocess where this repository's package cannot be imported."""
    with tempfile.TemporaryDirectory() as workdir:
        inputs, out = Path(workdir) / "pixel_values.pt", Path(workdir) / "logits.pt"
        torch.save(pixel_values, inputs)
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(workdir) / "modules"))
        auto_class = TASKS[task].auto_class
        command = [
            sys.executable,
            "-c",
            _REMOTE_LOGITS,
            str(Path(folder).resolve()),
            str(inputs),
            str(out),
            auto_class,
        ]
        subprocess.run(command, cwd=workdir, env=env, check=True, timeout=600)
        return torch.load(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export an MSViT classifier or segmenter as a Hub-ready folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="Name of a preset in configuration/models/ (random weights).")
    source.add_argument("--model", help="Folder of a saved MSViT (any head).")
    source.add_argument("--from-vit", help="Folder (or Hub id) of an HF ViT to convert; the gate is new.")
    parser.add_argument("--output", required=True, help="Folder to write.")
    parser.add_argument("--repo-id", help="Hub repository id used in the model card's snippets.")
    parser.add_argument("--coarse-patch-size", type=int, help="Coarse patch size when converting a ViT.")
    parser.add_argument("--num-labels", type=int, help="Number of classes for --preset.")
    parser.add_argument(
        "--task",
        choices=("image-classification", "semantic-segmentation"),
        default="image-classification",
        help="Head of a --preset or --from-vit model.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for freshly initialised weights.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model_class = MSViTForSemanticSegmentation if args.task == "semantic-segmentation" else MSViTForImageClassification
    if args.preset:
        overrides = {"num_labels": args.num_labels} if args.num_labels else {}
        model = model_class(load_preset(args.preset, **overrides))
    elif args.model:
        # the saved architecture decides the head
        architectures = AutoConfig.from_pretrained(args.model).architectures or []
        heads = {head.__name__: head for head in (MSViTForImageClassification, MSViTForSemanticSegmentation)}
        if not architectures or architectures[0] not in heads:
            raise ValueError(
                f"{args.model} holds {architectures or 'no architecture'}; expected one of {list(heads)}."
            )
        model = heads[architectures[0]].from_pretrained(args.model)
    else:
        overrides = {"coarse_patch_size": args.coarse_patch_size} if args.coarse_patch_size else {}
        if args.num_labels:
            overrides["num_labels"] = args.num_labels
        model = model_class.from_vit(args.from_vit, **overrides)
    folder = export_hub_folder(model.eval(), args.output, repo_id=args.repo_id)
    print(f"Wrote {folder}: {', '.join(sorted(path.name for path in folder.iterdir()))}")


if __name__ == "__main__":
    main()
