"""Evaluation metrics for the training scripts, loaded offline from this package (`msvit.metrics`).

`evaluate.load("accuracy")` fetches the metric from the Hub; `load_metric("accuracy")` loads the local copy in
`metrics/accuracy/accuracy.py` by absolute path, so it works offline, from any working directory and from an
installed package.

Available metrics (one folder each under `metrics/`):

- `accuracy`: top-1 accuracy of class predictions.
- `mean_iou`: mean and per-class intersection-over-union and pixel accuracies of segmentation masks
  (`compute(num_labels=..., ignore_index=255)`).
"""

from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np


METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """Absolute path of the local metric folder `metrics/<name>` (it holds `<name>.py`)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"Unknown metric {name!r}: no {path / f'{name}.py'}. Available: {', '.join(available)}.")
    return path


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of the local metric `metrics/<name>` (e.g. `"accuracy"`); `kwargs` go to `evaluate.load`."""
    return evaluate.load(str(metric_path(name)), **kwargs)


def make_compute_metrics(name: str = "accuracy") -> Callable[[tuple], dict[str, float]]:
    """A `Trainer`-style `compute_metrics(eval_pred)`: logits `(N, num_labels)` are argmaxed and scored by the local
    metric `name` against the labels `(N,)`."""
    metric = load_metric(name)

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics
