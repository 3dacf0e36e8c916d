import json

import pytest

from modeling_msvit import MSViTConfig
from msvit.configuration import load_preset, preset_names, preset_path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(coarse_patch_size=24), "multiple of"),
        (dict(coarse_patch_size=16), "multiple of"),
        (dict(image_size=200), "multiple of `patch_size`"),
        (dict(image_size=[224, 200]), "multiple of `patch_size`"),
        (dict(patch_sizes=[16, 32, 48]), "same integer factor"),
        (dict(patch_sizes=[16, 32, 128]), "same integer factor"),
        (dict(patch_sizes=[16]), "at least two"),
        (dict(patch_sizes=[8, 16, 32], gate_threshold=[0.5, 0.5, 0.5]), "one per decision level"),
        (dict(gate_threshold=[0.5, 1.0]), "gate_threshold"),
        (dict(gate_threshold=0.0), "gate_threshold"),
        (dict(gate_threshold=1.0), "gate_threshold"),
        (dict(fine_ratio_budget=1.5), "fine_ratio_budget"),
        (dict(target_fine_ratio=-0.1), "target_fine_ratio"),
        (dict(target_fine_ratio=1.1), "target_fine_ratio"),
        (dict(gate_temperature=0.0), "gate_temperature"),
        (dict(gate_loss_weight=-1.0), "gate_loss_weight"),
        (dict(hidden_size=100, num_attention_heads=3), "divisible"),
        (dict(gate_num_layers=0), "gate_num_layers"),
        (dict(gate_input="tokens"), "gate_input"),
        (dict(train_token_path="packed"), "train_token_path"),
        (dict(gate_loss_type="kl"), "gate_loss_type"),
    ],
)
def test_invalid_settings_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MSViTConfig(**overrides)


def test_defaults_follow_the_paper():
    config = MSViTConfig()
    assert (config.patch_size, config.coarse_patch_size, config.scale_ratio) == (16, 32, 2)
    assert config.coarse_grid_size == (7, 7) and config.fine_grid_size == (14, 14)
    assert config.gate_num_layers == 4 and config.model_type == "msvit"


def test_config_round_trip_keeps_fields_and_auto_map(tmp_path):
    config = MSViTConfig(image_size=[64, 96], target_fine_ratio=0.3, fine_ratio_budget=0.25, num_labels=7)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
        "AutoModelForSemanticSegmentation",
    }
    reloaded = MSViTConfig.from_pretrained(tmp_path)
    assert reloaded.coarse_grid_size == (2, 3) and reloaded.fine_ratio_budget == 0.25
    assert reloaded.num_labels == 7 and reloaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("msvit-tiny", (192, 12, 3, 768)), ("msvit-small", (384, 12, 6, 1536)), ("msvit-base", (768, 12, 12, 3072))],
)
def test_presets(name, sizes):
    assert name in preset_names()
    for config in (MSViTConfig.from_pretrained(preset_path(name)), load_preset(name)):
        widths = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)
        assert widths == sizes
        assert (config.image_size, config.patch_size, config.coarse_patch_size) == (224, 16, 32)
    with pytest.raises(ValueError, match="available presets"):
        load_preset("msvit-huge")
