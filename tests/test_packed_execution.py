"""Packed execution of ragged batches: the layers run on the active tokens only, attention on the padded batch.

Packed, padded (`ragged_execution="padded"`) and one image at a time give the same outputs, on every attention
backend (SDPA, eager and flex attention), with and without
size-aware attention, for both heads; the output format stays padded per image; a packed batch costs the MACs of its
own tokens; a ragged batch synchronises with the host once. Length bucketing groups images by the token counts the
gate predicts.
"""

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import ViTImageProcessorPil, pipeline

from modeling_msvit import MSViTForImageClassification, MSViTForSemanticSegmentation, MSViTModel
from modeling_msvit.mixed_scale_tokens import (
    build_scale_tree,
    length_buckets,
    packed_token_rows,
    padded_token_rows,
    token_counts,
    tokens_to_grid,
)
from msvit.configuration import load_preset
from tests.conftest import tiny_config
from tests.test_fast_paths import images, make_gate_decisive
from tests.test_size_aware_attention import ragged_layouts


def paired_models(model_class, **overrides):
    """The same weights twice: running packed (the default) and padded."""
    packed = model_class(tiny_config(**overrides)).eval()
    padded = model_class(tiny_config(ragged_execution="padded", **overrides)).eval()
    padded.load_state_dict(packed.state_dict())
    return packed, padded


def layer_input_shapes(model, *args, **kwargs) -> list[tuple[int, ...]]:
    """Shapes of the hidden states entering the first encoder layer in one forward pass."""
    shapes = []
    hook = model.base_model.layers[0].register_forward_pre_hook(lambda module, inputs: shapes.append(inputs[0].shape))
    with torch.no_grad():
        model(*args, **kwargs)
    hook.remove()
    return shapes


def test_pack_and_pad_rows_on_a_small_batch():
    counts = torch.tensor([3, 1, 2])
    rows = packed_token_rows(counts, length=3, total=6)
    assert rows.tolist() == [0, 1, 2, 3, 6, 7]  # (image, position) (0, 0..2), (1, 0), (2, 0..1) of a 3 x 3 batch
    # padding positions read their own image's last token
    assert padded_token_rows(counts, length=3).tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 5]]
    padded = torch.arange(9.0)[:, None].expand(9, 2).reshape(3, 3, 2)
    packed = padded.flatten(0, 1).index_select(0, rows)
    repadded = packed.index_select(0, padded_token_rows(counts, 3).flatten()).view(3, 3, 2)
    valid = torch.arange(3)[None, :] < counts[:, None]
    assert torch.equal(repadded[valid], padded[valid])


@pytest.mark.parametrize("size_aware_attention", [True, False])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
def test_packed_equals_padded_equals_single_images(attn_implementation, size_aware_attention):
    packed, padded = paired_models(
        MSViTForImageClassification,
        attn_implementation=attn_implementation,
        size_aware_attention=size_aware_attention,
    )
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layouts = ragged_layouts(5)
    counts = token_counts(layouts, build_scale_tree((8, 8), 2, 2))
    assert len(set(counts.tolist())) == 5

    # the packed model's layers see one (total tokens, hidden) matrix, the padded model's the padded batch
    assert layer_input_shapes(packed, pixel_values, split_mask=layouts) == [(int(counts.sum()), 32)]
    assert layer_input_shapes(padded, pixel_values, split_mask=layouts) == [(5, int(counts.max()), 32)]
    with torch.no_grad():
        logits = packed(pixel_values, split_mask=layouts).logits
        expected = padded(pixel_values, split_mask=layouts).logits
        # two images with padding in the batch (each new length compiles flex attention again: two are enough)
        singles = [packed(pixel_values[i : i + 1], split_mask=layouts[i : i + 1]).logits for i in (0, 2)]
    # the paths pad with different values (copies of a real token, inactive candidates): a leak would show
    assert (logits - expected).abs().max() <= 1e-5
    assert (logits[[0, 2]] - torch.cat(singles)).abs().max() <= 1e-5


@pytest.mark.parametrize("size_aware_attention", [True, False])
def test_base_model_outputs_keep_the_padded_format(size_aware_attention):
    packed, padded = paired_models(MSViTModel, attn_implementation="eager", size_aware_attention=size_aware_attention)
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layouts = ragged_layouts(4)
    kwargs = dict(split_mask=layouts, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        outputs, reference = packed(pixel_values, **kwargs), padded(pixel_values, **kwargs)

    length = int(token_counts(layouts, build_scale_tree((8, 8), 2, 2)).max())
    mask = outputs.token_mask
    assert outputs.last_hidden_state.shape == reference.last_hidden_state.shape == (4, length, 32)
    assert torch.equal(mask, reference.token_mask) and torch.equal(outputs.token_index, reference.token_index)
    assert (outputs.last_hidden_state - reference.last_hidden_state)[mask].abs().max() <= 1e-5
    assert len(outputs.hidden_states) == len(reference.hidden_states) == 3
    for hidden, expected in zip(outputs.hidden_states, reference.hidden_states):
        assert hidden.shape == (4, length, 32) and (hidden - expected)[mask].abs().max() <= 1e-5
    for weights, expected in zip(outputs.attentions, reference.attentions):
        # every real query's weights, padding keys included (they get exactly 0)
        assert weights.shape == (4, 4, length, length)
        assert (weights - expected).permute(0, 2, 1, 3)[mask].abs().max() <= 1e-6
        assert torch.all(weights.permute(0, 3, 1, 2)[~mask] == 0)


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
def test_segmentation_and_tokens_to_grid_are_unchanged(decoder_type):
    packed, padded = paired_models(MSViTForSemanticSegmentation, num_labels=4, decoder_type=decoder_type)
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    layouts = ragged_layouts(5)
    with torch.no_grad():
        logits, expected = (model(pixel_values, split_mask=layouts).logits for model in (packed, padded))
        grids = [
            tokens_to_grid(out.last_hidden_state, out.token_index, out.token_mask, packed.msvit.scale_tree(32, 32))
            for out in (packed.msvit(pixel_values, split_mask=layouts), padded.msvit(pixel_values, split_mask=layouts))
        ]
    assert logits.shape == (5, 4, 8, 8) and (logits - expected).abs().max() <= 1e-5
    assert grids[0].shape == (5, 32, 8, 8) and (grids[0] - grids[1]).abs().max() <= 1e-5


def test_packing_only_where_there_is_padding_to_skip():
    packed, _ = paired_models(MSViTForImageClassification)
    pixel_values = torch.randn(4, 3, 32, 32)
    layouts = ragged_layouts(4)
    equal = torch.zeros_like(layouts)
    equal[:, :5] = True  # every image 1 + 16 + 3 * 5 = 32 tokens: nothing to skip
    assert layer_input_shapes(packed, pixel_values, split_mask=equal) == [(4, 32, 32)]
    packed.set_budget(fine_ratio=0.5)  # the fixed budget keeps its static path
    assert layer_input_shapes(packed, pixel_values) == [(4, 1 + 16 + 3 * 8, 32)]
    packed.train()  # training keeps today's padded batches (and their dropout draws)
    assert layer_input_shapes(packed, pixel_values, split_mask=layouts, token_path="gathered") == [
        (4, int(token_counts(layouts, build_scale_tree((8, 8), 2, 2)).max()), 32)
    ]
    with pytest.raises(ValueError, match="ragged_execution"):
        tiny_config(ragged_execution="nested")


def test_a_packed_batch_costs_the_macs_of_its_own_tokens():
    """Measured with the flop counter (given the formula of CPU SDPA, which it lacks): packed, the batch costs the
    sum of its images' analytic MACs plus the patch embedding of its padding (the embeddings are padded, then
    packed) and the padding's share of attention (`QK^T` and `AV`, 2 L^2 D per image and layer, at the longest
    length); padded, every image costs as much as the longest."""
    config = dict(num_labels=10, num_hidden_layers=2, attn_implementation="sdpa")
    packed = MSViTForImageClassification(load_preset("msvit-tiny", **config)).eval()
    padded = MSViTForImageClassification(load_preset("msvit-tiny", ragged_execution="padded", **config)).eval()
    pixel_values = torch.randn(4, 3, 224, 224)
    layouts = ragged_layouts(4, num_coarse=49)
    counts = token_counts(layouts, build_scale_tree((14, 14), 2, 2))
    cpu_sdpa = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda query, key, value, *args, **kwargs: (
            sdpa_flop_count(query, key, value)
        )
    }
    measured = {}
    for name, model in (("packed", packed), ("padded", padded)):
        counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
        with counter, torch.no_grad():
            model(pixel_values, split_mask=layouts)
        measured[name] = counter.get_total_flops() // 2
    padding_embedding = (4 * int(counts.max()) - int(counts.sum())) * 3 * 16**2 * 192
    padding_attention = 2 * 2 * 192 * (4 * int(counts.max()) ** 2 - int((counts**2).sum()))
    assert measured["packed"] == packed.compute_macs(counts).sum().item() + padding_embedding + padding_attention
    assert measured["padded"] == packed.compute_macs(counts.max().expand(4)).sum().item() > 1.3 * measured["packed"]


class HostSyncs(TorchDispatchMode):
    """Records every op that makes the host wait for tensor values: `.item()`, `bool()` / `int()` of a tensor,
    `nonzero`, boolean indexing, `repeat_interleave` without `output_size`, ... (`Tensor.tolist`, which reads CPU
    memory without dispatching, is patched in by the test)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = torch.Tag.data_dependent_output in func.tags
        if torch.Tag.dynamic_output_shape in func.tags:
            if func is torch.ops.aten.index.Tensor:  # only a boolean index has a data-dependent shape
                sync = any(index is not None and index.dtype == torch.bool for index in args[1])
            elif func is torch.ops.aten.repeat_interleave.Tensor:
                sync = kwargs.get("output_size") is None
            else:
                sync = True
        if sync:
            self.syncs.append(str(func))
        return func(*args, **kwargs)


def host_syncs(monkeypatch, model, *args, **kwargs) -> list[str]:
    mode = HostSyncs()
    tolist = torch.Tensor.tolist

    def recorded_tolist(tensor):
        mode.syncs.append("tolist")
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", recorded_tolist)
    with mode, torch.no_grad():
        model(*args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return mode.syncs


@pytest.mark.parametrize("size_aware_attention", [True, False])
def test_a_ragged_batch_synchronises_with_the_host_once(monkeypatch, size_aware_attention):
    packed, padded = paired_models(MSViTForImageClassification, size_aware_attention=size_aware_attention)
    pixel_values = torch.randn(4, 3, 32, 32)
    layouts = ragged_layouts(4)
    # the longest and shortest image and the total token count, read together
    assert host_syncs(monkeypatch, packed, pixel_values, split_mask=layouts) == ["tolist"]
    assert host_syncs(monkeypatch, padded, pixel_values, split_mask=layouts) == ["tolist"]
    packed.set_budget(fine_ratio=0.5)
    assert host_syncs(monkeypatch, packed, pixel_values) == []
    # the recorder does see a sync: reading one value back
    assert host_syncs(monkeypatch, lambda x: x.sum().item(), pixel_values) == ["aten._local_scalar_dense.default"]


def test_length_buckets_group_similar_counts_and_keep_every_image_once():
    counts = torch.tensor([50, 197, 86, 50, 161, 122, 86])
    buckets = length_buckets(counts, batch_size=3)
    assert [bucket.tolist() for bucket in buckets] == [[0, 3, 2], [6, 5, 4], [1]]
    order = torch.cat(buckets)
    assert torch.equal(counts[order][order.argsort()], counts)  # argsort of the concatenation restores the order


def test_predicted_counts_and_bucketed_batches_match_the_forward_pass():
    model = MSViTForImageClassification(tiny_config()).eval()
    pixel_values = images(8, seed=4)
    make_gate_decisive(model, pixel_values)
    with torch.no_grad():
        outputs = model(pixel_values)
        counts = model.predict_token_counts(pixel_values)
        assert (outputs.split_probs - model.config.gate_threshold).abs().min() > 1e-4  # no decision on a knife edge
        assert torch.equal(counts, outputs.token_counts) and len(set(counts.tolist())) > 2
        logits = torch.empty_like(outputs.logits)
        for indices in length_buckets(counts, batch_size=3):
            logits[indices] = model(pixel_values[indices]).logits
    assert (logits - outputs.logits).abs().max() <= 1e-5
    model.set_budget(fine_ratio=0.25)
    assert model.predict_token_counts(pixel_values).tolist() == [1 + 16 + 3 * 4] * 8


def test_pipeline_recipe_sorts_by_predicted_counts_and_restores_the_order():
    model = MSViTForImageClassification(tiny_config()).eval()
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=0.5, image_std=0.5)
    generator = torch.Generator().manual_seed(5)
    photos = [
        Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255 * (i + 1) / 6).byte().numpy())
        for i in range(6)
    ]
    make_gate_decisive(model, processor(photos, return_tensors="pt").pixel_values)
    classifier = pipeline("image-classification", model=model, image_processor=processor, top_k=5)

    counts = model.predict_token_counts(processor(photos, return_tensors="pt").pixel_values)
    order = counts.argsort(stable=True).tolist()
    results = [None] * len(photos)
    for index, result in zip(order, classifier([photos[i] for i in order], batch_size=3)):
        results[index] = result
    assert len(set(counts.tolist())) > 2 and order != list(range(6))
    for result, expected in zip(results, classifier(photos, batch_size=1)):
        assert [row["label"] for row in result] == [row["label"] for row in expected]
        assert [row["score"] for row in result] == pytest.approx([row["score"] for row in expected], abs=1e-5)
