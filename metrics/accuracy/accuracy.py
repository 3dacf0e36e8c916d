"""Top-1 accuracy as a local `evaluate` metric, loadable offline by path.

    import evaluate

    accuracy = evaluate.load("/path/to/repo/metrics/accuracy")  # or msvit.metrics.load_metric("accuracy")
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.666...}

`evaluate.load("accuracy")` needs the Hub; this module is a from-scratch equivalent that needs nothing but numpy.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """\
Accuracy is the fraction of predictions that equal their reference label:
accuracy = (number of correct predictions) / (number of predictions). With `sample_weight`, each prediction counts
with its weight: sum(weight * correct) / sum(weight). With `normalize=False`, the (weighted) number of correct
predictions is returned instead of the fraction. Values range from 0 to 1 (normalized), higher is better.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, e.g. `logits.argmax(-1)`.
    references (`list` of `int`): ground-truth class ids, one per prediction.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; if `False`, their
        (weighted) count.
    sample_weight (`list` of `float`, optional): one non-negative weight per prediction; defaults to 1 each.

Returns:
    accuracy (`float`): the (weighted) fraction of correct predictions, or their (weighted) count if
        `normalize=False`.

Examples:
    >>> accuracy = evaluate.load("metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1])
    {'accuracy': 0.5}
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1], normalize=False)
    {'accuracy': 2.0}
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1], sample_weight=[0.5, 2, 0, 0])
    {'accuracy': 1.0}
"""

_CITATION = """\
@inproceedings{havtorn2023msvit,
  title     = {MSViT: Dynamic Mixed-Scale Tokenization for Vision Transformers},
  author    = {Havtorn, Jakob Drachmann and Royer, Am{\\'e}lie and Blankevoort, Tijmen and Bejnordi, Babak Ehteshami},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV) Workshops},
  year      = {2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy of integer class predictions (the MSViT training scripts' classification metric)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Accuracy_and_precision#In_classification"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict[str, float] | None:
        """`evaluate.Metric.compute`, with `sample_weight` checked first when the predictions are given here: an error
        raised later, inside `_compute`, would leave `evaluate`'s cache-file lock held and slow the next call."""
        if predictions is not None and kwargs.get("sample_weight") is not None:
            _checked_weights(kwargs["sample_weight"], len(predictions), kwargs.get("normalize", True))
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.shape != references.shape:
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            weights = np.ones_like(correct)
        else:
            weights = _checked_weights(sample_weight, correct.size, normalize)
        score = float(np.dot(weights, correct))
        if normalize:
            if weights.sum() == 0:
                raise ValueError("Accuracy is undefined with no predictions.")
            score /= float(weights.sum())
        return {"accuracy": score}


def _checked_weights(sample_weight, num_predictions: int, normalize: bool) -> np.ndarray:
    """`sample_weight` as a float array, after checking its length and sign (and, to normalise, a positive sum)."""
    weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if weights.size != num_predictions:
        raise ValueError(f"sample_weight has {weights.size} values for {num_predictions} predictions.")
    if np.any(weights < 0):
        raise ValueError("sample_weight must be non-negative.")
    if normalize and num_predictions and weights.sum() == 0:
        raise ValueError("Accuracy is undefined when all weights are zero.")
    return weights
