//! blkrep's replication protocol, shared by the shipper (primary) and the replica
//! server: how changes are packed into chunks ([`chunk`]), the HTTP API's messages
//! ([`api`]), the initial copy on external media ([`media`]) and the TLS setup and
//! identities both ends use ([`tls`]).

pub mod api;
pub mod chunk;
pub mod media;
pub mod tls;

/// The message of an error and its causes, on one line (for status, logs and the
/// command line, which show an error once).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
