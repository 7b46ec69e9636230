# visitorstats: the two commands a newcomer needs are `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint bench system-deps clean native pure

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[native]'
	touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -q -e '.[test]'
	touch $@

# The beacons' hot path compiled to C by mypyc (tools/build_native.py), rebuilt whenever any
# source of the package changes; `make pure` goes back to running the sources alone.
NATIVE_STAMP := build/.native
$(NATIVE_STAMP): $(STAMP) tools/build_native.py $(shell find services -name '*.py')
	$(PY) tools/build_native.py
	touch $@

native: $(NATIVE_STAMP)

pure:
	rm -rf build
	find services -name '*.so' -delete

run: $(STAMP) $(NATIVE_STAMP)
	$(VENV)/bin/visitorstats run

# Debian packages the tests drive for real: Chromium + ChromeDriver, Prometheus (+promtool), wrk,
# and Node.js to check the browser scripts' syntax.
system-deps:
	@missing=""; \
	for b in chromium:chromium chromedriver:chromium-driver prometheus:prometheus promtool:prometheus wrk:wrk node:nodejs; do \
	  command -v $${b%%:*} >/dev/null 2>&1 || missing="$$missing $${b##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check services tests bench tools
	$(VENV)/bin/ruff format --check services tests bench tools
	$(VENV)/bin/mypy

test: $(TEST_STAMP) $(NATIVE_STAMP) system-deps
	$(MAKE) lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# BENCH_ARGS: e.g. --quick, --freshness-seconds 15, --only ingest,counter, --profile
bench: $(TEST_STAMP) $(NATIVE_STAMP) system-deps
	$(PY) -m bench $(BENCH_ARGS)

clean: pure
	rm -rf $(VENV) data
