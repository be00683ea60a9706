//! blkrep's replication protocol, shared by the shipper (primary) and the replica
//! server: how changes are packed into chunks ([`chunk`]), the HTTP API's messages
//! ([`api`]) and the TLS setup and identities both ends use ([`tls`]).

pub mod api;
pub mod chunk;
pub mod lab_ca;
pub mod tls;
