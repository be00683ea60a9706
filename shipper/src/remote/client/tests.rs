use super::*;
use wire::api::ErrorCode;

#[test]
fn endpoints_parse_with_default_port_and_reject_paths() {
    assert_eq!(
        Endpoint::parse("https://replica.dc2.example.com").ok(),
        Some(Endpoint {
            tls: true,
            host: "replica.dc2.example.com".into(),
            port: 8443
        })
    );
    let v6 = Endpoint::parse("http://[::1]:9000").ok();
    assert_eq!(
        v6.as_ref().map(|e| e.authority()),
        Some("[::1]:9000".into())
    );
    assert!(Endpoint::parse("ftp://x").is_err());
    assert!(Endpoint::parse("https://x/v1").is_err());
    assert!(Endpoint::parse("replica:8443").is_err());
}

#[test]
fn refusals_map_to_the_retry_table() {
    let refused = |status, code| ClientError::Refused {
        what: "x".into(),
        status,
        code,
        message: String::new(),
    };
    assert_eq!(
        refused(403, Some(ErrorCode::Forbidden)).class(),
        FailureClass::Authentication
    );
    assert_eq!(refused(401, None).class(), FailureClass::Authentication);
    assert_eq!(
        refused(404, Some(ErrorCode::NotFound)).class(),
        FailureClass::Unrecoverable
    );
    assert_eq!(
        refused(409, Some(ErrorCode::ChainBroken)).class(),
        FailureClass::Unrecoverable
    );
    assert_eq!(
        refused(409, Some(ErrorCode::Superseded)).class(),
        FailureClass::Unrecoverable
    );
    assert_eq!(
        refused(423, Some(ErrorCode::Paused)).class(),
        FailureClass::NextInterval
    );
    assert_eq!(
        refused(507, Some(ErrorCode::InsufficientStorage)).class(),
        FailureClass::NextInterval
    );
    assert_eq!(
        refused(500, Some(ErrorCode::Internal)).class(),
        FailureClass::Network
    );
    assert_eq!(refused(502, None).class(), FailureClass::Network);
    assert_eq!(
        ClientError::Timeout(REQUEST_TIMEOUT).class(),
        FailureClass::Network
    );
    let alert = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
    );
    let tls = ClientError::Tls {
        addr: "x".into(),
        source: alert,
    };
    assert_eq!(tls.class(), FailureClass::Authentication);
    let reset = ClientError::Tls {
        addr: "x".into(),
        source: std::io::ErrorKind::ConnectionReset.into(),
    };
    assert_eq!(reset.class(), FailureClass::Network);
}
