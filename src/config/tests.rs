use std::path::Path;

use wire::chunk::Codec;

use super::*;
use proptest::prelude::*;

fn sample(image: &Path, extra: &str) -> String {
    format!(
        r#"
control_socket = "/tmp/ctl"
[nbd]
unix_socket = "/tmp/nbd.sock"
[[group]]
name = "vm1"
ring = "/tmp/vm1.ring"
ring_size = "64MiB"
interval = "30s"
{extra}
[[group.disk]]
name = "disk0"
image = "{}"
"#,
        image.display()
    )
}

#[test]
fn parses_a_good_file() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let config = PrimaryConfig::parse(
        &sample(image.path(), "[group.consumer]\ntype = \"discard\""),
        Path::new("x"),
    )
    .unwrap();
    let group = &config.groups[0];
    assert_eq!(group.ring_size, ByteSize(64 << 20));
    assert_eq!(group.interval, Interval(Duration::from_secs(30)));
    assert!(matches!(group.consumer, Some(ConsumerConfig::Discard)));
}

#[test]
fn reports_every_problem() {
    let text = sample(Path::new("/nonexistent/image"), "block_size = 1000").replace("30s", "0s");
    let error = PrimaryConfig::parse(&text, Path::new("p.toml"))
        .unwrap_err()
        .to_string();
    for expected in [
        "interval must be at least 1s",
        "block_size must be a power of two",
        "/nonexistent/image",
    ] {
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn on_ring_full_defaults_to_bitmap_and_throttle_takes_a_bounded_delay() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let parse =
        |extra: &str| PrimaryConfig::parse(&sample(image.path(), extra), Path::new("p.toml"));
    let config = parse("").unwrap();
    assert_eq!(config.groups[0].on_ring_full(), tracker::OnRingFull::Bitmap);
    let config = parse("on_ring_full = \"throttle\"").unwrap();
    assert_eq!(
        config.groups[0].on_ring_full(),
        tracker::OnRingFull::Throttle {
            max_delay: DEFAULT_THROTTLE_MAX_DELAY
        }
    );
    let config = parse("on_ring_full = \"throttle\"\nthrottle_max_delay = \"500ms\"").unwrap();
    assert_eq!(
        config.groups[0].on_ring_full(),
        tracker::OnRingFull::Throttle {
            max_delay: Duration::from_millis(500)
        }
    );
    for (extra, expected) in [
        (
            "on_ring_full = \"block\"",
            "unknown variant `block`, expected `bitmap` or `throttle`",
        ),
        (
            "throttle_max_delay = \"1s\"",
            "throttle_max_delay applies only with on_ring_full = \"throttle\"",
        ),
        (
            "on_ring_full = \"throttle\"\nthrottle_max_delay = \"0s\"",
            "throttle_max_delay must be above 0s and at most 20s",
        ),
        (
            "on_ring_full = \"throttle\"\nthrottle_max_delay = \"1m\"",
            "throttle_max_delay must be above 0s and at most 20s",
        ),
        (
            "on_ring_full = \"throttle\"\ntracking = false",
            "on_ring_full = \"throttle\" needs tracking = true",
        ),
    ] {
        let error = parse(extra).unwrap_err().to_string();
        assert!(error.contains(expected), "{extra}: {error}");
    }
}

#[test]
fn replica_consumers_need_credentials_that_exist() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let pem = tempfile::NamedTempFile::new().unwrap();
    let pem = pem.path().display();
    let good = format!(
        "[group.consumer]\ntype = \"replica\"\nurl = \"https://replica:8443\"\nca = \"{pem}\"\ncert = \"{pem}\"\nkey = \"{pem}\"\nbandwidth_limit = \"10MiB\"\nsource_address = \"127.0.0.1\"\nstart_at = \"2026-11-24T02:00:00Z\""
    );
    let config = PrimaryConfig::parse(&sample(image.path(), &good), Path::new("x")).unwrap();
    let Some(ConsumerConfig::Replica(replica)) = &config.groups[0].consumer else {
        panic!("not a replica consumer");
    };
    assert_eq!(replica.compression, CompressionSetting::Auto);
    assert_eq!(replica.bandwidth_limit, Some(ByteSize(10 << 20)));
    // The older true/false still work; anything else is refused by name.
    for (written, meant) in [
        ("true", CompressionSetting::On),
        ("false", CompressionSetting::Off),
        ("\"off\"", CompressionSetting::Off),
        ("\"auto\"", CompressionSetting::Auto),
    ] {
        let text = format!("{good}\ncompression = {written}");
        let config = PrimaryConfig::parse(&sample(image.path(), &text), Path::new("x")).unwrap();
        let Some(ConsumerConfig::Replica(replica)) = &config.groups[0].consumer else {
            panic!("not a replica consumer");
        };
        assert_eq!(replica.compression, meant, "{written}");
    }
    let text = format!("{good}\ncompression = \"zstd\"");
    let error = PrimaryConfig::parse(&sample(image.path(), &text), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("compression is \"auto\", \"on\" or \"off\""),
        "{error}"
    );
    let bad = "[group.consumer]\ntype = \"replica\"\nurl = \"http://replica:8443\"\nca = \"/nonexistent/ca.pem\"\ncompression_level = 0\nretry_scale = 0.0\nstart_at = \"tomorrow\"";
    let error = PrimaryConfig::parse(&sample(image.path(), bad), Path::new("x"))
        .unwrap_err()
        .to_string();
    for expected in [
        "needs psk_file and identity",
        "/nonexistent/ca.pem is not a readable file",
        "compression_level 0: zstd levels are 1 to 19 and the fast levels -1 to -7",
        "retry_scale must be above 0",
        "start_at \"tomorrow\"",
    ] {
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

#[test]
fn the_codec_defaults_to_zstd_and_each_codec_takes_its_own_levels() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let pem = tempfile::NamedTempFile::new().unwrap();
    let pem = pem.path().display();
    let consumer = format!(
        "[group.consumer]\ntype = \"replica\"\nurl = \"https://replica:8443\"\nca = \"{pem}\"\ncert = \"{pem}\"\nkey = \"{pem}\"\n"
    );
    let codec_of = |extra: &str| {
        let text = sample(image.path(), &format!("{consumer}{extra}"));
        PrimaryConfig::parse(&text, Path::new("x")).map(|config| {
            let Some(ConsumerConfig::Replica(replica)) = &config.groups[0].consumer else {
                panic!("not a replica consumer");
            };
            replica.compression().codec()
        })
    };
    let zstd = |level| Some(Codec::Zstd { level });
    let deflate = |level| Some(Codec::Deflate { level });
    assert_eq!(codec_of("").unwrap(), zstd(DEFAULT_ZSTD_LEVEL));
    for (extra, meant) in [
        ("compression_level = 19", zstd(19)),
        ("compression_level = -7", zstd(-7)),
        (
            "compression_codec = \"zstd\"\ncompression_level = 3",
            zstd(3),
        ),
        ("compression_codec = \"deflate\"", deflate(1)),
        (
            "compression_codec = \"deflate\"\ncompression_level = 9",
            deflate(9),
        ),
        (
            "compression = \"off\"\ncompression_codec = \"deflate\"",
            None,
        ),
    ] {
        assert_eq!(codec_of(extra).unwrap(), meant, "{extra}");
    }
    for (extra, expected) in [
        (
            "compression_level = 20",
            "compression_level 20: zstd levels are 1 to 19",
        ),
        (
            "compression_level = -8",
            "compression_level -8: zstd levels",
        ),
        (
            "compression_codec = \"deflate\"\ncompression_level = 12",
            "compression_level 12: DEFLATE levels are 1 to 9",
        ),
        (
            "compression_codec = \"deflate\"\ncompression_level = -1",
            "compression_level -1: DEFLATE levels are 1 to 9",
        ),
        (
            "compression_codec = \"lz4\"",
            "unknown variant `lz4`, expected `zstd` or `deflate`",
        ),
    ] {
        let error = codec_of(extra).unwrap_err().to_string();
        assert!(error.contains(expected), "{extra}: {error}");
    }
}

/// The primary reads its lab-mode key under the replica's rules.
#[test]
fn a_lab_key_must_be_private_and_long_enough() {
    use std::os::unix::fs::PermissionsExt;
    let image = tempfile::NamedTempFile::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("lab.psk");
    let consumer = format!(
        "[group.consumer]\ntype = \"replica\"\nurl = \"http://replica:8080\"\nidentity = \"vm-host\"\npsk_file = {key:?}"
    );
    let check = |text: &str, mode: u32| {
        std::fs::write(&key, text).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        PrimaryConfig::parse(&sample(image.path(), &consumer), Path::new("x"))
            .err()
            .map(|error| error.to_string())
    };
    assert_eq!(check("0123456789abcdef0123\n", 0o600), None);
    let open = check("0123456789abcdef0123\n", 0o644).unwrap();
    assert!(
        open.contains("is open to group or others (mode 0644)"),
        "{open}"
    );
    let short = check("0123456789\n", 0o600).unwrap();
    assert!(
        short.contains("has 10 bytes; it needs at least 16"),
        "{short}"
    );
}

#[test]
fn application_consistent_points_are_optional_and_checked() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let config = PrimaryConfig::parse(
        &sample(image.path(), "[group.consumer]\ntype = \"discard\""),
        Path::new("x"),
    )
    .unwrap();
    assert!(config.groups[0].app_consistent.is_none());
    let good = "[group.consumer]\ntype = \"discard\"\n[group.app_consistent]\nfreeze_command = [\"virsh\", \"domfsfreeze\", \"vm1\"]\nthaw_command = [\"virsh\", \"domfsthaw\", \"vm1\"]";
    let config = PrimaryConfig::parse(&sample(image.path(), good), Path::new("x")).unwrap();
    let app = config.groups[0].app_consistent.as_ref().unwrap();
    assert_eq!(app.every, Interval(Duration::from_secs(4 * 3600)));
    assert_eq!(app.timeout, Interval(Duration::from_secs(60)));
    assert_eq!(app.freeze_command, ["virsh", "domfsfreeze", "vm1"]);
    let bad = "[group.app_consistent]\nevery = \"10s\"\ntimeout = \"0s\"\nfreeze_command = []\nthaw_command = [\"\"]";
    let error = PrimaryConfig::parse(&sample(image.path(), bad), Path::new("x"))
        .unwrap_err()
        .to_string();
    for expected in [
        "group \"vm1\": app_consistent.freeze_command is empty",
        "app_consistent.thaw_command is empty",
        "app_consistent.every (10s) must be at least the interval (30s)",
        "app_consistent.timeout must be above 0s",
        "app_consistent needs a [group.consumer]",
    ] {
        assert!(error.contains(expected), "{expected}: {error}");
    }
    let typo = "[group.app_consistent]\nfreeze = [\"x\"]";
    let error = PrimaryConfig::parse(&sample(image.path(), typo), Path::new("x")).unwrap_err();
    assert!(
        error.to_string().contains("unknown field `freeze`"),
        "{error}"
    );
}

/// A lab CA and a certificate for 127.0.0.1 in `dir`, the key with `key_mode`.
fn nbd_tls_files(dir: &Path, key_mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let ca = lab_ca::create_ca("nbd test CA").unwrap();
    let host = lab_ca::issue_host(&ca, &["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert).unwrap();
    std::fs::write(dir.join("cert.pem"), &host.cert).unwrap();
    std::fs::write(dir.join("key.pem"), &host.key).unwrap();
    std::fs::set_permissions(
        dir.join("key.pem"),
        std::fs::Permissions::from_mode(key_mode),
    )
    .unwrap();
    format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\n",
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem")
    )
}

fn with_nbd(image: &Path, nbd: &str) -> String {
    sample(image, "").replace(
        "unix_socket = \"/tmp/nbd.sock\"\n",
        &format!("unix_socket = \"/tmp/nbd.sock\"\n{nbd}"),
    )
}

#[test]
fn nbd_tls_and_socket_access_are_validated_as_a_whole() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = nbd_tls_files(dir.path(), 0o600);
    let good = format!(
        "tcp = \"0.0.0.0:10809\"\ntls = \"require\"\n{files}socket_mode = \"0660\"\nsocket_group = \"root\"\n"
    );
    let config = PrimaryConfig::parse(&with_nbd(image.path(), &good), Path::new("x")).unwrap();
    assert!(matches!(
        config.nbd.access.tls,
        nbd_shim::TlsPolicy::Required(_)
    ));
    assert_eq!(config.nbd.access.socket.mode, 0o660);
    assert_eq!(config.nbd.access.socket.group, Some(0));
    assert!(config.nbd.access.warnings.is_empty());
    let on = good.replace("\"require\"", "\"on\"");
    let config = PrimaryConfig::parse(&with_nbd(image.path(), &on), Path::new("x")).unwrap();
    assert!(matches!(
        config.nbd.access.tls,
        nbd_shim::TlsPolicy::Optional(_)
    ));

    // Defaults: no TLS, 0600, no group; a loopback listener draws no warning.
    let plain = "tcp = \"127.0.0.1:10809\"\n";
    let config = PrimaryConfig::parse(&with_nbd(image.path(), plain), Path::new("x")).unwrap();
    assert!(matches!(config.nbd.access.tls, nbd_shim::TlsPolicy::Off));
    assert_eq!(config.nbd.access.socket, nbd_shim::SocketAccess::default());
    assert!(config.nbd.access.warnings.is_empty());
    let open = "tcp = \"0.0.0.0:10809\"\n";
    let config = PrimaryConfig::parse(&with_nbd(image.path(), open), Path::new("x")).unwrap();
    assert!(
        config.nbd.access.warnings[0].contains("unencrypted and unauthenticated"),
        "{:?}",
        config.nbd.access.warnings
    );

    let other_dir = tempfile::tempdir().unwrap();
    nbd_tls_files(other_dir.path(), 0o600);
    let mismatched = format!(
        "tcp = \"127.0.0.1:1\"\ntls = \"require\"\n{}",
        files.replace(
            &dir.path().join("key.pem").display().to_string(),
            &other_dir.path().join("key.pem").display().to_string()
        )
    );
    let error = PrimaryConfig::parse(&with_nbd(image.path(), &mismatched), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("[nbd] TLS: "), "{error}");

    let readable = tempfile::tempdir().unwrap();
    let readable_files = nbd_tls_files(readable.path(), 0o640);
    let bad = format!(
        "tls = \"on\"\n{readable_files}socket_mode = \"0999\"\nsocket_group = \"no-such-group-blkrep\"\n"
    );
    let error = PrimaryConfig::parse(&with_nbd(image.path(), &bad), Path::new("x"))
        .unwrap_err()
        .to_string();
    for expected in [
        "[nbd] tls applies to the tcp listener; set tcp",
        "is open to group or others (mode 0640)",
        "socket_mode = \"0999\" is not an octal mode",
        "socket_group = \"no-such-group-blkrep\": no such group",
    ] {
        assert!(error.contains(expected), "{expected}: {error}");
    }
    let stray = "tcp = \"127.0.0.1:1\"\ntls = \"require\"\ntls_ca = \"/x\"\n";
    let error = PrimaryConfig::parse(&with_nbd(image.path(), stray), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("tls needs tls_cert and tls_key"), "{error}");
    let off = format!("tcp = \"127.0.0.1:1\"\n{files}");
    let error = PrimaryConfig::parse(&with_nbd(image.path(), &off), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("tls_cert is set but tls = \"off\""),
        "{error}"
    );
    let typo = "tls = \"maybe\"\n";
    assert!(PrimaryConfig::parse(&with_nbd(image.path(), typo), Path::new("x")).is_err());
}

#[test]
fn syntax_errors_name_the_file() {
    let error = PrimaryConfig::parse("[nbd\n", Path::new("p.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("Configuration p.toml is not valid"),
        "{error}"
    );
    let image = tempfile::NamedTempFile::new().unwrap();
    let error = PrimaryConfig::parse(
        &sample(image.path(), "block_size = \"12 parsecs\""),
        Path::new("p"),
    )
    .unwrap_err();
    assert!(error.to_string().contains("unknown unit"), "{error}");
}

#[test]
fn sizes() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("4KiB"), Ok(4096));
    assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert!(parse_size("MiB").is_err());
    assert!(parse_size("99999999999TiB").is_err());
}

proptest! {
    #[test]
    fn parse_size_never_panics(text in ".{0,20}") {
        let _ = parse_size(&text);
    }

    #[test]
    fn parse_size_round_trips(number in 0u64..(1 << 20), unit in 0usize..5) {
        let names = ["", "KiB", "MiB", "GiB", "TiB"];
        prop_assert_eq!(parse_size(&format!("{number}{}", names[unit])), Ok(number << (10 * unit)));
    }
}

#[test]
fn bandwidth_schedules_parse_at_both_levels_and_bad_windows_are_named() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let pem = tempfile::NamedTempFile::new().unwrap();
    let pem = pem.path().display();
    let group_window = |window: &str| {
        let consumer = format!(
            "[group.consumer]\ntype = \"replica\"\nurl = \"https://replica:8443\"\nca = \"{pem}\"\ncert = \"{pem}\"\nkey = \"{pem}\"\nbandwidth_limit = \"100MiB\"\n[[group.consumer.bandwidth_schedule]]\n{window}"
        );
        sample(image.path(), &consumer)
    };
    let daemon = "\n[replication]\nbandwidth_limit = \"1GiB\"\n[[replication.bandwidth_schedule]]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]\nfrom = \"08:00\"\nto = \"18:00\"\nlimit = \"20MiB\"\n[[replication.bandwidth_schedule]]\nfrom = \"22:00\"\nto = \"06:30:15\"\nlimit = \"5MiB\"\n";
    let text = group_window(
        "days = [\"sat\", \"Sunday\"]\nfrom = \"00:00\"\nto = \"24:00\"\nlimit = \"1MiB\"",
    ) + daemon;
    let config = PrimaryConfig::parse(&text, Path::new("x")).unwrap();
    let schedule = &config.replication.bandwidth_schedule;
    assert_eq!(schedule.len(), 2);
    assert_eq!(schedule[0].days.len(), 5);
    assert_eq!(schedule[0].limit, ByteSize(20 << 20));
    assert_eq!(
        schedule[1].days,
        Weekday::ALL.to_vec(),
        "days default to all"
    );
    assert_eq!(schedule[1].to, "06:30:15".parse().unwrap());
    assert!(config.replication.throttle().is_some());
    let Some(ConsumerConfig::Replica(replica)) = &config.groups[0].consumer else {
        panic!("not a replica consumer");
    };
    assert_eq!(
        replica.bandwidth_schedule[0].days,
        vec![Weekday::Sat, Weekday::Sun]
    );
    assert!(throttle(None, &[]).is_none());

    for (window, expected) in [
        (
            "days = [\"fry\"]\nfrom = \"08:00\"\nto = \"18:00\"\nlimit = \"1MiB\"",
            "\"fry\" is not a day",
        ),
        (
            "from = \"8am\"\nto = \"18:00\"\nlimit = \"1MiB\"",
            "\"8am\" is not a time of day like 08:00",
        ),
        (
            "from = \"08:00\"\nto = \"24:30\"\nlimit = \"1MiB\"",
            "\"24:30\" is not a time of day",
        ),
        (
            "from = \"08:00\"\nto = \"08:00\"\nlimit = \"1MiB\"",
            "bandwidth_schedule window 1: from and to are both 08:00",
        ),
        (
            "from = \"08:00\"\nto = \"09:00\"\nlimit = \"0\"",
            "bandwidth_schedule window 1: limit must be at least 4KiB",
        ),
        (
            "days = []\nfrom = \"08:00\"\nto = \"09:00\"\nlimit = \"1MiB\"",
            "bandwidth_schedule window 1: days is empty",
        ),
        ("from = \"08:00\"\nlimit = \"1MiB\"", "missing field `to`"),
    ] {
        let error = PrimaryConfig::parse(&group_window(window), Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{window}: {error}");
    }
    let text = sample(image.path(), "") + "\n[[replication.bandwidth_schedule]]\nfrom = \"10:00\"\nto = \"10:00\"\nlimit = \"1MiB\"\n";
    let error = PrimaryConfig::parse(&text, Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("[replication] bandwidth_schedule window 1: from and to are both 10:00"),
        "{error}"
    );
}

#[test]
fn background_nice_defaults_to_ten_and_is_a_nice_step_count() {
    let image = tempfile::NamedTempFile::new().unwrap();
    let parse = |replication: &str| {
        PrimaryConfig::parse(&(sample(image.path(), "") + replication), Path::new("x"))
    };
    assert_eq!(
        parse("").unwrap().replication.background_nice,
        BackgroundNice(10)
    );
    for steps in [0u8, 19] {
        let config = parse(&format!("\n[replication]\nbackground_nice = {steps}\n")).unwrap();
        assert_eq!(config.replication.background_nice, BackgroundNice(steps));
    }
    for bad in ["20", "-1", "\"low\""] {
        let error = parse(&format!("\n[replication]\nbackground_nice = {bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("background_nice"), "{bad}: {error}");
        if !bad.starts_with('"') {
            assert!(error.contains("from 0 to 19"), "{bad}: {error}");
        }
    }
}
