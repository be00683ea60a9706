//! Serves a raw image (file or block device) over NBD on a unix socket until SIGINT or
//! SIGTERM, then shuts down cleanly and prints the export's counters.
//!
//! ```text
//! cargo run -p nbd-shim --example serve -- [--read-only] [--direct] [--tcp ADDR] IMAGE SOCKET [NAME]
//! qemu-io -f raw 'nbd+unix:///NAME?socket=SOCKET' -c 'write -P 0xab 0 1M'
//! nbdinfo --map 'nbd+unix:///NAME?socket=SOCKET'
//! ```
//!
//! Log level comes from `RUST_LOG` (default `info`).

use std::process::ExitCode;
use std::sync::Arc;

use nbd_shim::backend::{ImageFile, ImageFileOptions};
use nbd_shim::{Server, ServerConfig};
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str = "usage: serve [--read-only] [--direct] [--tcp ADDR] IMAGE SOCKET [NAME]";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut options = ImageFileOptions::default();
    let mut tcp = None;
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--read-only" => options.read_only = true,
            "--direct" => options.direct = true,
            "--tcp" => tcp = args.next(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => positional.push(arg),
        }
    }
    let (image, socket, name) = match positional.as_slice() {
        [image, socket] => (image, socket, ""),
        [image, socket, name] => (image, socket, name.as_str()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };

    // Block the signals before any thread starts so every thread inherits the mask and
    // only the sigwait below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(err) = signals.thread_block() {
        eprintln!("blocking signals: {err}");
        return ExitCode::FAILURE;
    }

    let dev = match ImageFile::open(image, options) {
        Ok(dev) => dev,
        Err(err) => {
            eprintln!("{image}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let server = Server::new(ServerConfig::default());
    if let Err(err) = server.add_export(name, Some(format!("raw image {image}")), Arc::new(dev)) {
        eprintln!("{err}");
        return ExitCode::FAILURE;
    }
    if let Err(err) = server.listen_unix(socket) {
        eprintln!("{err}");
        return ExitCode::FAILURE;
    }
    if let Some(addr) = tcp {
        match server.listen_tcp(addr.as_str()) {
            Ok(bound) => eprintln!("listening on tcp {bound}"),
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("serving {image} as {name:?} on {socket}");

    match signals.wait() {
        Ok(signal) => eprintln!("{signal}: shutting down"),
        Err(err) => eprintln!("sigwait: {err}; shutting down"),
    }
    server.shutdown();
    if let Some(stats) = server.export_stats(name) {
        eprintln!("{stats:?}");
    }
    ExitCode::SUCCESS
}
