# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""PyTorch MSViT: Dynamic Mixed-Scale Tokenization for Vision Transformers (Havtorn et al., ICCVW 2023)."""

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import flex_attention
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput, ModelOutput, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_msvit import VIT_CONFIG_FIELDS, MSViTConfig
from .gate_losses import (
    MSViTGateLoss,
    counterfactual_regression_loss,
    flipped_layouts,
    sample_flips,
    sample_training_layouts,
    split_loss_drop,
)
from .macs_msvit import encoder_macs, mlp_macs
from .mixed_scale_tokens import (
    TREE_TENSORS,
    ScaleTree,
    attention_key_bias,
    budget_split_mask,
    build_scale_tree,
    by_decision,
    candidate_active_mask,
    candidate_mask_values,
    close_splits,
    gather_tokens,
    gathered_token_index,
    grid_patches,
    grid_positions,
    level_images,
    level_regions,
    packed_token_rows,
    padded_token_rows,
    reachable_decisions,
    region_neighbourhoods,
    token_cell_counts,
    token_counts,
    token_sizes,
    tokens_to_grid,
)


logger = logging.get_logger(__name__)


@dataclass
class MSViTModelOutput(ModelOutput):
    r"""
    Output of [`MSViTModel`]. The sequence layout depends on the execution path: the *gathered* path (inference) holds
    each image's active tokens padded to the longest image of the batch, the *masked* path (training) holds all
    `1 + Nc + Nf` candidates. `token_mask` and `token_index` say which positions are real tokens and what they are.
    Padding positions hold no meaningful values: a ragged inference batch runs packed (`config.ragged_execution`),
    and its outputs are padded back per image, each padding position repeating its image's last token.

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Final hidden states; position 0 is the CLS token.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Embedding output and the output of every layer, returned with `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention weights of every layer, returned with `output_attentions=True` (eager attention only).
    token_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`):
        True where a position holds an active token, False on padding (gathered) or inactive candidates (masked).
    token_index (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        For each position, 0 for CLS, else `1 + c` where `c` indexes the candidate layout: coarse region `j` is
        `c = j`, fine child `k` of region `j` is `c = Nc + j * r**2 + k` (two patch sizes; with more, see
        `mixed_scale_tokens` and `MSViTModel.scale_tree`).
    split_mask (`torch.BoolTensor` of shape `(batch_size, num_decisions)`):
        Hard decisions per coarse region (raster order), True = split into fine tokens. With more than two patch
        sizes, one per node of the region tree (`ScaleTree`), True where the node and all its ancestors split.
    split_probs (`torch.FloatTensor` of shape `(batch_size, num_decisions)`):
        The gate's split probability per region, `sigmoid(split_logits)`.
    split_logits (`torch.FloatTensor` of shape `(batch_size, num_decisions)`):
        The gate's score per region; the fixed budget splits the highest. A gate trained with the counterfactual
        objective predicts `config.counterfactual_target_scale` times the loss drop of splitting the region.
    token_counts (`torch.LongTensor` of shape `(batch_size,)`):
        Active tokens per image including CLS: `1 + Nc + (r**2 - 1) * #split` (`1 + roots + ...` with a region
        tree).
    gate_loss (`torch.FloatTensor` of shape `()`):
        The straight-through objective's compute-budget loss on the gate's sampled decisions
        (`config.gate_loss_type`), unweighted; training only (None at inference, where the budget or threshold sets
        the compute, when decisions were forced, and under the counterfactual objective, whose loss the heads
        compute from the labels).
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    token_mask: torch.BoolTensor | None = None
    token_index: torch.LongTensor | None = None
    split_mask: torch.BoolTensor | None = None
    split_probs: torch.FloatTensor | None = None
    split_logits: torch.FloatTensor | None = None
    token_counts: torch.LongTensor | None = None
    gate_loss: torch.FloatTensor | None = None


@dataclass
class MSViTImageClassifierOutput(ImageClassifierOutput):
    r"""
    [`ImageClassifierOutput`] with MSViT's gate fields (see [`MSViTModelOutput`]). With `labels`, `loss` is the
    classification loss plus `config.gate_loss_weight * gate_loss`; in training under the counterfactual objective
    `gate_loss` is the regression loss of the flipped regions' split logits on their measured loss drops.
    """

    split_mask: torch.BoolTensor | None = None
    split_probs: torch.FloatTensor | None = None
    split_logits: torch.FloatTensor | None = None
    token_counts: torch.LongTensor | None = None
    gate_loss: torch.FloatTensor | None = None


@dataclass
class MSViTSemanticSegmenterOutput(SemanticSegmenterOutput):
    r"""
    [`SemanticSegmenterOutput`] with MSViT's gate fields (see [`MSViTModelOutput`]). `logits` are on the fine patch
    grid, `(batch_size, num_labels, height / patch_size, width / patch_size)`. With `labels`, `loss` is the
    cross-entropy of the logits upsampled to the labels' size plus `config.gate_loss_weight * gate_loss`.
    """

    split_mask: torch.BoolTensor | None = None
    split_probs: torch.FloatTensor | None = None
    split_logits: torch.FloatTensor | None = None
    token_counts: torch.LongTensor | None = None
    gate_loss: torch.FloatTensor | None = None


@dataclass
class PackedTokens:
    """A ragged batch run packed (internal): its active tokens form one `(T, D)` matrix, image after image.

    `rows` `(T,)` are the packed tokens' rows in the padded batch flattened to `(B * L, D)`, and `padded_rows`
    `(B, L)` the packed row each padded position reads (`packed_token_rows`, `padded_token_rows`).

    Layer norms, projections and MLPs run on the packed matrix; attention pads its query, key and value projections
    and runs once on the batch, under the batch's mask. Measured side by side on 2 CPU threads (msvit-tiny, 86-161
    tokens per image, batches of 8-64), as speed-ups of the whole forward over the padded batch: on an Intel Xeon
    1.15-1.25x in fp32 and 1.04-1.09x in bf16, where one SDPA call per image on slices of the packed tokens was as
    fast in fp32 (1.12-1.28x) but slower than the padded batch in bf16 (0.92-0.94x: the small per-image calls
    parallelise poorly once the GEMMs are fast); on an AMD EPYC per-image calls were 1.19-1.40x and padding inside
    attention 1.13-1.37x (fp32). SDPA on nested jagged tensors ran 0.42x (a slower kernel per sequence), and flex
    attention over all `T` tokens with a document mask 2.3x slower than per-image calls, compiling for every total
    token count (static shapes on CPU).
    """

    rows: torch.Tensor
    padded_rows: torch.Tensor

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """`(B, L, D)` -> `(T, D)`."""
        return padded.flatten(0, 1).index_select(0, self.rows)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """`(T, D)` -> `(B, L, D)`; a padding position repeats its image's last token."""
        return gather_tokens(packed, self.padded_rows)


@dataclass
class TokenLayout:
    """Which token each position of a batch's sequence holds, CLS first (internal): what `MSViTEmbeddings` builds,
    read by attention, packing and the outputs.

    `token_index` `(B, L)` holds 0 for CLS and `1 + c` for candidate `c` of the `tree` (which says the level of each
    candidate and the finest cells it covers), `token_mask` `(B, L)` is True on active tokens, `counts` `(B,)` are
    the active tokens per image (CLS included). `padded`: some positions are padding or inactive candidates; `mixed`:
    some active token covers more than one finest cell; `packed`: set when a ragged inference batch runs packed.
    """

    tree: ScaleTree
    token_index: torch.Tensor
    token_mask: torch.Tensor
    counts: torch.Tensor
    padded: bool
    mixed: bool
    packed: PackedTokens | None = None

    @property
    def candidates(self) -> torch.Tensor:
        """`(B, L - 1)` the candidate each position after CLS holds (inactive ones included)."""
        return self.token_index[:, 1:] - 1

    def attention_mask(self, dtype: torch.dtype, size_aware: bool) -> torch.Tensor | None:
        """None (attend to everything), a `(B, L)` bool key mask, or with size-aware attention the additive mask
        that adds `log(cells)` to each key's scores (`-inf` on inactive keys)."""
        if size_aware and (self.padded or self.mixed):
            key_cells = torch.where(self.token_mask, token_sizes(self.token_index, self.tree), 0)
            return attention_key_bias(key_cells, dtype, self.token_index.shape[1])
        return self.token_mask if self.padded else None


@dataclass
class MixedScaleTokens:
    """What [`MSViTEmbeddings`] hands to the encoder (internal)."""

    embeddings: torch.Tensor
    layout: TokenLayout
    # None (attend to everything), a (B, L) bool key mask, or a 4D additive mask (size-aware attention)
    attention_mask: torch.Tensor | None
    key_weights: torch.Tensor | None
    split_mask: torch.Tensor
    split_probs: torch.Tensor
    split_logits: torch.Tensor
    split_soft: torch.Tensor | None


def gumbel_sigmoid(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A relaxed Bernoulli sample `sigmoid((logits + logistic noise) / temperature)`."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)


class MSViTPatchEmbeddings(nn.Module):
    """Linear embedding of flattened `patch_size x patch_size` patches, stored as a ViT-compatible `Conv2d`."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # `patches` are flattened in (channel, row, column) order, so this equals the strided convolution
        return F.linear(patches, self.projection.weight.flatten(1), self.projection.bias)


class MSViTRuleScore(nn.Module):
    """A training-free score in [0, 1] of how much detail a coarse region holds, from its own pixels (APT's adaptive
    patch sizes): `"entropy"`, the entropy of the histogram of its pixel values (all channels, `gate_entropy_bins`
    bins over `gate_entropy_range`) divided by its maximum `log(bins)`, or `"std"`, `tanh` of their standard
    deviation. Reads `(B, Nc, P)` full-resolution regions, returns `(B, Nc)`."""

    def __init__(self, config: MSViTConfig, rule: str):
        super().__init__()
        self.rule = rule
        self.num_bins = config.gate_entropy_bins
        self.value_range = tuple(config.gate_entropy_range)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        regions = regions.float()
        if self.rule == "std":
            return torch.tanh(regions.std(dim=-1, unbiased=False))
        low, high = self.value_range
        bins = ((regions - low) * (self.num_bins / (high - low))).floor().clamp(0, self.num_bins - 1).long()
        counts = regions.new_zeros(*regions.shape[:-1], self.num_bins).scatter_add_(-1, bins, torch.ones_like(regions))
        frequencies = counts / regions.shape[-1]
        entropy = -(frequencies * torch.log(frequencies.clamp_min(1e-12))).sum(-1)
        return entropy / math.log(self.num_bins)


class MSViTGate(nn.Module):
    """The gate: a small MLP that reads one region and outputs the logit of splitting it.

    With more than two patch sizes one MLP serves every decision level, reading each region at the same resolution,
    with one learned prior logit per level (`split_logit_bias`), or one for every level
    (`config.gate_prior_per_level=False`).

    With `config.gate_residual_rule` it is a residual gate: `logit = rule_scale * score + bias + MLP(region)`, `score`
    the training-free rule's score of the region (`MSViTRuleScore`, in [0, 1]), `rule_scale` 1, `bias` 0 and the MLP's
    last layer 0 at initialisation. It therefore starts as the rule exactly (same ranking, so the same decisions at
    any fixed budget) and learns a correction, as APT zero-initialises the new path of a larger patch.
    """

    def __init__(self, config: MSViTConfig):
        super().__init__()
        sizes = self.layer_sizes(config)
        self.layers = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]))
        self.layers.append(nn.Linear(sizes[-2], 1, bias=False))
        # the output bias is the gate's prior split logit per decision level, or one shared by all (initialised in
        # `_init_weights`); shape (levels,) or (1,), never 0-d, because FSDP2 cannot shard 0-d parameters
        self.prior_per_level = config.gate_prior_per_level
        self.split_logit_bias = nn.Parameter(torch.zeros(config.num_scales - 1 if self.prior_per_level else 1))
        self.activation = nn.GELU()
        self.rule_score = None
        if config.gate_residual_rule is not None:
            self.rule_score = MSViTRuleScore(config, config.gate_residual_rule)
            self.rule_scale = nn.Parameter(torch.ones(1))

    @staticmethod
    def layer_sizes(config: MSViTConfig) -> list[int]:
        """Input, hidden and output sizes of the MLP, from what the gate reads (`config.gate_input`)."""
        region_size = config.scale_sizes[1]  # every region is read at the second patch size
        if config.gate_input == "pixels":
            input_size = config.num_channels * region_size**2
        elif config.gate_input == "neighbourhood":
            input_size = config.num_channels * (region_size**2 + 9 * config.patch_size**2)
        elif config.gate_input == "coarse_embedding":
            input_size = config.hidden_size
        else:
            input_size = config.num_channels * config.patch_size**2
        return [input_size] + [config.gate_hidden_size] * (config.gate_num_layers - 1) + [1]

    def forward(
        self, regions: torch.Tensor, rule_scores: torch.Tensor | None, decision_levels: torch.Tensor
    ) -> torch.Tensor:
        """Split logits `(B, D)` from the gate's inputs `(B, D, F)`, the rule's scores `(B, D)` (a residual gate) and
        each decision's level `(D,)` (1 for the coarse regions of two sizes)."""
        hidden_states = regions
        for layer in self.layers[:-1]:
            hidden_states = self.activation(layer(hidden_states))
        prior = self.split_logit_bias[decision_levels - 1] if self.prior_per_level else self.split_logit_bias
        split_logits = self.layers[-1](hidden_states).squeeze(-1) + prior
        if self.rule_score is not None:
            split_logits = split_logits + self.rule_scale * rule_scores.to(split_logits.dtype)
        return split_logits


class MSViTContentGate(nn.Module):
    """A training-free gate: the split probability of a region is its rule score (`MSViTRuleScore`, in [0, 1]), so a
    threshold reads as a fraction of the maximum."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.rule_score = MSViTRuleScore(config, config.gate_type)

    def forward(
        self, regions: torch.Tensor | None, rule_scores: torch.Tensor, decision_levels: torch.Tensor
    ) -> torch.Tensor:
        return torch.logit(rule_scores, eps=1e-6)


class MSViTEmbeddings(nn.Module):
    """
    Construct the CLS token and the gated mixed-scale patch tokens with their position embeddings.

    The gate reads every region larger than `patch_size` and decides to keep it as one token or split it into its
    `r**2` children, top-down (`mixed_scale_tokens`). Every region is area-downscaled to `patch_size` and embedded
    with the same patch embedding as the finest patches; its position embedding is the average of those of the
    finest cells it covers.
    """

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.patch_embeddings = MSViTPatchEmbeddings(config)
        self.coarse_patch_embeddings = MSViTPatchEmbeddings(config) if config.separate_coarse_embedding else None
        fine_height, fine_width = config.fine_grid_size
        self.position_embeddings = nn.Parameter(torch.randn(1, 1 + fine_height * fine_width, config.hidden_size))
        self.gate = MSViTGate(config) if config.gate_type == "learned" else MSViTContentGate(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # the configured image size's token tree: its tensors as buffers (recomputed in `_init_weights`), so that
        # they follow the model's device and are constants for `torch.compile`, and its sizes as plain attributes
        self.configured_tree = build_scale_tree(config.fine_grid_size, config.scale_ratio, config.num_scales)
        for name in TREE_TENSORS:
            self.register_buffer(f"tree_{name}", getattr(self.configured_tree, name).clone(), persistent=False)

    def scale_tree(self, height: int, width: int) -> ScaleTree:
        """The `ScaleTree` of a `height x width` image, on the model's device."""
        fine_grid = (height // self.patch_size, width // self.patch_size)
        if fine_grid == self.configured_tree.fine_grid:
            return replace(self.configured_tree, **{name: getattr(self, f"tree_{name}") for name in TREE_TENSORS})
        return build_scale_tree(fine_grid, self.config.scale_ratio, self.config.num_scales, self.tree_level.device)

    def grid_position_embeddings(
        self, height: int, width: int, tree: ScaleTree, interpolate_pos_encoding: bool
    ) -> torch.Tensor:
        """Position embeddings `(G, hidden_size)` of every level's cells, in the layout of `grid_patches`."""
        fine_height, fine_width = tree.fine_grid
        base_height, base_width = self.config.fine_grid_size
        fine_grid = self.position_embeddings[0, 1:].reshape(base_height, base_width, -1)
        if (fine_height, fine_width) != (base_height, base_width):
            if not interpolate_pos_encoding:
                raise ValueError(
                    f"Input image size ({height}x{width}) doesn't match the model's image_size "
                    f"({base_height * self.patch_size}x{base_width * self.patch_size}). Resize the image with the "
                    "model's image processor, or pass `interpolate_pos_encoding=True` to interpolate the position "
                    "embeddings (height and width must stay multiples of `patch_size`)."
                )
            fine_grid = F.interpolate(
                fine_grid.permute(2, 0, 1)[None], size=(fine_height, fine_width), mode="bicubic", align_corners=False
            )[0].permute(1, 2, 0)
        return grid_positions(fine_grid, tree)

    def embed_patches(
        self, patches: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, tree: ScaleTree
    ) -> torch.Tensor:
        """Patch plus position embeddings `(B, L, D)` of the candidates at `index` `(B, L)`, from every level's
        patches `(B, G, P)` and position embeddings `(G, D)` (`grid_patches`, `grid_position_embeddings`).

        The position embeddings and the bias are the starting value of one fused matrix product (`addmm`), which
        saves a pass over the tokens.
        """
        rows = tree.grid_row[index]
        patches = gather_tokens(patches, rows)
        projection = self.patch_embeddings.projection
        start = gather_tokens(positions + projection.bias, rows)
        tokens = torch.addmm(start.flatten(0, 1), patches.flatten(0, 1), projection.weight.flatten(1).t())
        tokens = tokens.view(start.shape[0], start.shape[1], -1)
        if self.coarse_patch_embeddings is not None:
            coarse = self.coarse_patch_embeddings(patches) + gather_tokens(positions, rows)
            tokens = torch.where((index < tree.num_decisions)[..., None], coarse, tokens)
        return tokens

    def gate_split_logits(self, images: list[torch.Tensor], patches: torch.Tensor, tree: ScaleTree) -> torch.Tensor:
        """The gate's split logits `(B, D)`, from what it reads (`config.gate_input`; a rule reads the regions at full
        resolution). `images` and `patches` are `level_images` and `grid_patches`."""
        config = self.config
        rule_scores = None
        if self.gate.rule_score is not None:
            full_regions = level_regions(images, tree, self.patch_size, full=True)
            rule_scores = by_decision([self.gate.rule_score(regions) for regions in full_regions], tree)
        inputs = None
        if config.gate_type == "learned" and config.gate_input in ("pixels", "neighbourhood"):
            per_level = level_regions(images, tree, self.patch_size, full=False)
            if config.gate_input == "neighbourhood":
                contexts = region_neighbourhoods(images, tree, self.patch_size)
                per_level = [torch.cat(pair, dim=-1) for pair in zip(per_level, contexts)]
            inputs = by_decision(per_level, tree)
        elif config.gate_type == "learned":
            inputs = patches.index_select(1, tree.grid_row[: tree.num_decisions])
            if config.gate_input == "coarse_embedding":
                inputs = (self.coarse_patch_embeddings or self.patch_embeddings)(inputs)
        return self.gate(inputs, rule_scores, tree.decision_levels)

    def decide(
        self,
        split_logits: torch.Tensor,
        split_probs: torch.Tensor,
        split_mask: torch.Tensor | None,
        tree: ScaleTree,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (split values multiplying the tokens, effective split mask, soft values for the gate loss or
        None)."""
        if split_mask is not None:
            split_mask = close_splits(split_mask, tree)
            return split_mask.to(split_logits.dtype), split_mask, None
        learned = self.config.gate_type == "learned"
        if self.training and learned and self.config.gate_objective == "counterfactual":
            hard = sample_training_layouts(split_logits, self.config.counterfactual_layouts, tree)
            return hard.to(split_logits.dtype), hard, None
        if self.training and learned:
            # Gumbel-sigmoid with a straight-through estimator: hard 0/1 forward, soft gradient; the token multipliers
            # (`candidate_mask_values`) multiply every ancestor's value, so marks under a kept node count for nothing
            split_soft = gumbel_sigmoid(split_logits, self.config.gate_temperature)
            marked = split_soft > 0.5
            return (
                marked.to(split_soft.dtype) - split_soft.detach() + split_soft,
                close_splits(marked, tree),
                split_soft,
            )
        hard = self.inference_split_mask(split_logits, split_probs, tree)
        # no gate loss at inference: it would only cost time, and gBaS's per-position priors fix the grid size
        return hard.to(split_logits.dtype), hard, None

    def inference_split_mask(
        self, split_logits: torch.Tensor, split_probs: torch.Tensor, tree: ScaleTree
    ) -> torch.Tensor:
        """Inference decisions `(B, D)`: the budget's top regions (top-down), or those whose split probability exceeds
        their level's threshold under a split parent."""
        if self.config.fine_ratio_budget is not None:
            return budget_split_mask(split_logits, self.num_split_in_budget(tree.num_decisions), tree)
        threshold = self.config.gate_threshold
        if not isinstance(threshold, (int, float)):
            threshold = split_probs.new_tensor(threshold)[(tree.decision_levels - 1).clamp(max=len(threshold) - 1)]
        return close_splits(split_probs > threshold, tree)

    def predict_split_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The gate's split logits `(B, D)` for these images, without embedding any token."""
        tree = self.scale_tree(*pixel_values.shape[-2:])
        images = level_images(pixel_values, tree, self.patch_size)
        return self.gate_split_logits(images, grid_patches(images, tree, self.patch_size), tree)

    def predict_split_mask(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The inference decisions `(B, D)` for these images from the gate alone."""
        split_logits = self.predict_split_logits(pixel_values)
        tree = self.scale_tree(*pixel_values.shape[-2:])
        return self.inference_split_mask(split_logits, torch.sigmoid(split_logits), tree)

    def num_split_in_budget(self, num_decisions: int) -> int:
        return round(self.config.fine_ratio_budget * num_decisions)

    def forward(
        self,
        pixel_values: torch.Tensor,
        split_mask: torch.BoolTensor | None = None,
        token_path: str = "gathered",
        interpolate_pos_encoding: bool = False,
    ) -> MixedScaleTokens:
        batch_size, _, height, width = pixel_values.shape
        tree = self.scale_tree(height, width)
        images = level_images(pixel_values, tree, self.patch_size)
        patches = grid_patches(images, tree, self.patch_size)
        split_logits = self.gate_split_logits(images, patches, tree)
        budgeted = (
            split_mask is None
            and self.config.fine_ratio_budget is not None
            and (not self.training or self.config.gate_type != "learned")
        )
        split_probs = torch.sigmoid(split_logits)
        split_values, split_mask, split_soft = self.decide(split_logits, split_probs, split_mask, tree)

        positions = self.grid_position_embeddings(height, width, tree, interpolate_pos_encoding)
        layout = self.token_layout(split_mask, tree, token_path, budgeted)
        index = layout.candidates
        tokens = self.embed_patches(patches, positions, index, tree)
        key_weights = None
        if token_path == "masked" and self.config.masked_path_attention == "masked_softmax":
            # DynamicViT-style: the straight-through values weight the keys inside the softmax, so the gate also
            # hears from the alternative it did not choose (inactive tokens keep their values)
            mask_values = candidate_mask_values(split_values, tree)
            key_weights = torch.cat([mask_values.new_ones(batch_size, 1), mask_values], dim=1)
            if self.config.size_aware_attention:  # a larger key counts as the finest cells it covers
                key_weights = key_weights * token_sizes(layout.token_index, tree)
        elif split_values.requires_grad:
            tokens = tokens * candidate_mask_values(split_values, tree).gather(1, index)[..., None]

        cls_tokens = (self.cls_token + self.position_embeddings[:, :1]).expand(batch_size, -1, -1)
        embeddings = self.dropout(torch.cat([cls_tokens, tokens.to(cls_tokens.dtype)], dim=1))
        attention_mask = None
        if key_weights is None:
            attention_mask = layout.attention_mask(embeddings.dtype, self.config.size_aware_attention)
        return MixedScaleTokens(
            embeddings=embeddings,
            layout=layout,
            attention_mask=attention_mask,
            key_weights=key_weights,
            split_mask=split_mask,
            split_probs=split_probs,
            split_logits=split_logits,
            split_soft=split_soft,
        )

    def token_layout(self, split_mask: torch.Tensor, tree: ScaleTree, token_path: str, budgeted: bool) -> TokenLayout:
        """The sequence of these effective decisions: every candidate (`"masked"`), or each image's active tokens
        (`"gathered"`), padded to the longest image, or of one static length at a fixed budget."""
        batch_size = split_mask.shape[0]
        counts = token_counts(split_mask, tree)
        packed = None
        if token_path == "masked":
            index = torch.arange(tree.num_candidates, device=split_mask.device).expand(batch_size, -1)
            valid = candidate_active_mask(split_mask, tree)
            padded, mixed = True, True
        else:
            if budgeted:
                # fixed budget: every image has the same length, known without looking at the data; no padding, and
                # larger tokens exactly when not every region is split
                num_split = self.num_split_in_budget(tree.num_decisions)
                length = tree.num_roots + (tree.ratio**2 - 1) * num_split
                padded, mixed = False, num_split < tree.num_decisions
            else:
                host_counts = counts.tolist()  # the one host synchronisation of a ragged batch
                longest, shortest, total = max(host_counts), min(host_counts), sum(host_counts)
                length = longest - 1  # CLS comes later
                padded, mixed = shortest < longest, shortest < 1 + tree.num_fine
                if padded and not self.training and self.config.ragged_execution == "packed":
                    packed = PackedTokens(
                        rows=packed_token_rows(counts, longest, total), padded_rows=padded_token_rows(counts, longest)
                    )
            index, valid = gathered_token_index(split_mask, tree, length)
        return TokenLayout(
            tree=tree,
            token_index=torch.cat([index.new_zeros(batch_size, 1), index + 1], dim=1),
            token_mask=torch.cat([valid.new_ones(batch_size, 1), valid], dim=1),
            counts=counts,
            padded=padded,
            mixed=mixed,
            packed=packed,
        )


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def masked_softmax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    key_weights: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicViT's masked softmax: `A_ij = exp(s_ij) w_j / sum_k exp(s_ik) w_k` with per-key weights `w` `(B, L)`.

    With 0/1 weights it equals a softmax over the keys of weight 1; with straight-through weights its gradient reaches
    the weights of every key, including those of weight 0.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = (scores - scores.amax(dim=-1, keepdim=True).detach()).float()
    attn_weights = scores.exp() * key_weights[:, None, None, :].float()
    attn_weights = (attn_weights / (attn_weights.sum(dim=-1, keepdim=True) + 1e-6)).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _is_additive(attention_mask) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point()


def flex_attention_with_key_bias(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """flex_attention with size-aware attention's additive mask, read as one bias per key.

    The mask is the same for every query (`attention_key_bias`), so the score modification reads a `(B, L)` bias
    with one index. Compiled for static shapes: torch's CPU flex template fails to build a captured bias under
    dynamic shapes (and transformers' wrapper reads a 4D mask by chained indexing, which its CPU compiler
    miscompiles).
    """
    if dropout > 0:
        raise ValueError("flex_attention does not support attention dropout; use it at inference or set it to 0.")
    key_bias = attention_mask[:, 0, 0, : key.shape[-2]]

    def score_mod(score, batch_index, head_index, query_index, key_index):
        return score + key_bias[batch_index, key_index]

    attn_output = _static_flex_attention()(query, key, value, score_mod=score_mod, scale=scaling)
    return attn_output.transpose(1, 2).contiguous(), None


@functools.cache
def _static_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


class MSViTAttention(nn.Module):
    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed_tokens: PackedTokens | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if kwargs.get("key_weights") is not None:
            attention_interface = masked_softmax_attention_forward
        elif self.config._attn_implementation == "flex_attention" and _is_additive(attention_mask):
            attention_interface = flex_attention_with_key_bias
        kwargs.update(dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling)
        states = [self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)]
        if packed_tokens is None:
            attn_output, attn_weights = self._attend(attention_interface, states, attention_mask, **kwargs)
        else:
            # one attention call on the padded projections: the GEMMs skip the padding, and a single call parallelises
            # better than one per image (`PackedTokens`)
            padded = [packed_tokens.pad(projected) for projected in states]
            attn_output, attn_weights = self._attend(attention_interface, padded, attention_mask, **kwargs)
            attn_output = packed_tokens.pack(attn_output)
        return self.o_proj(attn_output), attn_weights

    def _attend(
        self, attention_interface: Callable, states: list[torch.Tensor], attention_mask, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `(B, L, D)` query, key and value projections: the `(B, L, D)` output and the weights."""
        input_shape = states[0].shape[:-1]
        query, key, value = (projected.view(*input_shape, -1, self.head_dim).transpose(1, 2) for projected in states)
        attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, **kwargs)
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


class MSViTMLP(nn.Module):
    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MSViTLayer(GradientCheckpointingLayer):
    """A pre-norm transformer block with the same parameter names as transformers' `ViTLayer`."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.attention = MSViTAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MSViTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.dropout(attn_output)
        hidden_states = hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states, attn_weights


class MSViTPreTrainedModel(PreTrainedModel):
    config: MSViTConfig
    config_class = MSViTConfig
    base_model_prefix = "msvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MSViTEmbeddings", "MSViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_attention_backend = True
    # the gate loss is a per-batch mean: Trainer must average micro-batch losses, not rescale by `num_items_in_batch`
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, MSViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
            for name in TREE_TENSORS:
                init.copy_(getattr(module, f"tree_{name}"), getattr(module.configured_tree, name))
        elif isinstance(module, MSViTGateLoss) and hasattr(module, "prior_mean_logits"):
            init.constant_(module.prior_mean_logits, self._target_logit())
            init.constant_(module.prior_log_temperatures, math.log(self.config.gate_prior_temperature))
            init.constant_(module.hyperprior_log_std, math.log(self.config.gbas_hyperprior_std))
        elif isinstance(module, MSViTGate):
            # straight-through: the logit is a split probability's, start at the compute target. Counterfactual: it
            # regresses a loss drop, start at none; a prior off 0 ranks the regions the gate has not learnt yet below
            # (target < 0.5) or above (> 0.5) the learnt ones, and trained from scratch on the gate's own ranking the
            # backbone then never sees those regions fine
            straight_through = self.config.gate_objective == "straight_through"
            residual = module.rule_score is not None
            objective_prior = self._target_logit() if straight_through and not residual else 0.0
            init.constant_(module.split_logit_bias, objective_prior)
            if residual:  # start as the rule exactly: unit scale on its score, no correction
                init.ones_(module.rule_scale)
                init.zeros_(module.layers[-1].weight)
        elif isinstance(module, MSViTMaskTransformerDecoder):
            init.trunc_normal_(module.class_embeddings, mean=0.0, std=self.config.initializer_range)

    def set_budget(
        self,
        fine_ratio: float | None = None,
        threshold: float | list[float] | None = None,
        num_tokens: int | None = None,
    ) -> None:
        """Change the inference compute of a trained model, without retraining (give exactly one argument).

        Args:
            fine_ratio: split exactly `round(fine_ratio * D)` regions per image (`D` the gate's decisions: the coarse
                regions with two patch sizes), those with the highest split logits, top-down with more sizes (a
                region only under a split parent). Every image then has the same token count, known before the
                forward pass: the static path of `torch.compile(fullgraph=True)`, `torch.export` and ONNX.
            threshold: split every region whose split probability exceeds it (under a split parent); token counts
                vary per image, and the batch runs packed (`config.ragged_execution`; `predict_token_counts` helps
                batch images of similar counts together). With more than two patch sizes it may be a list, one
                threshold per decision level, finest first. Clears a fine-ratio budget. For a gate trained with the
                counterfactual objective this splits the regions whose predicted loss drop exceeds
                `logit(threshold) / config.counterfactual_target_scale` nats.
            num_tokens: the fixed budget as the exact number of tokens per image at `config.image_size`, CLS
                included: `1 + roots + (r**2 - 1) * splits` (`1 + Nc + 3 * splits` for two sizes with `r = 2`); stored
                as the fine ratio that gives it. A count no number of splits gives is an error that names the nearest.

        All are stored in the config (`fine_ratio_budget`, `gate_threshold`), so they are saved with the model.
        Training ignores them: the gate samples its decisions.
        """
        if sum(value is not None for value in (fine_ratio, threshold, num_tokens)) != 1:
            raise ValueError(
                "Pass exactly one of `fine_ratio` (split a fixed fraction of regions per image), `threshold` "
                "(split regions whose split probability exceeds it) or `num_tokens` (a fixed token count), got "
                f"fine_ratio={fine_ratio}, threshold={threshold}, num_tokens={num_tokens}."
            )
        if num_tokens is not None:
            fine_ratio = self._fine_ratio_of(num_tokens)
        if fine_ratio is not None and not 0.0 <= fine_ratio <= 1.0:
            raise ValueError(f"`fine_ratio` must lie in [0, 1], got {fine_ratio}.")
        if threshold is not None:
            values = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
            levels = self.config.num_scales - 1
            if len(values) not in (1, levels) or not all(0.0 < value < 1.0 for value in values):
                raise ValueError(
                    f"`threshold` must lie in (0, 1), got {threshold}: one value, or one per decision level "
                    f"({levels}, finest first)."
                )
            self.config.gate_threshold = values[0] if isinstance(threshold, (int, float)) else values
        self.config.fine_ratio_budget = fine_ratio

    def _fine_ratio_of(self, num_tokens: int) -> float:
        """The fine ratio whose fixed budget gives exactly `num_tokens` tokens per image at `config.image_size`."""
        tree = self.base_model.embeddings.configured_tree
        growth = tree.ratio**2 - 1
        num_split, remainder = divmod(num_tokens - 1 - tree.num_roots, growth)
        if remainder or not 0 <= num_split <= tree.num_decisions:
            splits = min(max(num_split, 0), tree.num_decisions)
            nearest = sorted(
                {1 + tree.num_roots + growth * count for count in (splits, min(splits + 1, tree.num_decisions))}
            )
            raise ValueError(
                f"No layout has {num_tokens} tokens: at image size {self.config.image_size} every image has 1 + "
                f"{tree.num_roots} + {growth} x splits tokens, splits from 0 to {tree.num_decisions}; nearest: "
                f"{' or '.join(map(str, nearest))}."
            )
        return num_split / tree.num_decisions

    @torch.no_grad()
    def predict_token_counts(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens per image `(B,)` (CLS included) that inference will give these images, from the gate alone.

        Only the gate runs (a small share of a forward pass), with the inference decisions (`gate_threshold`, or
        `fine_ratio_budget`). It serves length bucketing: a ragged batch pays attention at the length of its longest
        image, so when the order of the images does not matter (evaluation), batches of similar counts run fastest.
        With tensors, `mixed_scale_tokens.length_buckets` groups them:

            counts = model.predict_token_counts(pixel_values)
            for indices in length_buckets(counts, batch_size=32):
                logits[indices] = model(pixel_values[indices]).logits

        With a pipeline, which batches its inputs in the order given, sort them and restore the order:

            counts = model.predict_token_counts(processor(images, return_tensors="pt").pixel_values)
            order = counts.argsort(stable=True).tolist()
            results = [None] * len(images)
            for index, result in zip(order, classifier([images[i] for i in order], batch_size=32)):
                results[index] = result
        """
        self.base_model._check_inputs(pixel_values, None, "gathered")
        embeddings = self.base_model.embeddings
        pixel_values = pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype)
        tree = embeddings.scale_tree(*pixel_values.shape[-2:])
        return token_counts(embeddings.predict_split_mask(pixel_values), tree)

    def _target_logit(self) -> float:
        """`logit(target_fine_ratio)`, the target clipped to [0.01, 0.99] so that 0 and 1 stay finite."""
        target = min(max(self.config.target_fine_ratio, 0.01), 0.99)
        return math.log(target / (1 - target))

    def _with_gate_loss(self, task_loss: torch.Tensor, gate_loss: torch.Tensor | None) -> torch.Tensor:
        """The loss a head returns with labels: the task loss plus the weighted gate loss (training, gate decisions),
        so that `Trainer` keeps the compute budget with no custom code."""
        return task_loss if gate_loss is None else task_loss + self.config.gate_loss_weight * gate_loss

    def _head_macs(self, token_counts: torch.Tensor) -> int | torch.Tensor:
        """MACs of the task head per image, from the token counts (CLS included)."""
        return 0

    def _task_logits(self, outputs: MSViTModelOutput, pixel_values: torch.Tensor) -> torch.Tensor:
        """The head's logits from the backbone's outputs."""
        raise NotImplementedError

    def _per_image_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss of every image `(B,)`: what a region's split is worth to the counterfactual objective."""
        raise NotImplementedError

    def _per_image_divergence(self, logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
        """`KL(softmax(reference) || softmax(logits))` over the class dimension (1), averaged over any positions
        after it (segmentation): `(B,)`."""
        if logits.shape[1] < 2:
            raise ValueError(
                "counterfactual_target='all_fine_kl' compares class distributions and needs num_labels >= 2; use "
                "counterfactual_target='task_loss'."
            )
        divergence = F.kl_div(
            F.log_softmax(logits.float(), dim=1),
            F.log_softmax(reference_logits.float(), dim=1),
            log_target=True,
            reduction="none",
        ).sum(1)
        return divergence.reshape(len(logits), -1).mean(-1)

    def _training_gate_loss(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        outputs: MSViTModelOutput,
        logits: torch.Tensor,
        forced_split_mask: torch.Tensor | None,
        interpolate_pos_encoding: bool | None,
    ) -> torch.Tensor | None:
        """The gate loss of a forward pass with labels: the backbone's straight-through budget loss, or in training
        under the counterfactual objective the regression of flipped regions' split logits on their loss drops.

        The sampled layout's own forward pass (`outputs`, `logits`) serves every flip; the `counterfactual_flips`
        flipped layouts per image run as one extra batch without gradients, on the gathered path (the cheapest, and
        equal to the masked one for the same decisions).
        """
        config = self.config
        counterfactual = config.gate_type == "learned" and config.gate_objective == "counterfactual"
        if not (self.training and counterfactual and forced_split_mask is None):
            return outputs.gate_loss
        split_mask = outputs.split_mask
        batch_size = split_mask.shape[0]
        tree = self.base_model.embeddings.scale_tree(*pixel_values.shape[-2:])
        reachable = reachable_decisions(split_mask, tree)
        flips = sample_flips(reachable, config.counterfactual_flips, tree.num_decision_roots)
        num_flips = flips.shape[1]

        def logits_of(layouts: torch.Tensor) -> torch.Tensor:
            repeated = pixel_values.repeat_interleave(len(layouts) // batch_size, dim=0)
            layout_outputs = self.msvit(
                repeated,
                split_mask=layouts,
                token_path="gathered",
                interpolate_pos_encoding=interpolate_pos_encoding,
                return_dict=True,
            )
            return self._task_logits(layout_outputs, repeated)

        with torch.no_grad():
            if config.counterfactual_target == "all_fine_kl":
                # label-free: how far each layout's prediction is from the model's own all-fine prediction
                reference = logits_of(torch.ones_like(split_mask))

                def per_image_loss(task_logits: torch.Tensor) -> torch.Tensor:
                    repeat = len(task_logits) // batch_size
                    return self._per_image_divergence(task_logits, reference.repeat_interleave(repeat, dim=0))

            else:

                def per_image_loss(task_logits: torch.Tensor) -> torch.Tensor:
                    return self._per_image_loss(
                        task_logits, labels.repeat_interleave(len(task_logits) // batch_size, 0)
                    )

            layout_losses = per_image_loss(logits.detach())
            flipped_losses = per_image_loss(logits_of(flipped_layouts(split_mask, flips)))
            loss_drop = split_loss_drop(split_mask, flips, layout_losses, flipped_losses.view(batch_size, num_flips))
        predicted = outputs.split_logits.gather(1, flips)
        return counterfactual_regression_loss(predicted, loss_drop, config.counterfactual_target_scale)

    def compute_macs(self, token_counts: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-image MACs `(B,)` from each image's own active token count (CLS included).

        Counts the gate on every region it decides, the patch embedding of every active token, the encoder on the
        image's own sequence and the head (a segmentation decoder also runs on the image's own tokens). `image_size`
        defaults to `config.image_size`.
        """
        config = self.config
        fine_height, fine_width = config.fine_grid_size
        height, width = image_size or (fine_height * config.patch_size, fine_width * config.patch_size)
        tree = self.base_model.embeddings.scale_tree(height, width)
        levels = tree.decision_levels.tolist()
        patch_values = config.num_channels * config.patch_size**2
        # a rule reads every value of its region once
        rule = sum(config.num_channels * config.scale_sizes[level] ** 2 for level in levels)
        if config.gate_type == "learned":
            gate = tree.num_decisions * mlp_macs(MSViTGate.layer_sizes(config))
            if config.gate_residual_rule is not None:
                gate += rule
        else:
            gate = rule
        if config.gate_type == "learned" and config.gate_input == "coarse_embedding":
            gate += tree.num_decisions * patch_values * config.hidden_size
        projections = 2 if config.separate_coarse_embedding else 1
        embedding = (token_counts - 1) * patch_values * config.hidden_size * projections
        encoder = encoder_macs(token_counts, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        return gate + embedding + encoder + self._head_macs(token_counts)

    @classmethod
    def from_vit(cls, vit: "PreTrainedModel | str | os.PathLike", **config_overrides) -> "MSViTPreTrainedModel":
        """Build an MSViT that reuses every weight of an HF ViT (or non-distilled DeiT) and adds a fresh gate.

        Args:
            vit: a `ViTModel` / `ViTForImageClassification` instance, or a local folder (or Hub id) holding one.
            config_overrides: MSViT config fields, e.g. `coarse_patch_size=32, target_fine_ratio=0.5`.

        With every region split, the converted model computes exactly what the ViT computes (tokens in another
        order), so its logits equal the ViT's.
        """
        if isinstance(vit, (str, os.PathLike)):
            from transformers import AutoConfig, ViTForImageClassification, ViTModel

            vit_config = AutoConfig.from_pretrained(vit)
            if vit_config.model_type != "vit":
                raise ValueError(
                    f"`from_vit` converts ViT checkpoints (model_type 'vit', which includes non-distilled DeiT), got "
                    f"model_type {vit_config.model_type!r} from {vit}."
                )
            is_classifier = any("ForImageClassification" in name for name in vit_config.architectures or [])
            vit = (ViTForImageClassification if is_classifier else ViTModel).from_pretrained(vit)
        vit_config = vit.config
        if getattr(vit_config, "model_type", None) != "vit":
            raise ValueError(
                f"`from_vit` expects a transformers ViT model (model_type 'vit'), got {type(vit).__name__}."
            )
        backbone = getattr(vit, "vit", vit)
        fields = {name: getattr(vit_config, name) for name in VIT_CONFIG_FIELDS}
        fields["coarse_patch_size"] = 2 * vit_config.patch_size
        fields.update(config_overrides)
        sizes = fields.get("patch_sizes")
        if sizes is not None and sizes[0] != vit_config.patch_size:
            raise ValueError(
                f"`patch_sizes` must start at the ViT's patch size {vit_config.patch_size}, got {list(sizes)}; e.g. "
                f"patch_sizes={[vit_config.patch_size * 2**level for level in range(len(sizes))]}."
            )
        model = cls(MSViTConfig(**fields))

        target = model.base_model
        state_dict = {name: tensor for name, tensor in backbone.state_dict().items() if not name.startswith("pooler.")}
        missing, unexpected = target.load_state_dict(state_dict, strict=False)
        new_parts = ("embeddings.gate.", "embeddings.coarse_patch_embeddings.", "gate_criterion.")
        missing = [name for name in missing if not name.startswith(new_parts)]
        if missing or unexpected:
            raise ValueError(f"ViT weights do not fit MSViT: missing {missing}, unexpected {unexpected}.")
        if model.config.separate_coarse_embedding:
            target.embeddings.coarse_patch_embeddings.load_state_dict(
                backbone.embeddings.patch_embeddings.state_dict()
            )
        if hasattr(model, "classifier") and hasattr(vit, "classifier"):
            model.classifier.load_state_dict(vit.classifier.state_dict())
        return model.to(next(vit.parameters()).dtype)


class MSViTModel(MSViTPreTrainedModel):
    def __init__(self, config: MSViTConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = MSViTEmbeddings(config)
        self.layers = nn.ModuleList([MSViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gate_criterion = MSViTGateLoss(config)
        self.post_init()

    def get_input_embeddings(self) -> MSViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def scale_tree(self, height: int, width: int) -> ScaleTree:
        """The candidate structure of a `height x width` image (`mixed_scale_tokens.ScaleTree`): what `token_index`,
        `split_mask` and `mixed_scale_tokens.tokens_to_grid` refer to."""
        return self.embeddings.scale_tree(height, width)

    def _check_inputs(self, pixel_values: torch.Tensor | None, split_mask: torch.Tensor | None, token_path: str):
        config = self.config
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values` of shape (batch_size, num_channels, height, width).")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"`pixel_values` must be a 4D tensor (batch_size, num_channels, height, width), got {shape}. "
                "Use the model's image processor, or add a batch dimension with `pixel_values[None]`."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"`pixel_values` must be a floating-point tensor, got {pixel_values.dtype}. Use the model's image "
                "processor, which rescales and normalises images."
            )
        if pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects {config.num_channels} "
                "(`config.num_channels`)."
            )
        height, width = pixel_values.shape[-2:]
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of `patch_size` ({config.patch_size}). Resize or pad "
                "the images to a multiple of it; MSViT never crops or resizes silently."
            )
        if token_path not in ("masked", "gathered"):
            raise ValueError(f"`token_path` must be 'masked', 'gathered' or None, got {token_path!r}.")
        if split_mask is not None:
            expected = (pixel_values.shape[0], self.embeddings.scale_tree(height, width).num_decisions)
            if split_mask.dtype != torch.bool or tuple(split_mask.shape) != expected:
                raise ValueError(
                    f"`split_mask` must be a bool tensor of shape {expected} (batch_size, the gate's decisions: the "
                    f"coarse regions in raster order with two patch sizes, `mixed_scale_tokens` with more), got "
                    f"{split_mask.dtype} of shape {tuple(split_mask.shape)}."
                )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        split_mask: torch.BoolTensor | None = None,
        token_path: str | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MSViTModelOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images prepared by the image processor; height and width must be multiples of `patch_size` (cells that
            the coarse grid does not hold stay fine).
        split_mask (`torch.BoolTensor` of shape `(batch_size, num_decisions)`, *optional*):
            Force the decisions (True = split the region) instead of asking the gate; no gate loss is returned then.
            With more than two patch sizes a mark under a kept region does not count.
        token_path (`str`, *optional*):
            `"masked"` or `"gathered"`; defaults to `config.train_token_path` in training and `"gathered"` otherwise.
        interpolate_pos_encoding (`bool`, *optional*):
            Interpolate the position embeddings to another image size (a multiple of `patch_size`).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if token_path is None:
            token_path = self.config.train_token_path if self.training else "gathered"
        self._check_inputs(pixel_values, split_mask, token_path)
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"`output_attentions=True` returns no attention maps with attn_implementation="
                f"{self.config._attn_implementation!r}; load the model with attn_implementation='eager' to get them."
            )
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)

        tokens = self.embeddings(
            pixel_values,
            split_mask=split_mask,
            token_path=token_path,
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
        )
        hidden_states = tokens.embeddings
        if tokens.key_weights is not None:
            kwargs["key_weights"] = tokens.key_weights
        attention_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=tokens.attention_mask,
            # a mask comes only where keys are masked or biased: looking for padding again would be a host sync
            allow_is_bidirectional_skip=tokens.attention_mask is None,
        )
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        packed = tokens.layout.packed
        if packed is not None:
            # a ragged inference batch: the layers run on its active tokens only, attention on the padded batch
            hidden_states = packed.pack(hidden_states)
            kwargs["packed_tokens"] = packed
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, attention_mask, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states if packed is None else packed.pad(hidden_states),)
            if output_attentions:
                all_attentions += (attn_weights,)
        sequence_output = self.layernorm(hidden_states)
        if packed is not None:
            sequence_output = packed.pad(sequence_output)

        gate_loss = None
        if tokens.split_soft is not None:
            gate_loss = self.gate_criterion(tokens.split_soft)
        output = MSViTModelOutput(
            last_hidden_state=sequence_output,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            token_mask=tokens.layout.token_mask,
            token_index=tokens.layout.token_index,
            split_mask=tokens.split_mask,
            split_probs=tokens.split_probs,
            split_logits=tokens.split_logits,
            token_counts=tokens.layout.counts,
            gate_loss=gate_loss,
        )
        return output if return_dict else output.to_tuple()


class MSViTForImageClassification(MSViTPreTrainedModel):
    def __init__(self, config: MSViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.msvit = MSViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def _head_macs(self, token_counts: torch.Tensor) -> int:
        return self.config.hidden_size * self.config.num_labels

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        split_mask: torch.BoolTensor | None = None,
        token_path: str | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MSViTImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels)`. The returned loss then also includes the weighted gate loss, so
            that `Trainer` keeps the compute budget with no custom code.

        See [`MSViTModel.forward`] for the other arguments.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.msvit(
            pixel_values,
            split_mask=split_mask,
            token_path=token_path,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self._task_logits(outputs, pixel_values)

        loss, gate_loss = None, outputs.gate_loss
        if labels is not None:
            gate_loss = self._training_gate_loss(
                pixel_values, labels, outputs, logits, split_mask, interpolate_pos_encoding
            )
            loss = self._with_gate_loss(self.loss_function(labels, logits, self.config, **kwargs), gate_loss)
        output = MSViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            split_mask=outputs.split_mask,
            split_probs=outputs.split_probs,
            split_logits=outputs.split_logits,
            token_counts=outputs.token_counts,
            gate_loss=gate_loss,
        )
        return output if return_dict else output.to_tuple()

    def _task_logits(self, outputs: MSViTModelOutput, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(outputs.last_hidden_state[:, 0])

    def _per_image_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.config.problem_type == "regression" or self.num_labels == 1:
            return ((logits.view(len(labels), -1) - labels.view(len(labels), -1).float()) ** 2).mean(-1)
        if self.config.problem_type == "multi_label_classification" or labels.is_floating_point():
            return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
        return F.cross_entropy(logits, labels, reduction="none")


class MSViTLinearDecoder(nn.Module):
    """Segmenter's linear decoder: class logits per patch token."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor, cell_counts: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden_states)

    @staticmethod
    def macs(config: MSViTConfig, num_tokens: torch.Tensor) -> torch.Tensor:
        return num_tokens * config.hidden_size * config.num_labels


class MSViTMaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (Strudel et al., ICCV 2021), run on the mixed-scale tokens.

    Learned class embeddings join the patch tokens in `decoder_num_layers` transformer blocks; each patch's class
    logits are the cosine similarities of its projected token with the projected class embeddings, layer-normalised
    over classes. On the dense grid a coarse token would appear as `r**2` identical tokens, which stay identical
    through the blocks (no positions are added here): attending to them equals attending to the one token with its
    scores raised by `log r**2`. The blocks therefore run on the short sequence, with `log(cells)` as an additive
    attention mask (`-inf` on CLS, padding and inactive candidates), and give exactly the grid's logits.
    """

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.input_projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.class_embeddings = nn.Parameter(torch.zeros(1, config.num_labels, config.hidden_size))
        self.layers = nn.ModuleList([MSViTLayer(config) for _ in range(config.decoder_num_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.patch_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.class_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mask_norm = nn.LayerNorm(config.num_labels)

    def forward(self, hidden_states: torch.Tensor, cell_counts: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = hidden_states.shape
        num_labels = self.class_embeddings.shape[1]
        class_embeddings = self.class_embeddings.expand(batch_size, -1, -1).to(hidden_states.dtype)
        hidden_states = torch.cat([self.input_projection(hidden_states), class_embeddings], dim=1)
        key_cells = torch.cat([cell_counts, cell_counts.new_ones(batch_size, num_labels)], dim=1)
        attention_mask = attention_key_bias(key_cells, hidden_states.dtype, length + num_labels)
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states, attention_mask)
        hidden_states = self.layernorm(hidden_states)
        patches = F.normalize(self.patch_projection(hidden_states[:, :length]), dim=-1)
        classes = F.normalize(self.class_projection(hidden_states[:, length:]), dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))

    @staticmethod
    def macs(config: MSViTConfig, num_tokens: torch.Tensor) -> torch.Tensor:
        hidden_size, num_labels = config.hidden_size, config.num_labels
        blocks = encoder_macs(
            num_tokens + num_labels, hidden_size, config.intermediate_size, config.decoder_num_layers
        )
        projections = (2 * num_tokens + num_labels) * hidden_size**2
        return blocks + projections + num_tokens * num_labels * hidden_size


DECODERS = {"linear": MSViTLinearDecoder, "mask_transformer": MSViTMaskTransformerDecoder}


class MSViTForSemanticSegmentation(MSViTPreTrainedModel):
    def __init__(self, config: MSViTConfig):
        super().__init__(config)
        if config.num_labels < 2:
            raise ValueError(
                f"MSViTForSemanticSegmentation needs `num_labels` >= 2 (background counts as a class), got "
                f"{config.num_labels}. Pass `id2label` (or `num_labels`) to the config."
            )
        self.num_labels = config.num_labels
        self.msvit = MSViTModel(config)
        self.decode_head = DECODERS[config.decoder_type](config)
        self.post_init()

    def _head_macs(self, token_counts: torch.Tensor) -> torch.Tensor:
        return DECODERS[self.config.decoder_type].macs(self.config, token_counts - 1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        split_mask: torch.BoolTensor | None = None,
        token_path: str | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MSViTSemanticSegmenterOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Class index per pixel in `[0, config.num_labels)`, or `config.semantic_loss_ignore_index` where a pixel
            does not count. The labels may have any size: the logits are upsampled bilinearly to it. The returned
            loss then also includes the weighted gate loss, so that `Trainer` keeps the compute budget.

        See [`MSViTModel.forward`] for the other arguments. The logits cover the fine patch grid; upsample them to
        the image size (e.g. with the image processor's `post_process_semantic_segmentation`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:
            self._check_labels(labels, pixel_values)
        outputs = self.msvit(
            pixel_values,
            split_mask=split_mask,
            token_path=token_path,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self._task_logits(outputs, pixel_values)

        loss, gate_loss = None, outputs.gate_loss
        if labels is not None:
            upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(upsampled, labels, ignore_index=self.config.semantic_loss_ignore_index)
            gate_loss = self._training_gate_loss(
                pixel_values, labels, outputs, logits, split_mask, interpolate_pos_encoding
            )
            loss = self._with_gate_loss(loss, gate_loss)
        output = MSViTSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            split_mask=outputs.split_mask,
            split_probs=outputs.split_probs,
            split_logits=outputs.split_logits,
            token_counts=outputs.token_counts,
            gate_loss=gate_loss,
        )
        return output if return_dict else output.to_tuple()

    def _task_logits(self, outputs: MSViTModelOutput, pixel_values: torch.Tensor) -> torch.Tensor:
        tree = self.msvit.scale_tree(*pixel_values.shape[-2:])
        # CLS takes no part in the dense prediction
        token_index, token_mask = outputs.token_index[:, 1:], outputs.token_mask[:, 1:]
        cell_counts = token_cell_counts(token_index, token_mask, tree)
        token_logits = self.decode_head(outputs.last_hidden_state[:, 1:], cell_counts)
        return tokens_to_grid(token_logits, token_index, token_mask, tree)

    def _per_image_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over each image's labelled pixels."""
        ignore_index = self.config.semantic_loss_ignore_index
        upsampled = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pixel_losses = F.cross_entropy(upsampled, labels, ignore_index=ignore_index, reduction="none")
        labelled = (labels != ignore_index).flatten(1).sum(-1).clamp_min(1)
        return pixel_losses.flatten(1).sum(-1) / labelled

    def _check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            return  # the backbone explains what `pixel_values` should be
        batch_size = pixel_values.shape[0]
        if labels.ndim != 3 or labels.shape[0] != batch_size or labels.is_floating_point():
            raise ValueError(
                f"`labels` must be an integer tensor of shape (batch_size={batch_size}, height, width) holding a "
                f"class index per pixel, got {labels.dtype} of shape {tuple(labels.shape)}."
            )


__all__ = ["MSViTForImageClassification", "MSViTForSemanticSegmentation", "MSViTModel", "MSViTPreTrainedModel"]
