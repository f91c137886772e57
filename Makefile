# Two commands do all the set-up on a fresh machine:  `make train` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the torch pair this project is tested with (a CUDA build that also runs on the CPU)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "dataset-fashion-mnist not installable here: train.py falls back to the Hub copy"

install: $(STAMP)

train: $(STAMP) fashion-mnist
	$(PY) train.py

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q -n 2 tests

.PHONY: install train test fashion-mnist
