"""The training library (`msvit.train`): data, the training loop, evaluation, gate training, and the two training
scripts `run_classification` and `run_segmentation`."""
