//! RTP/RTCP classification (RFC 7983), the zero-copy RTP parser and the RTCP report-block walk, on any
//! datagram a peer can send. Beyond "no panic": what the parsers return is consistent with the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talkgroup::rtp::{self, Kind, RtpView, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let kind = rtp::classify(data);
    match RtpView::parse(data) {
        Ok(v) => {
            // Only version 2 parses, and such a datagram is RTP or RTCP by its first byte.
            assert!(matches!(kind, Kind::Rtp | Kind::Rtcp), "{kind:?}");
            // The payload is a slice of the datagram, after the fixed header.
            let start = v.payload.as_ptr() as usize - data.as_ptr() as usize;
            assert!(start >= HEADER_LEN && start + v.payload.len() <= data.len());
            // The fixed header written back is the one read (bar the bits it does not carry).
            let mut out = [0u8; HEADER_LEN];
            v.header().write(&mut out);
            assert_eq!(out[1..], data[1..HEADER_LEN]);
        }
        Err(_) => assert!(kind != Kind::Rtp || data.len() < HEADER_LEN || data[0] >> 6 == 2),
    }
    // Every report block read lies inside the datagram: at most one per 24 bytes.
    let mut blocks = 0;
    let reports = rtp::report_blocks(data, |_| blocks += 1);
    assert!(blocks * 24 <= data.len() && reports * 4 <= data.len());
});
