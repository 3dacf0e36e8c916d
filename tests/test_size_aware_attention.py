"""Size-aware attention: a coarse key's scores are raised by log r**2, so it counts as the r**2 fine cells it covers.

The exactness check: with position embeddings zeroed and images constant over every coarse region, a coarse token
equals each of its r**2 children, so every layout must give exactly the all-fine model's outputs, on every path and
attention backend. Without the bias the same check fails.
"""

import json

import pytest
import torch

from modeling_msvit import MSViTConfig, MSViTForImageClassification, MSViTForSemanticSegmentation
from tests.conftest import tiny_config


NUM_COARSE = 16


def region_constant_images(batch_size: int, seed: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """Images constant over every 8x8 coarse region (the tiny config's coarse patch)."""
    regions = torch.randn(batch_size, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))
    return regions.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def ragged_layouts(batch_size: int, num_coarse: int = NUM_COARSE, seed: int = 0) -> torch.Tensor:
    """A different number of splits per image, from none to all."""
    generator = torch.Generator().manual_seed(seed)
    layouts = torch.rand(batch_size, num_coarse, generator=generator) < torch.linspace(0, 1, batch_size)[:, None]
    layouts[0], layouts[-1] = False, True
    return layouts


def without_positions(model):
    with torch.no_grad():
        model.base_model.embeddings.position_embeddings.zero_()
    return model.eval()


def layout_deltas(model, pixel_values: torch.Tensor, interpolate: bool = False) -> dict[str, float]:
    """Largest |logits - all-fine logits| per execution path, for ragged layouts and a fixed budget."""
    batch_size = len(pixel_values)
    num_coarse = (pixel_values.shape[-2] // 8) * (pixel_values.shape[-1] // 8)
    kwargs = {"interpolate_pos_encoding": interpolate}
    layouts = ragged_layouts(batch_size, num_coarse)
    with torch.no_grad():
        all_fine = model(pixel_values, split_mask=torch.ones_like(layouts), **kwargs).logits
        deltas = {
            "gathered": model(pixel_values, split_mask=layouts, **kwargs).logits,
            "masked": model(pixel_values, split_mask=layouts, token_path="masked", **kwargs).logits,
            "single images": torch.cat(
                [
                    model(pixel_values[i : i + 1], split_mask=layouts[i : i + 1], **kwargs).logits
                    for i in range(batch_size)
                ]
            ),
        }
        model.set_budget(fine_ratio=0.25)
        deltas["fixed budget"] = model(pixel_values, **kwargs).logits
        model.set_budget(threshold=0.5)
    return {path: (logits - all_fine).abs().max().item() for path, logits in deltas.items()}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
def test_every_layout_equals_all_fine_on_region_constant_images(attn_implementation):
    model = without_positions(MSViTForImageClassification(tiny_config(attn_implementation=attn_implementation)))
    deltas = layout_deltas(model, region_constant_images(6, seed=1))
    assert max(deltas.values()) <= 1e-5, deltas


def test_masked_softmax_and_interpolated_sizes_equal_all_fine_too():
    model = without_positions(MSViTForImageClassification(tiny_config(masked_path_attention="masked_softmax")))
    assert max(layout_deltas(model, region_constant_images(6, seed=2)).values()) <= 1e-5
    non_square = region_constant_images(4, seed=3, height=32, width=48)
    assert max(layout_deltas(model, non_square, interpolate=True).values()) <= 1e-5


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
def test_segmentation_logits_equal_all_fine_on_region_constant_images(decoder_type):
    config = tiny_config(num_labels=4, decoder_type=decoder_type)
    model = without_positions(MSViTForSemanticSegmentation(config))
    pixel_values = region_constant_images(5, seed=4)
    layouts = ragged_layouts(5)
    with torch.no_grad():
        all_fine = model(pixel_values, split_mask=torch.ones_like(layouts)).logits
        for token_path in ("gathered", "masked"):
            logits = model(pixel_values, split_mask=layouts, token_path=token_path).logits
            assert (logits - all_fine).abs().max() <= 1e-5


def test_without_the_bias_mixed_layouts_differ_from_all_fine():
    model = without_positions(MSViTForImageClassification(tiny_config(size_aware_attention=False)))
    deltas = layout_deltas(model, region_constant_images(6, seed=1))
    assert min(deltas.values()) > 1e-3, deltas


def test_the_bias_is_log_r2_on_active_coarse_keys_only():
    model = MSViTForImageClassification(tiny_config(attn_implementation="eager")).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    layouts = torch.zeros(2, NUM_COARSE, dtype=torch.bool)
    layouts[0, :3] = True  # 12 fine then 13 coarse tokens (gathered order); image 1: 16 coarse tokens, 9 padding
    captured = {}
    layer = model.msvit.layers[0]
    hook = layer.register_forward_pre_hook(lambda module, args: captured.update(mask=args[1]))
    with torch.no_grad():
        model(pixel_values, split_mask=layouts)
    hook.remove()
    bias = captured["mask"][:, 0, 0]  # the same for every query
    log4, minimum = torch.log(torch.tensor(4.0)).item(), torch.finfo(torch.float32).min
    expected = torch.tensor([[0.0] + [0.0] * 12 + [log4] * 13, [0.0] + [log4] * 16 + [minimum] * 9])
    torch.testing.assert_close(bias, expected)


def test_configs_saved_before_the_field_keep_their_behaviour(tmp_path):
    assert MSViTConfig().size_aware_attention and MSViTConfig().gate_objective == "counterfactual"
    model = MSViTForImageClassification(tiny_config())
    model.save_pretrained(tmp_path / "new")
    assert MSViTForImageClassification.from_pretrained(tmp_path / "new").config.size_aware_attention

    model.config.size_aware_attention = False
    model.save_pretrained(tmp_path / "off")
    assert not MSViTConfig.from_pretrained(tmp_path / "off").size_aware_attention

    legacy = json.loads((tmp_path / "new" / "config.json").read_text())
    for name in ("size_aware_attention", "gate_objective"):
        del legacy[name]
    (tmp_path / "new" / "config.json").write_text(json.dumps(legacy))
    reloaded = MSViTForImageClassification.from_pretrained(tmp_path / "new")
    assert not reloaded.config.size_aware_attention
    assert reloaded.config.gate_objective == "straight_through"
