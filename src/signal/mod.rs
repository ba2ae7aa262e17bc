//! Signaling: the protocol's JSON messages, HTTP routes and WebSocket connections. What the messages do
//! is decided by the control plane ([`crate::control`]).

pub mod http;
pub mod ops;
pub mod protocol;
pub mod ws;
