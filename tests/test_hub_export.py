import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_msvit import MSViTForImageClassification, MSViTForSemanticSegmentation
from msvit.tools.export import MODELING_FILES, export_hub_folder, image_processor_for
from tests.conftest import tiny_config


FULL_AUTO_MAP = {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoModelForSemanticSegmentation"}

# Runs in a fresh interpreter, outside the repository, with the repository's package made unimportable, so that
# only the code inside the exported folder can be used: the logits of `photo.png` beside the folder...
REMOTE_LOGITS = """
import sys
sys.modules["modeling_msvit"] = None
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
assert "transformers_modules" in type(model).__module__, type(model).__module__
image = Image.open(folder + "/../photo.png")
pixel_values = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt").pixel_values
with torch.no_grad():
    logits = model(pixel_values).logits[0]
results = {"logits": logits, "pixel_values": pixel_values}
"""
# ... and, for an RGB model, the image-classification pipeline's scores and the gate's settings
REMOTE_LOAD = (
    REMOTE_LOGITS
    + """
classifier = pipeline("image-classification", model=folder, trust_remote_code=True, top_k=None)
scores = {row["label"]: row["score"] for row in classifier(image)}
names = ("size_aware_attention", "gate_type", "gate_objective", "gate_residual_rule", "gate_input", "patch_sizes")
settings = {name: getattr(model.config, name) for name in names}
results.update(scores=scores, settings=settings)
"""
)


REMOTE_SEGMENT = """
import sys
sys.modules["modeling_msvit"] = None
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
assert "transformers_modules" in type(model).__module__, type(model).__module__
image = Image.open(folder + "/../photo.png")
pixel_values = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt").pixel_values
with torch.no_grad():
    logits = model(pixel_values).logits[0]
segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
masks = {row["label"]: np.asarray(row["mask"]) for row in segmenter(image)}
results = {"logits": logits, "pixel_values": pixel_values, "masks": masks}
"""


def load_in_clean_process(folder: Path, tmp_path: Path, script: str = REMOTE_LOAD) -> dict:
    """Run `script` on `folder` in a fresh interpreter and return the `results` it leaves."""
    script += "torch.save(results, out)\n"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    out = tmp_path / "remote.pt"
    subprocess.run(
        [sys.executable, "-c", script, str(folder), str(out)], cwd=tmp_path, env=env, check=True, timeout=300
    )
    return torch.load(out, weights_only=False)


@pytest.fixture
def photo(tmp_path) -> Image.Image:
    pixels = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels)
    image.save(tmp_path / "photo.png")
    return image


@pytest.fixture
def model() -> MSViTForImageClassification:
    config = tiny_config(id2label={i: f"class-{i}" for i in range(5)}, label2id={f"class-{i}": i for i in range(5)})
    return MSViTForImageClassification(config).eval()


def check_remote_matches(model, folder, photo, tmp_path):
    remote = load_in_clean_process(folder, tmp_path)
    local_pixels = image_processor_for(model.config)(images=photo, return_tensors="pt").pixel_values
    assert torch.equal(remote["pixel_values"], local_pixels)
    with torch.no_grad():
        logits = model(local_pixels).logits[0]
    # bit-identical in-process (see test_modeling_msvit); across processes CPU kernels may round differently
    torch.testing.assert_close(remote["logits"], logits, rtol=0, atol=1e-6)
    assert remote["settings"] == {name: getattr(model.config, name) for name in remote["settings"]}
    probabilities = logits.softmax(-1)
    for index, label in model.config.id2label.items():
        assert abs(remote["scores"][label] - probabilities[index].item()) <= 1e-6


def test_export_writes_a_complete_hub_folder(tmp_path, model, photo):
    folder = export_hub_folder(model, tmp_path / "msvit-hub", repo_id="org/msvit-tiny-test")
    files = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", *MODELING_FILES} <= files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == FULL_AUTO_MAP and config["model_type"] == "msvit"
    card = (folder / "README.md").read_text()
    assert "org/msvit-tiny-test" in card and "$" not in card.split("## Citation")[0]
    check_remote_matches(model, folder, photo, tmp_path)


def test_plain_save_pretrained_already_loads_with_remote_code(tmp_path, model, photo):
    folder = tmp_path / "plain"
    model.save_pretrained(folder)
    image_processor_for(model.config).save_pretrained(folder)
    assert {*MODELING_FILES} <= {path.name for path in folder.iterdir()}
    assert set(json.loads((folder / "config.json").read_text())["auto_map"]) == FULL_AUTO_MAP
    check_remote_matches(model, folder, photo, tmp_path)


@pytest.mark.parametrize(
    "settings",
    [
        dict(size_aware_attention=False),
        dict(gate_type="entropy"),
        dict(gate_residual_rule="std", gate_input="neighbourhood"),
        dict(patch_sizes=[4, 8, 16], gate_residual_rule="entropy", gate_input="pixels"),
    ],
)
def test_remote_code_keeps_attention_and_gate_settings(tmp_path, photo, settings):
    labels = {i: f"class-{i}" for i in range(5)}
    config = tiny_config(id2label=labels, label2id={name: i for i, name in labels.items()}, **settings)
    model = MSViTForImageClassification(config).eval()
    if config.gate_residual_rule:  # a trained correction, so that the remote gate must load it to match
        torch.nn.init.normal_(model.msvit.embeddings.gate.layers[-1].weight)
    model.set_budget(fine_ratio=0.5)
    check_remote_matches(model, export_hub_folder(model, tmp_path / "hub"), photo, tmp_path)


def test_model_card_carries_the_model_index(tmp_path, model):
    index = [{"name": "msvit", "results": [{"task": {"type": "image-classification"}, "metrics": [
        {"type": "accuracy", "value": 0.5, "name": "top-1"}]}]}]  # fmt: skip
    folder = export_hub_folder(model, tmp_path / "card", model_index=index, results_markdown="| a | b |")
    card = (folder / "README.md").read_text()
    assert "model-index:" in card and 'type: "accuracy"' in card and "| a | b |" in card


def test_segmentation_export_reloads_and_runs_the_pipeline_on_a_real_photo(tmp_path):
    """The exported segmenter, loaded from its own code in a clean process, gives the in-process logits, and
    `pipeline("image-segmentation")` returns one mask per predicted class at the photo's size, covering every pixel
    once and agreeing with the image processor's post-processing."""
    from skimage import data

    photo = Image.fromarray(data.coffee())  # a real 400x600 photo shipped with scikit-image
    photo.save(tmp_path / "photo.png")
    labels = ["background", "cup", "saucer", "spoon"]
    config = tiny_config(
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}, num_labels=4
    )
    model = MSViTForSemanticSegmentation(config).eval()
    index = [{"name": "msvit-seg", "results": [{"task": {"type": "image-segmentation"}, "metrics": [
        {"type": "mean_iou", "value": 0.5, "name": "mean IoU"}]}]}]  # fmt: skip
    folder = export_hub_folder(model, tmp_path / "seg-hub", model_index=index)
    config_json = json.loads((folder / "config.json").read_text())
    assert set(config_json["auto_map"]) == FULL_AUTO_MAP
    assert config_json["architectures"] == ["MSViTForSemanticSegmentation"]
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and 'type: "mean_iou"' in card
    assert "$" not in card.split("## Citation")[0]

    remote = load_in_clean_process(folder, tmp_path, REMOTE_SEGMENT)
    processor = image_processor_for(config, "image-segmentation")
    local_pixels = processor(images=photo, return_tensors="pt").pixel_values
    assert torch.equal(remote["pixel_values"], local_pixels)
    with torch.no_grad():
        outputs = model(local_pixels)
    torch.testing.assert_close(remote["logits"], outputs.logits[0], rtol=0, atol=1e-5)

    masks = remote["masks"]
    assert masks and set(masks) <= set(labels)
    for mask in masks.values():
        assert mask.shape == (photo.height, photo.width)
    coverage = sum((mask > 0).astype(int) for mask in masks.values())
    assert (coverage == 1).all()  # every pixel in exactly one mask
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[(photo.height, photo.width)])[0]
    for label, mask in masks.items():
        agreement = ((mask > 0) == (expected == labels.index(label)).numpy()).mean()
        assert agreement > 0.999, (label, agreement)  # across processes, CPU kernels may round a tie differently
