#!/usr/bin/env bash
# The release's arm64 smoke: this commit on the Pi's own software stack, a Debian 12 (Bookworm) arm64 root
# filesystem, which 64-bit Raspberry Pi OS is built on, run under qemu-user on an x86 machine. In it: the
# README's install command (which must take only binary wheels), --version, check-config, `run --simulate
# --ticks 50`, and a seeded `simulate` whose trace must equal, byte for byte, the same run on this host.
#
#   sudo scripts/arm64-smoke.sh [WORKDIR]     (default /var/tmp/pi-controller-arm64; needs root for
#                                              debootstrap, chroot and binfmt_misc)
#
# The root is built once and kept in WORKDIR/root (delete it for a fresh one); the repository (HEAD, as
# `git archive` gives it: commit first) is copied in anew every run. Packages come from the Debian mirror
# apt already uses (MIRROR= to choose another); PyPI through pip. SMOKE_DURATION sets the simulated time
# (default 20m). Exit 0 when every step passed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/var/tmp/pi-controller-arm64}
ROOTFS=$WORK/root
DURATION=${SMOKE_DURATION:-20m}
SEED=${SMOKE_SEED:-26}
step() { printf '\n== %s\n' "$*"; }
fail() { echo "arm64-smoke: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run it as root (debootstrap, chroot, binfmt_misc): sudo $0"

mirror() {  # the first Debian archive that apt's sources name (deb822 or one-line format)
    local uri
    uri=$(grep -hoE '(URIs:[[:space:]]*|^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
              /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -n1)
    echo "${uri:-http://deb.debian.org/debian}"
}

step "host tools"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# arm64 programs run through qemu-aarch64 by binfmt_misc; its F flag opens the interpreter once, so chroot works.
[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || fail "binfmt_misc: qemu-aarch64 is not enabled"
echo "qemu: $(qemu-aarch64-static --version | head -n1)"

if [ ! -e "$ROOTFS/.debootstrap-done" ]; then
    MIRROR=${MIRROR:-$(mirror)}
    step "debootstrap bookworm arm64 from $MIRROR (once; minutes under emulation)"
    rm -rf "$ROOTFS"
    mkdir -p "$ROOTFS"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$ROOTFS" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap (log: $WORK/debootstrap.log)"; }
    touch "$ROOTFS/.debootstrap-done"
fi

mounts=()
cleanup() { local m; for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc dev; do
    mountpoint -q "$ROOTFS/$m" || { mount --bind "/$m" "$ROOTFS/$m"; mounts+=("$ROOTFS/$m"); }
done
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# A machine whose way to PyPI needs a CA of its own (pip's `cert` setting) lends it to the root's pip.
pip_env=()
host_cert=$(python3 -m pip config get global.cert 2>/dev/null || echo "${PIP_CERT:-}")
if [ -n "$host_cert" ] && [ -f "$host_cert" ]; then
    cp -L "$host_cert" "$ROOTFS/etc/ssl/certs/smoke-host-ca.crt"
    pip_env=(PIP_CERT=/etc/ssl/certs/smoke-host-ca.crt)
fi
in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 "${pip_env[@]}" bash -c "$1"; }
in_pi() { in_root "cd /srv/pi-controller && $1"; }

step "the Pi's userland"
in_root 'echo "dpkg --print-architecture: $(dpkg --print-architecture); uname -m: $(uname -m); $(python3 --version)"; \
         grep PRETTY_NAME /etc/os-release'

# The README's first command, less its last step (the run that lasts until Ctrl-C): the install an owner types.
readme_install=$(awk '/^```sh$/ { getline; print; exit }' "$REPO/README.md")
install_cmd=${readme_install% && *}
[[ "$install_cmd" == "python3 -m venv .venv && "* ]] || fail "README's first command is not the install expected: $readme_install"

commit=$(git -C "$REPO" rev-parse --short HEAD)
step "commit $commit: the README's install on arm64 ($install_cmd)"
rm -rf "$ROOTFS/srv/pi-controller" "$WORK/host"
mkdir -p "$ROOTFS/srv/pi-controller" "$WORK/host"
git -C "$REPO" archive HEAD | tar -C "$ROOTFS/srv/pi-controller" -xf -
git -C "$REPO" archive HEAD | tar -C "$WORK/host" -xf -
start=$SECONDS
in_pi "{ $install_cmd; } > /tmp/pip.log 2>&1" || { tail -n 20 "$ROOTFS/tmp/pip.log"; fail "the README's install"; }
echo "installed in $((SECONDS - start)) s; the native wheels pip chose:"
grep -oE '[^/ ]+\.whl' "$ROOTFS/tmp/pip.log" | sort -u | grep -viE -- '-none-any\.whl$' | sed 's/^/  /'  # the native ones
# Nothing compiled on the Pi: pip builds only this project itself (its editable wheel), never a dependency.
if grep -E 'Building wheel for ' "$ROOTFS/tmp/pip.log" | grep -v 'Building wheel for pi-controller'; then
    fail "pip built a dependency from source: a Pi would need a compiler"
fi
in_pi '.venv/bin/pip list 2>/dev/null | grep -iE "^(extism|extism-sys|lgpio|gpiozero|pi-controller) "'

step "pi-controller --version"
in_pi '.venv/bin/pi-controller --version' || fail "--version"

step "check-config config/example.yaml"
in_pi '.venv/bin/pi-controller check-config config/example.yaml' || fail "check-config"

step "run --simulate --ticks 50"
in_pi '.venv/bin/pi-controller run --config config/example.yaml --simulate --ticks 50 --log-level warning \
       --state-dir /tmp/state > /tmp/snapshot.json' || fail "run --simulate --ticks 50"
in_pi '.venv/bin/python -c "
import json
snapshot = json.load(open(\"/tmp/snapshot.json\"))
ticks, plugins = snapshot[\"ticks\"], snapshot[\"plugins\"]
print(\"ticks:\", ticks)
for name, stats in sorted(plugins.items()):
    print(name, {key: stats[key] for key in (\"state\", \"calls\", \"errors\", \"rejected\", \"median_us\", \"max_us\")})
assert ticks[\"count\"] == 50, \"not 50 ticks\"
assert all(s[\"state\"] == \"loaded\" and s[\"calls\"] == 50 and s[\"errors\"] == 0 for s in plugins.values()), \"a plugin failed\"
"' || fail "the snapshot of run --simulate --ticks 50"

step "every device kind: run --config config/every-kind.yaml --simulate --ticks 20"
in_pi '.venv/bin/pi-controller run --config config/every-kind.yaml --simulate --ticks 20 --log-level warning \
       --state-dir /tmp/state > /tmp/every-kind.json' || fail "every kind on simulated pins"
in_pi '.venv/bin/python -c "
import json
sensors = json.load(open(\"/tmp/every-kind.json\"))[\"sensors\"]
print(\", \".join(name + \" \" + format(r[\"value\"], \"g\") for name, r in sensors.items()))
assert all(r[\"valid\"] for r in sensors.values()), \"an invalid reading\"
"' || fail "the readings of every kind"

step "simulate --duration $DURATION --seed $SEED: arm64 against this host, byte for byte"
simulate="pi-controller simulate --config config/example.yaml --duration $DURATION --seed $SEED --trace"
start=$SECONDS
in_pi ".venv/bin/$simulate /tmp/trace.csv" || fail "simulate on arm64"
echo "arm64: $((SECONDS - start)) s"
(cd "$WORK/host" && eval "${install_cmd/ -e / -q -e }" >/dev/null 2>&1 && .venv/bin/$simulate trace.csv 2>/dev/null) \
    || fail "simulate on the host"
cmp "$ROOTFS/tmp/trace.csv" "$WORK/host/trace.csv" || fail "the traces differ"
echo "identical: $(wc -l < "$WORK/host/trace.csv") lines, sha256 $(sha256sum < "$WORK/host/trace.csv" | cut -c1-16)"

step "arm64 smoke passed (commit $commit)"
