//! A member token (JWT, the `token` of a `join` or `Authorization: Bearer`): refused with a typed reason
//! unless it is signed by a trusted key, whatever its header, claims or encoding.
//!
//! The first byte chooses the clock and the mode: a token as received (any success would be a forgery),
//! or claims the target signs with the server's HS256 secret first, so that the claim checks behind the
//! signature (`exp`, `nbf`, `sub`, the `tg` rights) see fuzzer-made JSON too.
#![no_main]

use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use talkgroup::auth::{keys, token::LEEWAY_S};
use talkgroup::signal::protocol::validate_name;

const SECRET: &str = "fuzz token secret";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let set = keys::load(Some(SECRET), None)
        .expect("an HS256 secret loads")
        .expect("a key was given");
    // A few clocks: far past, now-ish, the end of u64 (expiry arithmetic must saturate).
    let now = match (mode >> 1) % 3 {
        0 => 0,
        1 => 1_800_000_000,
        _ => u64::MAX,
    };
    if mode & 1 == 0 {
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok(claims) = set.verifier.verify(token, now) {
            panic!("a token the fuzzer made was accepted: {claims:?}");
        }
        return;
    }
    let signing_input = format!(
        "{}.{}",
        b64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(rest)
    );
    let mut mac = <Hmac<Sha256>>::new_from_slice(SECRET.as_bytes()).expect("HMAC takes any key");
    mac.update(signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64url(&mac.finalize().into_bytes()));
    if let Ok(claims) = set.verifier.verify(&token, now) {
        let exp = claims.exp.expect("a token without exp was accepted");
        assert!(exp.saturating_add(LEEWAY_S) >= now, "expired: {claims:?}");
        assert!(validate_name("member", &claims.sub).is_ok(), "{claims:?}");
    }
});

/// Base64url without padding (RFC 7515 §2): the JWT encoding of the signed parts.
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}
