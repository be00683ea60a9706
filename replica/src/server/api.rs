//! The replica API's requests, parsed and validated before anything runs.
//!
//! [`parse`] is a pure function of a request's method, path and headers: no I/O, no
//! locks, no allocation sized by the peer beyond the path it already sent. It yields a
//! typed [`ApiCall`] whose names are valid path components and whose numbers are in
//! range, or the [`Refusal`] to answer with. Bodies are decoded later, once the call
//! is known to exist, with the limit of its kind; [`check_enable`] judges an
//! enable request's body the same way.
//!
//! The routes (under [`API_PREFIX`], see `wire::api`):
//!
//! | method | path | call |
//! |---|---|---|
//! | GET | `echo` | [`ApiCall::Echo`] |
//! | POST | `replicas` | [`ApiCall::Enable`] |
//! | GET | `replicas/{name}` | [`ReplicaCall::Info`] |
//! | DELETE | `replicas/{name}` | [`ReplicaCall::Remove`] |
//! | POST | `replicas/{name}/failover` | [`ReplicaCall::PlannedFailover`] |
//! | POST | `replicas/{name}/hashes` | [`ReplicaCall::Hashes`] |
//! | POST | `replicas/{name}/transfers` | [`ReplicaCall::Offer`] |
//! | PUT | `replicas/{name}/transfers/{id:hex}/chunks/{index}` | [`ReplicaCall::PutChunk`] |
//! | POST | `replicas/{name}/transfers/{id:hex}/commit` | [`ReplicaCall::Commit`] |

use hyper::{HeaderMap, Method};
use wire::api::{
    valid_name, EnableRequest, ErrorBody, ErrorCode, API_PREFIX, EPOCH_HEADER, FIRST_EPOCH,
    MAX_EPOCH, RELATIONSHIP_HEADER,
};

use crate::store::Claim;

/// A refused request: becomes an error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub ErrorBody);

/// A refusal with `code` and `message`.
pub fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal(ErrorBody {
        code,
        message: message.into(),
    })
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiCall {
    /// A keep-alive echo.
    Echo,
    /// Enable replication (body: `EnableRequest`), at this failover epoch.
    Enable {
        /// The sender's epoch.
        epoch: u64,
    },
    /// A request about the replica `name`.
    Replica {
        /// A valid replica name (see `wire::api::valid_name`).
        name: String,
        /// What about it.
        call: ReplicaCall,
    },
}

/// What a request about one replica asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCall {
    /// Its state.
    Info,
    /// Delete it.
    Remove(Claim),
    /// Fail over to it once the cycle in the body is applied.
    PlannedFailover(Claim),
    /// Hash ranges of a disk (body: `HashRequest`).
    Hashes(Claim),
    /// Offer a transfer (body: `TransferOffer`).
    Offer(Claim),
    /// Store chunks `index`, `index + 1`, ... of transfer `id` (body: their frames,
    /// back to back).
    PutChunk {
        /// Who speaks.
        claim: Claim,
        /// The transfer.
        id: u64,
        /// The chunk.
        index: u32,
    },
    /// Commit transfer `id` (body: `CommitRequest`).
    Commit {
        /// Who speaks.
        claim: Claim,
        /// The transfer.
        id: u64,
    },
}

fn no_endpoint() -> Refusal {
    refuse(ErrorCode::NotFound, "No such endpoint")
}

/// The call a request makes, or why it is refused.
pub fn parse(method: &Method, path: &str, headers: &HeaderMap) -> Result<ApiCall, Refusal> {
    let rest = path.strip_prefix(API_PREFIX).ok_or_else(no_endpoint)?;
    let mut segments = rest.split('/').filter(|s| !s.is_empty());
    // No route has more than six segments: the rest is never collected.
    let mut next = || segments.next();
    let parts = [next(), next(), next(), next(), next(), next(), next()];
    let call = match (method, parts) {
        (&Method::GET, [Some("echo"), None, ..]) => ApiCall::Echo,
        (&Method::POST, [Some("replicas"), None, ..]) => ApiCall::Enable {
            epoch: epoch(headers)?,
        },
        (method, [Some("replicas"), Some(name), tail @ ..]) => {
            if !valid_name(name) {
                return Err(refuse(ErrorCode::BadRequest, "Invalid replica name"));
            }
            let call = match (method, tail) {
                (&Method::GET, [None, ..]) => ReplicaCall::Info,
                (&Method::DELETE, [None, ..]) => ReplicaCall::Remove(claim(headers)?),
                (&Method::POST, [Some("failover"), None, ..]) => {
                    ReplicaCall::PlannedFailover(claim(headers)?)
                }
                (&Method::POST, [Some("hashes"), None, ..]) => ReplicaCall::Hashes(claim(headers)?),
                (&Method::POST, [Some("transfers"), None, ..]) => {
                    ReplicaCall::Offer(claim(headers)?)
                }
                (
                    &Method::PUT,
                    [Some("transfers"), Some(id), Some("chunks"), Some(index), None],
                ) => ReplicaCall::PutChunk {
                    claim: claim(headers)?,
                    id: transfer_id(id)?,
                    index: index
                        .parse()
                        .map_err(|_| refuse(ErrorCode::BadRequest, "Invalid chunk index"))?,
                },
                (&Method::POST, [Some("transfers"), Some(id), Some("commit"), None, ..]) => {
                    ReplicaCall::Commit {
                        claim: claim(headers)?,
                        id: transfer_id(id)?,
                    }
                }
                _ => return Err(no_endpoint()),
            };
            ApiCall::Replica {
                name: (*name).to_string(),
                call,
            }
        }
        _ => return Err(no_endpoint()),
    };
    Ok(call)
}

/// Who the request speaks for: its relationship and failover epoch headers.
fn claim(headers: &HeaderMap) -> Result<Claim, Refusal> {
    let relationship = headers
        .get(RELATIONSHIP_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or_else(|| {
            refuse(
                ErrorCode::BadRequest,
                format!("Missing or invalid {RELATIONSHIP_HEADER} header"),
            )
        })?;
    Ok(Claim {
        relationship,
        epoch: epoch(headers)?,
    })
}

/// The failover epoch the request speaks for; absent means the first.
fn epoch(headers: &HeaderMap) -> Result<u64, Refusal> {
    match headers.get(EPOCH_HEADER) {
        None => Ok(FIRST_EPOCH),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|epoch| (FIRST_EPOCH..=MAX_EPOCH).contains(epoch))
            .ok_or_else(|| {
                refuse(
                    ErrorCode::BadRequest,
                    format!("Invalid {EPOCH_HEADER} header (an epoch from {FIRST_EPOCH} to {MAX_EPOCH})"),
                )
            }),
    }
}

fn transfer_id(text: &str) -> Result<u64, Refusal> {
    u64::from_str_radix(text, 16).map_err(|_| refuse(ErrorCode::BadRequest, "Invalid transfer id"))
}

/// Judges an enable request's body: a valid replica name, one to 65535 disks with
/// valid, distinct names, none larger than `max_disk_size` bytes, and a recovery
/// policy that makes sense.
pub fn check_enable(enable: &EnableRequest, max_disk_size: u64) -> Result<(), Refusal> {
    if !valid_name(&enable.name) {
        return Err(refuse(ErrorCode::BadRequest, "Invalid replica name"));
    }
    if enable.disks.is_empty()
        || enable.disks.len() > usize::from(u16::MAX)
        || enable.disks.iter().any(|d| !valid_name(&d.name))
    {
        return Err(refuse(ErrorCode::BadRequest, "Invalid disk list"));
    }
    let mut names: Vec<&str> = enable.disks.iter().map(|d| d.name.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("Disk name {} appears twice", twice[0]),
        ));
    }
    if let Some(large) = enable.disks.iter().find(|d| d.size > max_disk_size) {
        return Err(refuse(
            ErrorCode::InsufficientStorage,
            format!(
                "Disk {} has {} bytes; this replica server takes disks of at most {max_disk_size} bytes",
                large.name, large.size
            ),
        ));
    }
    if let Some(problem) = enable.recovery.and_then(|policy| policy.problem()) {
        return Err(refuse(ErrorCode::BadRequest, problem));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use proptest::prelude::*;
    use wire::api::DiskInfo;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn owner() -> HeaderMap {
        headers(&[(RELATIONSHIP_HEADER, "abc"), (EPOCH_HEADER, "2")])
    }

    const CLAIM: Claim = Claim {
        relationship: 0xabc,
        epoch: 2,
    };

    #[test]
    fn every_route_parses_to_its_call() {
        let path = |tail: &str| format!("{API_PREFIX}/{tail}");
        let replica = |call| ApiCall::Replica {
            name: "vm1".into(),
            call,
        };
        let cases = [
            (Method::GET, path("echo"), ApiCall::Echo),
            (Method::POST, path("replicas"), ApiCall::Enable { epoch: 2 }),
            (
                Method::GET,
                path("replicas/vm1"),
                replica(ReplicaCall::Info),
            ),
            (
                Method::DELETE,
                path("replicas/vm1/"),
                replica(ReplicaCall::Remove(CLAIM)),
            ),
            (
                Method::POST,
                path("replicas/vm1/failover"),
                replica(ReplicaCall::PlannedFailover(CLAIM)),
            ),
            (
                Method::POST,
                path("replicas/vm1/hashes"),
                replica(ReplicaCall::Hashes(CLAIM)),
            ),
            (
                Method::POST,
                path("replicas/vm1/transfers"),
                replica(ReplicaCall::Offer(CLAIM)),
            ),
            (
                Method::PUT,
                path("replicas/vm1/transfers/ff/chunks/7"),
                replica(ReplicaCall::PutChunk {
                    claim: CLAIM,
                    id: 0xff,
                    index: 7,
                }),
            ),
            (
                Method::POST,
                path("replicas/vm1/transfers/10/commit"),
                replica(ReplicaCall::Commit {
                    claim: CLAIM,
                    id: 0x10,
                }),
            ),
        ];
        for (method, path, call) in cases {
            assert_eq!(parse(&method, &path, &owner()), Ok(call), "{method} {path}");
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let code = |method: Method, path: &str, headers: &HeaderMap| {
            parse(&method, &format!("{API_PREFIX}/{path}"), headers)
                .unwrap_err()
                .0
                .code
        };
        assert_eq!(code(Method::GET, "nothing", &owner()), ErrorCode::NotFound);
        assert_eq!(
            code(Method::PUT, "replicas/vm1", &owner()),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(
                Method::GET,
                "replicas/vm1/transfers/1/chunks/1/more",
                &owner()
            ),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(Method::GET, "replicas/..", &owner()),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Method::DELETE, "replicas/vm1", &HeaderMap::new()),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Method::PUT, "replicas/vm1/transfers/xyz/chunks/1", &owner()),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Method::PUT, "replicas/vm1/transfers/1/chunks/-1", &owner()),
            ErrorCode::BadRequest
        );
        assert!(parse(&Method::GET, "/other/echo", &owner()).is_err());
    }

    #[test]
    fn epochs_beyond_the_last_are_refused() {
        let enable = |epoch: &str| {
            parse(
                &Method::POST,
                &format!("{API_PREFIX}/replicas"),
                &headers(&[(EPOCH_HEADER, epoch)]),
            )
        };
        assert_eq!(
            enable(&MAX_EPOCH.to_string()),
            Ok(ApiCall::Enable { epoch: MAX_EPOCH })
        );
        for bad in [
            u64::MAX.to_string(),
            (MAX_EPOCH + 1).to_string(),
            "0".into(),
            "-1".into(),
        ] {
            assert_eq!(
                enable(&bad).unwrap_err().0.code,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
        assert_eq!(
            parse(
                &Method::POST,
                &format!("{API_PREFIX}/replicas"),
                &HeaderMap::new()
            ),
            Ok(ApiCall::Enable { epoch: FIRST_EPOCH })
        );
    }

    fn enable_request(disks: &[(&str, u64)]) -> EnableRequest {
        EnableRequest {
            name: "vm1".into(),
            disks: disks
                .iter()
                .map(|(name, size)| DiskInfo {
                    name: (*name).into(),
                    size: *size,
                })
                .collect(),
            primary_host: "host1".into(),
            relationship: 1,
            initial: wire::api::InitialMethod::Network,
            recovery: None,
        }
    }

    #[test]
    fn an_enable_body_needs_distinct_disk_names_and_sizes_within_the_limit() {
        assert!(check_enable(&enable_request(&[("a", 10), ("b", 10)]), 10).is_ok());
        let twice = check_enable(&enable_request(&[("a", 1), ("b", 1), ("a", 1)]), 10).unwrap_err();
        assert_eq!(twice.0.code, ErrorCode::BadRequest);
        assert!(twice.0.message.contains("appears twice"), "{twice:?}");
        let large = check_enable(&enable_request(&[("a", 11)]), 10).unwrap_err();
        assert_eq!(large.0.code, ErrorCode::InsufficientStorage);
        assert_eq!(
            check_enable(&enable_request(&[]), 10).unwrap_err().0.code,
            ErrorCode::BadRequest
        );
    }

    proptest! {
        /// Any method, path and headers: parsing never panics, and a call it yields
        /// names a valid replica and an epoch in range.
        #[test]
        fn parsing_anything_yields_a_valid_call_or_a_refusal(
            method in prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH]),
            segments in prop::collection::vec("[a-z0-9./-]{0,12}|replicas|transfers|chunks|commit|vm1", 0..9),
            relationship in "[0-9a-fA-F]{0,20}",
            epoch in "[0-9]{0,22}",
        ) {
            let path = format!("{API_PREFIX}/{}", segments.join("/"));
            let mut map = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&relationship) {
                map.insert(RELATIONSHIP_HEADER, value);
            }
            if let Ok(value) = HeaderValue::from_str(&epoch) {
                map.insert(EPOCH_HEADER, value);
            }
            match parse(&method, &path, &map) {
                Ok(ApiCall::Replica { name, call }) => {
                    prop_assert!(valid_name(&name));
                    let claim = match call {
                        ReplicaCall::Info => None,
                        ReplicaCall::Remove(c) | ReplicaCall::PlannedFailover(c) | ReplicaCall::Hashes(c)
                        | ReplicaCall::Offer(c) | ReplicaCall::PutChunk { claim: c, .. }
                        | ReplicaCall::Commit { claim: c, .. } => Some(c),
                    };
                    if let Some(claim) = claim {
                        prop_assert!((FIRST_EPOCH..=MAX_EPOCH).contains(&claim.epoch));
                    }
                }
                Ok(ApiCall::Enable { epoch }) => prop_assert!((FIRST_EPOCH..=MAX_EPOCH).contains(&epoch)),
                Ok(ApiCall::Echo) | Err(_) => {}
            }
        }
    }
}
