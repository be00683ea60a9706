//! The JSON both sides read from the other (request and answer bodies of the replica
//! API) and the manifest of an export read from external media: decoding arbitrary
//! bytes never panics, and every name that decodes is judged by `valid_name` before
//! it could become a path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::api::{
    valid_name, CommitRequest, EnableRequest, ErrorBody, FailoverRequest, HashAnswer,
    HashRequest, ReplicaInfo, TransferAnswer, TransferOffer,
};
use wire::media::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(enable) = serde_json::from_slice::<EnableRequest>(data) {
        // A recovery policy a primary asks for is judged before it is kept.
        let _ = enable.recovery.map(|policy| policy.problem());
        let _ = valid_name(&enable.name);
        for disk in &enable.disks {
            let _ = valid_name(&disk.name);
        }
    }
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        let _ = valid_name(&manifest.name);
        let _: u64 = manifest.transfers.iter().map(|t| t.bytes).fold(0, u64::saturating_add);
    }
    if let Ok(hashes) = serde_json::from_slice::<HashRequest>(data) {
        let _: u64 = hashes
            .ranges
            .iter()
            .map(|r| r.offset.saturating_add(r.length))
            .fold(0, u64::max);
    }
    let _ = serde_json::from_slice::<TransferOffer>(data);
    let _ = serde_json::from_slice::<CommitRequest>(data);
    let _ = serde_json::from_slice::<FailoverRequest>(data);
    let _ = serde_json::from_slice::<TransferAnswer>(data);
    let _ = serde_json::from_slice::<ReplicaInfo>(data);
    let _ = serde_json::from_slice::<HashAnswer>(data);
    let _ = serde_json::from_slice::<ErrorBody>(data);
});
