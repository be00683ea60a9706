//! The FUSE operations: a passthrough of the backing directory whose file data
//! goes through [`FileCache`]. Inodes are the backing inodes, held open by `O_PATH`
//! descriptors, so a rename or unlink on the backing side never detaches a file from
//! its cache. Every operation fails with EIO once the power is cut.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions, Permissions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirEntryExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;

use crate::cache::FileCache;

mod shared;

pub use shared::Dropped;
pub(crate) use shared::Shared;
use shared::{Node, OpenFile};

/// How long the kernel may cache names and attributes. Everything goes through this
/// mount, so the kernel's view only goes stale if the backing dir changes under it,
/// which the contract forbids while mounted.
const TTL: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn backing_key(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn open_path(dir: Option<RawFd>, name: &OsStr) -> std::io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The path through which a `O_PATH` descriptor's inode can be opened for I/O.
fn proc_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn errno(e: impl Into<std::io::Error>) -> Errno {
    Errno::from(e.into())
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = u32::try_from(nanos).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::new(secs, nanos),
        Err(_) => UNIX_EPOCH,
    }
}

fn attr(ino: u64, st: &FileStat, size: Option<u64>) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: size.unwrap_or(u64::try_from(st.st_size).unwrap_or(0)),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: time(st.st_ctime, st.st_ctime_nsec),
        kind: file_type(st.st_mode),
        perm: u16::try_from(st.st_mode & 0o7777).unwrap_or(0),
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: u32::try_from(st.st_rdev).unwrap_or(0),
        blksize: 4096,
        flags: 0,
    }
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            TimeSpec::from_duration(t.duration_since(UNIX_EPOCH).unwrap_or_default())
        }
    }
}

/// The filesystem handed to fuser.
#[derive(Debug)]
pub(crate) struct PowerLossFs {
    pub(crate) shared: Arc<Shared>,
}

/// Answers EIO once the power is cut.
macro_rules! alive {
    ($self:ident, $reply:ident) => {
        if $self.shared.is_cut() {
            $reply.error(Errno::EIO);
            return;
        }
    };
}

/// Replies with the error of a failed `Result`, or yields its value.
macro_rules! tri {
    ($result:expr, $reply:ident) => {
        match $result {
            Ok(value) => value,
            Err(e) => {
                $reply.error(e);
                return;
            }
        }
    };
}

impl PowerLossFs {
    /// A duplicate of node `ino`'s `O_PATH` descriptor (so no lock is held during I/O).
    fn path_fd(&self, ino: INodeNo) -> Result<OwnedFd, Errno> {
        let nodes = self.shared.nodes();
        let node = nodes.by_ino.get(&ino.0).ok_or(Errno::ESTALE)?;
        node.path.try_clone().map_err(errno)
    }

    /// The attributes of `ino`, with the size its cache gives.
    fn getattr_of(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let (fd, file) = {
            let nodes = self.shared.nodes();
            let node = nodes.by_ino.get(&ino.0).ok_or(Errno::ESTALE)?;
            (node.path.try_clone().map_err(errno)?, node.file.clone())
        };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(errno)?;
        let size = file.map(|f| lock(&f).cache.size());
        Ok(attr(ino.0, &st, size))
    }

    /// Looks `name` up in `parent` and counts a lookup of the node.
    fn lookup_node(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let dir = self.path_fd(parent)?;
        let fd = open_path(Some(dir.as_raw_fd()), name).map_err(errno)?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(errno)?;
        let key = backing_key(&st);
        let mut nodes = self.shared.nodes();
        let ino = match nodes.by_backing.get(&key) {
            Some(&ino) => ino,
            None => {
                let ino = nodes.next_ino;
                nodes.next_ino += 1;
                nodes.by_backing.insert(key, ino);
                nodes.by_ino.insert(
                    ino,
                    Node {
                        path: fd,
                        backing: key,
                        lookups: 0,
                        file: None,
                    },
                );
                ino
            }
        };
        let node = nodes.by_ino.get_mut(&ino).ok_or(Errno::ESTALE)?;
        node.lookups += 1;
        let size = node.file.as_ref().map(|f| lock(f).cache.size());
        Ok(attr(ino, &st, size))
    }

    /// Runs a metadata operation in `parent`'s backing directory.
    fn in_dir<T>(
        &self,
        parent: INodeNo,
        op: impl FnOnce(RawFd) -> nix::Result<T>,
    ) -> Result<T, Errno> {
        let dir = self.path_fd(parent)?;
        op(dir.as_raw_fd()).map_err(errno)
    }

    /// Makes entry `name` in `parent` with `op`, then answers with its lookup.
    fn make_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        op: impl FnOnce(RawFd) -> nix::Result<()>,
        reply: ReplyEntry,
    ) {
        alive!(self, reply);
        tri!(self.in_dir(parent, op), reply);
        let attr = tri!(self.lookup_node(parent, name), reply);
        reply.entry(&TTL, &attr, Generation(0));
    }

    /// Unlinks `name` from `parent` (a directory with `RemoveDir`).
    fn remove(&self, parent: INodeNo, name: &OsStr, flags: UnlinkatFlags, reply: ReplyEmpty) {
        alive!(self, reply);
        tri!(
            self.in_dir(parent, |dir| nix::unistd::unlinkat(Some(dir), name, flags)),
            reply
        );
        reply.ok();
    }

    /// Runs `op` on node `ino`'s cache (made on first use), unless the power was cut
    /// meanwhile.
    fn with_file<T>(
        &self,
        ino: INodeNo,
        op: impl FnOnce(&mut OpenFile) -> std::io::Result<T>,
    ) -> Result<T, Errno> {
        let file = {
            let mut nodes = self.shared.nodes();
            let node = nodes.by_ino.get_mut(&ino.0).ok_or(Errno::ESTALE)?;
            match &node.file {
                Some(file) => file.clone(),
                None => {
                    let path = proc_path(&node.path);
                    let backing = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .or_else(|_| File::open(&path))
                        .map_err(errno)?;
                    let len = backing.metadata().map_err(errno)?.len();
                    let file = Arc::new(Mutex::new(OpenFile {
                        backing,
                        cache: FileCache::new(len),
                    }));
                    node.file = Some(file.clone());
                    file
                }
            }
        };
        let mut file = lock(&file);
        // The cut may have come while this operation waited for the file.
        if self.shared.is_cut() {
            return Err(Errno::EIO);
        }
        op(&mut file).map_err(errno)
    }
}

impl Filesystem for PowerLossFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger writes mean fewer round trips; the kernel clamps what it cannot do.
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        alive!(self, reply);
        let attr = tri!(self.lookup_node(parent, name), reply);
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut nodes = self.shared.nodes();
        let Some(node) = nodes.by_ino.get_mut(&ino.0) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(nlookup);
        // A node with unsynced data stays: its cache is the only copy, and its
        // descriptor keeps the backing inode (number) from being reused.
        let dirty = node.file.as_ref().is_some_and(|f| lock(f).cache.is_dirty());
        if node.lookups == 0 && !dirty {
            let key = node.backing;
            nodes.by_ino.remove(&ino.0);
            nodes.by_backing.remove(&key);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        alive!(self, reply);
        let attr = tri!(self.getattr_of(ino), reply);
        reply.attr(&TTL, &attr);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        alive!(self, reply);
        let fd = tri!(self.path_fd(ino), reply);
        let path = proc_path(&fd);
        if let Some(mode) = mode {
            tri!(
                std::fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777))
                    .map_err(errno),
                reply
            );
        }
        if uid.is_some() || gid.is_some() {
            tri!(
                std::os::unix::fs::chown(&path, uid, gid).map_err(errno),
                reply
            );
        }
        if atime.is_some() || mtime.is_some() {
            tri!(
                nix::sys::stat::utimensat(
                    None,
                    &path,
                    &timespec(atime),
                    &timespec(mtime),
                    UtimensatFlags::FollowSymlink
                )
                .map_err(errno),
                reply
            );
        }
        // A size change is data: it stays in the cache until the file is synced.
        if let Some(size) = size {
            tri!(
                self.with_file(ino, |f| f.cache.set_size(&f.backing, size)),
                reply
            );
        }
        let attr = tri!(self.getattr_of(ino), reply);
        reply.attr(&TTL, &attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        alive!(self, reply);
        let fd = tri!(self.path_fd(ino), reply);
        let target = tri!(
            nix::fcntl::readlinkat(Some(fd.as_raw_fd()), "").map_err(errno),
            reply
        );
        reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mode = Mode::from_bits_truncate(mode & !umask);
        let op = |dir| nix::sys::stat::mkdirat(Some(dir), name, mode);
        self.make_entry(parent, name, op, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, UnlinkatFlags::NoRemoveDir, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, UnlinkatFlags::RemoveDir, reply);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let op = |dir| nix::unistd::symlinkat(target, Some(dir), link_name);
        self.make_entry(parent, link_name, op, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        alive!(self, reply);
        let from = tri!(self.path_fd(parent), reply);
        let to = tri!(self.path_fd(newparent), reply);
        tri!(
            nix::fcntl::renameat2(
                Some(from.as_raw_fd()),
                name,
                Some(to.as_raw_fd()),
                newname,
                nix::fcntl::RenameFlags::from_bits_truncate(flags.bits()),
            )
            .map_err(errno),
            reply
        );
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        alive!(self, reply);
        let source = proc_path(&tri!(self.path_fd(ino), reply));
        let target = PathBuf::from(newname);
        let op = |dir| {
            let follow = AtFlags::AT_SYMLINK_FOLLOW;
            nix::unistd::linkat(None, &source, Some(dir), &target, follow)
        };
        self.make_entry(newparent, newname, op, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        alive!(self, reply);
        tri!(self.path_fd(ino), reply);
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        alive!(self, reply);
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        let data = tri!(
            self.with_file(ino, |f| f.cache.read(&f.backing, offset, len)),
            reply
        );
        reply.data(&data);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        alive!(self, reply);
        tri!(
            self.with_file(ino, |f| f.cache.write(&f.backing, offset, data)),
            reply
        );
        reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
    }

    /// Close is not a sync: nothing is persisted here.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        alive!(self, reply);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        alive!(self, reply);
        let written = tri!(self.with_file(ino, |f| f.cache.persist(&f.backing)), reply);
        self.shared
            .synced_bytes
            .fetch_add(written, Ordering::Relaxed);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        alive!(self, reply);
        let fd = tri!(self.path_fd(ino), reply);
        let entries = tri!(std::fs::read_dir(proc_path(&fd)).map_err(errno), reply);
        let mut listing = vec![
            (ino, FileType::Directory, OsStr::new(".").to_os_string()),
            (ino, FileType::Directory, OsStr::new("..").to_os_string()),
        ];
        for entry in entries {
            let entry = tri!(entry.map_err(errno), reply);
            let kind = tri!(entry.file_type().map_err(errno), reply);
            let kind = FileType::from_std(kind).unwrap_or(FileType::RegularFile);
            listing.push((INodeNo(entry.ino()), kind, entry.file_name()));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, (entry_ino, kind, name)) in listing.into_iter().enumerate().skip(skip) {
            if reply.add(entry_ino, index as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    /// Metadata passes straight through, so a directory sync is the backing one.
    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        alive!(self, reply);
        let fd = tri!(self.path_fd(ino), reply);
        tri!(
            File::open(proc_path(&fd))
                .and_then(|d| d.sync_all())
                .map_err(errno),
            reply
        );
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        alive!(self, reply);
        let fd = tri!(self.path_fd(ino), reply);
        let st = tri!(nix::sys::statvfs::fstatvfs(&fd).map_err(errno), reply);
        reply.statfs(
            st.blocks(),
            st.blocks_free(),
            st.blocks_available(),
            st.files(),
            st.files_free(),
            u32::try_from(st.block_size()).unwrap_or(4096),
            u32::try_from(st.name_max()).unwrap_or(255),
            u32::try_from(st.fragment_size()).unwrap_or(4096),
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        alive!(self, reply);
        let dir = tri!(self.path_fd(parent), reply);
        // Only the name and mode are created here; truncation and data go through
        // the cache, so no O_TRUNC (and no write access is needed).
        let exclusive = OFlag::from_bits_truncate(flags) & OFlag::O_EXCL;
        let fd = tri!(
            nix::fcntl::openat(
                Some(dir.as_raw_fd()),
                name,
                OFlag::O_CREAT | OFlag::O_RDONLY | OFlag::O_CLOEXEC | exclusive,
                Mode::from_bits_truncate(mode & !umask),
            )
            .map_err(errno),
            reply
        );
        // SAFETY: openat just returned this descriptor and nothing else owns it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        let attr = tri!(self.lookup_node(parent, name), reply);
        reply.created(
            &TTL,
            &attr,
            Generation(0),
            FileHandle(0),
            FopenFlags::empty(),
        );
    }

    /// Allocation (mode 0) only grows the size; punching and zeroing write zeroes
    /// into the cache. Other modes are not supported.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        alive!(self, reply);
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zeroing = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let end = offset.saturating_add(length);
        let result = match zeroing {
            0 => self.with_file(ino, |f| {
                if !keep_size && end > f.cache.size() {
                    f.cache.set_size(&f.backing, end)?;
                }
                Ok(())
            }),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => self.with_file(ino, |f| {
                let end = end.min(f.cache.size());
                if end > offset {
                    f.cache.zero(&f.backing, offset, end - offset)?;
                }
                Ok(())
            }),
            libc::FALLOC_FL_ZERO_RANGE => self.with_file(ino, |f| {
                let size = f.cache.size();
                let end = if keep_size { end.min(size) } else { end };
                if end > offset {
                    f.cache.zero(&f.backing, offset, end - offset)?;
                }
                if end > size {
                    f.cache.set_size(&f.backing, end)?;
                }
                Ok(())
            }),
            _ => Err(Errno::EOPNOTSUPP),
        };
        tri!(result, reply);
        reply.ok();
    }

    /// Holes are not tracked through the cache, so every byte below the size is
    /// reported as data, which is what filesystems without hole tracking answer.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        alive!(self, reply);
        let size = tri!(self.getattr_of(ino), reply).size;
        let Ok(at) = u64::try_from(offset) else {
            reply.error(Errno::EINVAL);
            return;
        };
        if at >= size {
            reply.error(Errno::ENXIO);
            return;
        }
        match whence {
            libc::SEEK_DATA => reply.offset(offset),
            libc::SEEK_HOLE => reply.offset(i64::try_from(size).unwrap_or(i64::MAX)),
            _ => reply.error(Errno::EINVAL),
        }
    }
}
