//! `blkrep libvirt disk-xml`: the `<disk>` element that points a libvirt domain at a
//! disk the primary serves, so an admin switches a VM's disk from its image file to
//! blkrep (and back) with `virsh edit` or `virsh attach-device`.
//!
//! The element is a network disk speaking NBD to the primary's unix socket (or its
//! TCP listener, with `tls='yes'` when the listener takes TLS), raw, without QEMU's
//! own cache (`cache='none'`: what the primary acknowledged is what the guest was
//! told), and with the guest's discards passed on (`discard='unmap'`).

use std::fmt::Write as _;

use thiserror::Error;

use crate::config::{NbdTlsMode, PrimaryConfig};
// The same escapes serve XML attribute values in either quote.
use crate::dashboard::escape;

/// Why no element can be printed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiskXmlError {
    /// No group has a disk of that name.
    #[error(
        "No disk {0:?} in the configuration (disks are named by their `name` in [[group.disk]])"
    )]
    NoDisk(String),
    /// The primary has no NBD listener a domain could use.
    #[error(
        "The configuration has neither nbd.unix_socket nor nbd.tcp: QEMU could not reach the disk"
    )]
    NoListener,
    /// The TCP listener's address has no port.
    #[error("nbd.tcp {0:?} is not HOST:PORT")]
    TcpAddress(String),
}

/// What to print.
#[derive(Debug, Clone)]
pub struct DiskXmlOptions {
    /// The guest device (`vda`, `sdb` ...).
    pub target: String,
    /// The guest bus (`virtio`, `scsi`, `sata`).
    pub bus: String,
    /// Seconds QEMU's NBD client keeps reconnecting (and retrying the guest's
    /// requests) when the primary restarts: `<reconnect delay='N'/>`, which needs a
    /// libvirt whose schema has it (Debian 12's libvirt 9.0 does not).
    pub reconnect_delay: Option<u32>,
    /// Prefer the TCP listener even when there is a unix socket.
    pub tcp: bool,
}

/// The `<disk>` element for disk `disk` of `config`.
pub fn disk_xml(
    config: &PrimaryConfig,
    disk: &str,
    options: &DiskXmlOptions,
) -> Result<String, DiskXmlError> {
    let (group, found) = config
        .groups
        .iter()
        .find_map(|group| {
            group
                .disks
                .iter()
                .find(|d| d.name == disk)
                .map(|d| (group, d))
        })
        .ok_or_else(|| DiskXmlError::NoDisk(disk.to_string()))?;
    let nbd = &config.nbd;
    let use_tcp = nbd.tcp.is_some() && (options.tcp || nbd.unix_socket.is_none());
    let host = match (&nbd.unix_socket, &nbd.tcp) {
        (Some(socket), _) if !use_tcp => format!(
            "<host transport='unix' socket='{}'/>",
            escape(&socket.to_string_lossy())
        ),
        (_, Some(address)) => {
            let (name, port) = address
                .rsplit_once(':')
                .filter(|(name, port)| !name.is_empty() && port.parse::<u16>().is_ok())
                .ok_or_else(|| DiskXmlError::TcpAddress(address.clone()))?;
            let name = name.trim_start_matches('[').trim_end_matches(']');
            format!("<host name='{}' port='{port}'/>", escape(name))
        }
        (_, None) => return Err(DiskXmlError::NoListener),
    };
    let tls = if use_tcp && nbd.tls != NbdTlsMode::Off {
        " tls='yes'"
    } else {
        ""
    };
    let mut xml = String::new();
    let _ = writeln!(
        xml,
        "<!-- blkrep group {}, disk {} (image {}) -->",
        escape_comment(&group.name),
        escape_comment(&found.name),
        escape_comment(&found.image.to_string_lossy())
    );
    let _ = writeln!(xml, "<disk type='network' device='disk'>");
    let _ = writeln!(
        xml,
        "  <driver name='qemu' type='raw' cache='none' discard='unmap'/>"
    );
    let _ = writeln!(
        xml,
        "  <source protocol='nbd' name='{}'{tls}>",
        escape(disk)
    );
    let _ = writeln!(xml, "    {host}");
    if let Some(delay) = options.reconnect_delay {
        let _ = writeln!(xml, "    <reconnect delay='{delay}'/>");
    }
    let _ = writeln!(xml, "  </source>");
    let _ = writeln!(
        xml,
        "  <target dev='{}' bus='{}'/>",
        escape(&options.target),
        escape(&options.bus)
    );
    if found.read_only {
        let _ = writeln!(xml, "  <readonly/>");
    }
    let _ = writeln!(xml, "</disk>");
    Ok(xml)
}

/// A comment may not hold `--`.
fn escape_comment(text: &str) -> String {
    text.replace("--", "- -")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(nbd: &str) -> PrimaryConfig {
        toml::from_str(&format!(
            "[nbd]\n{nbd}\n[[group]]\nname = \"web\"\nring = \"/var/lib/blkrep/web.ring\"\n\
             [[group.disk]]\nname = \"web-root\"\nimage = \"/var/lib/images/web--root.img\"\n\
             [[group.disk]]\nname = \"web<&'data\"\nimage = \"/d.img\"\nread_only = true\n"
        ))
        .unwrap()
    }

    fn options() -> DiskXmlOptions {
        DiskXmlOptions {
            target: "vdb".into(),
            bus: "virtio".into(),
            reconnect_delay: None,
            tcp: false,
        }
    }

    #[test]
    fn a_unix_socket_disk() {
        let xml = disk_xml(
            &config("unix_socket = \"/run/blkrep/nbd.sock\""),
            "web-root",
            &options(),
        )
        .unwrap();
        assert_eq!(
            xml,
            "<!-- blkrep group web, disk web-root (image /var/lib/images/web- -root.img) -->\n\
             <disk type='network' device='disk'>\n  \
             <driver name='qemu' type='raw' cache='none' discard='unmap'/>\n  \
             <source protocol='nbd' name='web-root'>\n    \
             <host transport='unix' socket='/run/blkrep/nbd.sock'/>\n  \
             </source>\n  <target dev='vdb' bus='virtio'/>\n</disk>\n"
        );
    }

    #[test]
    fn tcp_with_tls_a_reconnect_delay_and_names_escaped() {
        let mut opts = options();
        opts.reconnect_delay = Some(30);
        opts.tcp = true;
        let xml = disk_xml(
            &config(
                "unix_socket = \"/run/blkrep/nbd.sock\"\ntcp = \"[::1]:10809\"\ntls = \"require\"",
            ),
            "web<&'data",
            &opts,
        )
        .unwrap();
        assert!(
            xml.contains("<source protocol='nbd' name='web&lt;&amp;&#39;data' tls='yes'>"),
            "{xml}"
        );
        assert!(xml.contains("<host name='::1' port='10809'/>"), "{xml}");
        assert!(xml.contains("<reconnect delay='30'/>"), "{xml}");
        assert!(xml.contains("<readonly/>"), "{xml}");
    }

    #[test]
    fn unknown_disks_and_missing_listeners_are_refused() {
        let with_socket = config("unix_socket = \"/s\"");
        assert_eq!(
            disk_xml(&with_socket, "nope", &options()),
            Err(DiskXmlError::NoDisk("nope".into()))
        );
        assert_eq!(
            disk_xml(&config(""), "web-root", &options()),
            Err(DiskXmlError::NoListener)
        );
        assert_eq!(
            disk_xml(&config("tcp = \"localhost\""), "web-root", &options()),
            Err(DiskXmlError::TcpAddress("localhost".into()))
        );
    }
}
