//! blkrep: asynchronous disaster-recovery replication of virtual disks.
fn main() {}
