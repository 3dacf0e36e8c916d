"""Write a Hub-ready MSViT folder: safetensors weights, config with a complete `auto_map`, the flat modeling files,
`preprocessor_config.json` and a model card.

    python -m tools.export --preset msvit-tiny --output outputs/msvit-tiny-hub
    python -m tools.export --model path/to/msvit --output outputs/msvit-hub
    python -m tools.export --from-vit path/to/vit --output outputs/msvit-from-vit --coarse-patch-size 32

The folder loads anywhere with `AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`
and `pipeline("image-classification", model=folder, trust_remote_code=True)`, and can be uploaded as is.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from string import Template

import torch
from transformers import AutoModelForImageClassification, ViTImageProcessorPil

from modeling_msvit import MSViTConfig, MSViTForImageClassification, MSViTPreTrainedModel
from modeling_msvit.configuration_msvit import AUTO_MAP
from modeling_msvit.macs_msvit import vit_macs_for_config
from tools.presets import load_preset


MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
MODELING_FILES = (
    "configuration_msvit.py",
    "modeling_msvit.py",
    "mixed_scale_tokens.py",
    "macs_msvit.py",
    "gate_losses.py",
)


def image_processor_for(config: MSViTConfig, **kwargs) -> ViTImageProcessorPil:
    """A `ViTImageProcessorPil` that resizes to the model's image size (mean/std 0.5 unless given)."""
    fine_height, fine_width = config.fine_grid_size
    size = {"height": fine_height * config.patch_size, "width": fine_width * config.patch_size}
    return ViTImageProcessorPil(size=size, **kwargs)


def compute_summary(model: MSViTPreTrainedModel) -> dict:
    """Token and GMAC ranges of a model, for model cards and reports."""
    config = model.config
    num_coarse = config.coarse_grid_size[0] * config.coarse_grid_size[1]
    num_fine = num_coarse * config.scale_ratio**2
    min_tokens, max_tokens = 1 + num_coarse, 1 + num_fine
    macs = model.compute_macs(torch.tensor([min_tokens, max_tokens]))
    vit = vit_macs_for_config(config, num_labels=config.num_labels if hasattr(model, "classifier") else 0)
    return {
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "min_gmacs": f"{macs[0].item() / 1e9:.3f}",
        "max_gmacs": f"{macs[1].item() / 1e9:.3f}",
        "vit_gmacs": f"{vit / 1e9:.3f}",
    }


def render_model_card(
    model: MSViTPreTrainedModel,
    *,
    model_name: str,
    repo_id: str,
    description: str = "",
    results_markdown: str = "",
    model_index: list[dict] | None = None,
    template: str = "msvit-image-classification.md",
) -> str:
    """Fill a template from `model_cards/` with the model's configuration and measured results."""
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
        "image_size": config.image_size,
        **{
            name: getattr(config, name)
            for name in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "patch_size",
                "coarse_patch_size",
                "gate_num_layers",
                "gate_input",
                "gate_threshold",
            )
        },
        **compute_summary(model),
    }
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
    image_processor: ViTImageProcessorPil | None = None,
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
    (image_processor or image_processor_for(model.config)).save_pretrained(output_dir)
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
from transformers import AutoModelForImageClassification
folder, inputs, out = sys.argv[1:4]
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(inputs)).logits, out)
"""


def remote_code_logits(folder: str | Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of the exported folder loaded with `trust_remote_code=True` in a clean, offline subprocess."""
    with tempfile.TemporaryDirectory() as workdir:
        inputs, out = Path(workdir) / "pixel_values.pt", Path(workdir) / "logits.pt"
        torch.save(pixel_values, inputs)
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(workdir) / "modules"))
        command = [sys.executable, "-c", _REMOTE_LOGITS, str(Path(folder).resolve()), str(inputs), str(out)]
        subprocess.run(command, cwd=workdir, env=env, check=True, timeout=600)
        return torch.load(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export an MSViT image classifier as a Hub-ready folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="Name of a preset in configuration/models/ (random weights).")
    source.add_argument("--model", help="Folder of a saved MSViT image classifier.")
    source.add_argument("--from-vit", help="Folder (or Hub id) of an HF ViT to convert; the gate is new.")
    parser.add_argument("--output", required=True, help="Folder to write.")
    parser.add_argument("--repo-id", help="Hub repository id used in the model card's snippets.")
    parser.add_argument("--coarse-patch-size", type=int, help="Coarse patch size when converting a ViT.")
    parser.add_argument("--num-labels", type=int, help="Number of classes for --preset.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for freshly initialised weights.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.preset:
        overrides = {"num_labels": args.num_labels} if args.num_labels else {}
        model = MSViTForImageClassification(load_preset(args.preset, **overrides))
    elif args.model:
        model = AutoModelForImageClassification.from_pretrained(args.model)
    else:
        overrides = {"coarse_patch_size": args.coarse_patch_size} if args.coarse_patch_size else {}
        model = MSViTForImageClassification.from_vit(args.from_vit, **overrides)
    folder = export_hub_folder(model.eval(), args.output, repo_id=args.repo_id)
    print(f"Wrote {folder}: {', '.join(sorted(path.name for path in folder.iterdir()))}")


if __name__ == "__main__":
    main()
