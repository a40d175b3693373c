#!/usr/bin/env bash
# Make sure the Debian packages that the demo and the tests run for real are here.
# As root: install what is missing. Otherwise: say in one line what to install, exit 1.
set -euo pipefail

missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have mosquitto || missing+=(mosquitto)
have openssl || missing+=(openssl)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# `make deb` builds the release with the distribution's own interpreter
if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
# the mock BlueZ of the BLE tests: a private dbus-daemon, and dbus-python built from source
have dbus-daemon || missing+=(dbus)
have pkg-config || missing+=(pkg-config)
have gcc || missing+=(gcc)
python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
    >/dev/null 2>&1 || missing+=(python3-dev)
if have pkg-config; then
    pkg-config --exists dbus-1 || missing+=(libdbus-1-dev)
    pkg-config --exists glib-2.0 || missing+=(libglib2.0-dev)
else
    missing+=(libdbus-1-dev libglib2.0-dev)
fi
# the Debian package (make deb) and its tests
have strip || missing+=(binutils)
have lintian || missing+=(lintian)
have shellcheck || missing+=(shellcheck)
have systemd-analyze || missing+=(systemd)
have systemd-nspawn || missing+=(systemd-container)
# the MicroPython ring runs the WebAssembly port under Node.js
have node || missing+=(nodejs)
have npm || missing+=(npm)
# the first-boot seed's tests: cloud-init checks and boots the seed (cloud-init schema,
# devel net-convert), netplan renders its network-config (netplan generate --root-dir)
have cloud-init || missing+=(cloud-init)
have netplan || missing+=(netplan.io)
# the HIL clock scenarios run the agent under libfaketime (a 1970 boot, clock jumps)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing+=(libfaketime)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # cloud-init is here for its tools: it must never configure this machine at a later boot
    # (its systemd generator honours this file; a cloud-init already in use is not touched)
    if [[ " ${missing[*]} " == *" cloud-init "* ]]; then
        mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled
    fi
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi
echo "missing Debian packages: run \`sudo apt-get install ${missing[*]}\` and try again" >&2
exit 1
