"""Entry point of `tests/test_distributed.py`: `msvit.train.run_classification.main` under torchrun, unchanged, with an
`Accelerator` subclass that makes every rank write what it holds to `<output_dir>/rank_checksums/rank<i>.json`.

    torchrun --nproc_per_node 2 tests/distributed_entry.py --stage scratch ... --output_dir DIR

Each rank records the process layout Accelerate set up and a SHA-256 of its model's state dict right after
`accelerator.prepare` and again when the script calls `accelerator.end_training()` (after training, evaluation and
saving). The test compares the ranks' digests with each other and with the saved weights. No collective runs here:
a gloo collective issued just before `destroy_process_group` can deadlock the teardown (the gloo worker thread frees
the finished work's Python tensors, waiting for the GIL, while the main thread holds the GIL in
`~ProcessGroupGloo`, waiting for that worker's lock).
"""

import hashlib
import json
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script, sys.path[0] is tests/
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from msvit.train import run_classification  # noqa: E402


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every entry (sorted by name): its name, dtype, shape and raw bytes. Bitwise: equal digests mean
    bitwise equal weights. The test applies the same function to the saved `model.safetensors`."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RecordingAccelerator(Accelerator):
    """An `Accelerator` that records a digest of its (first) prepared model after `prepare` and at `end_training`."""

    initial_sha256: str | None = None
    prepared_model_class: str | None = None

    def _model_sha256(self) -> str:
        return state_dict_sha256(self.unwrap_model(self._models[0]).state_dict())

    def prepare(self, *args, **kwargs):
        prepared = super().prepare(*args, **kwargs)
        if self._models and self.initial_sha256 is None:
            self.initial_sha256 = self._model_sha256()
            # what the script trains through (`_models` keeps the unwrapped model)
            modules = [
                obj
                for obj in (prepared if isinstance(prepared, tuple) else (prepared,))
                if isinstance(obj, torch.nn.Module)
            ]
            self.prepared_model_class = type(modules[0]).__name__
        return prepared

    def end_training(self):
        record = {
            "process_index": self.process_index,
            "num_processes": self.num_processes,
            "distributed_type": str(self.distributed_type),
            "backend": self.state.backend,
            "prepared_model_class": self.prepared_model_class,
            "initial_sha256": self.initial_sha256,
            "final_sha256": self._model_sha256(),
        }
        folder = Path(self.project_configuration.project_dir) / "rank_checksums"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{self.process_index}.json").write_text(json.dumps(record, indent=2) + "\n")
        super().end_training()


if __name__ == "__main__":
    run_classification.Accelerator = RecordingAccelerator
    run_classification.main(sys.argv[1:])
