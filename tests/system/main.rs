//! blkrep's whole-system tests, in one test binary: real `blkrep primary` and `blkrep
//! replica` daemons as separate processes, real NBD clients, real faults, driven
//! through the harness crate `testkit`. One module per area; run one area with
//! `cargo test --test system replication_faults::`.
//!
//! The soak run (`soak::soak`) is ignored: `scripts/soak.sh --minutes N` runs it.

mod admin_extras;
mod app_consistent;
mod cli;
mod compression;
mod conformance_clients;
mod crash_recovery;
mod cycle_consistency;
mod dashboard;
mod failover;
mod fault_proxy_selftest;
mod guest_boot;
mod libnbd_conformance;
mod libvirt;
mod live_group;
mod nbd_tls;
mod packaging;
mod power_loss;
mod reload;
mod replica_hostile_clients;
mod replication;
mod replication_faults;
mod replication_live;
mod ring_full;
mod ring_overflow;
mod soak;
mod socket_activation;
mod test_failover;

/// The harness, a library, finds the binary under test at run time; it must be the
/// one cargo built for these tests.
#[test]
fn the_harness_runs_the_blkrep_binary_cargo_built() {
    let canonical = |path: &std::path::Path| {
        std::fs::canonicalize(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    assert_eq!(
        canonical(testkit::bin()),
        canonical(std::path::Path::new(env!("CARGO_BIN_EXE_blkrep")))
    );
}
