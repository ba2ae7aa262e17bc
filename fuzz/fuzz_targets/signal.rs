//! A client's signaling frame (WebSocket text, JSON): parsed into a request or refused with a
//! `bad_request` that may echo the frame's `id`; member and channel names checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talkgroup::signal::protocol::{parse, validate_name, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Ok(frame) => {
            let _ = format!("{frame:?}");
        }
        Err((id, err)) => {
            // The refusal the client is sent is a JSON object (serialising it never falls back).
            let json = Message::error(&err, id).to_json();
            assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
            assert!(!json.contains(r#""message":"serialize""#), "{json}");
        }
    }
    let _ = validate_name("member", text);
});
