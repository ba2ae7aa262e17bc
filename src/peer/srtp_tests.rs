//! The RFC test vectors (RFC 3711 Appendix B.2 and B.3, RFC 7714 §16 and §17, libsrtp's AES-CM
//! known answers), and a differential test against an independent implementation: webrtc-rs's SRTP
//! decrypts what this module seals, for every profile and across a rollover-counter wrap.

use super::*;
use webrtc::srtp::context::Context;
use webrtc::srtp::protection_profile::ProtectionProfile;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const B3_KEY: &str = "E1F97A0D3E018BE0D64FA32C06DE4139";
const B3_SALT: &str = "0EC675AD498AFEEBB6960B3AABE6";

#[test]
fn rfc3711_b3_key_derivation() {
    let (k, s) = (hex(B3_KEY), hex(B3_SALT));
    let mut key = [0u8; 16];
    derive(&k, &s, LABEL_RTP_KEY, &mut key).unwrap();
    assert_eq!(key[..], hex("C61E7A93744F39EE10734AFE3FF7A087")[..]);
    let mut salt = [0u8; 14];
    derive(&k, &s, LABEL_RTP_SALT, &mut salt).unwrap();
    assert_eq!(salt[..], hex("30CBBC08863D8C85D49DB34A9AE1")[..]);
    let mut auth = [0u8; 94];
    derive(&k, &s, LABEL_RTP_AUTH, &mut auth).unwrap();
    assert_eq!(
        auth[..],
        hex(
            "CEBE321F6FF7716B6FD4AB49AF256A156D38BAA48F0A0ACF3C34E2359E6CDBCE
             E049646C43D9327AD175578EF72270986371C10C9A369AC2F94A8C5FBCDDDC25
             6D6E919A48B610EF17C2041E474035766B68642C59BBFC2F34DB60DBDFB2"
        )[..]
    );
}

#[test]
fn rfc3711_b2_aes_cm_keystream() {
    let salt = hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD");
    assert_eq!(
        Cipher::cm_iv(&salt.clone().try_into().unwrap(), 0, 0)[..],
        hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000")[..],
        "SSRC and index 0: the IV is the shifted salt"
    );
    let tx = SrtpContext::from_session_keys(
        Profile::Aes128CmSha1_80,
        &hex("2B7E151628AED2A6ABF7158809CF4F3C"),
        &salt,
        &[0; 20],
    );
    // A zero payload seals to the keystream itself (after the 12-octet header).
    let blocks = 65282;
    let mut buf = vec![0u8; 12 + blocks * 16];
    tx.seal_rtp(&mut buf, 0, 12, 0, 0);
    let ks = &buf[12..12 + blocks * 16];
    assert_eq!(
        ks[..48],
        hex(
            "E03EAD0935C95E80E166B16DD92B4EB4 D23513162B02D0F72A43A2FE4A5F97AB
             41E95B3BB0A2E8DD477901E4FCA894C0"
        )[..]
    );
    assert_eq!(
        ks[0xFEFF * 16..],
        hex(
            "EC8CDF7398607CB0F2D21675EA9EA1E4 362B7C3C6773516318A077D7FC5073AE
             6A2CC3787889374FBEB4C81B17BA6C44"
        )[..]
    );
}

#[test]
fn libsrtp_aes_cm_known_answers_through_the_kdf() {
    let mut tx = SrtpContext::new(Profile::Aes128CmSha1_80, &hex(B3_KEY), &hex(B3_SALT)).unwrap();
    let plain = hex("800f1234 decafbad cafebabe abababab abababab abababab abababab");
    let mut buf = plain.clone();
    tx.seal_rtp(&mut buf, 0, 12, 0xcafebabe, 0x1234);
    assert_eq!(
        buf,
        hex(
            "800f1234 decafbad cafebabe 4e55dc4c e79978d8 8ca4d215 949d2402 b78d6acc
             99ea179b 8dbb"
        )
    );

    let rtcp = hex("81c8000b cafebabe abababab abababab abababab abababab");
    let want = hex(
        "81c8000b cafebabe 7128035b e487b9bd bef89041 f977a5a8 80000001 993e08cd
                    54d6c123 0798",
    );
    tx.set_srtcp_index(1);
    assert_eq!(tx.seal_rtcp(&rtcp).unwrap(), want);
    assert_eq!(tx.srtcp_index(), 2);
    assert_eq!(tx.open_rtcp(&want).unwrap(), rtcp);
    let mut forged = want.clone();
    forged[10] ^= 1;
    assert_eq!(tx.open_rtcp(&forged), Err(SrtpError::Rtcp));
}

const GCM_SALT: &str = "517569642070726f2071756f";
const GCM_RTP: &str = "8040f17b 8041f8d3 5501a0b2 47616c6c 69612065 7374206f 6d6e6973 20646976
                       69736120 696e2070 61727465 73207472 6573";
const GCM_RTCP: &str = "81c8000d 4d617273 4e545031 4e545032 52545020 0000042a 0000e930 4c756e61
                        deadbeef deadbeef deadbeef deadbeef deadbeef";

fn gcm(profile: Profile) -> SrtpContext {
    let key = match profile {
        Profile::AeadAes256Gcm => {
            hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
        }
        _ => hex("000102030405060708090a0b0c0d0e0f"),
    };
    SrtpContext::from_session_keys(profile, &key, &hex(GCM_SALT), &[])
}

#[test]
fn rfc7714_16_rtp_aead_aes_128_and_256_gcm() {
    for (profile, want) in [
        (
            Profile::AeadAes128Gcm,
            "8040f17b 8041f8d3 5501a0b2 f24de3a3 fb34de6c acba861c 9d7e4bca be633bd5 0d294e6f
             42a5f47a 51c7d19b 36de3adf 8833899d 7f27beb1 6a9152cf 765ee439 0cce",
        ),
        (
            Profile::AeadAes256Gcm,
            "8040f17b 8041f8d3 5501a0b2 32b1de78 a822fe12 ef9f78fa 332e33aa b1801238 9a58e2f3
             b50b2a02 76ffae0f 1ba63799 b87b7aa3 db36dfff d6b0f9bb 7878d7a7 6c13",
        ),
    ] {
        let mut buf = vec![0xee; 3];
        buf.extend_from_slice(&hex(GCM_RTP));
        gcm(profile).seal_rtp(&mut buf, 3, 12, 0x5501a0b2, 0xf17b);
        assert_eq!(buf[3..], hex(want)[..], "{profile:?}");
        assert_eq!(
            buf[..3],
            [0xee; 3],
            "bytes before the packet are left alone"
        );
    }
}

#[test]
fn rfc7714_17_srtcp() {
    // §17.1: AEAD_AES_128_GCM, encrypted, SRTCP index 0x5d4.
    let mut tx = gcm(Profile::AeadAes128Gcm);
    tx.set_srtcp_index(0x5d4);
    let sealed = tx.seal_rtcp(&hex(GCM_RTCP)).unwrap();
    assert_eq!(
        sealed,
        hex(
            "81c8000d 4d617273 63e94885 dcdab67c a727d766 2f6b7e99 7ff5c0f7 6c06f32d c676a5f1
             730d6fda 4ce09b46 86303ded 0bb9275b c84aa458 96cf4d2f c5abf872 45d9eade 800005d4"
        )
    );
    assert_eq!(tx.open_rtcp(&sealed).unwrap(), hex(GCM_RTCP));
    // §17.2: AEAD_AES_256_GCM, encrypted.
    let tx = gcm(Profile::AeadAes256Gcm);
    let wire = hex(
        "81c8000d 4d617273 d50ae4d1 f5ce5d30 4ba297e4 7d470c28 2c3ece5d bffe0a50
                    a2eaa5c1 110555be 8415f658 c61de047 6f1b6fad 1d1eb30c 4446839f 57ff6f6c
                    b26ac3be 800005d4",
    );
    assert_eq!(tx.open_rtcp(&wire).unwrap(), hex(GCM_RTCP));
    // §17.4: AEAD_AES_256_GCM, authenticated only.
    let wire = hex(
        "81c8000d 4d617273 4e545031 4e545032 52545020 0000042a 0000e930 4c756e61
                    deadbeef deadbeef deadbeef deadbeef deadbeef 91db4afb feee5a97 8fab4393
                    ed2615fe 000005d4",
    );
    assert_eq!(tx.open_rtcp(&wire).unwrap(), hex(GCM_RTCP));
    let mut forged = wire;
    forged[9] ^= 1;
    assert_eq!(tx.open_rtcp(&forged), Err(SrtpError::Rtcp));
}

#[test]
fn material_halves_follow_rfc5764() {
    let m: Vec<u8> = (0..60).collect();
    let (k, s) = master_half(Profile::Aes128CmSha1_80, &m, false).unwrap();
    assert_eq!((k[0], k.len(), s[0], s.len()), (16, 16, 46, 14));
    let (k, s) = master_half(Profile::Aes128CmSha1_80, &m, true).unwrap();
    assert_eq!((k[0], s[0]), (0, 32));
    assert_eq!(
        master_half(Profile::AeadAes256Gcm, &m, false),
        Err(SrtpError::MaterialLength(60))
    );
}

/// What the server seals, webrtc-rs (an independent SRTP) opens — with the keys it would derive from
/// the same DTLS material as the client — for each profile, across the sequence-number wrap (ROC 0 → 1),
/// and likewise for SRTCP both ways.
#[test]
fn webrtc_rs_decrypts_what_the_server_seals_across_a_roc_wrap() {
    for (profile, theirs) in [
        (
            Profile::Aes128CmSha1_80,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ),
        (Profile::AeadAes128Gcm, ProtectionProfile::AeadAes128Gcm),
        (Profile::AeadAes256Gcm, ProtectionProfile::AeadAes256Gcm),
    ] {
        let len = 2 * (profile.key_len() + profile.salt_len());
        let material: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        let mut tx = SrtpContext::from_material(profile, &material, false).unwrap();
        let (k, s) = master_half(profile, &material, false).unwrap();
        let mut rx = Context::new(k, s, theirs, None, None).unwrap();
        let ssrc = 0x1234_5678;
        for index in 0xfff0u64..0x1_0010 {
            let seq = index as u16;
            let payload = [index as u8; 61];
            let mut buf = crate::rtp::build_packet(
                index == 0xfff0,
                111,
                seq,
                index as u32 * 960,
                ssrc,
                &payload,
            );
            tx.seal_rtp(&mut buf, 0, 12, ssrc, index);
            assert_eq!(buf.len(), 12 + 61 + profile.tag_len());
            let plain = rx
                .decrypt_rtp(&buf)
                .unwrap_or_else(|e| panic!("{profile:?} index {index:#x}: {e}"));
            assert_eq!(plain[12..], payload[..], "{profile:?} index {index:#x}");
        }
        let sr = hex("80c80006 12345678 00000001 00000002 00000003 00000004 00000005");
        for _ in 0..3 {
            let sealed = tx.seal_rtcp(&sr).unwrap();
            assert_eq!(rx.decrypt_rtcp(&sealed).unwrap()[..], sr[..], "{profile:?}");
        }
        let mut their_tx = Context::new(k, s, theirs, None, None).unwrap();
        let sealed = their_tx.encrypt_rtcp(&sr).unwrap();
        assert_eq!(tx.open_rtcp(&sealed).unwrap(), sr, "{profile:?}");
    }
}
