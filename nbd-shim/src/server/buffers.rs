//! The two per-connection buffers.
//!
//! Both keep their storage initialised and reuse it, tracking how much is filled
//! separately, so reads from the socket and from the device go straight into them without
//! zeroing on every request (and without `unsafe`). Fresh storage comes from
//! `vec![0; n]`, which the allocator maps as untouched zero pages: memory is only
//! committed as it is used.

use std::io::{self, Read};

use crate::proto::reply::ReplySink;

/// Receive buffer: `data[start..end]` holds bytes read from the socket and not yet
/// consumed by a request.
pub(crate) struct RecvBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        RecvBuf {
            data: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Unconsumed bytes.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.end - self.start
    }

    /// Drops `n` (≤ pending) bytes from the front.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            // Empty: start the next read at the front (no copy needed).
            self.start = 0;
            self.end = 0;
        }
    }

    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Ensures a request of `needed` bytes (≤ capacity) starting at the pending bytes can
    /// be completed in place, moving the pending bytes to the front if it could not.
    pub(crate) fn make_room(&mut self, needed: usize) {
        if self.start > 0 && self.start + needed.min(self.capacity()) > self.capacity() {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// One `read` into the free space behind the pending bytes; returns bytes read (0 at
    /// end of stream). Retries on `EINTR`.
    pub(crate) fn fill_from(&mut self, source: &mut impl Read) -> io::Result<usize> {
        if self.end == self.capacity() {
            self.make_room(self.capacity());
        }
        loop {
            match source.read(&mut self.data[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and discards exactly `count` bytes from `source`, keeping any bytes read past
    /// them as pending input. The buffer must be empty.
    pub(crate) fn skip_from(&mut self, source: &mut impl Read, mut count: u64) -> io::Result<()> {
        debug_assert_eq!(self.pending_len(), 0);
        self.clear();
        while count > 0 {
            let n = self.fill_from(source)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let n64 = u64::try_from(n).unwrap_or(u64::MAX);
            if n64 > count {
                // `count` < n here, so it fits in usize.
                let keep_from = usize::try_from(count).unwrap_or(n);
                self.start = keep_from;
                count = 0;
            } else {
                count -= n64;
                self.clear();
            }
        }
        Ok(())
    }
}

/// Output buffer: `data[..len]` holds encoded replies not yet sent.
pub(crate) struct OutBuf {
    data: Vec<u8>,
    len: usize,
}

impl OutBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        OutBuf {
            data: vec![0; capacity],
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.data[..self.len]
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets everything after `len` (to drop a half-built reply).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A writable slice of `n` bytes after the filled part; [`OutBuf::commit`] makes it
    /// part of the output. Grows the storage (doubling) when needed.
    pub(crate) fn tail(&mut self, n: usize) -> &mut [u8] {
        let needed = self.len + n;
        if needed > self.data.len() {
            let grown = needed.max(self.data.len().saturating_mul(2));
            self.data.resize(grown, 0);
        }
        &mut self.data[self.len..needed]
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.len = (self.len + n).min(self.data.len());
    }
}

impl ReplySink for OutBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.tail(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn recv_buffer_compacts_only_when_needed() {
        let mut buf = RecvBuf::new(16);
        let mut src: &[u8] = b"0123456789abcdefXYZ";
        assert_eq!(buf.fill_from(&mut src).unwrap(), 16);
        buf.consume(10);
        assert_eq!(buf.pending(), b"abcdef");
        buf.make_room(6);
        assert_eq!(buf.pending(), b"abcdef");
        buf.make_room(8);
        assert_eq!(buf.fill_from(&mut src).unwrap(), 3);
        assert_eq!(buf.pending(), b"abcdefXYZ");
        buf.consume(9);
        assert_eq!(buf.pending_len(), 0);
    }

    #[test]
    fn skip_keeps_bytes_past_the_skipped_ones() {
        let mut buf = RecvBuf::new(4);
        let mut src: &[u8] = b"aaaaaaaaaaNEXT";
        buf.skip_from(&mut src, 10).unwrap();
        while buf.pending_len() < 4 {
            buf.fill_from(&mut src).unwrap();
        }
        assert_eq!(buf.pending(), b"NEXT");
        let mut short: &[u8] = b"abc";
        buf.clear();
        assert_eq!(
            buf.skip_from(&mut short, 5).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn out_buffer_grows_and_truncates() {
        let mut out = OutBuf::new(4);
        out.put(b"abc");
        out.tail(10).copy_from_slice(b"0123456789");
        out.commit(10);
        assert_eq!(out.as_slice(), b"abc0123456789");
        out.truncate(3);
        assert_eq!(out.as_slice(), b"abc");
        out.clear();
        assert!(out.is_empty());
    }
}
