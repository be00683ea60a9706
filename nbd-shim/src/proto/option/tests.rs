#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

#[test]
fn greeting_matches_the_spec() {
    let g = greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..18], &[0, 3]);
}

#[test]
fn client_flags_must_match_what_was_advertised() {
    let both = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
    assert_eq!(
        ClientFlags::parse(3, both).unwrap(),
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        }
    );
    assert_eq!(ClientFlags::parse(0, both).unwrap(), ClientFlags::default());
    assert!(ClientFlags::parse(4, both).unwrap_err().is_fatal());
    assert!(ClientFlags::parse(NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE).is_err());
}

#[test]
fn option_header_round_trips_and_checks_magic() {
    let h = OptionHeader {
        option: NBD_OPT_GO,
        length: 12,
    };
    assert_eq!(OptionHeader::parse(&h.encode()).unwrap(), h);
    let mut bad = h.encode();
    bad[3] = 0;
    assert!(OptionHeader::parse(&bad).unwrap_err().is_fatal());
    assert!(matches!(
        OptionHeader::parse(&h.encode()[..10]),
        Err(OptionError::Truncated { .. })
    ));
}

#[test]
fn parses_go_with_info_requests() {
    let data = [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 2, 0, 3, 0, 1];
    let opt = parse_option(NBD_OPT_GO, &data).unwrap();
    let ClientOption::Go(info) = opt else {
        panic!("expected GO")
    };
    assert_eq!(info.name, "disk");
    assert_eq!(info.requests, vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
    assert!(info.wants(NBD_INFO_NAME));
    assert!(!info.wants(NBD_INFO_DESCRIPTION));
    assert!(matches!(
        parse_option(NBD_OPT_INFO, &data),
        Ok(ClientOption::Info(_))
    ));
}

#[test]
fn rejects_malformed_go() {
    // Name length past the data.
    assert!(matches!(
        parse_option(NBD_OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]),
        Err(OptionError::Malformed { .. })
    ));
    // Too short for the fixed fields.
    assert!(parse_option(NBD_OPT_GO, &[0, 0, 0]).is_err());
    // Request count disagrees with data length.
    assert!(parse_option(NBD_OPT_GO, &[0, 0, 0, 0, 0, 2, 0, 3]).is_err());
    assert!(parse_option(NBD_OPT_GO, &[0, 0, 0, 0, 0, 0, 0, 3]).is_err());
    // NUL in the name.
    assert_eq!(
        parse_option(NBD_OPT_GO, &[0, 0, 0, 1, 0, 0, 0]),
        Err(OptionError::InvalidString { option: NBD_OPT_GO })
    );
    // Empty name and no requests is fine (the default export).
    assert_eq!(
        parse_option(NBD_OPT_GO, &[0, 0, 0, 0, 0, 0]).unwrap(),
        ClientOption::Go(InfoRequest {
            name: String::new(),
            requests: vec![]
        })
    );
}

#[test]
fn options_without_data_refuse_data() {
    for option in [NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY] {
        assert!(parse_option(option, &[]).is_ok());
        assert_eq!(
            parse_option(option, &[1]),
            Err(OptionError::UnexpectedData { option, len: 1 })
        );
    }
    assert_eq!(
        parse_option(NBD_OPT_ABORT, &[1, 2, 3]).unwrap(),
        ClientOption::Abort
    );
}

#[test]
fn export_name_is_the_whole_data() {
    assert_eq!(
        parse_option(NBD_OPT_EXPORT_NAME, b"vm1").unwrap(),
        ClientOption::ExportName("vm1".into())
    );
    assert_eq!(
        parse_option(NBD_OPT_EXPORT_NAME, b"").unwrap(),
        ClientOption::ExportName(String::new())
    );
    assert!(parse_option(NBD_OPT_EXPORT_NAME, &[0xc3]).is_err());
}

#[test]
fn unknown_options_are_unsupported() {
    assert_eq!(
        parse_option(4, &[1, 2]).unwrap(),
        ClientOption::Unsupported(4)
    );
    assert_eq!(
        parse_option(11, &[]).unwrap(),
        ClientOption::Unsupported(11)
    );
    assert_eq!(
        parse_option(u32::MAX, &[]).unwrap(),
        ClientOption::Unsupported(u32::MAX)
    );
}

#[test]
fn parses_meta_context_queries() {
    let opt = ClientOption::SetMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into(), "x-blkrep:".into()],
    });
    assert_eq!(parse_option(opt.code(), &opt.encode_data()).unwrap(), opt);
    // A query count far larger than the data is refused without allocating.
    let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
    assert!(matches!(
        parse_option(NBD_OPT_LIST_META_CONTEXT, &data),
        Err(OptionError::Malformed { .. })
    ));
    // A query length past the end.
    let data = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'b'];
    assert!(parse_option(NBD_OPT_SET_META_CONTEXT, &data).is_err());
    // Trailing garbage.
    let data = [0, 0, 0, 0, 0, 0, 0, 0, 7];
    assert!(parse_option(NBD_OPT_SET_META_CONTEXT, &data).is_err());
}

#[test]
fn encodes_option_replies() {
    let mut out = Vec::new();
    put_info_export(&mut out, NBD_OPT_GO, 1 << 30, 0x1234);
    let (reply, used) = parse_option_reply(&out).unwrap();
    assert_eq!(used, out.len());
    assert_eq!(reply.option, NBD_OPT_GO);
    assert_eq!(reply.reply_type, NBD_REP_INFO);
    assert_eq!(reply.data, &[0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x12, 0x34]);

    let mut out = Vec::new();
    put_info_block_size(
        &mut out,
        NBD_OPT_INFO,
        BlockSizeLimits {
            minimum: 1,
            preferred: 4096,
            maximum: 1 << 25,
        },
    );
    let (reply, _) = parse_option_reply(&out).unwrap();
    assert_eq!(reply.data.len(), 14);
    assert_eq!(&reply.data[..2], &[0, 3]);

    let mut out = Vec::new();
    put_rep_server(&mut out, NBD_OPT_LIST, "vm1", Some("root disk"));
    let (reply, _) = parse_option_reply(&out).unwrap();
    assert_eq!(reply.reply_type, NBD_REP_SERVER);
    assert_eq!(reply.data, b"\0\0\0\x03vm1root disk");

    let mut out = Vec::new();
    put_meta_context(&mut out, NBD_OPT_SET_META_CONTEXT, 7, "base:allocation");
    put_ack(&mut out, NBD_OPT_SET_META_CONTEXT);
    let (first, used) = parse_option_reply(&out).unwrap();
    assert_eq!(first.data, b"\0\0\0\x07base:allocation");
    let (second, _) = parse_option_reply(&out[used..]).unwrap();
    assert_eq!((second.reply_type, second.data.len()), (NBD_REP_ACK, 0));

    let mut out = Vec::new();
    put_option_error(&mut out, 99, NBD_REP_ERR_UNSUP, &"x".repeat(10_000));
    let (reply, _) = parse_option_reply(&out).unwrap();
    assert_eq!(reply.reply_type, NBD_REP_ERR_UNSUP);
    assert_eq!(reply.data.len(), MAX_STRING_LEN);
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    let (buf, len) = export_name_reply(4096, 0x0003, false);
    assert_eq!(len, 134);
    assert_eq!(&buf[..10], &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3]);
    assert!(buf[10..].iter().all(|&b| b == 0));
    assert_eq!(export_name_reply(4096, 0x0003, true).1, 10);
}

fn arb_string() -> impl Strategy<Value = String> {
    "[a-z:0-9-]{0,40}"
}

fn arb_info() -> impl Strategy<Value = InfoRequest> {
    (arb_string(), proptest::collection::vec(any::<u16>(), 0..8))
        .prop_map(|(name, requests)| InfoRequest { name, requests })
}

fn arb_meta() -> impl Strategy<Value = MetaContextRequest> {
    (arb_string(), proptest::collection::vec(arb_string(), 0..8))
        .prop_map(|(export, queries)| MetaContextRequest { export, queries })
}

fn arb_option() -> impl Strategy<Value = ClientOption> {
    prop_oneof![
        arb_string().prop_map(ClientOption::ExportName),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StartTls),
        Just(ClientOption::StructuredReply),
        arb_info().prop_map(ClientOption::Info),
        arb_info().prop_map(ClientOption::Go),
        arb_meta().prop_map(ClientOption::ListMetaContext),
        arb_meta().prop_map(ClientOption::SetMetaContext),
        (11u32..).prop_map(ClientOption::Unsupported),
    ]
}

proptest! {
    #[test]
    fn arbitrary_option_data_never_panics(option in 0u32..12, data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_option(option, &data);
    }

    #[test]
    fn arbitrary_headers_and_replies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = OptionHeader::parse(&data);
        let _ = parse_option_reply(&data);
        let _ = ClientFlags::parse(u32::from_be_bytes([data.first().copied().unwrap_or(0), 0, 0, 0]), 3);
    }

    #[test]
    fn options_round_trip(opt in arb_option()) {
        prop_assert_eq!(parse_option(opt.code(), &opt.encode_data()), Ok(opt));
    }

    #[test]
    fn option_replies_round_trip(option in any::<u32>(), reply_type in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..100)) {
        let mut out = Vec::new();
        put_option_reply(&mut out, option, reply_type, &[&data]);
        let (reply, used) = parse_option_reply(&out).unwrap();
        prop_assert_eq!(used, out.len());
        prop_assert_eq!(reply, OptionReply { option, reply_type, data: &data });
    }
}
