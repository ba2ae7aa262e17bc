//! Node-to-node relay: how a speaker's packets reach members of the same channel on other nodes.
//!
//! The holder's shard sends each forwarded packet **once per other node** with members in the channel, to
//! that node's relay port for the channel's shard. The receiving shard checks the tag and the sender, then
//! applies the same epoch rule as for a local speaker and fans out to its own members with the same
//! continuous-stream rewriting. Relay never waits on Redis: the targets and the accepted senders are values
//! the control thread pushes into the shard when the registry changes.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//! 0xF7 | ch_len u8 | channel | epoch u64 | sp_len u8 | speaker | node_len u8 | node | RTP packet | tag[16]
//! ```
//!
//! The first byte is in a range RFC 7983 leaves unassigned, so a relay datagram can never be mistaken for
//! STUN, DTLS or RTP. `tag` is HMAC-SHA256 (truncated to 128 bits) over everything before it, keyed with
//! the cluster secret.

#![warn(missing_docs)]

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// First byte of a relay datagram.
pub const MAGIC: u8 = 0xF7;
/// Length of the truncated HMAC tag.
pub const TAG_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Why a relay datagram was refused (each is a `relay_dropped{reason}` counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[repr(usize)]
pub enum RelayError {
    /// Not a relay datagram, truncated, or a field that is not UTF-8.
    #[error("not a relay datagram or truncated")]
    Malformed,
    /// The HMAC tag does not match (another cluster secret, or tampered with).
    #[error("bad authentication tag")]
    BadTag,
    /// The sender is not a registered node's relay address.
    #[error("sender is not a registered node")]
    UnknownNode,
    /// The epoch rules refuse it (see [`crate::channel::Channel::forward_remote`]).
    #[error("epoch is not the channel's current remote grant")]
    StaleEpoch,
    /// The channel has no member on this shard.
    #[error("no member of the channel on this shard")]
    UnknownChannel,
    /// The sending node does not hold the channel's current grant, or the packet names another node than
    /// the one whose address it came from.
    #[error("the sender does not hold the channel's grant")]
    NotGrantHolder,
}

/// Number of relay drop reasons.
pub const RELAY_DROPS: usize = 6;

/// Names of the relay drop reasons, in [`RelayError`] order, for metrics.
pub const fn relay_drop_names() -> [&'static str; RELAY_DROPS] {
    [
        "malformed",
        "bad_tag",
        "unknown_node",
        "stale_epoch",
        "unknown_channel",
        "not_grant_holder",
    ]
}

/// A decoded relay datagram, borrowing the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPacket<'a> {
    /// The channel's name.
    pub channel: &'a str,
    /// The epoch of the speaker's grant.
    pub epoch: u64,
    /// The speaker's member name.
    pub speaker: &'a str,
    /// The sending node's id.
    pub node: &'a str,
    /// The speaker's RTP packet, as the sending node received it (Opus payload type of plain legs).
    pub rtp: &'a [u8],
}

/// The key, copied into each shard (a value, not shared state).
#[derive(Clone)]
pub struct RelayKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayKey(..)")
    }
}

impl RelayKey {
    /// The key for a cluster secret (any length).
    pub fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mac = HmacSha256::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        RelayKey { mac }
    }

    /// Writes a relay datagram into `out` (cleared first; its capacity is reused).
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        channel: &str,
        epoch: u64,
        speaker: &str,
        node: &str,
        rtp: &[u8],
    ) {
        out.clear();
        self.append(out, channel, epoch, speaker, node, rtp);
    }

    /// Appends a relay datagram to `out`, after what is already there (several datagrams of one batch
    /// share a buffer).
    pub fn append(
        &self,
        out: &mut Vec<u8>,
        channel: &str,
        epoch: u64,
        speaker: &str,
        node: &str,
        rtp: &[u8],
    ) {
        let start = out.len();
        out.push(MAGIC);
        for (i, field) in [channel, speaker, node].iter().enumerate() {
            let bytes = &field.as_bytes()[..field.len().min(255)];
            out.push(bytes.len() as u8);
            out.extend_from_slice(bytes);
            if i == 0 {
                out.extend_from_slice(&epoch.to_be_bytes());
            }
        }
        out.extend_from_slice(rtp);
        let mut mac = self.mac.clone();
        mac.update(&out[start..]);
        let tag = mac.finalize().into_bytes();
        out.extend_from_slice(&tag[..TAG_LEN]);
    }

    /// Checks the tag and splits the datagram.
    pub fn decode<'a>(&self, data: &'a [u8]) -> Result<RelayPacket<'a>, RelayError> {
        if data.first() != Some(&MAGIC) || data.len() < 1 + 3 + 8 + TAG_LEN {
            return Err(RelayError::Malformed);
        }
        let (body, tag) = data.split_at(data.len() - TAG_LEN);
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| RelayError::BadTag)?;
        let mut at = 1;
        let field = |at: &mut usize| -> Result<&'a str, RelayError> {
            let len = usize::from(*body.get(*at).ok_or(RelayError::Malformed)?);
            let bytes = body
                .get(*at + 1..*at + 1 + len)
                .ok_or(RelayError::Malformed)?;
            *at += 1 + len;
            std::str::from_utf8(bytes).map_err(|_| RelayError::Malformed)
        };
        let channel = field(&mut at)?;
        let epoch_bytes: [u8; 8] = body
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or(RelayError::Malformed)?;
        at += 8;
        let speaker = field(&mut at)?;
        let node = field(&mut at)?;
        Ok(RelayPacket {
            channel,
            epoch: u64::from_be_bytes(epoch_bytes),
            speaker,
            node,
            rtp: &body[at..],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let key = RelayKey::new(b"secret");
        let rtp = crate::rtp::build_packet(true, 111, 5, 960, 9, b"opus");
        let mut buf = Vec::new();
        key.encode(
            &mut buf,
            "ops-1",
            1_700_000_000_000_001,
            "alice",
            "node-a",
            &rtp,
        );
        let p = key.decode(&buf).unwrap();
        assert_eq!(
            (p.channel, p.epoch, p.speaker, p.node, p.rtp),
            ("ops-1", 1_700_000_000_000_001, "alice", "node-a", &rtp[..])
        );
        assert_eq!(
            RelayKey::new(b"other").decode(&buf),
            Err(RelayError::BadTag)
        );
        let mut bad = buf.clone();
        bad[5] ^= 1;
        assert_eq!(key.decode(&bad), Err(RelayError::BadTag));
        assert_eq!(key.decode(&buf[..10]), Err(RelayError::Malformed));
        assert_eq!(key.decode(&[0x80; 40]), Err(RelayError::Malformed));
    }
}
