# zgate — `make demo` runs the embedded default; `make test` runs every test.
CARGO ?= cargo
PYTHON ?= python3
export PYTHON

.PHONY: all setup build release demo test test-rust test-py lint bench fuzz clean

all: build

setup:
	@tests/setup

build: setup
	$(CARGO) build

release: setup
	$(CARGO) build --release

demo: setup
	$(CARGO) build --release
	./target/release/zgate demo

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

test-rust: setup
	$(CARGO) test

test-py: setup
	$(CARGO) build
	ZGATE_BIN=$(CURDIR)/target/debug/zgate $(PYTHON) -m pytest -q tests/py

test: lint test-rust test-py

clean:
	$(CARGO) clean
