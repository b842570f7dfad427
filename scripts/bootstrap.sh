#!/usr/bin/env bash
# Make this checkout runnable: system packages, a virtualenv in .venv, xenpool in editable mode.
# Installs missing Debian packages with apt when run as root; otherwise names them and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing=(python3 python3-venv python3-dev)
else
    missing=()
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "xenpool needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1)" >&2; exit 1; }
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    [ -f "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
        || missing+=(python3-dev)
fi
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists libvirt 2>/dev/null || missing+=(libvirt-dev)
[ -f /usr/include/netinet/sctp.h ] || missing+=(libsctp-dev)
command -v tshark >/dev/null 2>&1 || missing+=(tshark)
command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit)                 # NBD disks in tests
[ -x /usr/sbin/fence_dummy ] || missing+=(fence-agents)                # real fence agents in tests
# Optional: the live migration end-to-end test and the QEMU bed (xenpool/tools/qemubed.py:
# three QEMU hosts, guests on nbdkit disks; nbdkit is required above), a tiny guest booted
# from Debian's kernel and a static busybox). Installed as root; skipped without them.
optional=()
command -v libvirtd >/dev/null 2>&1 || optional+=(libvirt-daemon-system)
[ -n "$(ls /usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so 2>/dev/null)" ] || optional+=(libvirt-daemon-driver-qemu)
command -v qemu-system-x86_64 >/dev/null 2>&1 || optional+=(qemu-system-x86)
static_busybox() {  # a dynamic ELF names its loader (PT_INTERP) in its first bytes
    [ -x /bin/busybox ] || return 1
    case "$(head -c 8192 /bin/busybox | tr -d '\0')" in *ld-linux*) return 1 ;; esac
}
static_busybox || optional+=(busybox-static)
[ -n "$(ls /boot/vmlinuz-* 2>/dev/null)" ] || optional+=(linux-image-amd64)
# Optional: rsplib 3.4.4 for the interop tests (its parser checks xenpool's bytes; its
# registrar, server and terminal run with xenpool over SCTP in the QEMU guest).
command -v rspregistrar >/dev/null 2>&1 || optional+=(rsplib-registrar)
command -v rspserver >/dev/null 2>&1 || optional+=(rsplib-tools)
[ -f /usr/include/rserpool/rserpool.h ] || optional+=(librsplib-dev)
# Optional: promtool checks the /metrics pages, systemd-analyze the units in etc/systemd.
command -v promtool >/dev/null 2>&1 || optional+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || optional+=(systemd)
# Optional: headless Chromium for the console's web page test (skipped without it).
command -v chromium >/dev/null 2>&1 || optional+=(chromium)
# Optional: tcpdump, copied into that guest to capture its SCTP traffic for tshark (required above)
[ -x /usr/bin/tcpdump ] || optional+=(tcpdump)
if [ ${#optional[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        missing+=("${optional[@]}")
    else
        echo "note: the live migration, real-guest (QEMU bed), SCTP interop, promtool, systemd unit and web page tests are skipped without: ${optional[*]}" >&2
    fi
fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "xenpool needs these system packages, install them first: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.xenpool-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing xenpool into $VENV (editable, with the test and sim extras)"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$VENV/bin/python" -m pip install -q -e '.[test,sim]'
    touch "$stamp"
fi
# twistd looks for drop-ins only on sys.path, where an editable install does not put the
# checkout (nor should it: plugins/ and tests/ would become importable top-level packages).
./scripts/link-twisted-dropin.sh "$VENV"
