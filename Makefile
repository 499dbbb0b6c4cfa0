# dlsm — `make demo` runs the moons experiment, `make test` the test suite, `make ui` the MLflow UI,
# `make reproduce-moons` the DLSM paper's moons analysis and its report, `make reproduce-digits` the digits one,
# `make reproduce-guidance` the guidance schedules on digits.
# Each target creates .venv and installs the project on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-threads lint ui clean reproduce-moons reproduce-digits reproduce-guidance reproduce-samplers mutation

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'  # with pip's .pyc: under PYTHONDONTWRITEBYTECODE=1 imports would not write them
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dlsm.launch --gin gin/moons.gin

# DLSM paper Table 1, Figures 1 and 5 on moons (~9 min on 2 CPU cores, measured 2026-12-02), then docs/results/moons.md
reproduce-moons: $(STAMP)
	$(PY) -m dlsm.launch --fresh --gin gin/moons_table1.gin
	$(PY) -m dlsm.launch --fresh --gin gin/moons_ablation.gin
	$(PY) -m dlsm.report --out docs/results/moons.md --notes docs/results/moons_notes.md

# DLSM paper Table 2 / Figures 3-4, the mechanism and the (lambda, alpha) frontier on scikit-learn's digits, 3 seeds
# (fresh: its own checkpoint and cache folder), then docs/results/digits.md. Budget: 90 min on 2 CPU cores.
DIGITS_WORK := .dlsm/reproduce-digits
DIGITS_SWEEP := --param SEED --values 0 1 2 --fresh \
	--gin_param "experiment.workdir = '$(DIGITS_WORK)'" --gin_param "sweep.cpus_per_trial = 2" \
	--gin_param "sweep.metric = 'ours/cw/fid.evaluator'"
reproduce-digits: $(STAMP)
	rm -rf $(DIGITS_WORK)
	$(PY) tune/sweep.py --gin gin/digits_frontier.gin --share none $(DIGITS_SWEEP)
	$(PY) tune/sweep.py --gin gin/digits32.gin --share stage1 --gin_param "N_PER_CLASS = 10" $(DIGITS_SWEEP)
	$(PY) -m dlsm.report digits --out docs/results/digits.md --notes docs/results/digits_notes.md

# Where and how strongly to guide (guidance schedules, the "where does guidance matter" ablation, the mechanism up to
# sigma_max, the frontier) on digits, 6 seeds sharing one stage-1 score model, two trials at a time on one core each,
# then docs/results/guidance.md (docs/results/guidance_notes.md appended). Budget: 90 min on 2 CPU cores.
GUIDANCE_WORK := .dlsm/reproduce-guidance
reproduce-guidance: $(STAMP)
	rm -rf $(GUIDANCE_WORK)
	$(PY) tune/sweep.py --gin gin/digits_guidance.gin --share stage1 --param SEED --values 0 1 2 3 4 5 --fresh \
		--gin_param "experiment.workdir = '$(GUIDANCE_WORK)'" --gin_param "sweep.cpus_per_trial = 1" \
		--gin_param "sweep.metric = 'ours/cw/fid.evaluator'"
	$(PY) -m dlsm.report guidance --out docs/results/guidance.md --notes docs/results/guidance_notes.md

# Sampling quality against network evaluations: PC against guided Heun (EDM) on digits32's networks, trained once,
# 3 seeds for the chosen points, then docs/results/samplers.md (with docs/results/samplers_notes.md appended by hand).
# A smaller grid than the script's default (PC 100/200/500, Heun 18/35/50), which would take hours on 2 CPU cores;
# 124 min of running on 2 CPU cores, measured 2026-12-05 (the training about 63 min of it)
reproduce-samplers: $(STAMP)
	rm -rf .dlsm/bench-samplers
	$(PY) bench/samplers_quality.py --pc 25 50 100 --heun 5 9 18 --stochastic 9 --notes docs/results/samplers_notes.md

lint: $(STAMP)
	$(PY) -m ruff check .

# the suite on both cores (pytest-xdist; tests/conftest.py keeps tests that share a fixture, and the Ray tests, on one
# worker each, and gives every process one thread); TEST_WORKERS=0 runs it in this process alone
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# the numerical tests again with two threads per process: a constant that holds for one reduction order only fails
NUMERIC_TESTS := tests/test_losses.py tests/test_samplers.py tests/test_schedules.py tests/test_scores.py \
	tests/test_training.py tests/test_oracle_metrics.py tests/test_eval_metrics.py tests/test_stats.py
test-threads: $(STAMP)
	DLSM_TEST_THREADS=2 $(PY) -m pytest -q $(NUMERIC_TESTS)

# Mutation testing of the paper's mathematics and the metrics (docs/mutation.md); not part of `make test`.
# MUTANTS='dlsm.math.losses*' narrows it to one module (results of the others are kept); ~8-20 min a module.
MUTANTS ?=
mutation: $(STAMP)
	test -x $(VENV)/bin/mutmut || $(PY) -m pip install -q 'mutmut>=3.8,<4'
	nice -n 10 $(PY) tools/mutation.py $(MUTANTS)

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf mlruns .dlsm .pytest_cache .ruff_cache
