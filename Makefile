# zgate — `make demo` runs the embedded default; `make test` runs every test.
CARGO ?= cargo
PYTHON ?= python3
export PYTHON

.PHONY: all setup build release demo test test-rust test-py test-arm lint bench fuzz clean

# cross, cross-setup, deb, check-deb, check-unit, check-deploy
include cross/cross.mk

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

# The ARM builds under qemu-user against host-side pty, sim GPIO and backend.
test-arm: cross
	ZGATE_QEMU_ARCHES="$(CROSS_ARCHES)" $(PYTHON) -m pytest -q tests/py/test_arm_qemu.py

test: lint test-rust test-py test-arm check-deploy

clean:
	$(CARGO) clean
