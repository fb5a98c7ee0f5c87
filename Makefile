# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memattn-installed

.PHONY: setup demo test lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch lies on local disk; a looser pin would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# Only for the real CLIP BPE vocabulary file it ships (tiny pipelines, tokenizer tests);
	# --no-deps keeps it from pulling torchvision/timm and a different torch.
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m memattn.cli.demo

# Headless Chromium for the report's browser test (Debian package; needs root or sudo).
chromium:
	@test -x /usr/lib/chromium/chromium || command -v chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The suite runs on TEST_WORKERS processes (pytest-xdist; a test module stays on one worker, so its
# fixtures are built once), one torch thread each: two workers use two cores fully, and a test and the
# subprocesses it starts compute with the same thread count (bit-exact comparisons stay exact).
TEST_WORKERS ?= 2

test: setup chromium
	$(BIN)/ruff check memattn tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadscope --durations=25

bench: setup
	$(BIN)/python benchmarks/probe_overhead.py

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
