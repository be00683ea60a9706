//! Handshake: the pure option parsers, then the whole negotiation state machine over an
//! in-memory stream whose client side is the fuzz input, without TLS and with TLS
//! optional or required (the first byte picks), so the option gate, NBD_OPT_STARTTLS and
//! the rustls handshake on whatever bytes follow it are fuzzed too.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nbd_shim::proto::option::{parse_option, parse_option_reply, ClientFlags, OptionHeader};
use nbd_shim::{Server, ServerConfig, TlsPolicy};

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

/// Optional and required TLS with a lab certificate (written once to a temp dir, since
/// wire loads PEM files) and client certificates required.
fn policies() -> &'static [TlsPolicy; 3] {
    static POLICIES: OnceLock<[TlsPolicy; 3]> = OnceLock::new();
    POLICIES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nbd-shim-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = lab_ca::create_ca("fuzz CA").unwrap();
        let host = lab_ca::issue_host(&ca, &["127.0.0.1".to_owned()]).unwrap();
        let (ca_path, cert, key) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&ca_path, &ca.cert).unwrap();
        std::fs::write(&cert, &host.cert).unwrap();
        std::fs::write(&key, &host.key).unwrap();
        let config = wire::tls::server_config_with_optional_client_ca(&cert, &key, Some(&ca_path)).unwrap();
        [TlsPolicy::Off, TlsPolicy::Optional(Arc::clone(&config)), TlsPolicy::Required(config)]
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
    if let Some((choice, rest)) = data.split_first() {
        let policy = &policies()[usize::from(*choice % 3)];
        let mut stream = Duplex { input: rest, written: 0 };
        let _ = server().negotiate_tls(&mut stream, policy);
    }
});
