//! Block-hash comparison of a disk image against its counterpart on the other side:
//! both sides hash the same ranges with BLAKE3, so only differing ranges are read
//! again at a finer grain and, at the end, sent.
//!
//! Hashes cover the ranges' contents, whatever the allocation: a hole hashes like
//! the zeros it reads as (holes are not read, their zeros are hashed from memory), so
//! a thin image and a fully allocated copy of it compare equal.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use thiserror::Error;
use wire::api::{ByteRange, MAX_HASH_BYTES, MAX_HASH_RANGES};

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// Bytes read per call.
const READ_BUFFER: usize = 1 << 20;

/// Errors of a hash request.
#[derive(Debug, Error)]
pub enum HashError {
    /// The request asks for too much, or for ranges outside the disk.
    #[error("Invalid hash request: {0}")]
    Invalid(String),
    /// Reading the image failed.
    #[error("Cannot read the disk image")]
    Io(#[from] io::Error),
}

/// Checks ranges against a disk of `size` bytes and the per-request limits.
pub fn check_ranges(ranges: &[ByteRange], size: u64) -> Result<(), HashError> {
    if ranges.is_empty() || ranges.len() > MAX_HASH_RANGES {
        return Err(HashError::Invalid(format!(
            "1 to {MAX_HASH_RANGES} ranges per request, not {}",
            ranges.len()
        )));
    }
    let mut total = 0u64;
    for range in ranges {
        let inside = range
            .offset
            .checked_add(range.length)
            .is_some_and(|end| end <= size);
        if range.length == 0 || !inside {
            return Err(HashError::Invalid(format!(
                "range {}+{} is empty or outside the {size}-byte disk",
                range.offset, range.length
            )));
        }
        total = total.saturating_add(range.length);
    }
    if total > MAX_HASH_BYTES {
        return Err(HashError::Invalid(format!(
            "{total} bytes asked; at most {MAX_HASH_BYTES} per request"
        )));
    }
    Ok(())
}

/// Hashes each range of `image` (of `size` bytes), after checking the ranges.
pub fn hash_ranges(image: &File, size: u64, ranges: &[ByteRange]) -> Result<Vec<Hash>, HashError> {
    check_ranges(ranges, size)?;
    let mut buffer = vec![0u8; READ_BUFFER];
    ranges
        .iter()
        .map(|range| {
            hash_range(
                image,
                range.offset,
                range.offset + range.length,
                &mut buffer,
            )
        })
        .collect()
}

/// Hex text of a hash, as the API carries it.
pub fn to_hex(hash: &Hash) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

/// A hash from its hex text.
pub fn from_hex(text: &str) -> Option<Hash> {
    blake3::Hash::from_hex(text)
        .ok()
        .map(|hash| *hash.as_bytes())
}

fn hash_range(image: &File, start: u64, end: u64, buffer: &mut [u8]) -> Result<Hash, HashError> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut hasher = blake3::Hasher::new();
    let mut at = start;
    while at < end {
        let data = next_data(image, at, end);
        // A hole up to `data`: hashed as zeros, not read.
        while at < data {
            let step = usize::try_from(data - at)
                .unwrap_or(usize::MAX)
                .min(ZEROS.len());
            hasher.update(&ZEROS[..step]);
            at += step as u64;
        }
        if at >= end {
            break;
        }
        let hole = crate::copy::next_hole(image, at, end);
        while at < hole {
            let want = usize::try_from(hole - at)
                .unwrap_or(usize::MAX)
                .min(buffer.len());
            let read = image.read_at(&mut buffer[..want], at)?;
            if read == 0 {
                // Past the end of a file shorter than the disk: zeros.
                let rest = &ZEROS[..want.min(ZEROS.len())];
                hasher.update(rest);
                at += rest.len() as u64;
                continue;
            }
            hasher.update(&buffer[..read]);
            at += read as u64;
        }
    }
    Ok(*hasher.finalize().as_bytes())
}

/// The first data offset at or after `at`, or `end` if none before it.
fn next_data(image: &File, at: u64, end: u64) -> u64 {
    crate::copy::next_data(image, at).map_or(end, |found| found.min(end))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(offset: u64, length: u64) -> ByteRange {
        ByteRange { offset, length }
    }

    #[test]
    fn holes_hash_like_zeros_and_data_differences_show() {
        let dir = tempfile::tempdir().unwrap();
        let (thin, full) = (dir.path().join("thin"), dir.path().join("full"));
        let size = 4u64 << 20;
        let thin_file = File::create(&thin).unwrap();
        thin_file.set_len(size).unwrap();
        thin_file.write_all_at(&[7; 5000], 1 << 20).unwrap();
        let mut bytes = vec![0u8; usize::try_from(size).unwrap()];
        bytes[1 << 20..(1 << 20) + 5000].fill(7);
        std::fs::write(&full, &bytes).unwrap();
        let (thin_file, full_file) = (File::open(&thin).unwrap(), File::open(&full).unwrap());
        let ranges = [
            range(0, size),
            range(0, 1 << 20),
            range(1 << 20, 65536),
            range(size - 1, 1),
        ];
        let a = hash_ranges(&thin_file, size, &ranges).unwrap();
        assert_eq!(a, hash_ranges(&full_file, size, &ranges).unwrap());
        assert_eq!(a[3], *blake3::hash(&[0]).as_bytes());
        assert_eq!(a[0], *blake3::hash(&bytes).as_bytes());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&full)
            .unwrap()
            .write_all_at(&[1], 3 << 20)
            .unwrap();
        let b = hash_ranges(&full_file, size, &ranges).unwrap();
        assert_ne!(a[0], b[0]);
        assert_eq!(a[1..], b[1..]);
        assert_eq!(from_hex(&to_hex(&a[0])), Some(a[0]));
    }

    #[test]
    fn requests_outside_the_disk_or_too_large_are_refused() {
        let size = 1 << 20;
        for bad in [
            vec![],
            vec![range(0, 0)],
            vec![range(size, 1)],
            vec![range(u64::MAX, 2)],
            vec![range(0, 1); MAX_HASH_RANGES + 1],
        ] {
            assert!(check_ranges(&bad, size).is_err(), "{bad:?}");
        }
        let huge = 1u64 << 40;
        assert!(check_ranges(&[range(0, MAX_HASH_BYTES), range(0, 1)], huge).is_err());
        assert!(check_ranges(&[range(0, MAX_HASH_BYTES)], huge).is_ok());
    }

    proptest! {
        #[test]
        fn checking_never_panics(offsets in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8), size: u64) {
            let ranges: Vec<ByteRange> = offsets.into_iter().map(|(o, l)| range(o, l)).collect();
            let _ = check_ranges(&ranges, size);
        }
    }
}
