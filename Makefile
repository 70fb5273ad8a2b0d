# swift-lycoris — the two entry points are `make demo` and `make test`; both install what
# they need on a Debian machine with Swift (OpenBLAS, jansson, pkg-config).

SWIFT ?= swift
ALGO ?= loha
STEPS ?= 120
OUT ?= demo-adapter.safetensors
PLOT ?= demo-loss.png
ORACLE_VENV ?= .venv-oracle

.PHONY: demo test build deps venv fixtures bench clean fuzz fuzz-smoke sanitizers

## The demo's algorithms: swift_lycoris.kohya's computed ones, read from its source so the two
## cannot differ. A bad ALGO stops make with one line naming them, before anything is built.
DEMO_ALGOS := $(shell sed -n 's/^COMPUTED_ALGORITHMS = (\(.*\))$$/\1/p' python/swift_lycoris/kohya.py | tr -d '",')
ifneq ($(filter demo,$(MAKECMDGOALS)),)
ifeq ($(filter $(ALGO),$(DEMO_ALGOS)),)
$(error ALGO=$(ALGO) is not an algorithm of the demo; choose one of: $(DEMO_ALGOS))
endif
endif

VENV ?= .venv

## System packages: OpenBLAS (cblas + LAPACK), jansson, pkg-config, jq (the shell
## example), through apt when missing.
deps:
	@if ! pkg-config --exists openblas jansson 2>/dev/null || ! command -v jq >/dev/null; then \
		echo "installing libopenblas-dev libjansson-dev pkg-config jq"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev libjansson-dev pkg-config jq >/dev/null; \
	fi

## The Python environment of the Python suites: protocol schemas, examples, swift_lycoris
## (torch, the LyCORIS 4.1.3 oracle, diffusers/transformers for tiny models built from
## configs) plus this repository's package, installed editable.
venv:
	@if ! $(VENV)/bin/python -c "import numpy, jsonschema, pytest, torch, lycoris, diffusers, transformers, matplotlib, peft, swift_lycoris" 2>/dev/null; then \
		echo "creating $(VENV) (python/requirements-test.txt)"; \
		python3 -m venv $(VENV) && $(VENV)/bin/pip install -q --upgrade pip && \
		$(VENV)/bin/pip install -q -r python/requirements-test.txt && \
		$(VENV)/bin/pip install -q --no-deps -e ./python; \
	fi

build: deps
	$(SWIFT) build -c release --product lycoris-server
	$(SWIFT) build -c release --product lycoris

## The main job: train an adapter ($(ALGO)) through swift_lycoris.kohya on a tiny built-in
## UNet + CLIP with synthetic data, save it with kohya metadata, describe it, plot the loss.
demo: build venv
	LYCORIS_SERVER=$(CURDIR)/.build/release/lycoris-server $(VENV)/bin/python -m swift_lycoris.demo --algo $(ALGO) --steps $(STEPS) --out $(OUT) --plot $(PLOT)

## Every test: Swift Testing (LyCORIS parity fixtures, finite differences, safetensors,
## round trips, CLI, server) and pytest (protocol schemas against the real server, examples).
test: deps venv
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build
	SWIFT=$(SWIFT) fuzz/run.sh --smoke
	$(SWIFT) build -c release --product lycoris-server
	$(SWIFT) build -c release --product lycoris
	LYCORIS_SERVER=$(CURDIR)/.build/debug/lycoris-server $(VENV)/bin/python -m pytest -q protocol/tests examples/tests
	LYCORIS_SERVER=$(CURDIR)/.build/release/lycoris-server $(VENV)/bin/python -m pytest -q python/tests

## libFuzzer (-sanitize=fuzzer,address) on the safetensors reader, the message framing and
## JSON-RPC decoder, network.create/network.load params and adapter-file loading: 1,000,000
## inputs per target (fuzz/README.md); `fuzz-smoke` is the 5-seconds-per-target run of `test`.
fuzz:
	SWIFT=$(SWIFT) fuzz/run.sh

fuzz-smoke:
	SWIFT=$(SWIFT) fuzz/run.sh --smoke

## The Swift test suite under AddressSanitizer and ThreadSanitizer; writes fuzz/SANITIZERS.md.
sanitizers:
	SWIFT=$(SWIFT) fuzz/sanitizers.sh

## Side-by-side benchmarks (release build; LyCORIS + torch from LYCORIS_BENCH_PYTHON if set).
bench: deps
	bench/run.sh

## Regenerate the golden fixtures from LyCORIS 4.1.3 + torch (large download; not needed
## to run the tests, which use the committed fixtures).
fixtures:
	python3 -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/pip install -q -r scripts/requirements-oracle.txt ml_dtypes
	$(ORACLE_VENV)/bin/python scripts/generate_fixtures.py
	$(ORACLE_VENV)/bin/python scripts/generate_safetensors_fixtures.py

clean:
	rm -rf .build $(OUT) $(PLOT)
