//! replica (being written).
#![warn(missing_docs)]
