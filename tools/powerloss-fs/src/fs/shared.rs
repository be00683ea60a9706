//! The mount's state, shared by the FUSE session and the mount handle: the node table
//! (each node an `O_PATH` descriptor of its backing inode, and its file cache once
//! opened) and the power switch. [`Shared::cut_power`] fails every later operation and
//! forgets every unsynced page.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::INodeNo;

use super::{backing_key, lock, open_path};
use crate::cache::FileCache;

/// What a power cut dropped (or would drop now).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Bytes of unsynced pages.
    pub bytes: u64,
    /// Files with any unsynced change (data or size).
    pub files: u64,
}

/// State shared by the FUSE session and the mount handle.
#[derive(Debug)]
pub(crate) struct Shared {
    cut: AtomicBool,
    nodes: Mutex<Nodes>,
    pub(crate) synced_bytes: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Nodes {
    pub(super) by_ino: HashMap<u64, Node>,
    pub(super) by_backing: HashMap<(u64, u64), u64>,
    pub(super) next_ino: u64,
}

#[derive(Debug)]
pub(super) struct Node {
    /// `O_PATH` descriptor of the backing inode.
    pub(super) path: OwnedFd,
    pub(super) backing: (u64, u64),
    pub(super) lookups: u64,
    pub(super) file: Option<Arc<Mutex<OpenFile>>>,
}

#[derive(Debug)]
pub(super) struct OpenFile {
    pub(super) backing: File,
    pub(super) cache: FileCache,
}

impl Shared {
    pub(crate) fn new(root: &Path) -> std::io::Result<Shared> {
        let fd = open_path(None, root.as_os_str())?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
        let key = backing_key(&st);
        let mut nodes = Nodes {
            by_ino: HashMap::new(),
            by_backing: HashMap::new(),
            next_ino: INodeNo::ROOT.0 + 1,
        };
        nodes.by_backing.insert(key, INodeNo::ROOT.0);
        nodes.by_ino.insert(
            INodeNo::ROOT.0,
            Node {
                path: fd,
                backing: key,
                lookups: u64::MAX / 2,
                file: None,
            },
        );
        Ok(Shared {
            cut: AtomicBool::new(false),
            nodes: Mutex::new(nodes),
            synced_bytes: AtomicU64::new(0),
        })
    }

    pub(crate) fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    pub(super) fn nodes(&self) -> MutexGuard<'_, Nodes> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a power cut would drop now.
    pub(crate) fn unsynced(&self) -> Dropped {
        let files: Vec<_> = self
            .nodes()
            .by_ino
            .values()
            .filter_map(|n| n.file.clone())
            .collect();
        let mut dropped = Dropped::default();
        for file in files {
            let file = lock(&file);
            if file.cache.is_dirty() {
                dropped.files += 1;
                dropped.bytes += file.cache.unsynced_bytes();
            }
        }
        dropped
    }

    /// Fails every later operation, then forgets every unsynced page. Waits for
    /// operations already inside a file to leave it, so nothing reaches the backing
    /// dir after this returns.
    pub(crate) fn cut_power(&self) -> Dropped {
        self.cut.store(true, Ordering::SeqCst);
        let mut nodes = self.nodes();
        let mut dropped = Dropped::default();
        for node in nodes.by_ino.values_mut() {
            if let Some(file) = node.file.take() {
                let file = lock(&file);
                if file.cache.is_dirty() {
                    dropped.files += 1;
                    dropped.bytes += file.cache.unsynced_bytes();
                }
            }
        }
        nodes.by_ino.clear();
        nodes.by_backing.clear();
        dropped
    }

    /// Persists every file (a whole-filesystem sync); returns the bytes written.
    pub(crate) fn sync_all(&self) -> std::io::Result<u64> {
        let files: Vec<_> = self
            .nodes()
            .by_ino
            .values()
            .filter_map(|n| n.file.clone())
            .collect();
        let mut written = 0;
        for file in files {
            let mut file = lock(&file);
            if self.is_cut() {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let OpenFile { backing, cache } = &mut *file;
            written += cache.persist(backing)?;
        }
        self.synced_bytes.fetch_add(written, Ordering::Relaxed);
        Ok(written)
    }
}
