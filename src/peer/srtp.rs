//! SRTP/SRTCP for one WebRTC peer outside str0m: sealing what the server sends it, opening what it sends.
//!
//! str0m keeps its keys to itself, so the listener's audio used to go through its `Rtc` one packet at a
//! time (`write_rtp`, a timeout, `poll_output`) — most of a forwarded packet's cost. The keying material
//! is captured from the DTLS handshake instead ([`super::keys`]) and the session keys are derived here:
//! - RFC 5764 §4.2: the exported material is `client key | server key | client salt | server salt`; the
//!   server (DTLS passive) sends with the server half.
//! - RFC 3711 §4.3: session key, salt and authentication key from the master key and salt by the AES-CM
//!   PRF (AES-128, or AES-256 for a 256-bit master key; a 96-bit GCM salt is padded to 112 bits).
//! - RFC 3711 §4.1.1 / §4.2 for AES_CM_128_HMAC_SHA1_80 (counter IV, HMAC-SHA1 over the packet and the
//!   ROC, 80-bit tag); RFC 7714 §8 / §9 for AEAD_AES_128_GCM and AEAD_AES_256_GCM (96-bit nonce from
//!   salt, SSRC, ROC and sequence number; the header is the associated data).
//!
//! Ciphers are built once per key (aws-lc, already linked through str0m: AES-CM and HMAC through
//! aws-lc-rs, AES-GCM through [`super::gcm`], whose context the fan-out can prefetch); sealing a packet is
//! done in place in the caller's buffer and allocates nothing.

#![warn(missing_docs)]

use aws_lc_rs::cipher::{EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128, AES_256};
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;
use str0m::crypto::dtls::SrtpProfile;
use thiserror::Error;

use super::gcm::{GcmKey, NONCE_LEN};

/// RFC 3711 §4.3.2 key derivation labels.
const LABEL_RTP_KEY: u8 = 0;
const LABEL_RTP_AUTH: u8 = 1;
const LABEL_RTP_SALT: u8 = 2;
const LABEL_RTCP_KEY: u8 = 3;
const LABEL_RTCP_AUTH: u8 = 4;
const LABEL_RTCP_SALT: u8 = 5;

/// Length of the HMAC-SHA1 tag of AES_CM_128_HMAC_SHA1_80 (RFC 3711 §5.2).
const CM_TAG_LEN: usize = 10;
/// Length of the GCM tag (RFC 7714 §6: 16 octets).
const GCM_TAG_LEN: usize = super::gcm::TAG_LEN;
/// The `E` flag and 31-bit SRTCP index that follow an SRTCP packet's encrypted portion.
const SRTCP_INDEX_LEN: usize = 4;
/// The part of an RTCP packet SRTCP leaves in the clear: the first header and the sender SSRC.
const RTCP_CLEAR: usize = 8;
/// The longest tag of the three profiles: room a caller keeps after a packet for [`SrtpContext::seal_rtp`].
pub const MAX_TAG_LEN: usize = GCM_TAG_LEN;

/// One of the SRTP protection profiles DTLS-SRTP negotiated (RFC 5764 §4.1.2, RFC 7714 §14.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// SRTP_AES128_CM_HMAC_SHA1_80.
    Aes128CmSha1_80,
    /// SRTP_AEAD_AES_128_GCM.
    AeadAes128Gcm,
    /// SRTP_AEAD_AES_256_GCM.
    AeadAes256Gcm,
}

impl Profile {
    /// The profile str0m's DTLS negotiated, if it is one of ours.
    pub fn from_str0m(p: SrtpProfile) -> Option<Self> {
        match p {
            SrtpProfile::AES128_CM_SHA1_80 => Some(Profile::Aes128CmSha1_80),
            SrtpProfile::AEAD_AES_128_GCM => Some(Profile::AeadAes128Gcm),
            SrtpProfile::AEAD_AES_256_GCM => Some(Profile::AeadAes256Gcm),
            _ => None,
        }
    }

    /// Master key length in octets.
    pub fn key_len(self) -> usize {
        match self {
            Profile::Aes128CmSha1_80 | Profile::AeadAes128Gcm => 16,
            Profile::AeadAes256Gcm => 32,
        }
    }

    /// Master salt length in octets.
    pub fn salt_len(self) -> usize {
        match self {
            Profile::Aes128CmSha1_80 => 14,
            Profile::AeadAes128Gcm | Profile::AeadAes256Gcm => 12,
        }
    }

    /// Octets a sealed RTP packet gains.
    pub fn tag_len(self) -> usize {
        match self {
            Profile::Aes128CmSha1_80 => CM_TAG_LEN,
            Profile::AeadAes128Gcm | Profile::AeadAes256Gcm => GCM_TAG_LEN,
        }
    }
}

/// Why no context could be built, or an SRTCP packet not opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SrtpError {
    /// The keying material does not have the profile's length (RFC 5764 §4.2).
    #[error("keying material of {0} octets does not fit the profile")]
    MaterialLength(usize),
    /// aws-lc-rs refused a key (cannot happen with the lengths checked above).
    #[error("the cipher refused the key")]
    Key,
    /// An SRTCP packet too short, not authentic, or not decryptable.
    #[error("SRTCP packet refused")]
    Rtcp,
    /// An SRTP packet too short, not authentic (or its index misjudged), or not decryptable.
    #[error("SRTP packet refused")]
    Rtp,
}

/// The master key and salt of one direction, from the DTLS exporter's output (RFC 5764 §4.2).
/// `client` picks the client's half (the DTLS active side's); the server sends with the other one.
pub fn master_half(
    profile: Profile,
    material: &[u8],
    client: bool,
) -> Result<(&[u8], &[u8]), SrtpError> {
    let (kl, sl) = (profile.key_len(), profile.salt_len());
    if material.len() != 2 * (kl + sl) {
        return Err(SrtpError::MaterialLength(material.len()));
    }
    let (k, s) = if client {
        (0, 2 * kl)
    } else {
        (kl, 2 * kl + sl)
    };
    Ok((&material[k..k + kl], &material[s..s + sl]))
}

/// The RFC 3711 §4.3.3 AES-CM PRF: `out.len()` octets of the key labelled `label`, with a key
/// derivation rate of 0 (WebRTC's). AES-128 or AES-256 by the master key's length.
pub fn derive(
    master_key: &[u8],
    master_salt: &[u8],
    label: u8,
    out: &mut [u8],
) -> Result<(), SrtpError> {
    let alg = if master_key.len() == 32 {
        &AES_256
    } else {
        &AES_128
    };
    let key = UnboundCipherKey::new(alg, master_key).map_err(|_| SrtpError::Key)?;
    let ctr = EncryptingKey::ctr(key).map_err(|_| SrtpError::Key)?;
    // x = (label << 48) XOR master_salt over 112 bits; the counter block is x * 2^16.
    let mut iv = [0u8; 16];
    iv[..master_salt.len().min(14)].copy_from_slice(&master_salt[..master_salt.len().min(14)]);
    iv[7] ^= label;
    out.fill(0);
    ctr.less_safe_encrypt(out, EncryptionContext::Iv128(FixedLength::from(iv)))
        .map_err(|_| SrtpError::Key)?;
    Ok(())
}

/// One direction's cipher for RTP or for RTCP: session key, salt, and authentication key.
// The AES-CM keys are boxed: inline (an AES key schedule and two HMAC states, ≈ 1.7 KB) they made every
// cipher that size, GCM ones too, and every peer slot ≈ 15 KB, so that the one line of it a forwarded
// packet reads was a cache miss in a slab far bigger than the cache; GCM's key lives behind its own
// pointer anyway ([`GcmKey`]). AES-CM pays one more pointer.
enum Cipher {
    /// AES-CM with HMAC-SHA1 (RFC 3711).
    Cm(Box<CmKeys>),
    /// AES-GCM (RFC 7714).
    Gcm { key: GcmKey, salt: [u8; 12] },
}

/// AES-CM's session keys (RFC 3711 §4.1.1, §4.2.1).
struct CmKeys {
    ctr: EncryptingKey,
    salt: [u8; 14],
    auth: hmac::Key,
}

impl Cipher {
    /// Derives the session keys of the RTP (`rtcp == false`) or RTCP side from the master key and salt.
    fn new(profile: Profile, mk: &[u8], ms: &[u8], rtcp: bool) -> Result<Self, SrtpError> {
        let (lk, la, ls) = if rtcp {
            (LABEL_RTCP_KEY, LABEL_RTCP_AUTH, LABEL_RTCP_SALT)
        } else {
            (LABEL_RTP_KEY, LABEL_RTP_AUTH, LABEL_RTP_SALT)
        };
        let mut key = [0u8; 32];
        let key = &mut key[..profile.key_len()];
        derive(mk, ms, lk, key)?;
        let mut salt = [0u8; 14];
        let salt = &mut salt[..if profile == Profile::Aes128CmSha1_80 {
            14
        } else {
            12
        }];
        derive(mk, ms, ls, salt)?;
        let mut auth = [0u8; 20];
        if profile == Profile::Aes128CmSha1_80 {
            derive(mk, ms, la, &mut auth)?;
        }
        Self::from_session(profile, key, salt, &auth)
    }

    /// A cipher from session keys (the KDF's output; tests give the RFC vectors' keys directly).
    fn from_session(
        profile: Profile,
        key: &[u8],
        salt: &[u8],
        auth: &[u8],
    ) -> Result<Self, SrtpError> {
        match profile {
            Profile::Aes128CmSha1_80 => {
                let unbound = UnboundCipherKey::new(&AES_128, key).map_err(|_| SrtpError::Key)?;
                Ok(Cipher::Cm(Box::new(CmKeys {
                    ctr: EncryptingKey::ctr(unbound).map_err(|_| SrtpError::Key)?,
                    salt: salt.try_into().map_err(|_| SrtpError::Key)?,
                    auth: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth),
                })))
            }
            Profile::AeadAes128Gcm | Profile::AeadAes256Gcm => Ok(Cipher::Gcm {
                key: GcmKey::new(key).ok_or(SrtpError::Key)?,
                salt: salt.try_into().map_err(|_| SrtpError::Key)?,
            }),
        }
    }

    /// The AES-CM counter block (RFC 3711 §4.1.1): `(salt * 2^16) XOR (SSRC * 2^64) XOR (index * 2^16)`.
    fn cm_iv(salt: &[u8; 14], ssrc: u32, index: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
        iv[8..14].copy_from_slice(&index.to_be_bytes()[2..8]);
        for (b, s) in iv.iter_mut().zip(salt) {
            *b ^= s;
        }
        iv
    }

    /// The GCM nonce: `salt XOR (00 00 | SSRC | word | low)` — ROC and sequence number for RTP (RFC 7714
    /// §8.1), zero and the SRTCP index for RTCP (§9.1).
    fn gcm_nonce(salt: &[u8; 12], ssrc: u32, word: u32, low: u16) -> [u8; NONCE_LEN] {
        let mut n = [0u8; 12];
        n[2..6].copy_from_slice(&ssrc.to_be_bytes());
        n[6..10].copy_from_slice(&word.to_be_bytes());
        n[10..12].copy_from_slice(&low.to_be_bytes());
        for (b, s) in n.iter_mut().zip(salt) {
            *b ^= s;
        }
        n
    }
}

/// One direction's SRTP/SRTCP context: RTP and RTCP ciphers and the SRTCP index. The server seals with
/// its own half of the keying material (towards a listener) and opens with the client's half (a
/// speaker's packets, its RTCP) once the peer is served without its `Rtc` ([`super::settled`]).
pub struct SrtpContext {
    profile: Profile,
    rtp: Cipher,
    rtcp: Cipher,
    /// The next SRTCP index (RFC 3711 §3.4: from 0, +1 per packet, modulo 2^31). Every SRTCP packet on
    /// the wire towards this listener is sealed here, so no index is ever used twice with this key.
    srtcp_index: u32,
}

impl std::fmt::Debug for SrtpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpContext")
            .field("profile", &self.profile)
            .field("srtcp_index", &self.srtcp_index)
            .finish_non_exhaustive()
    }
}

impl SrtpContext {
    /// The context for a master key and salt (already the sending half).
    pub fn new(profile: Profile, master_key: &[u8], master_salt: &[u8]) -> Result<Self, SrtpError> {
        if master_key.len() != profile.key_len() || master_salt.len() != profile.salt_len() {
            return Err(SrtpError::MaterialLength(
                master_key.len() + master_salt.len(),
            ));
        }
        Ok(SrtpContext {
            profile,
            rtp: Cipher::new(profile, master_key, master_salt, false)?,
            rtcp: Cipher::new(profile, master_key, master_salt, true)?,
            srtcp_index: 0,
        })
    }

    /// Starts loading the RTP cipher's key into the cache, a few listeners before [`Self::seal_rtp`]
    /// needs it ([`super::gcm`]); AES-CM keys are left alone (no browser negotiates them with us today).
    #[inline]
    pub fn prefetch(&self) {
        if let Cipher::Gcm { key, .. } = &self.rtp {
            key.prefetch();
        }
    }

    /// The server's context from DTLS-SRTP keying material; `active` is whether the server was the DTLS
    /// client (it never is: design.md makes it passive, but str0m's answer is what counts).
    pub fn from_material(
        profile: Profile,
        material: &[u8],
        active: bool,
    ) -> Result<Self, SrtpError> {
        let (k, s) = master_half(profile, material, active)?;
        Self::new(profile, k, s)
    }

    /// The negotiated profile.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Seals the RTP packet at `buf[start..]` in place — `header_len` octets of header, then the payload —
    /// and appends the tag. `index` is the packet's 48-bit SRTP index (ROC * 2^16 + sequence number).
    pub fn seal_rtp(
        &self,
        buf: &mut Vec<u8>,
        start: usize,
        header_len: usize,
        ssrc: u32,
        index: u64,
    ) {
        let roc = (index >> 16) as u32;
        let (header, payload) = buf[start..].split_at_mut(header_len);
        match &self.rtp {
            Cipher::Cm(k) => {
                let CmKeys { ctr, salt, auth } = &**k;
                let iv = Cipher::cm_iv(salt, ssrc, index);
                // CTR accepts any length and an IV of 16 octets: it cannot fail.
                let _ = ctr.less_safe_encrypt(payload, EncryptionContext::Iv128(iv.into()));
                let mut mac = hmac::Context::with_key(auth);
                mac.update(header);
                mac.update(payload);
                mac.update(&roc.to_be_bytes());
                let tag = mac.sign();
                buf.extend_from_slice(&tag.as_ref()[..CM_TAG_LEN]);
            }
            Cipher::Gcm { key, salt } => {
                let seq = index as u16;
                let nonce = Cipher::gcm_nonce(salt, ssrc, roc, seq);
                // Sealing fails only for inputs beyond GCM's 64 GB limit.
                if let Some(tag) = key.seal_in_place(&nonce, header, payload) {
                    buf.extend_from_slice(&tag);
                }
            }
        }
    }

    /// Opens the SRTP packet `packet` — `header_len` octets of header (CSRCs and extension included), the
    /// encrypted payload, the tag — into `out` (header and plain payload). `index` is the packet's 48-bit
    /// SRTP index as the receiver estimated it (RFC 3711 §3.3.1); a wrong estimate fails authentication
    /// like a forgery does.
    pub fn open_rtp(
        &self,
        packet: &[u8],
        header_len: usize,
        ssrc: u32,
        index: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), SrtpError> {
        let tag_len = self.profile.tag_len();
        if packet.len() < header_len + tag_len {
            return Err(SrtpError::Rtp);
        }
        let roc = (index >> 16) as u32;
        out.clear();
        match &self.rtp {
            Cipher::Cm(k) => {
                let CmKeys { ctr, salt, auth } = &**k;
                let (signed, tag) = packet.split_at(packet.len() - tag_len);
                let mut mac = hmac::Context::with_key(auth);
                mac.update(signed);
                mac.update(&roc.to_be_bytes());
                if !constant_eq(&mac.sign().as_ref()[..CM_TAG_LEN], tag) {
                    return Err(SrtpError::Rtp);
                }
                out.extend_from_slice(signed);
                let iv = Cipher::cm_iv(salt, ssrc, index);
                ctr.less_safe_encrypt(&mut out[header_len..], EncryptionContext::Iv128(iv.into()))
                    .map_err(|_| SrtpError::Rtp)?;
            }
            Cipher::Gcm { key, salt } => {
                let nonce = Cipher::gcm_nonce(salt, ssrc, roc, index as u16);
                out.extend_from_slice(packet);
                let (header, body) = out.split_at_mut(header_len);
                let plain = key
                    .open_in_place(&nonce, header, body)
                    .ok_or(SrtpError::Rtp)?
                    .len();
                out.truncate(header_len + plain);
            }
        }
        Ok(())
    }

    /// Seals a plain (compound) RTCP packet with the next SRTCP index (the `E` flag set: the whole
    /// packet after the sender SSRC is encrypted).
    pub fn seal_rtcp(&mut self, plain: &[u8]) -> Result<Vec<u8>, SrtpError> {
        if plain.len() < RTCP_CLEAR {
            return Err(SrtpError::Rtcp);
        }
        let index = self.srtcp_index;
        self.srtcp_index = (index + 1) & 0x7fff_ffff;
        let e_index = (0x8000_0000 | index).to_be_bytes();
        let ssrc = u32::from_be_bytes([plain[4], plain[5], plain[6], plain[7]]);
        let mut out = Vec::with_capacity(plain.len() + SRTCP_INDEX_LEN + GCM_TAG_LEN);
        out.extend_from_slice(plain);
        match &self.rtcp {
            Cipher::Cm(k) => {
                let CmKeys { ctr, salt, auth } = &**k;
                let iv = Cipher::cm_iv(salt, ssrc, u64::from(index));
                let _ = ctr
                    .less_safe_encrypt(&mut out[RTCP_CLEAR..], EncryptionContext::Iv128(iv.into()));
                out.extend_from_slice(&e_index);
                let tag = hmac::sign(auth, &out);
                out.extend_from_slice(&tag.as_ref()[..CM_TAG_LEN]);
            }
            Cipher::Gcm { key, salt } => {
                let nonce = Cipher::gcm_nonce(salt, ssrc, index >> 16, index as u16);
                let mut aad = [0u8; RTCP_CLEAR + SRTCP_INDEX_LEN];
                aad[..RTCP_CLEAR].copy_from_slice(&plain[..RTCP_CLEAR]);
                aad[RTCP_CLEAR..].copy_from_slice(&e_index);
                let tag = key
                    .seal_in_place(&nonce, &aad, &mut out[RTCP_CLEAR..])
                    .ok_or(SrtpError::Rtcp)?;
                out.extend_from_slice(&tag);
                out.extend_from_slice(&e_index);
            }
        }
        Ok(out)
    }

    /// Opens an SRTCP packet sealed with this direction's keys (str0m's own, before the server re-seals
    /// it; a client's, with the client half): the plain compound packet.
    pub fn open_rtcp(&self, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
        match &self.rtcp {
            Cipher::Cm(k) => {
                let CmKeys { ctr, salt, auth } = &**k;
                let min = RTCP_CLEAR + SRTCP_INDEX_LEN + CM_TAG_LEN;
                if packet.len() < min {
                    return Err(SrtpError::Rtcp);
                }
                let (signed, tag) = packet.split_at(packet.len() - CM_TAG_LEN);
                let full = hmac::sign(auth, signed);
                if !constant_eq(&full.as_ref()[..CM_TAG_LEN], tag) {
                    return Err(SrtpError::Rtcp);
                }
                let (body, e_index) = signed.split_at(signed.len() - SRTCP_INDEX_LEN);
                let word = u32::from_be_bytes([e_index[0], e_index[1], e_index[2], e_index[3]]);
                let mut out = body.to_vec();
                if word & 0x8000_0000 != 0 {
                    let ssrc = u32::from_be_bytes([out[4], out[5], out[6], out[7]]);
                    let iv = Cipher::cm_iv(salt, ssrc, u64::from(word & 0x7fff_ffff));
                    ctr.less_safe_encrypt(
                        &mut out[RTCP_CLEAR..],
                        EncryptionContext::Iv128(iv.into()),
                    )
                    .map_err(|_| SrtpError::Rtcp)?;
                }
                Ok(out)
            }
            Cipher::Gcm { key, salt } => {
                let min = RTCP_CLEAR + GCM_TAG_LEN + SRTCP_INDEX_LEN;
                if packet.len() < min {
                    return Err(SrtpError::Rtcp);
                }
                let (sealed, e_index) = packet.split_at(packet.len() - SRTCP_INDEX_LEN);
                let word = u32::from_be_bytes([e_index[0], e_index[1], e_index[2], e_index[3]]);
                let index = word & 0x7fff_ffff;
                let ssrc = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                let nonce = Cipher::gcm_nonce(salt, ssrc, index >> 16, index as u16);
                if word & 0x8000_0000 == 0 {
                    // Authenticated only (RFC 7714 §9.3): everything before the tag is associated data.
                    let (body, tag) = sealed.split_at(sealed.len() - GCM_TAG_LEN);
                    let mut aad = body.to_vec();
                    aad.extend_from_slice(e_index);
                    let mut t = tag.to_vec();
                    key.open_in_place(&nonce, &aad, &mut t)
                        .ok_or(SrtpError::Rtcp)?;
                    return Ok(body.to_vec());
                }
                let mut aad = [0u8; RTCP_CLEAR + SRTCP_INDEX_LEN];
                aad[..RTCP_CLEAR].copy_from_slice(&packet[..RTCP_CLEAR]);
                aad[RTCP_CLEAR..].copy_from_slice(e_index);
                let mut out = sealed.to_vec();
                let plain_len = key
                    .open_in_place(&nonce, &aad, &mut out[RTCP_CLEAR..])
                    .ok_or(SrtpError::Rtcp)?
                    .len();
                out.truncate(RTCP_CLEAR + plain_len);
                Ok(out)
            }
        }
    }

    /// A context from session keys (RTP and RTCP alike), as the RFC 7714 vectors give them.
    #[cfg(test)]
    pub fn from_session_keys(profile: Profile, key: &[u8], salt: &[u8], auth: &[u8]) -> Self {
        SrtpContext {
            profile,
            rtp: Cipher::from_session(profile, key, salt, auth).expect("session keys"),
            rtcp: Cipher::from_session(profile, key, salt, auth).expect("session keys"),
            srtcp_index: 0,
        }
    }

    /// The SRTCP index the next sealed packet gets.
    pub fn srtcp_index(&self) -> u32 {
        self.srtcp_index
    }

    /// Sets the next SRTCP index (tests replay the RFC vectors with a mid-session index).
    #[cfg(test)]
    pub fn set_srtcp_index(&mut self, index: u32) {
        self.srtcp_index = index & 0x7fff_ffff;
    }
}

/// Compares two tags without an early exit.
fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[path = "srtp_tests.rs"]
mod tests;
