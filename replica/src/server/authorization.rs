//! Who may replicate here, into which storage, as which tenant.
//!
//! Contracts:
//! - Entries are tried in order; the first whose primary pattern matches one of the
//!   peer's names decides its storage, trust group and quota.
//! - Tenants never share files: no storage directory lies inside another, and one
//!   storage belongs to one trust group, compared after resolving symbolic links
//!   ([`problems`]). A replica directory is a child of its storage, so a tenant can
//!   only ever create or delete inside its own storage.
//! - Lab mode (plain HTTP) has a key per entry, bound to the names that entry allows:
//!   a key proves only the identities of its own entry.

use std::path::{Component, Path, PathBuf};

use wire::tls::NamePattern;

use super::MIN_PSK_LEN;

/// One authorisation entry: which primaries, where their replicas live, their tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthEntry {
    /// Allowed primary identities; `None` allows any authenticated primary.
    pub primary: Option<NamePattern>,
    /// Where their replicas are stored.
    pub storage: PathBuf,
    /// Their trust group.
    pub trust_group: String,
    /// The most the disks of all replicas in `storage` may add up to, in bytes.
    pub quota: Option<u64>,
    /// Lab mode: the key a primary of this entry proves its name with.
    pub psk: Option<PreSharedKey>,
}

/// A pre-shared key of lab mode, kept out of logs.
#[derive(Clone, PartialEq, Eq)]
pub struct PreSharedKey(String);

impl PreSharedKey {
    /// A key, or `None` if it is shorter than [`MIN_PSK_LEN`].
    pub fn new(key: String) -> Option<PreSharedKey> {
        (key.len() >= MIN_PSK_LEN).then_some(PreSharedKey(key))
    }

    /// Whether `given` is this key, in time that depends only on the lengths (a key's
    /// length is no secret worth hiding; its bytes are).
    pub(super) fn matches(&self, given: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        given.len() == expected.len()
            && given
                .iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)))
                == 0
    }
}

impl std::fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An authenticated, authorised peer.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) identity: String,
    pub(super) storage: PathBuf,
    pub(super) trust_group: String,
    pub(super) quota: Option<u64>,
}

impl Peer {
    fn new(identity: String, entry: &AuthEntry) -> Peer {
        Peer {
            identity,
            storage: entry.storage.clone(),
            trust_group: entry.trust_group.clone(),
            quota: entry.quota,
        }
    }
}

/// The first entry allowing one of `names` (a certificate's).
pub(super) fn authorise(entries: &[AuthEntry], names: &[String]) -> Option<Peer> {
    entries.iter().find_map(|entry| {
        let identity = match &entry.primary {
            None => names.first()?.clone(),
            Some(pattern) => names.iter().find(|n| pattern.matches(n))?.clone(),
        };
        Some(Peer::new(identity, entry))
    })
}

/// Why lab mode refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PlainRefusal {
    /// No valid name was claimed.
    NoIdentity,
    /// The key is missing or is not the key of the entry that allows the name.
    WrongKey,
    /// No entry allows the name.
    NotAuthorised,
}

/// Lab mode: the peer that `identity` (claimed, lower-cased) and `key` prove: the
/// first entry allowing the name decides, and only its key proves it.
pub(super) fn authenticate_plain(
    entries: &[AuthEntry],
    identity: Option<&str>,
    key: Option<&[u8]>,
) -> Result<Peer, PlainRefusal> {
    // A claimed name is held to what a certificate's DNS name could be.
    let identity = identity
        .filter(|v| !v.starts_with('*') && NamePattern::parse(v).is_ok())
        .ok_or(PlainRefusal::NoIdentity)?;
    let entry = entries
        .iter()
        .find(|entry| entry.primary.as_ref().is_some_and(|p| p.matches(identity)))
        .ok_or(PlainRefusal::NotAuthorised)?;
    let proven = entry
        .psk
        .as_ref()
        .zip(key)
        .is_some_and(|(psk, key)| psk.matches(key));
    if !proven {
        return Err(PlainRefusal::WrongKey);
    }
    Ok(Peer::new(identity.to_string(), entry))
}

/// `path` with symbolic links resolved as far as it exists, and the rest appended
/// lexically (a storage may not exist yet when a configuration is checked).
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut resolved = real;
            for component in rest.iter().rev() {
                match component {
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    Component::Normal(name) => resolved.push(name),
                    _ => {}
                }
            }
            return resolved;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// What is wrong with `entries` as a whole (empty if nothing): storages inside one
/// another, a storage shared by two trust groups, and in lab mode (`plain`) entries
/// without a primary or a key. Each problem names the entries by their number (from 1).
pub fn problems(entries: &[AuthEntry], plain: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let resolved: Vec<PathBuf> = entries.iter().map(|e| resolve(&e.storage)).collect();
    for (i, (a, a_path)) in entries.iter().zip(&resolved).enumerate() {
        for (j, (b, b_path)) in entries.iter().zip(&resolved).enumerate().skip(i + 1) {
            let (first, second) = (i + 1, j + 1);
            if a_path == b_path {
                if a.trust_group != b.trust_group {
                    problems.push(format!(
                        "[[authorization]] {first} (trust group {}) and {second} (trust group {}) share storage {}: each trust group needs a storage of its own",
                        a.trust_group,
                        b.trust_group,
                        a_path.display()
                    ));
                }
            } else if b_path.starts_with(a_path) || a_path.starts_with(b_path) {
                problems.push(format!(
                    "[[authorization]] {first} (storage {}) and {second} (storage {}) overlap: one storage lies inside the other, so a replica of one could be another's whole storage; give them separate directories",
                    a_path.display(),
                    b_path.display()
                ));
            }
        }
    }
    if plain {
        for (index, entry) in entries.iter().enumerate() {
            let number = index + 1;
            if entry.primary.is_none() {
                problems.push(format!(
                    "[[authorization]] {number} has no primary: in lab mode each key is bound to the primary names of its entry, so every entry names its primaries"
                ));
            }
            if entry.psk.is_none() {
                problems.push(format!(
                    "[[authorization]] {number} has no psk_file: in lab mode each entry has a key of its own"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(primary: Option<&str>, storage: &Path, group: &str, key: Option<&str>) -> AuthEntry {
        AuthEntry {
            primary: primary.map(|p| NamePattern::parse(p).unwrap()),
            storage: storage.to_path_buf(),
            trust_group: group.into(),
            quota: None,
            psk: key.and_then(|k| PreSharedKey::new(k.into())),
        }
    }

    #[test]
    fn nested_storages_are_refused_even_through_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        std::fs::create_dir(&s).unwrap();
        std::os::unix::fs::symlink(&s, dir.path().join("link")).unwrap();
        let nested = [
            entry(None, &s, "dc1", None),
            entry(None, &dir.path().join("link/dc2"), "dc2", None),
        ];
        let found = problems(&nested, false);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("overlap"), "{found:?}");
        // Not yet existing, and spelled with "..": still inside.
        let dotted = [
            entry(None, &s, "dc1", None),
            entry(None, &dir.path().join("x/../s/dc2"), "dc2", None),
        ];
        assert_eq!(problems(&dotted, false).len(), 1);
        let apart = [
            entry(None, &s, "dc1", None),
            entry(None, &dir.path().join("s2"), "dc2", None),
        ];
        assert!(problems(&apart, false).is_empty());
    }

    #[test]
    fn one_storage_serves_one_trust_group() {
        let dir = tempfile::tempdir().unwrap();
        let same_group = [
            entry(Some("a.example.com"), dir.path(), "dc1", None),
            entry(Some("b.example.com"), dir.path(), "dc1", None),
        ];
        assert!(problems(&same_group, false).is_empty());
        let two_groups = [
            entry(Some("a.example.com"), dir.path(), "dc1", None),
            entry(Some("b.example.com"), dir.path(), "dc2", None),
        ];
        let found = problems(&two_groups, false);
        assert!(found[0].contains("share storage"), "{found:?}");
    }

    #[test]
    fn lab_mode_needs_a_primary_and_a_key_per_entry() {
        let dir = tempfile::tempdir().unwrap();
        let entries = [
            entry(None, &dir.path().join("a"), "dc1", Some("0123456789abcdef")),
            entry(Some("b.example.com"), &dir.path().join("b"), "dc2", None),
        ];
        let found = problems(&entries, true);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(problems(&entries, false).is_empty());
    }

    #[test]
    fn a_key_proves_only_the_names_of_its_own_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (key1, key2) = ("dc1-key-0123456789", "dc2-key-0123456789");
        let entries = [
            entry(
                Some("*.dc1.example.com"),
                &dir.path().join("1"),
                "dc1",
                Some(key1),
            ),
            entry(
                Some("*.dc2.example.com"),
                &dir.path().join("2"),
                "dc2",
                Some(key2),
            ),
        ];
        let as_dc1 = authenticate_plain(
            &entries,
            Some("host.dc1.example.com"),
            Some(key1.as_bytes()),
        )
        .unwrap();
        assert_eq!(as_dc1.trust_group, "dc1");
        // dc1's key claiming a dc2 name proves nothing.
        let claimed = authenticate_plain(
            &entries,
            Some("host.dc2.example.com"),
            Some(key1.as_bytes()),
        );
        assert_eq!(claimed.unwrap_err(), PlainRefusal::WrongKey);
        assert_eq!(
            authenticate_plain(&entries, Some("host.dc2.example.com"), None).unwrap_err(),
            PlainRefusal::WrongKey
        );
        assert_eq!(
            authenticate_plain(
                &entries,
                Some("host.dc3.example.com"),
                Some(key1.as_bytes())
            )
            .unwrap_err(),
            PlainRefusal::NotAuthorised
        );
        assert_eq!(
            authenticate_plain(&entries, Some("*.dc1.example.com"), Some(key1.as_bytes()))
                .unwrap_err(),
            PlainRefusal::NoIdentity
        );
        assert!(PreSharedKey::new("short".into()).is_none());
        assert_eq!(format!("{:?}", entries[0].psk), "Some(<redacted>)");
    }
}
