"""The counterfactual gate objective and the training-free gates."""

import pytest
import torch
import torch.nn.functional as F

import modeling_msvit.modeling_msvit as modeling
from modeling_msvit import MSViTForImageClassification, MSViTForSemanticSegmentation
from modeling_msvit.gate_losses import flipped_layouts, sample_training_layouts, split_loss_drop
from modeling_msvit.macs_msvit import mlp_macs
from modeling_msvit.mixed_scale_tokens import build_scale_tree, close_splits
from modeling_msvit.modeling_msvit import MSViTGate
from tests.conftest import tiny_config, tiny_vit_config


NUM_COARSE = 16


# counterfactual objective: pure functions --------------------------------------------------------------------


def test_flipped_layouts_and_loss_drops_by_hand():
    split_mask = torch.tensor([[True, False, False], [False, False, True]])
    flips = torch.tensor([[0, 1], [2, 0]])
    expected = torch.tensor([[False, False, False], [True, True, False], [False, False, False], [True, False, True]])
    assert torch.equal(flipped_layouts(split_mask, flips), expected)
    layout_losses = torch.tensor([1.0, 2.0])
    flipped_losses = torch.tensor([[1.5, 0.25], [2.5, 1.0]])
    # image 0: region 0 was split (kept costs 1.5, split 1.0: drop 0.5); region 1 was kept (1.0 - 0.25 = 0.75)
    # image 1: region 2 was split (2.5 - 2.0 = 0.5); region 0 was kept (2.0 - 1.0 = 1.0)
    drops = split_loss_drop(split_mask, flips, layout_losses, flipped_losses)
    torch.testing.assert_close(drops, torch.tensor([[0.5, 0.75], [0.5, 1.0]]))


@pytest.mark.parametrize("mode", ["gate", "uniform"])
def test_training_layouts_split_a_random_number_of_regions(mode):
    torch.manual_seed(0)
    # logits a hundredth of a nat apart, as a counterfactual gate's are for empty regions: the ranking must hold anyway
    logits = torch.linspace(-0.04, 0.04, NUM_COARSE).expand(4096, -1).clone().requires_grad_()
    layouts = sample_training_layouts(logits, mode, build_scale_tree((8, 8), 2, 2))
    assert layouts.dtype == torch.bool and not layouts.requires_grad
    counts = layouts.sum(1)
    assert counts.min() == 0 and counts.max() == NUM_COARSE and 7 < counts.float().mean() < 9
    top_k = torch.arange(NUM_COARSE) >= NUM_COARSE - counts[:, None]  # the k highest logits
    if mode == "gate":
        assert torch.equal(layouts, top_k)
    else:  # every region equally likely, whatever its logit
        assert not torch.equal(layouts, top_k)
        torch.testing.assert_close(layouts.float().mean(0), torch.full((NUM_COARSE,), 0.5), atol=0.04, rtol=0)


def test_training_layouts_break_ties_at_random():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, -1.0]).expand(4096, -1)
    layouts = sample_training_layouts(logits, "gate", build_scale_tree((4, 6), 2, 2))
    three = layouts[layouts.sum(1) == 3]  # the highest logit and two of the four tied ones, each pair equally often
    assert three[:, 0].all() and not three[:, 5].any()
    torch.testing.assert_close(three[:, 1:5].float().mean(0), torch.full((4,), 0.5), atol=0.08, rtol=0)


@pytest.mark.parametrize("mode", ["gate", "uniform"])
def test_training_layouts_of_a_region_tree_split_exactly_that_many_top_down(mode):
    torch.manual_seed(0)
    tree = build_scale_tree((8, 8), 2, 3)  # 4 top regions over 16 (20 decisions)
    logits = torch.randn(4096, tree.num_decisions)
    layouts = sample_training_layouts(logits, mode, tree)
    assert torch.equal(layouts, close_splits(layouts, tree))
    counts = layouts.sum(1)
    assert counts.min() == 0 and counts.max() == 20 and 9 < counts.float().mean() < 11
    if mode == "uniform":  # every top region equally likely
        top = layouts[:, :4].float().mean(0)
        assert (top - top.mean()).abs().max() < 0.04


# counterfactual objective: in the model ----------------------------------------------------------------------


def record_flips(monkeypatch) -> list[torch.Tensor]:
    recorded = []
    original = modeling.sample_flips

    def sample_flips(*args, **kwargs):
        recorded.append(original(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(modeling, "sample_flips", sample_flips)
    return recorded


def training_forward(monkeypatch, model, pixel_values, labels):
    """One training forward with labels, and the regions it flipped `(B, K)`; the model is left in eval mode."""
    recorded = record_flips(monkeypatch)
    outputs = model(pixel_values, labels=labels)
    (flips,) = recorded
    model.eval()
    return outputs, flips


@pytest.mark.parametrize("token_path", ["masked", "gathered"])
@pytest.mark.parametrize("num_flips", [1, 3])
def test_gate_loss_regresses_the_measured_loss_drop_of_each_flip(monkeypatch, pixel_values, token_path, num_flips):
    config = tiny_config(
        train_token_path=token_path,
        counterfactual_flips=num_flips,
        gate_loss_weight=0.5,
        counterfactual_target_scale=10.0,
    )
    model = MSViTForImageClassification(config).train()
    labels = torch.arange(8) % 5
    outputs, flips = training_forward(monkeypatch, model, pixel_values, labels)
    assert flips.shape == (8, num_flips)
    with torch.no_grad():

        def losses(split_mask):
            logits = model(pixel_values.repeat_interleave(len(split_mask) // 8, 0), split_mask=split_mask).logits
            return F.cross_entropy(logits, labels.repeat_interleave(len(split_mask) // 8), reduction="none")

        layout = outputs.split_mask
        flipped = losses(flipped_layouts(layout, flips)).view(8, num_flips)
        drop = split_loss_drop(layout, flips, losses(layout), flipped)
        logits = model.msvit(pixel_values, split_mask=layout).split_logits.gather(1, flips)
    expected = ((logits - 10.0 * drop) ** 2).mean()
    torch.testing.assert_close(outputs.gate_loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        outputs.loss, F.cross_entropy(outputs.logits, labels) + 0.5 * expected, atol=1e-4, rtol=0
    )
    assert drop.abs().max() > 0  # the flips changed the loss


def test_gate_gradient_comes_from_the_regression_and_forced_decisions_have_none(pixel_values):
    model = MSViTForImageClassification(tiny_config()).train()
    labels = torch.arange(8) % 5
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".gate." in name
    model(pixel_values, labels=labels).loss.backward()
    for parameter in model.msvit.embeddings.gate.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    forced = model(pixel_values, labels=labels, split_mask=torch.ones(8, NUM_COARSE, dtype=torch.bool))
    assert forced.gate_loss is None
    model.eval()  # inference: the task loss alone
    outputs = model(pixel_values, labels=labels)
    assert outputs.gate_loss is None
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels))


def test_segmentation_regresses_per_image_loss_drops(monkeypatch):
    model = MSViTForSemanticSegmentation(
        tiny_config(num_labels=4, counterfactual_flips=2, counterfactual_target_scale=10.0)
    ).train()
    pixel_values, labels = torch.randn(3, 3, 32, 32), torch.randint(0, 4, (3, 32, 32))
    labels[0, :8] = 255
    outputs, flips = training_forward(monkeypatch, model, pixel_values, labels)
    with torch.no_grad():

        def losses(split_mask):
            repeat = len(split_mask) // 3
            logits = model(pixel_values.repeat_interleave(repeat, 0), split_mask=split_mask).logits
            return torch.stack(
                [
                    F.cross_entropy(
                        F.interpolate(logit[None], size=(32, 32), mode="bilinear", align_corners=False),
                        label[None],
                        ignore_index=255,
                    )
                    for logit, label in zip(logits, labels.repeat_interleave(repeat, 0))
                ]
            )

        layout = outputs.split_mask
        drop = split_loss_drop(layout, flips, losses(layout), losses(flipped_layouts(layout, flips)).view(3, 2))
        logits = model.msvit(pixel_values, split_mask=layout).split_logits.gather(1, flips)
    torch.testing.assert_close(outputs.gate_loss, ((logits - 10.0 * drop) ** 2).mean(), rtol=1e-4, atol=1e-5)


# training-free gates ---------------------------------------------------------------------------------------------


def test_rule_gates_score_regions_by_their_own_pixels():
    # region 0 constant, region 1 half -1 / half +1 (two of 32 bins), region 2 spread over 4 bins equally
    pixel_values = torch.zeros(1, 3, 32, 32)
    pixel_values[..., :8, 8:16] = torch.tensor([-1.0, 1.0]).repeat(4)[None, None, None, :]
    pixel_values[..., :8, 16:24] = torch.tensor([-0.99, -0.49, 0.01, 0.51]).repeat(2)[None, None, None, :]
    expected = {
        "entropy": torch.tensor([0.0, 2.0 / 5.0 * 0.5, 2.0 / 5.0]),  # log 2 / log 32, log 4 / log 32
        "std": torch.tanh(torch.tensor([0.0, 1.0, torch.tensor([-0.99, -0.49, 0.01, 0.51]).std(unbiased=False)])),
    }
    for rule, probabilities in expected.items():
        model = MSViTForImageClassification(tiny_config(gate_type=rule)).eval()
        assert not any(".gate." in name for name, _ in model.named_parameters())
        split_probs = model(pixel_values).split_probs[0, :3]
        torch.testing.assert_close(split_probs, probabilities.clamp_min(1e-6), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["entropy", "std"])
def test_any_vit_becomes_a_budgeted_msvit_without_training(tmp_path, rule):
    from transformers import ViTForImageClassification

    vit = ViTForImageClassification(tiny_vit_config()).eval()
    model = MSViTForImageClassification.from_vit(vit, gate_type=rule, fine_ratio_budget=0.5).eval()
    # uniform noise whose spread grows from the left to the right of the image (within the entropy bins' range)
    spread = torch.linspace(0.05, 1.9, 32)[None, None, None, :]
    pixel_values = (torch.rand(4, 3, 32, 32) - 0.5) * spread
    with torch.no_grad():
        outputs = model(pixel_values)
    assert outputs.split_mask.sum(1).tolist() == [8] * 4
    by_column = outputs.split_mask.view(4, 4, 4)  # (image, coarse row, coarse column)
    assert by_column[..., 2:].all() and not by_column[..., :2].any()  # the high-contrast half
    # MACs: the rule reads every value of each region once, instead of the MLP
    macs = model.compute_macs(outputs.token_counts)
    learned = MSViTForImageClassification.from_vit(vit)
    mlp = mlp_macs(MSViTGate.layer_sizes(learned.config))
    assert (learned.compute_macs(outputs.token_counts) - macs).tolist() == [16 * mlp - 16 * 3 * 8 * 8] * 4

    model.save_pretrained(tmp_path)
    reloaded = MSViTForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.gate_type == rule
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, outputs.logits)
        exported = torch.export.export(model, (pixel_values,))
        torch.testing.assert_close(exported.module()(pixel_values).logits, outputs.logits)


# residual gate: a rule plus a learned correction -------------------------------------------------------------


@pytest.mark.parametrize("rule", ["entropy", "std"])
@pytest.mark.parametrize("gate_input", ["downscaled_pixels", "pixels"])
def test_residual_gate_starts_as_its_rule_exactly(rule, gate_input):
    from transformers import ViTForImageClassification

    vit = ViTForImageClassification(tiny_vit_config()).eval()
    residual = MSViTForImageClassification.from_vit(vit, gate_residual_rule=rule, gate_input=gate_input).eval()
    plain_rule = MSViTForImageClassification.from_vit(vit, gate_type=rule).eval()
    torch.manual_seed(0)
    pixel_values = torch.rand(6, 3, 32, 32) * 2 - 1
    pixel_values[:, :, :8, :16] = -1.0  # two empty regions per image: a tie, as on a black canvas
    gate = residual.msvit.embeddings.gate
    assert gate.rule_scale.item() == 1.0 and gate.split_logit_bias.item() == 0.0
    assert gate.layers[-1].weight.abs().max().item() == 0.0
    with torch.no_grad():
        # the logit is the rule's score in [0, 1], so the ranking is the rule's
        logits = residual.msvit.embeddings.predict_split_logits(pixel_values)
        rule_probs = torch.sigmoid(plain_rule.msvit.embeddings.predict_split_logits(pixel_values))
        torch.testing.assert_close(logits, rule_probs.clamp_min(1e-6), rtol=0, atol=1e-6)
        for ratio in (0.125, 0.25, 0.5, 0.75):
            residual.set_budget(fine_ratio=ratio)
            plain_rule.set_budget(fine_ratio=ratio)
            expected = plain_rule(pixel_values)
            outputs = residual(pixel_values)
            assert torch.equal(outputs.split_mask, expected.split_mask)
            torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=0)
    # MACs: the MLP on each region plus the rule's one pass over its 3 x 8 x 8 values
    counts = torch.tensor([17, 41])
    mlp = mlp_macs(MSViTGate.layer_sizes(residual.config))
    assert MSViTGate.layer_sizes(residual.config)[0] == 3 * (8 if gate_input == "pixels" else 4) ** 2
    rule_macs = plain_rule.compute_macs(counts) - 16 * 3 * 8 * 8
    assert (residual.compute_macs(counts) - rule_macs).tolist() == [16 * mlp + 16 * 3 * 8 * 8] * 2


def test_residual_gate_learns_a_correction_and_round_trips(tmp_path, pixel_values):
    model = MSViTForImageClassification(tiny_config(gate_residual_rule="std", gate_input="pixels")).train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".gate." in name
    model(pixel_values, labels=torch.arange(8) % 5).loss.backward()
    gate = model.msvit.embeddings.gate
    # every part of the gate hears from the regression: the scale and bias of the rule, and the zero last layer
    for parameter in (gate.rule_scale, gate.split_logit_bias, gate.layers[-1].weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    with torch.no_grad():
        gate.layers[-1].weight.normal_()
        gate.rule_scale.fill_(0.3)
    model.eval().set_budget(fine_ratio=0.5)
    with torch.no_grad():
        expected = model(pixel_values)
    model.save_pretrained(tmp_path)
    reloaded = MSViTForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.gate_residual_rule == "std"
    assert reloaded.msvit.embeddings.gate.rule_scale.item() == pytest.approx(0.3)
    with torch.no_grad():
        outputs = reloaded(pixel_values)
    assert torch.equal(outputs.split_mask, expected.split_mask)
    torch.testing.assert_close(outputs.split_logits, expected.split_logits, rtol=0, atol=0)


def test_neighbourhood_input_reads_the_region_and_its_context():
    model = MSViTForImageClassification(tiny_config(gate_input="neighbourhood", gate_residual_rule="std")).eval()
    # 3 channels: the 8x8 region at full resolution, then 3x3 neighbours downscaled to 4x4
    assert MSViTGate.layer_sizes(model.config)[0] == 3 * 8 * 8 + 9 * 3 * 4 * 4
    gate = model.msvit.embeddings.gate
    with torch.no_grad():
        gate.layers[-1].weight.normal_()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model.msvit.embeddings.predict_split_logits(pixel_values)
        changed = pixel_values.clone()
        changed[:, :, 24:, 24:] += 1.0  # the bottom-right region only
        moved = model.msvit.embeddings.predict_split_logits(changed) != logits
    # the region itself and its three neighbours (in a 4x4 grid) see the change, no other region
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2:, 2:] = True
    assert torch.equal(moved, expected.flatten().expand(2, -1))
    counts = torch.tensor([17, 65])
    mlp = mlp_macs(MSViTGate.layer_sizes(model.config))
    plain = MSViTForImageClassification(tiny_config(gate_type="std"))
    # MLP + one pass of the rule over each region, instead of the rule alone
    assert (model.compute_macs(counts) - plain.compute_macs(counts)).tolist() == [16 * mlp] * 2


def test_residual_rule_is_validated_and_absent_from_old_configs():
    with pytest.raises(ValueError, match="`gate_residual_rule` must be None or one of"):
        tiny_config(gate_residual_rule="variance")
    legacy = tiny_config().to_dict()
    del legacy["gate_residual_rule"]
    assert type(tiny_config()).from_dict(legacy).gate_residual_rule is None


@pytest.mark.parametrize("head", ["classification", "segmentation"])
def test_label_free_target_regresses_the_drop_of_divergence_from_all_fine(monkeypatch, head):
    torch.manual_seed(0)
    config = dict(counterfactual_flips=2, counterfactual_target="all_fine_kl", counterfactual_target_scale=10.0)
    if head == "classification":
        model, labels = MSViTForImageClassification(tiny_config(**config)).train(), torch.arange(4) % 5
    else:
        model = MSViTForSemanticSegmentation(tiny_config(num_labels=4, **config)).train()
        labels = torch.randint(0, 4, (4, 32, 32))
    pixel_values = torch.randn(4, 3, 32, 32)
    outputs, flips = training_forward(monkeypatch, model, pixel_values, labels)
    with torch.no_grad():

        def divergences(split_mask):
            repeat = len(split_mask) // 4
            repeated = pixel_values.repeat_interleave(repeat, 0)
            log_p = model(repeated, split_mask=split_mask).logits.log_softmax(1)
            fine = model(repeated, split_mask=torch.ones_like(split_mask)).logits.log_softmax(1)
            kl = (fine.exp() * (fine - log_p)).sum(1)
            return kl.flatten(1).mean(-1) if kl.ndim > 1 else kl

        layout = outputs.split_mask
        flipped = divergences(flipped_layouts(layout, flips)).view(4, 2)
        drop = split_loss_drop(layout, flips, divergences(layout), flipped)
        logits = model.msvit(pixel_values, split_mask=layout).split_logits.gather(1, flips)
    torch.testing.assert_close(outputs.gate_loss, ((logits - 10.0 * drop) ** 2).mean(), rtol=1e-4, atol=1e-5)
    assert drop.abs().max() > 0
    # all fine is the reference: splitting the last kept region of an image brings the divergence to exactly 0
    assert divergences(torch.ones(4, NUM_COARSE, dtype=torch.bool)).abs().max() < 1e-6


def test_label_free_target_needs_classes():
    model = MSViTForImageClassification(tiny_config(num_labels=1, counterfactual_target="all_fine_kl")).train()
    with pytest.raises(ValueError, match="needs num_labels >= 2"):
        model(torch.randn(2, 3, 32, 32), labels=torch.randn(2))
    with pytest.raises(ValueError, match="`counterfactual_target` must be one of"):
        tiny_config(counterfactual_target="kl")
