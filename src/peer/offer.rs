//! Checking a browser's SDP offer before anything is built for it.
//!
//! str0m's `accept_offer` takes every m-line it is given (video, data channels, several audio lines) and
//! answers them all; a talkgroup member is exactly one Opus audio stream each way. So the offer is parsed
//! and checked here, on the control thread, and a bad one is answered `bad_request` at once — no `Rtc` is
//! built and the shard never sees it (protocol v1: "exactly one audio m-line offering Opus").

#![warn(missing_docs)]

use str0m::change::SdpOffer;
use thiserror::Error;

/// Largest offer accepted. A browser's audio-only offer is 1–3 KB; the WebSocket frame limit (64 KiB) is
/// the outer bound, this one keeps the text scan below trivially cheap.
pub const MAX_OFFER: usize = 16 * 1024;

/// A checked offer, ready for the shard.
#[derive(Debug)]
pub struct Offer {
    /// The offer as str0m parsed it, for the shard's `accept_offer`.
    pub sdp: SdpOffer,
    /// `a=recvonly`: the member only listens; a press is denied `listen_only`.
    pub listen_only: bool,
}

/// Why an offer was refused. The message is sent to the client in `error.message`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OfferError {
    /// Larger than [`MAX_OFFER`].
    #[error("the SDP offer is larger than {MAX_OFFER} bytes")]
    TooLarge,
    /// Not SDP (the text scan or str0m's parser says why).
    #[error("the SDP offer is not valid SDP: {0}")]
    Syntax(String),
    /// No m-line at all.
    #[error("the SDP offer has no m-line; it needs exactly one audio m-line offering Opus")]
    NoMedia,
    /// More than one m-line (their number).
    #[error(
        "the SDP offer has {0} m-lines; talkgroup takes exactly one audio m-line offering Opus"
    )]
    TooManyMedia(usize),
    /// The m-line is not audio (its media type).
    #[error("the SDP offer's m-line is '{0}', not audio")]
    NotAudio(String),
    /// The audio m-line has no `opus/48000` format.
    #[error("the SDP offer's audio m-line does not offer Opus (a=rtpmap:PT opus/48000/2)")]
    NoOpus,
    /// Port 0 or `a=inactive`.
    #[error("the SDP offer's audio m-line is inactive (port 0 or a=inactive)")]
    Inactive,
}

/// Parses and checks an offer: valid SDP, exactly one audio m-line, Opus among its formats, not inactive.
pub fn parse_offer(text: &str) -> Result<Offer, OfferError> {
    if text.len() > MAX_OFFER {
        return Err(OfferError::TooLarge);
    }
    // The text scan runs first so that "no audio" is reported as such rather than as whatever str0m's
    // parser thinks of an SDP without media.
    let scan = scan(text)?;
    let sdp = SdpOffer::from_sdp_string(text).map_err(|e| OfferError::Syntax(e.to_string()))?;
    Ok(Offer {
        sdp,
        listen_only: scan.listen_only,
    })
}

struct Scan {
    listen_only: bool,
}

fn scan(text: &str) -> Result<Scan, OfferError> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !lines.first().is_some_and(|l| l.starts_with("v=")) {
        return Err(OfferError::Syntax("it does not start with 'v='".into()));
    }
    let media: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("m="))
        .map(|(i, _)| i)
        .collect();
    match media.len() {
        0 => return Err(OfferError::NoMedia),
        1 => {}
        n => return Err(OfferError::TooManyMedia(n)),
    }
    let (session, section) = lines.split_at(media[0]);
    let mline: Vec<&str> = section[0][2..].split_whitespace().collect();
    let kind = mline.first().copied().unwrap_or("");
    if kind != "audio" {
        return Err(OfferError::NotAudio(kind.to_string()));
    }
    if mline.get(1).is_some_and(|port| *port == "0") {
        return Err(OfferError::Inactive);
    }
    let formats: &[&str] = mline.get(3..).unwrap_or(&[]);
    let opus = section
        .iter()
        .filter_map(|l| l.strip_prefix("a=rtpmap:"))
        .any(|map| {
            let mut it = map.splitn(2, ' ');
            let pt = it.next().unwrap_or("");
            let codec = it.next().unwrap_or("").to_ascii_lowercase();
            formats.contains(&pt) && codec.starts_with("opus/48000")
        });
    if !opus {
        return Err(OfferError::NoOpus);
    }
    // Media-level direction wins over session-level (RFC 4566 §6); sendrecv is the default.
    let direction = |ls: &[&str]| {
        ls.iter().rev().find_map(|l| match *l {
            "a=sendrecv" | "a=sendonly" | "a=recvonly" | "a=inactive" => Some(l[2..].to_string()),
            _ => None,
        })
    };
    let dir = direction(section)
        .or_else(|| direction(session))
        .unwrap_or_else(|| "sendrecv".into());
    if dir == "inactive" {
        return Err(OfferError::Inactive);
    }
    Ok(Scan {
        listen_only: dir == "recvonly",
    })
}

/// A browser-like audio offer (`direction`: `sendrecv`, `recvonly`, …) for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_offer(direction: &str) -> String {
    tests::OFFER.replace("DIR", direction)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
        a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
        a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=setup:actpass\r\na=mid:0\r\n\
        a=DIR\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
        a=rtpmap:0 PCMU/8000\r\na=ssrc:1 cname:x\r\n";

    fn offer(dir: &str) -> String {
        OFFER.replace("DIR", dir)
    }

    #[test]
    fn accepts_one_audio_line_with_opus_and_reads_the_direction() {
        assert!(!parse_offer(&offer("sendrecv")).unwrap().listen_only);
        assert!(parse_offer(&offer("recvonly")).unwrap().listen_only);
    }

    #[test]
    fn refuses_what_is_not_one_opus_audio_line() {
        let err = |t: &str| parse_offer(t).unwrap_err();
        assert!(matches!(err("hello"), OfferError::Syntax(_)));
        let no_media = offer("sendrecv");
        let no_media = &no_media[..no_media.find("m=audio").unwrap()];
        assert_eq!(err(no_media), OfferError::NoMedia);
        assert_eq!(
            err(&offer("sendrecv").replace("m=audio", "m=video")),
            OfferError::NotAudio("video".into())
        );
        assert_eq!(
            err(&offer("sendrecv").replace("opus/48000/2", "G722/8000")),
            OfferError::NoOpus
        );
        assert_eq!(err(&offer("inactive")), OfferError::Inactive);
        let two = format!(
            "{}m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\n",
            offer("sendrecv")
        );
        assert_eq!(err(&two), OfferError::TooManyMedia(2));
        assert_eq!(err(&"v=0\r\n".repeat(10_000)), OfferError::TooLarge);
    }
}
