//! The server's ICE ufrag in a STUN `USERNAME` (how a shard finds the WebRTC peer of a datagram from an
//! unknown address): any datagram, from anyone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talkgroup::peer::stun_local_ufrag;

fuzz_target!(|data: &[u8]| {
    if let Some(ufrag) = stun_local_ufrag(data) {
        // It is read from the message's own bytes, after the 20-byte header, and holds no ':'.
        let at = ufrag.as_ptr() as usize - data.as_ptr() as usize;
        assert!(at >= 20 && at + ufrag.len() <= data.len());
        assert!(!ufrag.contains(':'));
    }
});
