//! The log ring: a preallocated file holding two superblock copies and the record
//! area, written with `pwrite` and read through a read-only mapping. Records are
//! reserved at the tail under the group lock (small ones written whole right there,
//! large ones committed without it: the payload, then its commit CRC), read back as
//! closed cycles, and freed when the consumer acknowledges them. Ring positions only
//! grow: a record's place in the file is its position modulo the ring size, and no
//! record wraps past the end (a pad record fills the gap). The superblock records the
//! head, the acknowledged cycle, the resync state and the activity log.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tracing::warn;

use super::{lock, usize_of, Group, Range, Shared, State, TrackingMode};
use crate::cycle::{ClosedCycle, CycleStats, ExtentMap, Source};
use crate::record::{
    commit_crc, commit_marker, is_commit_word, record_len, stored_commit_crc, RecordHeader,
    RecordKind, COMMIT_CRC_AT, HEADER_LEN,
};
use crate::superblock::{ResyncReason, Superblock, DATA_START, SUPERBLOCK_LEN};
use crate::TrackerError;

#[derive(Debug, Clone, Copy)]
pub(super) struct CloseMark {
    pub(super) cycle: u64,
    pub(super) end_pos: u64,
    pub(super) end_seq: u64,
}
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub(super) cycle: u64,
    pub(super) seq: u64,
    /// Offset of the record header in the ring file.
    pub(super) file_offset: u64,
    /// Disk offset of the record's range.
    pub(super) offset: u64,
    pub(super) payload_len: u32,
    /// Whether the record was written whole, commit CRC included, when reserved.
    pub(super) committed: bool,
}

/// What [`Shared::reserve`] writes besides the header.
#[derive(Debug, Clone, Copy)]
pub(super) enum Contents<'a> {
    /// This payload (empty for zeroes, trims and close markers) and the commit CRC,
    /// with the header in one call: the record is complete when reserved.
    Whole(&'a [u8]),
    /// Room for a payload of this many bytes, written later by [`Shared::commit`]
    /// without the group lock (large payloads, so writers copy in parallel).
    Later(u32),
}

/// How far ahead of its position the recovery scan reads the ring in.
const SCAN_READ_AHEAD: u64 = 16 << 20;

/// Payloads up to this size are written with their header under the group lock, in
/// one `pwritev`; larger ones are committed after the lock is released.
pub(super) const WHOLE_PAYLOAD_MAX: usize = 64 << 10;

impl Group {
    /// Closes the open cycle now. Returns the closed cycle's number. Never waits for
    /// writers; [`Group::take_closed`] does.
    pub fn close_cycle(&self) -> Result<u64, TrackerError> {
        let mut state = lock(&self.shared.state);
        if let Some(reason) = state.resync {
            return Err(TrackerError::ResyncRequired(reason));
        }
        let cycle = state.open_cycle;
        let slot = self.shared.reserve(
            &mut state,
            usize::MAX,
            RecordKind::CycleClose,
            Range { start: 0, end: 0 },
            Contents::Whole(&[]),
        )?;
        if slot.is_none() {
            // The close marker itself did not fit (the ring overflowed) or could not be
            // written.
            let reason = state.resync.unwrap_or(ResyncReason::RingOverflow);
            return Err(TrackerError::ResyncRequired(reason));
        }
        let mark = CloseMark {
            cycle,
            end_pos: state.tail,
            end_seq: state.next_seq,
        };
        state.closed.push_back(mark);
        state.open_cycle += 1;
        for disk in &self.shared.disks {
            // The open map restarts with the new cycle; the closed cycle's blocks are in
            // its records.
            drop(disk.open_bits.take());
        }
        Ok(cycle)
    }

    /// The oldest closed, unacknowledged cycle, once every write in it has completed.
    /// Includes all earlier unacknowledged cycles. `None` if no cycle is closed.
    pub fn take_closed(&self) -> Result<Option<ClosedCycle>, TrackerError> {
        let shared = &self.shared;
        let mut state = lock(&shared.state);
        if state.consumer_busy {
            return Err(TrackerError::ConsumerBusy);
        }
        let Some(mark) = state.closed.front().copied() else {
            return Ok(None);
        };
        state = shared.wait_while(state, |state| {
            state
                .inflight
                .iter()
                .any(|(cycle, count)| *cycle <= mark.cycle && *count > 0)
        });
        state.consumer_busy = true;
        let (head, head_seq) = (state.head, state.head_seq);
        drop(state);
        Ok(Some(shared.view(
            head,
            head_seq,
            mark.end_pos,
            mark.end_seq,
            mark.cycle,
            false,
        )))
    }
}

pub(super) struct Scan {
    pub(super) tail: u64,
    pub(super) next_seq: u64,
    pub(super) closed: VecDeque<CloseMark>,
    pub(super) max_cycle: u64,
    pub(super) committed: u64,
    /// Ring positions of the uncommitted records, for [`Shared::withdraw_at`].
    pub(super) uncommitted_at: Vec<u64>,
}

impl Shared {
    fn header_bytes(&self, pos: u64) -> &[u8] {
        let phys = pos % self.ring_size;
        self.ring_bytes(DATA_START + phys, HEADER_LEN as u64)
    }

    /// Bytes of the ring file's mapping.
    pub(crate) fn ring_bytes(&self, file_offset: u64, len: u64) -> &[u8] {
        assert!(
            file_offset + len <= DATA_START + self.ring_size,
            "ring access out of bounds"
        );
        // SAFETY: the range is inside the mapping (asserted). Callers only read records
        // that are committed and not yet acknowledged, which no writer modifies: space
        // is reserved only at the tail and reused only after acknowledgement.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(usize_of(file_offset)), usize_of(len))
        }
    }

    /// Asks the kernel to read ring positions `from..to` into the page cache now. The
    /// mapping is advised random (see `Group::open`), so its faults read one page at a
    /// time; readers of a long stretch of records that may be cold (after a reboot,
    /// or evicted) ask for it up front. Best effort, and cheap for cached pages.
    pub(super) fn read_ahead(&self, from: u64, to: u64) {
        let mut pos = from;
        while pos < to {
            let phys = pos % self.ring_size;
            let len = (to - pos).min(self.ring_size - phys);
            let _ = self.map.advise_range(
                memmap2::Advice::WillNeed,
                usize_of(DATA_START + phys),
                usize_of(len),
            );
            pos += len;
        }
    }

    /// Takes ring positions `from..to`, whose records are acknowledged, out of this
    /// process's page tables; the bytes stay in the page cache and the file. The
    /// consumer read them through the mapping: left mapped, every later writeback of
    /// those pages must walk the mapping to write-protect them, and the daemon's
    /// resident size grows to the whole ring. Best effort.
    pub(super) fn unmap_acknowledged(&self, from: u64, to: u64) {
        let mut pos = from;
        while pos < to {
            let phys = pos % self.ring_size;
            let len = (to - pos).min(self.ring_size - phys);
            // SAFETY: the mapping is a shared, read-only mapping of the ring file, so
            // MADV_DONTNEED discards no data: a later access maps the same page-cache
            // page again (also for the record after `to` that may share the last
            // page). The range is inside the mapping, and memmap2 widens it to pages.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    usize_of(DATA_START + phys),
                    usize_of(len),
                )
            };
            pos += len;
        }
    }

    /// Walks the ring from `pos`, following consecutive sequence numbers.
    pub(super) fn scan(&self, mut pos: u64, mut seq: u64) -> Scan {
        let limit = pos + self.ring_size;
        let mut read_to = pos;
        let mut scan = Scan {
            tail: pos,
            next_seq: seq,
            closed: VecDeque::new(),
            max_cycle: 0,
            committed: 0,
            uncommitted_at: Vec::new(),
        };
        loop {
            let phys = pos % self.ring_size;
            if self.ring_size - phys < HEADER_LEN as u64 {
                pos += self.ring_size - phys;
            }
            if pos + HEADER_LEN as u64 > limit {
                break;
            }
            if pos >= read_to {
                let next = (pos + SCAN_READ_AHEAD).min(limit);
                self.read_ahead(pos, next);
                read_to = next;
            }
            let phys = pos % self.ring_size;
            let bytes = self.header_bytes(pos);
            let Ok(header) = RecordHeader::decode(bytes) else {
                break;
            };
            let len = header.ring_len();
            if header.seq != seq || phys + len > self.ring_size || pos + len > limit {
                break;
            }
            match header.kind {
                RecordKind::Pad => {}
                RecordKind::CycleClose => {
                    scan.closed.push_back(CloseMark {
                        cycle: header.cycle,
                        end_pos: pos + len,
                        end_seq: seq + 1,
                    });
                    scan.max_cycle = scan.max_cycle.max(header.cycle);
                }
                RecordKind::Write | RecordKind::Zero | RecordKind::Trim => {
                    if self.is_committed(pos, &header) {
                        scan.committed += 1;
                    } else {
                        scan.uncommitted_at.push(pos);
                    }
                    scan.max_cycle = scan.max_cycle.max(header.cycle);
                }
            }
            pos += len;
            seq += 1;
            scan.tail = pos;
            scan.next_seq = seq;
        }
        scan
    }

    fn is_committed(&self, pos: u64, header: &RecordHeader) -> bool {
        let payload = self.ring_bytes(
            DATA_START + pos % self.ring_size + HEADER_LEN as u64,
            u64::from(header.payload_len),
        );
        is_commit_word(
            stored_commit_crc(self.header_bytes(pos)),
            header.seq,
            payload,
        )
    }

    /// A coalesced view of the committed records in `head..end_pos`.
    pub(super) fn view(
        self: &Arc<Self>,
        head: u64,
        head_seq: u64,
        end_pos: u64,
        end_seq: u64,
        cycle: u64,
        recovery: bool,
    ) -> ClosedCycle {
        let mut writes: Vec<Vec<(u64, u64, Source)>> = vec![Vec::new(); self.disks.len()];
        let mut stats = CycleStats::default();
        if recovery {
            // After a crash the records may be cold; a live consumer's were just
            // written and are cached, so walking the page cache for them is waste.
            self.read_ahead(head, end_pos);
        }
        let mut pos = head;
        let mut seq = head_seq;
        while pos < end_pos && seq < end_seq {
            let phys = pos % self.ring_size;
            if self.ring_size - phys < HEADER_LEN as u64 {
                pos += self.ring_size - phys;
                continue;
            }
            let Ok(header) = RecordHeader::decode(self.header_bytes(pos)) else {
                warn!(group = %self.name, pos, "Ring record unreadable inside a closed cycle; stopping the read");
                break;
            };
            let len = header.ring_len();
            if matches!(
                header.kind,
                RecordKind::Write | RecordKind::Zero | RecordKind::Trim
            ) {
                let disk = usize::from(header.disk);
                // After the cycle drained, every record is committed or was cancelled
                // (commit CRC 0); the payload CRC was checked when the record was
                // written or, after a crash, by the recovery scan.
                let committed = if recovery {
                    self.is_committed(pos, &header)
                } else {
                    stored_commit_crc(self.header_bytes(pos)) != 0
                };
                if disk >= writes.len() || !committed {
                    stats.skipped += 1;
                } else {
                    stats.records += 1;
                    let (start, end) = (header.offset, header.offset + header.length);
                    let source = match header.kind {
                        RecordKind::Write => {
                            stats.logged_bytes += header.length;
                            Source::Data {
                                file_offset: DATA_START + phys + HEADER_LEN as u64,
                            }
                        }
                        RecordKind::Zero => Source::Zero,
                        _ => Source::Trim,
                    };
                    writes[disk].push((start, end, source));
                }
            }
            pos += len;
            seq += 1;
        }
        let disks: Vec<ExtentMap> = writes.into_iter().map(ExtentMap::from_writes).collect();
        for map in &disks {
            for (start, end, source) in map.iter() {
                match source {
                    Source::Data { .. } => stats.data_bytes += end - start,
                    Source::Zero | Source::Trim => stats.zeroed_bytes += end - start,
                }
            }
        }
        ClosedCycle {
            shared: Arc::clone(self),
            cycle,
            end_pos,
            end_seq,
            disks,
            stats,
            recovery,
        }
    }

    /// Reserves ring space for a record and writes its header (uncommitted). `None`
    /// when the ring is full or its header could not be written: the group tracks by
    /// dirty map from now on.
    pub(super) fn reserve(
        &self,
        state: &mut State,
        disk: usize,
        kind: RecordKind,
        range: Range,
        contents: Contents<'_>,
    ) -> Result<Option<Slot>, TrackerError> {
        let payload_len = match contents {
            Contents::Whole(payload) => {
                u32::try_from(payload.len()).map_err(|_| TrackerError::OutOfRange)?
            }
            Contents::Later(len) => len,
        };
        if state.mode == TrackingMode::DirtyMap || state.broken {
            return Ok(None);
        }
        let len = record_len(payload_len);
        let phys = state.tail % self.ring_size;
        let to_end = self.ring_size - phys;
        let pad = if len > to_end { to_end } else { 0 };
        if state.tail - state.head + pad + len > self.ring_size {
            self.overflow(state);
            return Ok(None);
        }
        if pad > 0 {
            if pad >= HEADER_LEN as u64 {
                let header = RecordHeader {
                    kind: RecordKind::Pad,
                    disk: 0,
                    seq: state.next_seq,
                    cycle: state.open_cycle,
                    offset: 0,
                    length: pad,
                    payload_len: 0,
                };
                if let Err(error) = self.write_header(state.tail, &header) {
                    self.ring_write_failed(state, &error);
                    return Ok(None);
                }
                state.next_seq += 1;
            }
            state.tail += pad;
        }
        let header = RecordHeader {
            kind,
            disk: u16::try_from(disk).unwrap_or(u16::MAX),
            seq: state.next_seq,
            cycle: state.open_cycle,
            offset: range.start,
            length: range.end - range.start,
            payload_len,
        };
        let file_offset = DATA_START + state.tail % self.ring_size;
        let written_end = state.tail + HEADER_LEN as u64 + u64::from(payload_len);
        let fill = self.page_fill(state, state.tail, written_end);
        let written = match contents {
            Contents::Whole(payload) => self.write_whole(file_offset, &header, payload, fill),
            Contents::Later(_) => self.write_header(state.tail, &header).and_then(|()| {
                // The payload comes later, without the lock: write its last page now,
                // while nothing is reserved after it.
                if fill == 0 {
                    return Ok(());
                }
                // (A large record's last page lies past its header.)
                let page_start =
                    (written_end - written_end % FILL_PAGE).max(state.tail + HEADER_LEN as u64);
                let zeroes = &ZERO_PAGE[..usize_of(written_end + fill - page_start)];
                self.file
                    .write_all_at(zeroes, DATA_START + page_start % self.ring_size)
            }),
        };
        if let Err(error) = written {
            self.ring_write_failed(state, &error);
            return Ok(None);
        }
        let slot = Slot {
            cycle: header.cycle,
            seq: header.seq,
            file_offset,
            offset: range.start,
            payload_len,
            committed: matches!(contents, Contents::Whole(_)),
        };
        state.tail += len;
        state.next_seq += 1;
        Ok(Some(slot))
    }

    /// Writes a record header (uncommitted) at ring position `pos`.
    fn write_header(&self, pos: u64, header: &RecordHeader) -> io::Result<()> {
        let mut bytes = [0u8; HEADER_LEN];
        header.encode(&mut bytes);
        let at = DATA_START + pos % self.ring_size;
        debug_assert!(at + HEADER_LEN as u64 <= DATA_START + self.ring_size);
        self.file.write_all_at(&bytes, at)
    }

    /// Writes a whole record at `file_offset`: header, commit CRC and payload in one
    /// call. Under the group lock, like every header, so the ring never has a gap
    /// before a later record (a crash can only cut the last one short, and a short
    /// record's CRC does not match).
    fn write_whole(
        &self,
        file_offset: u64,
        header: &RecordHeader,
        payload: &[u8],
        fill: u64,
    ) -> io::Result<()> {
        let mut bytes = [0u8; HEADER_LEN];
        header.encode(&mut bytes);
        bytes[COMMIT_CRC_AT..COMMIT_CRC_AT + 4]
            .copy_from_slice(&commit_crc(header.seq, payload).to_le_bytes());
        write_all_vectored_at(
            &self.file,
            &mut [
                IoSlice::new(&bytes),
                IoSlice::new(payload),
                IoSlice::new(&ZERO_PAGE[..usize_of(fill)]),
            ],
            file_offset,
        )
    }

    /// Zero bytes to write after a record whose bytes run from ring position `start`
    /// to `end`, so that its last page is written whole: 0 unless that page is not in
    /// the page cache. A `pwrite` that ends inside a page the cache does not hold reads
    /// the page from the disk first, which is what every small record would do in a
    /// ring whose pages were evicted after its first lap. Never reaches records not
    /// yet acknowledged (a ring that full pays for the read).
    fn page_fill(&self, state: &State, start: u64, end: u64) -> u64 {
        let in_page = end % FILL_PAGE;
        if in_page == 0 || end + (FILL_PAGE - in_page) > state.head + self.ring_size {
            return 0;
        }
        if start / FILL_PAGE == end / FILL_PAGE {
            // It ends in the page it starts in, which the record before it wrote:
            // no system call on the write path to ask.
            return 0;
        }
        let page_start = DATA_START + (end - in_page) % self.ring_size;
        if self.page_cached(page_start) {
            return 0;
        }
        #[cfg(test)]
        self.page_fills
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        FILL_PAGE - in_page
    }

    /// Whether the page of the ring file at `file_offset` (a multiple of
    /// [`FILL_PAGE`]) is in the page cache. Errors (a system whose pages are larger)
    /// say yes: filling is an optimisation.
    pub(super) fn page_cached(&self, file_offset: u64) -> bool {
        let mut resident = 0u8;
        // SAFETY: `file_offset` is inside the mapping (records lie below
        // DATA_START + ring_size) and a multiple of 4096; mincore reads the page
        // tables only and writes one byte per page, one page here, into `resident`.
        let result = unsafe {
            libc::mincore(
                self.map
                    .as_ptr()
                    .add(usize_of(file_offset))
                    .cast_mut()
                    .cast(),
                usize_of(FILL_PAGE),
                &mut resident,
            )
        };
        result != 0 || resident & 1 == 1
    }

    /// Writes the payload into the slot, then its commit marker (see
    /// [`crate::record`]): a crash or an error before the marker leaves the record
    /// uncommitted. The header's other bytes, which concurrent scans read, are not
    /// rewritten.
    pub(super) fn commit(&self, slot: &Slot, payload: &[u8]) -> io::Result<()> {
        debug_assert_eq!(payload.len(), usize_of(u64::from(slot.payload_len)));
        self.file
            .write_all_at(payload, slot.file_offset + HEADER_LEN as u64)?;
        self.store_commit(slot, commit_marker(slot.seq))
    }

    /// Withdraws the record at ring position `pos` (commit CRC 0). Recovery does this
    /// to every record whose commit CRC does not match its payload: a record written
    /// in one `pwritev` stores its CRC before its payload, so a crash can leave a
    /// nonzero CRC over a payload cut short, and live readers trust a nonzero CRC.
    pub(super) fn withdraw_at(&self, pos: u64) -> io::Result<()> {
        self.write_commit_word(DATA_START + pos % self.ring_size, 0)
    }

    /// Overwrites the slot's commit CRC (0: the record is withdrawn).
    pub(super) fn store_commit(&self, slot: &Slot, crc: u32) -> io::Result<()> {
        self.write_commit_word(slot.file_offset, crc)
    }

    /// Writes the commit word of the record whose header is at `file_offset`.
    fn write_commit_word(&self, file_offset: u64, word: u32) -> io::Result<()> {
        self.file
            .write_all_at(&word.to_le_bytes(), file_offset + COMMIT_CRC_AT as u64)
    }

    /// A write to the ring failed: from now on the group tracks by dirty map and needs
    /// a resync, as after an overflow. The caller marks what the failed record covered.
    pub(super) fn ring_write_failed(&self, state: &mut State, error: &io::Error) {
        if state.resync.is_none() {
            warn!(group = %self.name, %error, "A write to the log ring failed; tracking by dirty map from now on, a resync is required");
            state.resync = Some(ResyncReason::RingWriteError);
        }
        state.mode = TrackingMode::DirtyMap;
        state.superblock.copy_position = None;
        state.resumable_copy = None;
        if let Err(error) = self.write_superblock(state, true) {
            warn!(group = %self.name, %error, "Could not record the ring failure in the superblock");
        }
    }

    /// Calls `visit` with the header of every write, zero and trim record in
    /// `head..tail`, committed or not (headers only; payloads may be in flight).
    pub(super) fn for_each_record(
        &self,
        head: u64,
        tail: u64,
        mut visit: impl FnMut(&RecordHeader),
    ) {
        let mut pos = head;
        while pos < tail {
            let phys = pos % self.ring_size;
            if self.ring_size - phys < HEADER_LEN as u64 {
                pos += self.ring_size - phys;
                continue;
            }
            let Ok(header) = RecordHeader::decode(self.header_bytes(pos)) else {
                break;
            };
            if matches!(
                header.kind,
                RecordKind::Write | RecordKind::Zero | RecordKind::Trim
            ) {
                visit(&header);
            }
            pos += header.ring_len();
        }
    }

    pub(crate) fn acknowledge(
        &self,
        cycle: u64,
        end_pos: u64,
        end_seq: u64,
    ) -> Result<(), TrackerError> {
        let mut state = lock(&self.state);
        while state.closed.front().is_some_and(|mark| mark.cycle <= cycle) {
            state.closed.pop_front();
        }
        let mut freed = None;
        // A resync may have moved the head past this cycle meanwhile.
        if end_pos > state.head && end_pos <= state.tail {
            freed = Some((state.head, end_pos));
            state.head = end_pos;
            state.head_seq = end_seq;
        }
        state.acked_cycle = state.acked_cycle.max(cycle);
        // Writers throttled for want of room may fit now.
        self.wake(&state);
        let written = self.write_superblock(&mut state, false);
        drop(state);
        // Without the lock: writers need it, and this walks page tables.
        if let Some((from, to)) = freed {
            self.unmap_acknowledged(from, to);
        }
        written
    }

    pub(crate) fn release_consumer(&self) {
        let mut state = lock(&self.state);
        state.consumer_busy = false;
    }

    pub(super) fn write_superblock(
        &self,
        state: &mut State,
        synchronous: bool,
    ) -> Result<(), TrackerError> {
        state.superblock.generation += 1;
        state.superblock.head_pos = state.head;
        state.superblock.head_seq = state.head_seq;
        state.superblock.acked_cycle = state.acked_cycle;
        if state.resync.is_some() {
            state.superblock.resync = state.resync;
        }
        state.superblock.activity = state.activity.record();
        let bytes = state
            .superblock
            .encode()
            .map_err(TrackerError::Superblock)?;
        let slot = Superblock::slot_for(state.superblock.generation);
        let at = (slot * SUPERBLOCK_LEN) as u64;
        // Through the O_DSYNC descriptor when it must be durable on return: that syncs
        // this range alone (and the metadata it needs), not the records' dirty pages.
        let file = if synchronous {
            &self.dsync_file
        } else {
            &*self.file
        };
        let flushed = file.write_all_at(&bytes, at);
        flushed.map_err(|source| TrackerError::Io {
            what: "write superblock",
            path: self.ring_path.clone(),
            source,
        })
    }
}

/// The page a record's last bytes are filled to when it is not cached
/// ([`Shared::page_fill`]), in bytes.
const FILL_PAGE_BYTES: usize = 4096;
/// [`FILL_PAGE_BYTES`], for ring positions.
const FILL_PAGE: u64 = FILL_PAGE_BYTES as u64;

/// Zeroes to fill a page with.
static ZERO_PAGE: [u8; FILL_PAGE_BYTES] = [0; FILL_PAGE_BYTES];

/// `pwritev` of all of `bufs` at `offset`, resuming after short writes.
fn write_all_vectored_at(
    file: &File,
    mut bufs: &mut [IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let at = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match nix::sys::uio::pwritev(file, bufs, at) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(written) => {
                offset += written as u64;
                IoSlice::advance_slices(&mut bufs, written);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}
