//! Exports: a named [`BlockDevice`] with its advertised limits, its catalogue of metadata
//! contexts, its counters and its connections.
//!
//! Retiring an export ([`Export::retire`]) closes its connections the way a server
//! shutdown does: the read side of each is shut, so the connection answers every
//! request it already received, then sees end-of-stream and closes. A connection that
//! reaches transmission after the export was retired is closed at once.

use std::collections::{BTreeMap, HashMap};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::listener::{wait_or_cut_off, ShutdownHandle};
use super::{ExportStats, ServerError};
use crate::backend::{BlockDevice, BlockSizeLimits};
use crate::proto::*;

/// Name under which qemu tools look for a dirty bitmap called "blkrep".
pub(crate) const QEMU_DIRTY_BITMAP_ALIAS: &str = "qemu:dirty-bitmap:blkrep";
/// The backend context the qemu alias stands for.
pub(crate) const BLKREP_DIRTY: &str = "x-blkrep:dirty";

/// Where a metadata context's extents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContextSource {
    /// `base:allocation` → [`BlockDevice::allocation`].
    Allocation,
    /// Backend context number `n` → [`BlockDevice::context_extents`].
    Backend(usize),
}

/// One entry of an export's context catalogue; its id on the wire is its index.
#[derive(Debug, Clone)]
pub(crate) struct MetaContext {
    pub(crate) name: String,
    pub(crate) source: ContextSource,
}

/// Counters shared by every connection of an export.
#[derive(Debug, Default)]
pub(crate) struct ExportCounters {
    pub(crate) connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) dropped_connections: AtomicU64,
}

impl ExportCounters {
    pub(crate) fn snapshot(&self) -> ExportStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExportStats {
            connections: get(&self.connections),
            connections_total: get(&self.connections_total),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            requests: get(&self.requests),
            errors: get(&self.errors),
            protocol_errors: get(&self.protocol_errors),
            dropped_connections: get(&self.dropped_connections),
        }
    }
}

/// A named export.
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) dev: Arc<dyn BlockDevice>,
    /// The device's limits, checked at registration.
    pub(crate) limits: BlockSizeLimits,
    pub(crate) contexts: Vec<MetaContext>,
    pub(crate) counters: ExportCounters,
    sessions: Mutex<Sessions>,
    /// Signalled when a connection leaves transmission.
    session_ended: Condvar,
}

/// The connections in transmission on an export.
#[derive(Default)]
struct Sessions {
    retired: bool,
    handles: HashMap<u64, ShutdownHandle>,
}

impl Sessions {
    fn open(&self) -> Vec<&ShutdownHandle> {
        self.handles.values().collect()
    }
}

/// A connection's place in its export's sessions; leaving transmission drops it.
pub(crate) struct SessionEntry<'e> {
    export: &'e Export,
    id: u64,
}

impl Drop for SessionEntry<'_> {
    fn drop(&mut self) {
        self.export.lock_sessions().handles.remove(&self.id);
        self.export.session_ended.notify_all();
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

/// Checks the device's limits against the spec: the minimum must be a power of two no
/// larger than 64 KiB (requests are validated against it, so it cannot be guessed); the
/// preferred size is raised to a power of two of at least max(minimum, 512) and the
/// maximum to at least the preferred size, rounded down to a multiple of the minimum.
fn checked_limits(name: &str, limits: BlockSizeLimits) -> Result<BlockSizeLimits, ServerError> {
    let minimum = limits.minimum;
    if !minimum.is_power_of_two() || minimum > MAX_MINIMUM_BLOCK_SIZE {
        return Err(ServerError::InvalidBlockSize {
            export: name.to_owned(),
            minimum,
        });
    }
    let preferred = limits
        .preferred
        .max(minimum)
        .max(512)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31);
    let maximum = limits.maximum.max(preferred) / minimum * minimum;
    let fixed = BlockSizeLimits {
        minimum,
        preferred,
        maximum,
    };
    if fixed != limits {
        tracing::warn!(
            export = name,
            ?limits,
            ?fixed,
            "adjusted block size limits to what the NBD spec allows"
        );
    }
    Ok(fixed)
}

/// A context name must be "a namespace, followed by a colon, followed by a leaf-name",
/// and a valid NBD string.
fn valid_context_name(name: &str) -> bool {
    wire_str(name.as_bytes()).is_some()
        && name.split_once(':').is_some_and(|(ns, _)| !ns.is_empty())
}

impl Export {
    fn lock_sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers connection `id` (closed through `handle`) as serving this export;
    /// `None` once the export is retired: the connection must close.
    pub(crate) fn enter(&self, id: u64, handle: ShutdownHandle) -> Option<SessionEntry<'_>> {
        let mut sessions = self.lock_sessions();
        if sessions.retired {
            return None;
        }
        sessions.handles.insert(id, handle);
        Some(SessionEntry { export: self, id })
    }

    /// Whether the export was retired.
    pub(crate) fn is_retired(&self) -> bool {
        self.lock_sessions().retired
    }

    /// Closes the export's connections once they answered what they received, waiting
    /// at most `grace` before cutting off the rest. Returns how many were open.
    pub(crate) fn retire(&self, grace: Duration) -> usize {
        let mut sessions = self.lock_sessions();
        sessions.retired = true;
        let open = sessions.handles.len();
        for handle in sessions.handles.values() {
            handle.shutdown(Shutdown::Read);
        }
        let sessions = wait_or_cut_off(
            sessions,
            &self.session_ended,
            Instant::now() + grace,
            Sessions::open,
            "export removed",
        );
        // Cut off, they end at their next socket call.
        drop(wait_or_cut_off(
            sessions,
            &self.session_ended,
            Instant::now() + Duration::from_secs(5),
            Sessions::open,
            "export removed, still open after being cut off",
        ));
        open
    }

    pub(crate) fn new(
        name: &str,
        description: Option<String>,
        dev: Arc<dyn BlockDevice>,
    ) -> Result<Self, ServerError> {
        if wire_str(name.as_bytes()).is_none() {
            return Err(ServerError::InvalidExportName(name.to_owned()));
        }
        if let Some(d) = &description {
            if wire_str(d.as_bytes()).is_none() {
                return Err(ServerError::InvalidExportName(format!(
                    "{name} (description)"
                )));
            }
        }
        let limits = checked_limits(name, dev.block_size())?;
        let mut contexts = vec![MetaContext {
            name: BASE_ALLOCATION.to_owned(),
            source: ContextSource::Allocation,
        }];
        let mut dirty = None;
        for (index, context) in dev.meta_contexts().into_iter().enumerate() {
            if !valid_context_name(&context)
                || contexts.iter().any(|c| c.name == context)
                || context == QEMU_DIRTY_BITMAP_ALIAS
            {
                tracing::warn!(
                    export = name,
                    context,
                    "ignoring an invalid or duplicate metadata context"
                );
                continue;
            }
            if context == BLKREP_DIRTY {
                dirty = Some(index);
            }
            contexts.push(MetaContext {
                name: context,
                source: ContextSource::Backend(index),
            });
        }
        if let Some(index) = dirty {
            contexts.push(MetaContext {
                name: QEMU_DIRTY_BITMAP_ALIAS.to_owned(),
                source: ContextSource::Backend(index),
            });
        }
        Ok(Export {
            sessions: Mutex::default(),
            session_ended: Condvar::new(),
            name: name.to_owned(),
            description,
            dev,
            limits,
            contexts,
            counters: ExportCounters::default(),
        })
    }

    /// Transmission flags for a connection; `structured` says whether structured replies
    /// were negotiated (DF needs them).
    pub(crate) fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags =
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;
        if self.dev.read_only() {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_WRITE_ZEROES;
            if self.dev.can_trim() {
                flags |= NBD_FLAG_SEND_TRIM;
            }
            if self.dev.can_fast_zero() {
                flags |= NBD_FLAG_SEND_FAST_ZERO;
            }
        }
        if structured {
            flags |= NBD_FLAG_SEND_DF;
        }
        if self.dev.can_multi_conn() {
            flags |= NBD_FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    /// Contexts matching `queries` for `NBD_OPT_LIST_META_CONTEXT`: all with no query; a
    /// query ending in ':' (a namespace such as "base:" or "x-blkrep:", or qemu's
    /// "qemu:dirty-bitmap:") lists every context under it; otherwise exact names.
    pub(crate) fn list_contexts(&self, queries: &[String]) -> Vec<u32> {
        self.matching(|name| {
            queries.is_empty()
                || queries.iter().any(|q| {
                    if q.ends_with(':') {
                        name.starts_with(q.as_str())
                    } else {
                        name == q
                    }
                })
        })
    }

    /// Contexts selected by `queries` for `NBD_OPT_SET_META_CONTEXT`: exact names only
    /// (the server "MUST ignore" the bare "base:" form here, and an empty leaf "SHOULD NOT
    /// select any contexts").
    pub(crate) fn select_contexts(&self, queries: &[String]) -> Vec<u32> {
        self.matching(|name| queries.iter().any(|q| q == name))
    }

    fn matching(&self, pred: impl Fn(&str) -> bool) -> Vec<u32> {
        self.contexts
            .iter()
            .enumerate()
            .filter(|(_, c)| pred(&c.name))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect()
    }

    pub(crate) fn context(&self, id: u32) -> Option<&MetaContext> {
        self.contexts.get(usize::try_from(id).ok()?)
    }
}

/// An immutable snapshot of the export table (copy-on-write, so a handshake sees one
/// consistent table and lookups take no lock).
#[derive(Debug, Default, Clone)]
pub(crate) struct ExportTable {
    pub(crate) by_name: BTreeMap<String, Arc<Export>>,
}

impl ExportTable {
    /// Looks `name` up; the empty name is the export named "" if there is one, else the
    /// only export if there is exactly one.
    pub(crate) fn resolve(&self, name: &str) -> Option<Arc<Export>> {
        if let Some(export) = self.by_name.get(name) {
            return Some(Arc::clone(export));
        }
        if name.is_empty() && self.by_name.len() == 1 {
            return self.by_name.values().next().cloned();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::test_support::NullDevice;

    fn dev(contexts: &[&str]) -> Arc<dyn BlockDevice> {
        Arc::new(NullDevice {
            contexts: contexts.iter().map(|s| (*s).to_owned()).collect(),
            fast_zero: false,
            limits: BlockSizeLimits {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20,
            },
            read_only: false,
        })
    }

    fn names(e: &Export, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| e.context(id).unwrap().name.clone())
            .collect()
    }

    #[test]
    fn catalogue_has_base_backend_and_qemu_alias() {
        let e = Export::new(
            "d",
            None,
            dev(&["x-blkrep:dirty", "bogus", "base:allocation"]),
        )
        .unwrap();
        let all = e.list_contexts(&[]);
        assert_eq!(
            names(&e, &all),
            [
                "base:allocation",
                "x-blkrep:dirty",
                "qemu:dirty-bitmap:blkrep"
            ]
        );
        assert_eq!(e.contexts[1].source, ContextSource::Backend(0));
        assert_eq!(e.contexts[2].source, ContextSource::Backend(0));
    }

    #[test]
    fn list_matches_namespaces_and_exact_names() {
        let e = Export::new("d", None, dev(&["x-blkrep:dirty"])).unwrap();
        let q = |qs: &[&str]| {
            names(
                &e,
                &e.list_contexts(&qs.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()),
            )
        };
        assert_eq!(q(&["base:"]), ["base:allocation"]);
        assert_eq!(q(&["x-blkrep:"]), ["x-blkrep:dirty"]);
        assert_eq!(q(&["qemu:dirty-bitmap:"]), ["qemu:dirty-bitmap:blkrep"]);
        assert_eq!(
            q(&["base:allocation", "x-blkrep:dirty"]),
            ["base:allocation", "x-blkrep:dirty"]
        );
        assert!(q(&["unknown:"]).is_empty());
        assert!(q(&["base:nothing"]).is_empty());
    }

    #[test]
    fn set_selects_exact_names_only() {
        let e = Export::new("d", None, dev(&["x-blkrep:dirty"])).unwrap();
        let s = |qs: &[&str]| {
            names(
                &e,
                &e.select_contexts(&qs.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()),
            )
        };
        assert!(s(&["base:"]).is_empty());
        assert!(s(&[]).is_empty());
        assert_eq!(
            s(&[
                "qemu:dirty-bitmap:blkrep",
                "base:allocation",
                "base:allocation"
            ]),
            ["base:allocation", "qemu:dirty-bitmap:blkrep"]
        );
    }

    #[test]
    fn no_alias_without_the_dirty_context() {
        let e = Export::new("d", None, dev(&["x-other:thing"])).unwrap();
        assert_eq!(e.contexts.len(), 2);
        assert!(e
            .select_contexts(&["qemu:dirty-bitmap:blkrep".to_owned()])
            .is_empty());
    }

    #[test]
    fn limits_are_checked_and_fixed_up() {
        let bad = |minimum| {
            Export::new(
                "d",
                None,
                Arc::new(NullDevice {
                    fast_zero: false,
                    contexts: vec![],
                    limits: BlockSizeLimits {
                        minimum,
                        preferred: 4096,
                        maximum: 1 << 20,
                    },
                    read_only: false,
                }),
            )
        };
        assert!(matches!(bad(0), Err(ServerError::InvalidBlockSize { .. })));
        assert!(matches!(bad(3), Err(ServerError::InvalidBlockSize { .. })));
        assert!(matches!(
            bad(1 << 17),
            Err(ServerError::InvalidBlockSize { .. })
        ));
        let e = Export::new(
            "d",
            None,
            Arc::new(NullDevice {
                fast_zero: false,
                contexts: vec![],
                limits: BlockSizeLimits {
                    minimum: 4096,
                    preferred: 100,
                    maximum: 5000,
                },
                read_only: false,
            }),
        )
        .unwrap();
        assert_eq!(
            e.limits,
            BlockSizeLimits {
                minimum: 4096,
                preferred: 4096,
                maximum: 4096
            }
        );
    }

    #[test]
    fn names_must_be_nbd_strings() {
        assert!(Export::new("a\0b", None, dev(&[])).is_err());
        assert!(Export::new(&"n".repeat(4097), None, dev(&[])).is_err());
        assert!(Export::new("", None, dev(&[])).is_ok());
    }

    #[test]
    fn transmission_flags_follow_the_device() {
        let e = Export::new("d", None, dev(&[])).unwrap();
        let f = e.transmission_flags(true);
        assert_ne!(f & NBD_FLAG_SEND_TRIM, 0);
        assert_ne!(f & NBD_FLAG_SEND_DF, 0);
        assert_ne!(f & NBD_FLAG_CAN_MULTI_CONN, 0);
        assert_eq!(f & NBD_FLAG_SEND_FAST_ZERO, 0);
        assert_eq!(e.transmission_flags(false) & NBD_FLAG_SEND_DF, 0);
        let ro = Export::new(
            "r",
            None,
            Arc::new(NullDevice {
                fast_zero: false,
                contexts: vec![],
                limits: e.limits,
                read_only: true,
            }),
        )
        .unwrap();
        let f = ro.transmission_flags(false);
        assert_ne!(f & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(f & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES), 0);
    }

    #[test]
    fn empty_name_resolves_to_the_only_export() {
        let mut table = ExportTable::default();
        assert!(table.resolve("").is_none());
        table.by_name.insert(
            "a".into(),
            Arc::new(Export::new("a", None, dev(&[])).unwrap()),
        );
        assert_eq!(table.resolve("").unwrap().name, "a");
        assert!(table.resolve("b").is_none());
        table.by_name.insert(
            "b".into(),
            Arc::new(Export::new("b", None, dev(&[])).unwrap()),
        );
        assert!(table.resolve("").is_none());
        table.by_name.insert(
            String::new(),
            Arc::new(Export::new("", None, dev(&[])).unwrap()),
        );
        assert_eq!(table.resolve("").unwrap().name, "");
    }
}
