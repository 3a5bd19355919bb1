#!/usr/bin/env bash
# Build, once, a Debian bookworm root that end-to-end tests boot under a real systemd with
# systemd-nspawn. Prints the root's path. Needs root and: apt-get install systemd-container debootstrap
#
# Why a container: the unit's Type=notify / WatchdogSec= / hardening can only be checked by a
# real PID 1, and systemd must never be booted on the machine's own root (its tmpfiles clean-up
# empties the host's /tmp).
#
# Boot it (keep the pid you started; end the container with SIGTERM to that pid, never by name):
#   systemd-nspawn -D ROOT -b --register=no --keep-unit --private-network --bind=/work/main &
#   PID1=<the nspawn process's only child>
#   nsenter -t "$PID1" -a systemctl is-system-running --wait
# --keep-unit: without it nspawn asks the host's systemd (over D-Bus) for a scope and fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# NSPAWN_SUITE=trixie builds a Debian 13 root instead (systemd 257), for the polkit rule alone:
#   NSPAWN_SUITE=trixie scripts/nspawn-root.sh .cache/nspawn-root-trixie
SUITE=${NSPAWN_SUITE:-bookworm}
ROOT=${1:-${NSPAWN_ROOT:-$PWD/.cache/nspawn-root}}
# The same packages the host runs, so a venv made from the host's /usr/bin/python3 works inside;
# polkitd: the daemon runs unprivileged as installed, and polkit decides what it may do with units
# (libpam-systemd: polkitd needs a logind, and debootstrap does not pick a virtual package's).
PACKAGES=systemd,systemd-sysv,dbus,python3,procps,polkitd,libpam-systemd

# The marker holds the package list: a root built with other packages is built again.
if [ "$(cat "$ROOT/.nspawn-root-complete" 2>/dev/null)" = "$SUITE $PACKAGES" ]; then
    echo "$ROOT"
    exit 0
fi
for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null || {
        echo "nspawn-root: $tool missing: apt-get install systemd-container debootstrap" >&2
        exit 2
    }
done
[ "$(id -u)" = 0 ] || { echo "nspawn-root: debootstrap needs root" >&2; exit 2; }

# The machine's own mirror (deb822 or one-line sources), so a proxy or snapshot set up for apt
# is used here too.
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources \
    2>/dev/null | grep -v security | head -n1 || true)
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

parent=$(dirname "$ROOT")
mkdir -p "$parent"
# A cache dir that ignores itself: a few hundred MB that must never reach git.
[ -f "$parent/.gitignore" ] || echo '*' >"$parent/.gitignore"
# Built beside the target and renamed at the end: an interrupted run never leaves a half root
# that looks complete.
partial="$ROOT.partial"
rm -rf "$partial"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$partial" "$mirror" >&2
# No getty or network set-up to wait for in a test container.
systemctl --root="$partial" mask console-getty.service systemd-networkd-wait-online.service \
    >/dev/null 2>&1 || true
echo "$SUITE $PACKAGES" >"$partial/.nspawn-root-complete"
rm -rf "$ROOT"
mv "$partial" "$ROOT"
echo "$ROOT"
