#!/usr/bin/env bash
# deploy/install.sh [--deb FILE] [--start] user@host
#
# Installs (or upgrades) zgate on a Raspberry Pi over ssh:
#   1. asks the Pi for its Debian architecture (dpkg --print-architecture) and
#      CPU (uname -m); refuses ARMv6 (Pi 1 / Zero), see cross/README.md
#   2. picks the matching package, target/debian/zgate_latest_<arch>.deb
#      (made by `make deb`), unless --deb FILE is given
#   3. copies it to the Pi (scp) and installs it with
#      `sudo apt-get install ./zgate_*.deb`, which also pulls in libzmq5
#   4. the package enables the service; on an upgrade it restarts a running
#      one. A first install does not start it (edit the config first), unless
#      --start is given. Shows systemctl status at the end.
# The ssh user needs sudo on the Pi (the default user of Raspberry Pi OS has).
# Extra ssh options: SSH_OPTS="-p 2222 -i ~/.ssh/pi" deploy/install.sh pi@gw-01.local
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
deb_dir=${ZGATE_DEB_DIR:-${CARGO_TARGET_DIR:-$here/../target}/debian}

deb=""; start=0; host=""
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) deb=$2; shift 2 ;;
        --start) start=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) [ -z "$host" ] || { echo "only one user@host" >&2; exit 2; }; host=$1; shift ;;
    esac
done
[ -n "$host" ] || { echo "usage: deploy/install.sh [--deb FILE] [--start] user@host" >&2; exit 2; }

ctl=$(mktemp -u "${TMPDIR:-/tmp}/zgate-ssh-XXXXXX")
# shellcheck disable=SC2206
ssh_opts=(-o ControlMaster=auto -o "ControlPath=$ctl" -o ControlPersist=60 ${SSH_OPTS:-})
cleanup() { ssh "${ssh_opts[@]}" -O exit "$host" 2>/dev/null || true; }
trap cleanup EXIT
rsh() { ssh "${ssh_opts[@]}" "$host" "$@"; }

read -r arch machine < <(rsh 'echo "$(dpkg --print-architecture) $(uname -m)"')
echo "==> $host: Debian architecture $arch, CPU $machine"
case "$arch:$machine" in
    arm64:*) ;;
    armhf:armv7l|armhf:armv8l|armhf:aarch64) ;;
    armhf:armv6l)
        echo "ERROR: $host has an ARMv6 CPU (Pi 1 / Zero / Zero W): not supported, see cross/README.md" >&2
        exit 1 ;;
    *)
        echo "ERROR: no zgate package for $arch ($machine); supported: arm64, armhf (ARMv7+)" >&2
        exit 1 ;;
esac

if [ -z "$deb" ]; then
    deb=$deb_dir/zgate_latest_$arch.deb
    [ -e "$deb" ] || { echo "ERROR: $deb not found: run 'make deb' first (or pass --deb FILE)" >&2; exit 1; }
    deb=$(readlink -f "$deb")
fi
[ -f "$deb" ] || { echo "ERROR: no such file: $deb" >&2; exit 1; }
pkg_arch=$(dpkg-deb --field "$deb" Architecture)
[ "$pkg_arch" = "$arch" ] || { echo "ERROR: $deb is for $pkg_arch, $host is $arch" >&2; exit 1; }
version=$(dpkg-deb --field "$deb" Version)

remote_tmp=$(rsh 'mktemp -d /tmp/zgate-install.XXXXXX')
echo "==> copying $(basename "$deb") ($version) to $host:$remote_tmp/"
scp "${ssh_opts[@]}" -q "$deb" "$host:$remote_tmp/$(basename "$deb")"

echo "==> installing on $host (sudo apt-get install)"
# -t: sudo may need to ask for a password.
ssh -t "${ssh_opts[@]}" "$host" "set -e
    chmod 755 '$remote_tmp'   # readable by apt's _apt user
    sudo apt-get install -y '$remote_tmp/$(basename "$deb")'
    rm -rf '$remote_tmp'
    if [ '$start' = 1 ]; then sudo systemctl restart zgate; fi
    systemctl --no-pager status zgate || true"
echo "==> done: zgate $version on $host"
echo "    config: /etc/zgate/zgate.toml, logs: journalctl -u zgate -f (see docs/deploy.md)"
