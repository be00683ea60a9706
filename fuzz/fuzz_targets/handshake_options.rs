//! Handshake: the pure option parsers, then the whole negotiation state machine over an
//! in-memory stream whose client side is the fuzz input.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd_shim::proto::option::{parse_option, parse_option_reply, ClientFlags, OptionHeader};
use nbd_shim::{Server, ServerConfig};

#[path = "common.rs"]
mod common;
use common::{Duplex, MemDevice};

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = Server::new(ServerConfig::default());
        server.add_export("disk", Some("fuzz disk".into()), Arc::new(MemDevice::new(1 << 20, 1, false))).unwrap();
        server.add_export("aligned", None, Arc::new(MemDevice::new(1 << 16, 4096, true))).unwrap();
        server
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = OptionHeader::parse(data);
    let _ = parse_option_reply(data);
    if let Some((code, rest)) = data.split_first_chunk::<4>() {
        let code = u32::from_be_bytes(*code);
        let _ = ClientFlags::parse(code, 3);
        // Fold the code onto the known options most of the time.
        let _ = parse_option(if code & 0x100 == 0 { code % 12 } else { code }, rest);
    }
    let mut stream = Duplex { input: data, written: 0 };
    let _ = server().negotiate(&mut stream);
});
