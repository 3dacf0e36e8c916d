"""Correctness of MSViT's inference fast paths.

* threshold mode (ragged token counts): the gathered path, the masked path and one-image-at-a-time agree;
* budget mode (`set_budget(fine_ratio=...)`): exactly `round(fine_ratio * Nc)` splits per image, saved with the model;
* the static fixed-budget path: `torch.compile(fullgraph=True)` without recompiles, `torch.export` and ONNX.

The gates of these tests are made decisive (logits spread over a few units), so that the float rounding differences
between execution paths cannot flip a decision; the tests that compare paths assert that margin.
"""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from modeling_msvit import MSViTForImageClassification, MSViTModel
from tests.conftest import tiny_config


def make_gate_decisive(model: MSViTModel | MSViTForImageClassification, pixel_values: torch.Tensor) -> None:
    """Rescale the gate's output layer so that its logits on `pixel_values` have mean 0 and standard deviation 4.

    A freshly initialised gate outputs logits within ~1e-5 of its bias, so thresholds and top-k choices would hang on
    float rounding; spread out, the decisions are robust and differ from image to image.
    """
    gate = model.base_model.embeddings.gate
    captured = []
    hook = gate.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model(pixel_values)
        hook.remove()
        logits = captured[0]
        scale = 4.0 / logits.std()
        # logits = last_layer(h) + bias  ->  scale * (logits - mean) = (scale * last_layer)(h) + scale * (bias - mean)
        gate.layers[-1].weight.mul_(scale)
        gate.split_logit_bias.copy_(scale * (gate.split_logit_bias - logits.mean()))


def images(batch_size: int, seed: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """Random images with a per-image contrast and brightness, so that the gate splits more regions in some."""
    pixels = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
    contrast = torch.linspace(0.5, 2.0, batch_size)[:, None, None, None]
    brightness = torch.linspace(-1.0, 1.0, batch_size)[:, None, None, None]
    return pixels * contrast + brightness


def budget_model(fine_ratio: float = 0.5, **overrides) -> tuple[MSViTForImageClassification, torch.Tensor]:
    """An sdpa model with a decisive gate in fixed-budget mode, and the images its gate was calibrated on."""
    model = MSViTForImageClassification(tiny_config(attn_implementation="sdpa", **overrides)).eval()
    calibration = images(4, seed=0)
    make_gate_decisive(model, calibration)
    model.set_budget(fine_ratio=fine_ratio)
    return model, calibration


def assert_budget_decisions_are_robust(outputs, num_split: int) -> None:
    """The k-th and (k+1)-th highest split logits of every image are well apart: no near-tie at the top-k boundary."""
    logits = torch.logit(outputs.split_probs.double()).sort(dim=1, descending=True).values
    assert (logits[:, num_split - 1] - logits[:, num_split]).min() > 1e-3


# 1. threshold mode: ragged token counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gathered_equals_masked_equals_single_images_with_ragged_gate_decisions(attn_implementation):
    """Unlike the forced-`split_mask` checks of test_modeling_msvit, the gate takes the decisions (threshold mode)."""
    model = MSViTForImageClassification(tiny_config(attn_implementation=attn_implementation)).eval()
    pixel_values = images(8, seed=1)
    make_gate_decisive(model, pixel_values)
    assert model.config.fine_ratio_budget is None
    with torch.no_grad():
        gathered = model(pixel_values, token_path="gathered")
        masked = model(pixel_values, token_path="masked")
        singles = [model(pixel_values[i : i + 1]) for i in range(8)]

    # the batch is ragged, the gate's decisions are far from the threshold, and every path took the same decisions
    assert (gathered.split_probs - model.config.gate_threshold).abs().min() > 1e-3
    counts = gathered.token_counts
    assert len(set(counts.tolist())) >= 5 and counts.max() - counts.min() >= 3 * 8
    assert torch.equal(gathered.split_mask, gathered.split_probs > model.config.gate_threshold)
    assert torch.equal(masked.split_mask, gathered.split_mask)
    assert torch.equal(torch.cat([single.split_mask for single in singles]), gathered.split_mask)
    assert torch.equal(masked.token_counts, gathered.token_counts)

    single_logits = torch.cat([single.logits for single in singles])
    assert (masked.logits - gathered.logits).abs().max() <= 1e-5
    assert (single_logits - gathered.logits).abs().max() <= 1e-5
    # the logits do depend on the decisions: padding or inactive tokens leaking in would show far above 1e-5
    with torch.no_grad():
        all_fine = model(pixel_values, split_mask=torch.ones_like(gathered.split_mask)).logits
    assert (all_fine - gathered.logits).abs().max() > 1e-3


# 2. budget mode: set_budget ------------------------------------------------------------------------------------------


# Nc = 4 x 6 = 24 coarse regions (a non-square 32x48 config): round(f * 24) by hand
NON_SQUARE_SPLITS = {0.0: 0, 0.1: 2, 0.3: 7, 0.5: 12, 0.7: 17, 1.0: 24}
# a 40x24 image on the square 32x32 model, with interpolated position embeddings: Nc = 5 x 3 = 15
INTERPOLATED_SPLITS = {0.0: 0, 0.25: 4, 0.6: 9, 1.0: 15}


def test_set_budget_splits_exactly_round_fine_ratio_times_num_coarse_on_non_square_images():
    model = MSViTForImageClassification(tiny_config(image_size=[32, 48])).eval()
    pixel_values = images(4, seed=2, height=32, width=48)
    make_gate_decisive(model, pixel_values)
    with torch.no_grad():
        for fine_ratio, num_split in NON_SQUARE_SPLITS.items():
            model.set_budget(fine_ratio=fine_ratio)
            assert model.config.fine_ratio_budget == fine_ratio
            outputs = model(pixel_values)
            assert outputs.split_mask.shape == (4, 24)
            assert outputs.split_mask.sum(1).tolist() == [num_split] * 4
            assert outputs.token_counts.tolist() == [1 + 24 + 3 * num_split] * 4
            # one static length for the batch: no padding
            hidden = model.msvit(pixel_values)
            assert hidden.last_hidden_state.shape[1] == 1 + 24 + 3 * num_split and hidden.token_mask.all()
            if num_split in (0, 24):  # the extremes are the all-coarse and all-fine forced decisions
                forced = model(pixel_values, split_mask=torch.full((4, 24), num_split == 24))
                assert (forced.logits - outputs.logits).abs().max() <= 1e-5


@pytest.mark.parametrize("gate_loss_type", ["ratio", "gbas"])
def test_set_budget_on_an_interpolated_image_size(gate_loss_type):
    model = MSViTForImageClassification(tiny_config(gate_loss_type=gate_loss_type)).eval()
    make_gate_decisive(model, images(4, seed=3))
    pixel_values = images(4, seed=3, height=40, width=24)
    with torch.no_grad():
        for fine_ratio, num_split in INTERPOLATED_SPLITS.items():
            model.set_budget(fine_ratio=fine_ratio)
            outputs = model(pixel_values, interpolate_pos_encoding=True)
            assert outputs.split_mask.sum(1).tolist() == [num_split] * 4
            assert outputs.token_counts.tolist() == [1 + 15 + 3 * num_split] * 4


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(), r"Pass exactly one of `fine_ratio`.*got fine_ratio=None, threshold=None"),
        (dict(fine_ratio=0.5, threshold=0.5), r"Pass exactly one of `fine_ratio`.*got fine_ratio=0.5, threshold=0.5"),
        (dict(fine_ratio=1.5), r"`fine_ratio` must lie in \[0, 1\], got 1.5"),
        (dict(fine_ratio=-0.1), r"`fine_ratio` must lie in \[0, 1\], got -0.1"),
        (dict(threshold=0.0), r"`threshold` must lie in \(0, 1\), got 0.0"),
        (dict(threshold=1.0), r"`threshold` must lie in \(0, 1\), got 1.0"),
        (dict(threshold=0.5, num_tokens=41), r"Pass exactly one of .*threshold=0.5, num_tokens=41"),
        # 32 px, 16 coarse regions of 8 px: 1 + 16 + 3 x splits tokens
        (dict(num_tokens=42), r"No layout has 42 tokens: .* 1 \+ 16 \+ 3 x splits .*nearest: 41 or 44"),
        (dict(num_tokens=10), r"No layout has 10 tokens: .*nearest: 17 or 20"),
        (dict(num_tokens=66), r"No layout has 66 tokens: .*nearest: 65"),
    ],
)
def test_set_budget_rejects_bad_arguments_and_leaves_the_config_unchanged(arguments, message):
    model = MSViTForImageClassification(tiny_config(gate_threshold=0.4, fine_ratio_budget=0.25))
    with pytest.raises(ValueError, match=message):
        model.set_budget(**arguments)
    assert model.config.fine_ratio_budget == 0.25 and model.config.gate_threshold == 0.4


def test_a_token_budget_gives_exactly_that_many_tokens():
    model, pixel_values = budget_model(fine_ratio=0.5)
    with torch.no_grad():
        for num_tokens in (17, 41, 65):
            model.set_budget(num_tokens=num_tokens)
            assert model(pixel_values).token_counts.tolist() == [num_tokens] * 4
    # three sizes: 4 top regions over 16 (20 decisions), 1 + 4 + 3 x splits
    three = MSViTForImageClassification(tiny_config(patch_sizes=[4, 8, 16])).eval()
    with torch.no_grad():
        for num_tokens in (5, 35, 65):
            three.set_budget(num_tokens=num_tokens)
            assert three(pixel_values).token_counts.tolist() == [num_tokens] * 4


def test_threshold_after_a_budget_clears_the_budget():
    model, pixel_values = budget_model(fine_ratio=0.5)
    with torch.no_grad():
        assert model(pixel_values).split_mask.sum(1).tolist() == [8] * 4
        model.set_budget(threshold=0.3)
        assert model.config.fine_ratio_budget is None and model.config.gate_threshold == 0.3
        outputs = model(pixel_values)
    assert torch.equal(outputs.split_mask, outputs.split_probs > 0.3)
    assert len(set(outputs.token_counts.tolist())) > 1  # back to ragged counts


def test_budget_and_threshold_are_saved_and_reloaded(tmp_path):
    model, pixel_values = budget_model(fine_ratio=0.75)  # round(0.75 * 16) = 12 splits
    with torch.no_grad():
        expected = model(pixel_values)
    model.save_pretrained(tmp_path / "budget")
    assert (tmp_path / "budget" / "model.safetensors").is_file() and not list(tmp_path.glob("budget/*.bin"))
    reloaded = MSViTForImageClassification.from_pretrained(tmp_path / "budget").eval()
    assert reloaded.config.fine_ratio_budget == 0.75
    with torch.no_grad():
        outputs = reloaded(pixel_values)
    assert outputs.token_counts.tolist() == [1 + 16 + 3 * 12] * 4
    assert torch.equal(outputs.split_mask, expected.split_mask) and torch.equal(outputs.logits, expected.logits)

    reloaded.set_budget(threshold=0.7)
    reloaded.save_pretrained(tmp_path / "threshold")
    threshold = MSViTForImageClassification.from_pretrained(tmp_path / "threshold").eval()
    assert threshold.config.fine_ratio_budget is None and threshold.config.gate_threshold == 0.7
    with torch.no_grad():
        outputs = threshold(pixel_values)
    assert torch.equal(outputs.split_mask, outputs.split_probs > 0.7)


# 3.-5. the static fixed-budget path: torch.compile, torch.export, ONNX -----------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler"
)
def test_fixed_budget_compiles_to_one_full_graph_without_recompiling(fresh_dynamo):
    model, first = budget_model(fine_ratio=0.5)
    second = images(4, seed=5)
    compiled = torch.compile(model, fullgraph=True)  # default inductor backend: ~15 s cold on 2 CPU cores
    with torch.no_grad():
        eager = [model(first), model(second)]
        outputs = [compiled(first), compiled(second)]

    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    assert not torch.equal(eager[0].split_mask, eager[1].split_mask)  # two batches with different decisions
    for expected, actual in zip(eager, outputs):
        assert_budget_decisions_are_robust(expected, num_split=8)
        assert torch.equal(actual.split_mask, expected.split_mask)
        assert torch.equal(actual.token_counts, expected.token_counts)
        assert (actual.logits - expected.logits).abs().max() <= 1e-4


def test_threshold_mode_is_not_fullgraph_safe_but_compiles_with_graph_breaks(fresh_dynamo):
    """Ragged counts make the padded length data-dependent: fullgraph tracing fails, plain compile breaks the graph."""
    model = MSViTForImageClassification(tiny_config(attn_implementation="sdpa")).eval()
    pixel_values = images(4, seed=0)
    make_gate_decisive(model, pixel_values)
    with torch.no_grad():
        expected = model(pixel_values)
        with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="data-dependent"):
            torch.compile(model, fullgraph=True, backend="eager")(pixel_values)
        torch._dynamo.reset()
        counters.clear()
        outputs = torch.compile(model, backend="eager")(pixel_values)
    assert len(set(expected.token_counts.tolist())) > 1
    assert counters["graph_break"] and counters["stats"]["unique_graphs"] > 1
    assert (outputs.logits - expected.logits).abs().max() <= 1e-5


def test_fixed_budget_torch_export_runs_on_other_images():
    model, example = budget_model(fine_ratio=0.5)
    exported = torch.export.export(model, (example,))
    other = images(4, seed=6)
    with torch.no_grad():
        expected = model(other)
        actual = exported.module()(other)
    assert_budget_decisions_are_robust(expected, num_split=8)
    with torch.no_grad():
        assert not torch.equal(expected.split_mask, model(example).split_mask)
    assert torch.equal(actual.split_mask, expected.split_mask)
    assert (actual.logits - expected.logits).abs().max() <= 1e-4


def test_fixed_budget_onnx_export_runs_in_onnxruntime_on_other_images():
    pytest.importorskip("onnxscript", reason="ONNX export (dynamo=True) needs onnxscript (see requirements.txt)")
    pytest.importorskip("onnxruntime", reason="running the exported ONNX program needs onnxruntime")
    model, example = budget_model(fine_ratio=0.5)
    onnx_program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
    other = images(4, seed=6)
    with torch.no_grad():
        expected = model(other)
    results = onnx_program(other)  # runs the ONNX graph with onnxruntime
    assert_budget_decisions_are_robust(expected, num_split=8)
    assert (results[0] - expected.logits).abs().max() <= 1e-4
    # the split decisions come out too (their position among the outputs is the output dataclass's field order)
    assert any(result.dtype == torch.bool and torch.equal(result, expected.split_mask) for result in results[1:]), (
        "no ONNX output equals the eager split mask"
    )


def test_fixed_budget_base_model_exports_with_a_static_sequence_length():
    """The base model's outputs (hidden states, token layout) are static too: 1 + 16 + 3 * 8 = 41 tokens."""
    model = MSViTModel(tiny_config(attn_implementation="sdpa")).eval()
    make_gate_decisive(model, images(4, seed=0))
    model.set_budget(fine_ratio=0.5)
    exported = torch.export.export(model, (images(2, seed=0),))
    other = images(2, seed=7)
    with torch.no_grad():
        expected = model(other)
        actual = exported.module()(other)
    assert_budget_decisions_are_robust(expected, num_split=8)
    assert actual.last_hidden_state.shape == (2, 41, 32) and actual.token_mask.all()
    assert torch.equal(actual.token_index, expected.token_index)
    assert (actual.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-4
