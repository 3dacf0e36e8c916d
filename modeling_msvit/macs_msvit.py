# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""Analytic multiply-accumulate (MAC) counts: one multiply-add = 1 MAC, FLOPs = 2 x MACs.

Counted: every matrix product (patch embeddings, gate MLP, attention projections, attention scores and weighted
sums, MLPs, heads). Not counted: normalisations, activations, softmax, pooling and additions, which are a small
and implementation-dependent share. This is the convention behind the usual ViT figures
(ViT-Ti/16 at 224 px: 1.254 GMACs; ViT-S/16: 4.60 GMACs).
"""

import torch


def encoder_macs(
    num_tokens: int | torch.Tensor, hidden_size: int, intermediate_size: int, num_layers: int
) -> int | torch.Tensor:
    """MACs of a pre-norm ViT encoder on `num_tokens` tokens (CLS included).

    Per layer: `4 L D^2` for the query/key/value/output projections, `2 L^2 D` for attention scores and the weighted
    sum of values, and `2 L D I` for the MLP.
    """
    per_layer = (
        4 * num_tokens * hidden_size**2
        + 2 * num_tokens**2 * hidden_size
        + 2 * num_tokens * hidden_size * intermediate_size
    )
    return num_layers * per_layer


def mlp_macs(layer_sizes: list[int]) -> int:
    """MACs of a stack of linear layers `layer_sizes[0] -> layer_sizes[1] -> ...` on one input vector."""
    return sum(fan_in * fan_out for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]))


def vit_macs(
    *,
    image_size: tuple[int, int],
    patch_size: int,
    num_channels: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_labels: int = 0,
) -> int:
    """MACs of a plain ViT with one patch size (patch embedding, encoder, optional linear head)."""
    num_patches = (image_size[0] // patch_size) * (image_size[1] // patch_size)
    embedding = num_patches * num_channels * patch_size**2 * hidden_size
    return (
        embedding
        + encoder_macs(1 + num_patches, hidden_size, intermediate_size, num_layers)
        + hidden_size * num_labels
    )


def vit_macs_for_config(config, num_labels: int = 0) -> int:
    """`vit_macs` of a plain ViT with the sizes of `config` (a `ViTConfig`, or an `MSViTConfig` for the ViT at its
    fine patch size), at `config.image_size`."""
    size = config.image_size
    return vit_macs(
        image_size=(size, size) if isinstance(size, int) else tuple(size),
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_labels=num_labels,
    )


__all__ = ["encoder_macs", "mlp_macs", "vit_macs", "vit_macs_for_config"]
