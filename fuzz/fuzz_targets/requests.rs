//! Requests: header parse and validation against several export shapes (with the
//! invariants validation promises checked), then a whole session over an in-memory
//! stream: a fixed handshake followed by the fuzz input as the request stream.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd_shim::backend::BlockSizeLimits;
use nbd_shim::proto::option::{ClientOption, InfoRequest, MetaContextRequest, OptionHeader};
use nbd_shim::proto::request::{ExportShape, Op, RequestHeader};
use nbd_shim::proto::*;
use nbd_shim::{Server, ServerConfig};

#[path = "common.rs"]
mod common;
use common::{Duplex, MemDevice};

const ALL_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_SEND_DF
    | NBD_FLAG_SEND_CACHE
    | NBD_FLAG_SEND_FAST_ZERO;

fn shapes() -> [ExportShape; 5] {
    let limits = |minimum, maximum| BlockSizeLimits { minimum, preferred: 4096, maximum };
    [
        ExportShape { size: 1 << 30, limits: limits(1, 32 << 20), transmission_flags: ALL_FLAGS, structured_replies: true, meta_contexts: 2 },
        ExportShape { size: 10 * 4096 + 100, limits: limits(4096, 1 << 20), transmission_flags: ALL_FLAGS, structured_replies: true, meta_contexts: 1 },
        ExportShape { size: 0, limits: limits(512, 4096), transmission_flags: NBD_FLAG_HAS_FLAGS, structured_replies: false, meta_contexts: 0 },
        ExportShape { size: u64::MAX, limits: limits(1, u32::MAX), transmission_flags: ALL_FLAGS, structured_replies: true, meta_contexts: 3 },
        ExportShape { size: 1 << 20, limits: limits(512, 1 << 20), transmission_flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH, structured_replies: false, meta_contexts: 0 },
    ]
}

fn check(header: &RequestHeader, shape: &ExportShape) {
    match header.validate(shape) {
        Ok(request) if request.op == Op::Disc => {}
        Ok(request) => {
            let end = request.offset.checked_add(u64::from(request.length)).expect("accepted an overflowing range");
            assert!(end <= shape.size, "accepted a range past the end");
            assert_eq!(request.offset % u64::from(shape.limits.minimum), 0, "accepted a misaligned offset");
            if matches!(request.op, Op::Read { .. } | Op::Write { .. }) {
                assert!(request.length <= shape.limits.maximum, "accepted an oversized payload");
            }
            if request.op.command().writes() {
                assert_eq!(shape.transmission_flags & NBD_FLAG_READ_ONLY, 0, "accepted a write on a read-only export");
            }
        }
        Err(err) => {
            assert!(!err.is_fatal());
            assert!(Errno::from_code(err.errno().code()).is_some());
            let _ = err.to_string();
        }
    }
}

fn option(out: &mut Vec<u8>, opt: &ClientOption) {
    let data = opt.encode_data();
    out.extend_from_slice(&OptionHeader { option: opt.code(), length: u32::try_from(data.len()).unwrap() }.encode());
    out.extend_from_slice(&data);
}

/// Client side of the handshake, for the session part: structured replies (unless the
/// selector byte says simple), every context, GO.
fn handshake(structured: bool, export: &str) -> Vec<u8> {
    let mut out = 1u32.to_be_bytes().to_vec();
    if structured {
        option(&mut out, &ClientOption::StructuredReply);
        let queries = ["base:allocation", "x-blkrep:dirty", "x-blkrep:other", "qemu:dirty-bitmap:blkrep"];
        let meta = MetaContextRequest { export: export.into(), queries: queries.iter().map(|q| (*q).to_owned()).collect() };
        option(&mut out, &ClientOption::SetMetaContext(meta));
    }
    option(&mut out, &ClientOption::Go(InfoRequest { name: export.into(), requests: vec![NBD_INFO_BLOCK_SIZE] }));
    out
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // A small receive buffer so large writes take the out-of-buffer path.
        let config = ServerConfig { recv_buffer_size: 64 << 10, sparse_read_threshold: Some(4096), ..ServerConfig::default() };
        let server = Server::new(config);
        server.add_export("disk", None, Arc::new(MemDevice::new(1 << 20, 1, false))).unwrap();
        server.add_export("aligned", None, Arc::new(MemDevice::new(10 * 4096 + 100, 4096, false))).unwrap();
        server.add_export("ro", None, Arc::new(MemDevice::new(1 << 16, 512, true))).unwrap();
        server
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let shapes = shapes();
    for chunk in rest.chunks(28) {
        if let Ok(header) = RequestHeader::parse(chunk) {
            for shape in &shapes {
                check(&header, shape);
            }
            assert_eq!(RequestHeader::parse(&header.encode()), Ok(header));
        }
    }

    let export = ["disk", "aligned", "ro"][usize::from(selector % 3)];
    let mut input = handshake(selector & 4 == 0, export);
    // Most inputs would fail the magic check at once; stamp the magic on every 28-byte
    // header-sized piece when the selector asks, so the fuzzer reaches execution.
    let mut requests = rest.to_vec();
    if selector & 8 != 0 {
        for piece in requests.chunks_mut(28) {
            if piece.len() >= 4 {
                piece[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            }
        }
    }
    input.extend_from_slice(&requests);
    let mut stream = Duplex { input: &input, written: 0 };
    let _ = server().serve_stream(&mut stream);
});
