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
        let rounded = capacity
            .max(1)
            .checked_next_multiple_of(Self::ALIGN)
            .ok_or(io::ErrorKind::OutOfMemory)?;
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
    fn an_impossible_size_is_an_error_not_an_abort() {
        let err = IoBuf::new(usize::MAX).expect_err("cannot allocate");
        assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
    }
}
