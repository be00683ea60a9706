//! An [`Overlay`] served by the real server to a real client (`qemu-io`, `qemu-img`):
//! the writes land in the overlay, the base file stays as it was, and discarding the
//! overlay removes its file.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use nbd_shim::backend::{Overlay, OverlayBase, OverlayExtent};
use nbd_shim::{Extent, Server, ServerConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

/// A base read from a file opened read-only.
struct FileBase {
    file: File,
}

impl OverlayBase for FileBase {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len.min(SIZE - offset),
            flags: 0,
        }])
    }
}

fn checksum(path: &Path) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(&std::fs::read(path).unwrap());
    hasher.finish()
}

/// Runs a qemu tool; `None` when it is not installed.
fn run(tool: &str, args: &[&str]) -> Option<String> {
    let output = match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return None,
        Err(err) => panic!("{tool}: {err}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{tool} {args:?}: {}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        !stdout.contains("failed") && !stderr.contains("failed"),
        "{tool} {args:?}:\n{stdout}\n{stderr}"
    );
    Some(stdout)
}

#[test]
fn qemu_io_writes_into_the_overlay_and_never_into_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.img");
    std::fs::write(&base_path, vec![0x5a; usize::try_from(SIZE).unwrap()]).unwrap();
    let before = checksum(&base_path);
    let base = Arc::new(FileBase {
        file: File::open(&base_path).unwrap(),
    });
    let overlay_path = dir.path().join("test.overlay");
    let overlay = Arc::new(Overlay::create(base, &overlay_path, 4096).unwrap());
    let server = Server::new(ServerConfig::default());
    server
        .add_export("test", Some("test failover".into()), overlay.clone())
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    server.listen_unix(&socket).unwrap();
    let url = format!("nbd+unix:///test?socket={}", socket.display());

    let commands = [
        "read -P 0x5a 0 4096",
        // Unaligned, across three blocks: read-modify-write at both ends.
        "write -P 0xab 1000 10000",
        "read -P 0x5a 0 1000",
        "read -P 0xab 1000 10000",
        "read -P 0x5a 11000 1288",
        "write -z 65536 65536",
        "read -P 0 65536 65536",
        // A partial zeroing of a base block.
        "write -z 131172 100",
        "read -P 0x5a 131072 100",
        "read -P 0 131172 100",
        "read -P 0x5a 131272 3896",
        "discard 1048576 1048576",
        "read -P 0 1048576 1048576",
        "read -P 0x5a 2097152 2097152",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for command in &commands {
        args.extend(["-c", command]);
    }
    args.push(&url);
    let Some(out) = run("qemu-io", &args) else {
        eprintln!("qemu-io is not installed; skipping");
        return;
    };
    // qemu-io reports each read it verified ("read N/N bytes at offset ...").
    let reads = commands.iter().filter(|c| c.starts_with("read")).count();
    assert_eq!(out.matches("read ").count(), reads, "{out}");

    assert_eq!(
        overlay.extents(),
        vec![
            OverlayExtent {
                offset: 0,
                length: 12288,
                zero: false
            },
            OverlayExtent {
                offset: 65536,
                length: 65536,
                zero: true
            },
            OverlayExtent {
                offset: 131072,
                length: 4096,
                zero: false
            },
            OverlayExtent {
                offset: MIB,
                length: MIB,
                zero: true
            },
        ]
    );
    assert_eq!(overlay.held_bytes(), 12288 + 65536 + 4096 + MIB);

    // base:allocation as a client sees it: the zeroed ranges read as zeroes.
    if let Some(map) = run("qemu-img", &["map", "-f", "raw", "--output=json", &url]) {
        let zero = |start: u64, length: u64| {
            format!("\"start\": {start}, \"length\": {length}, ")
                + "\"depth\": 0, \"present\": true, \"zero\": true"
        };
        assert!(map.contains(&zero(65536, 65536)), "{map}");
        assert!(map.contains(&zero(MIB, MIB)), "{map}");
    }

    server.shutdown();
    drop(server);
    assert_eq!(checksum(&base_path), before, "the base was written");
    let overlay = Arc::try_unwrap(overlay).unwrap();
    overlay.discard().unwrap();
    assert!(!overlay_path.exists());
}
