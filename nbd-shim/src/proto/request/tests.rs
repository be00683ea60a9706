#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn shape() -> ExportShape {
    ExportShape {
        size: 64 * MIB,
        limits: BlockSizeLimits {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        },
        transmission_flags: NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO
            | NBD_FLAG_SEND_DF
            | NBD_FLAG_SEND_CACHE,
        structured_replies: true,
        meta_contexts: 1,
    }
}

fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: 0xdead_beef,
        offset,
        length,
    }
}

fn errno(h: RequestHeader, s: &ExportShape) -> Errno {
    h.validate(s).unwrap_err().errno()
}

#[test]
fn parses_a_known_header() {
    let bytes = [
        0x25, 0x60, 0x95, 0x13, // magic
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // type: WRITE
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
        0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset 4096
        0, 0, 0x02, 0x00, // length 512
    ];
    let h = RequestHeader::parse(&bytes).unwrap();
    assert_eq!(
        h,
        header(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096, 512).with_cookie(0x0102_0304_0506_0708)
    );
    assert_eq!(h.encode(), bytes);
    assert_eq!(h.payload_len(), 512);
    let r = h.validate(&shape()).unwrap();
    assert_eq!(r.op, Op::Write { fua: true });
}

impl RequestHeader {
    fn with_cookie(mut self, cookie: u64) -> Self {
        self.cookie = cookie;
        self
    }
}

#[test]
fn parse_rejects_short_and_bad_magic() {
    assert_eq!(
        RequestHeader::parse(&[0; 27]),
        Err(RequestError::Truncated(27))
    );
    let mut bytes = header(NBD_CMD_READ, 0, 0, 512).encode();
    bytes[0] ^= 0xff;
    let err = RequestHeader::parse(&bytes).unwrap_err();
    assert!(matches!(err, RequestError::BadMagic(_)));
    assert!(err.is_fatal());
    let mut ext = bytes;
    ext[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
    assert!(RequestHeader::parse(&ext).unwrap_err().is_fatal());
}

#[test]
fn accepts_every_command_in_range() {
    let s = shape();
    let ok = |h: RequestHeader| h.validate(&s).unwrap().op;
    assert_eq!(ok(header(NBD_CMD_READ, 0, 0, 4096)), Op::Read { df: false });
    assert_eq!(
        ok(header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 4096)),
        Op::Read { df: true }
    );
    assert_eq!(
        ok(header(NBD_CMD_WRITE, 0, 64 * MIB - 4096, 4096)),
        Op::Write { fua: false }
    );
    assert_eq!(ok(header(NBD_CMD_FLUSH, 0, 0, 0)), Op::Flush);
    assert_eq!(ok(header(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0)), Op::Flush);
    assert_eq!(
        ok(header(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 0, 1 << 30 >> 5)),
        Op::Trim { fua: true }
    );
    assert_eq!(ok(header(NBD_CMD_CACHE, 0, 0, 4096)), Op::Cache);
    assert_eq!(
        ok(header(
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            0,
            4096
        )),
        Op::WriteZeroes {
            fua: false,
            no_hole: true,
            fast: true
        }
    );
    assert_eq!(
        ok(header(
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_FLAG_REQ_ONE,
            0,
            u32::MAX >> 8
        )),
        Op::BlockStatus { req_one: true }
    );
    assert_eq!(
        ok(header(NBD_CMD_DISC, 0xffff, u64::MAX, u32::MAX)),
        Op::Disc
    );
    // "existing clients are known to set this bit on other commands"
    assert_eq!(
        ok(header(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 512)),
        Op::Read { df: false }
    );
}

#[test]
fn zero_lengths_follow_the_documented_rules() {
    let s = shape();
    for command in [
        NBD_CMD_READ,
        NBD_CMD_WRITE,
        NBD_CMD_TRIM,
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_CACHE,
    ] {
        assert!(
            header(command, 0, 4096, 0).validate(&s).is_ok(),
            "command {command}"
        );
        assert!(
            header(command, 0, s.size, 0).validate(&s).is_ok(),
            "command {command} at end"
        );
    }
    assert_eq!(
        header(NBD_CMD_BLOCK_STATUS, 0, 0, 0).validate(&s),
        Err(RequestError::EmptyBlockStatus)
    );
    assert_eq!(
        errno(header(NBD_CMD_READ, 0, s.size + 1, 0), &s),
        Errno::Inval
    );
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let s = shape();
    assert_eq!(
        header(8, 0, 0, 0).validate(&s),
        Err(RequestError::UnknownCommand(8))
    );
    assert_eq!(errno(header(0xffff, 0, 0, 0), &s), Errno::Inval);
    // Bit 5 (PAYLOAD_LEN) belongs to an extension we do not negotiate.
    assert_eq!(
        errno(header(NBD_CMD_WRITE, 1 << 5, 0, 512), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(header(NBD_CMD_READ, 1 << 15, 0, 512), &s),
        Errno::Inval
    );
    // Documented flags on the wrong command.
    assert_eq!(
        errno(header(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(header(NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 512), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(header(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 512), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(header(NBD_CMD_TRIM, NBD_CMD_FLAG_FAST_ZERO, 0, 512), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(header(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_DF, 0, 512), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(header(NBD_CMD_FLUSH, NBD_CMD_FLAG_NO_HOLE, 0, 0), &s),
        Errno::Inval
    );
    assert!(matches!(
        header(NBD_CMD_CACHE, NBD_CMD_FLAG_DF | NBD_CMD_FLAG_FUA, 0, 0).validate(&s),
        Err(RequestError::InvalidFlags {
            command: Command::Cache,
            flags: NBD_CMD_FLAG_DF
        })
    ));
}

#[test]
fn unnegotiated_features_are_einval() {
    let mut s = shape();
    s.transmission_flags &= !(NBD_FLAG_SEND_DF | NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_TRIM);
    assert_eq!(
        errno(header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(
            header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
            &s
        ),
        Errno::Inval
    );
    assert_eq!(errno(header(NBD_CMD_TRIM, 0, 0, 512), &s), Errno::Inval);
    s.transmission_flags &= !NBD_FLAG_SEND_WRITE_ZEROES;
    assert_eq!(
        errno(header(NBD_CMD_WRITE_ZEROES, 0, 0, 512), &s),
        Errno::Inval
    );
    let mut s = shape();
    s.meta_contexts = 0;
    assert_eq!(
        header(NBD_CMD_BLOCK_STATUS, 0, 0, 512).validate(&s),
        Err(RequestError::NotNegotiated("NBD_CMD_BLOCK_STATUS"))
    );
    let mut s = shape();
    s.structured_replies = false;
    assert_eq!(
        errno(header(NBD_CMD_BLOCK_STATUS, 0, 0, 512), &s),
        Errno::Inval
    );
}

#[test]
fn flush_range_must_be_zero() {
    let s = shape();
    assert_eq!(
        header(NBD_CMD_FLUSH, 0, 1, 0).validate(&s),
        Err(RequestError::FlushWithRange)
    );
    assert_eq!(errno(header(NBD_CMD_FLUSH, 0, 0, 1), &s), Errno::Inval);
}

#[test]
fn read_only_exports_refuse_changes_with_eperm() {
    let mut s = shape();
    s.transmission_flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH;
    for command in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
        assert_eq!(
            errno(header(command, 0, 0, 512), &s),
            Errno::Perm,
            "command {command}"
        );
    }
    // Even with a flag the read-only export never advertised.
    assert_eq!(
        errno(
            header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
            &s
        ),
        Errno::Perm
    );
    assert!(header(NBD_CMD_READ, 0, 0, 512).validate(&s).is_ok());
    assert!(header(NBD_CMD_FLUSH, 0, 0, 0).validate(&s).is_ok());
    assert!(header(NBD_CMD_CACHE, 0, 0, 512).validate(&s).is_ok());
}

#[test]
fn out_of_range_is_enospc_for_writes_and_einval_otherwise() {
    let s = shape();
    let past = s.size - 511;
    assert_eq!(errno(header(NBD_CMD_WRITE, 0, past, 512), &s), Errno::NoSpc);
    assert_eq!(
        errno(header(NBD_CMD_WRITE_ZEROES, 0, past, 512), &s),
        Errno::NoSpc
    );
    for command in [
        NBD_CMD_READ,
        NBD_CMD_TRIM,
        NBD_CMD_CACHE,
        NBD_CMD_BLOCK_STATUS,
    ] {
        assert_eq!(
            errno(header(command, 0, past, 512), &s),
            Errno::Inval,
            "command {command}"
        );
    }
    // offset + length overflows u64.
    let err = header(NBD_CMD_READ, 0, u64::MAX - 10, 512)
        .validate(&s)
        .unwrap_err();
    assert!(matches!(err, RequestError::OutOfRange { .. }));
    assert_eq!(
        errno(header(NBD_CMD_READ, 0, s.size + 1, 0), &s),
        Errno::Inval
    );
}

#[test]
fn oversized_payloads_are_refused() {
    let mut s = shape();
    s.size = u64::MAX;
    let max = s.limits.maximum;
    assert!(header(NBD_CMD_READ, 0, 0, max).validate(&s).is_ok());
    assert_eq!(errno(header(NBD_CMD_READ, 0, 0, max + 1), &s), Errno::Inval);
    assert_eq!(
        errno(header(NBD_CMD_WRITE, 0, 0, max + 1), &s),
        Errno::Inval
    );
    assert_eq!(
        errno(header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, max + 1), &s),
        Errno::Overflow
    );
    // Commands without payload may exceed it.
    assert!(header(NBD_CMD_TRIM, 0, 0, u32::MAX).validate(&s).is_ok());
    assert!(header(NBD_CMD_WRITE_ZEROES, 0, 0, u32::MAX)
        .validate(&s)
        .is_ok());
    assert!(header(NBD_CMD_BLOCK_STATUS, 0, 0, u32::MAX)
        .validate(&s)
        .is_ok());
    assert!(header(NBD_CMD_CACHE, 0, 0, u32::MAX).validate(&s).is_ok());
}

#[test]
fn alignment_is_enforced_except_at_an_unaligned_end() {
    let mut s = shape();
    s.limits = BlockSizeLimits {
        minimum: 4096,
        preferred: 4096,
        maximum: 32 << 20,
    };
    assert!(header(NBD_CMD_READ, 0, 4096, 8192).validate(&s).is_ok());
    for command in [
        NBD_CMD_READ,
        NBD_CMD_WRITE,
        NBD_CMD_TRIM,
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_CACHE,
    ] {
        assert_eq!(
            errno(header(command, 0, 512, 4096), &s),
            Errno::Inval,
            "offset, command {command}"
        );
        assert_eq!(
            errno(header(command, 0, 4096, 512), &s),
            Errno::Inval,
            "length, command {command}"
        );
    }
    s.size = 10 * 4096 + 100;
    assert!(header(NBD_CMD_READ, 0, 10 * 4096, 100).validate(&s).is_ok());
    assert!(header(NBD_CMD_WRITE, 0, 9 * 4096, 4196)
        .validate(&s)
        .is_ok());
    assert_eq!(
        errno(header(NBD_CMD_READ, 0, 10 * 4096, 99), &s),
        Errno::Inval
    );
}

#[test]
fn degenerate_limits_never_panic() {
    let mut s = shape();
    s.limits = BlockSizeLimits {
        minimum: 0,
        preferred: 0,
        maximum: 0,
    };
    assert!(header(NBD_CMD_READ, 0, 7, 0).validate(&s).is_ok());
    assert_eq!(errno(header(NBD_CMD_READ, 0, 7, 1), &s), Errno::Inval);
}

fn arb_shape() -> impl Strategy<Value = ExportShape> {
    (
        any::<u64>(),
        0u32..17,
        0u32..40,
        any::<u16>(),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(
            |(size, min_shift, max_shift, flags, structured, contexts)| ExportShape {
                size: size >> (size % 64),
                limits: BlockSizeLimits {
                    minimum: 1 << min_shift,
                    preferred: 4096,
                    maximum: if max_shift >= 32 {
                        u32::MAX
                    } else {
                        1 << max_shift
                    },
                },
                transmission_flags: flags | NBD_FLAG_HAS_FLAGS,
                structured_replies: structured,
                meta_contexts: contexts,
            },
        )
}

fn arb_header() -> impl Strategy<Value = RequestHeader> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| RequestHeader {
            flags,
            command,
            cookie,
            offset: offset >> (offset % 64),
            length: length >> (length % 32),
        })
}

proptest! {
    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = RequestHeader::parse(&bytes);
    }

    #[test]
    fn encode_then_parse_round_trips(h in arb_header()) {
        prop_assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
    }

    #[test]
    fn validation_never_accepts_a_range_past_the_end(h in arb_header(), s in arb_shape()) {
        match h.validate(&s) {
            Ok(r) if r.op != Op::Disc => {
                let end = r.offset.checked_add(u64::from(r.length));
                prop_assert!(end.is_some_and(|end| end <= s.size));
                if matches!(r.op, Op::Read { .. } | Op::Write { .. }) {
                    prop_assert!(r.length <= s.limits.maximum);
                }
                if r.op.command().writes() {
                    prop_assert_eq!(s.transmission_flags & NBD_FLAG_READ_ONLY, 0);
                }
                prop_assert_eq!(r.offset % u64::from(s.limits.minimum), 0);
                prop_assert_eq!(r.cookie, h.cookie);
            }
            Ok(_) => prop_assert_eq!(h.command, NBD_CMD_DISC),
            Err(e) => {
                prop_assert!(!e.is_fatal());
                prop_assert!(Errno::from_code(e.errno().code()).is_some());
            }
        }
    }
}
