#!/usr/bin/env bash
# Install what blkrep's tests and benchmarks need from Debian (12, bookworm).
#
# Usage: scripts/install-test-deps.sh [--with-fuzz] [--print-python] [--help]
#
#   (no option)      install missing Debian packages, then print a summary,
#                    ending with the line `nbd-python: /path/to/python3`.
#   --with-fuzz      also `cargo install cargo-fuzz --locked`, if cargo-fuzz is
#                    missing (fuzzing then runs on nightly, or on stable with
#                    RUSTC_BOOTSTRAP=1 where there is no nightly).
#   --print-python   install nothing; print only the path of a python3 that can
#                    `import nbd` (exit 1 if there is none).
#
# Idempotent and cheap when everything is there: each package is checked with
# dpkg-query first, and `apt-get update` + `apt-get install` only run when
# something is missing. Works as root; uses sudo when not root.
#
# Notes for this project's machines:
#  * qemu-utils is only installed when qemu-img or qemu-nbd is absent: some
#    images ship a newer backport (10.x) that must not be replaced.
#  * `python3` on PATH may be a pyenv CPython that cannot import Debian's
#    python3-libnbd; tests call /usr/bin/python3 explicitly. The interpreter
#    that can `import nbd` is printed at the end.
set -euo pipefail

with_fuzz=0
print_python=0
for arg in "$@"; do
    case "$arg" in
        --with-fuzz) with_fuzz=1 ;;
        --print-python) print_python=1 ;;
        -h|--help)
            sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
            exit 0 ;;
        *) echo "install-test-deps: unknown option: $arg (try --help)" >&2; exit 2 ;;
    esac
done

log() { echo "install-test-deps: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The first python3 that can import libnbd's bindings; the system interpreter
# comes first because that is where Debian's python3-libnbd lives.
nbd_python() {
    local py
    for py in /usr/bin/python3 "$(command -v python3 || true)"; do
        [[ -n "$py" && -x "$py" ]] || continue
        if "$py" -c 'import nbd' >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

if (( print_python )); then
    nbd_python || { log "no python3 can 'import nbd' (install python3-libnbd)"; exit 1; }
    exit 0
fi

# Packages wanted, each with the reason.
#   libnbd-bin      nbdinfo, nbdcopy, nbdsh: readiness probes and data checks
#   python3-libnbd  NBD client for the Python integration tests
#   python3         /usr/bin/python3, the interpreter that can import nbd;
#                   also runs scripts/bench_report.py (stdlib only)
#   fio             scripts/bench-fio.sh (nbd ioengine)
#   util-linux      fallocate, findmnt (essential on Debian; listed for safety)
#   coreutils       stat, mktemp, timeout (same)
#   fuse3           fusermount3, for tools/powerloss-fs (tests/system/power_loss.rs)
#   util-linux-extra  fincore: how much of an image is in the page cache (the cold-read
#                   conformance test, bench-fio.sh --cache); not essential on Debian 12
#   libvirt-clients, libxml2-utils  virt-xml-validate (and its xmllint) with
#                   libvirt's schemas: the domain XML that
#                   `blkrep libvirt disk-xml` prints is validated (tests/system/libvirt.rs)
#   libvirt-daemon, libvirt-daemon-driver-qemu  libvirtd, run unprivileged in session
#                   mode by tests/system/libvirt.rs to boot a domain on that XML
#   systemd         systemd-analyze verify on the units (tests/system/packaging.rs)
#   man-db          man, to render the packaged man pages (scripts/test-package.sh)
#   chromium        headless browser that loads the daemons' status page
#                   (tests/system/dashboard.rs); fonts-dejavu-core gives it glyphs
wanted=(libnbd-bin python3-libnbd python3 fio util-linux util-linux-extra coreutils fuse3 systemd man-db)
wanted+=(libvirt-clients libxml2-utils libvirt-daemon libvirt-daemon-driver-qemu)
wanted+=(chromium fonts-dejavu-core)

# qemu-img/qemu-nbd: only when absent, never touching an installed backport.
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-nbd >/dev/null 2>&1; then
    wanted+=(qemu-utils)
fi
# A C compiler and libc headers: cargo links with cc, and -sys crates build C.
if ! command -v cc >/dev/null 2>&1; then
    wanted+=(gcc libc6-dev)
fi

command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script expects Debian 12"

missing=()
for pkg in "${wanted[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if (( ${#missing[@]} > 0 )); then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; cannot install: ${missing[*]}"
    if (( EUID == 0 )); then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        die "missing packages (${missing[*]}) and not root, and sudo is not installed; run as root: apt-get install ${missing[*]}"
    fi
    log "installing: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "all Debian packages present (${wanted[*]})"
fi

# Check what was asked for is now usable.
for tool in qemu-img qemu-nbd nbdinfo nbdcopy nbdsh fio fallocate fincore fusermount3 systemd-analyze man; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool still not on PATH after install"
done
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
    die "this fio has no nbd ioengine (Debian's fio has it built in)"
fi

if (( with_fuzz )); then
    if cargo fuzz --version >/dev/null 2>&1; then
        log "cargo-fuzz present: $(cargo fuzz --version 2>/dev/null)"
    elif ! command -v cargo >/dev/null 2>&1; then
        die "--with-fuzz: cargo not found"
    else
        # cargo-fuzz builds with stable; without a nightly toolchain the fuzz targets
        # run on stable with RUSTC_BOOTSTRAP=1 (scripts/test-all.sh).
        log "installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
fi

"$(dirname "$0")/guest-kit.sh" >&2 || die "scripts/guest-kit.sh failed: no guest-boot kit (QEMU, kernel, initramfs) for tests/system/guest_boot.rs"
py=$(nbd_python) || die "no python3 can 'import nbd' even after installing python3-libnbd"

log "qemu-nbd: $(qemu-nbd --version | head -n1)"
log "nbdinfo:  $(nbdinfo --version 2>/dev/null | head -n1)"
log "fio:      $(fio --version)"
# The one line on stdout, for scripts: the interpreter that can import nbd.
echo "nbd-python: $py"
