//! An AES-GCM key (RFC 7714's AEAD_AES_128_GCM and AEAD_AES_256_GCM) whose aws-lc context the shard can
//! see, so that the fan-out can prefetch it.
//!
//! aws-lc-rs keeps every key's context (the AES key schedule and the GHASH table, ≈ 580 octets) behind
//! a private heap pointer. A listener's key is read once per 20 ms packet, after a whole batch of other
//! listeners and the kernel's send path have been through the cache, so the first load of each context
//! was a miss the fan-out waited for: `EVP_AEAD_CTX_seal_scatter`'s own first instructions were the
//! hottest user-space symbol of the WebRTC shard. Holding the same aws-lc context ourselves (same
//! library, same `EVP_AEAD_CTX_seal_scatter` and `EVP_AEAD_CTX_open` that aws-lc-rs calls) lets
//! [`GcmKey::prefetch`] start those loads a few listeners ahead.

#![warn(missing_docs)]

use std::ptr::NonNull;

use aws_lc_sys::{
    EVP_AEAD_CTX_free, EVP_AEAD_CTX_new, EVP_AEAD_CTX_open, EVP_AEAD_CTX_seal_scatter,
    EVP_aead_aes_128_gcm, EVP_aead_aes_256_gcm, EVP_AEAD_CTX,
};

/// Octets of a GCM tag (RFC 7714 §5.2.2: 16).
pub const TAG_LEN: usize = 16;
/// Octets of a GCM nonce (RFC 7714 §8.1: 12).
pub const NONCE_LEN: usize = 12;

/// An AES-128-GCM or AES-256-GCM key (by the key's length), with 16-octet tags.
pub struct GcmKey {
    /// Owned: made by `EVP_AEAD_CTX_new`, freed once in `drop`, never handed out.
    ctx: NonNull<EVP_AEAD_CTX>,
}

// SAFETY: the context is plain memory owned by this value alone; aws-lc's seal and open only read it
// (they take `const EVP_AEAD_CTX *`), so using it from any thread, or from several at once, is sound.
unsafe impl Send for GcmKey {}
// SAFETY: as above — `&GcmKey` only reaches aws-lc functions that read the context.
unsafe impl Sync for GcmKey {}

impl std::fmt::Debug for GcmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GcmKey")
    }
}

impl GcmKey {
    /// A key from 16 (AES-128) or 32 (AES-256) octets; `None` for any other length or when aws-lc
    /// cannot allocate the context.
    pub fn new(key: &[u8]) -> Option<Self> {
        // SAFETY: the algorithm getters return pointers to static tables.
        let aead = unsafe {
            match key.len() {
                16 => EVP_aead_aes_128_gcm(),
                32 => EVP_aead_aes_256_gcm(),
                _ => return None,
            }
        };
        // SAFETY: `key` is valid for `key.len()` octets; aws-lc copies it into the new context.
        let ctx = unsafe { EVP_AEAD_CTX_new(aead, key.as_ptr(), key.len(), TAG_LEN) };
        NonNull::new(ctx).map(|ctx| GcmKey { ctx })
    }

    /// Encrypts `in_out` in place and returns the tag over `aad` and the ciphertext. `None` only for
    /// inputs beyond GCM's limits (2^36 octets), which no datagram reaches.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let mut tag = [0u8; TAG_LEN];
        let mut tag_len = 0usize;
        // SAFETY: every pointer is valid for the length given with it; `out` aliases `in` exactly,
        // which aws-lc allows; no extra input is passed (null, 0).
        let ok = unsafe {
            EVP_AEAD_CTX_seal_scatter(
                self.ctx.as_ptr(),
                in_out.as_mut_ptr(),
                tag.as_mut_ptr(),
                &mut tag_len,
                TAG_LEN,
                nonce.as_ptr(),
                NONCE_LEN,
                in_out.as_ptr(),
                in_out.len(),
                std::ptr::null(),
                0,
                aad.as_ptr(),
                aad.len(),
            )
        };
        (ok == 1 && tag_len == TAG_LEN).then_some(tag)
    }

    /// Authenticates and decrypts `in_out` (ciphertext followed by its tag) in place: the plaintext, the
    /// first `in_out.len() - 16` octets, or `None` when the tag does not match (the plaintext is then
    /// not to be used; aws-lc clears it).
    pub fn open_in_place<'a>(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Option<&'a mut [u8]> {
        if in_out.len() < TAG_LEN {
            return None;
        }
        let mut out_len = 0usize;
        // SAFETY: `in_out` is valid for its length as input and as output (they alias exactly, which
        // aws-lc allows; the plaintext is never longer than the input); nonce and aad likewise.
        let ok = unsafe {
            EVP_AEAD_CTX_open(
                self.ctx.as_ptr(),
                in_out.as_mut_ptr(),
                &mut out_len,
                in_out.len(),
                nonce.as_ptr(),
                NONCE_LEN,
                in_out.as_ptr(),
                in_out.len(),
                aad.as_ptr(),
                aad.len(),
            )
        };
        (ok == 1 && out_len + TAG_LEN == in_out.len()).then(|| &mut in_out[..out_len])
    }

    /// Starts loading the context into the cache (a hint: it never faults and changes nothing), so that
    /// a seal a few packets later does not wait for memory.
    #[inline]
    pub fn prefetch(&self) {
        prefetch_lines(
            self.ctx.as_ptr().cast::<u8>(),
            std::mem::size_of::<EVP_AEAD_CTX>(),
        );
    }
}

impl Drop for GcmKey {
    fn drop(&mut self) {
        // SAFETY: made by `EVP_AEAD_CTX_new`, owned by this value alone, freed only here.
        unsafe { EVP_AEAD_CTX_free(self.ctx.as_ptr()) }
    }
}

/// Prefetches every cache line of `len` octets from `start` (a hint: addresses are not dereferenced).
#[inline]
pub fn prefetch_lines(start: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let first = start as usize & !63;
        let end = start as usize + len;
        let mut line = first;
        while line < end {
            // SAFETY: a prefetch is a hint; it neither faults nor reads into the program.
            unsafe { _mm_prefetch(line as *const i8, _MM_HINT_T0) };
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};

    /// Sealed here and by aws-lc-rs for the same key, nonce and data: byte for byte the same, and
    /// each opens the other's.
    #[test]
    fn seals_and_opens_like_aws_lc_rs() {
        for (alg, len) in [(&AES_128_GCM, 16), (&AES_256_GCM, 32)] {
            let key: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            let ours = GcmKey::new(&key).expect("key");
            let theirs = LessSafeKey::new(UnboundKey::new(alg, &key).expect("key"));
            for n in [0usize, 1, 15, 16, 17, 60, 160, 1200] {
                let nonce = [n as u8; NONCE_LEN];
                let aad = [0xa5u8; 12];
                let plain: Vec<u8> = (0..n).map(|i| i as u8).collect();
                let mut a = plain.clone();
                let tag = ours.seal_in_place(&nonce, &aad, &mut a).expect("seal");
                let mut b = plain.clone();
                let t2 = theirs
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut b,
                    )
                    .expect("seal");
                assert_eq!(
                    (&a, &tag[..]),
                    (&b, t2.as_ref()),
                    "{len}-octet key, {n} octets"
                );
                b.extend_from_slice(t2.as_ref());
                assert_eq!(
                    ours.open_in_place(&nonce, &aad, &mut b),
                    Some(&mut plain.clone()[..])
                );
                a.extend_from_slice(&tag);
                let opened = theirs
                    .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut a)
                    .expect("open");
                assert_eq!(opened, &plain[..]);
            }
        }
    }

    #[test]
    fn a_wrong_tag_aad_or_key_length_is_refused() {
        assert!(GcmKey::new(&[0u8; 24]).is_none());
        assert!(GcmKey::new(&[]).is_none());
        let key = GcmKey::new(&[7u8; 16]).expect("key");
        let nonce = [1u8; NONCE_LEN];
        let mut sealed = b"opus frame".to_vec();
        let tag = key
            .seal_in_place(&nonce, b"hdr", &mut sealed)
            .expect("seal");
        sealed.extend_from_slice(&tag);
        let mut bad_tag = sealed.clone();
        *bad_tag.last_mut().expect("tag") ^= 1;
        assert!(key.open_in_place(&nonce, b"hdr", &mut bad_tag).is_none());
        let mut other = sealed.clone();
        assert!(key.open_in_place(&nonce, b"HDR", &mut other).is_none());
        assert!(key.open_in_place(&nonce, b"hdr", &mut [0u8; 15]).is_none());
        assert_eq!(
            key.open_in_place(&nonce, b"hdr", &mut sealed)
                .map(|p| p.to_vec()),
            Some(b"opus frame".to_vec())
        );
    }
}
