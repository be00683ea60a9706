//! The I/O of transfer files: chunk frames appended to the `.part` file of the
//! transfer being received, and read back by the apply, with `O_DIRECT` where the
//! filesystem allows it.
//!
//! Why: buffered I/O copies every received byte into the page cache when the frame is
//! stored and out of it again when the transfer is applied, and the kernel writes the
//! dirty pages back in between. On this project's 2-core test machine those two copies
//! were the largest costs of receiving and applying (about half of the replica's CPU
//! under a 64k random-write load), on the cores the primary's VM also needs. With
//! `O_DIRECT` the device reads each frame from the writer's memory and later writes it
//! into the reader's, and no page is dirtied. The bytes still cross the device twice,
//! as they did through writeback and (for a transfer applied after its pages were
//! evicted) the read.
//!
//! Writing: `O_DIRECT` needs the memory, the file offset and the length aligned to the
//! device's logical block; [`IoBuf::ALIGN`] (4 KiB) covers every device. Frames have
//! any length, so [`PartWriter`] keeps the file's last partial block in its aligned
//! buffer, and each append writes from that block's start: the partial block again,
//! then the frame, then zeros up to the next block boundary. Until the next append
//! overwrites them, the file may hold up to 4 KiB - 1 zero bytes past its last frame.
//! Nothing reads them as a frame: the apply reads the number of chunks the queue
//! records, and recovery after a crash cuts the file after its last valid frame (the
//! same contract as a recycled spare's stale bytes, see `spare`).
//!
//! Reading: [`FrameSource`] reads the file in 4 MiB aligned blocks on a thread of its
//! own, ahead of the apply, and hands out the frames in them; a frame cut by the end
//! of a block is moved to the front of the next buffer before the next block is read
//! behind it.
//!
//! A replica that keeps recovery points reads each transfer twice when it applies it
//! (what the changes overwrite is captured first, then they are written): its
//! transfers are written and read through the page cache, where the second pass finds
//! them. Written past the cache, such a transfer of 512 MiB took 1.25 s to apply on
//! the test machine instead of 0.64 s: its first pass had to come from the device.
//!
//! Durability: as with buffered writes, none. `O_DIRECT` bypasses the page cache, not
//! the device's cache, and block allocation is metadata: [`Replica::commit`]'s
//! `fdatasync` makes the transfer durable.
//!
//! Filesystems without `O_DIRECT` (tmpfs before Linux 6.6, some FUSE filesystems)
//! refuse the open or an operation with `EINVAL`; the file is then written and read
//! buffered, as before, and a written range is queued for writeback at once.
//!
//! [`Replica::commit`]: super::Replica::commit

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use nbd_shim::engine::{IoBuf, IoBufPool};
use wire::chunk::{ChunkHeader, CHUNK_HEADER_LEN, MAX_CHUNK_BODY};

use super::receive::read_frame;

/// The largest frame a transfer file holds.
const MAX_FRAME: usize = CHUNK_HEADER_LEN + MAX_CHUNK_BODY as usize;
/// Bytes [`FrameSource`] reads at once.
const READ_BLOCK: usize = 4 << 20;

/// Alignment of `O_DIRECT` offsets and lengths.
const ALIGN: usize = IoBuf::ALIGN;
/// Bytes of one read-ahead buffer: a block, behind the frame the block before cut
/// (moved to the front from its block boundary).
const READ_BUFFER: usize = READ_BLOCK + MAX_FRAME + ALIGN;

/// Read-ahead buffers kept between transfers, enough for two files read at once. A
/// replica applying a transfer every second would otherwise map, zero (a page fault
/// per 4 KiB) and unmap 18 MiB each time, in stretches of kernel time on the cores
/// its host's guests may need.
static READ_BUFFERS: IoBufPool = IoBufPool::new(READ_BUFFER, 2 * READ_BLOCKS);
/// [`PartWriter`]s' aligned last blocks kept between transfers.
static WRITE_BLOCKS: IoBufPool = IoBufPool::new(ALIGN + MAX_FRAME, 2);

/// The open `.part` file of one transfer, and where its next frame goes.
#[derive(Debug)]
pub(super) struct PartWriter {
    file: File,
    /// The transfer whose frames the file holds.
    transfer: u64,
    /// Bytes of frames in the file; the next frame goes here.
    len: u64,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// `O_DIRECT`: `block[..tail]` are the file's bytes from the last block boundary
    /// at or before `len` up to `len`.
    Direct { block: IoBuf, tail: usize },
    /// Buffered writes.
    Buffered,
}

impl PartWriter {
    /// Opens the `.part` file at `path` of transfer `transfer`, whose frames fill its
    /// first `len` bytes, for direct writes if `direct` and the filesystem allows them.
    pub(super) fn open(path: &Path, transfer: u64, len: u64, direct: bool) -> io::Result<Self> {
        let (file, mode) = match open_direct(OpenOptions::new().write(true), path, direct)? {
            Some(file) => {
                let mut block = WRITE_BLOCKS.take()?;
                let tail = partial_block(len);
                if tail > 0 {
                    // Read through a buffered descriptor: a few bytes, any alignment.
                    File::open(path)?
                        .read_exact_at(&mut block.as_mut_slice()[..tail], len - tail as u64)?;
                }
                (file, Mode::Direct { block, tail })
            }
            None => (OpenOptions::new().write(true).open(path)?, Mode::Buffered),
        };
        Ok(PartWriter {
            file,
            transfer,
            len,
            mode,
        })
    }

    /// Whether this writer appends the frames of `transfer` after `len` bytes.
    pub(super) fn continues(&self, transfer: u64, len: u64) -> bool {
        self.transfer == transfer && self.len == len
    }

    /// Whether writes bypass the page cache.
    #[cfg(test)]
    pub(super) fn is_direct(&self) -> bool {
        matches!(self.mode, Mode::Direct { .. })
    }

    /// Appends `frame` (at most a whole chunk frame). On failure the file is cut back
    /// to the frames before it, so no partial frame is left behind.
    pub(super) fn append(&mut self, frame: &[u8]) -> io::Result<()> {
        let written = match &mut self.mode {
            Mode::Direct { block, tail } => {
                match write_direct(&self.file, block, tail, self.len, frame) {
                    Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                        // Opened, but the filesystem refuses direct writes after all.
                        tracing::debug!(
                            "The transfer file refuses O_DIRECT writes; writing it buffered"
                        );
                        self.file = reopen_buffered(&self.file, OpenOptions::new().write(true))?;
                        self.mode = Mode::Buffered;
                        write_buffered(&self.file, self.len, frame)
                    }
                    other => other,
                }
            }
            Mode::Buffered => write_buffered(&self.file, self.len, frame),
        };
        match written {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(error) => {
                let _ = self.file.set_len(self.len);
                Err(error)
            }
        }
    }
}

/// `path` opened with `options` and `O_DIRECT` if `direct`; `None` if not `direct`
/// or the filesystem refuses `O_DIRECT` (`EINVAL`).
fn open_direct(options: &mut OpenOptions, path: &Path, direct: bool) -> io::Result<Option<File>> {
    if !direct {
        return Ok(None);
    }
    match options.custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(error) => Err(error),
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        if let Mode::Direct { block, .. } = std::mem::replace(&mut self.mode, Mode::Buffered) {
            WRITE_BLOCKS.give(block);
        }
    }
}

/// Bytes of the last, partial block of a file of `len` bytes.
fn partial_block(len: u64) -> usize {
    // Lossless: the remainder is below ALIGN.
    #[allow(clippy::cast_possible_truncation)]
    let tail = (len % ALIGN as u64) as usize;
    tail
}

/// Writes `frame` at `len` from the block boundary before it: `block[..tail]` holds
/// the file's bytes between the two. Leaves the new partial block in `block[..tail]`.
fn write_direct(
    file: &File,
    block: &mut IoBuf,
    tail: &mut usize,
    len: u64,
    frame: &[u8],
) -> io::Result<()> {
    let end = *tail + frame.len();
    let padded = end.next_multiple_of(ALIGN);
    if padded > block.capacity() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("A frame of {} bytes is larger than a chunk", frame.len()),
        ));
    }
    block.set_len(padded);
    let bytes = block.as_mut_slice();
    bytes[*tail..end].copy_from_slice(frame);
    bytes[end..].fill(0);
    file.write_all_at(bytes, len - *tail as u64)?;
    let new_tail = partial_block(len + frame.len() as u64);
    bytes.copy_within(end - new_tail..end, 0);
    *tail = new_tail;
    Ok(())
}

/// Writes `frame` at `len` through the page cache and queues it for the device.
fn write_buffered(file: &File, len: u64, frame: &[u8]) -> io::Result<()> {
    file.write_all_at(frame, len)?;
    // The commit's sync then finds the chunks written already.
    image_ops::writeback::start_writeback(file, len, frame.len() as u64);
    Ok(())
}

/// The file `file` is open on (not the path, which could name another file by now),
/// opened again with `options`, so without `O_DIRECT`.
fn reopen_buffered(file: &File, options: &OpenOptions) -> io::Result<File> {
    options.open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Reads the frames of a transfer file in order.
#[derive(Debug)]
pub(super) struct FrameSource {
    mode: ReadMode,
}

#[derive(Debug)]
enum ReadMode {
    /// `O_DIRECT`, blocks read ahead by a thread of their own.
    Direct(ReadAhead),
    /// Buffered reads, each frame into `frame`.
    Buffered { file: File, frame: Vec<u8> },
}

/// Blocks of a file read ahead by the thread [`read_ahead`], and the one being handed out.
///
/// Dropping it stops the thread (see [`ReadAhead::drop`]) and hands every buffer back
/// to [`READ_BUFFERS`].
#[derive(Debug)]
struct ReadAhead {
    /// Blocks read (or the read's error), in order.
    blocks: Receiver<io::Result<Block>>,
    /// Blocks handed back, to be read into again; `None` once dropping.
    spares: Option<Sender<IoBuf>>,
    /// The other end of `spares`, for the buffers the thread leaves there.
    unused: Receiver<IoBuf>,
    /// Tells the thread to stop before its next read.
    stop: Arc<AtomicBool>,
    current: Option<Block>,
    /// The file, for going on buffered if a direct read is refused.
    file: File,
    reader: Option<JoinHandle<()>>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // The thread stops before its next read, and a spare it waits for never comes.
        self.stop.store(true, Ordering::Relaxed);
        self.spares = None;
        if let Some(block) = self.current.take() {
            READ_BUFFERS.give(block.bytes);
        }
        // Blocks it sends meanwhile come back here; the channel ends with the thread.
        for block in self.blocks.iter().flatten() {
            READ_BUFFERS.give(block.bytes);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        for spare in self.unused.try_iter() {
            READ_BUFFERS.give(spare);
        }
    }
}

/// Whole frames read ahead: `bytes[start..end]`, which is the file from `offset +
/// start` on, holds only whole frames (from their first byte to their last), and
/// `then` says what follows them.
#[derive(Debug)]
struct Block {
    bytes: IoBuf,
    offset: u64,
    start: usize,
    end: usize,
    then: Then,
}

/// What follows the whole frames of a [`Block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// The next block.
    More,
    /// The end of the file.
    End,
    /// A frame cut short by the end of the file.
    Cut,
    /// Bytes that are not a frame header.
    NotAFrame,
}

/// Blocks a reader uses: one handed out, one read ahead, one being read.
const READ_BLOCKS: usize = 3;

impl FrameSource {
    /// Opens the transfer file at `path`, for direct reads if `direct` and the
    /// filesystem allows them. Buffered reads suit a file read more than once: its
    /// pages stay cached for the next pass.
    pub(super) fn open(path: &Path, direct: bool) -> io::Result<Self> {
        let mode = match open_direct(OpenOptions::new().read(true), path, direct)? {
            Some(file) => ReadMode::Direct(ReadAhead::start(file)?),
            None => ReadMode::Buffered {
                file: File::open(path)?,
                frame: Vec::new(),
            },
        };
        Ok(FrameSource { mode })
    }

    /// The next frame: its header parsed and its length whole, not checked further;
    /// `None` at the end of the file. A header that does not parse, or a frame cut
    /// short by the end of the file, is an `InvalidData` or `UnexpectedEof` error.
    pub(super) fn next_frame(&mut self) -> io::Result<Option<&[u8]>> {
        if let ReadMode::Direct(ahead) = &mut self.mode {
            match ahead.advance() {
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    self.read_buffered_from_here()?;
                }
                other => other?,
            }
        }
        match &mut self.mode {
            ReadMode::Direct(ahead) => ahead.take_frame(),
            ReadMode::Buffered { file, frame } => {
                Ok(read_frame(file, frame)?.then_some(frame.as_slice()))
            }
        }
    }

    /// Goes on with buffered reads from the first byte not handed out yet.
    fn read_buffered_from_here(&mut self) -> io::Result<()> {
        let ReadMode::Direct(ahead) = &self.mode else {
            return Ok(());
        };
        tracing::debug!("The transfer file refuses O_DIRECT reads; reading it buffered");
        let mut file = reopen_buffered(&ahead.file, OpenOptions::new().read(true))?;
        file.seek(SeekFrom::Start(ahead.position()))?;
        self.mode = ReadMode::Buffered {
            file,
            frame: Vec::new(),
        };
        Ok(())
    }
}

impl ReadAhead {
    fn start(file: File) -> io::Result<Self> {
        let (block_tx, blocks) = crossbeam_channel::bounded(1);
        let (spares, spare_rx) = crossbeam_channel::bounded(READ_BLOCKS);
        for _ in 0..READ_BLOCKS {
            spares
                .send(READ_BUFFERS.take()?)
                .expect("the receiver is held here");
        }
        let reading = file.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (unused, stopped) = (spare_rx.clone(), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("transfer-read".into())
            .spawn(move || read_ahead(&reading, &block_tx, &spare_rx, &stopped))?;
        Ok(ReadAhead {
            blocks,
            spares: Some(spares),
            unused,
            stop,
            current: None,
            file,
            reader: Some(thread),
        })
    }

    /// Where the next frame starts in the file.
    fn position(&self) -> u64 {
        self.current
            .as_ref()
            .map_or(0, |block| block.offset + block.start as u64)
    }

    /// Moves to the next block once the current one has no frame left.
    fn advance(&mut self) -> io::Result<()> {
        if self
            .current
            .as_ref()
            .is_some_and(|b| b.start < b.end || b.then != Then::More)
        {
            return Ok(());
        }
        let next = match self.blocks.recv() {
            Ok(next) => next?,
            Err(_) => return Err(io::Error::other("The transfer file's reader stopped")),
        };
        if let Some(done) = self.current.replace(next) {
            if let Some(spares) = &self.spares {
                let _ = spares.send(done.bytes);
            }
        }
        Ok(())
    }

    fn take_frame(&mut self) -> io::Result<Option<&[u8]>> {
        let Some(block) = self.current.as_mut() else {
            return Ok(None);
        };
        if block.start == block.end {
            return match block.then {
                Then::More | Then::End => Ok(None),
                Then::Cut => Err(io::ErrorKind::UnexpectedEof.into()),
                Then::NotAFrame => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "Bytes that are not a chunk frame",
                )),
            };
        }
        let bytes = &block.bytes.as_slice()[block.start..block.end];
        let len = ChunkHeader::parse(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            .frame_len();
        let frame = &bytes[..len];
        block.start += len;
        Ok(Some(frame))
    }
}

/// The read-ahead thread: reads `file` with `O_DIRECT` into the buffers of `spares`,
/// in blocks that end after the last whole frame in them; the bytes of a frame cut by
/// the end of a read go to the front of the next buffer (from the block boundary
/// before them, so reads stay aligned in the file and in memory). Stops at the end of
/// the file, at the first bytes that are no frame, at an error (sent on), or when the
/// consumer stops it or is gone; a buffer it holds then goes back to [`READ_BUFFERS`].
fn read_ahead(
    file: &File,
    blocks: &Sender<io::Result<Block>>,
    spares: &Receiver<IoBuf>,
    stop: &AtomicBool,
) {
    let Ok(mut bytes) = spares.recv() else { return };
    // The file offset of bytes[0], the first unsent frame byte, and the bytes filled.
    let (mut offset, mut start, mut filled) = (0u64, 0usize, 0usize);
    loop {
        if stop.load(Ordering::Relaxed) {
            READ_BUFFERS.give(bytes);
            return;
        }
        let want = READ_BLOCK.min(bytes.capacity() - filled);
        bytes.set_len(filled + want);
        let read = match file.read_at(&mut bytes.as_mut_slice()[filled..], offset + filled as u64) {
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                READ_BUFFERS.give(bytes);
                let _ = blocks.send(Err(error));
                return;
            }
        };
        filled += read;
        // Reads end short only at the end of the file.
        let ended = read == 0 || read % ALIGN != 0;
        let (end, stop) = whole_frames(&bytes.as_slice()[..filled], start);
        let then = match stop {
            Some(then) => then,
            None if ended => {
                if end == filled {
                    Then::End
                } else {
                    Then::Cut
                }
            }
            None => Then::More,
        };
        let mut next = None;
        if then == Then::More {
            let Ok(mut spare) = spares.recv() else {
                READ_BUFFERS.give(bytes);
                return;
            };
            let keep = end - end % ALIGN;
            spare.set_len(filled - keep);
            spare
                .as_mut_slice()
                .copy_from_slice(&bytes.as_slice()[keep..filled]);
            next = Some((spare, offset + keep as u64, end - keep, filled - keep));
        }
        let block = Block {
            bytes,
            offset,
            start,
            end,
            then,
        };
        if let Err(refused) = blocks.send(Ok(block)) {
            if let Ok(block) = refused.into_inner() {
                READ_BUFFERS.give(block.bytes);
            }
            if let Some((spare, ..)) = next {
                READ_BUFFERS.give(spare);
            }
            return;
        }
        let Some((spare, next_offset, next_start, next_filled)) = next else {
            return;
        };
        (bytes, offset, start, filled) = (spare, next_offset, next_start, next_filled);
    }
}

/// Where the whole frames of `bytes` from `start` on end, and what stops them if it is
/// not the end of `bytes`' whole frames: bytes that are no frame header.
fn whole_frames(bytes: &[u8], mut start: usize) -> (usize, Option<Then>) {
    while bytes.len() - start >= CHUNK_HEADER_LEN {
        let Ok(header) = ChunkHeader::parse(&bytes[start..]) else {
            return (start, Some(Then::NotAFrame));
        };
        if bytes.len() - start < header.frame_len() {
            break;
        }
        start += header.frame_len();
    }
    (start, None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;

    /// An empty transfer file in a new directory (which goes when the first is dropped).
    fn empty_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.part");
        File::create(&path).unwrap();
        (dir, path)
    }

    fn frames() -> Vec<Vec<u8>> {
        // Lengths that start and end anywhere within a block, a whole block, and a
        // whole chunk frame.
        [
            1,
            100,
            4095,
            4096,
            4097,
            12_345,
            CHUNK_HEADER_LEN + MAX_CHUNK_BODY as usize,
            7,
        ]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|b| (b * 7 + i * 13) as u8).collect())
        .collect()
    }

    #[test]
    fn appended_frames_are_the_file_in_order_whatever_their_alignment() {
        let (_dir, path) = empty_file();
        let mut writer = PartWriter::open(&path, 7, 0, true).unwrap();
        let mut expected = Vec::new();
        for frame in frames() {
            writer.append(&frame).unwrap();
            expected.extend_from_slice(&frame);
            assert!(writer.continues(7, expected.len() as u64));
        }
        let stored = std::fs::read(&path).unwrap();
        // Direct writes leave zeros up to the next block boundary.
        assert_eq!(&stored[..expected.len()], &expected[..]);
        assert!(stored[expected.len()..].iter().all(|&b| b == 0));
        assert!(stored.len() < expected.len() + ALIGN);
    }

    #[test]
    fn a_writer_opened_after_a_restart_continues_the_partial_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.part");
        let frames = frames();
        File::create(&path).unwrap();
        let mut expected = Vec::new();
        for frame in &frames {
            // A new writer for every frame, as after a restart between chunks.
            let mut writer = PartWriter::open(&path, 7, expected.len() as u64, true).unwrap();
            writer.append(frame).unwrap();
            expected.extend_from_slice(frame);
        }
        assert_eq!(
            &std::fs::read(&path).unwrap()[..expected.len()],
            &expected[..]
        );
    }

    #[test]
    fn a_recycled_file_is_overwritten_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.part");
        std::fs::write(&path, vec![0xEE; 3 * ALIGN + 5]).unwrap();
        let mut writer = PartWriter::open(&path, 7, 0, true).unwrap();
        writer.append(&[1; 10]).unwrap();
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(&stored[..10], &[1; 10]);
        // Past the written blocks, the older bytes stay (see `spare`).
        assert_eq!(stored.len(), 3 * ALIGN + 5);
        assert!(stored[ALIGN..].iter().all(|&b| b == 0xEE));
    }

    /// Frames with valid headers (the reader checks only those) and bodies of the
    /// given lengths.
    fn framed(bodies: &[usize]) -> Vec<Vec<u8>> {
        bodies
            .iter()
            .enumerate()
            .map(|(index, &len)| {
                // A stored body: flags 0, raw length = body length; the CRC is not
                // the reader's business.
                let mut frame = vec![0u8; CHUNK_HEADER_LEN];
                frame[..4].copy_from_slice(&wire::chunk::CHUNK_MAGIC);
                frame[4] = wire::chunk::CHUNK_VERSION;
                frame[8..16].copy_from_slice(&7u64.to_le_bytes());
                frame[16..20].copy_from_slice(&(index as u32).to_le_bytes());
                frame[20..24].copy_from_slice(&(len as u32).to_le_bytes());
                frame[24..28].copy_from_slice(&(len as u32).to_le_bytes());
                frame.extend((0..len).map(|b| (b * 3 + index) as u8));
                frame
            })
            .collect()
    }

    #[test]
    fn frames_are_read_back_in_order_across_read_blocks() {
        let (_dir, path) = empty_file();
        // More than a read block, with frames cut at every block end.
        let bodies: Vec<usize> = (0..12)
            .map(|i| wire::chunk::MAX_CHUNK_RAW as usize - i * 4099)
            .collect();
        let frames = framed(&bodies);
        let mut writer = PartWriter::open(&path, 7, 0, true).unwrap();
        for frame in &frames {
            writer.append(frame).unwrap();
        }
        for direct in [true, false] {
            let mut source = FrameSource::open(&path, direct).unwrap();
            for frame in &frames {
                assert_eq!(source.next_frame().unwrap(), Some(frame.as_slice()));
            }
            // The padding after the last frame is no frame.
            let rest = source.next_frame();
            assert!(matches!(rest, Ok(None) | Err(_)), "{rest:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever the frame lengths, the writer opened again at any frame (a
        /// restart), and the read mode, the frames read back are the frames written.
        #[test]
        fn frames_written_are_the_frames_read(
            bodies in proptest::collection::vec(
                proptest::prop_oneof![1usize..5000, 5000usize..=wire::chunk::MAX_CHUNK_RAW as usize],
                1..12,
            ),
            reopen_every in 1usize..8,
            direct_writes: bool,
        ) {
            let (_dir, path) = empty_file();
            let frames = framed(&bodies);
            let mut len = 0u64;
            let mut writer = PartWriter::open(&path, 7, 0, direct_writes).unwrap();
            for (index, frame) in frames.iter().enumerate() {
                if index % reopen_every == 0 {
                    writer = PartWriter::open(&path, 7, len, direct_writes).unwrap();
                }
                writer.append(frame).unwrap();
                len += frame.len() as u64;
                proptest::prop_assert!(writer.continues(7, len));
            }
            for direct in [true, false] {
                let mut source = FrameSource::open(&path, direct).unwrap();
                for frame in &frames {
                    proptest::prop_assert_eq!(source.next_frame().unwrap(), Some(frame.as_slice()));
                }
            }
        }
    }

    #[test]
    fn a_reader_dropped_before_the_end_stops_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.xfer");
        let frames = framed(&[wire::chunk::MAX_CHUNK_RAW as usize; 8]);
        std::fs::write(&path, frames.concat()).unwrap();
        let mut source = FrameSource::open(&path, true).unwrap();
        assert_eq!(source.next_frame().unwrap(), Some(frames[0].as_slice()));
        // Drop joins the read-ahead thread, which is blocked on a full queue.
        drop(source);
    }

    #[test]
    fn bytes_that_are_no_frame_or_a_cut_frame_end_the_frames_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.xfer");
        let frames = framed(&[300, 9000]);
        let whole = frames.concat();
        let not_a_frame = [whole.clone(), vec![0xAB; 100]].concat();
        let cut = whole[..whole.len() - 1].to_vec();
        for (bytes, whole_frames, kind) in [
            (not_a_frame, 2, io::ErrorKind::InvalidData),
            (cut, 1, io::ErrorKind::UnexpectedEof),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            for direct in [true, false] {
                let mut source = FrameSource::open(&path, direct).unwrap();
                for frame in &frames[..whole_frames] {
                    assert_eq!(source.next_frame().unwrap(), Some(frame.as_slice()));
                }
                let error = source.next_frame().unwrap_err();
                assert_eq!(error.kind(), kind, "{error}");
            }
        }
    }

    #[test]
    fn without_o_direct_the_file_is_written_and_read_buffered() {
        // What a filesystem that refuses O_DIRECT gets (older tmpfs, some FUSE).
        let (_dir, path) = empty_file();
        let frames = framed(&[10, 4096, 70_000]);
        let mut writer = PartWriter::open(&path, 7, 0, false).unwrap();
        assert!(!writer.is_direct());
        for frame in &frames {
            writer.append(frame).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), frames.concat());
        let mut source = FrameSource::open(&path, false).unwrap();
        for frame in &frames {
            assert_eq!(source.next_frame().unwrap(), Some(frame.as_slice()));
        }
        assert_eq!(source.next_frame().unwrap(), None);
    }

    #[test]
    fn a_failed_append_leaves_the_frames_before_it() {
        let (_dir, path) = empty_file();
        let mut writer = PartWriter::open(&path, 7, 0, true).unwrap();
        writer.append(&[3; 5000]).unwrap();
        let too_big = vec![4; 2 * MAX_FRAME];
        if writer.is_direct() {
            assert!(writer.append(&too_big).is_err());
            assert!(writer.continues(7, 5000));
            assert_eq!(std::fs::read(&path).unwrap().len(), 5000);
        }
        writer.append(&[5; 3]).unwrap();
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(&stored[..5000], &[3; 5000][..]);
        assert_eq!(&stored[5000..5003], &[5; 3]);
    }
}
