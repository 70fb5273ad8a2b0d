# swift-lycoris — the two entry points are `make demo` and `make test`; both install what
# they need on a Debian machine with Swift (OpenBLAS, jansson, pkg-config).

SWIFT ?= swift
ALGO ?= loha
STEPS ?= 300
OUT ?= demo-adapter.safetensors
ORACLE_VENV ?= .venv-oracle

.PHONY: demo test build deps fixtures clean

## System libraries: OpenBLAS (cblas + LAPACK) and jansson, through apt when missing.
deps:
	@if ! pkg-config --exists openblas jansson 2>/dev/null; then \
		echo "installing libopenblas-dev libjansson-dev pkg-config"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev libjansson-dev pkg-config >/dev/null; \
	fi

build: deps
	$(SWIFT) build -c release

## The main job: train an adapter ($(ALGO)) on the built-in toy model, save it, describe it.
demo: build
	.build/release/lycoris demo --algo $(ALGO) --steps $(STEPS) --out $(OUT)

## Every test (Swift Testing): LyCORIS parity fixtures, finite differences, safetensors,
## round trips, CLI.
test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

## Regenerate the golden fixtures from LyCORIS 4.1.3 + torch (large download; not needed
## to run the tests, which use the committed fixtures).
fixtures:
	python3 -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/pip install -q -r scripts/requirements-oracle.txt ml_dtypes
	$(ORACLE_VENV)/bin/python scripts/generate_fixtures.py
	$(ORACLE_VENV)/bin/python scripts/generate_safetensors_fixtures.py

clean:
	rm -rf .build $(OUT)
