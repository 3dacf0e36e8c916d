# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""MSViT model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


GATE_INPUTS = ("downscaled_pixels", "pixels", "neighbourhood", "coarse_embedding")
GATE_TYPES = ("learned", "entropy", "std")
GATE_RULES = ("entropy", "std")
GATE_OBJECTIVES = ("counterfactual", "straight_through")
COUNTERFACTUAL_LAYOUTS = ("uniform", "gate")
COUNTERFACTUAL_TARGETS = ("task_loss", "all_fine_kl")
TOKEN_PATHS = ("masked", "gathered")
RAGGED_EXECUTIONS = ("packed", "padded")
MASKED_PATH_ATTENTIONS = ("key_mask", "masked_softmax")
GATE_LOSSES = ("gbas", "bas", "ratio")
DECODER_TYPES = ("linear", "mask_transformer")
# fields with the same meaning in transformers' `ViTConfig`: `from_vit` copies them from a ViT
VIT_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "id2label",
    "label2id",
)

# Behaviour of a `config.json` saved before these fields existed: loading it keeps the model it described.
LEGACY_DEFAULTS = {"size_aware_attention": False, "gate_objective": "straight_through", "gate_residual_rule": None}

# Written into every saved `config.json` so that a plain `save_pretrained` folder loads with
# `trust_remote_code=True` through any of the Auto classes.
AUTO_MAP = {
    "AutoConfig": "configuration_msvit.MSViTConfig",
    "AutoModel": "modeling_msvit.MSViTModel",
    "AutoModelForImageClassification": "modeling_msvit.MSViTForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_msvit.MSViTForSemanticSegmentation",
}


def _as_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@strict
class MSViTConfig(PreTrainedConfig):
    r"""
    Configuration of an MSViT (Dynamic Mixed-Scale Tokenization, Havtorn et al., ICCVW 2023) model.

    The ViT fields mean what they mean in [`ViTConfig`]. MSViT adds larger patch sizes: a gate reads every coarse
    region and either keeps it as one coarse token or splits it into its `(coarse_patch_size // patch_size)**2` fine
    tokens. Throughout this repository the gate outputs the probability that a region is **split** (`split_prob`),
    and the *fine ratio* is the fraction of the gate's decisions that split. With more than two sizes
    (`patch_sizes`) the regions form a tree: a split region's children decide in turn, top-down.

    Args:
        patch_size (`int`, *optional*, defaults to 16):
            The fine patch size, shared with a ViT/16 backbone.
        coarse_patch_size (`int`, *optional*, defaults to 32):
            The coarse patch size; a multiple of `patch_size`. Coarse regions are area-downscaled to `patch_size` and
            embedded with the same patch embedding as fine patches (unless `separate_coarse_embedding`).
        patch_sizes (`list[int]`, *optional*):
            All patch sizes, finest first, e.g. `[16, 32, 64]`: each size the previous one times the same factor `r
            >= 2` (2 makes a quadtree). `patch_size` and `coarse_patch_size` are then its first and last entries.
            The gate decides top-down, one decision per node: a region of the largest size is kept or split into its
            `r**2` regions of the next size, which decide in turn, down to `patch_size`. Cells of a size whose grid
            does not hold them (the border of an image that is not a multiple of that size) start at the next finer
            size, so 224 px works with 64 px top regions. Every patch is area-downscaled to `patch_size` and embedded
            with the one patch embedding; position embeddings are the averages of the finest cells a token covers.
            None (the default, and what a `config.json` saved before this field holds) means
            `[patch_size, coarse_patch_size]`.
        separate_coarse_embedding (`bool`, *optional*, defaults to `False`):
            Ablation: embed coarse patches with their own projection instead of the shared one.
        size_aware_attention (`bool`, *optional*, defaults to `True`):
            Raise every attention score towards a key by the log of the number of fine cells that key covers (`log
            r**2` for a coarse token, 0 for fine tokens and CLS; ToMe's proportional attention). A coarse token over
            a uniform region then attends and is attended exactly like its `r**2` children would, so a ViT trained on
            fine tokens alone tolerates mixed layouts. With every region split the model is exactly a ViT either way.
            A `config.json` saved without this field loads with `False`, the behaviour it was trained with.
        gate_type (`str`, *optional*, defaults to `"learned"`):
            Who scores the regions: `"learned"` (the gate MLP), or a training-free rule on the region's own pixels
            (APT's adaptive patch sizes): `"entropy"` (entropy of the region's pixel histogram, divided by its
            maximum `log(gate_entropy_bins)`) or `"std"` (`tanh` of the standard deviation of its pixels). A rule
            gate has no weights: `from_vit(vit, gate_type="entropy", fine_ratio_budget=0.5)` needs no training.
        gate_entropy_bins (`int`, *optional*, defaults to 32):
            Histogram bins of the `"entropy"` rule.
        gate_entropy_range (`list[float]`, *optional*, defaults to `[-1.0, 1.0]`):
            Pixel-value range that the `"entropy"` rule's bins cover (values outside fall into the end bins). The
            default is the range of images normalised with mean 0.5 and std 0.5; use `[(0 - m) / s, (1 - m) / s]`
            for other normalisations.
        gate_input (`str`, *optional*, defaults to `"downscaled_pixels"`):
            What the gate reads for each coarse region: `"downscaled_pixels"` (the region area-downscaled to
            `patch_size`), `"pixels"` (the region at full resolution), `"neighbourhood"` (the region at full
            resolution and, for context, the 3 x 3 regions around it area-downscaled to `patch_size`, 0 outside the
            image) or `"coarse_embedding"` (the coarse token's patch embedding, without position). With more than two
            patch sizes one gate serves every level: "full resolution" is the second patch size (larger regions are
            area-downscaled to it), and the neighbourhood is of same-size regions.
        gate_residual_rule (`str`, *optional*):
            Learned gate only: make it a residual gate on a training-free rule (`"std"` or `"entropy"`, as in
            `gate_type`). Its logit is `rule_scale * score + bias + MLP(region)`, with the rule's score in [0, 1],
            `rule_scale = 1`, `bias = 0` and the MLP's last layer zero at initialisation: the gate starts as the
            rule exactly (the same decisions at any fixed budget) and learns a correction. The rule reads the
            full-resolution region whatever `gate_input` is. A `config.json` saved without this field loads with None.
        gate_prior_per_level (`bool`, *optional*, defaults to `True`):
            With more than two patch sizes: give the learned gate one prior split logit per decision level (`True`) or
            one for every level (`False`), so that only what the MLP reads in a region ranks a large region against a
            small one. The residual gate's recipe takes one: a prior per level can rank every region of one size above
            those of another whatever they hold, which overrides the rule's ranking across levels. With two sizes
            both are the same model.
        gate_hidden_size (`int`, *optional*, defaults to 64):
            Width of the gate MLP.
        gate_num_layers (`int`, *optional*, defaults to 4):
            Number of linear layers in the gate MLP (the paper's gate is a 4-layer MLP).
        gate_temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the Gumbel-sigmoid relaxation used in training.
        gate_threshold (`float` or `list[float]`, *optional*, defaults to 0.5):
            At inference a region is split when its split probability exceeds this threshold (and, with more than two
            patch sizes, its parent is split). With more than two sizes it may be one threshold per decision level,
            finest first: entry `i` applies to the regions of `patch_sizes[i + 1]`.
        fine_ratio_budget (`float`, *optional*):
            If set, inference ignores `gate_threshold` and splits exactly `round(fine_ratio_budget * D)` regions per
            image, `D` the number of split decisions (the coarse regions with two patch sizes; every region larger than
            `patch_size` with more): those with the highest gate logits, top-down (a region only under a split
            parent), so that every image has the same token count.
        train_token_path (`str`, *optional*, defaults to `"masked"`):
            Execution path in training: `"masked"` (all candidate tokens, inactive ones masked out of attention) or
            `"gathered"` (only active tokens, padded per batch). Inference always uses the gathered path.
        ragged_execution (`str`, *optional*, defaults to `"packed"`):
            How an inference batch whose images have different token counts (threshold mode, forced decisions) runs
            on the gathered path. `"packed"`: layer norms, projections and MLPs run on the batch's active tokens as
            one `(total_tokens, hidden_size)` matrix, and attention runs once on the batch padded to its longest
            image, under the same mask. `"padded"`: every layer runs on the padded batch. Both give the same outputs
            in the same format (padded per image, with `token_mask`); packed skips the padding's share of the
            projections and MLPs. Training, the fixed budget and batches whose images all have the same count are not
            packed (there is no padding to skip).
        masked_path_attention (`str`, *optional*, defaults to `"key_mask"`):
            How the masked path hides inactive tokens: `"key_mask"` (a boolean key mask; inactive tokens are also
            multiplied by 0, so the gate hears only from the alternative it chose) or `"masked_softmax"` (DynamicViT's
            softmax weighted by the straight-through values, which passes gradient through both alternatives;
            computed in eager mode whatever `attn_implementation` is).
        gate_objective (`str`, *optional*, defaults to `"counterfactual"`):
            How a learned gate trains. `"counterfactual"`: every training forward with `labels` samples a layout,
            flips `counterfactual_flips` regions per image, measures with one extra no-grad forward how much the
            task loss drops when each flipped region is split instead of kept, and regresses that region's split
            logit on `counterfactual_target_scale` times the drop; the gate's logit then predicts the loss drop of
            splitting (in units of `1 / counterfactual_target_scale` nats). `"straight_through"`: the paper's
            Gumbel-sigmoid with a straight-through estimator, with the compute-budget loss `gate_loss_type`.
            A `config.json` saved without this field loads with `"straight_through"`.
        counterfactual_flips (`int`, *optional*, defaults to 1):
            Regions flipped per image and training step (counterfactual objective); each costs one image's forward.
        counterfactual_target_scale (`float`, *optional*, defaults to 1.0):
            The split logit regresses this times the measured loss drop. With it, `gate_threshold=t` splits the
            regions whose predicted loss drop exceeds `logit(t) / counterfactual_target_scale` nats. On the
            evidence's frozen ViT/8 at fine ratio 0.5, 10 gave 84.19 +- 0.01 % against 83.98 +- 0.39 % for 1 (3
            seeds; one seed at 1 ranked faint item regions below empty ones), but on the cluttered bench 10 was
            worse (52.78 % against 55.12 % at fine ratio 0.4, seed 0, validation), so the default stays 1.
        counterfactual_target (`str`, *optional*, defaults to `"task_loss"`):
            What a flip's loss drop measures. `"task_loss"`: the task loss against the labels. `"all_fine_kl"`: the
            KL divergence of the prediction from the model's own all-fine prediction (one more no-grad forward per
            image), which measures what a split changes whatever the label, with less noise than a cross-entropy that
            a misclassified image dominates.
        counterfactual_layouts (`str`, *optional*, defaults to `"uniform"`):
            How the counterfactual objective samples each training layout: a fine ratio uniform in [0, 1] per image,
            and then uniformly random regions (`"uniform"`: the gate learns each region's value in every context,
            for training a gate on a frozen backbone) or the regions with the highest gate logits (`"gate"`: the
            layouts the gate chooses, for fine-tuning the backbone with the objective, so that it learns to read
            them). On the evidence's frozen ViT/8, `"gate"` made the gate no better (83.84 +- 0.38 % against
            83.98 +- 0.39 % at fine ratio 0.5, 3 seeds; item regions split 0.92 against 0.94): a region ranked low is
            measured mostly where the regions ranked above it are already split, where it adds little, so it stays
            ranked low.
        gate_loss_type (`str`, *optional*, defaults to `"gbas"`):
            Straight-through objective only. The compute-budget loss on the gate's soft split values (see
            `gate_losses.py`): `"gbas"`, the paper's
            generalized batch-shaping (a learned Relaxed-Bernoulli prior per coarse position, a Gaussian hyperprior
            on their means centred on `target_fine_ratio`, an L1 term on their temperatures); `"bas"`, plain
            batch-shaping against one shared prior; `"ratio"`, `(mean soft split value - target_fine_ratio) ** 2`.
        target_fine_ratio (`float`, *optional*, defaults to 0.5):
            Straight-through objective: the fraction of coarse regions the gate loss steers towards splitting, and
            the gate's initial split probability. The counterfactual objective does not train towards a ratio (its
            gate starts at no predicted loss drop); set its compute with `fine_ratio_budget` or `gate_threshold`.
        gate_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the gate loss in the total loss returned with `labels`.
        gate_prior_temperature (`float`, *optional*, defaults to 0.5):
            Temperature of the shared BaS prior, and the initial temperature of the gBaS priors.
        gbas_hyperprior_std (`float`, *optional*, defaults to 0.2):
            Standard deviation of the Gaussian hyperprior on the gBaS prior means (initial value if learned).
        gbas_hyperprior_learnable (`bool`, *optional*, defaults to `False`):
            Learn the hyperprior's standard deviation instead of keeping it fixed.
        gbas_hyperprior_weight (`float`, *optional*, defaults to 1.0):
            Weight of the hyperprior term inside the gBaS loss.
        gbas_temperature_weight (`float`, *optional*, defaults to 0.01):
            Weight of the L1 term on the gBaS prior temperatures.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label ignored by the semantic segmentation loss.
        decoder_type (`str`, *optional*, defaults to `"linear"`):
            Decoder of [`MSViTForSemanticSegmentation`]: `"linear"` (Segmenter's linear decoder, class logits per
            token) or `"mask_transformer"` (Segmenter's mask transformer: learned class embeddings and the patch
            tokens go through `decoder_num_layers` transformer blocks, and masks are their scalar products). Both run
            on the mixed-scale tokens, weighting each token by the grid cells it covers, which equals running them on
            the dense grid.
        decoder_num_layers (`int`, *optional*, defaults to 2):
            Transformer blocks of the mask transformer decoder (width and heads as the encoder's).

    Example:

    ```python
    >>> from modeling_msvit import MSViTConfig, MSViTForImageClassification

    >>> config = MSViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
    >>> model = MSViTForImageClassification(config)
    ```"""

    model_type = "msvit"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 16
    coarse_patch_size: int = 32
    patch_sizes: list[int] | tuple[int, ...] | None = None
    num_channels: int = 3
    qkv_bias: bool = True
    separate_coarse_embedding: bool = False
    size_aware_attention: bool = True
    gate_type: str = "learned"
    gate_entropy_bins: int = 32
    gate_entropy_range: list[float] | tuple[float, float] = (-1.0, 1.0)
    gate_input: str = "downscaled_pixels"
    gate_residual_rule: str | None = None
    gate_prior_per_level: bool = True
    gate_hidden_size: int = 64
    gate_num_layers: int = 4
    gate_temperature: float | int = 1.0
    gate_threshold: float | list[float] | tuple[float, ...] = 0.5
    fine_ratio_budget: float | int | None = None
    train_token_path: str = "masked"
    ragged_execution: str = "packed"
    masked_path_attention: str = "key_mask"
    gate_objective: str = "counterfactual"
    counterfactual_flips: int = 1
    counterfactual_target_scale: float | int = 1.0
    counterfactual_target: str = "task_loss"
    counterfactual_layouts: str = "uniform"
    gate_loss_type: str = "gbas"
    target_fine_ratio: float | int = 0.5
    gate_loss_weight: float | int = 1.0
    gate_prior_temperature: float | int = 0.5
    gbas_hyperprior_std: float | int = 0.2
    gbas_hyperprior_learnable: bool = False
    gbas_hyperprior_weight: float | int = 1.0
    gbas_temperature_weight: float | int = 0.01
    semantic_loss_ignore_index: int = 255
    decoder_type: str = "linear"
    decoder_num_layers: int = 2

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "MSViTConfig":
        # a saved config without the newer fields describes a model trained before them: keep its behaviour
        return super().from_dict({**LEGACY_DEFAULTS, **config_dict}, **kwargs)

    def __post_init__(self, **kwargs):
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        if self.patch_sizes is not None:
            self.patch_sizes = list(self.patch_sizes)
            if self.patch_sizes:
                self.patch_size, self.coarse_patch_size = self.patch_sizes[0], self.patch_sizes[-1]
        super().__post_init__(**kwargs)
        self.validate_msvit()

    @property
    def scale_sizes(self) -> tuple[int, ...]:
        """All patch sizes, finest first: `patch_sizes`, or `(patch_size, coarse_patch_size)`."""
        return tuple(self.patch_sizes) if self.patch_sizes is not None else (self.patch_size, self.coarse_patch_size)

    @property
    def num_scales(self) -> int:
        return len(self.scale_sizes)

    @property
    def scale_ratio(self) -> int:
        """Patches of one size per side of the next size (`r`); a split region has `r**2` children."""
        sizes = self.scale_sizes
        return sizes[1] // sizes[0]

    @property
    def coarse_grid_size(self) -> tuple[int, int]:
        height, width = _as_pair(self.image_size)
        return height // self.coarse_patch_size, width // self.coarse_patch_size

    @property
    def fine_grid_size(self) -> tuple[int, int]:
        height, width = _as_pair(self.image_size)
        return height // self.patch_size, width // self.patch_size

    def validate_msvit(self):
        """Raise a `ValueError` that names the field and the fix for every inconsistent setting."""
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "coarse_patch_size",
            "num_channels",
            "gate_hidden_size",
            "gate_num_layers",
            "decoder_num_layers",
            "gate_entropy_bins",
            "counterfactual_flips",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        sizes = self.scale_sizes
        if self.patch_sizes is not None and (len(sizes) < 2 or any(size < 1 for size in sizes)):
            raise ValueError(f"`patch_sizes` must hold at least two positive sizes, finest first, got {sizes}.")
        ratio = sizes[1] // sizes[0]
        if ratio < 2 or any(coarser != finer * ratio for finer, coarser in zip(sizes[:-1], sizes[1:])):
            if len(sizes) == 2:
                raise ValueError(
                    f"`coarse_patch_size` ({sizes[1]}) must be a multiple of `patch_size` ({sizes[0]}) and larger "
                    f"than it, e.g. coarse_patch_size={2 * sizes[0]}."
                )
            raise ValueError(
                f"`patch_sizes` {list(sizes)} must grow by the same integer factor >= 2 at every step, finest first, "
                f"e.g. {[sizes[0] * 2**level for level in range(len(sizes))]}."
            )
        image_size = _as_pair(self.image_size)
        if len(image_size) != 2 or any(side % self.patch_size != 0 or side < 1 for side in image_size):
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a positive multiple of `patch_size` ({self.patch_size}) on "
                "both sides, so that the finest patches tile the image exactly."
            )
        thresholds = [self.gate_threshold] if isinstance(self.gate_threshold, (int, float)) else self.gate_threshold
        if len(thresholds) not in (1, len(sizes) - 1) or not all(0.0 < value < 1.0 for value in thresholds):
            raise ValueError(
                f"`gate_threshold` must be one value in (0, 1), or one per decision level ({len(sizes) - 1} for "
                f"patch sizes {list(sizes)}, finest first), got {self.gate_threshold}."
            )
        if self.fine_ratio_budget is not None and not 0.0 <= self.fine_ratio_budget <= 1.0:
            raise ValueError(f"`fine_ratio_budget` must be None or lie in [0, 1], got {self.fine_ratio_budget}.")
        if not 0.0 <= self.target_fine_ratio <= 1.0:
            raise ValueError(f"`target_fine_ratio` must lie in [0, 1], got {self.target_fine_ratio}.")
        if self.counterfactual_target_scale <= 0:
            raise ValueError(
                f"`counterfactual_target_scale` must be positive, got {self.counterfactual_target_scale}."
            )
        low, high = self.gate_entropy_range
        if not low < high:
            raise ValueError(
                f"`gate_entropy_range` must be [low, high] with low < high, got {self.gate_entropy_range}."
            )
        if self.gate_temperature <= 0:
            raise ValueError(f"`gate_temperature` must be positive, got {self.gate_temperature}.")
        for name in ("gate_loss_weight", "gbas_hyperprior_weight", "gbas_temperature_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)}.")
        for name in ("gate_prior_temperature", "gbas_hyperprior_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.gate_residual_rule is not None and self.gate_residual_rule not in GATE_RULES:
            raise ValueError(
                f"`gate_residual_rule` must be None or one of {GATE_RULES}, got {self.gate_residual_rule!r}."
            )
        for name, value, allowed in (
            ("gate_input", self.gate_input, GATE_INPUTS),
            ("gate_type", self.gate_type, GATE_TYPES),
            ("gate_objective", self.gate_objective, GATE_OBJECTIVES),
            ("counterfactual_layouts", self.counterfactual_layouts, COUNTERFACTUAL_LAYOUTS),
            ("counterfactual_target", self.counterfactual_target, COUNTERFACTUAL_TARGETS),
            ("train_token_path", self.train_token_path, TOKEN_PATHS),
            ("ragged_execution", self.ragged_execution, RAGGED_EXECUTIONS),
            ("masked_path_attention", self.masked_path_attention, MASKED_PATH_ATTENTIONS),
            ("gate_loss_type", self.gate_loss_type, GATE_LOSSES),
            ("decoder_type", self.decoder_type, DECODER_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


__all__ = ["MSViTConfig"]
