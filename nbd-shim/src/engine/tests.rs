#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use super::*;

/// A file of `len` bytes where byte `i` is `i % 251`.
fn patterned(len: usize) -> File {
    let mut file = tempfile::tempfile().unwrap();
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    file.write_all(&bytes).unwrap();
    file
}

fn expect_pattern(buf: &[u8], offset: u64) {
    for (i, &b) in buf.iter().enumerate() {
        assert_eq!(
            b,
            ((offset as usize + i) % 251) as u8,
            "byte {i} of a read at {offset}"
        );
    }
}

#[test]
fn reads_complete_with_their_tags_and_buffers() {
    let file = patterned(1 << 20);
    let mut engine = IoEngine::new(8).unwrap();
    let offsets = [0u64, 4096, 12_345, 500_000, 1_040_000];
    for &offset in &offsets {
        let buf = IoBuf::new(8192).unwrap();
        engine.read(file.as_fd(), offset, buf, offset).unwrap();
    }
    assert_eq!(engine.in_flight(), offsets.len());
    let mut seen = Vec::new();
    while engine.in_flight() > 0 {
        engine
            .complete(1, |c| {
                c.result.as_ref().unwrap();
                expect_pattern(c.buf.as_slice(), c.tag);
                seen.push(c.tag);
            })
            .unwrap();
    }
    seen.sort_unstable();
    assert_eq!(seen, offsets);
}

#[test]
fn a_read_past_the_end_is_unexpected_eof_after_the_bytes_there() {
    let file = patterned(10_000);
    let mut engine = IoEngine::new(2).unwrap();
    engine
        .read(file.as_fd(), 8192, IoBuf::new(4096).unwrap(), ())
        .unwrap();
    let mut results = Vec::new();
    engine.complete(1, |c| results.push(c.result)).unwrap();
    let err = results.pop().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn writes_and_syncs_land_in_the_file() {
    let file = tempfile::tempfile().unwrap();
    let mut engine = IoEngine::new(4).unwrap();
    for i in 0..4u8 {
        let mut buf = IoBuf::new(4096).unwrap();
        buf.as_mut_slice().fill(i + 1);
        engine
            .write(file.as_fd(), u64::from(i) * 4096, buf, i)
            .unwrap();
    }
    assert!(!engine.has_room(), "4 slots, 4 operations");
    let refused = engine
        .data_sync(file.as_fd(), IoBuf::new(0).unwrap(), 9)
        .unwrap_err();
    assert_eq!(refused.tag, 9);
    let done = engine.complete(4, |c| c.result.unwrap()).unwrap();
    assert_eq!(done, 4);
    engine
        .data_sync(file.as_fd(), refused.buf, refused.tag)
        .unwrap();
    engine.complete(1, |c| c.result.unwrap()).unwrap();
    let mut back = vec![0u8; 4 * 4096];
    file.read_exact_at(&mut back, 0).unwrap();
    for (i, block) in back.chunks(4096).enumerate() {
        assert!(block.iter().all(|&b| usize::from(b) == i + 1), "block {i}");
    }
}

#[test]
fn errors_come_back_with_the_buffer() {
    let file = patterned(4096);
    let read_only = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
    let mut engine = IoEngine::new(1).unwrap();
    engine
        .write(read_only.as_fd(), 0, IoBuf::new(4096).unwrap(), ())
        .unwrap();
    let mut got = None;
    engine.complete(1, |c| got = Some(c)).unwrap();
    let got = got.unwrap();
    assert_eq!(got.buf.len(), 4096);
    assert_eq!(got.result.unwrap_err().raw_os_error(), Some(libc::EBADF));
}

#[test]
fn nothing_waits_when_nothing_is_asked() {
    let mut engine: IoEngine<'_, ()> = IoEngine::new(4).unwrap();
    assert_eq!(engine.complete(0, |_| {}).unwrap(), 0);
    assert_eq!(engine.complete(3, |_| {}).unwrap(), 0, "nothing in flight");
}

#[test]
fn dropping_the_engine_waits_for_its_operations() {
    let file = patterned(1 << 20);
    let mut engine = IoEngine::new(16).unwrap();
    for i in 0..16u64 {
        engine
            .read(file.as_fd(), i * 65536, IoBuf::new(65536).unwrap(), ())
            .unwrap();
    }
    engine.submit().unwrap();
    drop(engine);
}
