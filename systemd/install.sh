#!/usr/bin/env bash
# Installs pi-controller as a systemd service on 64-bit Raspberry Pi OS (Bookworm, arm64; Pi 3, 4, 5, Zero 2 W):
# a virtual environment in /opt/pi-controller (Bookworm's Python refuses system-wide pip installs),
# the unit and its user, /etc/pi-controller/config.yaml (kept if it exists), the bundled plugins in
# /var/lib/pi-controller/plugins; then enables SPI and 1-wire and starts the service.
#
#   sudo systemd/install.sh            install on this Pi
#   ROOT=/tmp/stage systemd/install.sh  stage the files under a root instead (no user, no systemctl)
set -euo pipefail
# What root writes, the service's user must read and run: a hardened shell's umask (027, which sudo keeps)
# left the venv root's alone, and the unit could not even start (203/EXEC). The config is 0640 on purpose.
umask 022

ROOT=${ROOT:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/pi-controller
STATE=/var/lib/pi-controller
CONF=/etc/pi-controller/config.yaml
live() { [ -z "$ROOT" ]; }

# Before anything is installed: the userland's architecture, not the kernel's (a 32-bit Raspberry Pi OS may
# run a 64-bit kernel). The Wasm runtime (extism-sys) ships wheels for arm64 and x86-64 only, and no source.
arch=$(dpkg --print-architecture 2>/dev/null || echo "unknown (no dpkg)")
case "$arch" in
    arm64 | amd64) ;;
    *)
        echo "install.sh: 64-bit Raspberry Pi OS (arm64) is required, this system is $arch: flash \"Raspberry Pi OS" \
             "(64-bit)\" with Raspberry Pi Imager (Pi 3, 4, 5, Zero 2 W), then run this again" >&2
        exit 1 ;;
esac
if live && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run it as root: sudo $0" >&2
    exit 1
fi
if live; then
    apt-get install -y python3-venv
fi

# Built from a copy: a build in the checkout would write into it, and two at once would collide.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build -cf - . | tar -C "$build" -xf -
python3 -m venv "$ROOT$PREFIX/venv"
"$ROOT$PREFIX/venv/bin/pip" install --quiet --upgrade "$build"

install -D -m 0644 "$SRC/systemd/pi-controller.service" "$ROOT/etc/systemd/system/pi-controller.service"
install -D -m 0644 "$SRC/systemd/pi-controller.sysusers" "$ROOT/usr/lib/sysusers.d/pi-controller.conf"
# systemd 253 and later: Type=notify-reload, so that `systemctl reload` waits for the daemon's READY=1 (a refused
# reload shows in `systemctl status`). SYSTEMD_VERSION stands in for the running systemd's when staging.
DROPIN="$ROOT/etc/systemd/system/pi-controller.service.d/notify-reload.conf"
version=${SYSTEMD_VERSION:-$(systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 }')}
if [ "${version:-0}" -ge 253 ] 2>/dev/null; then
    install -D -m 0644 /dev/stdin "$DROPIN" <<'UNIT'
[Service]
Type=notify-reload
# systemd sends SIGHUP itself and waits for RELOADING=1 and READY=1; no kill, no separate check.
ExecReload=
UNIT
else
    rm -f "$DROPIN"
fi
install -d -m 0755 "$ROOT$STATE/plugins"
# Each module with its manifest: its version, limits and config_schema (schema-checked settings, and the
# Home Assistant entities of its config) are in the manifest; a module alone loads without them. And with its
# signature when the checkout has one (`plugin sign`): plugins.require_signature refuses a module without.
# A signature of an earlier version (one signed here, in the folder) would describe another module, and any
# .sig that does not verify is refused: it goes when the module or manifest changes, as `plugin install` does.
for module in "$SRC"/plugins/*.wasm; do
    name=$(basename "$module" .wasm)
    dest=$ROOT$STATE/plugins/$name
    if [ ! -e "$SRC/plugins/$name.sig" ] && cmp -s "$module" "$dest.wasm" \
            && cmp -s "$SRC/plugins/$name.yaml" "$dest.yaml"; then
        continue  # unchanged: a signature made here still holds
    fi
    install -m 0644 "$SRC/plugins/$name.yaml" "$dest.yaml"
    if [ -e "$SRC/plugins/$name.sig" ]; then
        install -m 0644 "$SRC/plugins/$name.sig" "$dest.sig"
    else
        rm -f "$dest.sig"
    fi
    install -m 0644 "$module" "$dest.wasm"  # the module last, as `plugin install` moves them
done
if [ ! -e "$ROOT$CONF" ]; then
    install -d -m 0755 "$ROOT/etc/pi-controller"
    sed "s#^  directory: .*#  directory: $STATE/plugins#" "$SRC/config/example.yaml" > "$ROOT$CONF"
    chmod 0640 "$ROOT$CONF"
fi
# An upgrade repairs what an install under a stricter umask left (before the umask above: a venv of 0750, which
# the service's user could not run): all it installs readable by all, its folders and programs runnable. Links
# are not followed. The config is not among them: 0640, root's and its group's.
chmod -R go+rX "$ROOT$PREFIX" "$ROOT$STATE/plugins"
"$ROOT$PREFIX/venv/bin/pi-controller" check-config "$ROOT$CONF" --plugins "$ROOT$STATE/plugins"

if live; then
    systemd-sysusers pi-controller.conf
    chgrp pi-controller "$CONF"
    if command -v raspi-config >/dev/null; then
        raspi-config nonint do_spi 0      # 0 means enable
        raspi-config nonint do_onewire 0  # takes effect after a reboot
    fi
    systemctl daemon-reload
    systemctl enable --now pi-controller.service
    echo "installed; follow it with: journalctl -u pi-controller -f"
fi
