//! TLS for both ends: rustls configurations from PEM files, peer identities and the
//! name patterns that authorise them.
//!
//! Both sides verify the other against configured CAs only (never the system roots): the
//! replica requires a client certificate signed by one of its client CAs; the primary
//! checks the replica's certificate against its CA and the host name it dialled. The
//! crypto provider is *ring*, chosen explicitly rather than through a process default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring::default_provider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Errors of loading TLS material or building a configuration.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds no usable item.
    #[error("Cannot load {what} from {path}: {reason}")]
    Pem {
        /// What was expected (certificate chain, private key, CA).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the material (e.g. the key does not match the certificate).
    #[error("Invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("Invalid client CA")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The certificates in a PEM file, in order (a leaf first for a chain).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        store.add(cert).map_err(|e| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

/// Where a side's certificate, key and trusted CAs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CAs the other side's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// The replica's configuration: its certificate, and client certificates required and
/// verified against `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(default_provider());
    let client_roots = Arc::new(roots(&files.ca, "client CA")?);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(client_roots, Arc::clone(&provider)).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(&files.cert, "certificate chain")?,
            load_key(&files.key)?,
        )?;
    Ok(Arc::new(config))
}

/// A TLS server configuration for another protocol on the same PEM files (the NBD
/// listeners): `cert` and `key` offered, and client certificates required and verified
/// against `client_ca` when one is given, not asked for otherwise.
pub fn server_config_with_optional_client_ca(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, "client CA")?),
                provider,
            )
            .build()?,
        ),
        None => builder.with_no_client_auth(),
    };
    let config =
        builder.with_single_cert(load_certs(cert, "certificate chain")?, load_key(key)?)?;
    Ok(Arc::new(config))
}

/// The primary's configuration: the replica's certificate verified against
/// `files.ca`, this side's certificate offered for client authentication.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&files.ca, "replica CA")?)
        .with_client_auth_cert(
            load_certs(&files.cert, "certificate chain")?,
            load_key(&files.key)?,
        )?;
    Ok(Arc::new(config))
}

/// The DNS names a (verified) certificate vouches for: the DNS names among its
/// subject alternative names, lower-cased; nothing else. Its common name is never an
/// identity (a CA may put any text there, and a certificate naming only IP addresses
/// would otherwise be admitted by its CN), nor are IP addresses. An empty list means
/// the certificate identifies no primary.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// An allowed primary identity: a DNS name, or `*.` and a suffix, where `*` stands for
/// exactly one label (`*.dc1.example.com` allows `host.dc1.example.com`, not
/// `a.host.dc1.example.com` nor `dc1.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    wildcard: bool,
    /// The name, or the suffix after `*.`; lower-case.
    name: String,
}

impl NamePattern {
    /// Parses a pattern; at most one wildcard, and only as the whole first label.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower.clone()),
        };
        let labels_ok = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !labels_ok {
            return Err(format!(
                "{text:?} is not a DNS name or a pattern like *.dc1.example.com (one wildcard, as the whole first label)"
            ));
        }
        Ok(NamePattern { wildcard, name })
    }

    /// Whether every name `other` matches, this matches too.
    pub fn covers(&self, other: &NamePattern) -> bool {
        self == other || (!other.wildcard && self.matches(&other.name))
    }

    /// Whether `name` (a certificate's DNS name) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        if !self.wildcard {
            return name == self.name;
        }
        match name.split_once('.') {
            Some((first, rest)) => !first.is_empty() && first != "*" && rest == self.name,
            None => false,
        }
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn patterns_match_one_label() {
        let p = NamePattern::parse("*.DC1.example.com").unwrap();
        assert!(p.matches("host1.dc1.example.com"));
        assert!(p.matches("HOST1.dc1.example.com"));
        assert!(!p.matches("dc1.example.com"));
        assert!(!p.matches("a.b.dc1.example.com"));
        assert!(!p.matches("host.dc2.example.com"));
        assert!(!p.matches("*.dc1.example.com"));
        let exact = NamePattern::parse("primary.example.com").unwrap();
        assert!(exact.matches("primary.example.com"));
        assert!(!exact.matches("x.primary.example.com"));
        assert_eq!(p.to_string(), "*.dc1.example.com");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "*",
            "*.*.example.com",
            "a.*.example.com",
            "h*.example.com",
            "a..b",
            "a b.com",
            "*.",
        ] {
            assert!(NamePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_come_from_the_san() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![
            "Host1.DC1.example.com".into(),
            "alias.example.com".into(),
        ])
        .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let names = certificate_names(cert.der());
        assert_eq!(names, vec!["host1.dc1.example.com", "alias.example.com"]);
    }

    /// A certificate with common name `cn` and subject alternative names `sans`.
    fn certificate(cn: &str, sans: Vec<rcgen::SanType>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_common_name_and_ip_addresses_are_no_identity() {
        let cn = "host1.dc1.example.com";
        let ip_only = certificate(cn, vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())]);
        assert_eq!(certificate_names(&ip_only), Vec::<String>::new());
        let no_san = certificate(cn, Vec::new());
        assert_eq!(certificate_names(&no_san), Vec::<String>::new());
        let dns_and_ip = certificate(
            "other.example.com",
            vec![
                rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
                rcgen::SanType::DnsName("Host1.DC1.example.com".try_into().unwrap()),
            ],
        );
        assert_eq!(certificate_names(&dns_and_ip), vec![cn]);
    }

    #[test]
    fn the_lab_ca_issues_dns_names_as_dns_sans() {
        let ca = lab_ca::create_ca("test CA").unwrap();
        let host = lab_ca::issue_host(&ca, &["primary.dc1.example.com".into(), "192.0.2.7".into()])
            .unwrap();
        let der = CertificateDer::from_pem_slice(host.cert.as_bytes()).unwrap();
        assert_eq!(certificate_names(&der), vec!["primary.dc1.example.com"]);
    }
}
