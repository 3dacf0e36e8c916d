"""Training pipeline for MSViT: data loading (`train.data`) and metrics (`train.metrics`)."""
