"""Named model presets stored as `config.json`-style files in `configuration/models/`."""

from pathlib import Path

from modeling_msvit import MSViTConfig


PRESETS_DIR = Path(__file__).resolve().parent.parent / "configuration" / "models"


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
