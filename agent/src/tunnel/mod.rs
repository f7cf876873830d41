//! Tunnel: carries captured connections to their destination.
//!
//! At this stage a captured connection is relayed as plain TCP from inside the source pod's
//! network namespace; the HBONE (HTTP/2 CONNECT over mutual TLS) client and server slot in
//! beside `outbound` as `hbone`.

pub mod connections;
pub mod outbound;

pub use connections::{ConnectionRecord, ConnectionTable};
