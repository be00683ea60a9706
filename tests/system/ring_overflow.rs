//! What the log ring's size must never change: a client write up to the advertised
//! maximum block size succeeds whatever the ring size, and filling the ring
//! between cycles degrades tracking (bitmap + resync) without losing a write, so
//! the next close still brings the copy up to date.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::process::Command;

use testkit::{
    assert_files_equal, read_range, require_tool, run, run_ok, DiskSpec, GroupSpec, Primary, Spec,
    LONG, MIB, SHORT,
};

fn max_block_size(uri: &str) -> u64 {
    let o = run_ok(Command::new("nbdinfo").arg("--json").arg(uri), SHORT);
    let v = o.json();
    v["exports"][0]["block_size_maximum"]
        .as_u64()
        .unwrap_or_else(|| panic!("no block_size_maximum\n{}", o.report()))
}

fn large_writes(ring_size: &str) {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 64 * MIB)],
    )
    .ring_size(ring_size)]));
    let uri = p.uri("disk0");
    let max = max_block_size(&uri);
    assert!(max >= MIB, "advertised maximum block size {max}");
    let mut failures = Vec::new();
    let mut len = MIB;
    let mut pattern = 0x20u8;
    while len <= max && len <= 32 * MIB {
        pattern += 1;
        let o = run(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 {len}")])
                .arg(&uri),
            LONG,
        );
        if !o.success() || o.all().contains("failed") {
            failures.push(format!(
                "write of {len} bytes (advertised maximum {max}, ring {ring_size}): {}",
                o.all().trim()
            ));
        } else {
            let v = read_range(&p.image("disk0"), 0, len as usize);
            assert!(
                v.iter().all(|&b| b == pattern),
                "image after a {len}-byte write"
            );
        }
        len *= 2;
    }
    p.cycles_close("vm1");
    assert_files_equal(
        &p.copy_image("vm1", "disk0"),
        &p.image("disk0"),
        "copy after large writes",
    );
    assert!(
        failures.is_empty(),
        "writes within the advertised maximum block size failed:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn writes_up_to_the_advertised_maximum_succeed_with_the_default_ring() {
    large_writes("64MiB");
}

#[test]
fn writes_up_to_the_advertised_maximum_succeed_with_a_small_ring() {
    large_writes("8MiB");
}

#[test]
fn filling_the_ring_degrades_to_bitmap_without_losing_writes() {
    require_tool("qemu-io");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 32 * MIB)],
    )
    .ring_size("4MiB")]));
    // 12 MiB in 64 KiB writes into a 4 MiB ring with no cycle closed.
    let cmds: Vec<String> = (0..192)
        .map(|j| format!("write -P {} {} 64k", j % 250 + 1, j * 65536))
        .collect();
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in &cmds {
        c.args(["-c", x]);
    }
    let o = run(c.arg(p.uri("disk0")), LONG);
    assert!(
        o.success() && !o.all().contains("failed"),
        "writes failed while the ring overflowed\n{}",
        o.report()
    );
    let g = p.group_status("vm1");
    assert_eq!(
        g["resync_required"], true,
        "ring overflowed but no resync required: {g}"
    );
    assert!(
        g["resync_reason"].as_str().is_some_and(|r| !r.is_empty()),
        "no resync_reason: {g}"
    );
    assert_ne!(
        g["tracking"], "logging",
        "still logging after the ring overflowed: {g}"
    );
    let dirty = p.disk_status("vm1", "disk0")["dirty_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        dirty >= 12 * MIB,
        "dirty_bytes {dirty} < the 12 MiB written: {g}"
    );
    p.cycles_close("vm1");
    assert_files_equal(
        &p.copy_image("vm1", "disk0"),
        &p.image("disk0"),
        "copy after a resync",
    );
    let g = p.group_status("vm1");
    assert_eq!(g["resync_required"], false, "resync not finished: {g}");
    assert_eq!(g["tracking"], "logging", "{g}");
    // Logging works again afterwards.
    let o = run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xaa 1M 64k"])
            .arg(p.uri("disk0")),
        LONG,
    );
    assert!(o.success(), "{}", o.report());
    p.cycles_close("vm1");
    assert_files_equal(
        &p.copy_image("vm1", "disk0"),
        &p.image("disk0"),
        "copy after the next cycle",
    );
}
