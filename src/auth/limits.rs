//! Abuse limits: what one client may ask of the server. Each limit has a default an operator would keep
//! (see the README's "Security" section) and is counted in `/metrics` when it bites.

use std::time::{Duration, Instant};

/// The limits of the control plane. Every one is a command-line option (`talkgroup serve --help`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// WebSocket connections from one client IP address at once.
    pub connections_per_ip: usize,
    /// Memberships one connection may hold (a dispatcher watches many channels; a gateway carries many
    /// members).
    pub memberships_per_connection: usize,
    /// Frames per second a connection may send, besides [`Limits::frames_per_membership`] (token bucket,
    /// burst of two seconds' worth).
    pub frames_per_second: u32,
    /// Extra frames per second per membership of the connection (a gateway multiplexing members presses
    /// and releases for all of them).
    pub frames_per_membership: u32,
    /// Presses per second one member may make (token bucket, burst of two seconds' worth).
    pub presses_per_second: u32,
    /// Bytes queued to a client that does not read before it is disconnected.
    pub queued_bytes: usize,
    /// How long one frame may take to write before the connection is closed.
    pub send_timeout: Duration,
    /// WebRTC joins waiting for ICE and DTLS at once, per connection.
    pub webrtc_pending_per_connection: usize,
    /// WebRTC joins waiting for ICE and DTLS at once, per client IP address.
    pub webrtc_pending_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_ip: 256,
            memberships_per_connection: 256,
            frames_per_second: 50,
            frames_per_membership: 10,
            presses_per_second: 5,
            queued_bytes: 1 << 20,
            send_timeout: Duration::from_secs(10),
            // Below the shard's 64 handshake slots: one client address cannot fill a shard.
            webrtc_pending_per_connection: 8,
            webrtc_pending_per_ip: 32,
        }
    }
}

/// A token bucket in virtual time: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens at `now`.
    pub fn new(burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one (refilled at `rate`/s up to `burst` since the last call).
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        let granted = (0..100).filter(|_| b.take(5.0, 10.0, t0)).count();
        assert_eq!(granted, 10, "the burst");
        assert!(!b.take(5.0, 10.0, t0 + Duration::from_millis(100)));
        assert!(
            b.take(5.0, 10.0, t0 + Duration::from_millis(200)),
            "one every 200 ms"
        );
        let later = t0 + Duration::from_secs(60);
        let granted = (0..100).filter(|_| b.take(5.0, 10.0, later)).count();
        assert_eq!(granted, 10, "never more than the burst stored");
    }
}
