# Copyright 2026 The msvit Authors. Licensed under the Apache License, Version 2.0.
"""Run transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) against MSViT.

transformers' test suite is not part of its wheel, and this repository does not vendor it. On first use this module
downloads the source distribution of the *installed* transformers version with pip, extracts only its `tests/`
folder into `.cache/transformers-tests/` (git-ignored) and imports the shared test modules from there under a
private package name, so they never clash with this repository's own `tests` folder. Later runs use the cache and
need no network. When the download is impossible (offline, no registry), the whole module is skipped.

The sdist ships only the top-level shared test modules, not their sibling folders, so three imports they make are
filled in here (see `_install_stand_ins`). Their test-only dependency `parameterized` is pinned in requirements.txt.
"""

import copy
import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from transformers import set_seed
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from modeling_msvit import MSViTConfig, MSViTForImageClassification, MSViTForSemanticSegmentation, MSViTModel


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
            # the "data" filter refuses links and paths out of `staging` (Python >= 3.10.12 / 3.11.4)
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(staging, members=members, **safety)
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
    _tests_dir = _transformers_tests_dir()
except (RuntimeError, OSError, tarfile.TarError) as error:
    pytest.skip(
        f"transformers {TRANSFORMERS_VERSION}'s common model tests could not be fetched ({type(error).__name__}: "
        f"{error}). They are downloaded with pip into {CACHE_DIR.relative_to(REPO_ROOT)}/ on first use; run once with "
        "access to the package registry.",
        allow_module_level=True,
    )
with warnings.catch_warnings():
    # the shared tests use transformers' own pytest marks (flash_attn_test, ...), registered in its conftest
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    test_modeling_common, test_configuration_common = _import_upstream(_tests_dir)

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
        gate_num_layers=4,
        num_labels=3,
        initializer_range=0.02,
        # None, as in transformers' testers: the default backend (SDPA) both at construction and in `from_pretrained`,
        # so save/load compares like with like; tests that need attention weights ask for eager themselves
        attn_implementation=None,
        **config_overrides,
    ):
        self.parent = parent
        self.config_overrides = config_overrides
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
        # whose length the gate decides, between all-coarse and all-fine, padded to the longest image of the batch.
        self.candidate_length = 1 + self.num_coarse + self.num_fine
        self.min_seq_length = 1 + self.num_coarse
        self.max_seq_length = 1 + self.num_fine
        fine_ratio_budget = config_overrides.get("fine_ratio_budget")
        if fine_ratio_budget is not None:
            # a fixed budget gives every image the same length at inference, the `seq_length` the common tests read
            num_split = round(fine_ratio_budget * self.num_coarse)
            self.seq_length = 1 + self.num_coarse + ((coarse_patch_size // patch_size) ** 2 - 1) * num_split

    def pixel_values(self, num_channels):
        """Random images normalised like the image processor's output, in [-1, 1]. (With all-positive pixels a
        freshly initialised gate tends to take one decision for every region, and no sequence would be padded.)"""
        return floats_tensor([self.batch_size, num_channels, self.image_size, self.image_size], scale=2.0) - 1.0

    def prepare_config_and_inputs(self):
        pixel_values = self.pixel_values(self.num_channels)
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
            **self.config_overrides,
        )

    def create_and_check_model(self, config, pixel_values, labels):
        model = MSViTModel(config).to(torch_device).eval()
        result = model(pixel_values)
        seq_length = int(result.token_counts.max())
        self.parent.assertTrue(
            self.min_seq_length <= int(result.token_counts.min()) <= seq_length <= self.max_seq_length
        )
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, seq_length, self.hidden_size))
        self.parent.assertEqual(result.token_mask.shape, (self.batch_size, seq_length))
        self.parent.assertTrue(torch.equal(result.token_mask.sum(1), result.token_counts))
        self.parent.assertEqual(result.split_mask.shape, (self.batch_size, self.num_coarse))

        model.train()
        result = model(pixel_values)
        self.parent.assertEqual(
            result.last_hidden_state.shape,
            (self.batch_size, self.expected_seq_length(model, result), self.hidden_size),
        )
        # the straight-through budget loss needs no labels; the counterfactual objective's loss is the heads' (labels)
        self.parent.assertEqual(result.gate_loss is None, config.gate_objective == "counterfactual")

    def expected_seq_length(self, model, outputs) -> int:
        """Masked path (training default): every candidate. Gathered path: padded to the longest image of the batch."""
        if model.training and model.config.train_token_path == "masked":
            return self.candidate_length
        return int(outputs.token_counts.max())

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = MSViTForImageClassification(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertEqual(result.loss.shape, ())
        model.train()
        self.parent.assertIsNotNone(model(pixel_values, labels=labels).gate_loss)
        model.eval()

        # greyscale images
        config.num_channels = 1
        model = MSViTForImageClassification(config).to(torch_device).eval()
        pixel_values = self.pixel_values(1)
        result = model(pixel_values)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class MSViTModelTest(ModelTesterMixin, unittest.TestCase):
    """transformers' common model tests on MSViT in its default mode (gate threshold, masked training path).

    As in ViT's test, MSViT takes `pixel_values` only (the `input_ids` / `inputs_embeds` tests skip themselves) and has
    a patch embedding rather than a token `nn.Embedding`. Its sequence length is decided per image by the gate, so the
    two tests that compare output shapes with a fixed `seq_length` are replaced by MSViT equivalents, and so is the
    tuple/dict equivalence test, which cannot handle bool outputs.
    """

    all_model_classes = (MSViTModel, MSViTForImageClassification, MSViTForSemanticSegmentation)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = MSViTModelTester(self)
        # `hidden_size` must divide by the default 12 heads: MSViTConfig checks it, ViTConfig does not (ViT's uses 37)
        self.config_tester = ConfigTester(self, config_class=MSViTConfig, has_text_modality=False, hidden_size=36)
        # The common tests recognise a model's task by class name in transformers' own Auto name tables (to add
        # `labels`, and to leave base models out of the training tests). `AutoModel*.register` does not touch those
        # tables, so list MSViT in them for the duration of each test, as if it lived in transformers.
        for names, class_name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "MSViTModel"),
            (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "MSViTForImageClassification"),
            (modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES, "MSViTForSemanticSegmentation"),
        ):
            patcher = mock.patch.dict(names, {MSViTConfig.model_type: class_name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    def test_common_inputs_exercise_padding(self):
        """Guard for the tests above: with the tester's inputs (and the seed the batching and eager/SDPA tests use),
        images get different token counts, so the padded gathered path and its attention mask are exercised. Under a
        fixed budget, every image has the same count instead."""
        set_seed(42)
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = MSViTModel(config).to(torch_device).eval()
        with torch.no_grad():
            num_lengths = len(set(model(**inputs_dict).token_counts.tolist()))
        if config.fine_ratio_budget is None:
            self.assertGreater(num_lengths, 1)
        else:
            self.assertEqual(num_lengths, 1)

    def test_model_get_set_embeddings(self):
        """Vision version of the common test (as in ViT's), which expects a token `nn.Embedding` as embeddings."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, torch.nn.Linear))

    def test_attention_outputs(self):
        """MSViT version of the common test: the sequence length comes from the gate, not from a fixed `seq_length`.

        Also checks that no attention goes to padding (gathered path) or to inactive candidates (masked path).
        """
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.attention_probs_dropout_prob = 0.0
        num_layers, num_heads = self.model_tester.num_hidden_layers, self.model_tester.num_attention_heads
        for model_class in self.all_model_classes:
            for training in (False, True):
                model = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").to(torch_device)
                model.train(training)
                with torch.no_grad():
                    outputs = model(**self._prepare_for_class(inputs_dict, model_class), output_attentions=True)
                self.assertEqual(len(outputs.attentions), num_layers)
                seq_length = self.model_tester.expected_seq_length(model, outputs)
                token_mask = outputs.token_mask if hasattr(outputs, "token_mask") else None
                for attentions in outputs.attentions:
                    self.assertListEqual(
                        list(attentions.shape), [self.model_tester.batch_size, num_heads, seq_length, seq_length]
                    )
                    if token_mask is not None:
                        to_inactive = attentions.masked_select(~token_mask[:, None, None, :].expand_as(attentions))
                        self.assertTrue(bool((to_inactive == 0).all()), "attention reaches an inactive position")

                # the config switch gives the same, and attentions come with hidden states too
                model.config.output_attentions = True
                model.config.output_hidden_states = True
                model.eval()
                with torch.no_grad():
                    outputs = model(**self._prepare_for_class(inputs_dict, model_class))
                self.assertEqual(len(outputs.attentions), num_layers)
                self.assertEqual(len(outputs.hidden_states), num_layers + 1)

    def test_hidden_states_output(self):
        """MSViT version of the common test: the sequence length comes from the gate, not from a fixed `seq_length`."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            for use_config in (False, True):
                for training in (False, True):
                    model_config = copy.deepcopy(config)
                    kwargs = {"output_hidden_states": True}
                    if use_config:
                        model_config.output_hidden_states = True
                        kwargs = {}
                    model = model_class(model_config).to(torch_device).train(training)
                    with torch.no_grad():
                        outputs = model(**self._prepare_for_class(inputs_dict, model_class), **kwargs)
                    hidden_states = outputs.hidden_states
                    self.assertEqual(len(hidden_states), self.model_tester.num_hidden_layers + 1)
                    seq_length = self.model_tester.expected_seq_length(model, outputs)
                    for hidden_state in hidden_states:
                        self.assertListEqual(
                            list(hidden_state.shape),
                            [self.model_tester.batch_size, seq_length, self.model_tester.hidden_size],
                        )

    def test_model_outputs_equivalence(self):
        """MSViT version of the common test, which builds its failure message with `tuple - dict` before asserting,
        and so raises on any bool tensor in the outputs (MSViT returns `token_mask` and `split_mask`)."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()

        def check_equal(tuple_output, dict_output):
            self.assertEqual(len(tuple_output), len(dict_output))
            for tuple_value, dict_value in zip(tuple_output, dict_output):
                if isinstance(tuple_value, (tuple, list)):
                    check_equal(tuple_value, dict_value)
                elif tuple_value.is_floating_point():
                    torch.testing.assert_close(tuple_value, dict_value, rtol=0, atol=1e-5, equal_nan=True)
                else:
                    self.assertTrue(torch.equal(tuple_value, dict_value))

        for model_class in self.all_model_classes:
            # eager: SDPA returns no attention weights
            model = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").to(torch_device)
            model.eval()
            for return_labels in (False, True):
                inputs = self._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
                for kwargs in ({}, {"output_hidden_states": True}, {"output_attentions": True}):
                    with torch.no_grad():
                        tuple_output = model(**inputs, return_dict=False, **kwargs)
                        dict_output = model(**inputs, return_dict=True, **kwargs).to_tuple()
                    self.assertIsInstance(tuple_output, tuple)
                    check_equal(tuple_output, dict_output)


class MSViTFixedBudgetModelTest(MSViTModelTest):
    """The common tests again, with every MSViT option away from its default.

    With `fine_ratio_budget` every image splits the same number of regions at inference, so sequences have one static
    length and transformers' own attention / hidden-states shape tests run unchanged. Training uses the gathered
    (padded) path, coarse tokens their own embedding, the gate reads that embedding, and the segmentation head uses
    the mask transformer decoder.
    """

    test_attention_outputs = ModelTesterMixin.test_attention_outputs
    test_hidden_states_output = ModelTesterMixin.test_hidden_states_output

    def setUp(self):
        super().setUp()
        self.model_tester = MSViTModelTester(
            self,
            fine_ratio_budget=0.25,
            train_token_path="gathered",
            separate_coarse_embedding=True,
            gate_input="coarse_embedding",
            decoder_type="mask_transformer",
        )
