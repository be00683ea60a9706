//! What can go wrong talking to the replica server, and how the shipper reacts to it.
//!
//! Every [`ClientError`] maps to a [`FailureClass`], the retry schedule's input; a
//! certificate or credential problem is an authentication failure (no retry), whether
//! the TLS handshake reports it or, with TLS 1.3, the first read after it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use wire::api::ErrorCode;

/// How the shipper reacts to a failure (the retry table of Hyper-V Replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The network or the replica server failed: retry at 1, 2, 4, 8, 10 minutes, then
    /// every 30 minutes.
    Network,
    /// The replica is paused, short of space, or busy with a conflicting request (or
    /// a local step failed): retry every interval. A replica busy applying what it
    /// received (`ErrorCode::Busy`) is retried sooner when the interval is long
    /// (`RetryPolicy::busy_delay`).
    NextInterval,
    /// Authentication or authorisation failed: no retry; Critical.
    Authentication,
    /// The replica is gone or its chain is broken: suspended, Critical, until an
    /// administrator acts.
    Unrecoverable,
}

/// Errors talking to the replica server.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The host name does not resolve.
    #[error("Cannot resolve {host}")]
    Resolve {
        /// Host name.
        host: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No TCP connection.
    #[error("Cannot connect to {addr}")]
    Connect {
        /// Address tried last.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake or the peer's certificate failed.
    #[error("TLS with {addr} failed")]
    Tls {
        /// The replica's address.
        addr: String,
        /// The cause (holds the rustls error).
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange broke.
    #[error("HTTP exchange with the replica failed")]
    Http(#[source] hyper::Error),
    /// No answer in time.
    #[error("The replica did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The replica refused the request.
    #[error("The replica refused {what} ({status}): {message}")]
    Refused {
        /// The request.
        what: String,
        /// HTTP status.
        status: u16,
        /// Error code from the body, when it had one.
        code: Option<ErrorCode>,
        /// Message from the body.
        message: String,
    },
    /// The answer is not what the API says.
    #[error("Unreadable answer from the replica to {what}: {detail}")]
    BadAnswer {
        /// The request.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

impl ClientError {
    /// True if the request may have reached the replica and been carried out although
    /// no answer says so (the exchange broke, timed out or its answer was unreadable).
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            ClientError::Http(_) | ClientError::Timeout(_) | ClientError::BadAnswer { .. }
        )
    }

    /// The replica's error code, when it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => *code,
            _ => None,
        }
    }

    /// How the shipper reacts.
    pub fn class(&self) -> FailureClass {
        match self {
            ClientError::Tls { source, .. } if is_certificate_problem(source) => {
                FailureClass::Authentication
            }
            // With TLS 1.3 the replica's verdict on our certificate arrives after the
            // handshake, as an alert on the first read.
            ClientError::Http(error) if has_certificate_problem(error) => {
                FailureClass::Authentication
            }
            ClientError::Refused { status, code, .. } => match (code, status) {
                (Some(ErrorCode::Unauthenticated | ErrorCode::Forbidden), _)
                | (None, 401 | 403) => FailureClass::Authentication,
                (
                    Some(
                        ErrorCode::NotFound
                        | ErrorCode::ChainBroken
                        | ErrorCode::OtherRelationship
                        | ErrorCode::Superseded,
                    ),
                    _,
                )
                | (None, 404) => FailureClass::Unrecoverable,
                (
                    Some(
                        ErrorCode::Paused
                        | ErrorCode::Busy
                        | ErrorCode::InsufficientStorage
                        | ErrorCode::Conflict,
                    ),
                    _,
                )
                | (None, 423 | 503 | 507) => FailureClass::NextInterval,
                _ => FailureClass::Network,
            },
            _ => FailureClass::Network,
        }
    }
}

fn has_certificate_problem(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(is_certificate_problem)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Whether a TLS failure is about certificates or credentials (permanent until an
/// administrator fixes them) rather than a broken connection.
fn is_certificate_problem(error: &std::io::Error) -> bool {
    let Some(inner) = error.get_ref() else {
        return false;
    };
    match inner.downcast_ref::<rustls::Error>() {
        Some(
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(_)
            | rustls::Error::PeerIncompatible(_),
        ) => true,
        Some(_) | None => false,
    }
}
