# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when missing and install
# the pinned stack (constraints.txt) once; later runs find the stamp and start at once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?= --model=fMRLRec --dataset=mm-sample --config_files=properties/profiles/fMRLRec-cpu.yaml

.PHONY: demo test lint bench data clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) run_recbole_fmrl.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.run

# Regenerate the shipped mm-sample set (deterministic; tests check the shipped copy matches).
data: $(STAMP)
	$(PY) -m recbole_fmrl.data.mm_sample --out dataset_atomic/mm-sample

clean:
	rm -rf log log_tensorboard saved ray_results .pytest_cache .ruff_cache .hypothesis .cache *.egg-info build dist
