#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use proptest::prelude::*;

use super::*;

/// An owned change, for comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    Write(usize, u64, Vec<u8>),
    Zero(usize, u64, u64),
    Trim(usize, u64, u64),
}

impl Owned {
    fn as_change(&self) -> Change<'_> {
        match self {
            Owned::Write(disk, offset, data) => Change {
                disk: *disk,
                offset: *offset,
                length: data.len() as u64,
                data: ChangeData::Write(data),
            },
            Owned::Zero(disk, offset, length) => Change {
                disk: *disk,
                offset: *offset,
                length: *length,
                data: ChangeData::Zero,
            },
            Owned::Trim(disk, offset, length) => Change {
                disk: *disk,
                offset: *offset,
                length: *length,
                data: ChangeData::Trim,
            },
        }
    }

    fn from_change(change: &Change<'_>) -> Self {
        match change.data {
            ChangeData::Write(data) => Owned::Write(change.disk, change.offset, data.to_vec()),
            ChangeData::Zero => Owned::Zero(change.disk, change.offset, change.length),
            ChangeData::Trim => Owned::Trim(change.disk, change.offset, change.length),
        }
    }
}

const DEFLATE_6: Option<Codec> = Some(Codec::Deflate { level: 6 });
const DEFLATE_1: Option<Codec> = Some(Codec::Deflate { level: 1 });
const ZSTD_1: Option<Codec> = Some(Codec::Zstd { level: 1 });

fn encode(changes: &[Owned], transfer: u64, codec: Option<Codec>) -> Vec<Vec<u8>> {
    let mut encoder = ChunkEncoder::new(transfer);
    let mut frames = Vec::new();
    let mut emit = |raw: RawChunk<'_>| -> Result<(), ()> {
        assert!(raw.records().len() <= MAX_CHUNK_RAW as usize);
        let mut frame = Vec::new();
        raw.frame_into(codec, &mut frame);
        // Framing in place (taking the encoder's buffer) gives the same bytes.
        assert_eq!(raw.into_owned().into_frame(codec), frame);
        frames.push(frame);
        Ok(())
    };
    for change in changes {
        encoder.push(&change.as_change(), &mut emit).unwrap();
    }
    let count = encoder.finish(&mut emit).unwrap();
    assert_eq!(count as usize, frames.len());
    frames
}

/// Decodes frames and joins writes that the encoder split at chunk boundaries.
fn decode(frames: &[Vec<u8>], transfer: u64) -> Vec<Owned> {
    let mut out: Vec<Owned> = Vec::new();
    let mut scratch = Vec::new();
    for (index, frame) in frames.iter().enumerate() {
        let checked = CheckedFrame::check(frame).unwrap();
        checked.header.expect(transfer, index as u32).unwrap();
        for change in checked.records(&mut scratch).unwrap() {
            let change = Owned::from_change(&change.unwrap());
            match (out.last_mut(), &change) {
                (Some(Owned::Write(d, o, data)), Owned::Write(d2, o2, more))
                    if d == d2 && *o + data.len() as u64 == *o2 && index > 0 =>
                {
                    data.extend_from_slice(more);
                }
                _ => out.push(change),
            }
        }
    }
    out
}

fn change_strategy() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (
            0usize..4,
            0u64..1 << 40,
            prop::collection::vec(any::<u8>(), 1..5000)
        )
            .prop_map(|(d, o, data)| Owned::Write(d, o, data)),
        (0usize..4, 0u64..1 << 40, 1u64..1 << 30).prop_map(|(d, o, l)| Owned::Zero(d, o, l)),
        (0usize..4, 0u64..1 << 40, 1u64..1 << 30).prop_map(|(d, o, l)| Owned::Trim(d, o, l)),
    ]
}

/// No compression, or either codec at any level it takes.
fn codec_strategy() -> impl Strategy<Value = Option<Codec>> {
    prop_oneof![
        Just(None),
        (1u32..10).prop_map(|level| Some(Codec::Deflate { level })),
        (-7i32..20).prop_map(|level| Some(Codec::Zstd { level })),
    ]
}

/// A frame of `body` under a well-formed header with a correct CRC.
fn frame_of(flags: u8, raw_len: u32, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; CHUNK_HEADER_LEN];
    frame[..4].copy_from_slice(&CHUNK_MAGIC);
    frame[4] = CHUNK_VERSION;
    frame[5] = flags;
    frame[20..24].copy_from_slice(&raw_len.to_le_bytes());
    frame[24..28].copy_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..28]), &frame[CHUNK_HEADER_LEN..]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
    frame
}

proptest! {
    #[test]
    fn changes_round_trip(changes in prop::collection::vec(change_strategy(), 0..40),
                          codec in codec_strategy()) {
        // Adjacent writes would be joined by `decode`; space them out.
        let changes: Vec<Owned> = changes.into_iter().enumerate().map(|(i, c)| match c {
            Owned::Write(d, _, data) => Owned::Write(d, (i as u64) << 32, data),
            other => other,
        }).collect();
        let frames = encode(&changes, 7, codec);
        prop_assert_eq!(decode(&frames, 7), changes);
    }

    #[test]
    fn a_transfer_never_exceeds_its_record_bound(
        sizes in prop::collection::vec(prop_oneof![1usize..9000, 4096usize..4097, 0usize..1], 1..1500)
    ) {
        // Writes of many sizes (4 KiB ones most often, the shape of scattered
        // cycles) and zero ranges (size 0 here), across many chunk boundaries.
        let changes: Vec<Owned> = sizes.iter().enumerate().map(|(i, &size)| {
            let offset = (i as u64) << 20;
            if size == 0 {
                Owned::Zero(0, offset, 4096)
            } else {
                Owned::Write(0, offset, vec![1; size])
            }
        }).collect();
        let data: u64 = sizes.iter().map(|&size| size as u64).sum();
        let mut encoder = ChunkEncoder::new(1);
        let mut total = 0u64;
        let mut emit = |raw: RawChunk<'_>| -> Result<(), ()> {
            total += raw.records().len() as u64;
            Ok(())
        };
        for change in &changes {
            encoder.push(&change.as_change(), &mut emit).unwrap();
        }
        encoder.finish(&mut emit).unwrap();
        prop_assert!(total <= max_record_bytes(changes.len() as u64, data),
            "{} record bytes for {} changes of {} data bytes: bound {}",
            total, changes.len(), data, max_record_bytes(changes.len() as u64, data));
    }

    #[test]
    fn any_bytes_parse_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(frame) = CheckedFrame::check(&bytes) {
            let mut scratch = Vec::new();
            if let Ok(records) = frame.records(&mut scratch) {
                for record in records {
                    let _ = record;
                }
            }
        }
    }

    #[test]
    fn headers_parse_to_their_codec_or_are_refused(
        flags in any::<u8>(),
        version in prop_oneof![Just(CHUNK_VERSION), any::<u8>()],
        raw_len in prop_oneof![1u32..=MAX_CHUNK_RAW, any::<u32>()],
        body_len in prop_oneof![1u32..=MAX_CHUNK_BODY, any::<u32>()],
    ) {
        let mut header = frame_of(flags, raw_len, &[]);
        header[4] = version;
        header[24..28].copy_from_slice(&body_len.to_le_bytes());
        let codec = match flags {
            0 => Some(BodyCodec::Stored),
            FLAG_DEFLATE => Some(BodyCodec::Deflate),
            FLAG_ZSTD => Some(BodyCodec::Zstd),
            _ => None,
        };
        let sizes_ok = (1..=MAX_CHUNK_RAW).contains(&raw_len)
            && body_len <= MAX_CHUNK_BODY
            && (codec != Some(BodyCodec::Stored) || body_len == raw_len);
        match ChunkHeader::parse(&header) {
            Ok(parsed) => {
                prop_assert_eq!(Some(parsed.codec), codec);
                prop_assert!(version == CHUNK_VERSION && sizes_ok);
                prop_assert_eq!((parsed.raw_len, parsed.body_len), (raw_len, body_len));
            }
            Err(ChunkError::Unsupported { .. }) => {
                prop_assert!(codec.is_none() || version != CHUNK_VERSION);
            }
            Err(ChunkError::Size { .. }) => prop_assert!(!sizes_ok),
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn every_corrupted_byte_is_detected(at in 0usize..2000, flip in 1u8..=255,
                                        codec in codec_strategy()) {
        let frames = encode(&[Owned::Write(1, 4096, vec![0x5a; 1500]), Owned::Trim(0, 0, 1 << 20)], 3, codec);
        let mut frame = frames[0].clone();
        let at = at % frame.len();
        frame[at] ^= flip;
        prop_assert!(CheckedFrame::check(&frame).is_err());
    }
}

#[test]
fn the_record_bound_holds_for_a_scattered_cycle() {
    // The shape that broke the old estimate (a header per change and per 2 MiB of
    // data): 94,718 scattered 4 KiB writes, a split at every chunk's end, whose
    // headers need chunks the estimate did not count.
    let changes = 94_718u64;
    let mut encoder = ChunkEncoder::new(1);
    let mut total = 0u64;
    let mut emit = |raw: RawChunk<'_>| -> Result<(), ()> {
        total += raw.records().len() as u64;
        Ok(())
    };
    let data = vec![7u8; 4096];
    for i in 0..changes {
        let change = Change {
            disk: 0,
            offset: i * 8192,
            length: 4096,
            data: ChangeData::Write(&data),
        };
        encoder.push(&change, &mut emit).unwrap();
    }
    encoder.finish(&mut emit).unwrap();
    let bound = max_record_bytes(changes, changes * 4096);
    let old_estimate =
        changes * 4096 + (changes + changes * 4096 / u64::from(MAX_CHUNK_RAW) + 1) * 24;
    assert!(total <= bound, "{total} > {bound}");
    assert!(
        total > old_estimate,
        "the old estimate held after all: {total} <= {old_estimate}"
    );
}

#[test]
fn large_writes_are_split_across_full_chunks() {
    let data: Vec<u8> = (0..5 * MAX_CHUNK_RAW as usize)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let changes = vec![Owned::Write(2, 1 << 20, data)];
    let frames = encode(&changes, 9, None);
    assert_eq!(
        frames.len(),
        6,
        "5 chunks of data plus the record headers' overflow"
    );
    assert_eq!(decode(&frames, 9), changes);
}

/// `len` pseudo-random bytes (xorshift from `seed`): nothing compresses them.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn compression_is_skipped_when_it_does_not_help() {
    let noise = noise(4096, 0x9e37_79b9_7f4a_7c15);
    for codec in [DEFLATE_6, ZSTD_1] {
        let frames = encode(&[Owned::Write(0, 0, noise.clone())], 1, codec);
        let header = ChunkHeader::parse(&frames[0]).unwrap();
        assert_eq!(header.codec, BodyCodec::Stored);
        let frames = encode(&[Owned::Write(0, 0, vec![0; 65536])], 1, codec);
        let header = ChunkHeader::parse(&frames[0]).unwrap();
        assert!(
            header.codec == codec.unwrap().body() && header.body_len < 1000,
            "{header:?}"
        );
    }
}

#[test]
fn large_chunks_are_compressed_only_when_a_probe_shrinks() {
    let noise = noise(1 << 20, 0x2545_f491_4f6c_dd1d);
    // Noise first, text after the middle: the middle probe finds it worth it.
    let mut mixed = noise.clone();
    for (i, byte) in mixed[500 << 10..].iter_mut().enumerate() {
        *byte = b"blkrep replicates "[i % 18];
    }
    for codec in [DEFLATE_1, ZSTD_1] {
        let frames = encode(&[Owned::Write(0, 0, noise.clone())], 1, codec);
        assert_eq!(
            ChunkHeader::parse(&frames[0]).unwrap().codec,
            BodyCodec::Stored
        );
        let frames = encode(&[Owned::Write(0, 0, mixed.clone())], 1, codec);
        let header = ChunkHeader::parse(&frames[0]).unwrap();
        assert!(
            header.codec == codec.unwrap().body() && header.body_len < 800 << 10,
            "{header:?}"
        );
    }
}

#[test]
fn a_body_that_inflates_beyond_its_declared_size_is_refused() {
    for codec in [DEFLATE_6, ZSTD_1] {
        let frames = encode(&[Owned::Write(0, 0, vec![0; 100_000])], 1, codec);
        let body = &frames[0][CHUNK_HEADER_LEN..];
        // Declare fewer record bytes than the body inflates to.
        let flags = frames[0][5];
        let frame = frame_of(flags, 1000, body);
        let checked = CheckedFrame::check(&frame).unwrap();
        let mut scratch = Vec::new();
        assert_eq!(
            checked.records(&mut scratch).unwrap_err(),
            ChunkError::Decompress(1000),
            "{codec:?}"
        );
        if codec == ZSTD_1 {
            // Nothing was made room for beyond the declared bytes.
            assert_eq!(scratch.capacity(), 1000);
        }
        // Declaring more than the body holds is refused too.
        let frame = frame_of(flags, 100_024 + 1, body);
        let checked = CheckedFrame::check(&frame).unwrap();
        assert_eq!(
            checked.records(&mut scratch).unwrap_err(),
            ChunkError::Decompress(100_025)
        );
        // And the body decodes under its true size.
        let frame = frame_of(flags, 100_024, body);
        let checked = CheckedFrame::check(&frame).unwrap();
        assert_eq!(checked.records(&mut scratch).unwrap().count(), 1);
    }
}

#[test]
fn a_zstd_frame_whose_header_claims_more_than_declared_allocates_nothing_more() {
    // A frame declaring 2 MiB of content inside a chunk declaring 4 KiB.
    let big = vec![0u8; MAX_CHUNK_RAW as usize];
    let body = zstd::bulk::compress(&big, 1).unwrap();
    let frame = frame_of(FLAG_ZSTD, 4096, &body);
    let checked = CheckedFrame::check(&frame).unwrap();
    let mut scratch = Vec::new();
    assert_eq!(
        checked.records(&mut scratch).unwrap_err(),
        ChunkError::Decompress(4096)
    );
    assert_eq!(scratch.capacity(), 4096);
}

#[test]
fn truncated_or_garbage_zstd_bodies_are_refused() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
    let frames = encode(&[Owned::Write(0, 0, data)], 1, ZSTD_1);
    let header = ChunkHeader::parse(&frames[0]).unwrap();
    assert_eq!(header.codec, BodyCodec::Zstd);
    let body = &frames[0][CHUNK_HEADER_LEN..];
    let raw_len = header.raw_len;
    let mut garbage = body.to_vec();
    let middle = garbage.len() / 2;
    garbage[middle..].iter_mut().for_each(|byte| *byte = !*byte);
    let bodies: [&[u8]; 5] = [
        &body[..body.len() - 1],
        &body[..body.len() / 2],
        &body[..4],
        &garbage,
        b"not zstd at all",
    ];
    for bad in bodies {
        let frame = frame_of(FLAG_ZSTD, raw_len, bad);
        let checked = CheckedFrame::check(&frame).unwrap();
        assert_eq!(
            checked.records(&mut Vec::new()).unwrap_err(),
            ChunkError::Decompress(raw_len),
            "{} bytes",
            bad.len()
        );
    }
    // A DEFLATE body under the zstd flag is garbage to zstd.
    let deflated = encode(&[Owned::Write(0, 0, vec![3; 10_000])], 1, DEFLATE_6);
    let header = ChunkHeader::parse(&deflated[0]).unwrap();
    let frame = frame_of(FLAG_ZSTD, header.raw_len, &deflated[0][CHUNK_HEADER_LEN..]);
    assert!(CheckedFrame::check(&frame)
        .unwrap()
        .records(&mut Vec::new())
        .is_err());
}

#[test]
fn both_codec_flags_at_once_are_refused() {
    let frames = encode(&[Owned::Write(0, 0, vec![0; 10_000])], 1, ZSTD_1);
    let body = &frames[0][CHUNK_HEADER_LEN..];
    let header = ChunkHeader::parse(&frames[0]).unwrap();
    let frame = frame_of(FLAG_DEFLATE | FLAG_ZSTD, header.raw_len, body);
    assert_eq!(
        CheckedFrame::check(&frame).unwrap_err(),
        ChunkError::Unsupported {
            version: CHUNK_VERSION,
            flags: 3
        }
    );
}

#[test]
fn both_codecs_round_trip_full_chunks_smaller_than_stored() {
    // Half noise, half zeros per 4 KiB, as fio's 50% compressible buffers.
    let mut data = noise(5 << 20, 0x9e37_79b9_7f4a_7c15);
    for block in data.chunks_mut(4096) {
        block[2048..].fill(0);
    }
    let changes = vec![Owned::Write(0, 0, data)];
    for codec in [DEFLATE_1, ZSTD_1, Some(Codec::Zstd { level: -1 })] {
        let frames = encode(&changes, 4, codec);
        let sent: usize = frames.iter().map(Vec::len).sum();
        assert!(sent < 3 << 20, "{codec:?}: {sent} bytes");
        for frame in &frames {
            let header = ChunkHeader::parse(frame).unwrap();
            assert_eq!(header.codec, codec.unwrap().body());
        }
        assert_eq!(decode(&frames, 4), changes, "{codec:?}");
    }
}

#[test]
fn headers_out_of_bounds_are_refused_before_the_body() {
    let mut header = encode(&[Owned::Zero(0, 0, 1)], 1, None)[0][..CHUNK_HEADER_LEN].to_vec();
    header[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        ChunkHeader::parse(&header),
        Err(ChunkError::Size { .. })
    ));
    header[5] = 0x80;
    assert!(matches!(
        ChunkHeader::parse(&header),
        Err(ChunkError::Unsupported { .. })
    ));
    header[0] = b'X';
    assert_eq!(ChunkHeader::parse(&header), Err(ChunkError::Magic));
    assert!(matches!(
        ChunkHeader::parse(&header[..10]),
        Err(ChunkError::Truncated { .. })
    ));
}

#[test]
fn misplaced_chunks_are_named() {
    let frames = encode(&[Owned::Zero(0, 0, 1)], 5, None);
    let header = ChunkHeader::parse(&frames[0]).unwrap();
    assert!(header.expect(5, 0).is_ok());
    assert!(matches!(
        header.expect(6, 0),
        Err(ChunkError::Misplaced { .. })
    ));
    assert!(matches!(
        header.expect(5, 1),
        Err(ChunkError::Misplaced { .. })
    ));
}
