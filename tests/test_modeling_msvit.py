import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification

from modeling_msvit import MSViTForImageClassification, MSViTModel
from tests.conftest import STRAIGHT_THROUGH, tiny_config, tiny_vit_config


NUM_COARSE, RATIO = 16, 2  # tiny config: 4x4 coarse grid, 2x2 fine children per region


def random_split_masks(batch_size: int, seed: int = 0) -> torch.Tensor:
    """Different decisions for every image, including the all-coarse and all-fine corner cases."""
    masks = torch.rand(batch_size, NUM_COARSE, generator=torch.Generator().manual_seed(seed)) < torch.linspace(
        0, 1, batch_size
    ).unsqueeze(1)
    masks[0], masks[-1] = False, True
    return masks


def test_output_shapes_and_token_counts_for_forced_decisions(config, pixel_values):
    model = MSViTForImageClassification(config).eval()
    split_mask = random_split_masks(8)
    outputs = model(pixel_values, split_mask=split_mask)
    expected_counts = 1 + NUM_COARSE + (RATIO**2 - 1) * split_mask.sum(1)
    assert outputs.logits.shape == (8, config.num_labels)
    assert outputs.token_counts.tolist() == expected_counts.tolist()
    assert outputs.token_counts[0] == 1 + NUM_COARSE and outputs.token_counts[-1] == 1 + NUM_COARSE * RATIO**2
    assert torch.equal(outputs.split_mask, split_mask)
    assert outputs.split_probs.shape == (8, NUM_COARSE) and outputs.gate_loss is None

    base = model.msvit(pixel_values, split_mask=split_mask)
    assert base.last_hidden_state.shape == (8, int(expected_counts.max()), config.hidden_size)
    assert base.token_mask.sum(1).tolist() == expected_counts.tolist()


@pytest.mark.parametrize("split", [False, True])
def test_all_coarse_and_all_fine_sequence_lengths(config, pixel_values, split):
    model = MSViTModel(config).eval()
    split_mask = torch.full((8, NUM_COARSE), split)
    outputs = model(pixel_values, split_mask=split_mask)
    length = 1 + NUM_COARSE * (RATIO**2 if split else 1)
    assert outputs.last_hidden_state.shape == (8, length, config.hidden_size)
    assert outputs.token_mask.all()


def test_non_square_images_with_interpolated_position_embeddings(config):
    model = MSViTForImageClassification(config).eval()
    pixel_values = torch.randn(2, 3, 32, 48)  # 4x6 coarse grid
    split_mask = torch.zeros(2, 24, dtype=torch.bool)
    split_mask[1, :5] = True
    outputs = model(pixel_values, split_mask=split_mask, interpolate_pos_encoding=True)
    assert outputs.token_counts.tolist() == [1 + 24, 1 + 24 + 3 * 5]
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(pixel_values)


def test_interpolation_to_the_native_size_is_the_identity(config, pixel_values):
    model = MSViTForImageClassification(config).eval()
    torch.testing.assert_close(
        model(pixel_values, interpolate_pos_encoding=True).logits, model(pixel_values).logits, rtol=0, atol=0
    )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_batch_equals_single_images_on_the_gathered_path(pixel_values, attn_implementation):
    config = tiny_config(attn_implementation=attn_implementation)
    model = MSViTForImageClassification(config).eval()
    split_mask = random_split_masks(8)
    batch = model(pixel_values, split_mask=split_mask)
    assert len(set(batch.token_counts.tolist())) > 4  # images of many different lengths share the padded batch
    singles = torch.cat([model(pixel_values[i : i + 1], split_mask=split_mask[i : i + 1]).logits for i in range(8)])
    assert (batch.logits - singles).abs().max() <= 1e-4


def test_batch_equals_single_images_with_gate_decisions(config, pixel_values):
    model = MSViTForImageClassification(config).eval()
    batch = model(pixel_values)
    singles = [model(pixel_values[i : i + 1]) for i in range(8)]
    assert torch.equal(batch.split_mask, torch.cat([single.split_mask for single in singles]))
    assert (batch.logits - torch.cat([single.logits for single in singles])).abs().max() <= 1e-4


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_masked_path_equals_gathered_path(pixel_values, attn_implementation):
    model = MSViTModel(tiny_config(attn_implementation=attn_implementation)).eval()
    split_mask = random_split_masks(8, seed=1)
    masked = model(pixel_values, split_mask=split_mask, token_path="masked")
    gathered = model(pixel_values, split_mask=split_mask, token_path="gathered")
    assert masked.last_hidden_state.shape[1] == 1 + NUM_COARSE + NUM_COARSE * RATIO**2
    cls_delta = (masked.last_hidden_state[:, 0] - gathered.last_hidden_state[:, 0]).abs().max()
    assert cls_delta <= 1e-4
    # every active token has the same output on both paths
    for image in range(8):
        masked_tokens = masked.last_hidden_state[image][masked.token_mask[image]]
        masked_ids = masked.token_index[image][masked.token_mask[image]]
        gathered_tokens = gathered.last_hidden_state[image][gathered.token_mask[image]]
        gathered_ids = gathered.token_index[image][gathered.token_mask[image]]
        assert sorted(masked_ids.tolist()) == sorted(gathered_ids.tolist())
        order = torch.argsort(masked_ids), torch.argsort(gathered_ids)
        assert (masked_tokens[order[0]] - gathered_tokens[order[1]]).abs().max() <= 1e-4


def test_eager_equals_sdpa(pixel_values):
    eager = MSViTForImageClassification(tiny_config(attn_implementation="eager")).eval()
    sdpa = MSViTForImageClassification(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    for token_path in ("gathered", "masked"):
        delta = eager(pixel_values, token_path=token_path).logits - sdpa(pixel_values, token_path=token_path).logits
        assert delta.abs().max() <= 1e-4


def test_attention_weights_ignore_inactive_and_padded_tokens(pixel_values):
    model = MSViTModel(tiny_config(attn_implementation="eager")).eval()
    split_mask = random_split_masks(8)
    for token_path in ("gathered", "masked"):
        outputs = model(pixel_values, split_mask=split_mask, token_path=token_path, output_attentions=True)
        assert len(outputs.attentions) == 2
        weights = outputs.attentions[-1]  # (batch, heads, queries, keys)
        assert weights[~outputs.token_mask[:, None, None, :].expand_as(weights)].abs().max() == 0


@pytest.mark.parametrize("token_path", ["masked", "gathered"])
def test_gate_receives_task_gradient_through_the_straight_through_estimator(pixel_values, token_path):
    model = MSViTForImageClassification(
        tiny_config(gate_loss_weight=0.0, train_token_path=token_path, **STRAIGHT_THROUGH)
    ).train()
    outputs = model(pixel_values, labels=torch.arange(8) % 5)
    assert outputs.gate_loss is not None
    outputs.loss.backward()
    for parameter in model.msvit.embeddings.gate.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0


def test_loss_is_cross_entropy_plus_weighted_ratio_loss(pixel_values):
    config = tiny_config(
        gate_loss_type="ratio", gate_loss_weight=0.5, target_fine_ratio=0.25, gate_temperature=0.5, **STRAIGHT_THROUGH
    )
    model = MSViTForImageClassification(config).train()
    labels = torch.arange(8) % 5
    torch.manual_seed(3)
    outputs = model(pixel_values, labels=labels)
    # the same Gumbel noise, drawn as `gumbel_sigmoid` draws it, gives the soft decisions the ratio loss reads
    torch.manual_seed(3)
    uniform = torch.rand_like(outputs.split_probs).clamp(1e-6, 1 - 1e-6)
    logits = torch.logit(outputs.split_probs.detach())
    soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / 0.5)
    expected_gate_loss = (soft.mean() - 0.25) ** 2
    torch.testing.assert_close(outputs.gate_loss, expected_gate_loss, rtol=1e-4, atol=1e-6)
    expected = torch.nn.functional.cross_entropy(outputs.logits, labels) + 0.5 * expected_gate_loss
    torch.testing.assert_close(outputs.loss, expected, rtol=1e-4, atol=1e-6)

    model.eval()  # inference: the budget or threshold sets the compute; the loss is the task's alone
    outputs = model(pixel_values, labels=labels)
    assert outputs.gate_loss is None
    torch.testing.assert_close(outputs.loss, torch.nn.functional.cross_entropy(outputs.logits, labels))


def test_training_decisions_are_hard_and_vary_with_the_gumbel_noise(pixel_values):
    model = MSViTModel(tiny_config(**STRAIGHT_THROUGH)).train()
    first, second = model(pixel_values), model(pixel_values)
    assert first.split_mask.dtype == torch.bool and not torch.equal(first.split_mask, second.split_mask)
    assert first.last_hidden_state.shape[1] == 1 + NUM_COARSE + NUM_COARSE * RATIO**2  # masked path by default


def test_gradient_checkpointing_matches_plain_backward(pixel_values):
    model = MSViTForImageClassification(tiny_config()).train()
    labels = torch.arange(8) % 5

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)
        model(pixel_values, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert model.msvit.layers[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-5)


def test_threshold_and_budget_decisions(config, pixel_values):
    model = MSViTForImageClassification(config).eval()
    outputs = model(pixel_values)
    assert torch.equal(outputs.split_mask, outputs.split_probs > config.gate_threshold)
    model.config.gate_threshold = 0.9
    assert model(pixel_values).split_mask.sum() <= outputs.split_mask.sum()
    model.config.fine_ratio_budget = 0.25
    budget = model(pixel_values)
    assert budget.split_mask.sum(1).tolist() == [4] * 8
    assert budget.token_counts.tolist() == [1 + NUM_COARSE + 3 * 4] * 8
    # the split regions are those the gate ranks highest (up to ties of the rounded probabilities)
    chosen = budget.split_probs.masked_fill(~budget.split_mask, 2).min(1).values
    others = budget.split_probs.masked_fill(budget.split_mask, -1).max(1).values
    assert torch.all(chosen >= others)


def test_save_and_reload_give_identical_logits(tmp_path, config, pixel_values):
    model = MSViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    for loader in (MSViTForImageClassification, AutoModelForImageClassification):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is MSViTForImageClassification
        assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert type(backbone) is MSViTModel
    assert torch.equal(backbone(pixel_values).last_hidden_state, model.msvit(pixel_values).last_hidden_state)


@pytest.mark.parametrize(
    "overrides",
    [dict(separate_coarse_embedding=True), dict(gate_input="pixels"), dict(gate_input="coarse_embedding")],
)
def test_config_variants_run_and_stay_batch_consistent(pixel_values, overrides):
    model = MSViTForImageClassification(tiny_config(**overrides)).eval()
    batch = model(pixel_values)
    singles = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(8)])
    assert (batch.logits - singles).abs().max() <= 1e-4


def test_bfloat16_model_accepts_float32_pixels(config, pixel_values):
    model = MSViTForImageClassification(config).eval().to(torch.bfloat16)
    assert model(pixel_values).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda: None, "specify `pixel_values`"),
        (lambda: torch.randn(3, 32, 32), "4D tensor"),
        (lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "floating-point"),
        (lambda: torch.randn(1, 1, 32, 32), "1 channels but the model expects 3"),
        (lambda: torch.randn(1, 3, 30, 32), "not a multiple of `patch_size`"),
        (lambda: [[0.0]], "4D tensor"),
    ],
)
def test_bad_pixel_values_raise_clear_errors(config, make_input, message):
    model = MSViTForImageClassification(config).eval()
    with pytest.raises(ValueError, match=message):
        model(make_input())


def test_bad_split_mask_and_token_path_raise_clear_errors(config, pixel_values):
    model = MSViTForImageClassification(config).eval()
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model(pixel_values, split_mask=torch.ones(8, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model(pixel_values, split_mask=torch.ones(8, 16))
    with pytest.raises(ValueError, match="token_path"):
        model(pixel_values, token_path="packed")


def test_return_dict_false_gives_a_tuple(config, pixel_values):
    model = MSViTForImageClassification(config).eval()
    outputs = model(pixel_values, return_dict=False)
    assert isinstance(outputs, tuple) and torch.equal(outputs[0], model(pixel_values).logits)


def test_flex_attention_equals_eager_at_inference(pixel_values):
    # torch implements flex attention's backward only on GPUs, so the CPU check is inference-only
    eager = MSViTForImageClassification(tiny_config(attn_implementation="eager")).eval()
    flex = MSViTForImageClassification(tiny_config(attn_implementation="flex_attention")).eval()
    flex.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for token_path in ("gathered", "masked"):
            delta = (
                eager(pixel_values, token_path=token_path).logits - flex(pixel_values, token_path=token_path).logits
            )
            assert delta.abs().max() <= 1e-4


@pytest.mark.parametrize("target", [0.1, 0.5, 0.8])
def test_straight_through_gate_starts_at_the_target_fine_ratio(target):
    model = MSViTForImageClassification(tiny_config(target_fine_ratio=target, **STRAIGHT_THROUGH))
    torch.testing.assert_close(
        torch.sigmoid(model.msvit.embeddings.gate.split_logit_bias), torch.tensor([target]), rtol=0, atol=1e-6
    )
    converted = MSViTForImageClassification.from_vit(_tiny_vit(), target_fine_ratio=target, **STRAIGHT_THROUGH)
    torch.testing.assert_close(
        torch.sigmoid(converted.msvit.embeddings.gate.split_logit_bias), torch.tensor([target]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("target", [0.1, 0.5, 0.8])
def test_counterfactual_gate_starts_at_no_predicted_loss_drop_whatever_the_target(target):
    # its logit regresses a loss drop: a prior of logit(target) would rank unlearnt regions first or last
    for model in (
        MSViTForImageClassification(tiny_config(target_fine_ratio=target)),
        MSViTForImageClassification.from_vit(_tiny_vit(), target_fine_ratio=target),
    ):
        assert model.config.gate_objective == "counterfactual"
        assert model.msvit.embeddings.gate.split_logit_bias.tolist() == [0.0]


def _tiny_vit():
    from transformers import ViTForImageClassification

    return ViTForImageClassification(tiny_vit_config(num_hidden_layers=1))


def test_masked_softmax_path_equals_key_mask_forward_and_reaches_inactive_tokens(pixel_values):
    key_mask = MSViTForImageClassification(tiny_config(gate_loss_weight=0.0, **STRAIGHT_THROUGH)).eval()
    soft = MSViTForImageClassification(
        tiny_config(gate_loss_weight=0.0, masked_path_attention="masked_softmax", **STRAIGHT_THROUGH)
    )
    soft.load_state_dict(key_mask.state_dict())
    soft.eval()
    split_mask = random_split_masks(8)
    expected = key_mask(pixel_values, split_mask=split_mask, token_path="masked").logits
    assert (soft(pixel_values, split_mask=split_mask, token_path="masked").logits - expected).abs().max() <= 1e-5
    assert (soft(pixel_values).logits - key_mask(pixel_values).logits).abs().max() <= 1e-5  # gathered: unchanged

    # in training, the gate's gradient also comes from the inactive alternative: capture d loss / d split values
    def gate_gradient(model):
        model.train()
        captured = {}
        embeddings = model.msvit.embeddings
        original = embeddings.decide

        def decide(*args):
            values, hard, soft_values = original(*args)
            values.retain_grad()
            captured["values"] = values
            return values, hard, soft_values

        embeddings.decide = decide
        torch.manual_seed(3)
        model(pixel_values, labels=torch.arange(8) % 5).loss.backward()
        embeddings.decide = original
        return captured["values"].grad

    assert gate_gradient(soft).abs().sum() > 0
    with pytest.raises(ValueError, match="masked_path_attention"):
        tiny_config(masked_path_attention="soft")


@pytest.mark.parametrize("token_path", ["masked", "gathered"])
def test_one_optimizer_step_lowers_the_loss(pixel_values, token_path):
    model = MSViTForImageClassification(tiny_config(train_token_path=token_path)).train()
    labels = torch.arange(8) % 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss():
        torch.manual_seed(7)  # the same Gumbel noise for both evaluations
        return model(pixel_values, labels=labels).loss

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < before


def test_fixed_budget_sequence_length_is_static(config, pixel_values, monkeypatch):
    from modeling_msvit import modeling_msvit

    lengths = []
    original = modeling_msvit.gathered_token_index

    def recording(split_mask, ratio, length=None):
        lengths.append(length)
        return original(split_mask, ratio, length)

    monkeypatch.setattr(modeling_msvit, "gathered_token_index", recording)
    model = MSViTForImageClassification(config).eval()
    counts = model(pixel_values).token_counts
    model.config.fine_ratio_budget = 0.5
    outputs = model.msvit(pixel_values)
    # threshold mode pads to the longest image (read from the data; CLS excluded); budget mode knows it beforehand
    assert lengths == [int(counts.max()) - 1, NUM_COARSE + 3 * 8]
    assert outputs.token_mask.all() and outputs.last_hidden_state.shape[1] == 1 + NUM_COARSE + 3 * 8
