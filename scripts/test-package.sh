#!/usr/bin/env bash
# Tests the Debian package: builds it (scripts/package.sh, which reuses the release
# build), checks its control data, conffiles, maintainer scripts and contents with
# dpkg-deb, extracts it into a clean root, and runs what it installed there:
# `blkrep --version`, the man pages, the bash completion, and both daemons' --check
# on the shipped example configurations.
#
# The examples name files a fresh host does not have yet (disk images, certificates),
# so --check on them as shipped must fail naming only those; the same examples with
# their directories moved under a scratch root, where the test creates those files
# (certificates made by the packaged `blkrep cert`), must pass.
#
# Usage: scripts/test-package.sh [--no-build]   (--no-build: test the .deb in
# target/debian as it is). Ends with "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAILED: $*"; }
check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
finish() {
    echo "$passed passed, $failed failed"
    (( failed == 0 ))
    exit $?
}

target_dir=${CARGO_TARGET_DIR:-target}
if [[ "${1:-}" != "--no-build" ]]; then
    started=$SECONDS
    if ! scripts/package.sh; then
        fail "scripts/package.sh builds the package"
        finish
    fi
    echo "package built in $((SECONDS - started)) s"
fi
debs=("$target_dir"/debian/blkrep_*.deb)
if [[ ${#debs[@]} -ne 1 || ! -f "${debs[0]}" ]]; then
    fail "exactly one package in $target_dir/debian (found: ${debs[*]})"
    finish
fi
deb=${debs[0]}
echo "== $deb"

work=$(mktemp -d /tmp/blkrep-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT

# --- control data, conffiles and maintainer scripts
dpkg-deb -I "$deb" >"$work/info"
dpkg-deb -e "$deb" "$work/control"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
check "Package: blkrep" grep -qx ' Package: blkrep' "$work/info"
check "Version: $version-1" grep -qx " Version: $version-1" "$work/info"
check "Depends names libc" grep -q '^ Depends:.*libc6' "$work/info"
check "conffiles are the two example configurations" \
    diff <(sort "$work/control/conffiles") <(printf '/etc/blkrep/primary.toml\n/etc/blkrep/replica.toml\n')
for script in postinst prerm postrm; do
    check "$script registers the units with systemd" \
        grep -q 'blkrep-primary.service' "$work/control/$script"
done
check "postinst starts no unit, and restarts only running ones on upgrade" \
    bash -c '! grep -Eq "deb-systemd-invoke (start|restart)" "$1" && grep -q "deb-systemd-invoke try-restart" "$1"' \
    _ "$work/control/postinst"
check "postinst enables only a unit that was enabled" \
    bash -c '[[ $(grep -c "deb-systemd-helper enable" "$1") == $(grep -c "was-enabled" "$1") ]]' \
    _ "$work/control/postinst"

# --- contents
dpkg-deb -c "$deb" | awk '{print $6}' | sed 's#^\./#/#' >"$work/contents"
for path in \
    /usr/bin/blkrep \
    /etc/blkrep/primary.toml /etc/blkrep/replica.toml \
    /usr/lib/systemd/system/blkrep-primary.service /usr/lib/systemd/system/blkrep-replica.service \
    /usr/lib/systemd/system/blkrep-primary.socket \
    /usr/share/man/man1/blkrep.1.gz /usr/share/man/man1/blkrep-primary.1.gz \
    /usr/share/man/man1/blkrep-replica-run.1.gz /usr/share/man/man1/blkrep-status.1.gz \
    /usr/share/bash-completion/completions/blkrep \
    /usr/share/zsh/vendor-completions/_blkrep \
    /usr/share/fish/vendor_completions.d/blkrep.fish \
    /usr/share/doc/blkrep/README.md /usr/share/doc/blkrep/copyright; do
    check "contains $path" grep -qx "$path" "$work/contents"
done
check "no generated page of a hidden command" bash -c '! grep -q generate "$1"' _ "$work/contents"

# --- the extracted root
root="$work/root"
dpkg-deb -x "$deb" "$root"
blkrep="$root/usr/bin/blkrep"
check "blkrep --version says $version" bash -c '[[ "$("$1" --version)" == "blkrep $2" ]]' _ "$blkrep" "$version"
for unit in blkrep-primary.service blkrep-replica.service blkrep-primary.socket; do
    check "$unit is the one in contrib/systemd" cmp -s "$root/usr/lib/systemd/system/$unit" "contrib/systemd/$unit"
done
if command -v man >/dev/null; then
    check "man blkrep-primary renders and documents --check" \
        bash -c 'man -l "$1" 2>/dev/null | grep -q -- "--check"' _ "$root/usr/share/man/man1/blkrep-primary.1.gz"
else
    echo "skip: man is not installed; the pages are not rendered"
fi
check "the bash completion completes the subcommands" bash -c '
    source "$1"
    COMP_WORDS=(blkrep rep); COMP_CWORD=1; COMP_LINE="blkrep rep"; COMP_POINT=${#COMP_LINE}
    _blkrep blkrep rep blkrep
    [[ " ${COMPREPLY[*]} " == *" replication "* && " ${COMPREPLY[*]} " == *" replica "* ]]' \
    _ "$root/usr/share/bash-completion/completions/blkrep"

# --check as shipped: only the files a fresh host lacks are reported.
only_missing_files() { # only_missing_files OUTPUT_FILE PATTERN...
    local out=$1 line
    shift
    grep -q "problem(s)" "$out" || return 1
    while read -r line; do
        [[ "$line" == -* ]] || continue
        local known=0 pattern
        for pattern in "$@"; do
            [[ "$line" == *"$pattern"* ]] && known=1
        done
        (( known )) || { echo "unexpected problem: $line"; return 1; }
    done <"$out"
}
"$blkrep" primary --check --config "$root/etc/blkrep/primary.toml" >"$work/primary-check" 2>&1
check "primary --check on the shipped example reports only the missing images and certificates" \
    only_missing_files "$work/primary-check" /etc/blkrep/ca.pem /etc/blkrep/primary.pem \
    /etc/blkrep/primary.key /var/lib/libvirt/images/vm1-disk0.raw
"$blkrep" replica run --check --config "$root/etc/blkrep/replica.toml" >"$work/replica-check" 2>&1
check "replica run --check on the shipped example reports only the missing certificates" \
    only_missing_files "$work/replica-check" /etc/blkrep/replica.pem /etc/blkrep/replica.key \
    /etc/blkrep/ca.pem
sed -n '1,20p' "$work/primary-check" "$work/replica-check"

# --check on the examples moved under a scratch root that has those files.
host="$work/host"
mkdir -p "$host/etc/blkrep" "$host/var/lib/libvirt/images" "$host/var/lib/blkrep" "$host/run/blkrep"
"$blkrep" cert ca --dir "$work/pki" >/dev/null
"$blkrep" cert issue --dir "$work/pki" --name primary.dc1.example.com >/dev/null
"$blkrep" cert issue --dir "$work/pki" --name replica.dc2.example.com >/dev/null
cp "$work/pki/ca.pem" "$host/etc/blkrep/ca.pem"
cp "$work/pki/primary.dc1.example.com.pem" "$host/etc/blkrep/primary.pem"
cp "$work/pki/primary.dc1.example.com.key" "$host/etc/blkrep/primary.key"
cp "$work/pki/replica.dc2.example.com.pem" "$host/etc/blkrep/replica.pem"
cp "$work/pki/replica.dc2.example.com.key" "$host/etc/blkrep/replica.key"
truncate -s 64M "$host/var/lib/libvirt/images/vm1-disk0.raw"
moved() { sed -e "s#\"/etc/blkrep/#\"$host/etc/blkrep/#g" -e "s#\"/var/lib/#\"$host/var/lib/#g" \
    -e "s#\"/run/blkrep/#\"$host/run/blkrep/#g" "$1"; }
moved "$root/etc/blkrep/primary.toml" >"$host/etc/blkrep/primary.toml"
moved "$root/etc/blkrep/replica.toml" >"$host/etc/blkrep/replica.toml"
check "the examples name no path outside the moved directories" \
    bash -c '! grep -E "^[^#]*\"/(etc|var|run)/" "$1" "$2"' _ "$host/etc/blkrep/primary.toml" "$host/etc/blkrep/replica.toml"
check "primary --check passes on the example once its files exist" \
    bash -c 'out=$("$1" primary --check --config "$2" 2>&1); echo "$out"; grep -q "^Configuration is valid: 1 group" <<<"$out"' \
    _ "$blkrep" "$host/etc/blkrep/primary.toml"
check "replica run --check passes on the example once its certificates exist" \
    bash -c 'out=$("$1" replica run --check --config "$2" 2>&1); echo "$out"; grep -q "^Configuration is valid: 1 authorization entry" <<<"$out"' \
    _ "$blkrep" "$host/etc/blkrep/replica.toml"

finish
