//! What a test's primary is made of: its groups, disks and their initial content
//! ([`Spec`]), and where each file of it lives in the test's temp dir with the
//! configuration text that names them ([`Layout`]).

use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::path::PathBuf;

use crate::pseudo_random;

/// Initial content of an image.
#[derive(Debug, Clone)]
pub enum Init {
    /// A hole of the given size (set_len).
    Sparse,
    /// Pseudo-random bytes from this seed.
    Random(u64),
    /// These bytes (padded with zeroes to the disk size).
    Bytes(Vec<u8>),
}

/// One disk (export) of a group.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Its export name, also its image's file name (`NAME.img`).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The image's content before the daemon starts.
    pub init: Init,
    /// Exported read-only.
    pub read_only: bool,
    /// Opened with O_DIRECT.
    pub direct: bool,
}

impl DiskSpec {
    /// A sparse, writable disk.
    pub fn new(name: &str, size: u64) -> Self {
        DiskSpec {
            name: name.into(),
            size,
            init: Init::Sparse,
            read_only: false,
            direct: false,
        }
    }
    /// With this initial content.
    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
    /// Exported read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    /// Opened with O_DIRECT.
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }
}

/// Where a group's closed cycles go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumer {
    /// No `[group.consumer]` section.
    None,
    /// A local copy in the test's `copy-GROUP` directory.
    LocalCopy,
    /// Cycles are acknowledged and dropped.
    Discard,
    /// These lines go under `[group.consumer]` as they are.
    Raw(String),
}

/// One consistency group: its ring, cycle interval, consumer and disks.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// The group's name (its ring is `NAME.ring`).
    pub name: String,
    /// `ring_size`, as the config spells it.
    pub ring_size: String,
    /// `block_size`, if set.
    pub block_size: Option<String>,
    /// `interval` between automatic cycle closes.
    pub interval: String,
    /// `tracking`, if set.
    pub tracking: Option<bool>,
    /// Where its cycles go.
    pub consumer: Consumer,
    /// Its disks.
    pub disks: Vec<DiskSpec>,
}

impl GroupSpec {
    /// A group with a local-copy consumer and no automatic cycles.
    pub fn new(name: &str, disks: Vec<DiskSpec>) -> Self {
        GroupSpec {
            name: name.into(),
            ring_size: "64MiB".into(),
            block_size: Some("4KiB".into()),
            interval: "1h".into(),
            tracking: None,
            consumer: Consumer::LocalCopy,
            disks,
        }
    }
    /// With this consumer.
    pub fn consumer(mut self, c: Consumer) -> Self {
        self.consumer = c;
        self
    }
    /// With `tracking` set.
    pub fn tracking(mut self, t: bool) -> Self {
        self.tracking = Some(t);
        self
    }
    /// With this ring size.
    pub fn ring_size(mut self, s: &str) -> Self {
        self.ring_size = s.into();
        self
    }
    /// With this cycle interval.
    pub fn interval(mut self, s: &str) -> Self {
        self.interval = s.into();
        self
    }
}

/// A whole primary: its groups and NBD listeners.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its groups.
    pub groups: Vec<GroupSpec>,
    /// Serve NBD on the test's unix socket.
    pub unix: bool,
    /// Serve NBD on TCP, on a port of 127.0.0.1 the daemon picks.
    pub tcp: bool,
}

impl Spec {
    /// These groups, served on the unix socket only.
    pub fn new(groups: Vec<GroupSpec>) -> Self {
        Spec {
            groups,
            unix: true,
            tcp: false,
        }
    }
    /// One group "vm1" (local-copy consumer, interval 1h) with one sparse disk "disk0".
    pub fn single(size: u64) -> Self {
        Spec::new(vec![GroupSpec::new(
            "vm1",
            vec![DiskSpec::new("disk0", size)],
        )])
    }
    /// Also served on TCP.
    pub fn with_tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    /// Every disk of every group.
    pub fn disks(&self) -> impl Iterator<Item = &DiskSpec> {
        self.groups.iter().flat_map(|g| g.disks.iter())
    }
}

fn q(s: &str) -> String {
    // TOML basic string; Debug escaping matches TOML for the ASCII paths we use.
    format!("{s:?}")
}

/// Paths of one test's files, all under its temp dir.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The temp dir.
    pub root: PathBuf,
}

impl Layout {
    /// The primary's configuration file.
    pub fn config(&self) -> PathBuf {
        self.root.join("primary.toml")
    }
    /// The primary's control socket.
    pub fn ctl(&self) -> PathBuf {
        self.root.join("primary.ctl")
    }
    /// The NBD unix socket.
    pub fn nbd_sock(&self) -> PathBuf {
        self.root.join("nbd.sock")
    }
    /// The image of `disk`.
    pub fn image(&self, disk: &str) -> PathBuf {
        self.root.join(format!("{disk}.img"))
    }
    /// The ring of `group`.
    pub fn ring(&self, group: &str) -> PathBuf {
        self.root.join(format!("{group}.ring"))
    }
    /// The local-copy directory of `group`.
    pub fn copy_dir(&self, group: &str) -> PathBuf {
        self.root.join(format!("copy-{group}"))
    }
    /// The local copy of `disk` of `group`.
    pub fn copy_image(&self, group: &str, disk: &str) -> PathBuf {
        self.copy_dir(group).join(format!("{disk}.img"))
    }
    /// The daemon's log (stdout and stderr of every run).
    pub fn log(&self) -> PathBuf {
        self.root.join("primary.log")
    }

    /// The config text for `spec`, with a TCP listener on 127.0.0.1:`tcp_port` if
    /// given (0: a port the daemon picks).
    pub fn config_text(&self, spec: &Spec, tcp_port: Option<u16>) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "control_socket = {}", q(&self.ctl().to_string_lossy()));
        let _ = writeln!(s, "\n[nbd]");
        if spec.unix {
            let _ = writeln!(s, "unix_socket = {}", q(&self.nbd_sock().to_string_lossy()));
        }
        if let Some(port) = tcp_port {
            let _ = writeln!(s, "tcp = {}", q(&format!("127.0.0.1:{port}")));
        }
        for g in &spec.groups {
            let _ = writeln!(s, "\n[[group]]");
            let _ = writeln!(s, "name = {}", q(&g.name));
            let _ = writeln!(s, "ring = {}", q(&self.ring(&g.name).to_string_lossy()));
            let _ = writeln!(s, "ring_size = {}", q(&g.ring_size));
            if let Some(bs) = &g.block_size {
                let _ = writeln!(s, "block_size = {}", q(bs));
            }
            let _ = writeln!(s, "interval = {}", q(&g.interval));
            if let Some(t) = g.tracking {
                let _ = writeln!(s, "tracking = {t}");
            }
            match &g.consumer {
                Consumer::None => {}
                Consumer::LocalCopy => {
                    let _ = writeln!(s, "\n[group.consumer]\ntype = \"local-copy\"");
                    let _ = writeln!(s, "dir = {}", q(&self.copy_dir(&g.name).to_string_lossy()));
                }
                Consumer::Discard => {
                    let _ = writeln!(s, "\n[group.consumer]\ntype = \"discard\"");
                }
                Consumer::Raw(lines) => {
                    let _ = writeln!(s, "\n[group.consumer]\n{lines}");
                }
            }
            for d in &g.disks {
                let _ = writeln!(s, "\n[[group.disk]]");
                let _ = writeln!(s, "name = {}", q(&d.name));
                let _ = writeln!(s, "image = {}", q(&self.image(&d.name).to_string_lossy()));
                if d.read_only {
                    let _ = writeln!(s, "read_only = true");
                }
                if d.direct {
                    let _ = writeln!(s, "direct = true");
                }
            }
        }
        s
    }

    /// Creates every image of `spec` with its initial content.
    pub fn write_images(&self, spec: &Spec) {
        for d in spec.disks() {
            let p = self.image(&d.name);
            let mut f =
                fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
            match &d.init {
                Init::Sparse => {}
                Init::Random(seed) => {
                    let len = usize::try_from(d.size).expect("size fits usize");
                    f.write_all(&pseudo_random(*seed, len))
                        .expect("write image");
                }
                Init::Bytes(b) => f.write_all(b).expect("write image"),
            }
            f.set_len(d.size).expect("set_len");
            f.sync_all().expect("sync image");
        }
        for g in &spec.groups {
            if g.consumer == Consumer::LocalCopy {
                fs::create_dir_all(self.copy_dir(&g.name)).expect("mkdir copy dir");
            }
        }
    }
}
