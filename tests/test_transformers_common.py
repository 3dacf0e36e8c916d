# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""Run transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) against MSViT.

transformers' test suite is not part of its wheel, and this repository does not vendor it. On first use this module
downloads the source distribution of the *installed* transformers version with pip, extracts only its `tests/`
folder into `.cache/transformers-tests/` (git-ignored) and imports the shared test modules from there under a
private package name, so they never clash with this repository's own `tests` folder. Later runs use the cache and
need no network. When the download is impossible (offline, no registry), the whole module is skipped.

The sdist ships only the top-level shared test modules, not their sibling folders, so three imports they make are
filled in here (see `_install_stand_ins`); `parameterized`, a test-only dependency of transformers, is installed into
the same cache when the environment lacks it.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path

import pytest
import torch
import transformers


REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "transformers-tests"
TRANSFORMERS_VERSION = transformers.__version__
# the extracted `tests/` folder is imported as this package, never as `tests`
PACKAGE = "_transformers_upstream_tests"
PIP_TIMEOUT_S = 600


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args, "--no-input", "--disable-pip-version-check"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"`{' '.join(command[1:])}` failed: {error}") from error
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(command[1:])}` exited with {result.returncode}:\n{tail}")


def _transformers_tests_dir() -> Path:
    """The `tests/` folder of the transformers sdist matching the installed version, downloaded on first use."""
    version_dir = CACHE_DIR / f"transformers-{TRANSFORMERS_VERSION}"
    tests_dir = version_dir / "tests"
    if (tests_dir / "test_modeling_common.py").is_file():
        return tests_dir
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        _pip("download", "--no-deps", "--no-binary", ":all:", f"transformers=={TRANSFORMERS_VERSION}", "-d", tmp)
        sdists = sorted(Path(tmp).glob("transformers-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip downloaded no transformers sdist into {tmp}: {os.listdir(tmp)}")
        staging = Path(tmp) / "extracted"
        with tarfile.open(sdists[0]) as archive:
            members = [
                member
                for member in archive.getmembers()
                if member.isfile() and member.name.split("/")[1:2] == ["tests"]
            ]
            archive.extractall(staging, members=members, filter="data")
        extracted = next(staging.iterdir()) / "tests"
        if not (extracted / "test_modeling_common.py").is_file():
            raise RuntimeError(f"the transformers {TRANSFORMERS_VERSION} sdist has no tests/test_modeling_common.py")
        # `test_configuration_common` execs `tests/__init__.py` (present upstream, missing from the sdist)
        (extracted / "__init__.py").touch()
        version_dir.mkdir(exist_ok=True)
        try:
            extracted.rename(tests_dir)
        except OSError:  # another process finished first
            if not (tests_dir / "test_modeling_common.py").is_file():
                raise
    return tests_dir


def _ensure_parameterized() -> None:
    """`test_modeling_common` needs `parameterized`; install it into the cache, not the environment, if missing."""
    if importlib.util.find_spec("parameterized") is not None:
        return
    deps_dir = CACHE_DIR / "deps"
    if not (deps_dir / "parameterized").is_dir():
        _pip("install", "--quiet", "--no-deps", "--target", str(deps_dir), "parameterized>=0.9")
    sys.path.insert(0, str(deps_dir))
    importlib.invalidate_caches()


def _install_stand_ins() -> None:
    """Stand-ins for the three sibling modules the shared test modules import but the sdist does not ship.

    * `exporters.test_export.ExportTesterMixin`: a base of `ModelTesterMixin` that adds the torch.export / ONNX /
      ExecuTorch export tests. Left empty: those tests are not run here.
    * `generation.test_utils.GenerationTesterMixin`: only used in an `issubclass` check (MSViT cannot generate).
    * `utils.test_configuration_utils.config_common_kwargs`: non-default values of `PreTrainedConfig`'s own fields,
      which `ConfigTester.check_config_arguments_init` passes to the config and reads back.
    """
    stand_ins = {
        "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        "utils.test_configuration_utils": {
            "config_common_kwargs": {
                "return_dict": False,
                "output_hidden_states": True,
                "output_attentions": True,
                "dtype": "float16",
                "chunk_size_feed_forward": 3,
                "architectures": ["MSViTForImageClassification"],
                "id2label": {0: "kept", 1: "split"},
                "label2id": {"kept": 0, "split": 1},
                "problem_type": "single_label_classification",
            }
        },
    }
    for dotted, attributes in stand_ins.items():
        parent = f"{PACKAGE}.{dotted.split('.')[0]}"
        if parent not in sys.modules:
            package = types.ModuleType(parent)
            package.__path__ = []
            sys.modules[parent] = package
        module = types.ModuleType(f"{PACKAGE}.{dotted}")
        module.__dict__.update(attributes)
        sys.modules[module.__name__] = module
        setattr(sys.modules[parent], dotted.split(".")[1], module)


def _import_upstream(tests_dir: Path) -> tuple[types.ModuleType, types.ModuleType]:
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, tests_dir / "__init__.py", submodule_search_locations=[str(tests_dir)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
        _install_stand_ins()
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )


try:
    _ensure_parameterized()
    test_modeling_common, test_configuration_common = _import_upstream(_transformers_tests_dir())
except Exception as error:  # noqa: BLE001 - any failure to obtain the suite means: cannot run it here
    pytest.skip(
        f"transformers {TRANSFORMERS_VERSION}'s common model tests are unavailable ({type(error).__name__}: {error}). "
        f"They are fetched with pip into {CACHE_DIR.relative_to(REPO_ROOT)}/ on first use; run once with access to "
        "the package registry.",
        allow_module_level=True,
    )

from transformers.testing_utils import torch_device  # noqa: E402

from modeling_msvit import MSViTConfig, MSViTForImageClassification, MSViTModel  # noqa: E402


ModelTesterMixin = test_modeling_common.ModelTesterMixin
floats_tensor = test_modeling_common.floats_tensor
ids_tensor = test_modeling_common.ids_tensor
ConfigTester = test_configuration_common.ConfigTester


class MSViTModelTester:
    def __init__(
        self,
        parent,
        batch_size=13,
        image_size=32,
        patch_size=4,
        coarse_patch_size=8,
        num_channels=3,
        is_training=True,
        use_labels=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        gate_hidden_size=16,
        gate_num_layers=2,
        num_labels=3,
        initializer_range=0.02,
        attn_implementation="eager",
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.coarse_patch_size = coarse_patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.gate_hidden_size = gate_hidden_size
        self.gate_num_layers = gate_num_layers
        self.num_labels = num_labels
        self.type_sequence_label_size = num_labels
        self.initializer_range = initializer_range
        self.attn_implementation = attn_implementation

        self.num_coarse = (image_size // coarse_patch_size) ** 2
        self.num_fine = (image_size // patch_size) ** 2
        # The masked (training) path holds every candidate; the gathered (inference) path one sequence per image
        # whose length the gate decides, between all-coarse and all-fine.
        self.candidate_length = 1 + self.num_coarse + self.num_fine
        self.min_seq_length = 1 + self.num_coarse
        self.max_seq_length = 1 + self.num_fine

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def get_config(self):
        return MSViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            coarse_patch_size=self.coarse_patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            gate_hidden_size=self.gate_hidden_size,
            gate_num_layers=self.gate_num_layers,
            num_labels=self.num_labels,
            initializer_range=self.initializer_range,
            attn_implementation=self.attn_implementation,
        )

    def create_and_check_model(self, config, pixel_values, labels):
        model = MSViTModel(config).to(torch_device).eval()
        result = model(pixel_values)
        seq_length = int(result.token_counts.max())
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, seq_length, self.hidden_size))
        self.parent.assertEqual(result.token_mask.shape, (self.batch_size, seq_length))
        self.parent.assertTrue(torch.equal(result.token_mask.sum(1), result.token_counts))
        self.parent.assertEqual(result.split_mask.shape, (self.batch_size, self.num_coarse))

        model.train()
        result = model(pixel_values)
        self.parent.assertEqual(
            result.last_hidden_state.shape, (self.batch_size, self.candidate_length, self.hidden_size)
        )
        self.parent.assertIsNotNone(result.gate_loss)

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = MSViTForImageClassification(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertEqual(result.loss.shape, ())

        # greyscale images
        config.num_channels = 1
        model = MSViTForImageClassification(config).to(torch_device).eval()
        pixel_values = floats_tensor([self.batch_size, 1, self.image_size, self.image_size])
        result = model(pixel_values)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class MSViTModelTest(ModelTesterMixin, unittest.TestCase):
    """transformers' common model tests on MSViT in its default (gate threshold) mode.

    MSViT takes no `input_ids` / `inputs_embeds` / `attention_mask`, and its sequence length is decided per image by the
    gate, so the two tests that check output shapes against a fixed `seq_length` are replaced by MSViT equivalents.
    """

    all_model_classes = (MSViTModel, MSViTForImageClassification)
    test_resize_embeddings = False
    test_torch_exportable = False

    def setUp(self):
        self.model_tester = MSViTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MSViTConfig, has_text_modality=False, hidden_size=37)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    @unittest.skip(reason="MSViT takes pixel_values only; it has no inputs_embeds")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, torch.nn.Linear))
