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

# Benchmarks (issue 6): criterion micro-benchmarks, then the end-to-end harness against the
# release binary. Prints the table and writes docs/benchmarks.md. BENCH_QUICK=1: smoke run.
BENCH_CRITERION = $(if $(BENCH_QUICK),--quick --warm-up-time 1 --measurement-time 2,--warm-up-time 2 --measurement-time 5)
bench: setup
	@benches/setup
	$(CARGO) build --release --bin zgate --example bench_e2e
	$(CARGO) bench --bench protocol --bench outbox -- $(BENCH_CRITERION)
	./target/release/examples/bench_e2e --zgate ./target/release/zgate --out docs/benchmarks.md $(if $(BENCH_QUICK),--quick)

clean:
	$(CARGO) clean
