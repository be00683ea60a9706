#!/usr/bin/env bash
# The main job, end to end on this machine: a primary protecting a disk, a real NBD
# client (qemu-io) writing through it while cycles close every second, each cycle
# applied to a local copy, and the copy verified byte for byte against the image.
#
# Usage: scripts/demo.sh [--keep]    (--keep leaves the work directory for a look)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
keep=0
[[ "${1:-}" == "--keep" ]] && keep=1

"$here/scripts/install-test-deps.sh" >/dev/null
cargo build --release --bin blkrep --manifest-path "$here/Cargo.toml" 2>&1 | tail -1
blkrep="$here/target/release/blkrep"

work=$(mktemp -d /var/tmp/blkrep-demo.XXXXXX)
daemon=""
cleanup() {
    [[ -n "$daemon" ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    if (( keep )); then echo "Work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "== A 256 MiB disk image with some data on it"
qemu-img create -q -f raw "$work/disk0.img" 256M
qemu-io -f raw -c 'write -P 0x11 0 8M' "$work/disk0.img" >/dev/null

cat >"$work/primary.toml" <<TOML
control_socket = "$work/primary.ctl"
[nbd]
unix_socket = "$work/nbd.sock"
[[group]]
name = "vm1"
ring = "$work/vm1.ring"
ring_size = "64MiB"
interval = "1s"
[group.consumer]
type = "local-copy"
dir = "$work/copy"
[[group.disk]]
name = "disk0"
image = "$work/disk0.img"
TOML

echo "== Starting the primary (log: $work/primary.log)"
"$blkrep" primary --config "$work/primary.toml" 2>"$work/primary.log" &
daemon=$!
for _ in $(seq 100); do
    [[ -S "$work/nbd.sock" ]] && "$blkrep" status --config "$work/primary.toml" >/dev/null 2>&1 && break
    sleep 0.1
done
uri="nbd+unix:///disk0?socket=$work/nbd.sock"

echo "== Writing through NBD with qemu-io while cycles close every second"
for round in 1 2 3 4 5; do
    qemu-io -f raw "$uri" \
        -c "write -P 0x$((round * 16 + 2)) $((round * 3))M 1M" \
        -c "write -z $((round * 5 + 20))M 512k" \
        -c "discard $((round))M 64k" \
        -c "write -P 0x5$round -f $((100 + round))M 64k" >/dev/null
    sleep 0.7
done
"$blkrep" cycles close --config "$work/primary.toml" --group vm1 >/dev/null
"$blkrep" status --config "$work/primary.toml"

echo "== Stopping the primary (SIGTERM) and verifying the copy"
kill -TERM "$daemon"
wait "$daemon"
daemon=""
if cmp "$work/disk0.img" "$work/copy/disk0.img"; then
    echo "OK: the copy built from the shipped cycles equals the primary's image byte for byte"
else
    echo "FAILED: the copy differs from the image" >&2
    exit 1
fi
