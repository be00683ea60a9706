//! `blkrep cert`: a small CA and host certificates for a lab, as PEM files.
//!
//! Keys are written with mode 0600 and existing files are never overwritten: replacing a
//! CA silently would lock every host out.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use lab_ca::{create_ca, issue_host, PemPair};

/// The CA's files in `dir`.
fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("Cannot create {} (it must not exist yet)", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("Cannot write {}", path.display()))
}

fn write_pair(cert: &Path, key: &Path, pair: &PemPair) -> anyhow::Result<()> {
    for path in [cert, key] {
        if path.exists() {
            bail!(
                "{} exists already; remove it first to replace it",
                path.display()
            );
        }
    }
    write_new(key, &pair.key, 0o600)?;
    write_new(cert, &pair.cert, 0o644)
}

/// Creates `DIR/ca.pem` and `DIR/ca.key`.
pub fn create_lab_ca(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let pair = create_ca(name).context("Cannot generate the CA")?;
    let (cert, key) = ca_paths(dir);
    write_pair(&cert, &key, &pair)?;
    Ok(cert)
}

/// Issues `DIR/<first name>.pem` and `.key`, signed by the CA in `dir`.
pub fn issue(dir: &Path, names: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    let Some(first) = names.first() else {
        bail!("Give at least one --name");
    };
    if !wire::api::valid_name(first) {
        bail!("{first:?} cannot name a file; use a DNS name or an IP address first");
    }
    let (ca_cert, ca_key) = ca_paths(dir);
    let ca = PemPair {
        cert: std::fs::read_to_string(&ca_cert).with_context(|| {
            format!(
                "Cannot read {} (run `blkrep cert ca` first)",
                ca_cert.display()
            )
        })?,
        key: std::fs::read_to_string(&ca_key)
            .with_context(|| format!("Cannot read {}", ca_key.display()))?,
    };
    let pair = issue_host(&ca, names).context("Cannot issue the certificate")?;
    let (cert, key) = (
        dir.join(format!("{first}.pem")),
        dir.join(format!("{first}.key")),
    );
    write_pair(&cert, &key, &pair)?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issued_certificates_work_for_both_ends_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        create_lab_ca(dir.path(), "lab").unwrap();
        assert!(create_lab_ca(dir.path(), "again").is_err());
        let (cert, key) = issue(
            dir.path(),
            &["host1.dc1.example.com".into(), "127.0.0.1".into()],
        )
        .unwrap();
        assert!(issue(dir.path(), &["host1.dc1.example.com".into()]).is_err());
        let files = wire::tls::TlsFiles {
            cert,
            key,
            ca: dir.path().join("ca.pem"),
        };
        wire::tls::server_config(&files).unwrap();
        wire::tls::client_config(&files).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(issue(dir.path(), &["../x".into()]).is_err());
    }
}
