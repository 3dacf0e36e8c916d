"""MSViTForSemanticSegmentation: tokens back to the dense grid, decoders, loss, and loading paths."""

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForSemanticSegmentation, ViTModel

from modeling_msvit import MSViTForImageClassification, MSViTForSemanticSegmentation, MSViTModel
from modeling_msvit.macs_msvit import encoder_macs
from modeling_msvit.mixed_scale_tokens import (
    build_scale_tree,
    candidate_active_mask,
    gathered_token_index,
    token_cell_counts,
    tokens_to_grid,
)
from tests.conftest import STRAIGHT_THROUGH, tiny_config, tiny_vit_config


# the token tree of the tiny config's 32 px images: 4 x 4 coarse regions over 8 x 8 fine cells
TREE = build_scale_tree((8, 8), 2, 2)


LABELS = {"id2label": {0: "background", 1: "a", 2: "b", 3: "c"}, "label2id": {"background": 0, "a": 1, "b": 2, "c": 3}}


def segmentation_config(**overrides):
    return tiny_config(**{"num_labels": 4, **LABELS, **overrides})


def test_tokens_to_grid_hand_built_example():
    """Coarse grid 1x2, r = 2 (Nc = 2, candidates 0-1 coarse, 2-5 children of region 0, 6-9 of region 1)."""
    hidden = torch.tensor(
        [
            # image 0: region 0 kept (10), region 1 split (children 1, 2, 3, 4)
            [99, 10, 1, 2, 3, 4],
            # image 1: both kept (30, 40), then padding
            [99, 30, 40, -7, -7, -7],
        ],
        dtype=torch.float32,
    )[..., None]
    token_index = torch.tensor([[0, 1, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5]])
    token_mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    tree = build_scale_tree((2, 4), 2, 2)
    grid = tokens_to_grid(hidden, token_index, token_mask, tree)
    expected = torch.tensor(
        [
            [[10, 10, 1, 2], [10, 10, 3, 4]],
            [[30, 30, 40, 40], [30, 30, 40, 40]],
        ],
        dtype=torch.float32,
    )[:, None]
    assert torch.equal(grid, expected)
    # the cells each position stands for: CLS and padding none, coarse r**2, fine 1
    cells = token_cell_counts(token_index, token_mask, tree)
    assert cells.tolist() == [[0, 4, 1, 1, 1, 1], [0, 4, 4, 0, 0, 0]]


def test_tokens_to_grid_matches_gathered_index_and_masked_layout():
    """The same decisions in the gathered layout (from `gathered_token_index`) and the masked one (every candidate,
    inactive ones masked) give the same grid, and the grid equals a per-cell reference built by hand."""
    ratio, dim = 2, 5
    num_coarse = 6
    split_mask = torch.tensor([[True, False, False, True, True, False], [False] * 6])
    candidates = torch.randn(2, num_coarse * (1 + ratio**2), dim)
    tree = build_scale_tree((4, 6), ratio, 2)
    index, valid = gathered_token_index(split_mask, tree)
    gathered = torch.gather(candidates, 1, index[..., None].expand(-1, -1, dim))
    cls = torch.zeros(2, 1, dim)
    gathered_grid = tokens_to_grid(
        torch.cat([cls, gathered], 1),
        torch.cat([torch.zeros(2, 1, dtype=torch.long), index + 1], 1),
        torch.cat([torch.ones(2, 1, dtype=torch.bool), valid], 1),
        tree,
    )
    all_index = torch.arange(candidates.shape[1]).expand(2, -1)
    active = torch.cat([~split_mask, split_mask.repeat_interleave(ratio**2, 1)], 1)
    assert torch.equal(candidate_active_mask(split_mask, tree), active)
    masked_grid = tokens_to_grid(candidates, all_index + 1, active, tree)
    assert torch.equal(gathered_grid, masked_grid)
    for b in range(2):
        for row in range(4):
            for col in range(6):
                region = (row // 2) * 3 + col // 2
                child = (row % 2) * 2 + col % 2
                source = num_coarse + region * 4 + child if split_mask[b, region] else region
                assert torch.equal(gathered_grid[b, :, row, col], candidates[b, source])


@pytest.mark.parametrize("token_path", ["gathered", "masked"])
def test_model_features_to_grid_both_paths(token_path):
    """The encoder's grid from either path equals the per-cell copy of its token (eval mode, same decisions)."""
    model = MSViTModel(tiny_config()).eval()
    pixel_values = torch.randn(3, 3, 32, 32)
    split_mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) > 0.5
    gathered = model(pixel_values, split_mask=split_mask, token_path="gathered")
    outputs = model(pixel_values, split_mask=split_mask, token_path=token_path)
    grid = tokens_to_grid(outputs.last_hidden_state, outputs.token_index, outputs.token_mask, TREE)
    reference = tokens_to_grid(gathered.last_hidden_state, gathered.token_index, gathered.token_mask, TREE)
    torch.testing.assert_close(grid, reference, atol=1e-5, rtol=0)
    assert grid.shape == (3, 32, 8, 8)


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_decoder_on_tokens_equals_decoder_on_dense_grid(decoder_type, attn_implementation):
    """Decoding the short mixed-scale sequence with cell-count weights gives the logits of decoding the dense grid,
    where every coarse token is repeated in its r**2 cells."""
    model = MSViTForSemanticSegmentation(segmentation_config(decoder_type=decoder_type)).eval()
    model.set_attn_implementation(attn_implementation)
    pixel_values = torch.randn(4, 3, 32, 32)
    split_mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) > 0.6
    with torch.no_grad():
        logits = model(pixel_values, split_mask=split_mask).logits
        encoded = model.msvit(pixel_values, split_mask=split_mask)
        grid = tokens_to_grid(encoded.last_hidden_state, encoded.token_index, encoded.token_mask, TREE)
        dense = grid.flatten(2).transpose(1, 2)  # (B, 64, D): one token per fine cell
        dense_logits = model.decode_head(dense, torch.ones(4, 64, dtype=torch.long))
    torch.testing.assert_close(logits, dense_logits.transpose(1, 2).reshape(4, 4, 8, 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
def test_logits_shape_non_square_and_interpolated(decoder_type):
    model = MSViTForSemanticSegmentation(segmentation_config(image_size=(32, 48), decoder_type=decoder_type)).eval()
    assert model(torch.randn(2, 3, 32, 48)).logits.shape == (2, 4, 8, 12)
    outputs = model(torch.randn(2, 3, 48, 16), interpolate_pos_encoding=True)
    assert outputs.logits.shape == (2, 4, 12, 4)
    assert outputs.split_mask.shape == (2, 6 * 2)


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
def test_batch_equals_single_images(decoder_type):
    """Ragged gate decisions at inference: each image of a padded batch gets the logits it gets alone."""
    model = MSViTForSemanticSegmentation(segmentation_config(decoder_type=decoder_type)).eval()
    with torch.no_grad():
        model.msvit.embeddings.gate.split_logit_bias.zero_()
        model.msvit.embeddings.gate.layers[-1].weight.mul_(50)  # decisive gate: rounding cannot flip a decision
    pixel_values = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        batch = model(pixel_values)
        singles = [model(image[None]) for image in pixel_values]
    assert len(set(batch.token_counts.tolist())) > 1  # the batch really is ragged
    for i, single in enumerate(singles):
        assert torch.equal(batch.split_mask[i], single.split_mask[0])
        torch.testing.assert_close(batch.logits[i], single.logits[0], atol=1e-5, rtol=0)


def test_loss_is_cross_entropy_of_upsampled_logits_ignoring_255():
    """Closed form: the mean over non-ignored pixels of -log softmax of the bilinearly upsampled logits."""
    model = MSViTForSemanticSegmentation(segmentation_config()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 4, (2, 16, 16))  # labels at half the image size: upsampled to 16x16, not 32x32
    labels[0, :5] = 255
    labels[1, :, 3:9] = 255
    outputs = model(pixel_values, labels=labels)
    assert outputs.gate_loss is None  # no gate loss at inference
    upsampled = F.interpolate(outputs.logits, size=(16, 16), mode="bilinear", align_corners=False)
    log_probs = upsampled.log_softmax(1).permute(0, 2, 3, 1)  # (B, H, W, C)
    keep = labels != 255
    expected = -log_probs[keep].gather(1, labels[keep][:, None]).mean()
    torch.testing.assert_close(outputs.loss, expected, atol=1e-6, rtol=0)
    # pixels labelled 255 do not count, whatever the logits say there
    changed = labels.clone()
    changed[~keep] = 255
    assert torch.equal(model(pixel_values, labels=changed).loss, outputs.loss)


def test_training_loss_includes_gate_loss_and_reaches_the_gate():
    config = segmentation_config(gate_loss_weight=0.5, **STRAIGHT_THROUGH)
    model = MSViTForSemanticSegmentation(config).train()
    labels = torch.randint(0, 4, (4, 32, 32))
    outputs = model(torch.randn(4, 3, 32, 32), labels=labels)
    upsampled = F.interpolate(outputs.logits, size=(32, 32), mode="bilinear", align_corners=False)
    task = F.cross_entropy(upsampled, labels)
    torch.testing.assert_close(outputs.loss, task + 0.5 * outputs.gate_loss)
    # the task loss alone reaches the gate (straight-through values multiply the tokens on the masked path)
    task.backward()
    gate_grad = model.msvit.embeddings.gate.layers[0].weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0


def test_label_and_config_errors():
    model = MSViTForSemanticSegmentation(segmentation_config())
    with pytest.raises(ValueError, match=r"`labels` must be an integer tensor of shape \(batch_size=2"):
        model(torch.randn(2, 3, 32, 32), labels=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.randn(2, 3, 32, 32), labels=torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="num_labels` >= 2"):
        MSViTForSemanticSegmentation(tiny_config(num_labels=1))
    with pytest.raises(ValueError, match="decoder_type"):
        tiny_config(decoder_type="upernet")


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
def test_compute_macs_counts_the_decoder_on_the_images_tokens(decoder_type):
    config = segmentation_config(decoder_type=decoder_type)
    model = MSViTForSemanticSegmentation(config)
    backbone = MSViTModel(config)
    counts = torch.tensor([1 + 16, 1 + 64, 1 + 40])
    patches = counts - 1
    d, k, i = config.hidden_size, config.num_labels, config.intermediate_size
    if decoder_type == "linear":
        decoder = patches * d * k
    else:
        decoder = encoder_macs(patches + k, d, i, config.decoder_num_layers) + (2 * patches + k) * d * d
        decoder = decoder + patches * k * d
    assert torch.equal(model.compute_macs(counts), backbone.compute_macs(counts) + decoder)


@pytest.mark.parametrize("decoder_type", ["linear", "mask_transformer"])
def test_save_load_logits_identical(tmp_path, decoder_type):
    model = MSViTForSemanticSegmentation(segmentation_config(decoder_type=decoder_type)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is MSViTForSemanticSegmentation
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, loaded(pixel_values).logits)


def test_classification_checkpoint_backbone_loads(tmp_path):
    classifier = MSViTForImageClassification(tiny_config())
    classifier.save_pretrained(tmp_path)
    segmenter = MSViTForSemanticSegmentation.from_pretrained(tmp_path, **LABELS)
    for name, tensor in classifier.msvit.state_dict().items():
        assert torch.equal(segmenter.msvit.state_dict()[name], tensor), name
    assert segmenter.config.num_labels == 4
    assert segmenter.decode_head.classifier.weight.shape == (4, 32)
    assert math.isfinite(segmenter.decode_head.classifier.weight.std().item())


def test_from_vit_reuses_the_backbone():
    vit = ViTModel(tiny_vit_config(), add_pooling_layer=False)
    segmenter = MSViTForSemanticSegmentation.from_vit(vit, decoder_type="mask_transformer", **LABELS).eval()
    assert segmenter.config.num_labels == 4 and segmenter.config.decoder_type == "mask_transformer"
    torch.testing.assert_close(segmenter.msvit.layers[1].mlp.fc2.weight, vit.layers[1].mlp.fc2.weight)
    # all fine: the encoder computes what the ViT computes (tokens in another order), so its grid is the ViT's
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        encoded = segmenter.msvit(pixel_values, split_mask=torch.ones(2, 16, dtype=torch.bool))
        vit_tokens = vit(pixel_values).last_hidden_state[:, 1:]
    grid = tokens_to_grid(encoded.last_hidden_state, encoded.token_index, encoded.token_mask, TREE)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), vit_tokens, atol=1e-5, rtol=0)
