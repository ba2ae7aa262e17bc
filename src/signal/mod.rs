//! Signaling: HTTP routes, WebSocket connections, and the hub that owns membership and floors.

pub mod http;
pub mod hub;
pub mod protocol;
pub mod remote;
pub mod ws;
