"""Tests of the local `evaluate` mean-IoU metric (`metrics/mean_iou`), loaded by `msvit.metrics.load_metric`."""

import datasets
import numpy as np
import pytest
import torch

from msvit.metrics import load_metric, metric_path


# 3 x 4 masks, 4 classes (class 3 appears nowhere), two ignored reference pixels whose predictions are wrong.
REFERENCE = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [255, 2, 2, 255]])
PREDICTION = np.array([[0, 1, 1, 1], [0, 2, 1, 1], [1, 2, 0, 2]])
# Scored pixels (reference, prediction): (0,0) x2, (0,1), (1,1) x3, (2,2) x2, (2,1), (2,0) -> 10 pixels, 7 right.
# Class 0: reference 3 pixels, predicted 3, both 2 -> IoU 2 / (3 + 3 - 2) = 1/2, accuracy 2/3.
# Class 1: reference 3, predicted 5, both 3 -> IoU 3 / 5, accuracy 1.
# Class 2: reference 4, predicted 2, both 2 -> IoU 2 / 4, accuracy 1/2.
# Class 3: absent from both -> nan, left out of the means.
EXPECTED_IOU = [1 / 2, 3 / 5, 1 / 2, np.nan]
EXPECTED_ACCURACY = [2 / 3, 1.0, 1 / 2, np.nan]


@pytest.fixture(scope="module")
def mean_iou():
    return load_metric("mean_iou")


def assert_results(result, iou, accuracy, mean_iou, mean_accuracy, overall_accuracy):
    assert set(result) == {
        "mean_iou",
        "mean_accuracy",
        "overall_accuracy",
        "per_category_iou",
        "per_category_accuracy",
    }
    np.testing.assert_allclose(result["per_category_iou"], iou, rtol=1e-12)
    np.testing.assert_allclose(result["per_category_accuracy"], accuracy, rtol=1e-12)
    assert result["mean_iou"] == pytest.approx(mean_iou, rel=1e-12)
    assert result["mean_accuracy"] == pytest.approx(mean_accuracy, rel=1e-12)
    assert result["overall_accuracy"] == pytest.approx(overall_accuracy, rel=1e-12)


def test_hand_computed_confusion(mean_iou):
    result = mean_iou.compute(predictions=[PREDICTION], references=[REFERENCE], num_labels=4, ignore_index=255)
    assert_results(result, EXPECTED_IOU, EXPECTED_ACCURACY, 1.6 / 3, 13 / 18, 7 / 10)
    assert isinstance(result["mean_iou"], float) and result["per_category_iou"].shape == (4,)
    # a class predicted but absent from the references has IoU 0 (it counts in the mean) and no accuracy
    predicted_three = PREDICTION.copy()
    predicted_three[1, 2] = 3  # was a wrong 1 on a class-2 pixel: class 1 loses a false positive
    result = mean_iou.compute(predictions=[predicted_three], references=[REFERENCE], num_labels=4)
    assert_results(result, [1 / 2, 3 / 4, 1 / 2, 0.0], EXPECTED_ACCURACY, 1.75 / 4, 13 / 18, 7 / 10)


def test_ignored_pixels_count_nowhere(mean_iou):
    # whatever is predicted on ignored pixels, even an id that is no class, changes nothing
    prediction = PREDICTION.copy()
    prediction[2, 0], prediction[2, 3] = 99, 0
    result = mean_iou.compute(predictions=[prediction], references=[REFERENCE], num_labels=4, ignore_index=255)
    assert_results(result, EXPECTED_IOU, EXPECTED_ACCURACY, 1.6 / 3, 13 / 18, 7 / 10)
    # another ignore index: the same masks with -1 for "ignore"
    reference = np.where(REFERENCE == 255, -1, REFERENCE)
    result = mean_iou.compute(predictions=[PREDICTION], references=[reference], num_labels=4, ignore_index=-1)
    assert_results(result, EXPECTED_IOU, EXPECTED_ACCURACY, 1.6 / 3, 13 / 18, 7 / 10)
    # no ignore index: every pixel is scored (here the two former ignored pixels become class 3)
    reference = np.where(REFERENCE == 255, 3, REFERENCE)
    result = mean_iou.compute(predictions=[PREDICTION], references=[reference], num_labels=4, ignore_index=None)
    # class 1 gains the false positive at (2, 0) (IoU 3/6), class 2 the one at (2, 3) (IoU 2/5); class 3 is in the
    # reference twice and never predicted (IoU 0, accuracy 0); 7 of 12 pixels are right
    assert_results(result, [1 / 2, 1 / 2, 2 / 5, 0.0], [2 / 3, 1.0, 1 / 2, 0.0], 1.4 / 4, (13 / 6) / 4, 7 / 12)


def test_nan_to_num(mean_iou):
    result = mean_iou.compute(predictions=[PREDICTION], references=[REFERENCE], num_labels=4, nan_to_num=-1)
    assert_results(result, [1 / 2, 3 / 5, 1 / 2, -1.0], [2 / 3, 1.0, 1 / 2, -1.0], 1.6 / 3, 13 / 18, 7 / 10)
    # nothing scored at all: every value is undefined
    empty = mean_iou.compute(predictions=[np.zeros((2, 2), int)], references=[np.full((2, 2), 255)], num_labels=2)
    assert np.isnan(empty["mean_iou"]) and np.isnan(empty["overall_accuracy"])
    assert np.isnan(empty["per_category_iou"]).all()
    filled = mean_iou.compute(
        predictions=[np.zeros((2, 2), int)], references=[np.full((2, 2), 255)], num_labels=2, nan_to_num=0.0
    )
    assert filled["mean_iou"] == 0.0 and filled["per_category_accuracy"].tolist() == [0.0, 0.0]


def test_reduce_labels_and_label_map(mean_iou):
    # ADE20K style: 0 = unlabelled, classes stored as id + 1; a raw 255 stays ignored
    raw = np.where(REFERENCE == 255, 0, REFERENCE + 1)
    raw[2, 3] = 255
    result = mean_iou.compute(predictions=[PREDICTION], references=[raw], num_labels=4, reduce_labels=True)
    assert_results(result, EXPECTED_IOU, EXPECTED_ACCURACY, 1.6 / 3, 13 / 18, 7 / 10)
    # without reduce_labels the raw ids are scored as they are: 3 is no class of 3
    with pytest.raises(ValueError, match="Reference mask 0 holds label 3"):
        mean_iou.compute(predictions=[PREDICTION], references=[raw], num_labels=3)
    # label_map renames reference ids (here 10, 11, 12 -> 0, 1, 2), before reduce_labels
    mapped = np.where(REFERENCE == 255, 255, REFERENCE + 10)
    result = mean_iou.compute(
        predictions=[PREDICTION], references=[mapped], num_labels=4, label_map={10: 0, 11: 1, 12: 2}
    )
    assert_results(result, EXPECTED_IOU, EXPECTED_ACCURACY, 1.6 / 3, 13 / 18, 7 / 10)
    unlabelled_as_seven = np.where(raw == 0, 7, raw)
    result = mean_iou.compute(
        predictions=[PREDICTION], references=[unlabelled_as_seven], num_labels=4, label_map={7: 0}, reduce_labels=True
    )
    assert_results(result, EXPECTED_IOU, EXPECTED_ACCURACY, 1.6 / 3, 13 / 18, 7 / 10)


def brute_force_iou(predictions, references, num_labels, ignore_index):
    """Per-class IoU by counting pixel by pixel, independently of the metric's confusion matrix."""
    intersection, union = [0] * num_labels, [0] * num_labels
    for prediction, reference in zip(predictions, references):
        for predicted, true in zip(prediction.ravel().tolist(), reference.ravel().tolist()):
            if true == ignore_index:
                continue
            for label in range(num_labels):
                intersection[label] += predicted == label and true == label
                union[label] += predicted == label or true == label
    return [i / u if u else np.nan for i, u in zip(intersection, union)]


def test_batches_equal_one_compute(mean_iou):
    rng = np.random.default_rng(0)
    shapes = [(8, 8), (8, 8), (5, 7), (8, 8), (6, 3)]  # masks of different sizes mix
    references = [np.where(rng.random(shape) < 0.1, 255, rng.integers(0, 5, shape)) for shape in shapes]
    predictions = [rng.integers(0, 5, shape) for shape in shapes]
    whole = mean_iou.compute(predictions=predictions, references=references, num_labels=5)
    np.testing.assert_allclose(whole["per_category_iou"], brute_force_iou(predictions, references, 5, 255))

    mean_iou.add_batch(predictions=np.stack(predictions[:2]), references=np.stack(references[:2]))  # one array
    mean_iou.add(prediction=torch.from_numpy(predictions[2]), reference=references[2])
    mean_iou.add_batch(predictions=torch.from_numpy(np.stack([predictions[3]])), references=[references[3]])
    mean_iou.add_batch(predictions=[predictions[4].tolist()], references=[references[4].astype(np.uint8)])
    batched = mean_iou.compute(num_labels=5)
    for name, value in whole.items():
        np.testing.assert_array_equal(batched[name], value)


def test_input_errors(mean_iou):
    with pytest.raises(ValueError, match=r"Prediction 1 has shape \(3, 4\) but its reference has \(3, 5\)"):
        mean_iou.add_batch(
            predictions=[np.zeros((3, 4), int)] * 2, references=[np.zeros((3, 4), int), np.zeros((3, 5), int)]
        )
    with pytest.raises(ValueError, match="2 predicted masks but 1 reference masks"):
        mean_iou.add_batch(predictions=np.zeros((2, 3, 4), int), references=np.zeros((1, 3, 4), int))
    with pytest.raises(ValueError, match=r"Mask 0 of the predictions has dtype float32.*argmax"):
        mean_iou.add_batch(predictions=np.zeros((1, 3, 4), np.float32), references=np.zeros((1, 3, 4), int))
    with pytest.raises(ValueError, match=r"Mask 0 of the references has shape \(4,\): each mask must be 2-D"):
        mean_iou.add_batch(predictions=[np.zeros((2, 2), int)], references=[np.zeros(4, int)])
    with pytest.raises(ValueError, match="num_labels must be a positive integer"):
        mean_iou.compute(predictions=[PREDICTION], references=[REFERENCE])
    with pytest.raises(ValueError, match=r"Unknown arguments \['ignore_label'\]"):
        mean_iou.compute(predictions=[PREDICTION], references=[REFERENCE], num_labels=4, ignore_label=255)
    with pytest.raises(ValueError, match="label_map must be a dict of integer ids"):
        mean_iou.compute(predictions=[PREDICTION], references=[REFERENCE], num_labels=4, label_map={"a": 1})
    with pytest.raises(ValueError, match="reduce_labels .* needs an ignore_index"):
        mean_iou.compute(
            predictions=[PREDICTION], references=[REFERENCE], num_labels=4, ignore_index=None, reduce_labels=True
        )
    with pytest.raises(ValueError, match=r"Reference mask 0 holds label 255, which is neither .* 0\.\.3"):
        mean_iou.compute(predictions=[PREDICTION], references=[REFERENCE], num_labels=4, ignore_index=None)
    with pytest.raises(ValueError, match=r"Prediction mask 0 holds class id 3 at a scored pixel, outside 0\.\.2"):
        mean_iou.compute(predictions=[np.full((3, 4), 3)], references=[np.zeros((3, 4), int)], num_labels=3)


def test_an_invalid_mask_does_not_block_the_next_computation():
    """After an error inside `_compute`, the cache file must be freed: the next computation takes the default cache
    file again instead of waiting a second for its lock and falling back to a new one."""
    metric = load_metric("mean_iou")
    metric.add_batch(predictions=[np.zeros((2, 2), int)], references=[np.full((2, 2), 7)])
    default_cache_file = metric.cache_file_name
    with pytest.raises(ValueError, match="Reference mask 0 holds label 7"):
        metric.compute(num_labels=2)
    metric.add_batch(predictions=[PREDICTION], references=[REFERENCE])
    assert metric.cache_file_name == default_cache_file
    assert_results(metric.compute(num_labels=4), EXPECTED_IOU, EXPECTED_ACCURACY, 1.6 / 3, 13 / 18, 7 / 10)


def test_metric_info_and_path(mean_iou):
    assert (metric_path("mean_iou") / "mean_iou.py").is_file() and mean_iou.name == "mean_iou"
    # masks are stored whole, as bytes, not value by value
    assert mean_iou.features == datasets.Features(
        {"predictions": datasets.Value("binary"), "references": datasets.Value("binary")}
    )
    assert "ignore_index" in mean_iou.description and "@article" in mean_iou.citation
    with pytest.raises(ValueError, match="Unknown metric 'f1'.*Available: accuracy, mean_iou"):
        metric_path("f1")
