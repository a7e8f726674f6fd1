# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when missing and install
# the pinned stack (constraints.txt) once; later runs find the stamp and start at once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?= --model=fMRLRec --dataset=mm-sample --config_files=properties/profiles/fMRLRec-cpu.yaml

.PHONY: demo test lint bench data clean python-check

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { $(MAKE) --no-print-directory python-check && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

# ray 2.6.3, the newest ray RecBole 1.2.1 accepts, has wheels up to Python 3.11 only: say so before pip fails.
python-check:
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') && case "$$v" in 3.10|3.11) ;; \
	*) echo "make: $(PYTHON) is Python $$v; recbole-fmrl needs Python 3.10 or 3.11 (ray 2.6.3, RecBole 1.2.1's cap, has no wheels for newer ones): set PYTHON, for example make test PYTHON=python3.11" >&2; exit 1;; esac

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
