//! The replica server over real TLS sockets, with clients holding certificates from the
//! lab CA, from another CA, and names no authorisation entry allows; and in lab mode
//! (plain HTTP with a pre-shared key).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab_ca::{create_ca, issue_host, PemPair};
use replica::server::{
    AuthEntry, PreSharedKey, ReplicaServer, ReplicaServerError, ServerSettings, Transport,
    DEFAULT_MAX_DISK_SIZE,
};
use replica::store::Replica;
use tracker::{Change, ChangeData};
use wire::api::*;
use wire::chunk::{BodyCodec, ChunkEncoder, Codec, RawChunk, MAX_CHUNK_RAW, RECORD_HEADER_LEN};
use wire::tls::{client_config, server_config, NamePattern, TlsFiles};

const MIB: u64 = 1 << 20;

fn write_pair(dir: &Path, name: &str, pair: &PemPair) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &pair.cert).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    (cert, key)
}

struct Lab {
    dir: tempfile::TempDir,
    ca: PemPair,
    ca_path: PathBuf,
    server: ReplicaServer,
}

/// Lab mode's key of dc1's entry.
const PSK: &str = "lab-key-0123456789abcdef";
/// Lab mode's key of dc2's entry.
const PSK2: &str = "dc2-key-0123456789abcdef";

fn url(scheme: &str, server: &ReplicaServer, path: &str) -> String {
    format!(
        "{scheme}://127.0.0.1:{}/v1{path}",
        server.local_addr().port()
    )
}

/// Two tenants: dc1 and dc2, each with its storage under `dir`.
fn settings(dir: &Path, transport: Transport) -> ServerSettings {
    let entry = |pattern: &str, storage: &str, group: &str, key: &str| AuthEntry {
        primary: Some(NamePattern::parse(pattern).unwrap()),
        storage: dir.join(storage),
        trust_group: group.into(),
        quota: None,
        psk: PreSharedKey::new(key.into()),
    };
    ServerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        transport,
        authorization: vec![
            entry("*.dc1.example.com", "store1", "dc1", PSK),
            entry("*.dc2.example.com", "store2", "dc2", PSK2),
        ],
        reserve: 0,
        max_disk_size: DEFAULT_MAX_DISK_SIZE,
        limits: replica::limits::Limits::default(),
    }
}

impl Lab {
    fn start() -> Lab {
        Lab::start_with(tempfile::tempdir().unwrap(), |_| {})
    }

    /// A lab whose settings `adjust` changes first.
    fn start_with(dir: tempfile::TempDir, adjust: impl FnOnce(&mut ServerSettings)) -> Lab {
        let ca = create_ca("test CA").unwrap();
        let ca_path = write_pair(dir.path(), "ca", &ca).0;
        let host = issue_host(&ca, &["replica.example.com".into(), "127.0.0.1".into()]).unwrap();
        let (cert, key) = write_pair(dir.path(), "replica", &host);
        let tls = server_config(&TlsFiles {
            cert,
            key,
            ca: ca_path.clone(),
        })
        .unwrap();
        let mut settings = settings(dir.path(), Transport::Tls(tls));
        adjust(&mut settings);
        let server = ReplicaServer::start(settings).unwrap();
        Lab {
            dir,
            ca,
            ca_path,
            server,
        }
    }

    fn url(&self, path: &str) -> String {
        url("https", &self.server, path)
    }

    /// A client with a certificate for `name` from `ca` (the lab's by default).
    fn client(&self, name: &str, ca: Option<&PemPair>) -> ureq::Agent {
        let pair = issue_host(ca.unwrap_or(&self.ca), &[name.into()]).unwrap();
        let (cert, key) = write_pair(self.dir.path(), name, &pair);
        let tls = client_config(&TlsFiles {
            cert,
            key,
            ca: self.ca_path.clone(),
        })
        .unwrap();
        ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout(Duration::from_secs(20))
            .build()
    }
}

fn status_of(result: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match result {
        Ok(response) => (response.status(), response.into_string().unwrap()),
        Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap()),
        Err(other) => (0, other.to_string()),
    }
}

fn enable_request(name: &str) -> EnableRequest {
    EnableRequest {
        name: name.into(),
        disks: vec![DiskInfo {
            name: "disk0".into(),
            size: 4 * MIB,
        }],
        primary_host: "host1".into(),
        relationship: 0xabc,
        initial: InitialMethod::Network,
        recovery: None,
    }
}

fn enable(lab: &Lab, agent: &ureq::Agent, name: &str) -> (u16, String) {
    status_of(
        agent
            .post(&lab.url("/replicas"))
            .send_json(enable_request(name)),
    )
}

fn send_transfer(
    lab: &Lab,
    agent: &ureq::Agent,
    id: u64,
    kind: TransferKind,
    changes: &[Change<'_>],
) {
    send_transfer_to(lab, agent, "vm1", id, kind, changes);
}

/// The record bytes `changes` make at most, as the shipper offers them.
fn offered_bytes(changes: &[Change<'_>]) -> u64 {
    let data: u64 = changes.iter().map(|c| c.length).sum();
    let headers = changes.len() as u64 + data / u64::from(MAX_CHUNK_RAW) + 1;
    data + headers * RECORD_HEADER_LEN as u64
}

/// Chunk frames carrying `changes` as transfer `id`, zstd-compressed where that pays.
fn frames_of(id: u64, changes: &[Change<'_>]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut encoder = ChunkEncoder::new(id);
    let mut emit = |raw: RawChunk<'_>| -> Result<(), ()> {
        let mut frame = Vec::new();
        raw.frame_into(Some(Codec::Zstd { level: 3 }), &mut frame);
        frames.push(frame);
        Ok(())
    };
    for change in changes {
        encoder.push(change, &mut emit).unwrap();
    }
    encoder.finish(&mut emit).unwrap();
    frames
}

/// Offers, uploads and commits transfer `id` of `changes` to replica `name`.
/// Transfer `id` to replica `name`: a resync of one batch (resync `epoch`) that
/// writes all of `disk` with `data`.
fn send_whole_disk(
    lab: &Lab,
    agent: &ureq::Agent,
    name: &str,
    id: u64,
    epoch: u64,
    disk: usize,
    data: &[u8],
) {
    let resync = TransferKind::Resync {
        epoch,
        batch: 0,
        last: true,
    };
    let whole = Change {
        disk,
        offset: 0,
        length: data.len() as u64,
        data: ChangeData::Write(data),
    };
    send_transfer_to(lab, agent, name, id, resync, &[whole]);
}

fn send_transfer_to(
    lab: &Lab,
    agent: &ureq::Agent,
    name: &str,
    id: u64,
    kind: TransferKind,
    changes: &[Change<'_>],
) {
    let offer = TransferOffer {
        id,
        kind,
        bytes: offered_bytes(changes),
    };
    let answer: TransferAnswer = agent
        .post(&lab.url(&format!("/replicas/{name}/transfers")))
        .set(RELATIONSHIP_HEADER, "abc")
        .send_json(offer)
        .unwrap()
        .into_json()
        .unwrap();
    assert!(!answer.committed);
    // The server announces zstd, which these frames use.
    assert!(answer.decodes(BodyCodec::Zstd), "{answer:?}");
    let frames = frames_of(id, changes);
    for (index, frame) in frames.iter().enumerate() {
        agent
            .put(&lab.url(&format!("/replicas/{name}/transfers/{id:x}/chunks/{index}")))
            .set(RELATIONSHIP_HEADER, "abc")
            .send_bytes(frame)
            .unwrap();
    }
    agent
        .post(&lab.url(&format!("/replicas/{name}/transfers/{id:x}/commit")))
        .set(RELATIONSHIP_HEADER, "abc")
        .send_json(CommitRequest {
            chunks: frames.len() as u32,
        })
        .unwrap();
}

#[test]
fn an_authorised_primary_replicates_and_tenants_stay_apart() {
    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    assert_eq!(enable(&lab, &dc1, "vm1").0, 201);
    assert_eq!(
        enable(&lab, &dc1, "vm1").0,
        200,
        "enabling again is idempotent"
    );

    let data = vec![0x42u8; 3 * MIB as usize];
    let resync = TransferKind::Resync {
        epoch: 1,
        batch: 0,
        last: true,
    };
    send_transfer(
        &lab,
        &dc1,
        1,
        resync,
        &[Change {
            disk: 0,
            offset: 0,
            length: data.len() as u64,
            data: ChangeData::Write(&data),
        }],
    );
    send_transfer(
        &lab,
        &dc1,
        2,
        TransferKind::delta(7),
        &[Change {
            disk: 0,
            offset: MIB,
            length: 5,
            data: ChangeData::Write(b"hello"),
        }],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info: ReplicaInfo = dc1
            .get(&lab.url("/replicas/vm1"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if info.consistent && info.last_applied_cycle == Some(7) {
            break info;
        }
        assert!(Instant::now() < deadline, "not applied: {info:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(info.trust_group, "dc1");
    let disk = std::fs::read(lab.dir.path().join("store1/vm1/disks/disk0.img")).unwrap();
    assert_eq!(disk.len() as u64, 4 * MIB);
    assert_eq!(&disk[MIB as usize..MIB as usize + 5], b"hello");
    assert!(disk[..MIB as usize].iter().all(|&b| b == 0x42));

    // Another tenant sees nothing of dc1's replica, and gets its own.
    let dc2 = lab.client("host9.dc2.example.com", None);
    assert_eq!(status_of(dc2.get(&lab.url("/replicas/vm1")).call()).0, 404);
    assert_eq!(enable(&lab, &dc2, "vm1").0, 201);
    assert!(lab.dir.path().join("store2/vm1/replica.json").exists());

    // A gap in the chain is refused as such.
    let (code, body) = status_of(
        dc1.post(&lab.url("/replicas/vm1/transfers"))
            .set(RELATIONSHIP_HEADER, "abc")
            .send_json(TransferOffer {
                id: 3,
                kind: TransferKind::delta(9),
                bytes: 1,
            }),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("chain_broken"), "{body}");
    assert_eq!(lab.server.replicas().len(), 2);
}

#[test]
fn strangers_are_refused() {
    let lab = Lab::start();
    // Signed by the lab CA but no entry allows the name.
    let other = lab.client("host1.elsewhere.example.com", None);
    let (code, body) = enable(&lab, &other, "vm1");
    assert_eq!(code, 403, "{body}");
    // Signed by another CA: the handshake fails.
    let rogue_ca = create_ca("rogue").unwrap();
    let rogue = lab.client("host1.dc1.example.com", Some(&rogue_ca));
    let (code, message) = enable(&lab, &rogue, "vm1");
    assert_eq!(code, 0, "transport error expected, got {code}: {message}");
    // Names that are not one safe path component.
    let dc1 = lab.client("host1.dc1.example.com", None);
    for bad in ["..", ".hidden", "a%2Fb"] {
        let (code, _) = status_of(dc1.get(&lab.url(&format!("/replicas/{bad}"))).call());
        assert!(code == 400 || code == 404, "{bad}: {code}");
    }
    let (code, _) = enable(&lab, &dc1, "../escape");
    assert_eq!(code, 400);
    assert!(!lab.dir.path().join("escape").exists());
    // Without a client certificate at all.
    let bare = ureq::AgentBuilder::new()
        .tls_config(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                for cert in wire::tls::load_certs(&lab.ca_path, "CA").unwrap() {
                    roots.add(cert).unwrap();
                }
                roots
            })
            .with_no_client_auth(),
        ))
        .build();
    assert_eq!(status_of(bare.get(&lab.url("/echo")).call()).0, 0);
}

/// A lab-mode request with the given key and identity headers.
fn plain(request: ureq::Request, psk: Option<&str>, identity: Option<&str>) -> ureq::Request {
    let request = match psk {
        Some(psk) => request.set(PSK_HEADER, psk),
        None => request,
    };
    match identity {
        Some(identity) => request.set(IDENTITY_HEADER, identity),
        None => request,
    }
}

fn error_code(body: &str) -> ErrorCode {
    serde_json::from_str::<ErrorBody>(body).unwrap().code
}

/// A 409 refusal with `expected`'s code and a message that says `hint`.
fn assert_refused(code: u16, body: &str, expected: ErrorCode, hint: &str) {
    assert_eq!(code, 409, "{body}");
    assert_eq!(error_code(body), expected, "{body}");
    assert!(body.contains(hint), "{body}");
}

/// Lab mode: plain HTTP, requests authenticated by [`PSK`].
struct PlainLab {
    dir: tempfile::TempDir,
    server: ReplicaServer,
}

impl PlainLab {
    fn start() -> PlainLab {
        let dir = tempfile::tempdir().unwrap();
        let transport = Transport::PlainWithPsk {
            allow_non_loopback: false,
        };
        let server = ReplicaServer::start(settings(dir.path(), transport)).unwrap();
        PlainLab { dir, server }
    }

    fn url(&self, path: &str) -> String {
        url("http", &self.server, path)
    }
}

#[test]
fn lab_mode_authenticates_each_request_with_the_key() {
    let lab = PlainLab::start();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build();
    let identity = Some("Host1.DC1.example.com");
    let (code, body) = status_of(
        plain(agent.post(&lab.url("/replicas")), Some(PSK), identity)
            .send_json(enable_request("vm1")),
    );
    assert_eq!(code, 201, "{body}");
    let info: ReplicaInfo = plain(agent.get(&lab.url("/replicas/vm1")), Some(PSK), identity)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(
        (info.name.as_str(), info.trust_group.as_str()),
        ("vm1", "dc1")
    );
    assert!(lab.dir.path().join("store1/vm1/replica.json").exists());
    // dc2's own key: dc1's replica does not exist for it.
    let dc2 = Some("host2.dc2.example.com");
    let (code, _) = status_of(plain(agent.get(&lab.url("/replicas/vm1")), Some(PSK2), dc2).call());
    assert_eq!(code, 404);
    // dc1's key cannot speak for a dc2 name: it can neither see nor delete dc2's
    // replica (a single shared key once let it).
    let (code, body) = status_of(
        plain(agent.post(&lab.url("/replicas")), Some(PSK2), dc2).send_json(enable_request("vm9")),
    );
    assert_eq!(code, 201, "{body}");
    for request in [
        agent.get(&lab.url("/replicas/vm9")),
        agent
            .delete(&lab.url("/replicas/vm9"))
            .set(RELATIONSHIP_HEADER, "abc"),
    ] {
        let (code, body) = status_of(plain(request, Some(PSK), dc2).call());
        assert_eq!(code, 401, "{body}");
    }
    assert!(lab.dir.path().join("store2/vm9/replica.json").exists());

    for (psk, identity, expected) in [
        (Some("lab-key-0123456789abcdeF"), identity, 401),
        (Some("lab-key"), identity, 401),
        (Some(""), identity, 401),
        (None, identity, 401),
        (Some(PSK), None, 401),
        (Some(PSK), Some(""), 401),
        (Some(PSK), Some("*.dc1.example.com"), 401),
        (Some(PSK2), identity, 401),
        // Names no entry allows prove nothing, whatever the key.
        (Some(PSK), Some("host1.elsewhere.example.com"), 401),
        (Some(PSK), Some("dc1.example.com"), 401),
    ] {
        let (code, body) = status_of(
            plain(agent.post(&lab.url("/replicas")), psk, identity)
                .send_json(enable_request("vm2")),
        );
        assert_eq!(code, expected, "{psk:?} {identity:?}: {body}");
        let wanted = if expected == 401 {
            ErrorCode::Unauthenticated
        } else {
            ErrorCode::Forbidden
        };
        assert_eq!(error_code(&body), wanted, "{body}");
    }
    // A refused request's unread body stays on the connection: it is not reused.
    match plain(agent.post(&lab.url("/replicas")), None, identity).send_json(enable_request("vm2"))
    {
        Err(ureq::Error::Status(401, response)) => {
            assert_eq!(response.header("connection"), Some("close"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!lab.dir.path().join("store1/vm2").exists());
    assert_eq!(lab.server.replicas().len(), 2);

    // TLS clients get nowhere with a plain-HTTP server.
    let tls_url = url("https", &lab.server, "/echo");
    let (code, _) = status_of(agent.get(&tls_url).call());
    assert_eq!(code, 0);
}

#[test]
fn lab_mode_refuses_short_or_missing_keys_and_other_networks() {
    let dir = tempfile::tempdir().unwrap();
    assert!(PreSharedKey::new("too-short".into()).is_none());
    let lab = Transport::PlainWithPsk {
        allow_non_loopback: false,
    };
    let mut keyless = settings(dir.path(), lab.clone());
    keyless.authorization[1].psk = None;
    let error = ReplicaServer::start(keyless).unwrap_err();
    assert!(
        matches!(error, ReplicaServerError::Authorization(_)),
        "{error}"
    );
    assert!(error.to_string().contains("no psk_file"), "{error}");
    let mut exposed = settings(dir.path(), lab);
    exposed.listen = "0.0.0.0:0".parse().unwrap();
    let error = ReplicaServer::start(exposed).unwrap_err();
    assert!(
        matches!(error, ReplicaServerError::PlainHttpExposed(_)),
        "{error}"
    );
    let printed = format!(
        "{:?}",
        settings(
            dir.path(),
            Transport::PlainWithPsk {
                allow_non_loopback: true
            }
        )
    );
    assert!(!printed.contains(PSK), "{printed}");
}

/// A seeded existing copy is claimed only by an enable that asks for it, with the
/// same disks; hashes describe its contents; deleting needs the relationship.
#[test]
fn existing_copies_are_claimed_hashed_and_deleted_only_by_their_relationship() {
    let lab = Lab::start();
    let agent = lab.client("host1.dc1.example.com", None);
    let image = lab.dir.path().join("backup.img");
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &data).unwrap();
    let existing = |name: &str| EnableRequest {
        initial: InitialMethod::Existing,
        ..enable_request(name)
    };
    // No copy of that name: the admin is told how to place one.
    let (code, body) = status_of(agent.post(&lab.url("/replicas")).send_json(existing("vm1")));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("blkrep replica seed"), "{body}");

    Replica::seed(
        &lab.dir.path().join("store1/vm1"),
        "vm1",
        "dc1",
        &[("disk0".into(), image.clone())],
        false,
    )
    .unwrap();
    // A network enable, other disks, another tenant: refused, nothing claimed.
    let (code, body) = enable(&lab, &agent, "vm1");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("initial_replication"), "{body}");
    let mut bigger = existing("vm1");
    bigger.disks[0].size *= 2;
    let (code, body) = status_of(agent.post(&lab.url("/replicas")).send_json(bigger));
    assert_eq!(code, 409, "{body}");
    let other = lab.client("host1.dc2.example.com", None);
    let (code, _) = status_of(other.post(&lab.url("/replicas")).send_json(existing("vm1")));
    assert_eq!(code, 404, "dc2 cannot see dc1's existing copy");
    // Unclaimed, it answers no hash request.
    let ask = HashRequest {
        disk: 0,
        ranges: vec![
            ByteRange {
                offset: 0,
                length: 4 * MIB,
            },
            ByteRange {
                offset: MIB,
                length: 10,
            },
        ],
    };
    let (code, _) = status_of(
        agent
            .post(&lab.url("/replicas/vm1/hashes"))
            .set(RELATIONSHIP_HEADER, "abc")
            .send_json(&ask),
    );
    assert_eq!(code, 409);

    let (code, body) = status_of(agent.post(&lab.url("/replicas")).send_json(existing("vm1")));
    assert_eq!(code, 200, "{body}");
    let answer: HashAnswer = agent
        .post(&lab.url("/replicas/vm1/hashes"))
        .set(RELATIONSHIP_HEADER, "abc")
        .send_json(&ask)
        .unwrap()
        .into_json()
        .unwrap();
    let expected = [
        blake3::hash(&data).to_hex().to_string(),
        blake3::hash(&data[1 << 20..(1 << 20) + 10])
            .to_hex()
            .to_string(),
    ];
    assert_eq!(answer.hashes, expected);
    // Ranges outside the disk are refused before any read.
    let outside = HashRequest {
        disk: 0,
        ranges: vec![ByteRange {
            offset: 4 * MIB,
            length: 1,
        }],
    };
    let (code, _) = status_of(
        agent
            .post(&lab.url("/replicas/vm1/hashes"))
            .set(RELATIONSHIP_HEADER, "abc")
            .send_json(&outside),
    );
    assert_eq!(code, 400);
    // Claimed at the first epoch (no header): a later epoch is not this copy's
    // primary, and an epoch that is not a number is refused before anything else.
    for (epoch, expected) in [("2", 409), ("x", 400), ("0", 400), ("1", 200)] {
        let (code, body) = status_of(
            agent
                .post(&lab.url("/replicas/vm1/hashes"))
                .set(RELATIONSHIP_HEADER, "abc")
                .set(EPOCH_HEADER, epoch)
                .send_json(&ask),
        );
        assert_eq!(code, expected, "epoch {epoch}: {body}");
    }
    // Deleting needs the relationship that owns the replica.
    let (code, _) = status_of(
        agent
            .delete(&lab.url("/replicas/vm1"))
            .set(RELATIONSHIP_HEADER, "abd")
            .call(),
    );
    assert_eq!(code, 409);
    let (code, body) = status_of(
        agent
            .delete(&lab.url("/replicas/vm1"))
            .set(RELATIONSHIP_HEADER, "abc")
            .call(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(!lab.dir.path().join("store1/vm1").exists());
}

/// Waits until replica `name` has applied cycle `cycle`; returns how long that took.
fn wait_applied(lab: &Lab, agent: &ureq::Agent, name: &str, cycle: u64) -> Duration {
    let started = Instant::now();
    loop {
        let info: ReplicaInfo = agent
            .get(&lab.url(&format!("/replicas/{name}")))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if info.consistent && info.last_applied_cycle == Some(cycle) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name} did not apply cycle {cycle}: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The initial copy of a 4 MiB disk filled with `fill`, then cycle 1 writing `tag`
/// at 1 MiB, to replica `name`.
fn replicate(lab: &Lab, agent: &ureq::Agent, name: &str, fill: u8, tag: &[u8]) {
    let data = vec![fill; 4 * MIB as usize];
    send_whole_disk(lab, agent, name, 1, 1, 0, &data);
    let tagged = Change {
        disk: 0,
        offset: MIB,
        length: tag.len() as u64,
        data: ChangeData::Write(tag),
    };
    send_transfer_to(lab, agent, name, 2, TransferKind::delta(1), &[tagged]);
}

/// Deleting a replica and enabling it again with the same name and disks (`remove
/// --delete-replica`, then `enable`) applies into the new replica's disks, not into
/// the deleted files a cache kept open.
#[test]
fn a_replica_deleted_and_enabled_again_is_applied_into_its_new_disks() {
    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    assert_eq!(enable(&lab, &dc1, "vm1").0, 201);
    replicate(&lab, &dc1, "vm1", 0x11, b"first life");
    wait_applied(&lab, &dc1, "vm1", 1);
    let (code, body) = status_of(
        dc1.delete(&lab.url("/replicas/vm1"))
            .set(RELATIONSHIP_HEADER, "abc")
            .call(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(!lab.dir.path().join("store1/vm1").exists());

    assert_eq!(enable(&lab, &dc1, "vm1").0, 201);
    replicate(&lab, &dc1, "vm1", 0x22, b"second life");
    wait_applied(&lab, &dc1, "vm1", 1);
    let disk = std::fs::read(lab.dir.path().join("store1/vm1/disks/disk0.img")).unwrap();
    assert_eq!(&disk[MIB as usize..MIB as usize + 11], b"second life");
    assert!(disk[..MIB as usize].iter().all(|&b| b == 0x22));
}

/// A directory that is not a replica is never taken over nor removed by an enable,
/// and one request names each disk once.
#[test]
fn an_enable_creates_a_fresh_directory_and_removes_only_its_own() {
    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    let foreign = lab.dir.path().join("store1/vm1");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.me"), b"someone's data").unwrap();
    let (code, body) = enable(&lab, &dc1, "vm1");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("is not a replica"), "{body}");
    assert_eq!(
        std::fs::read(foreign.join("keep.me")).unwrap(),
        b"someone's data"
    );

    let mut twice = enable_request("vm2");
    twice.disks.push(twice.disks[0].clone());
    let (code, body) = status_of(dc1.post(&lab.url("/replicas")).send_json(twice));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("appears twice"), "{body}");
    assert!(!lab.dir.path().join("store1/vm2").exists());
}

/// Storage directories inside one another, or one storage for two trust groups, are
/// refused before anything is served: a replica of one tenant could otherwise be
/// another tenant's whole storage.
#[test]
fn overlapping_storages_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let transport = || Transport::PlainWithPsk {
        allow_non_loopback: false,
    };
    let mut nested = settings(dir.path(), transport());
    nested.authorization[1].storage = dir.path().join("store1/dc2");
    let error = ReplicaServer::start(nested).unwrap_err();
    assert!(error.to_string().contains("overlap"), "{error}");
    let mut shared = settings(dir.path(), transport());
    shared.authorization[1].storage = dir.path().join("store1");
    let error = ReplicaServer::start(shared).unwrap_err();
    assert!(error.to_string().contains("share storage"), "{error}");
}

/// Replicas whose apply fails (a disk that cannot be opened) are retried each on its
/// own schedule; another tenant's transfers are applied at once.
#[test]
fn failing_replicas_never_delay_another_tenants_apply() {
    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    for name in ["broken1", "broken2", "broken3"] {
        assert_eq!(enable(&lab, &dc1, name).0, 201);
        // The disk becomes a directory: every apply fails to open it.
        let disk = lab
            .dir
            .path()
            .join(format!("store1/{name}/disks/disk0.img"));
        std::fs::remove_file(&disk).unwrap();
        std::fs::create_dir(&disk).unwrap();
        replicate(&lab, &dc1, name, 0x33, b"never applied");
    }
    // Let the broken replicas fail and start backing off.
    std::thread::sleep(Duration::from_millis(500));
    let dc2 = lab.client("host1.dc2.example.com", None);
    assert_eq!(enable(&lab, &dc2, "vm1").0, 201);
    let healthy = Instant::now();
    replicate(&lab, &dc2, "vm1", 0x44, b"applied");
    let waited = wait_applied(&lab, &dc2, "vm1", 1);
    assert!(
        healthy.elapsed() < Duration::from_secs(3),
        "dc2's transfers took {:?} to be applied ({waited:?} after the commit) behind failing replicas",
        healthy.elapsed()
    );
    // Removing a failing replica removes it for good.
    let (code, body) = status_of(
        dc1.delete(&lab.url("/replicas/broken1"))
            .set(RELATIONSHIP_HEADER, "abc")
            .call(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(!lab.dir.path().join("store1/broken1").exists());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!lab.dir.path().join("store1/broken1").exists());
}

/// The primary's word on sizes is checked: a transfer brings no more than it offered,
/// disks are at most the configured size, and an entry's quota bounds its replicas.
#[test]
fn sizes_a_primary_claims_are_enforced() {
    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    assert_eq!(enable(&lab, &dc1, "vm1").0, 201);
    let offer = TransferOffer {
        id: 1,
        kind: TransferKind::Resync {
            epoch: 1,
            batch: 0,
            last: true,
        },
        bytes: 1,
    };
    let (code, body) = status_of(
        dc1.post(&lab.url("/replicas/vm1/transfers"))
            .set(RELATIONSHIP_HEADER, "abc")
            .send_json(offer),
    );
    assert_eq!(code, 200, "{body}");
    let data = vec![7u8; 40 << 10];
    let frames = frames_of(
        1,
        &[Change {
            disk: 0,
            offset: 0,
            length: data.len() as u64,
            data: ChangeData::Write(&data),
        }],
    );
    let (code, body) = status_of(
        dc1.put(&lab.url("/replicas/vm1/transfers/1/chunks/0"))
            .set(RELATIONSHIP_HEADER, "abc")
            .send_bytes(&frames[0]),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("offered with 1 bytes"), "{body}");
    let part = lab
        .dir
        .path()
        .join("store1/vm1/incoming/0000000000000001.part");
    assert_eq!(std::fs::metadata(part).unwrap().len(), 0);
    drop(lab);

    // A server taking disks of at most 4 MiB, and 6 MiB of disks in dc1's storage.
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start_with(dir, |settings| {
        settings.max_disk_size = 4 * MIB;
        settings.authorization[0].quota = Some(6 * MIB);
    });
    let dc1 = lab.client("host1.dc1.example.com", None);
    let mut large = enable_request("large");
    large.disks[0].size = 4 * MIB + 1;
    let (code, body) = status_of(dc1.post(&lab.url("/replicas")).send_json(large));
    assert_eq!(code, 507, "{body}");
    assert_eq!(enable(&lab, &dc1, "vm1").0, 201);
    let (code, body) = enable(&lab, &dc1, "vm2");
    assert_eq!(code, 507, "{body}");
    assert!(body.contains("quota"), "{body}");
    assert!(!lab.dir.path().join("store1/vm2").exists());
    // Another tenant's storage has no quota.
    let dc2 = lab.client("host1.dc2.example.com", None);
    assert_eq!(enable(&lab, &dc2, "vm2").0, 201);
}

/// Epochs are bounded: a request naming an epoch beyond the last is refused before
/// anything is created.
#[test]
fn epochs_beyond_the_last_are_refused() {
    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    let (code, body) = status_of(
        dc1.post(&lab.url("/replicas"))
            .set(EPOCH_HEADER, &u64::MAX.to_string())
            .send_json(enable_request("vm1")),
    );
    assert_eq!(code, 400, "{body}");
    assert!(!lab.dir.path().join("store1/vm1").exists());
    let (code, body) = status_of(
        dc1.post(&lab.url("/replicas"))
            .set(EPOCH_HEADER, &MAX_EPOCH.to_string())
            .send_json(enable_request("vm1")),
    );
    assert_eq!(code, 201, "{body}");
}

/// `enable_request(name)` with a second disk, `disk1` of `size` bytes, after `disk0`.
fn with_disk1(name: &str, size: u64) -> EnableRequest {
    let mut request = enable_request(name);
    request.disks.push(DiskInfo {
        name: "disk1".into(),
        size,
    });
    request
}

fn enable_with(lab: &Lab, agent: &ureq::Agent, request: &EnableRequest) -> (u16, String) {
    status_of(agent.post(&lab.url("/replicas")).send_json(request))
}

/// A disk added to the group on the primary: its enable, with the replica's disks
/// followed by the new one, adds it (zeroes) and answers for every disk; a resync
/// then copies it and deltas write it; the same enable again changes nothing. A list
/// that does not extend the replica's, or an add under a test failover, is refused.
#[test]
fn an_enable_with_a_disk_appended_adds_it_to_the_replica() {
    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    assert_eq!(enable(&lab, &dc1, "vm1").0, 201);
    replicate(&lab, &dc1, "vm1", 0x11, b"before the add");
    wait_applied(&lab, &dc1, "vm1", 1);
    let disk1 = lab.dir.path().join("store1/vm1/disks/disk1.img");

    // Reordered, or an existing disk resized: refused, naming both lists.
    let mut reordered = with_disk1("vm1", 2 * MIB);
    reordered.disks.swap(0, 1);
    let mut resized = with_disk1("vm1", 2 * MIB);
    resized.disks[0].size += MIB;
    for refused in [reordered, resized] {
        let (code, body) = enable_with(&lab, &dc1, &refused);
        assert_eq!(code, 409, "{body}");
        assert_eq!(error_code(&body), ErrorCode::OtherRelationship, "{body}");
        assert!(
            body.contains("only be added after the existing ones")
                && body.contains("has disks disk0 (4194304 bytes); the primary has"),
            "{body}"
        );
    }
    // Under a test failover: refused until it stops.
    let handle = lab.server.handle();
    let (_, overlays) = handle.start_test("vm1", None, None).unwrap();
    let (code, body) = enable_with(&lab, &dc1, &with_disk1("vm1", 2 * MIB));
    assert_refused(code, &body, ErrorCode::Conflict, "test-failover stop");
    assert!(!disk1.exists());
    drop(overlays);
    handle.stop_test("vm1", None).unwrap();

    let added = with_disk1("vm1", 2 * MIB);
    let (code, body) = enable_with(&lab, &dc1, &added);
    assert_eq!(code, 200, "{body}");
    let info: ReplicaInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(info.disks, added.disks);
    assert!(info.consistent && info.last_applied_cycle == Some(1));
    assert_eq!(std::fs::metadata(&disk1).unwrap().len(), 2 * MIB);

    // The resync copies the new disk whole; a delta writes both disks.
    let copy = vec![0x77u8; 2 * MIB as usize];
    send_whole_disk(&lab, &dc1, "vm1", 3, 2, 1, &copy);
    let delta = [
        Change {
            disk: 1,
            offset: MIB,
            length: 5,
            data: ChangeData::Write(b"added"),
        },
        Change {
            disk: 0,
            offset: 0,
            length: 5,
            data: ChangeData::Write(b"first"),
        },
    ];
    send_transfer(&lab, &dc1, 4, TransferKind::delta(2), &delta);
    wait_applied(&lab, &dc1, "vm1", 2);
    let ask = HashRequest {
        disk: 1,
        ranges: vec![
            ByteRange {
                offset: 0,
                length: MIB,
            },
            ByteRange {
                offset: MIB,
                length: 5,
            },
        ],
    };
    let answer: HashAnswer = dc1
        .post(&lab.url("/replicas/vm1/hashes"))
        .set(RELATIONSHIP_HEADER, "abc")
        .send_json(&ask)
        .unwrap()
        .into_json()
        .unwrap();
    let expected = [
        blake3::hash(&copy[..MIB as usize]).to_hex().to_string(),
        blake3::hash(b"added").to_hex().to_string(),
    ];
    assert_eq!(answer.hashes, expected);
    let first = std::fs::read(lab.dir.path().join("store1/vm1/disks/disk0.img")).unwrap();
    assert_eq!(&first[..5], b"first");

    // Enabled again with the same disks: the same answer, nothing changed.
    let before = std::fs::read(&disk1).unwrap();
    let (code, body) = enable_with(&lab, &dc1, &added);
    assert_eq!(code, 200, "{body}");
    let again: ReplicaInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (again.disks, again.last_applied_cycle),
        (added.disks.clone(), Some(2))
    );
    assert!(std::fs::read(&disk1).unwrap() == before);
    // A disk taken away again is not an add.
    let (code, body) = enable(&lab, &dc1, "vm1");
    assert_eq!(code, 409, "{body}");
    assert_eq!(error_code(&body), ErrorCode::OtherRelationship, "{body}");
}

/// An added disk passes the checks a new replica's disks pass (the storage's quota,
/// the largest disk), and is refused to a replica waiting for its import from
/// external media and to an existing copy not claimed yet.
#[test]
fn an_added_disk_is_checked_like_a_new_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start_with(dir, |settings| {
        settings.max_disk_size = 4 * MIB;
        settings.authorization[0].quota = Some(6 * MIB);
    });
    let dc1 = lab.client("host1.dc1.example.com", None);
    assert_eq!(enable(&lab, &dc1, "vm1").0, 201);
    let disk1 = lab.dir.path().join("store1/vm1/disks/disk1.img");
    for (size, what) in [(3 * MIB, "quota"), (4 * MIB + 1, "at most")] {
        let (code, body) = enable_with(&lab, &dc1, &with_disk1("vm1", size));
        assert_eq!(code, 507, "{body}");
        assert!(body.contains(what), "{body}");
        assert!(!disk1.exists());
    }
    let (code, body) = enable_with(&lab, &dc1, &with_disk1("vm1", 2 * MIB));
    assert_eq!(code, 200, "{body}");
    assert_eq!(std::fs::metadata(&disk1).unwrap().len(), 2 * MIB);
    drop(lab);

    let lab = Lab::start();
    let dc1 = lab.client("host1.dc1.example.com", None);
    let media = EnableRequest {
        initial: InitialMethod::Media,
        ..enable_request("vm1")
    };
    assert_eq!(enable_with(&lab, &dc1, &media).0, 201);
    let (code, body) = enable_with(
        &lab,
        &dc1,
        &EnableRequest {
            initial: InitialMethod::Media,
            ..with_disk1("vm1", MIB)
        },
    );
    assert_refused(code, &body, ErrorCode::Conflict, "blkrep replica import");

    let image = lab.dir.path().join("backup.img");
    std::fs::write(&image, vec![5u8; 4 * MIB as usize]).unwrap();
    Replica::seed(
        &lab.dir.path().join("store1/vm2"),
        "vm2",
        "dc1",
        &[("disk0".into(), image)],
        false,
    )
    .unwrap();
    let (code, body) = enable_with(
        &lab,
        &dc1,
        &EnableRequest {
            initial: InitialMethod::Existing,
            ..with_disk1("vm2", MIB)
        },
    );
    assert_refused(code, &body, ErrorCode::Conflict, "blkrep replica seed");
    assert!(!lab.dir.path().join("store1/vm2/disks/disk1.img").exists());
}
