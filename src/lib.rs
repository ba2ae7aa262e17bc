#![deny(missing_docs)]
//! talkgroup: a thread-per-core push-to-talk SFU for Opus audio channels.
//!
//! # Architecture (see `shared/design.md`)
//!
//! - **Shards** ([`shard`]): one thread per core, pinned (one `poll(2)` per wake-up), each owning a UDP media port. A channel
//!   lives on exactly one shard (`shard_of(name)`, a stable hash), so every packet of a channel arrives on
//!   the core that owns it and the packet path never crosses threads or takes a lock.
//! - **Control thread** ([`signal`], [`state`]): HTTP + WebSocket signaling, the floor arbiter and the
//!   stores. It talks to shards only with values over bounded channels.
//! - **Sans-IO core**: [`floor`] (who may speak), [`channel`] (who hears whom), [`forward`] (one continuous
//!   stream per listener) and [`shard::engine`] are state machines fed inputs with explicit time; only the
//!   shard loop and the hub touch sockets and clocks. That is what makes them testable in virtual time and
//!   fast.
//!
//! - **WebRTC members** ([`peer`]): a str0m `Rtc` per member on its channel's shard (ICE-lite, DTLS-SRTP,
//!   RTP mode). Found by source address or STUN username fragment, driven by one timer heap per shard;
//!   a listener's packet is sealed by the shard itself with the SRTP keys captured from its DTLS
//!   handshake ([`peer::egress`]); str0m runs only on the member's own datagrams and deadlines.
//!
//! A packet's walk: socket → [`rtp::classify`] → peer by source address → floor check (cached speaker and
//! epoch) → [`forward::OutStream::rewrite`] per listener → [`forward::Batch`] → `sendmmsg`. Each step
//! lives in the module named after it and never calls back up a layer: [`shard`] (the loop and its
//! [`shard::engine`]) uses [`channel`], [`peer`] and [`relay`]; [`channel`] and [`peer`] use [`forward`]
//! (a listener's header); [`forward`] uses only [`rtp`] and [`ids`]. The RTP codec and the batched socket calls are the `rtpio` crate, shared
//! with the tests, benches and load harness.

pub mod auth;
pub mod channel;
pub mod config;
pub mod control;
pub mod floor;
pub mod forward;
pub mod ids;
pub mod metrics;
pub mod peer;
pub mod record;
pub mod relay;
/// The RTP/RTCP header codec (the `rtpio` crate's, shared with the tests, benches and load harness).
pub use rtpio::rtp;
pub mod server;
pub mod shard;
pub mod signal;
pub mod state;
