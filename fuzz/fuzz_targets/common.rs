//! Shared by the fuzz targets: an in-memory device and stream.

use std::io::{self, Read, Write};
use std::sync::RwLock;

use nbd_shim::backend::BlockSizeLimits;
use nbd_shim::{BlockDevice, Extent, ZeroMode};

/// A small in-memory disk. Every range the server passes is checked: a server bug that
/// lets an unvalidated range through panics here, which the fuzzer reports.
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    minimum: u32,
    read_only: bool,
}

impl MemDevice {
    pub fn new(size: usize, minimum: u32, read_only: bool) -> Self {
        MemDevice { data: RwLock::new(vec![0; size]), minimum, read_only }
    }

    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.size();
        let end = offset.checked_add(len).expect("server passed an overflowing range");
        assert!(end <= size, "server passed {offset}+{len} beyond size {size}");
        usize::try_from(offset).unwrap()..usize::try_from(end).unwrap()
    }

    /// Extents with varied, sometimes contract-breaking shapes, derived from the offset.
    fn extents(&self, offset: u64, len: u64, salt: u64) -> Vec<Extent> {
        let _ = self.range(offset, len);
        let mut out = Vec::new();
        let mut at = offset;
        let mut k = offset / 4096 + salt;
        while at < offset + len && out.len() < 64 {
            let length = match k % 7 {
                0 => 512,
                1 => 4096 * (k % 5 + 1),
                2 => 1 << 20,
                3 => u64::from(u32::MAX) + 4096, // longer than a descriptor
                4 => 1,
                5 if k % 11 == 0 => 0, // broken backend
                _ => 65536,
            };
            let flags = u32::try_from(k % 4).unwrap();
            out.push(Extent { length, flags });
            if length == 0 {
                break;
            }
            at = at.saturating_add(length);
            k += 1;
        }
        out
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        u64::try_from(self.data.read().unwrap().len()).unwrap()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn block_size(&self) -> BlockSizeLimits {
        BlockSizeLimits { minimum: self.minimum, preferred: 4096, maximum: 256 << 10 }
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, u64::try_from(buf.len()).unwrap());
        if offset % 3_000_017 == 1 {
            return Err(io::Error::from_raw_os_error(5));
        }
        buf.copy_from_slice(&self.data.read().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        assert!(!self.read_only, "write reached a read-only device");
        let r = self.range(offset, u64::try_from(buf.len()).unwrap());
        if offset % 4099 == 7 {
            return Err(io::Error::from_raw_os_error(28));
        }
        self.data.write().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, _fua: bool) -> io::Result<()> {
        assert!(!self.read_only, "zeroing reached a read-only device");
        let r = self.range(offset, len);
        if mode.fast_only && !mode.may_trim {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        self.data.write().unwrap()[r].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        assert!(!self.read_only, "trim reached a read-only device");
        let r = self.range(offset, len);
        self.data.write().unwrap()[r].fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = self.range(offset, len);
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self.extents(offset, len, 0))
    }
    fn meta_contexts(&self) -> Vec<String> {
        vec!["x-blkrep:dirty".into(), "x-blkrep:other".into()]
    }
    fn context_extents(&self, index: usize, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if index == 1 && offset % 2 == 1 {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(self.extents(offset, len, u64::try_from(index).unwrap() + 3))
    }
}

/// Reads from the fuzz input; discards what the server writes.
pub struct Duplex<'a> {
    pub input: &'a [u8],
    pub written: usize,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
