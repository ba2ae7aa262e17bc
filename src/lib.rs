//! talkgroup: a thread-per-core push-to-talk SFU.
pub mod floor;
pub mod forward;
pub mod rtp;
pub mod state;
pub mod channel;
pub mod shard;
