"""The project's configuration files, shipped with the package (`msvit.configuration`) and found from it:
named model presets (`models/*.json`, `config.json`-style), training recipes (`training/*.yaml`) and Accelerate
configurations (`accelerate/*.yaml`)."""

from pathlib import Path

from modeling_msvit import MSViTConfig


CONFIGURATION_DIR = Path(__file__).resolve().parent
PRESETS_DIR = CONFIGURATION_DIR / "models"
RECIPES_DIR = CONFIGURATION_DIR / "training"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown preset {name!r}; available presets: {', '.join(preset_names())}.")
    return path


def load_preset(name: str, **overrides) -> MSViTConfig:
    """The preset's `MSViTConfig`, with any field overridden, e.g. `load_preset("msvit-tiny", num_labels=10)`."""
    return MSViTConfig.from_pretrained(preset_path(name), **overrides)
