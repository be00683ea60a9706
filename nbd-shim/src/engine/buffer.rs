//! [`IoBuf`]: a heap buffer the kernel may fill or read while an operation owns it.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;

/// A heap buffer aligned for `O_DIRECT` ([`IoBuf::ALIGN`] bytes), with a length up to
/// its capacity.
///
/// Its memory never moves while it lives (moving the `IoBuf` moves only the pointer),
/// which is what lets the engine hand its address to the kernel and keep the buffer in
/// its in-flight table until the completion arrives. New buffers are zeroed, so every
/// byte is initialised.
pub struct IoBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: an IoBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only read the bytes, like &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Alignment of the memory: a page, the strictest `O_DIRECT` needs of memory.
    pub const ALIGN: usize = 4096;

    /// A zeroed buffer of at least `capacity` bytes (rounded up to [`IoBuf::ALIGN`]),
    /// with length `capacity`. Fails with `OutOfMemory` instead of aborting.
    pub fn new(capacity: usize) -> io::Result<Self> {
        let rounded = Self::rounded(capacity).ok_or(io::ErrorKind::OutOfMemory)?;
        let layout = Layout::from_size_align(rounded, Self::ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: the layout has a nonzero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(IoBuf {
            ptr,
            capacity: rounded,
            len: capacity,
        })
    }

    /// The capacity a buffer asked for `capacity` bytes gets; `None` past `usize`.
    fn rounded(capacity: usize) -> Option<usize> {
        capacity.max(1).checked_next_multiple_of(Self::ALIGN)
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length; `len` is clamped to the capacity. The bytes keep their values.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity);
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds `capacity` initialised bytes and `len <= capacity`;
        // `&self` keeps them from being written through `&mut self` meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes in use, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start of the memory, for the kernel.
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `alloc_zeroed` with exactly this layout (checked
        // in `new`), and is freed once.
        unsafe {
            let layout = Layout::from_size_align_unchecked(self.capacity, Self::ALIGN);
            alloc::dealloc(self.ptr.as_ptr(), layout);
        }
    }
}

/// Buffers of one size kept for reuse, at most `keep` of them.
///
/// A fresh buffer costs a page fault and a page of zeroes per 4 KiB on first touch,
/// and its unmapping flushes TLBs; a user that needs megabytes for every transfer
/// (the replica's transfer files, applied every second) pays that each time unless
/// the buffers come back. A taken buffer is the caller's; [`IoBufPool::give`] hands
/// it back, and buffers of another capacity, or past `keep`, are freed instead.
#[derive(Debug)]
pub struct IoBufPool {
    capacity: usize,
    keep: usize,
    free: std::sync::Mutex<Vec<IoBuf>>,
}

impl IoBufPool {
    /// A pool of buffers of `capacity` bytes (rounded up as [`IoBuf::new`] does),
    /// keeping at most `keep` of them.
    pub const fn new(capacity: usize, keep: usize) -> Self {
        IoBufPool {
            capacity,
            keep,
            free: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A buffer of the pool's capacity, with that length: a kept one, or a new one
    /// (zeroed). A kept buffer holds whatever its last user left in it.
    pub fn take(&self) -> io::Result<IoBuf> {
        let kept = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match kept {
            Some(mut buf) => {
                buf.set_len(self.capacity);
                Ok(buf)
            }
            None => IoBuf::new(self.capacity),
        }
    }

    /// Hands `buf` back for reuse.
    pub fn give(&self, buf: IoBuf) {
        if Some(buf.capacity()) != IoBuf::rounded(self.capacity) {
            return;
        }
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(buf);
        }
    }

    /// Buffers kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        for size in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let mut buf = IoBuf::new(size).expect("allocate");
            assert_eq!(buf.len(), size);
            assert!(buf.capacity() >= size.max(1));
            assert_eq!(buf.capacity() % IoBuf::ALIGN, 0);
            assert_eq!(buf.as_mut_ptr().align_offset(IoBuf::ALIGN), 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
            buf.set_len(usize::MAX);
            assert_eq!(buf.len(), buf.capacity());
        }
    }

    #[test]
    fn a_pool_hands_back_its_own_buffers_up_to_its_limit() {
        let pool = IoBufPool::new(5000, 2);
        let mut first = pool.take().expect("allocate");
        assert_eq!((first.len(), first.capacity()), (5000, 8192));
        first.as_mut_slice()[0] = 7;
        let address = first.as_mut_ptr();
        first.set_len(10);
        pool.give(first);
        let mut again = pool.take().expect("reuse");
        assert_eq!(again.as_mut_ptr(), address, "the kept buffer comes back");
        assert_eq!(again.len(), 5000, "at the pool's length again");
        let third = pool.take().expect("allocate");
        let fourth = pool.take().expect("allocate");
        pool.give(again);
        pool.give(third);
        pool.give(fourth);
        assert_eq!(pool.kept(), 2, "no more than `keep`");
        pool.give(IoBuf::new(4096).expect("allocate"));
        assert_eq!(pool.kept(), 2, "a buffer of another size is not kept");
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        let err = IoBuf::new(usize::MAX).expect_err("cannot allocate");
        assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
    }
}
