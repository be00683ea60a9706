#![allow(clippy::unwrap_used)]
use super::*;
use std::io::Write;

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

fn at(offset: u64) -> usize {
    usize::try_from(offset).unwrap()
}

fn image(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(len).unwrap();
    file
}

#[test]
fn read_sources_read_the_image_small_reads_without_readahead() {
    let tmp = image(4 * MIB);
    let img = ImageFile::open(tmp.path(), ImageFileOptions::default()).unwrap();
    img.write_at(b"small and large", MIB, false).unwrap();
    let small = img.read_source(MIB, 4096).unwrap();
    let large = img.read_source(MIB, MIB).unwrap();
    assert_ne!(
        small.as_raw_fd(),
        large.as_raw_fd(),
        "small reads get their own descriptor"
    );
    for fd in [small, large] {
        let mut buf = [0u8; 15];
        let file = File::from(fd.try_clone_to_owned().unwrap());
        file.read_exact_at(&mut buf, MIB).unwrap();
        assert_eq!(&buf, b"small and large");
    }
    assert!(img.read_source(4 * MIB - 1, 2).is_none(), "past the end");
    let direct = ImageFileOptions {
        direct: true,
        ..ImageFileOptions::default()
    };
    if let Ok(img) = ImageFile::open(tmp.path(), direct) {
        assert!(img.read_source(0, 4096).is_some());
    }
}

#[test]
fn reads_back_what_was_written() {
    let tmp = image(4 * MIB);
    let img = ImageFile::open(tmp.path(), ImageFileOptions::default()).unwrap();
    assert_eq!(img.size(), 4 * MIB);
    assert!(!img.is_block_device());
    assert_eq!(
        img.block_size(),
        BlockSizeLimits {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20
        }
    );
    img.write_at(b"hello", 4093, false).unwrap();
    img.write_at(b"durable", MIB, true).unwrap();
    img.flush().unwrap();
    let mut buf = [0u8; 7];
    img.read_at(&mut buf[..5], 4093).unwrap();
    assert_eq!(&buf[..5], b"hello");
    img.read_at(&mut buf, MIB).unwrap();
    assert_eq!(&buf, b"durable");
    assert!(img.read_at(&mut buf, 4 * MIB - 3).is_err());
    assert!(img.write_at(&buf, u64::MAX - 2, false).is_err());
}

#[test]
fn zeroing_and_trim_read_back_as_zeroes() {
    let tmp = image(4 * MIB);
    let img = ImageFile::open(tmp.path(), ImageFileOptions::default()).unwrap();
    let ones = vec![1u8; 4 * MIB_USIZE];
    img.write_at(&ones, 0, false).unwrap();
    img.write_zeroes(
        4096,
        8192,
        ZeroMode {
            may_trim: true,
            fast_only: false,
        },
        false,
    )
    .unwrap();
    img.write_zeroes(
        MIB + 1,
        100,
        ZeroMode {
            may_trim: false,
            fast_only: false,
        },
        true,
    )
    .unwrap();
    img.trim(2 * MIB, MIB, false).unwrap();
    let mut buf = vec![0u8; 4 * MIB_USIZE];
    img.read_at(&mut buf, 0).unwrap();
    let zero = |r: std::ops::Range<u64>| buf[at(r.start)..at(r.end)].iter().all(|&b| b == 0);
    assert!(zero(4096..12288));
    assert!(zero(MIB + 1..MIB + 101));
    assert!(zero(2 * MIB..3 * MIB));
    assert_eq!(buf[4095], 1);
    assert_eq!(buf[12288], 1);
    assert_eq!(buf[MIB_USIZE], 1);
    assert_eq!(buf[at(MIB + 101)], 1);
    assert_eq!(buf[3 * MIB_USIZE], 1);
}

#[test]
fn allocation_reports_holes_and_data() {
    let tmp = image(8 * MIB);
    let img = ImageFile::open(tmp.path(), ImageFileOptions::default()).unwrap();
    img.write_at(&vec![7u8; MIB_USIZE], 2 * MIB, false).unwrap();
    let extents = img.allocation(0, 8 * MIB).unwrap();
    let total: u64 = extents.iter().map(|e| e.length).sum();
    assert_eq!(total, 8 * MIB);
    // Whatever the filesystem's granularity, offset 0 is a hole and 2 MiB is data
    // (tmpfs and ext4 both support SEEK_HOLE).
    assert_eq!(extents[0].flags, NBD_STATE_HOLE | NBD_STATE_ZERO);
    let mut at = 0;
    for e in &extents {
        if (at..at + e.length).contains(&(2 * MIB)) {
            assert_eq!(e.flags, 0);
        }
        at += e.length;
    }
    let part = img.allocation(2 * MIB + 4096, 4096).unwrap();
    assert_eq!(
        part,
        vec![Extent {
            length: 4096,
            flags: 0
        }]
    );
    assert!(img.allocation(8 * MIB, 1).is_err());
}

#[test]
fn read_only_refuses_changes() {
    let tmp = image(MIB);
    let img = ImageFile::open(
        tmp.path(),
        ImageFileOptions {
            read_only: true,
            direct: false,
        },
    )
    .unwrap();
    assert!(img.read_only());
    assert!(!img.can_trim());
    let err = img.write_at(b"x", 0, false).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(img.trim(0, 512, false).is_err());
    assert!(img
        .write_zeroes(
            0,
            512,
            ZeroMode {
                may_trim: true,
                fast_only: false
            },
            false
        )
        .is_err());
    let mut buf = [1u8; 16];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 16]);
}

#[test]
fn cache_is_a_harmless_hint() {
    let tmp = image(MIB);
    let img = ImageFile::open(tmp.path(), ImageFileOptions::default()).unwrap();
    img.cache(0, MIB).unwrap();
    assert!(img.cache(MIB, 1).is_err());
}

#[test]
fn refuses_directories() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ImageFile::open(
        dir.path(),
        ImageFileOptions {
            read_only: true,
            direct: false
        }
    )
    .is_err());
}

/// O_DIRECT is not available on every filesystem (tmpfs refuses it); the test checks
/// what it can and says so otherwise.
#[test]
fn direct_mode_bounces_unaligned_memory_and_serves_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.img");
    let mut f = File::create(&path).unwrap();
    f.write_all(&vec![5u8; 2 * 4096 + 100]).unwrap();
    drop(f);
    let img = match ImageFile::open(
        &path,
        ImageFileOptions {
            read_only: false,
            direct: true,
        },
    ) {
        Ok(img) => img,
        Err(e) => {
            eprintln!("O_DIRECT unsupported here ({e}); skipping");
            return;
        }
    };
    assert_eq!(img.block_size().minimum, 4096);
    // Unaligned memory: a slice starting one byte into a buffer.
    let mut backing = vec![9u8; 4096 + 1];
    img.write_at(&backing[1..], 4096, true).unwrap();
    img.read_at(&mut backing[1..], 0).unwrap();
    assert!(backing[1..].iter().all(|&b| b == 5));
    let mut check = vec![0u8; 4096];
    img.read_at(&mut check, 4096).unwrap();
    assert!(check.iter().all(|&b| b == 9));
    // The unaligned tail goes through the buffered descriptor.
    img.write_at(&[3u8; 100], 2 * 4096, false).unwrap();
    let mut tail = [0u8; 100];
    img.read_at(&mut tail, 2 * 4096).unwrap();
    assert_eq!(tail, [3u8; 100]);
    img.flush().unwrap();
}
