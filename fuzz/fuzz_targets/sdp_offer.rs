//! A browser's SDP offer (the `sdp` of a WebRTC `join`): the text scan and str0m's parser behind it.
//! Whatever it is, it is accepted or refused with a reason, and an accepted one has one Opus audio m-line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talkgroup::peer::offer::{parse_offer, OfferError, MAX_OFFER};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_offer(text) {
        Ok(offer) => {
            assert!(text.len() <= MAX_OFFER);
            assert_eq!(
                text.lines().filter(|l| l.trim().starts_with("m=")).count(),
                1
            );
            let _ = offer.listen_only;
        }
        Err(OfferError::TooLarge) => assert!(text.len() > MAX_OFFER),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
