# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use, install the pinned dependencies from requirements.txt and this repository as an
# editable package (`modeling_msvit` and the `msvit` namespace), so that every command runs on the checkout's code.
VENV   := .venv
PYTHON := $(VENV)/bin/python
REQUIREMENTS := $(VENV)/.installed-requirements
STAMP  := $(VENV)/.installed-msvit

.PHONY: demo test lint data photo-demo evidence segmentation benchmark clean

$(REQUIREMENTS): requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $(REQUIREMENTS)

# PYTHONWARNINGS: silences setuptools' information-only notice on the import finder that maps the `msvit.*` folders
# (the design); any other build warning still shows, and tests/test_install.py fails on it.
$(STAMP): $(REQUIREMENTS) pyproject.toml
	PYTHONWARNINGS="ignore:Editable installation" $(PYTHON) -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $(STAMP)

# Fashion-MNIST from the Debian package dataset-fashion-mnist (MIT): the real data of the training scripts.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# The main job (about 3 minutes on 2 CPU cores): the shipped ViT/8 -> every split policy on it, frozen, over several
# budgets -> accuracy-GMACs curve, throughput, gate maps -> the cheapest setting within 0.5 point exported as a Hub
# folder; rewrites the README's summary and the report in docs/evidence.md.
demo: $(STAMP) data
	HF_HUB_OFFLINE=1 $(PYTHON) -m msvit.experiments.pipeline --readme README.md --docs docs/evidence.md

test: $(STAMP) data
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

# A conversion, Hub export and gate map on real photos (seconds), and the evidence runs (many hours; resumable, it
# rewrites the generated section of docs/evidence.md from results/evidence).
photo-demo: $(STAMP) data
	HF_HUB_OFFLINE=1 $(PYTHON) -m msvit.experiments.photo_demo

evidence: $(STAMP) data
	HF_HUB_OFFLINE=1 $(PYTHON) -m msvit.experiments.evidence --output_dir results/evidence --docs docs/evidence.md

# Semantic segmentation on Fashion-MNIST scenes: full-token and all-coarse segmenters, the MSViT recipe, mIoU vs GMACs
# at several budgets, both decoders (about 1.5 hours on 2 CPU cores; resumable); rewrites the generated section of
# docs/segmentation.md.
segmentation: $(STAMP) data
	HF_HUB_OFFLINE=1 $(PYTHON) -m msvit.experiments.segmentation_pipeline --results_dir results/segmentation \
		--docs docs/segmentation.md

# MSViT with two (16/32 px) and three (16/32/64 px) patch sizes vs ViT/16 and ViT/32 speed, side by side, at 224 px
# and 448 px (about 10 minutes on 2 CPU cores); rewrites the generated section of docs/performance.md.
benchmark: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.benchmark --docs docs/performance.md

lint: $(STAMP)
	$(PYTHON) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
