import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTConfig

from modeling_msvit import MSViTForImageClassification
from modeling_msvit.macs_msvit import encoder_macs, mlp_macs, vit_macs, vit_macs_for_config
from msvit.configuration import load_preset


def test_vit_reference_figures():
    ti = vit_macs(image_size=(224, 224), patch_size=16, num_channels=3, hidden_size=192, intermediate_size=768,
                  num_layers=12, num_labels=1000)  # fmt: skip
    small = vit_macs(image_size=(224, 224), patch_size=16, num_channels=3, hidden_size=384, intermediate_size=1536,
                     num_layers=12, num_labels=1000)  # fmt: skip
    assert round(ti / 1e9, 3) == 1.254
    vit_ti = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
    assert vit_macs_for_config(vit_ti, num_labels=1000) == ti
    assert round(small / 1e9, 2) == 4.60


def test_encoder_and_mlp_closed_forms():
    assert encoder_macs(10, 4, 8, 2) == 2 * (4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8)
    assert mlp_macs([768, 64, 64, 64, 1]) == 768 * 64 + 2 * 64 * 64 + 64


def test_msvit_tiny_all_fine_is_vit_ti_plus_the_gate():
    model = MSViTForImageClassification(load_preset("msvit-tiny", num_labels=1000))
    all_fine, all_coarse = model.compute_macs(torch.tensor([197, 50])).tolist()
    gate = 49 * mlp_macs([768, 64, 64, 64, 1])
    assert all_fine - gate == vit_macs(image_size=(224, 224), patch_size=16, num_channels=3, hidden_size=192,
                                       intermediate_size=768, num_layers=12, num_labels=1000)  # fmt: skip
    assert round(all_fine / 1e9, 3) == 1.256  # 1.254 GMACs of ViT-Ti/16 + 2.8 MMACs of gate
    assert all_coarse < 0.25 * all_fine


def test_analytic_macs_agree_with_the_flop_counter_on_the_gathered_path():
    config = load_preset("msvit-tiny", num_labels=1000, attn_implementation="eager")
    model = MSViTForImageClassification(config).eval()
    pixel_values = torch.randn(1, 3, 224, 224)
    for num_split in (0, 20, 49):
        split_mask = torch.zeros(1, 49, dtype=torch.bool)
        split_mask[0, :num_split] = True
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            outputs = model(pixel_values, split_mask=split_mask)
        analytic = model.compute_macs(outputs.token_counts).item()
        # the forced mask skips no work: the gate still runs, as in normal inference
        measured_macs = counter.get_total_flops() / 2
        assert abs(measured_macs - analytic) / analytic < 0.02, (num_split, measured_macs, analytic)
