#!/usr/bin/env python3
"""Writes the hand-made seeds of each target into corpus/<target>/ (run from fuzz/; idempotent).
The shard target's seeds are not written here: its input is a structured operation list, and its corpus
is what the fuzzer itself found, minimised (see README.md)."""
import hashlib, hmac, os, struct

def rtp(marker=False, pt=111, seq=1, ts=960, ssrc=7, payload=b"opus", first=0x80):
    return bytes([first, (0x80 if marker else 0) | pt]) + struct.pack(">HII", seq, ts, ssrc) + payload

seeds = {
    "rtp": {
        "plain": rtp(),
        "marker": rtp(marker=True, seq=65535),
        "csrc_ext_padding": bytes([0x80 | 0x20 | 0x10 | 1, 111]) + struct.pack(">HII", 1, 2, 3)
            + b"\x09\x09\x09\x09" + b"\xbe\xde\x00\x01\x10\xff\x00\x00" + b"abc" + b"\x00\x00\x03",
        "rr": bytes([0x80, 201, 0, 1, 0, 0, 0, 1]),
        "sr": bytes([0x80, 200, 0, 6]) + bytes(24),
        "stun": bytes([0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]) + bytes(12),
        "dtls": bytes([22, 254, 253]) + bytes(10),
    },
    "stun": {},
    "relay": {},
    "signal": {
        "join_rtp": b'{"type":"join","id":1,"channel":"ops-1","member":"alice","transport":"rtp","rtp_addr":"127.0.0.1:5000"}',
        "join_webrtc": b'{"type":"join","id":"a","channel":"ops-1","member":"bob","sdp":"v=0\\r\\n","priority":3,"presence":false}',
        "press": b'{"type":"ptt","channel":"ops-1","action":"press","queue":true,"emergency":true}',
        "release": b'{"type":"ptt","channel":"ops-1","action":"release"}',
        "leave": b'{"type":"leave","channel":"ops-1"}',
        "ping": b'{"type":"ping","id":7}',
        "resume": b'{"type":"resume","session":"s1","resume_token":"t"}',
        "bad_type": b'{"type":"nope","id":[1]}',
    },
    "sdp_offer": {},
    "token": {
        # Mode 1 (the target signs): claims JSON.
        "claims": b"\x03" + b'{"sub":"alice","exp":1900000000,"nbf":1700000000,"tg":{"channels":["ops-*"],"listen":true,"talk":true,"max_priority":5,"emergency":true,"admin":false}}',
        "claims_bad_sub": b"\x03" + b'{"sub":"a b","exp":1900000000}',
        # Mode 0: a token as received (signed with another secret).
        "foreign": b"\x02" + b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTkwMDAwMDAwMH0.c2lnbmF0dXJl",
        "none_alg": b"\x02" + b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
    },
}

user = b"srvfrag1:cli"
stun = bytearray([0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42]) + bytes([7] * 12)
stun += struct.pack(">HH", 6, len(user)) + user + b"\x00" * ((4 - len(user) % 4) % 4)
stun += struct.pack(">HH", 0x8029, 8) + bytes(8)  # ICE-CONTROLLING
stun[2:4] = struct.pack(">H", len(stun) - 20)
seeds["stun"]["binding_request"] = bytes(stun)

# The settled target: the first octet picks the SRTP profile; then a consent check signed with the
# target's ICE password (MESSAGE-INTEGRITY, FINGERPRINT), and plain RTP/RTCP/DTLS that must be refused.
import zlib
seeds["settled"] = {}
user = b"srvfrag1srvfrag1:cli"
check = bytearray([0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42]) + bytes([9] * 12)
check += struct.pack(">HH", 6, len(user)) + user
check += struct.pack(">HHI", 0x0024, 4, 0x6e7f00ff)  # PRIORITY
check += struct.pack(">HH", 0x0025, 0)  # USE-CANDIDATE
check += struct.pack(">HH", 0x802A, 8) + bytes(8)  # ICE-CONTROLLING
check[2:4] = struct.pack(">H", len(check) - 20 + 24)
mi = hmac.new(b"fuzzfuzzfuzzfuzzfuzzfuzz", bytes(check), hashlib.sha1).digest()
check += struct.pack(">HH", 0x0008, 20) + mi
check[2:4] = struct.pack(">H", len(check) - 20 + 8)
fp = (zlib.crc32(bytes(check)) ^ 0x5354554E) & 0xFFFFFFFF
check += struct.pack(">HHI", 0x8028, 4, fp)
for profile in range(3):
    seeds["settled"][f"consent_{profile}"] = bytes([profile]) + bytes(check)
seeds["settled"]["rtp"] = b"\x02" + rtp(payload=b"opus" + bytes(16))
seeds["settled"]["rtcp"] = b"\x02" + bytes([0x81, 201, 0, 7]) + bytes(28) + bytes([0x80, 0, 0, 1]) + bytes(16)
seeds["settled"]["dtls_alert"] = b"\x01" + bytes([21, 254, 253, 0, 1]) + bytes(6) + bytes([0, 26]) + bytes(26)

def relay_body(channel, epoch, speaker, node, packet):
    out = bytes([len(channel)]) + channel + struct.pack(">Q", epoch)
    return out + bytes([len(speaker)]) + speaker + bytes([len(node)]) + node + packet

body = relay_body(b"ops-1", 1_700_000_000_000_001, b"alice", b"node-b", rtp(marker=True))
seeds["relay"]["signed_body"] = b"\x01" + body
# Signed with another cluster secret: it must be refused.
tag = hmac.new(b"another secret", b"\xf7" + body, hashlib.sha256).digest()[:16]
seeds["relay"]["datagram"] = b"\x00\xf7" + body + tag

offer = ("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
         "a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n"
         "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
         "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=setup:actpass\r\na=mid:0\r\n"
         "a=DIR\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n"
         "a=rtpmap:0 PCMU/8000\r\na=ssrc:1 cname:x\r\n")
for d in ["sendrecv", "recvonly", "inactive"]:
    seeds["sdp_offer"][d] = offer.replace("DIR", d).encode()
seeds["sdp_offer"]["video_too"] = (offer.replace("DIR", "sendrecv") + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n").encode()

for target, files in seeds.items():
    os.makedirs(f"corpus/{target}", exist_ok=True)
    for name, data in files.items():
        with open(f"corpus/{target}/seed-{name}", "wb") as f:
            f.write(data)
