use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;

use super::*;
use lab_ca::{create_ca, issue_host};

/// A directory with a lab CA, a replica certificate and a private key file.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca("test CA").unwrap();
        let host = issue_host(&ca, &["replica.example.com".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert).unwrap();
        std::fs::write(dir.path().join("replica.pem"), &host.cert).unwrap();
        let files = Files { dir };
        files.write_private("replica.key", &host.key, 0o600);
        files.write_private("psk", "0123456789abcdef0123\n", 0o600);
        files.write_private("psk2", "fedcba9876543210fedcba\n", 0o600);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_private(&self, name: &str, text: &str, mode: u32) {
        let path = self.path(name);
        let _ = std::fs::remove_file(&path);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
        // The umask may have taken bits the test wants.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn tls(&self) -> String {
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            self.path("replica.pem"),
            self.path("replica.key"),
            self.path("ca.pem")
        )
    }

    /// Lab mode with two entries, dc1's key in file `name`.
    fn plain(&self, name: &str) -> String {
        format!(
            "[plain_http]\n[[authorization]]\nprimary = \"*.dc1.example.com\"\nstorage = \"/var/lib/blkrep/dc1\"\ntrust_group = \"dc1\"\npsk_file = {:?}\n\n[[authorization]]\nprimary = \"lab.example.com\"\nstorage = \"/var/lib/blkrep/lab\"\ntrust_group = \"lab\"\npsk_file = {:?}\n",
            self.path(name),
            self.path("psk2")
        )
    }
}

const ENTRIES: &str = r#"
[[authorization]]
primary = "*.dc1.example.com"
storage = "/var/lib/blkrep/dc1"
trust_group = "dc1"

[[authorization]]
storage = "/var/lib/blkrep/any"
trust_group = "lab"
"#;

fn parse(text: &str) -> Result<ReplicaConfig, String> {
    ReplicaConfig::parse(text, Path::new("r.toml")).map_err(|e| e.to_string())
}

fn problems(text: &str) -> String {
    let error = parse(text).unwrap_err();
    assert!(
        error.starts_with("Configuration r.toml has "),
        "not a validation error: {error}"
    );
    error
}

#[test]
fn parses_a_good_tls_file() {
    let files = Files::new();
    let text = format!(
        "listen = \"0.0.0.0:8443\"\nmetrics = \"127.0.0.1:9442\"\nreserve = \"2GiB\"\ncontrol_socket = \"/tmp/r.sock\"\n{}{ENTRIES}",
        files.tls()
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(config.metrics, Some("127.0.0.1:9442".parse().unwrap()));
    assert_eq!(config.reserve, 2 << 30);
    assert_eq!(config.control_socket, Path::new("/tmp/r.sock"));
    assert!(matches!(config.transport, Transport::Tls(_)));
    assert_eq!(config.authorization.len(), 2);
    let first = &config.authorization[0];
    assert!(first
        .primary
        .as_ref()
        .unwrap()
        .matches("h1.dc1.example.com"));
    assert_eq!(first.storage, Path::new("/var/lib/blkrep/dc1"));
    assert_eq!(first.trust_group, "dc1");
    assert_eq!(config.authorization[1].primary, None);
    let settings = config.settings();
    assert_eq!(settings.reserve, 2 << 30);
    assert_eq!(settings.authorization, config.authorization);
}

#[test]
fn defaults_and_lab_mode() {
    let files = Files::new();
    let text = format!("listen = \"127.0.0.1:8443\"\n{}", files.plain("psk"));
    let config = parse(&text).unwrap();
    assert_eq!(config.metrics, None);
    assert_eq!(config.reserve, DEFAULT_RESERVE);
    assert_eq!(config.max_disk_size, DEFAULT_MAX_DISK_SIZE);
    assert_eq!(config.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
    assert_eq!(config.background_nice, crate::config::BackgroundNice(10));
    let quiet = parse(&format!("background_nice = 0\n{text}")).unwrap();
    assert_eq!(quiet.background_nice, crate::config::BackgroundNice(0));
    let error = parse(&format!("background_nice = 25\n{text}")).unwrap_err();
    assert!(
        error.contains("background_nice 25 is not a number of nice steps from 0 to 19"),
        "{error}"
    );
    match &config.transport {
        Transport::PlainWithPsk { allow_non_loopback } => assert!(!allow_non_loopback),
        other => panic!("{other:?}"),
    }
    // Each entry has its own key.
    let keys: Vec<_> = config.authorization.iter().map(|e| e.psk.clone()).collect();
    assert_eq!(
        keys,
        [
            PreSharedKey::new("0123456789abcdef0123".into()),
            PreSharedKey::new("fedcba9876543210fedcba".into())
        ]
    );
    assert!(!format!("{config:?}").contains("0123456789abcdef"));
    let path = files.path("r.toml");
    std::fs::write(&path, &text).unwrap();
    assert_eq!(
        control_socket(&path).unwrap(),
        Path::new(DEFAULT_CONTROL_SOCKET)
    );
}

#[test]
fn failover_section_has_a_hook_and_a_live_ring_size_each_optional() {
    let files = Files::new();
    let base = format!("listen = \"[::]:8443\"\n{}{ENTRIES}", files.tls());
    let config = parse(&base).unwrap();
    assert_eq!(
        (config.failover_hook, config.live_ring_size),
        (None, DEFAULT_LIVE_RING_SIZE)
    );
    let config = parse(&format!("{base}\n[failover]\nlive_ring_size = \"1GiB\"\n")).unwrap();
    assert_eq!(
        (config.failover_hook, config.live_ring_size),
        (None, 1 << 30)
    );
    let config = parse(&format!("{base}\n[failover]\nhook = [\"/bin/true\"]\n")).unwrap();
    assert_eq!(
        (config.failover_hook.unwrap().command, config.live_ring_size),
        (vec!["/bin/true".to_string()], DEFAULT_LIVE_RING_SIZE)
    );
    let error = problems(&format!("{base}\n[failover]\nlive_ring_size = \"1MiB\"\n"));
    assert!(
        error.contains("live_ring_size must be a multiple of 4KiB and at least 4MiB"),
        "{error}"
    );
}

#[test]
fn limits_default_and_are_checked() {
    let files = Files::new();
    let base = format!("listen = \"[::]:8443\"\n{}{ENTRIES}", files.tls());
    let config = parse(&base).unwrap();
    assert_eq!(config.limits, Limits::default());
    assert_eq!(config.settings().limits, Limits::default());
    let config = parse(&format!(
        "{base}\n[limits]\nmax_connections = 100\nmax_connections_per_address = 10\nmax_uploads_per_primary = 2\nhandshake_timeout = \"3s\"\nbody_timeout = \"1m\"\n"
    ))
    .unwrap();
    assert_eq!(
        config.limits,
        Limits {
            max_connections: 100,
            max_connections_per_address: 10,
            max_uploads_per_primary: 2,
            handshake_timeout: std::time::Duration::from_secs(3),
            body_timeout: std::time::Duration::from_secs(60),
        }
    );
    let partial = parse(&format!("{base}\n[limits]\nmax_uploads_per_primary = 4\n")).unwrap();
    assert_eq!(partial.limits.max_uploads_per_primary, 4);
    assert_eq!(
        partial.limits.max_connections,
        Limits::default().max_connections
    );
    let error = problems(&format!(
        "{base}\n[limits]\nmax_connections = 10\nmax_connections_per_address = 20\nmax_uploads_per_primary = 0\nbody_timeout = \"0s\"\n"
    ));
    for expected in [
        "[limits] max_connections_per_address (20) is more than max_connections (10)",
        "[limits] max_uploads_per_primary must be at least 1",
        "[limits] body_timeout must be at least 1s",
    ] {
        assert!(
            error.contains(expected),
            "missing {expected:?} in:\n{error}"
        );
    }
    let unknown = parse(&format!("{base}\n[limits]\nmax_conections = 1\n")).unwrap_err();
    assert!(unknown.contains("max_conections"), "{unknown}");
}

#[test]
fn reports_every_problem_at_once() {
    let files = Files::new();
    let text = format!(
        r#"
listen = "8443"
metrics = "localhost"
{}
[[authorization]]
storage = "/s/any"
trust_group = "any"

[[authorization]]
primary = "*.*.example.com"
storage = "/s/bad"
trust_group = "../up"

[[authorization]]
primary = "h1.example.com"
storage = ""
trust_group = "ok"

[[authorization]]
primary = "H1.example.com"
storage = "/s/dup"
trust_group = "ok"
"#,
        files.tls()
    );
    let error = problems(&text);
    for expected in [
        "listen = \"8443\" is not an address:port",
        "metrics = \"localhost\" is not an address:port",
        "[[authorization]] 2 (primary \"*.*.example.com\") comes after [[authorization]] 1, which has no primary",
        "[[authorization]] 4 (primary \"H1.example.com\") comes after [[authorization]] 1",
        "put the entry without primary last",
        "[[authorization]] 2 (primary \"*.*.example.com\"): \"*.*.example.com\" is not a DNS name",
        "trust_group \"../up\" is not a name",
        "[[authorization]] 3 (primary \"h1.example.com\"): storage is empty",
        "[[authorization]] 4 (primary \"H1.example.com\"): [[authorization]] 3 already has this primary",
    ] {
        assert!(error.contains(expected), "missing {expected:?} in:\n{error}");
    }
    assert!(error.contains("has 9 problem(s)"), "{error}");
}

#[test]
fn transport_problems() {
    let files = Files::new();
    let listen = "listen = \"127.0.0.1:8443\"\n";
    let both = problems(&format!("{listen}{}{}", files.tls(), files.plain("psk")));
    assert!(
        both.contains("both [tls] and [plain_http] are set"),
        "{both}"
    );
    let neither = problems(&format!("{listen}{ENTRIES}"));
    assert!(neither.contains("no transport: add [tls]"), "{neither}");

    files.write_private("open", "0123456789abcdef0123", 0o640);
    let open = problems(&format!("{listen}{}", files.plain("open")));
    assert!(
        open.contains("is open to group or others (mode 0640)"),
        "{open}"
    );
    assert!(open.contains("chmod 600"), "{open}");
    files.write_private("short", "  0123456789\n", 0o600);
    let short = problems(&format!("{listen}{}", files.plain("short")));
    assert!(
        short.contains("/short has 10 bytes; it needs at least 16"),
        "{short}"
    );
    files.write_private("spaced", "0123456789 abcdef0123", 0o600);
    let spaced = problems(&format!("{listen}{}", files.plain("spaced")));
    assert!(
        spaced.contains("printable ASCII without spaces"),
        "{spaced}"
    );
    let missing = problems(&format!("{listen}{}", files.plain("nonexistent")));
    assert!(missing.contains("nonexistent: No such file"), "{missing}");

    // A key that is not the certificate's.
    let other = create_ca("other").unwrap();
    std::fs::write(files.path("replica.key"), &other.key).unwrap();
    let mismatch = problems(&format!("{listen}{}{ENTRIES}", files.tls()));
    assert!(mismatch.contains("[tls]: "), "{mismatch}");
    std::fs::remove_file(files.path("ca.pem")).unwrap();
    let no_ca = problems(&format!("{listen}{}{ENTRIES}", files.tls()));
    assert!(no_ca.contains("client CA"), "{no_ca}");
}

#[test]
fn lab_mode_has_a_key_per_entry_and_stays_on_loopback() {
    let files = Files::new();
    let lab = files.plain("psk");
    let exposed = problems(&format!("listen = \"0.0.0.0:8443\"\n{lab}"));
    assert!(exposed.contains("is not a loopback address"), "{exposed}");
    let allowed = lab.replace(
        "[plain_http]\n",
        "[plain_http]\nallow_non_loopback = true\n",
    );
    let config = parse(&format!("listen = \"0.0.0.0:8443\"\n{allowed}")).unwrap();
    assert!(matches!(
        config.transport,
        Transport::PlainWithPsk {
            allow_non_loopback: true
        }
    ));
    let global = problems(&format!(
        "listen = \"127.0.0.1:8443\"\n{}",
        lab.replace(
            "[plain_http]\n",
            &format!("[plain_http]\npsk_file = {:?}\n", files.path("psk"))
        )
    ));
    assert!(
        global.contains("move psk_file into each [[authorization]] entry"),
        "{global}"
    );
    let keyless = problems(&format!(
        "listen = \"127.0.0.1:8443\"\n[plain_http]\n{ENTRIES}"
    ));
    assert!(keyless.contains("every entry needs psk_file"), "{keyless}");
    assert!(
        keyless.contains("every entry names its primary"),
        "{keyless}"
    );
    let with_tls = problems(&format!(
        "listen = \"127.0.0.1:8443\"\n{}{ENTRIES}psk_file = \"/k\"\n",
        files.tls()
    ));
    assert!(
        with_tls.contains("psk_file is for the plain-HTTP lab mode only"),
        "{with_tls}"
    );
}

#[test]
fn tenants_get_separate_storages_and_quotas() {
    let files = Files::new();
    let entry = |primary: &str, storage: &str, group: &str| {
        format!("[[authorization]]\nprimary = {primary:?}\nstorage = {storage:?}\ntrust_group = {group:?}\n")
    };
    let head = format!("listen = \"127.0.0.1:8443\"\n{}", files.tls());
    let nested = problems(&format!(
        "{head}{}{}",
        entry("a.dc1.example.com", "/srv/s", "dc1"),
        entry("a.dc2.example.com", "/srv/s/dc2", "dc2")
    ));
    assert!(nested.contains("overlap"), "{nested}");
    let shared = problems(&format!(
        "{head}{}{}",
        entry("a.dc1.example.com", "/srv/s", "dc1"),
        entry("a.dc2.example.com", "/srv/s/", "dc2")
    ));
    assert!(shared.contains("share storage"), "{shared}");
    let config = parse(&format!(
        "max_disk_size = \"1TiB\"\n{head}{}quota = \"4TiB\"\n{}",
        entry("a.dc1.example.com", "/srv/dc1", "dc1"),
        entry("b.dc1.example.com", "/srv/dc1", "dc1")
    ))
    .unwrap();
    assert_eq!(config.max_disk_size, 1 << 40);
    assert_eq!(config.authorization[0].quota, Some(4 << 40));
    assert_eq!(config.authorization[1].quota, None);
    let zero = problems(&format!(
        "{head}{}quota = 0\n",
        entry("a.dc1.example.com", "/srv/dc1", "dc1")
    ));
    assert!(zero.contains("quota must be more than zero"), "{zero}");
}

#[test]
fn warns_of_an_entry_a_wildcard_before_it_shadows() {
    let files = Files::new();
    let text = format!(
        "listen = \"127.0.0.1:8443\"\n{}[[authorization]]\nprimary = \"*.dc1.example.com\"\nstorage = \"/srv/dc1\"\ntrust_group = \"dc1\"\n[[authorization]]\nprimary = \"db.dc1.example.com\"\nstorage = \"/srv/db\"\ntrust_group = \"db\"\n",
        files.tls()
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(
        config.warnings[0].contains("[[authorization]] 1 comes first and allows every name"),
        "{:?}",
        config.warnings
    );
    let ordered = text
        .replace("*.dc1.example.com", "TMP")
        .replace("db.dc1.example.com", "*.dc1.example.com")
        .replace("TMP", "db.dc1.example.com");
    assert!(parse(&ordered).unwrap().warnings.is_empty());
}

#[test]
fn a_tls_key_others_can_read_is_refused() {
    let files = Files::new();
    let key = std::fs::read_to_string(files.path("replica.key")).unwrap();
    files.write_private("replica.key", &key, 0o644);
    let open = problems(&format!(
        "listen = \"127.0.0.1:8443\"\n{}{ENTRIES}",
        files.tls()
    ));
    assert!(
        open.contains("[tls] key") && open.contains("is open to group or others (mode 0644)"),
        "{open}"
    );
}

#[test]
fn needs_an_entry_and_knows_its_fields() {
    let files = Files::new();
    let empty = problems(&format!("listen = \"127.0.0.1:1\"\n{}", files.tls()));
    assert!(empty.contains("no [[authorization]] entry"), "{empty}");
    let unknown = parse(&format!(
        "listen = \"127.0.0.1:1\"\nlisten_tls = 1\n{}{ENTRIES}",
        files.tls()
    ))
    .unwrap_err();
    assert!(
        unknown.starts_with("Configuration r.toml is not valid") && unknown.contains("listen_tls"),
        "{unknown}"
    );
    let typo = parse(&format!(
        "listen = \"127.0.0.1:1\"\n{}{}",
        files.tls(),
        ENTRIES.replace(
            "trust_group = \"dc1\"",
            "trust_group = \"dc1\"\ntrustgroup = \"x\""
        )
    ))
    .unwrap_err();
    assert!(typo.contains("trustgroup"), "{typo}");
    let size = parse(&format!(
        "listen = \"127.0.0.1:1\"\nreserve = \"1 parsec\"\n{}{ENTRIES}",
        files.tls()
    ))
    .unwrap_err();
    assert!(size.contains("unknown unit"), "{size}");
    let same = problems(&format!(
        "listen = \"127.0.0.1:1\"\nmetrics = \"127.0.0.1:1\"\n{}{ENTRIES}",
        files.tls()
    ));
    assert!(same.contains("metrics needs its own port"), "{same}");
    // Port 0 for both: each gets a free port of its own.
    let ephemeral = parse(&format!(
        "listen = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n{}{ENTRIES}",
        files.tls()
    ))
    .unwrap();
    assert_eq!(ephemeral.metrics, Some(ephemeral.listen));
}

#[test]
fn nbd_listener_tls_and_socket_access() {
    let files = Files::new();
    let key = files.path("replica.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let base = format!("listen = \"127.0.0.1:8443\"\n{}{ENTRIES}", files.tls());
    let nbd = format!(
        "\n[nbd]\ntcp = \"0.0.0.0:10810\"\ntls = \"require\"\ntls_cert = {:?}\ntls_key = {key:?}\ntls_ca = {:?}\nsocket_mode = \"0660\"\n",
        files.path("replica.pem"),
        files.path("ca.pem")
    );
    let config = parse(&format!("{base}{nbd}")).unwrap();
    assert!(matches!(
        config.nbd_access.tls,
        nbd_shim::TlsPolicy::Required(_)
    ));
    assert_eq!(config.nbd_access.socket.mode, 0o660);
    assert!(config.nbd_access.warnings.is_empty());

    let open = parse(&format!("{base}\n[nbd]\ntcp = \"0.0.0.0:10810\"\n")).unwrap();
    assert_eq!(
        open.nbd_access.warnings.len(),
        1,
        "{:?}",
        open.nbd_access.warnings
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = problems(&format!("{base}{}", nbd.replace("0660", "rw")));
    for expected in [
        "[nbd] tls_key",
        "is open to group or others (mode 0644)",
        "[nbd] socket_mode = \"rw\" is not an octal mode",
    ] {
        assert!(error.contains(expected), "{expected}: {error}");
    }
}
