//! Relay datagram decoding (node to node, HMAC-tagged). The first byte of the input chooses how the rest
//! is used: as a datagram as received (almost always refused by its tag), or as a body the target signs
//! with the cluster key first, so that the field parsing behind the tag is reached as well.
#![no_main]

use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use talkgroup::relay::{RelayError, RelayKey, MAGIC, TAG_LEN};

const SECRET: &[u8] = b"fuzz cluster secret";

fuzz_target!(|data: &[u8]| {
    let key = RelayKey::new(SECRET);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(p) = key.decode(rest) {
            panic!("a forged datagram passed the tag: {p:?}");
        }
        return;
    }
    // A body as a node with the key would send it, fields and all chosen by the fuzzer.
    let mut signed = Vec::with_capacity(rest.len() + 1 + TAG_LEN);
    signed.push(MAGIC);
    signed.extend_from_slice(rest);
    let mut mac = <Hmac<Sha256>>::new_from_slice(SECRET).expect("HMAC takes any key");
    mac.update(&signed);
    let tag = mac.finalize().into_bytes();
    signed.extend_from_slice(&tag[..TAG_LEN]);
    match key.decode(&signed) {
        Ok(p) => {
            // Encoding what was decoded gives the datagram back.
            let mut again = Vec::new();
            key.encode(&mut again, p.channel, p.epoch, p.speaker, p.node, p.rtp);
            assert_eq!(again, signed);
        }
        Err(e) => assert!(matches!(e, RelayError::Malformed), "{e:?}"),
    }
});
