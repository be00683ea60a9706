//! A device that stores nothing, for tests of negotiation and export bookkeeping.

use std::io;

use crate::backend::{BlockDevice, BlockSizeLimits, Extent, ZeroMode};

/// A 1 MiB device whose I/O succeeds and does nothing; its shape is configurable.
pub(crate) struct NullDevice {
    pub(crate) contexts: Vec<String>,
    pub(crate) limits: BlockSizeLimits,
    pub(crate) read_only: bool,
    pub(crate) fast_zero: bool,
}

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn block_size(&self) -> BlockSizeLimits {
        self.limits
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_fast_zero(&self) -> bool {
        self.fast_zero
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn cache(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn allocation(&self, _: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.contexts.clone()
    }
}
