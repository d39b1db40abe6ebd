# Two entry points (README): `make demo` and `make test`. Both create .venv and install
# the pinned CPU stack first; the stamp file makes re-runs skip the install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torchrec-mm-installed
OUT ?= out/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install bench clean system-deps

install: $(STAMP)

$(STAMP): requirements/cpu.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/cpu.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; fbgemm-gpu-cpu provides it here.
	$(PY) -m pip install --quiet --no-deps torchrec==1.8.0
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchrec-mm demo --out $(OUT)

test: $(STAMP) system-deps
	$(PY) -m pytest -q

# Debian's redis-server for the online item-store tests (torchrec_mm/serving; the tests
# start their own server on a free port and skip with a reason when it is absent)
system-deps:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else echo "redis-server not found (apt-get install redis-server): Redis store tests will be skipped"; fi; }

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
