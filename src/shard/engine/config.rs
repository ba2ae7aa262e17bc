//! A shard's settings ([`ShardConfig`]): what the server passes when it spawns one — timers, WebRTC,
//! the batch window, the recorder — read by the core and by its runner.

use std::time::Duration;

use crate::peer::webrtc::WebRtcConfig;
use crate::record::RecordEvent;

/// Settings of one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// T1: a holder silent this long is reported ([`Event::Silence`](crate::shard::Event::Silence)).
    pub t1: Duration,
    /// Interval of the server's sender reports on each listener stream.
    pub sr_interval: Duration,
    /// WebRTC members are refused when `None` (the shard then has no certificate).
    pub webrtc: Option<WebRtcConfig>,
    /// The longest the shard's clock sleeps between two [`ShardCore::handle_tick`](super::ShardCore::handle_tick)s when nothing is due
    /// (an idle shard wakes this often, no more; a busy one when `handle_tick` says).
    pub tick: Duration,
    /// A busy shard reads its sockets once per window instead of waking per datagram (`--batch-window-us`;
    /// zero: per datagram). Its runner's business; the core only carries it.
    pub batch_window: Duration,
    /// A shard with no floor held reads its sockets once per window instead of waking per datagram
    /// (`--quiet-window-ms`; zero: per datagram). Its runner's business; the core only carries it.
    pub quiet_window: Duration,
    /// Seeds the shard's random numbers (listener streams' initial sequence numbers and timestamps, ICE
    /// credentials) so that a test gets the same run twice; `None` (the server) seeds from the OS.
    pub seed: Option<u64>,
    /// The recorder thread's queue (`--record`): recorded channels' local bursts go there.
    pub recorder: Option<flume::Sender<RecordEvent>>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            t1: Duration::from_secs(4),
            sr_interval: Duration::from_secs(5),
            webrtc: None,
            tick: Duration::from_secs(1),
            batch_window: Duration::ZERO,
            quiet_window: Duration::ZERO,
            seed: None,
            recorder: None,
        }
    }
}
