//! A device that stores nothing, for tests of negotiation and export bookkeeping.

use std::io;

use crate::backend::{BlockDevice, BlockSizeLimits, Extent, ZeroMode};

/// A 1 MiB device whose I/O succeeds and does nothing; its shape is configurable.
pub(crate) struct NullDevice {
    pub(crate) contexts: Vec<String>,
    pub(crate) limits: BlockSizeLimits,
    pub(crate) read_only: bool,
    pub(crate) fast_zero: bool,
}

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn block_size(&self) -> BlockSizeLimits {
        self.limits
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_fast_zero(&self) -> bool {
        self.fast_zero
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn cache(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn allocation(&self, _: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.contexts.clone()
    }
}

/// A TLS server configuration for tests (a self-signed certificate for 127.0.0.1, no
/// client authentication) and that certificate, for the client to trust.
pub(crate) fn tls_config() -> (
    std::sync::Arc<rustls::ServerConfig>,
    rustls::pki_types::CertificateDer<'static>,
) {
    use std::sync::Arc;
    let key = rcgen::KeyPair::generate().expect("key pair");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("certificate parameters")
        .self_signed(&key)
        .expect("self-signed certificate");
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .expect("server configuration");
    (Arc::new(config), cert.der().clone())
}
