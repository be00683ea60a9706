//! The I/O engine: an io_uring and the in-flight table that owns every buffer the
//! kernel may touch.
//!
//! One [`IoEngine`] belongs to one thread (a connection's). It keeps as many reads,
//! writes and syncs outstanding as it has table slots, and hands each back as a
//! [`Completion`] in whatever order the device finishes them.
//!
//! Contracts:
//! - **Buffer ownership.** [`IoEngine::read`] and [`IoEngine::write`] move the buffer
//!   into the in-flight table; it comes back only in the operation's completion. The
//!   kernel accesses the buffer only while the entry is in the table, and nothing else
//!   can (the table owns it), so there is no aliasing.
//! - **Descriptors.** An operation borrows its file descriptor for the engine's lifetime
//!   `'fd`: the descriptor outlives every operation, since `Drop` waits for them all.
//! - **Queue space.** The table has exactly as many slots as the submission queue has
//!   entries and each slot has at most one entry queued, so a push never finds the queue
//!   full, and the completion queue (twice as large) never overflows. When every slot is
//!   taken, an operation is given back ([`Full`]) and the caller reaps first.
//! - **Whole transfers.** A short read or write is resubmitted for the rest; reading past
//!   the end of the file completes with `UnexpectedEof`, a write the kernel refuses to
//!   advance with `WriteZero`.
//! - **Drop** waits for every operation still in flight. If the ring fails while
//!   waiting, the buffers are leaked rather than freed under the kernel.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, squeue, types, IoUring};

/// Largest piece one submission entry transfers; longer buffers go in several.
const MAX_PIECE: u32 = 1 << 30;

mod buffer;
pub use buffer::{IoBuf, IoBufPool};

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    DataSync,
}

/// One operation the kernel owns until its completion arrives.
struct InFlight<'fd, T> {
    kind: Kind,
    fd: BorrowedFd<'fd>,
    offset: u64,
    buf: IoBuf,
    /// Bytes transferred so far (short transfers are resubmitted for the rest).
    done: usize,
    tag: T,
}

/// A finished operation: its tag, its buffer back, and how it went.
#[derive(Debug)]
pub struct Completion<T> {
    /// What the caller attached to the operation.
    pub tag: T,
    /// The operation's buffer (empty for syncs), now the caller's again.
    pub buf: IoBuf,
    /// `Ok` once every byte was transferred (or the sync completed).
    pub result: io::Result<()>,
}

/// An operation given back because every slot of the table is taken.
#[derive(Debug)]
pub struct Full<T> {
    /// The operation's buffer.
    pub buf: IoBuf,
    /// The operation's tag.
    pub tag: T,
}

/// An io_uring with an in-flight table. See the module documentation.
pub struct IoEngine<'fd, T> {
    ring: IoUring,
    table: Vec<Option<InFlight<'fd, T>>>,
    free: Vec<usize>,
    /// Entries pushed to the submission queue and not yet handed to the kernel.
    unsubmitted: usize,
    /// Completion entries being accounted (kept to reuse the allocation).
    reaped: Vec<(u64, i32)>,
}

impl<T> std::fmt::Debug for IoEngine<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("slots", &self.table.len())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl<'fd, T> IoEngine<'fd, T> {
    /// An engine with `depth` slots (rounded up to a power of two by the kernel's queue
    /// sizing; at least 1, at most 4096).
    pub fn new(depth: u32) -> io::Result<Self> {
        let ring = IoUring::new(depth.clamp(1, 4096))?;
        let slots = usize::try_from(ring.params().sq_entries()).unwrap_or(1);
        Ok(IoEngine {
            ring,
            table: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            unsubmitted: 0,
            reaped: Vec::with_capacity(slots),
        })
    }

    /// Whether another operation fits.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.table.len() - self.free.len()
    }

    /// The ring's descriptor: it polls readable while completions wait to be reaped.
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the ring owns the descriptor and keeps it open while borrowed from it.
        unsafe { BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }

    /// Reads `buf.len()` bytes at `offset` of `fd` into `buf`.
    pub fn read(
        &mut self,
        fd: BorrowedFd<'fd>,
        offset: u64,
        buf: IoBuf,
        tag: T,
    ) -> Result<(), Full<T>> {
        self.start(Kind::Read, fd, offset, buf, tag)
    }

    /// Writes the `buf.len()` bytes of `buf` at `offset` of `fd`.
    pub fn write(
        &mut self,
        fd: BorrowedFd<'fd>,
        offset: u64,
        buf: IoBuf,
        tag: T,
    ) -> Result<(), Full<T>> {
        self.start(Kind::Write, fd, offset, buf, tag)
    }

    /// `fdatasync`s `fd`. `buf` is returned untouched in the completion (pass an empty
    /// one, or one to keep with the tag).
    pub fn data_sync(&mut self, fd: BorrowedFd<'fd>, buf: IoBuf, tag: T) -> Result<(), Full<T>> {
        self.start(Kind::DataSync, fd, 0, buf, tag)
    }

    fn start(
        &mut self,
        kind: Kind,
        fd: BorrowedFd<'fd>,
        offset: u64,
        buf: IoBuf,
        tag: T,
    ) -> Result<(), Full<T>> {
        let Some(slot) = self.free.pop() else {
            return Err(Full { buf, tag });
        };
        self.table[slot] = Some(InFlight {
            kind,
            fd,
            offset,
            buf,
            done: 0,
            tag,
        });
        self.push(slot);
        Ok(())
    }

    /// Queues the submission entry for what remains of `slot`'s operation.
    fn push(&mut self, slot: usize) {
        let Some(op) = self.table[slot].as_mut() else {
            return;
        };
        let fd = types::Fd(op.fd.as_raw_fd());
        let remaining = op.buf.len() - op.done;
        // A request is at most 32 MiB; larger buffers are transferred in pieces.
        let piece = u32::try_from(remaining).map_or(MAX_PIECE, |n| n.min(MAX_PIECE));
        let at = op.offset + u64::try_from(op.done).unwrap_or(u64::MAX);
        // SAFETY: `done <= len <= capacity`, so the pointer stays inside the allocation.
        let ptr = unsafe { op.buf.as_mut_ptr().add(op.done) };
        let entry: squeue::Entry = match op.kind {
            Kind::Read => opcode::Read::new(fd, ptr, piece).offset(at).build(),
            Kind::Write => opcode::Write::new(fd, ptr, piece).offset(at).build(),
            Kind::DataSync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: the entry points into `op.buf`, which the table owns until the
        // completion for this slot is reaped (or, if the ring fails, forever: see Drop),
        // and at `op.fd`, borrowed for 'fd, which outlives the engine.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        // Each slot has at most one entry queued and the queue has a slot's worth of
        // entries, so the queue cannot be full.
        debug_assert!(pushed.is_ok(), "io_uring submission queue overflow");
        self.unsubmitted += 1;
    }

    /// Hands the queued entries to the kernel without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.enter(0)
    }

    fn enter(&mut self, want: usize) -> io::Result<()> {
        if self.unsubmitted == 0 && want == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // The completion queue is backed up: reap, then try again.
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    }

    /// Submits what is queued, waits until at least `wait_for` operations completed
    /// (0: does not wait), and hands every finished operation to `done`. Returns how many
    /// finished.
    pub fn complete(
        &mut self,
        wait_for: usize,
        mut done: impl FnMut(Completion<T>),
    ) -> io::Result<usize> {
        let wait_for = wait_for.min(self.in_flight());
        let mut finished = 0;
        loop {
            self.enter(wait_for.saturating_sub(finished))?;
            let before = finished;
            let mut reaped = std::mem::take(&mut self.reaped);
            reaped.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            for &(slot, result) in &reaped {
                let slot = usize::try_from(slot).unwrap_or(usize::MAX);
                if let Some(completion) = self.finish(slot, result) {
                    finished += 1;
                    done(completion);
                }
            }
            reaped.clear();
            self.reaped = reaped;
            if finished >= wait_for || (finished == before && wait_for == 0) {
                return Ok(finished);
            }
        }
    }

    /// Accounts one completion of `slot`: the operation finishes, or what is left of it
    /// is queued again.
    fn finish(&mut self, slot: usize, result: i32) -> Option<Completion<T>> {
        let op = self.table.get_mut(slot)?.as_mut()?;
        let outcome = match (op.kind, result) {
            (_, r) if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            (Kind::DataSync, _) => Ok(()),
            (kind, 0) if op.done < op.buf.len() => Err(match kind {
                Kind::Read => io::ErrorKind::UnexpectedEof.into(),
                _ => io::ErrorKind::WriteZero.into(),
            }),
            (_, n) => {
                op.done += usize::try_from(n).unwrap_or(0);
                if op.done < op.buf.len() {
                    self.push(slot);
                    return None;
                }
                Ok(())
            }
        };
        let op = self.table[slot].take()?;
        self.free.push(slot);
        Some(Completion {
            tag: op.tag,
            buf: op.buf,
            result: outcome,
        })
    }
}

impl<T> Drop for IoEngine<'_, T> {
    fn drop(&mut self) {
        while self.in_flight() > 0 {
            let waiting = self.in_flight();
            if let Err(err) = self.complete(waiting, drop) {
                // The kernel may still own buffers: leak them rather than free memory
                // it could write into.
                tracing::error!(%err, in_flight = waiting, "io_uring failed while draining; leaking its buffers");
                for op in self.table.drain(..).flatten() {
                    std::mem::forget(op.buf);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
