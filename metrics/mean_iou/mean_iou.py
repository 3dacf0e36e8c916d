"""Mean intersection-over-union of semantic-segmentation masks as a local `evaluate` metric, loadable offline by path.

    import evaluate

    mean_iou = evaluate.load("/path/to/repo/metrics/mean_iou")  # or msvit.metrics.load_metric("mean_iou")
    mean_iou.add_batch(predictions=logits.argmax(1), references=labels)  # (batch, height, width) each
    mean_iou.compute(num_labels=11, ignore_index=255)

`evaluate.load("mean_iou")` needs the Hub; this module is a from-scratch equivalent that needs nothing but numpy.
Each mask is stored as one example holding its `.npy` bytes (shape and a compact integer dtype kept): `evaluate`
encodes nested lists value by value in Python, which costs seconds per million pixels, while a mask's bytes are
written and read back whole (2,000 masks of 96x96 in a fraction of a second). Masks of different sizes mix freely.
"""

import io
import os

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """\
Intersection-over-union (IoU, Jaccard index) of a class is the number of pixels that both the prediction and the
reference assign to it, divided by the number of pixels that either assigns to it. Pixels are pooled over all masks
added before `compute`, then per class:
    IoU = |prediction = c and reference = c| / |prediction = c or reference = c|,
    accuracy = |prediction = c and reference = c| / |reference = c| (the class's pixel recall).
`mean_iou` and `mean_accuracy` average these over the classes where they are defined: a class absent from both the
predictions and the references has no IoU (nan), a class absent from the references has no accuracy (nan), and nan
classes are left out of the means. `overall_accuracy` is the fraction of all scored pixels predicted right. Pixels
whose reference is `ignore_index` are left out of everything, whatever their prediction. Values range from 0 to 1,
higher is better.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D integer arrays/tensors, or one `(batch, height, width)` array/tensor): predicted class
        ids, e.g. `logits.argmax(1)` upsampled to the reference size; in `0 .. num_labels - 1` wherever the reference
        is scored.
    references (same form and shapes as `predictions`): ground-truth class ids, or `ignore_index`.
    num_labels (`int`): number of classes (background included when it is a class).
    ignore_index (`int` or `None`, defaults to 255): reference value of pixels to leave out; `None` scores every
        pixel.
    nan_to_num (`float`, optional): replace nan (undefined) values in every output by this number.
    label_map (`dict[int, int]`, optional): old id -> new id, applied to the references before anything else.
    reduce_labels (`bool`, defaults to `False`): for references where 0 means "unlabelled" (ADE20K): reference 0
        becomes `ignore_index` and every other id `i` becomes `i - 1` (applied after `label_map`).

Returns:
    mean_iou (`float`): mean IoU over the classes with a defined IoU.
    mean_accuracy (`float`): mean per-class pixel recall over the classes present in the references.
    overall_accuracy (`float`): fraction of scored pixels whose prediction equals the reference.
    per_category_iou (`np.ndarray` of shape `(num_labels,)`): IoU of each class, nan if absent from both sides.
    per_category_accuracy (`np.ndarray` of shape `(num_labels,)`): recall of each class, nan if absent from the
        references.

Examples:
    >>> mean_iou = evaluate.load("metrics/mean_iou")
    >>> predictions = [[[0, 0, 1], [1, 1, 1]]]
    >>> references = [[[0, 1, 1], [1, 1, 255]]]
    >>> result = mean_iou.compute(predictions=predictions, references=references, num_labels=2, ignore_index=255)
    >>> result["per_category_iou"], result["mean_iou"], result["overall_accuracy"]
    (array([0.5 , 0.75]), 0.625, 0.8)
"""

_CITATION = """\
@article{everingham2010pascal,
  title   = {The Pascal Visual Object Classes (VOC) Challenge},
  author  = {Everingham, Mark and Van Gool, Luc and Williams, Christopher K. I. and Winn, John and Zisserman, Andrew},
  journal = {International Journal of Computer Vision},
  volume  = {88},
  number  = {2},
  pages   = {303--338},
  year    = {2010}
}
"""

# Smallest integer dtypes first: a mask is stored in the first one that holds its values (class ids and ignore
# indices are small, so usually 1 byte a pixel).
_STORAGE_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIou(evaluate.Metric):  # evaluate names a module after its class: `mean_iou`
    """Mean IoU, per-class IoU and pixel accuracies of semantic-segmentation masks (the MSViT segmentation metric)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("binary"), "references": datasets.Value("binary")}
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Jaccard_index"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add a batch of predicted and reference masks (each a `(batch, height, width)` array/tensor or a list of
        2-D masks), after checking that they pair up shape for shape."""
        predictions, references = _encoded_pairs(predictions, references)
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Add one predicted mask and its reference mask (2-D each)."""
        (prediction,), (reference,) = _encoded_pairs([prediction], [reference])
        super().add(prediction=prediction, reference=reference, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict | None:
        """`evaluate.Metric.compute`, with the arguments checked before any data is read, and the cache released if
        the masks turn out invalid (an error inside `_compute` would otherwise leave `evaluate`'s cache-file lock
        held, and the next computation would wait for it)."""
        _check_arguments(**kwargs)
        try:
            return super().compute(predictions=predictions, references=references, **kwargs)
        except ValueError:
            self._discard_cache()
            raise

    def _discard_cache(self) -> None:
        """Drop the data read for a failed `compute` and free its cache files, as a successful `compute` does."""
        self.data = None
        self.buf_writer = None
        for lock, path in zip(getattr(self, "filelocks", None) or [], getattr(self, "file_paths", None) or []):
            if os.path.exists(path):
                os.remove(path)
            lock.release()
        self.filelocks, self.file_paths = [], []

    def _compute(
        self,
        predictions: list[bytes],
        references: list[bytes],
        num_labels: int,
        ignore_index: int | None = 255,
        nan_to_num: float | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # rows: reference class, columns: predicted
        for index, (prediction_bytes, reference_bytes) in enumerate(zip(predictions, references)):
            prediction, reference = _decode(prediction_bytes), _decode(reference_bytes).astype(np.int64)
            if label_map:
                mapped = reference.copy()
                for old, new in label_map.items():
                    mapped[reference == old] = new
                reference = mapped
            if reduce_labels:
                unlabelled = reference == 0
                if ignore_index is not None:
                    unlabelled |= reference == ignore_index
                reference = np.where(unlabelled, ignore_index, reference - 1)
            scored = reference != ignore_index if ignore_index is not None else np.ones(reference.shape, dtype=bool)
            reference, prediction = reference[scored], prediction[scored].astype(np.int64)
            _check_ids(reference, num_labels, ignore_index, index, "reference")
            _check_ids(prediction, num_labels, ignore_index, index, "prediction")
            confusion += np.bincount(reference * num_labels + prediction, minlength=num_labels**2).reshape(
                num_labels, num_labels
            )

        intersection = np.diag(confusion).astype(np.float64)
        reference_area = confusion.sum(axis=1).astype(np.float64)
        union = reference_area + confusion.sum(axis=0) - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            per_category_iou = intersection / union
            per_category_accuracy = intersection / reference_area
            overall_accuracy = intersection.sum() / confusion.sum()
        results = {
            "mean_iou": _nanmean(per_category_iou),
            "mean_accuracy": _nanmean(per_category_accuracy),
            "overall_accuracy": float(overall_accuracy),
            "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy,
        }
        if nan_to_num is not None:
            results = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in results.items()}
            results = {
                name: value if isinstance(value, np.ndarray) else float(value) for name, value in results.items()
            }
        return results


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-nan values, nan (without numpy's warning) when there are none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def _as_array(mask) -> np.ndarray:
    """A mask (numpy array, nested list, PIL image or torch tensor on any device) as a numpy array."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask)


def _masks(batch, name: str) -> list[np.ndarray]:
    """The 2-D masks of a batch given as one `(batch, H, W)` array/tensor or as a sequence of 2-D masks."""
    if batch is None:
        raise ValueError(f"{name} are missing: pass both predictions and references.")
    if getattr(batch, "ndim", None) == 3:  # one (batch, H, W) array or tensor: convert it once, not mask by mask
        batch = _as_array(batch)
    masks = [_as_array(mask) for mask in batch]
    for index, mask in enumerate(masks):
        if mask.ndim != 2:
            raise ValueError(
                f"Mask {index} of the {name} has shape {mask.shape}: each mask must be 2-D (height, width); pass "
                "a batch as a (batch, height, width) array or a list of 2-D masks, after argmax over the classes."
            )
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
            raise ValueError(
                f"Mask {index} of the {name} has dtype {mask.dtype}: masks must hold integer class ids "
                "(e.g. logits.argmax(1))."
            )
    return masks


def _encode(mask: np.ndarray) -> bytes:
    """`.npy` bytes of `mask` in the smallest integer dtype that holds its values."""
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    dtype = next(dtype for dtype in _STORAGE_DTYPES if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(mask, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _encoded_pairs(predictions, references) -> tuple[list[bytes], list[bytes]]:
    """Check that predictions and references pair up as integer 2-D masks of equal shapes; encode them."""
    prediction_masks, reference_masks = _masks(predictions, "predictions"), _masks(references, "references")
    if len(prediction_masks) != len(reference_masks):
        raise ValueError(f"{len(prediction_masks)} predicted masks but {len(reference_masks)} reference masks.")
    for index, (prediction, reference) in enumerate(zip(prediction_masks, reference_masks)):
        if prediction.shape != reference.shape:
            raise ValueError(
                f"Prediction {index} has shape {prediction.shape} but its reference has {reference.shape}; upsample "
                "the logits to the reference size before the argmax (e.g. `torch.nn.functional.interpolate`)."
            )
    return [_encode(mask) for mask in prediction_masks], [_encode(mask) for mask in reference_masks]


def _check_arguments(
    num_labels=None, ignore_index=255, nan_to_num=None, label_map=None, reduce_labels=False, **unknown
) -> None:
    """Reject bad `compute` arguments before any data is read."""
    if unknown:
        raise ValueError(
            f"Unknown arguments {sorted(unknown)}; mean_iou takes num_labels, ignore_index, nan_to_num, label_map, "
            "reduce_labels."
        )
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer (the number of classes), got {num_labels!r}.")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))
    ):
        raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}.")
    if reduce_labels and ignore_index is None:
        raise ValueError("reduce_labels turns reference 0 into ignore_index, so it needs an ignore_index.")
    if label_map is not None and not (
        isinstance(label_map, dict)
        and all(isinstance(identifier, (int, np.integer)) for pair in label_map.items() for identifier in pair)
    ):
        raise ValueError(f"label_map must be a dict of integer ids (old -> new), got {label_map!r}.")
    if nan_to_num is not None and not isinstance(nan_to_num, (int, float)):
        raise ValueError(f"nan_to_num must be a number or None, got {nan_to_num!r}.")


def _check_ids(ids: np.ndarray, num_labels: int, ignore_index: int | None, index: int, name: str) -> None:
    """Every scored id must be a class id; say which mask holds the first bad one and what to change."""
    bad = ids[(ids < 0) | (ids >= num_labels)]
    if not bad.size:
        return
    if name == "reference":
        raise ValueError(
            f"Reference mask {index} holds label {int(bad[0])}, which is neither a class id in 0..{num_labels - 1} "
            f"(num_labels={num_labels}) nor ignore_index={ignore_index}; pass the right num_labels, ignore_index or "
            "label_map (or reduce_labels=True for references where 0 means unlabelled)."
        )
    raise ValueError(
        f"Prediction mask {index} holds class id {int(bad[0])} at a scored pixel, outside 0..{num_labels - 1} "
        f"(num_labels={num_labels}); pass the num_labels of the model that made the predictions."
    )
