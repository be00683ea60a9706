//! Compression end to end: compressible data written through NBD crosses to a real
//! replica daemon compressed with the group's codec (zstd by default, which the
//! replica announces it decodes; DEFLATE when configured), and the replica's disk
//! ends equal to the primary's image.
#![allow(clippy::cast_possible_truncation)]

use testkit::replica::{PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

use crate::replication::lab;

/// `len` bytes of which every 4 KiB holds 2 KiB of noise and 2 KiB of zeros, as fio's
/// `buffer_compress_percentage=50`: no codec makes it much smaller than half.
fn half_compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut data = pseudo_random(seed, len);
    for block in data.chunks_mut(4096) {
        block[2048..].fill(0);
    }
    data
}

fn number(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key}: {value:#}"))
}

#[test]
fn compressible_data_crosses_as_zstd_by_default_and_as_deflate_when_configured() {
    let (_dir, certs, replica) = lab();
    let url = replica.url(REPLICA_HOST);
    let group = |name: &str, disk: &str, extra: &str| {
        GroupSpec::new(name, vec![DiskSpec::new(disk, 16 * MIB)])
            .consumer(Consumer::Raw(certs.consumer(&url, PRIMARY_HOST, extra)))
            .ring_size("64MiB")
    };
    let p = Primary::start(Spec::new(vec![
        group("vm1", "disk0", "compression = \"on\""),
        group(
            "vm2",
            "disk1",
            "compression = \"on\"\ncompression_codec = \"deflate\"",
        ),
    ]));
    let written = 8 * MIB;
    for (seed, (name, disk, codec, said)) in [
        ("vm1", "disk0", "zstd", "compression: on, zstd level"),
        (
            "vm2",
            "disk1",
            "deflate",
            "compression: on, DEFLATE level 1",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // The initial replication of the empty thin disk.
        let cycle = p.cycles_close(name);
        replica.wait_applied(name, cycle, LONG);
        let before = p.group_status(name)["consumer"].clone();
        let data = half_compressible(written as usize, seed as u64 + 7);
        let mut conn = nbd::Conn::connect_unix(&p.nbd_sock(), disk).expect("connect");
        for (index, piece) in data.chunks(MIB as usize).enumerate() {
            conn.write(MIB + index as u64 * MIB, piece, false)
                .expect("write");
        }
        conn.flush().expect("flush");
        conn.disconnect();
        let cycle = p.cycles_close(name);
        replica.wait_applied(name, cycle, LONG);
        assert_files_equal(&p.image(disk), &replica.disk("dc1", name, disk), disk);

        let after = p.group_status(name)["consumer"].clone();
        assert_eq!(after["compression"]["codec"], codec, "{after:#}");
        assert_eq!(after["compression"]["zstd_not_decoded"], false, "{after:#}");
        let delivered = number(&after, "bytes_delivered") - number(&before, "bytes_delivered");
        let sent = number(&after, "network_bytes") - number(&before, "network_bytes");
        assert!(delivered >= written, "{delivered} bytes delivered");
        // Half of every block is noise: compressed is about half, never much less.
        let per_mille = sent * 1000 / delivered;
        assert!(
            (450..600).contains(&per_mille),
            "{codec}: {sent} bytes sent for {delivered} delivered"
        );
        let text = run_ok(
            std::process::Command::new(bin())
                .args(["status", "--config"])
                .arg(p.config()),
            SHORT,
        );
        assert!(text.stdout.contains(said), "{said}:\n{}", text.stdout);
    }
}
