# Makefile fragment: cross builds, Debian packages, deploy checks.
# Include from the top-level Makefile:   include cross/cross.mk
#
#   make cross          release binaries for aarch64 and armv7 (LTO, stripped),
#                       linked against Debian bookworm's libzmq5 (runs cross/setup)
#   make cross-setup    only install toolchains / sysroots (idempotent)
#   make deb            one .deb per architecture into target/debian/
#   make check-deploy   check-deb on each .deb + check-unit (systemd-analyze verify)
#
# CROSS_ARCHES=aarch64 make deb   restricts to one architecture.

ZGATE_ROOT   := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
CROSS_ARCHES ?= aarch64 armv7
ZGATE_DEB_DIR = $(or $(CARGO_TARGET_DIR),$(ZGATE_ROOT)/target)/debian
# Debian architecture names of CROSS_ARCHES
CROSS_DEB_ARCHES = $(patsubst aarch64,arm64,$(patsubst armv7,armhf,$(CROSS_ARCHES)))

.PHONY: cross cross-setup deb check-deploy check-deb check-unit

cross-setup:
	$(ZGATE_ROOT)/cross/setup $(CROSS_ARCHES)

cross:
	$(ZGATE_ROOT)/cross/build $(CROSS_ARCHES)

deb: cross
	ZGATE_SKIP_SETUP=1 $(ZGATE_ROOT)/deploy/build-deb $(CROSS_ARCHES)

check-deb: deb
	@set -e; for a in $(CROSS_DEB_ARCHES); do \
	    echo "== check-deb $$a"; \
	    $(ZGATE_ROOT)/deploy/check-deb $(ZGATE_DEB_DIR)/zgate_latest_$$a.deb $$a; \
	done

check-unit:
	$(ZGATE_ROOT)/deploy/check-unit $(ZGATE_ROOT)/deploy/zgate.service

check-deploy: check-deb check-unit
