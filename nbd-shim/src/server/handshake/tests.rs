#![allow(clippy::unwrap_used)]
use super::*;
use crate::backend::BlockSizeLimits;
use crate::server::{Server, ServerConfig};
use crate::test_support::NullDevice;

/// A device whose minimum block size is `minimum`.
fn device(minimum: u32) -> NullDevice {
    NullDevice {
        contexts: vec!["x-blkrep:dirty".into()],
        limits: BlockSizeLimits {
            minimum,
            preferred: 4096,
            maximum: 1 << 20,
        },
        read_only: false,
        fast_zero: true,
    }
}

/// In-memory duplex: reads from `input`, collects output.
struct Duplex {
    input: io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn server() -> Server {
    let server = Server::new(ServerConfig::default());
    server
        .add_export("disk", Some("test disk".into()), Arc::new(device(1)))
        .unwrap();
    server
        .add_export("aligned", None, Arc::new(device(4096)))
        .unwrap();
    server
}

fn option(out: &mut Vec<u8>, opt: &ClientOption) {
    let data = opt.encode_data();
    out.extend_from_slice(
        &OptionHeader {
            option: opt.code(),
            length: u32::try_from(data.len()).unwrap(),
        }
        .encode(),
    );
    out.extend_from_slice(&data);
}

fn client(flags: u32, options: &[ClientOption]) -> Vec<u8> {
    let mut out = flags.to_be_bytes().to_vec();
    for opt in options {
        option(&mut out, opt);
    }
    out
}

fn run(server: &Server, input: Vec<u8>) -> (Result<Option<Negotiated>, HandshakeError>, Vec<u8>) {
    let mut duplex = Duplex {
        input: io::Cursor::new(input),
        output: Vec::new(),
    };
    let result = server.negotiate(&mut duplex);
    (result, duplex.output)
}

/// Option replies after the 18-byte greeting.
fn replies(output: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut at = GREETING_LEN;
    let mut out = Vec::new();
    while at < output.len() {
        let Ok((reply, used)) = parse_option_reply(&output[at..]) else {
            break;
        };
        out.push((reply.option, reply.reply_type, reply.data.to_vec()));
        at += used;
    }
    out
}

fn go(name: &str, requests: &[u16]) -> ClientOption {
    ClientOption::Go(InfoRequest {
        name: name.into(),
        requests: requests.to_vec(),
    })
}

#[test]
fn go_enters_transmission_with_info() {
    let s = server();
    let (result, output) = run(
        &s,
        client(
            3,
            &[go(
                "disk",
                &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
            )],
        ),
    );
    let n = result.unwrap().unwrap();
    assert_eq!(n.export, "disk");
    assert_eq!(n.size, 1 << 20);
    assert!(!n.structured_replies);
    assert_eq!(n.transmission_flags & NBD_FLAG_SEND_DF, 0);
    assert_eq!(&output[..8], b"NBDMAGIC");
    let r = replies(&output);
    let kinds: Vec<_> = r
        .iter()
        .map(|(_, t, d)| (*t, d.get(..2).map(|b| b[1])))
        .collect();
    assert_eq!(
        kinds,
        [
            (NBD_REP_INFO, Some(0)),
            (NBD_REP_INFO, Some(3)),
            (NBD_REP_INFO, Some(1)),
            (NBD_REP_INFO, Some(2)),
            (NBD_REP_ACK, None)
        ]
    );
    assert_eq!(&r[2].2[2..], b"disk");
    assert_eq!(&r[3].2[2..], b"test disk");
}

#[test]
fn export_name_honours_no_zeroes() {
    let s = server();
    let (result, output) = run(&s, client(3, &[ClientOption::ExportName("disk".into())]));
    assert!(result.unwrap().is_some());
    assert_eq!(output.len(), GREETING_LEN + 10);
    let (result, output) = run(&s, client(1, &[ClientOption::ExportName("disk".into())]));
    assert!(result.unwrap().is_some());
    assert_eq!(output.len(), GREETING_LEN + 134);
    let (result, _) = run(&s, client(1, &[ClientOption::ExportName("nope".into())]));
    assert!(matches!(result, Err(HandshakeError::UnknownExport(_))));
}

#[test]
fn unknown_client_flags_drop_the_connection() {
    let (result, _) = run(&server(), client(4, &[]));
    assert!(matches!(
        result,
        Err(HandshakeError::Protocol(OptionError::UnknownClientFlags(4)))
    ));
}

#[test]
fn unknown_options_are_unsupported_and_negotiation_continues() {
    let s = server();
    let (result, output) = run(
        &s,
        client(
            1,
            &[
                ClientOption::Unsupported(4),
                ClientOption::StartTls,
                ClientOption::Unsupported(11),
                go("disk", &[]),
            ],
        ),
    );
    assert!(result.unwrap().is_some());
    let r = replies(&output);
    assert_eq!((r[0].0, r[0].1), (4, NBD_REP_ERR_UNSUP));
    // NOTLS: "MUST respond with NBD_REP_ERR_POLICY (if it does not support TLS for
    // policy reasons)".
    assert_eq!((r[1].0, r[1].1), (NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY));
    assert_eq!((r[2].0, r[2].1), (11, NBD_REP_ERR_UNSUP));
    assert_eq!(r.last().unwrap().1, NBD_REP_ACK);
}

#[test]
fn list_info_and_abort() {
    let s = server();
    let info = ClientOption::Info(InfoRequest {
        name: "missing".into(),
        requests: vec![],
    });
    let (result, output) = run(
        &s,
        client(1, &[ClientOption::List, info, ClientOption::Abort]),
    );
    assert!(result.unwrap().is_none());
    let r = replies(&output);
    assert_eq!(r[0].1, NBD_REP_SERVER);
    assert_eq!(&r[0].2, b"\0\0\0\x07aligned");
    assert_eq!(r[1].1, NBD_REP_SERVER);
    assert_eq!(&r[1].2, b"\0\0\0\x04disktest disk");
    assert_eq!(r[2].1, NBD_REP_ACK);
    assert_eq!(r[3].1, NBD_REP_ERR_UNKNOWN);
    assert_eq!((r[4].0, r[4].1), (NBD_OPT_ABORT, NBD_REP_ACK));
}

#[test]
fn malformed_options_are_invalid_and_negotiation_continues() {
    let s = server();
    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(
        &OptionHeader {
            option: NBD_OPT_GO,
            length: 3,
        }
        .encode(),
    );
    input.extend_from_slice(&[0, 0, 9]);
    input.extend_from_slice(
        &OptionHeader {
            option: NBD_OPT_LIST,
            length: 1,
        }
        .encode(),
    );
    input.push(0);
    option(&mut input, &go("disk", &[]));
    let (result, output) = run(&s, input);
    assert!(result.unwrap().is_some());
    let r = replies(&output);
    assert_eq!(r[0].1, NBD_REP_ERR_INVALID);
    assert_eq!(r[1].1, NBD_REP_ERR_INVALID);
    assert!(r[0].2.starts_with(b"Malformed"));
}

#[test]
fn oversized_options_are_skipped_or_fatal() {
    let s = server();
    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(
        &OptionHeader {
            option: NBD_OPT_GO,
            length: MAX_OPTION_DATA + 1,
        }
        .encode(),
    );
    input.resize(
        input.len() + usize::try_from(MAX_OPTION_DATA + 1).unwrap(),
        0,
    );
    option(&mut input, &go("disk", &[]));
    let (result, output) = run(&s, input);
    assert!(result.unwrap().is_some());
    assert_eq!(replies(&output)[0].1, NBD_REP_ERR_TOO_BIG);

    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(
        &OptionHeader {
            option: NBD_OPT_LIST,
            length: u32::MAX,
        }
        .encode(),
    );
    let (result, _) = run(&s, input);
    assert!(matches!(result, Err(HandshakeError::OptionTooLarge { .. })));

    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(
        &OptionHeader {
            option: NBD_OPT_EXPORT_NAME,
            length: MAX_OPTION_DATA + 1,
        }
        .encode(),
    );
    let (result, _) = run(&s, input);
    assert!(matches!(result, Err(HandshakeError::ExportNameRefused(_))));
}

#[test]
fn bad_option_magic_is_fatal() {
    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(&[0u8; 16]);
    let (result, _) = run(&server(), input);
    assert!(matches!(
        result,
        Err(HandshakeError::Protocol(OptionError::BadMagic(0)))
    ));
}

#[test]
fn truncated_input_is_an_io_error() {
    let (result, _) = run(&server(), vec![0, 0]);
    assert!(matches!(result, Err(HandshakeError::Io(_))));
}

fn meta(set: bool, export: &str, queries: &[&str]) -> ClientOption {
    let m = MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| (*q).to_owned()).collect(),
    };
    if set {
        ClientOption::SetMetaContext(m)
    } else {
        ClientOption::ListMetaContext(m)
    }
}

#[test]
fn meta_contexts_are_listed_and_selected() {
    let s = server();
    let options = [
        meta(true, "disk", &["base:allocation"]),
        ClientOption::StructuredReply,
        meta(false, "disk", &[]),
        meta(false, "disk", &["qemu:"]),
        meta(
            true,
            "disk",
            &[
                "base:allocation",
                "qemu:dirty-bitmap:blkrep",
                "base:",
                "nope:x",
            ],
        ),
        go("disk", &[NBD_INFO_BLOCK_SIZE]),
    ];
    let (result, output) = run(&s, client(1, &options));
    let n = result.unwrap().unwrap();
    assert!(n.structured_replies);
    assert_ne!(n.transmission_flags & NBD_FLAG_SEND_DF, 0);
    assert_eq!(
        n.meta_contexts,
        ["base:allocation", "qemu:dirty-bitmap:blkrep"]
    );
    let r = replies(&output);
    assert_eq!(r[0].1, NBD_REP_ERR_INVALID); // SET before structured replies
    assert_eq!(r[1].1, NBD_REP_ACK);
    let listed: Vec<_> = r[2..5]
        .iter()
        .map(|(_, t, d)| (*t, String::from_utf8_lossy(&d[4..]).into_owned()))
        .collect();
    assert_eq!(
        listed,
        [
            (NBD_REP_META_CONTEXT, "base:allocation".to_owned()),
            (NBD_REP_META_CONTEXT, "x-blkrep:dirty".to_owned()),
            (NBD_REP_META_CONTEXT, "qemu:dirty-bitmap:blkrep".to_owned())
        ]
    );
    assert_eq!(r[5].1, NBD_REP_ACK);
    assert_eq!(&r[6].2[4..], b"qemu:dirty-bitmap:blkrep");
    assert_eq!(r[7].1, NBD_REP_ACK);
}

#[test]
fn contexts_for_another_export_are_dropped_at_go() {
    let s = server();
    let options = [
        ClientOption::StructuredReply,
        meta(true, "disk", &["base:allocation"]),
        go("aligned", &[NBD_INFO_BLOCK_SIZE]),
    ];
    let (result, _) = run(&s, client(1, &options));
    assert!(result.unwrap().unwrap().meta_contexts.is_empty());
}

#[test]
fn aligned_exports_need_block_size_at_go() {
    let s = server();
    let (result, output) = run(
        &s,
        client(
            1,
            &[go("aligned", &[]), go("aligned", &[NBD_INFO_BLOCK_SIZE])],
        ),
    );
    assert!(result.unwrap().is_some());
    let r = replies(&output);
    assert_eq!(
        r.iter()
            .filter(|(_, t, _)| *t == NBD_REP_ERR_BLOCK_SIZE_REQD)
            .count(),
        1
    );
    assert_eq!(r.last().unwrap().1, NBD_REP_ACK);
}

#[test]
fn required_tls_refuses_every_option_but_starttls_and_abort() {
    let s = server();
    let tls = crate::TlsPolicy::Required(crate::test_support::tls_config().0);
    let options = [
        ClientOption::List,
        go("disk", &[]),
        ClientOption::Info(InfoRequest {
            name: "disk".into(),
            requests: vec![],
        }),
        ClientOption::StructuredReply,
        meta(false, "disk", &[]),
        ClientOption::Abort,
    ];
    let mut duplex = Duplex {
        input: io::Cursor::new(client(1, &options)),
        output: Vec::new(),
    };
    assert!(s.negotiate_tls(&mut duplex, &tls).unwrap().is_none());
    let r = replies(&duplex.output);
    let kinds: Vec<_> = r.iter().map(|(_, t, _)| *t).collect();
    assert_eq!(
        kinds,
        [
            NBD_REP_ERR_TLS_REQD,
            NBD_REP_ERR_TLS_REQD,
            NBD_REP_ERR_TLS_REQD,
            NBD_REP_ERR_TLS_REQD,
            NBD_REP_ERR_TLS_REQD,
            NBD_REP_ACK
        ]
    );
    // No export name crosses the wire in plaintext.
    assert!(!duplex.output.windows(4).any(|w| w == b"disk"));

    let (result, output) = {
        let mut duplex = Duplex {
            input: io::Cursor::new(client(1, &[ClientOption::ExportName("disk".into())])),
            output: Vec::new(),
        };
        (s.negotiate_tls(&mut duplex, &tls), duplex.output)
    };
    assert!(matches!(result, Err(HandshakeError::TlsRequired(_))));
    assert_eq!(output.len(), GREETING_LEN);
}

#[test]
fn optional_tls_serves_plaintext_and_garbage_after_starttls_ends_the_session() {
    let s = server();
    let tls = crate::TlsPolicy::Optional(crate::test_support::tls_config().0);
    let mut duplex = Duplex {
        input: io::Cursor::new(client(1, &[ClientOption::List, go("disk", &[])])),
        output: Vec::new(),
    };
    assert_eq!(
        s.negotiate_tls(&mut duplex, &tls).unwrap().unwrap().export,
        "disk"
    );

    let mut input = client(1, &[ClientOption::StartTls]);
    input.extend_from_slice(b"this is not a TLS ClientHello at all");
    let mut duplex = Duplex {
        input: io::Cursor::new(input),
        output: Vec::new(),
    };
    let result = s.negotiate_tls(&mut duplex, &tls);
    assert!(matches!(result, Err(HandshakeError::Tls(_))), "{result:?}");
    let r = replies(&duplex.output);
    assert_eq!((r[0].0, r[0].1), (NBD_OPT_STARTTLS, NBD_REP_ACK));
}

#[test]
fn shutting_down_refuses_options() {
    let s = server();
    s.shutdown();
    let (result, output) = run(&s, client(1, &[go("disk", &[]), ClientOption::Abort]));
    assert!(result.unwrap().is_none());
    let r = replies(&output);
    assert_eq!(r[0].1, NBD_REP_ERR_SHUTDOWN);
    assert_eq!(r[1].1, NBD_REP_ACK);
}
