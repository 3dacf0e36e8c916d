"""More than two patch sizes: the gate decides top-down over a tree of regions (`config.patch_sizes`).

The tiny three-scale config reads 32 px images with 4 / 8 / 16 px patches: a 2 x 2 grid of top regions, each the root
of a quadtree over 2 x 2 regions of 8 px over 2 x 2 patches of 4 px (D = 4 + 16 = 20 decisions, 64 finest cells).
At 40 px the 16 px grid holds 2 x 2 top regions and the border holds 9 level-1 roots and no finest roots.

The exactness check of size-aware attention generalises: with position embeddings zeroed and images constant over
every root region, each token equals the finest tokens it covers, so every layout, on every path, must give the
all-finest outputs.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTForImageClassification

from modeling_msvit import MSViTConfig, MSViTForImageClassification, MSViTForSemanticSegmentation, MSViTModel
from modeling_msvit.gate_losses import sample_flips
from modeling_msvit.mixed_scale_tokens import close_splits, reachable_decisions, token_counts
from msvit.configuration import load_preset
from tests.conftest import tiny_config, tiny_vit_config
from tests.test_fast_paths import make_gate_decisive


SIZES = [4, 8, 16]


def three_scale(**overrides) -> MSViTConfig:
    return tiny_config(patch_sizes=SIZES, **overrides)


def root_constant_images(model, batch_size: int, size: int, seed: int) -> torch.Tensor:
    """Images constant over every root region of the model's tree at `size` px."""
    tree = model.base_model.scale_tree(size, size)
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch_size, 3, tree.num_candidates + 1, generator=generator)
    # the root covering each finest cell: its highest ancestor
    roots = tree.cell_chain[0].clone()
    for chain in tree.cell_chain[1:]:
        roots = torch.where(chain < tree.num_candidates, chain, roots)
    fine = values[..., roots].view(batch_size, 3, *tree.fine_grid)
    return fine.repeat_interleave(SIZES[0], dim=2).repeat_interleave(SIZES[0], dim=3)


def ragged_tree_layouts(model, batch_size: int, size: int, seed: int = 0) -> torch.Tensor:
    """Effective layouts from none split to all split, of every depth in between."""
    tree = model.base_model.scale_tree(size, size)
    generator = torch.Generator().manual_seed(seed)
    marks = torch.rand(batch_size, tree.num_decisions, generator=generator) < torch.linspace(0, 1, batch_size)[:, None]
    marks[0], marks[-1] = False, True
    return close_splits(marks, tree)


def test_patch_sizes_config_and_two_scales_unchanged(tmp_path):
    config = three_scale()
    assert (config.patch_size, config.coarse_patch_size, config.scale_ratio, config.num_scales) == (4, 16, 2, 3)
    assert MSViTModel(config).scale_tree(32, 32).num_decisions == 20
    config.save_pretrained(tmp_path)
    assert MSViTConfig.from_pretrained(tmp_path).scale_sizes == (4, 8, 16)
    # [patch_size, coarse_patch_size] written out is today's two-scale model, weight for weight and output for output
    two = MSViTForImageClassification(tiny_config()).eval()
    explicit = MSViTForImageClassification(tiny_config(patch_sizes=[4, 8])).eval()
    explicit.load_state_dict(two.state_dict())
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(two(pixel_values).logits, explicit(pixel_values).logits)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("size", [32, 40])
def test_every_layout_equals_all_finest_on_root_constant_images(attn_implementation, size):
    model = MSViTForImageClassification(three_scale(image_size=size, attn_implementation=attn_implementation))
    with torch.no_grad():
        model.msvit.embeddings.position_embeddings.zero_()
    model.eval()
    pixel_values = root_constant_images(model, 6, size, seed=1)
    layouts = ragged_tree_layouts(model, 6, size)
    with torch.no_grad():
        all_finest = model(pixel_values, split_mask=torch.ones_like(layouts)).logits
        outputs = {
            "gathered": model(pixel_values, split_mask=layouts).logits,
            "masked": model(pixel_values, split_mask=layouts, token_path="masked").logits,
            "single images": torch.cat(
                [model(pixel_values[i : i + 1], split_mask=layouts[i : i + 1]).logits for i in range(6)]
            ),
        }
        model.set_budget(fine_ratio=0.3)
        outputs["fixed budget"] = model(pixel_values).logits
    deltas = {path: (logits - all_finest).abs().max().item() for path, logits in outputs.items()}
    assert max(deltas.values()) <= 1e-5, deltas
    # and without the bias the layouts do differ: the check can fail
    model.config.size_aware_attention = False
    with torch.no_grad():
        assert (model(pixel_values, split_mask=layouts).logits - all_finest).abs().max() > 1e-3


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
def test_segmentation_equals_all_finest_on_root_constant_images(decoder_type):
    config = three_scale(image_size=40, num_labels=3, decoder_type=decoder_type)
    model = MSViTForSemanticSegmentation(config)
    with torch.no_grad():
        model.msvit.embeddings.position_embeddings.zero_()
    model.eval()
    pixel_values = root_constant_images(model, 4, 40, seed=2)
    layouts = ragged_tree_layouts(model, 4, 40)
    with torch.no_grad():
        all_finest = model(pixel_values, split_mask=torch.ones_like(layouts)).logits
        for token_path in ("gathered", "masked"):
            logits = model(pixel_values, split_mask=layouts, token_path=token_path).logits
            assert logits.shape == (4, 3, 10, 10) and (logits - all_finest).abs().max() <= 1e-5


def test_paths_agree_on_ordinary_images_with_gate_decisions():
    model = MSViTForImageClassification(three_scale(image_size=40)).eval()
    pixel_values = torch.randn(6, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    make_gate_decisive(model, pixel_values)
    model.set_budget(threshold=[0.4, 0.6])
    with torch.no_grad():
        outputs = model(pixel_values)
        tree = model.msvit.scale_tree(40, 40)
        probs = outputs.split_probs
        thresholds = torch.where(tree.decision_levels == 1, 0.4, 0.6)
        assert torch.equal(outputs.split_mask, close_splits(probs > thresholds, tree))
        assert len(set(outputs.token_counts.tolist())) > 1
        masked = model(pixel_values, split_mask=outputs.split_mask, token_path="masked").logits
        single = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(6)])
        model.config.ragged_execution = "padded"
        padded = model(pixel_values).logits
    for logits in (masked, single, padded):
        assert (logits - outputs.logits).abs().max() <= 1e-5
    assert torch.equal(model.predict_token_counts(pixel_values), outputs.token_counts)


def test_fixed_budget_is_an_exact_top_down_token_count():
    model = MSViTForImageClassification(three_scale(image_size=40)).eval()
    pixel_values = torch.randn(4, 3, 40, 40)
    make_gate_decisive(model, pixel_values)
    tree = model.msvit.scale_tree(40, 40)
    assert (tree.num_decisions, tree.num_roots) == (4 + 25, 4 + 9)
    with torch.no_grad():
        for fine_ratio in (0.0, 0.2, 0.5, 1.0):
            model.set_budget(fine_ratio=fine_ratio)
            outputs = model(pixel_values)
            num_split = round(fine_ratio * tree.num_decisions)
            assert outputs.split_mask.sum(1).tolist() == [num_split] * 4
            assert torch.equal(outputs.split_mask, close_splits(outputs.split_mask, tree))
            assert outputs.token_counts.tolist() == [1 + 13 + 3 * num_split] * 4
            assert model.msvit(pixel_values).token_mask.all()


def test_fixed_budget_exports_and_compiles_with_three_scales():
    model = MSViTForImageClassification(three_scale(attn_implementation="sdpa")).eval()
    example, other = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    make_gate_decisive(model, example)
    model.set_budget(fine_ratio=0.5)
    exported = torch.export.export(model, (example,))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = model(other)
        for actual in (exported.module()(other), compiled(other)):
            assert torch.equal(actual.split_mask, expected.split_mask)
            assert (actual.logits - expected.logits).abs().max() <= 1e-4


def test_from_vit_with_three_scales_equals_the_vit_when_every_region_is_split():
    vit = ViTForImageClassification(tiny_vit_config(image_size=40)).eval()
    model = MSViTForImageClassification.from_vit(vit, patch_sizes=SIZES).eval()
    pixel_values = torch.randn(2, 3, 40, 40)
    tree = model.msvit.scale_tree(40, 40)
    with torch.no_grad():
        logits = model(pixel_values, split_mask=torch.ones(2, tree.num_decisions, dtype=torch.bool)).logits
    torch.testing.assert_close(logits, vit(pixel_values).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must start at the ViT's patch size"):
        MSViTForImageClassification.from_vit(vit, patch_sizes=[8, 16, 32])


def test_analytic_macs_agree_with_the_flop_counter_at_224_px():
    """16 / 32 / 64 px at 224 px: 3 x 3 top regions and a 32 px border of 13 roots (D = 9 + 49 = 58)."""
    config = load_preset("msvit-tiny", num_labels=1000, attn_implementation="eager", patch_sizes=[16, 32, 64])
    model = MSViTForImageClassification(config).eval()
    pixel_values = torch.randn(1, 3, 224, 224)
    tree = model.msvit.scale_tree(224, 224)
    assert (tree.num_decisions, tree.num_roots) == (58, 22)
    for num_split in (0, 20, 58):
        split_mask = torch.zeros(1, 58, dtype=torch.bool)
        split_mask[0, :num_split] = True  # the top regions and their children first: already closed
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            outputs = model(pixel_values, split_mask=split_mask)
        assert outputs.token_counts.item() == 1 + 22 + 3 * num_split
        analytic = model.compute_macs(outputs.token_counts).item()
        measured = counter.get_total_flops() / 2
        assert abs(measured - analytic) / analytic < 0.02, (num_split, measured, analytic)


@pytest.mark.parametrize("gate_objective", ["counterfactual", "straight_through"])
def test_every_objective_trains_at_every_level(gate_objective):
    model = MSViTForImageClassification(three_scale(gate_objective=gate_objective, gate_loss_type="gbas")).train()
    pixel_values, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    outputs = model(pixel_values, labels=labels)
    tree = model.msvit.scale_tree(32, 32)
    assert torch.isfinite(outputs.loss) and outputs.split_mask.shape == (8, 20)
    assert torch.equal(outputs.split_mask, close_splits(outputs.split_mask, tree))
    outputs.loss.backward()
    gate = model.msvit.embeddings.gate
    assert gate.layers[0].weight.grad.abs().sum() > 0
    # both levels' prior logits learn
    assert (gate.split_logit_bias.grad != 0).all()
    if gate_objective == "straight_through":
        assert model.msvit.gate_criterion.prior_mean_logits.shape == (20,)


def test_one_prior_logit_for_every_level():
    """`gate_prior_per_level=False` adds one prior logit at every level: the per-level gate with both priors equal to
    it gives the same logits, and with two sizes both are one model."""
    shared = MSViTForImageClassification(three_scale(gate_prior_per_level=False)).eval()
    per_level = MSViTForImageClassification(three_scale()).eval()
    assert shared.msvit.embeddings.gate.split_logit_bias.shape == (1,)
    assert per_level.msvit.embeddings.gate.split_logit_bias.shape == (2,)
    state = shared.state_dict()
    with torch.no_grad():
        state["msvit.embeddings.gate.split_logit_bias"] = torch.tensor([0.7])
        shared.load_state_dict(state)
        per_level.load_state_dict({**state, "msvit.embeddings.gate.split_logit_bias": torch.tensor([0.7, 0.7])})
        pixel_values = torch.randn(4, 3, 32, 32)
        logits = shared(pixel_values).split_logits
        assert torch.equal(per_level(pixel_values).split_logits, logits)
        # a prior per level moves the level-2 decisions (the 4 top regions) against the level-1 ones
        per_level.msvit.embeddings.gate.split_logit_bias[1] += 2.0
        shifted = per_level(pixel_values).split_logits - logits
    levels = per_level.msvit.scale_tree(32, 32).decision_levels
    torch.testing.assert_close(shifted, 2.0 * (levels == 2).float().expand(4, -1), rtol=0, atol=1e-6)
    two = MSViTForImageClassification(tiny_config(gate_prior_per_level=False)).eval()
    two_per_level = MSViTForImageClassification(tiny_config()).eval()
    two_per_level.load_state_dict(two.state_dict())
    with torch.no_grad():
        assert torch.equal(two(pixel_values).logits, two_per_level(pixel_values).logits)


def test_flips_only_touch_decisions_that_count():
    model = MSViTModel(three_scale())
    tree = model.scale_tree(32, 32)
    split = close_splits(torch.rand(64, 20) < 0.5, tree)
    reachable = reachable_decisions(split, tree)
    flips = sample_flips(reachable, num_flips=8, guaranteed=tree.num_decision_roots)
    assert flips.shape == (64, 4)  # at most the 4 top regions every layout can flip
    assert reachable.gather(1, flips).all()
    assert token_counts(split, tree).min() >= 1 + 4
