import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import ViTConfig  # noqa: E402

from modeling_msvit import MSViTConfig  # noqa: E402


# the paper's gate objective (Gumbel-sigmoid, straight-through estimator, compute-budget loss)
STRAIGHT_THROUGH = {"gate_objective": "straight_through"}


def tiny_config(**overrides) -> MSViTConfig:
    """32 px images, fine patch 4, coarse patch 8: a 4x4 coarse grid (Nc = 16) over an 8x8 fine grid (Nf = 64)."""
    fields = dict(
        image_size=32,
        patch_size=4,
        coarse_patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        gate_hidden_size=16,
        num_labels=5,
    )
    fields.update(overrides)
    return MSViTConfig(**fields)


def tiny_vit_config(**overrides) -> ViTConfig:
    """A transformers ViT with the tiny MSViT config's sizes (32 px, patch 4), to convert with `from_vit`."""
    fields = dict(
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=5,
        hidden_act="gelu",
    )
    fields.update(overrides)
    return ViTConfig(**fields)


@pytest.fixture
def config() -> MSViTConfig:
    return tiny_config()


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
