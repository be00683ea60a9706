#!/usr/bin/env bash
# The main job, end to end on this machine: a primary and a replica server on
# loopback with mutual TLS (certificates from `blkrep cert`), a real NBD client
# (qemu-io) writing through the primary while cycles ship every second, and the
# replica's disk verified byte for byte against the primary's image.
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
primary=""
replica=""
cleanup() {
    [[ -n "$primary" ]] && kill "$primary" 2>/dev/null && wait "$primary" 2>/dev/null
    [[ -n "$replica" ]] && kill "$replica" 2>/dev/null && wait "$replica" 2>/dev/null
    if (( keep )); then echo "Work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

echo "== A lab CA, a certificate for the replica server and one for the primary"
"$blkrep" cert ca --dir "$work/pki" >/dev/null
"$blkrep" cert issue --dir "$work/pki" --name localhost >/dev/null
"$blkrep" cert issue --dir "$work/pki" --name primary.dc1.lab >/dev/null

echo "== The replica server on 127.0.0.1:$port (log: $work/replica.log)"
cat >"$work/replica.toml" <<TOML
listen = "127.0.0.1:$port"
control_socket = "$work/replica.ctl"
reserve = "64MiB"
[tls]
cert = "$work/pki/localhost.pem"
key = "$work/pki/localhost.key"
ca = "$work/pki/ca.pem"
[nbd]
unix_socket = "$work/replica-nbd.sock"
[[authorization]]
primary = "*.dc1.lab"
storage = "$work/replicas"
trust_group = "dc1"
TOML
"$blkrep" replica run --config "$work/replica.toml" 2>"$work/replica.log" &
replica=$!
for _ in $(seq 100); do
    "$blkrep" replica status --config "$work/replica.toml" >/dev/null 2>&1 && break
    sleep 0.1
done

echo "== A 256 MiB disk image with some data on it, protected by the primary"
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
type = "replica"
url = "https://localhost:$port"
ca = "$work/pki/ca.pem"
cert = "$work/pki/primary.dc1.lab.pem"
key = "$work/pki/primary.dc1.lab.key"
[[group.disk]]
name = "disk0"
image = "$work/disk0.img"
TOML
"$blkrep" primary --config "$work/primary.toml" 2>"$work/primary.log" &
primary=$!
for _ in $(seq 100); do
    [[ -S "$work/nbd.sock" ]] && "$blkrep" status --config "$work/primary.toml" >/dev/null 2>&1 && break
    sleep 0.1
done
uri="nbd+unix:///disk0?socket=$work/nbd.sock"

echo "== Initial replication (only the allocated 8 MiB travel)"
timeout 120 "$blkrep" replication --config "$work/primary.toml" status --group vm1 --watch

echo "== Writing through NBD with qemu-io while cycles ship every second"
for round in 1 2 3 4 5; do
    qemu-io -f raw "$uri" \
        -c "write -P 0x$((round * 16 + 2)) $((round * 3))M 1M" \
        -c "write -z $((round * 5 + 20))M 512k" \
        -c "discard $((round))M 64k" \
        -c "write -P 0x5$round -f $((100 + round))M 64k" >/dev/null
    sleep 0.7
done
cycle=$("$blkrep" cycles close --config "$work/primary.toml" --group vm1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["cycle"])')
"$blkrep" status --config "$work/primary.toml"

echo "== Waiting for the replica to apply cycle $cycle"
for _ in $(seq 300); do
    applied=$("$blkrep" replica status --config "$work/replica.toml" --json |
        python3 -c 'import json,sys; r=[x for x in json.load(sys.stdin) if x["name"]=="vm1"]; print(r[0]["last_applied_cycle"] if r and r[0]["pending_transfers"]==0 and r[0]["last_applied_cycle"] is not None else -1)')
    (( applied >= cycle )) && break
    sleep 0.1
done
"$blkrep" replica status --config "$work/replica.toml"

echo "== Stopping both daemons (SIGTERM) and verifying the replica"
kill -TERM "$primary"; wait "$primary"; primary=""
kill -TERM "$replica"; wait "$replica"; replica=""
if cmp "$work/disk0.img" "$work/replicas/vm1/disks/disk0.img"; then
    echo "OK: the replica's disk equals the primary's image byte for byte"
else
    echo "FAILED: the replica differs from the primary's image" >&2
    exit 1
fi
