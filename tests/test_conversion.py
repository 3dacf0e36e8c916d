import pytest
import torch
from transformers import ViTForImageClassification, ViTModel

from modeling_msvit import MSViTForImageClassification, MSViTModel
from tests.conftest import tiny_vit_config


@pytest.fixture
def vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config()).eval()


def all_split(batch_size: int, model) -> torch.Tensor:
    grid_h, grid_w = model.config.coarse_grid_size
    return torch.ones(batch_size, grid_h * grid_w, dtype=torch.bool)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_classifier_with_every_region_split_equals_the_vit(vit, pixel_values, attn_implementation):
    msvit = MSViTForImageClassification.from_vit(vit, attn_implementation=attn_implementation).eval()
    assert msvit.config.coarse_patch_size == 8 and msvit.config.id2label == vit.config.id2label
    expected = vit(pixel_values).logits
    actual = msvit(pixel_values, split_mask=all_split(8, msvit)).logits
    assert (actual - expected).abs().max() <= 1e-4
    # the gate and its loss's priors are the only new parts: every other tensor is the ViT's
    vit_state = vit.state_dict()
    for name, tensor in msvit.state_dict().items():
        if ".gate." not in name and ".gate_criterion." not in name:
            assert torch.equal(tensor, vit_state[name.replace("msvit.", "vit.", 1)]), name


def test_conversion_from_a_saved_folder(tmp_path, vit, pixel_values):
    vit.save_pretrained(tmp_path)
    msvit = MSViTForImageClassification.from_vit(tmp_path, coarse_patch_size=16, target_fine_ratio=0.25).eval()
    assert msvit.config.scale_ratio == 4 and msvit.config.target_fine_ratio == 0.25
    actual = msvit(pixel_values, split_mask=all_split(8, msvit)).logits
    assert (actual - vit(pixel_values).logits).abs().max() <= 1e-4


def test_base_model_conversion_keeps_the_cls_output(tmp_path, pixel_values):
    vit = ViTModel(tiny_vit_config(), add_pooling_layer=True).eval()
    vit.save_pretrained(tmp_path)
    for source in (vit, tmp_path):
        msvit = MSViTModel.from_vit(source).eval()
        actual = msvit(pixel_values, split_mask=all_split(8, msvit)).last_hidden_state[:, 0]
        assert (actual - vit(pixel_values).last_hidden_state[:, 0]).abs().max() <= 1e-4


def test_separate_coarse_embedding_starts_from_the_shared_one(vit):
    msvit = MSViTForImageClassification.from_vit(vit, separate_coarse_embedding=True)
    embeddings = msvit.msvit.embeddings
    assert torch.equal(
        embeddings.coarse_patch_embeddings.projection.weight, embeddings.patch_embeddings.projection.weight
    )


def test_non_vit_models_are_rejected(config):
    with pytest.raises(ValueError, match="model_type 'vit'"):
        MSViTForImageClassification.from_vit(MSViTForImageClassification(config))


def test_vit_image_size_with_a_border_converts_exactly():
    """36 px with 4 / 8 px patches: 4 x 4 coarse regions and a border of 17 fine cells that stay fine."""
    vit = ViTForImageClassification(tiny_vit_config(image_size=36)).eval()
    msvit = MSViTForImageClassification.from_vit(vit).eval()
    pixel_values = torch.randn(2, 3, 36, 36)
    tree = msvit.msvit.scale_tree(36, 36)
    assert (tree.num_decisions, tree.num_roots) == (16, 16 + 9 * 9 - 8 * 8)
    with torch.no_grad():
        split_all = msvit(pixel_values, split_mask=torch.ones(2, 16, dtype=torch.bool))
        keep_all = msvit(pixel_values, split_mask=torch.zeros(2, 16, dtype=torch.bool))
        torch.testing.assert_close(split_all.logits, vit(pixel_values).logits, rtol=1e-5, atol=1e-5)
    assert split_all.token_counts.tolist() == [1 + 81] * 2 and keep_all.token_counts.tolist() == [1 + 33] * 2
