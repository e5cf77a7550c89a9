# shellcheck shell=bash
# Shared definitions for cross/setup, cross/build and cross/run-qemu.
# Sourced, not executed.
#
# Environment knobs (all optional):
#   ZGATE_CRATE_DIR    crate to build (default: the repository containing cross/)
#   ZGATE_SYSROOT_DIR  where the Debian sysroots live (default: $ZGATE_CRATE_DIR/target/sysroot)
#   CARGO_TARGET_DIR   honoured as usual by cargo (default: $ZGATE_CRATE_DIR/target)

CROSS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$CROSS_DIR/.." && pwd)
ZGATE_CRATE_DIR=${ZGATE_CRATE_DIR:-$REPO_DIR}
ZGATE_CRATE_DIR=$(cd "$ZGATE_CRATE_DIR" && pwd)
ZGATE_SYSROOT_DIR=${ZGATE_SYSROOT_DIR:-$ZGATE_CRATE_DIR/target/sysroot}

# The Debian release the Pi runs (Raspberry Pi OS bookworm).
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

SUPPORTED_ARCHES="aarch64 armv7"

log()  { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die()  { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# arch_vars ARCH: sets RUST_TRIPLE, GNU_TRIPLE, DEB_ARCH, CROSS_CC, QEMU, QEMU_PREFIX, SYSROOT
arch_vars() {
    case "$1" in
        aarch64|arm64)
            ARCH=aarch64
            RUST_TRIPLE=aarch64-unknown-linux-gnu
            GNU_TRIPLE=aarch64-linux-gnu
            DEB_ARCH=arm64
            QEMU=qemu-aarch64
            ;;
        armv7|armhf|arm)
            ARCH=armv7
            RUST_TRIPLE=armv7-unknown-linux-gnueabihf
            GNU_TRIPLE=arm-linux-gnueabihf
            DEB_ARCH=armhf
            QEMU=qemu-arm
            ;;
        armv6|arm-unknown-linux-gnueabihf|pi0|pizero)
            die "ARMv6 (Pi Zero / Zero W / Pi 1) is not supported: see cross/README.md"
            ;;
        *)
            die "unknown architecture '$1' (supported: $SUPPORTED_ARCHES)"
            ;;
    esac
    CROSS_CC=$GNU_TRIPLE-gcc
    # glibc, libgcc and libstdc++ of the cross toolchain (libc6-<arch>-cross):
    # qemu's -L prefix, and the linker's view of libc.
    QEMU_PREFIX=/usr/$GNU_TRIPLE
    # libzmq and its dependency closure, unpacked from Debian's packages.
    SYSROOT=$ZGATE_SYSROOT_DIR/$ARCH
    SYSROOT_LIBDIRS="$SYSROOT/usr/lib/$GNU_TRIPLE:$SYSROOT/lib/$GNU_TRIPLE"
}

# Runtime closure of libzmq5, minus what the cross toolchain already provides
# (libc6, libgcc-s1, libstdc++6, gcc-12-base). Computed with
#   apt-cache depends --recurse --no-recommends ... libzmq5
# and re-checked by cross/setup on every sysroot (re)build.
SYSROOT_TOOLCHAIN_PKGS="libc6 libgcc-s1 libstdc++6 gcc-12-base"
SYSROOT_EXTRA_PKGS="libzmq3-dev"
