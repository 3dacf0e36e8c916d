"""The package as a user installs it: build the wheel, install it into a fresh virtual environment, and use it from a
folder outside the checkout (no repository files on the path).

The fresh environment installs the same pinned dependencies as `make test` (`-c requirements.txt`), which pip takes
from its cache, so the test costs about two minutes and no download after the first run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.test_train_classification import needs_data


REPO_ROOT = Path(__file__).resolve().parent.parent
# What `pip wheel .` needs: the build configuration, its metadata files and the packaged folders.
SOURCE = ["pyproject.toml", "README.md", "LICENSE", "requirements.txt"]
PACKAGED = ["modeling_msvit", "configuration", "experiments", "metrics", "model_cards", "tools", "train"]
TOP_LEVEL = {"modeling_msvit", "msvit"}
# a Python warning as pip prints it, e.g. "BuildBackendWarning: Package 'x' is absent from ..."
WARNING = re.compile(r"\b\w+Warning: .*")
EDITABLE_NOTICE = "Editable installation"
DRIVERS = ["pipeline", "evidence", "gate_study", "segmentation_pipeline", "photo_demo"]

pytestmark = pytest.mark.install


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert completed.returncode == 0, f"{' '.join(map(str, command))}\n{completed.stdout}\n{completed.stderr}"
    return completed


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what the build reads, so that building leaves nothing in the checkout."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCE:
        shutil.copy(REPO_ROOT / name, source / name)
    for name in PACKAGED:
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return source


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(source),
                 "--wheel-dir", str(wheels)])  # fmt: skip
    # setuptools reports packaging mistakes (e.g. a data folder missing from `packages`) as warnings that pip
    # forwards; they are to become errors
    assert not WARNING.findall(built.stdout + built.stderr), built.stdout + built.stderr
    (path,) = wheels.glob("msvit-*.whl")
    return path


def test_editable_build_warns_of_nothing(source, tmp_path):
    """The hook `pip install --editable .` (`make`'s install) runs, with every warning an error except setuptools'
    information-only notice about its import finder, which the Makefile silences."""
    script = f"""
        import warnings
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", {EDITABLE_NOTICE!r})
        from setuptools import build_meta
        print(build_meta.build_editable({str(tmp_path)!r}))
        """
    run([sys.executable, "-c", textwrap.dedent(script)], cwd=source)
    assert list(tmp_path.glob("msvit-*.whl"))


def test_the_makefile_silences_only_the_editable_notice():
    assert f'PYTHONWARNINGS="ignore:{EDITABLE_NOTICE}"' in (REPO_ROOT / "Makefile").read_text()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict, Path]:
    """(python of the fresh environment, its environment variables, a working folder outside the checkout)."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel),
         "--constraint", str(REPO_ROOT / "requirements.txt")])  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["HF_MODULES_CACHE"] = str(tmp_path_factory.mktemp("modules"))
    return python, env, tmp_path_factory.mktemp("elsewhere")


def run_python(installed, script: str) -> dict:
    """Run `script` with the fresh environment's python outside the checkout; it prints one JSON object last."""
    python, env, work_dir = installed
    completed = run([python, "-c", textwrap.dedent(script)], cwd=work_dir, env=env)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_wheel_holds_only_the_namespaced_packages_and_their_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == TOP_LEVEL
    assert {"modeling_msvit/modeling_msvit.py", "modeling_msvit/configuration_msvit.py"} <= set(names)
    assert "msvit/__init__.py" not in names  # a namespace: other projects' msvit.* packages can join it
    for data in ("msvit/configuration/models/msvit-tiny.json", "msvit/configuration/training/segmentation-gate.yaml",
                 "msvit/configuration/accelerate/cpu.yaml", "msvit/metrics/accuracy/accuracy.py",
                 "msvit/metrics/mean_iou/mean_iou.py", "msvit/model_cards/msvit-image-classification.md"):  # fmt: skip
        assert data in names, data


def test_installed_package_works_outside_the_checkout(installed):
    result = run_python(
        installed,
        """
        import json, site
        from pathlib import Path
        import modeling_msvit, msvit
        from msvit.configuration import RECIPES_DIR, load_preset, preset_names
        from msvit.metrics import load_metric

        site_packages = Path(site.getsitepackages()[0])
        config = load_preset("msvit-tiny", num_labels=3)
        accuracy = load_metric("accuracy").compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1])
        print(json.dumps({
            "top_level": sorted(p.name for p in site_packages.iterdir() if p.name in ("modeling_msvit", "msvit",
                                                                                     "train", "tools", "experiments",
                                                                                     "configuration", "metrics")),
            "installed": [str(Path(p).relative_to(site_packages)) for p in (*msvit.__path__, modeling_msvit.__file__)],
            "presets": preset_names(),
            "config": [config.model_type, config.hidden_size, config.num_labels],
            "recipes": sorted(p.name for p in RECIPES_DIR.glob("*.yaml")),
            "accuracy": accuracy,
        }))
        """,
    )
    assert result["top_level"] == sorted(TOP_LEVEL)
    assert result["installed"] == ["msvit", "modeling_msvit/__init__.py"]
    assert result["presets"] == ["msvit-base", "msvit-small", "msvit-tiny"]
    assert result["config"] == ["msvit", 192, 3]
    assert "translated-fmnist-gate.yaml" in result["recipes"]
    assert result["accuracy"] == {"accuracy": 0.5}


def test_every_script_and_driver_answers_help(installed):
    python, env, work_dir = installed
    modules = ["msvit.train.run_classification", "msvit.train.run_segmentation", "msvit.tools.export"]
    modules += [f"msvit.experiments.{name}" for name in DRIVERS]
    for module in modules:
        assert "usage:" in run([python, "-m", module, "--help"], cwd=work_dir, env=env).stdout, module


@needs_data
def test_tiny_training_run_and_hub_export_from_the_installed_package(installed):
    """An MSViT trained from scratch by the installed script, then loaded from its Hub folder with remote code."""
    python, env, work_dir = installed
    run(
        [python, "-m", "msvit.train.run_classification", "--stage", "scratch", "--dataset", "translated_fashion_mnist",
         "--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_train_batch_size", "32",
         "--per_device_eval_batch_size", "32", "--hidden_size", "32", "--num_hidden_layers", "1",
         "--num_attention_heads", "2", "--patch_size", "16", "--max_train_steps", "2", "--fine_ratio_budget", "0.5",
         "--output_dir", "run"],
        cwd=work_dir,
        env=env,
    )  # fmt: skip
    assert json.loads((work_dir / "run" / "results.json").read_text())["test"]["num_samples"] == 32
    result = run_python(
        installed,
        """
        import json, torch
        from transformers import AutoModelForImageClassification
        hub = AutoModelForImageClassification.from_pretrained("run/hub", trust_remote_code=True)
        import modeling_msvit
        saved = modeling_msvit.MSViTForImageClassification.from_pretrained("run/model")
        pixel_values = torch.randn(2, 1, 64, 64)
        with torch.no_grad():
            same = torch.allclose(hub(pixel_values).logits, saved(pixel_values).logits, atol=1e-6)
        print(json.dumps({"module": type(hub).__module__, "same": same, "budget": hub.config.fine_ratio_budget}))
        """,
    )
    assert result["module"].startswith("transformers_modules.")  # the Hub folder's own code, not the installed one
    assert result["same"] and result["budget"] == 0.5
