//! One point's undo segment: its file and the index of the runs it holds.
//!
//! The file is a 32-byte header (magic and format version, the point, the number of
//! disks the point had, a CRC-32C of those) followed by records. A record is a 32-byte
//! header (magic, disk, offset, length, flags, a CRC-32C of header and data) and,
//! unless it is a zero run, the run's bytes. Opening a segment rebuilds the index from
//! its records and cuts a torn tail at the first record that does not check; of two
//! overlapping runs the older is kept. Disks added to the replica after the point are
//! held whole as zero runs, in the index only ([`Segment::add_disks`]).
//!
//! Appends are staged ([`super::staging`]): a record is in the index at once, readable
//! through [`Segment::read`], and in the file once [`Segment::write_out`] returns.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::staging::Staging;
use super::{io_error, HistoryError, MAX_RECORD, UNDO_BLOCK};

/// `BRUNDO` and a format version.
const SEGMENT_MAGIC: [u8; 8] = *b"BRUNDO\x00\x01";
const SEGMENT_HEADER: usize = 32;
const SEGMENT_HEADER_LEN: u64 = SEGMENT_HEADER as u64;
/// "UNDO", little-endian, starts every record.
pub(super) const RECORD_MAGIC: u32 = 0x4f44_4e55;
pub(super) const RECORD_HEADER_LEN: usize = 32;
/// Record flag: the range read as zeroes (a hole); no data follows.
const FLAG_ZERO: u32 = 1;

/// A block-aligned run a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) length: u64,
    /// Where the run's bytes start in the segment file (unused for zero runs).
    pub(super) data_at: u64,
    pub(super) zero: bool,
}

/// One point's undo segment.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) point: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Bytes of valid records (the next record's offset).
    pub(super) len: u64,
    /// Per disk: held runs by start offset; runs never overlap.
    pub(super) held: Vec<BTreeMap<u64, Held>>,
    /// Records appended and not yet written out, and the partial last block.
    staging: Staging,
}

impl Segment {
    fn header(point: u64, disks: u32) -> [u8; SEGMENT_HEADER] {
        let mut header = [0u8; SEGMENT_HEADER];
        header[0..8].copy_from_slice(&SEGMENT_MAGIC);
        header[8..16].copy_from_slice(&point.to_le_bytes());
        header[16..20].copy_from_slice(&disks.to_le_bytes());
        let crc = crc32c::crc32c(&header[0..20]);
        header[20..24].copy_from_slice(&crc.to_le_bytes());
        header
    }

    pub(super) fn create(path: &Path, point: u64, disks: usize) -> Result<Self, HistoryError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_error("create", path))?;
        let mut segment = Self::empty(point, path, file, disks);
        let header = Self::header(point, u32::try_from(disks).unwrap_or(u32::MAX));
        segment
            .staging
            .reserve(&segment.file, SEGMENT_HEADER)
            .map_err(io_error("write", path))?
            .copy_from_slice(&header);
        segment.staging.commit(SEGMENT_HEADER);
        segment.write_out()?;
        segment.file.sync_all().map_err(io_error("sync", path))?;
        Ok(segment)
    }

    /// A segment of `file` that holds nothing yet: its header is [`Segment::len`]
    /// bytes, staged from the file's start.
    fn empty(point: u64, path: &Path, file: File, disks: usize) -> Self {
        Segment {
            point,
            path: path.to_path_buf(),
            file,
            len: SEGMENT_HEADER_LEN,
            held: vec![BTreeMap::new(); disks],
            staging: Staging::new(path),
        }
    }

    /// Whether appends bypass the page cache (`None` before the first write).
    #[cfg(test)]
    pub(super) fn is_direct(&self) -> Option<bool> {
        self.staging.is_direct()
    }

    /// Opens a segment, rebuilds its index and cuts a torn tail. The segment has the
    /// disks its header counts (those its point had), at most `max_disks`; disks added
    /// since are given to it with [`Segment::add_disks`].
    pub(super) fn open(path: &Path, point: u64, max_disks: usize) -> Result<Self, HistoryError> {
        let corrupt = |reason: &str| HistoryError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error("open", path))?;
        let size = file.metadata().map_err(io_error("stat", path))?.len();
        let mut header = [0u8; SEGMENT_HEADER];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| corrupt("no header"))?;
        let mut count = [0u8; 4];
        count.copy_from_slice(&header[16..20]);
        let count = u32::from_le_bytes(count);
        if header != Self::header(point, count) {
            return Err(corrupt("header of another point or format"));
        }
        let disks = usize::try_from(count).unwrap_or(usize::MAX);
        if disks > max_disks {
            return Err(corrupt(&format!(
                "its point had {disks} disks, the replica has {max_disks}"
            )));
        }
        let mut segment = Self::empty(point, path, file, disks);
        let mut data = Vec::new();
        loop {
            let mut record = [0u8; RECORD_HEADER_LEN];
            if segment.len + RECORD_HEADER_LEN as u64 > size
                || segment
                    .file
                    .read_exact_at(&mut record, segment.len)
                    .is_err()
            {
                break;
            }
            let Some((disk, offset, length, zero, crc)) = parse_record(&record) else {
                break;
            };
            let data_len = if zero { 0 } else { length };
            let data_at = segment.len + RECORD_HEADER_LEN as u64;
            if disk >= disks || data_at + data_len > size {
                break;
            }
            let Ok(data_len_usize) = usize::try_from(data_len) else {
                break;
            };
            data.resize(data_len_usize, 0);
            if segment.file.read_exact_at(&mut data, data_at).is_err() {
                break;
            }
            let mut check = crc32c::crc32c(&record[0..28]);
            check = crc32c::crc32c_append(check, &data);
            if check != crc {
                break;
            }
            segment.insert(
                disk,
                offset,
                Held {
                    length,
                    data_at,
                    zero,
                },
            );
            segment.len = data_at + data_len;
        }
        if segment.len < size {
            tracing::info!(path = %path.display(), kept = segment.len, size, "Cutting the torn tail of an undo segment");
            segment
                .file
                .set_len(segment.len)
                .and_then(|()| segment.file.sync_all())
                .map_err(io_error("truncate", path))?;
        }
        segment
            .staging
            .resume(&segment.file, segment.len)
            .map_err(io_error("read", path))?;
        Ok(segment)
    }

    /// Gives the segment disks added to the replica after its point was taken, of
    /// `sizes`: at its point such a disk did not exist, so the segment holds it whole
    /// as zeroes. Nothing is written: this index entry is rebuilt on every open from
    /// the disk count in the header, so the point reads the disk as zeroes and no
    /// capture ever saves that disk's blocks here.
    pub(super) fn add_disks(&mut self, sizes: &[u64]) {
        for &size in sizes {
            let mut held = BTreeMap::new();
            if size > 0 {
                held.insert(
                    0,
                    Held {
                        length: size,
                        data_at: 0,
                        zero: true,
                    },
                );
            }
            self.held.push(held);
        }
    }

    /// Records a run in the index. A run that overlaps one already held (a record
    /// appended twice by a merge cut short) keeps the older one.
    fn insert(&mut self, disk: usize, offset: u64, held: Held) {
        let gaps = self.gaps(disk, offset, offset + held.length);
        for (start, end) in gaps {
            let skip = start - offset;
            self.held[disk].insert(
                start,
                Held {
                    length: end - start,
                    data_at: if held.zero { 0 } else { held.data_at + skip },
                    zero: held.zero,
                },
            );
        }
    }

    /// The run holding `offset` in `disk`, if any, as (start, run).
    pub(super) fn holding(&self, disk: usize, offset: u64) -> Option<(u64, Held)> {
        let (start, held) = self.held.get(disk)?.range(..=offset).next_back()?;
        (offset < start + held.length).then_some((*start, *held))
    }

    /// Where the next held run after `offset` starts (at most `end`).
    pub(super) fn next_held(&self, disk: usize, offset: u64, end: u64) -> u64 {
        self.held
            .get(disk)
            .and_then(|map| map.range(offset..end).next().map(|(start, _)| *start))
            .unwrap_or(end)
    }

    /// The ranges of `start..end` the segment does not hold, in order.
    pub(super) fn gaps(&self, disk: usize, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut at = start;
        while at < end {
            if let Some((run_start, held)) = self.holding(disk, at) {
                at = (run_start + held.length).min(end);
                continue;
            }
            let next = self.next_held(disk, at, end);
            gaps.push((at, next));
            at = next;
        }
        gaps
    }

    /// Room for the data of a record of `length` bytes (0 for a zero run), to fill
    /// before [`Segment::commit`]: a capture reads the disk straight into it.
    pub(super) fn stage(&mut self, length: u64) -> Result<&mut [u8], HistoryError> {
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        let room = self
            .staging
            .reserve(&self.file, RECORD_HEADER_LEN + length)
            .map_err(io_error("append to", &self.path))?;
        Ok(&mut room[RECORD_HEADER_LEN..])
    }

    /// Appends the record last [`Segment::stage`]d: `length` bytes of disk `disk` at
    /// `offset`, a zero run if `zero`, else the bytes staged.
    pub(super) fn commit(&mut self, disk: usize, offset: u64, length: u64, zero: bool) {
        let data_len = if zero { 0 } else { length };
        let room_len = RECORD_HEADER_LEN + usize::try_from(data_len).unwrap_or(0);
        let (record, data) = self.staging.room(room_len).split_at_mut(RECORD_HEADER_LEN);
        record[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        record[4..8].copy_from_slice(&u32::try_from(disk).unwrap_or(u32::MAX).to_le_bytes());
        record[8..16].copy_from_slice(&offset.to_le_bytes());
        record[16..24].copy_from_slice(&length.to_le_bytes());
        let flags = if zero { FLAG_ZERO } else { 0 };
        record[24..28].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&record[0..28]), data);
        record[28..32].copy_from_slice(&crc.to_le_bytes());
        self.staging.commit(room_len);
        let data_at = self.len + RECORD_HEADER_LEN as u64;
        self.len = data_at + data_len;
        debug_assert_eq!(self.len, self.staging.end());
        self.insert(
            disk,
            offset,
            Held {
                length,
                data_at,
                zero,
            },
        );
    }

    /// Appends a zero run: `length` bytes of disk `disk` at `offset` that read as
    /// zeroes (records with data are [`Segment::stage`]d and committed).
    pub(super) fn append_zero(
        &mut self,
        disk: usize,
        offset: u64,
        length: u64,
    ) -> Result<(), HistoryError> {
        self.stage(0)?;
        self.commit(disk, offset, length, true);
        Ok(())
    }

    /// Writes every appended record to the file (not yet durable: `fdatasync` next).
    pub(super) fn write_out(&mut self) -> Result<(), HistoryError> {
        self.staging
            .write_out(&self.file)
            .map_err(io_error("append to", &self.path))
    }

    /// Makes every appended record durable.
    pub(super) fn sync(&mut self) -> Result<(), HistoryError> {
        self.write_out()?;
        self.file.sync_data().map_err(io_error("sync", &self.path))
    }

    /// Reads `buf.len()` bytes of a held run at `at` in the file, or still staged.
    pub(super) fn read(&self, buf: &mut [u8], at: u64) -> Result<(), HistoryError> {
        let written = self.staging.written_below();
        let in_file = usize::try_from(written.saturating_sub(at))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (from_file, from_staging) = buf.split_at_mut(in_file);
        self.file
            .read_exact_at(from_file, at)
            .map_err(io_error("read", &self.path))?;
        if !from_staging.is_empty() && !self.staging.read(from_staging, at + in_file as u64) {
            return Err(HistoryError::Io {
                what: "read",
                path: self.path.clone(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        Ok(())
    }
}

/// Parses a record header: (disk, offset, length, zero, crc).
pub(super) fn parse_record(
    record: &[u8; RECORD_HEADER_LEN],
) -> Option<(usize, u64, u64, bool, u32)> {
    let u32_at = |at: usize| {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&record[at..at + 4]);
        u32::from_le_bytes(bytes)
    };
    let u64_at = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&record[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    if u32_at(0) != RECORD_MAGIC {
        return None;
    }
    let (offset, length, flags) = (u64_at(8), u64_at(16), u32_at(24));
    if length == 0 || length > MAX_RECORD || offset % UNDO_BLOCK != 0 || flags & !FLAG_ZERO != 0 {
        return None;
    }
    offset.checked_add(length)?;
    Some((
        usize::try_from(u32_at(4)).ok()?,
        offset,
        length,
        flags & FLAG_ZERO != 0,
        u32_at(28),
    ))
}
