"""`train/run_classification.py` in two processes (torchrun, CPU, gloo): the ranks stay bitwise in sync, evaluation
counts every validation and test image exactly once, and the run writes its outputs.

The script runs unchanged through `tests/distributed_entry.py`, which only swaps in an `Accelerator` subclass that
has each rank write a digest of its weights. 70 evaluation images with 2 x 16 per step leave a last step of 6 real
images padded to 32, so `gather_for_metrics` must drop the padding duplicates. `ACCELERATE_USE_CPU` is what
`accelerate launch --cpu` sets: without it, Accelerate on a machine with no GPU ignores torchrun's environment and
each process trains alone.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor

from modeling_msvit import MSViTForImageClassification
from msvit.train.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    collate_fn,
    load_classification_splits,
    make_transforms,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRY = Path(__file__).resolve().parent / "distributed_entry.py"
_spec = importlib.util.spec_from_file_location("distributed_entry", ENTRY)
distributed_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(distributed_entry)
NUM_PROCESSES = 2
TIMEOUT_S = 120
TRAIN_SAMPLES, EVAL_SAMPLES, EVAL_BATCH, STEPS, SEED = 128, 70, 16, 3, 0
assert EVAL_SAMPLES % (NUM_PROCESSES * EVAL_BATCH) != 0  # the last evaluation step is padded

REAL_DATA_PRESENT = all((FASHION_MNIST_DIR / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair)
pytestmark = [
    pytest.mark.skipif(
        not REAL_DATA_PRESENT,
        reason=f"Fashion-MNIST absent from {FASHION_MNIST_DIR}: `sudo apt-get install dataset-fashion-mnist`",
    ),
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("ddp") / "run"
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    command = [
        *(sys.executable, "-m", "torch.distributed.run"),
        *("--nnodes", "1", "--nproc_per_node", str(NUM_PROCESSES)),
        *("--master_addr", "127.0.0.1", "--master_port", str(port)),
        str(ENTRY),
        *("--stage", "scratch", "--dataset", "translated_fashion_mnist", "--seed", str(SEED)),
        *("--max_train_samples", str(TRAIN_SAMPLES), "--max_eval_samples", str(EVAL_SAMPLES)),
        *("--patch_size", "8", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2"),
        *("--per_device_train_batch_size", "16", "--per_device_eval_batch_size", str(EVAL_BATCH)),
        *("--max_train_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "3e-3"),
        *("--skip_export", "--output_dir", str(output_dir)),
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun passes SIGTERM on to its workers (they run in sessions of their own)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{output[-8000:]}")
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{output[-8000:]}"
    return output_dir


def test_run_wrote_its_outputs(run_dir):
    assert (run_dir / "results.json").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (run_dir / "model" / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == STEPS and results["stage"] == "scratch"
    # one writer: every training step and every evaluation is logged exactly once
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == list(range(1, STEPS + 1))
    assert [r["split"] for r in records if "split" in r] == ["validation", "test"]


def test_ranks_stay_in_sync(run_dir):
    ranks = [json.loads(path.read_text()) for path in sorted((run_dir / "rank_checksums").glob("rank*.json"))]
    assert [rank["process_index"] for rank in ranks] == list(range(NUM_PROCESSES))
    for rank in ranks:
        assert rank["num_processes"] == NUM_PROCESSES
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU" and rank["backend"] == "gloo"
        assert rank["prepared_model_class"] == "DistributedDataParallel"
    finals = {rank["final_sha256"] for rank in ranks}
    assert len(finals) == 1, "the ranks' weights differ after training"
    # not vacuous: training moved the weights away from the (identically seeded) initial ones ...
    assert all(rank["initial_sha256"] != rank["final_sha256"] for rank in ranks)
    # ... and the saved model is exactly what every rank holds
    assert distributed_entry.state_dict_sha256(load_file(run_dir / "model" / "model.safetensors")) in finals


@torch.no_grad()
def single_process_evaluation(model, dataset, processor) -> dict:
    loader = DataLoader(
        dataset.with_transform(make_transforms(processor, train=False, num_channels=model.config.num_channels)),
        batch_size=EVAL_BATCH,
        collate_fn=collate_fn,
    )
    correct, tokens, splits, count = 0, 0.0, 0.0, 0
    for batch in loader:
        outputs = model(pixel_values=batch["pixel_values"])
        correct += (outputs.logits.argmax(-1) == batch["labels"]).sum().item()
        tokens += outputs.token_counts.double().sum().item()
        splits += outputs.split_mask.double().mean(1).sum().item()
        count += len(batch["labels"])
    return {"accuracy": correct / count, "num_samples": count, "tokens": tokens / count, "fine_ratio": splits / count}


def test_evaluation_counts_every_sample_once(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    records = {
        r["split"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "split" in r
    }
    model = MSViTForImageClassification.from_pretrained(run_dir / "model").eval()
    processor = AutoImageProcessor.from_pretrained(run_dir / "model")
    data = load_classification_splits(
        "translated_fashion_mnist", seed=SEED, max_train_samples=TRAIN_SAMPLES, max_eval_samples=EVAL_SAMPLES
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected_by_split = {split: single_process_evaluation(model, data[split], processor) for split in records}
    finally:
        torch.set_num_threads(threads)
    for split, expected in expected_by_split.items():
        assert expected["num_samples"] == EVAL_SAMPLES
        for reported in (results[split], records[split]):
            assert reported["num_samples"] == EVAL_SAMPLES, split
            for key in ("accuracy", "tokens", "fine_ratio"):
                assert abs(reported[key] - expected[key]) < 1e-9, (split, key, reported[key], expected[key])
