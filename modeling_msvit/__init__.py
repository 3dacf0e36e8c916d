# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""MSViT for Hugging Face Transformers.

Importing this package registers MSViT with the Auto classes (so local folders load without running checkpoint code)
and registers every class for its Auto class, so that `save_pretrained` / `push_to_hub` write a folder that loads
anywhere with `trust_remote_code=True`. The modules beside this file are the files uploaded to the Hub.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation

from .configuration_msvit import MSViTConfig
from .modeling_msvit import (
    MSViTForImageClassification,
    MSViTForSemanticSegmentation,
    MSViTImageClassifierOutput,
    MSViTModel,
    MSViTModelOutput,
    MSViTPreTrainedModel,
    MSViTSemanticSegmenterOutput,
)


AutoConfig.register("msvit", MSViTConfig, exist_ok=True)
AutoModel.register(MSViTConfig, MSViTModel, exist_ok=True)
AutoModelForImageClassification.register(MSViTConfig, MSViTForImageClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(MSViTConfig, MSViTForSemanticSegmentation, exist_ok=True)

MSViTConfig.register_for_auto_class()
MSViTModel.register_for_auto_class("AutoModel")
MSViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MSViTForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "MSViTConfig",
    "MSViTForImageClassification",
    "MSViTForSemanticSegmentation",
    "MSViTImageClassifierOutput",
    "MSViTModel",
    "MSViTModelOutput",
    "MSViTPreTrainedModel",
    "MSViTSemanticSegmenterOutput",
]
