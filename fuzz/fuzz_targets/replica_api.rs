//! The replica API's request parsing: any method, path and headers a peer sends
//! parse to a typed call or a refusal, never a panic; a call names a valid replica
//! and an epoch in range; and an enable body that decodes is judged the same way.
#![no_main]

use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use replica::server::api::{check_enable, parse, ApiCall};
use wire::api::{valid_name, EnableRequest, FIRST_EPOCH, MAX_EPOCH};

fuzz_target!(|data: &[u8]| {
    // Lines: the method, the path, then "name: value" headers; after an empty line,
    // an enable request's body.
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut lines = head.split(|&b| b == b'\n');
    let Some(Ok(method)) = lines.next().map(Method::from_bytes) else {
        return;
    };
    let Some(Ok(path)) = lines.next().map(std::str::from_utf8) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }
    match parse(&method, path, &headers) {
        Ok(ApiCall::Replica { name, .. }) => assert!(valid_name(&name)),
        Ok(ApiCall::Enable { epoch }) => {
            assert!((FIRST_EPOCH..=MAX_EPOCH).contains(&epoch));
            if let Ok(enable) = serde_json::from_slice::<EnableRequest>(body) {
                if check_enable(&enable, 1 << 40).is_ok() {
                    assert!(valid_name(&enable.name));
                    assert!(enable.disks.iter().all(|d| valid_name(&d.name) && d.size <= 1 << 40));
                }
            }
        }
        Ok(ApiCall::Echo) | Err(_) => {}
    }
});
