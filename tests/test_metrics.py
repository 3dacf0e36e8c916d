"""Tests of the local `evaluate` accuracy metric (`metrics/accuracy`) and its loader `msvit.metrics`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msvit.metrics import METRICS_DIR, load_metric, make_compute_metrics, metric_path


PREDICTIONS = [0, 1, 2, 0, 3, 3]
REFERENCES = [0, 1, 1, 1, 3, 2]  # correct: positions 0, 1, 4
WEIGHTS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def accuracy():
    return load_metric("accuracy")


def test_metric_path_is_absolute_and_in_the_repo():
    path = metric_path("accuracy")
    assert path.is_absolute() and path == REPO_ROOT / "metrics" / "accuracy" == METRICS_DIR / "accuracy"
    assert (path / "accuracy.py").is_file()
    with pytest.raises(ValueError, match="Unknown metric 'f1'.*Available: accuracy"):
        metric_path("f1")


def test_accuracy_hand_computed(accuracy):
    assert accuracy.compute(predictions=PREDICTIONS, references=REFERENCES) == {"accuracy": pytest.approx(3 / 6)}
    assert accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, normalize=False) == {"accuracy": 3.0}
    weighted = accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, sample_weight=WEIGHTS)
    assert weighted == {"accuracy": pytest.approx((1 + 2 + 5) / 21)}
    count = accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, sample_weight=WEIGHTS, normalize=False)
    assert count == {"accuracy": pytest.approx(8.0)}
    assert accuracy.compute(predictions=[4, 4], references=[4, 4]) == {"accuracy": 1.0}
    assert accuracy.compute(predictions=[0, 1], references=[1, 0]) == {"accuracy": 0.0}
    result = accuracy.compute(predictions=np.array([1, 2, 3]), references=np.array([1, 2, 0]))
    assert isinstance(result["accuracy"], float) and result["accuracy"] == pytest.approx(2 / 3)


def test_accuracy_batches_and_errors(accuracy):
    for start in range(0, 6, 2):
        accuracy.add_batch(predictions=PREDICTIONS[start : start + 2], references=REFERENCES[start : start + 2])
    assert accuracy.compute() == {"accuracy": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="sample_weight has 2 values for 6 predictions"):
        accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, sample_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        accuracy.compute(predictions=[1, 2], references=[1, 2], sample_weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="all weights are zero"):
        accuracy.compute(predictions=[1, 2], references=[1, 2], sample_weight=[0.0, 0.0])


def test_metric_info(accuracy):
    assert set(accuracy.features) == {"predictions", "references"}
    assert all(feature.dtype == "int64" for feature in accuracy.features.values())
    assert "fraction of predictions" in accuracy.description and "@inproceedings" in accuracy.citation


def test_make_compute_metrics():
    compute_metrics = make_compute_metrics("accuracy")
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 0.5, 0.1], [0.0, 0.1, 3.0], [1.0, 0.0, 0.0]])
    assert compute_metrics((logits, np.array([1, 0, 1, 1]))) == {"accuracy": pytest.approx(0.5)}
    assert compute_metrics(((logits, None), np.array([1, 0, 2, 0]))) == {"accuracy": 1.0}


def test_loads_offline_by_path_from_another_directory(tmp_path):
    """A fresh process, offline, in an unrelated working directory, with an empty modules cache."""
    script = (
        "import json, sys, evaluate\n"
        "from msvit.metrics import load_metric, metric_path\n"
        "by_path = evaluate.load(str(metric_path('accuracy')))\n"
        "by_name = load_metric('accuracy')\n"
        "kwargs = dict(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1])\n"
        "print(json.dumps([by_path.compute(**kwargs), by_name.compute(**kwargs)]))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
    }
    work_dir = tmp_path / "elsewhere"
    work_dir.mkdir()
    completed = subprocess.run([sys.executable, "-c", script], cwd=work_dir, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == [{"accuracy": 0.5}, {"accuracy": 0.5}]
