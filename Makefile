# zgate — `make demo` runs the embedded default; `make test` runs every test.
CARGO ?= cargo
PYTHON ?= python3
export PYTHON

.PHONY: all setup build release demo test test-rust test-py test-arm test-pi lint bench fuzz clean

# cross, cross-setup, deb, check-deb, check-unit, check-deploy
include cross/cross.mk

all: build

setup:
	@tests/setup

build: setup
	$(CARGO) build --workspace

release: setup
	$(CARGO) build --release

demo: setup
	$(CARGO) build --release
	./target/release/zgate demo

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust: setup
	$(CARGO) test --workspace

test-py: setup
	$(CARGO) build --workspace
	ZGATE_BIN=$(CURDIR)/target/debug/zgate ZGATE_BRIDGE_BIN=$(CURDIR)/target/debug/zgate-bridge \
		$(PYTHON) -m pytest -q tests/py

# The ARM builds under qemu-user against host-side pty, sim GPIO and backend.
test-arm: cross
	ZGATE_QEMU_ARCHES="$(CROSS_ARCHES)" $(PYTHON) -m pytest -q tests/py/test_arm_qemu.py

# The arm64 .deb installed and driven on an emulated Raspberry Pi 3 (qemu-system-aarch64
# -M raspi3b, Debian bookworm + systemd): tests/pi/README.md. Needs root; the first run builds
# the guest image into $$ZGATE_PI_CACHE (default /var/cache/zgate-test-pi).
test-pi: build
	tests/pi/setup
	$(MAKE) deb CROSS_ARCHES=aarch64
	tests/pi/image
	ZGATE_PI=1 ZGATE_BIN=$(CURDIR)/target/debug/zgate $(PYTHON) -m pytest -q tests/pi

test: lint test-rust test-py test-arm check-deploy test-pi

# Fuzzing (not part of `make test`): every target in fuzz/ for FUZZ_SECONDS each.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
# A crash stops the run; its input is in fuzz/artifacts/<target>/ — turn it into a unit test.
FUZZ_SECONDS ?= 30
fuzz: setup
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@mkdir -p fuzz/corpus/config fuzz/corpus/command fuzz/corpus/serial_line
	@cp src/config_template.toml fuzz/corpus/config/template.toml
	@printf '%s' '{"id":"c-1","target":"relay1","action":"pulse","value":{"ms":250}}' \
		> fuzz/corpus/command/pulse.json
	@printf '%s' '{"id":"c-2","target":"weather","action":"write","value":"GO"}' \
		> fuzz/corpus/command/write.json
	@printf '%s' '0temperature=21.5 humidity=40,ok=true' > fuzz/corpus/serial_line/kv
	@printf '%s' '1{"t": [1, {"a": "x"}], "s": "\\u00e9"}' > fuzz/corpus/serial_line/json
	@set -e; for t in $$(RUSTC_BOOTSTRAP=1 $(CARGO) fuzz list); do \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS); \
	done

# Benchmarks (issue 6): criterion micro-benchmarks, then the end-to-end harness against the
# release binary (and the spool benchmarks of issue 3, in process; item F, the fleet bridge, runs
# the bridge crate's loadgen example: a 3-node nats-server cluster on loopback, the release
# zgate-bridge, 1,000 simulated gateways). Prints the table and writes docs/benchmarks.md.
# BENCH_QUICK=1: smoke run. The full run also builds the aarch64 binary for the binary-size
# budget row (`cross/build aarch64`: minutes the first time, then cached);
# the quick run skips it and that row says n/a.
BENCH_CRITERION = $(if $(BENCH_QUICK),--quick --warm-up-time 1 --measurement-time 2,--warm-up-time 2 --measurement-time 5)
bench: setup
	@benches/setup
	$(if $(BENCH_QUICK),,$(CURDIR)/cross/build aarch64)
	$(CARGO) build --release --bin zgate --example bench_e2e
	$(CARGO) build --release -p zgate-bridge --bin zgate-bridge --example loadgen
	$(CARGO) bench --bench protocol --bench outbox -- $(BENCH_CRITERION)
	./target/release/examples/bench_e2e --zgate ./target/release/zgate \
		--bridge ./target/release/zgate-bridge --loadgen ./target/release/examples/loadgen \
		--out docs/benchmarks.md $(if $(BENCH_QUICK),--quick)

clean:
	$(CARGO) clean
