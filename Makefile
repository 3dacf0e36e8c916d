# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install the pinned dependencies from requirements.txt.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements

.PHONY: demo test lint export clean

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m tools.demo

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

lint: $(STAMP)
	$(PYTHON) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
