//! Serves a raw image (file or block device) over NBD on a unix socket until SIGINT or
//! SIGTERM, then shuts down cleanly and prints the export's counters.
//!
//! ```text
//! cargo run -p nbd-shim --example serve -- [--read-only] [--direct] [--dirty] [--tcp ADDR] IMAGE SOCKET [NAME]
//! qemu-io -f raw 'nbd+unix:///NAME?socket=SOCKET' -c 'write -P 0xab 0 1M'
//! nbdinfo --map 'nbd+unix:///NAME?socket=SOCKET'
//! ```
//!
//! `--dirty` wraps the image in a toy tracker that offers the `x-blkrep:dirty` context
//! (64 KiB blocks written since start, flag 1), which qemu tools can read as
//! `qemu:dirty-bitmap:blkrep`:
//!
//! ```text
//! nbdinfo --map=qemu:dirty-bitmap:blkrep 'nbd+unix:///NAME?socket=SOCKET'
//! ```
//!
//! Log level comes from `RUST_LOG` (default `info`).

use std::io;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use nbd_shim::backend::{BlockSizeLimits, ImageFile, ImageFileOptions};
use nbd_shim::{BlockDevice, Extent, Server, ServerConfig, ZeroMode};
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str =
    "usage: serve [--read-only] [--direct] [--dirty] [--tcp ADDR] IMAGE SOCKET [NAME]";

/// Granularity of the toy dirty map.
const DIRTY_BLOCK: u64 = 64 << 10;

/// An image plus an in-memory map of the blocks changed since start.
struct DirtyTracking {
    image: ImageFile,
    dirty: Mutex<Vec<bool>>,
}

impl DirtyTracking {
    fn new(image: ImageFile) -> Self {
        let blocks = usize::try_from(image.size().div_ceil(DIRTY_BLOCK)).unwrap_or(0);
        DirtyTracking {
            image,
            dirty: Mutex::new(vec![false; blocks]),
        }
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let first = usize::try_from(offset / DIRTY_BLOCK).unwrap_or(usize::MAX);
        let last = usize::try_from((offset + len - 1) / DIRTY_BLOCK).unwrap_or(usize::MAX);
        for block in dirty.iter_mut().take(last.saturating_add(1)).skip(first) {
            *block = true;
        }
    }
}

impl BlockDevice for DirtyTracking {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_only(&self) -> bool {
        self.image.read_only()
    }
    fn block_size(&self) -> BlockSizeLimits {
        self.image.block_size()
    }
    fn can_trim(&self) -> bool {
        self.image.can_trim()
    }
    fn can_fast_zero(&self) -> bool {
        self.image.can_fast_zero()
    }
    fn can_multi_conn(&self) -> bool {
        self.image.can_multi_conn()
    }
    fn waits_on_device(&self) -> bool {
        self.image.waits_on_device()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.image.write_at(buf, offset, fua)?;
        self.mark(offset, u64::try_from(buf.len()).unwrap_or(u64::MAX));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.image.write_zeroes(offset, len, mode, fua)?;
        self.mark(offset, len);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.image.trim(offset, len, fua)?;
        self.mark(offset, len);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.image.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.cache(offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.image.allocation(offset, len)
    }
    fn meta_contexts(&self) -> Vec<String> {
        vec!["x-blkrep:dirty".to_owned()]
    }
    fn context_extents(&self, index: usize, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if index != 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let end = (offset + len).min(self.size());
        let mut extents: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let block_end = ((at / DIRTY_BLOCK + 1) * DIRTY_BLOCK).min(end);
            let index = usize::try_from(at / DIRTY_BLOCK).unwrap_or(usize::MAX);
            let flags = u32::from(dirty.get(index).copied().unwrap_or(false));
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += block_end - at,
                _ => extents.push(Extent {
                    length: block_end - at,
                    flags,
                }),
            }
            at = block_end;
        }
        Ok(extents)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(io::stderr)
        .init();

    let mut options = ImageFileOptions::default();
    let mut dirty = false;
    let mut tcp = None;
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--read-only" => options.read_only = true,
            "--direct" => options.direct = true,
            "--dirty" => dirty = true,
            "--tcp" => tcp = args.next(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => positional.push(arg),
        }
    }
    let (image, socket, name) = match positional.as_slice() {
        [image, socket] => (image, socket, ""),
        [image, socket, name] => (image, socket, name.as_str()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };

    // Block the signals before any thread starts so every thread inherits the mask and
    // only the sigwait below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(err) = signals.thread_block() {
        eprintln!("blocking signals: {err}");
        return ExitCode::FAILURE;
    }

    let dev: Arc<dyn BlockDevice> = match ImageFile::open(image, options) {
        Ok(dev) if dirty => Arc::new(DirtyTracking::new(dev)),
        Ok(dev) => Arc::new(dev),
        Err(err) => {
            eprintln!("{image}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let server = Server::new(ServerConfig::default());
    if let Err(err) = server.add_export(name, Some(format!("raw image {image}")), dev) {
        eprintln!("{err}");
        return ExitCode::FAILURE;
    }
    if let Err(err) = server.listen_unix(socket) {
        eprintln!("{err}");
        return ExitCode::FAILURE;
    }
    if let Some(addr) = tcp {
        match server.listen_tcp(addr.as_str()) {
            Ok(bound) => eprintln!("listening on tcp {bound}"),
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("serving {image} as {name:?} on {socket}");

    match signals.wait() {
        Ok(signal) => eprintln!("{signal}: shutting down"),
        Err(err) => eprintln!("sigwait: {err}; shutting down"),
    }
    server.shutdown();
    if let Some(stats) = server.export_stats(name) {
        eprintln!("{stats:?}");
    }
    ExitCode::SUCCESS
}
