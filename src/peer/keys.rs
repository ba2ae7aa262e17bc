//! Capturing each peer's DTLS-SRTP keying material on its way to str0m.
//!
//! str0m exposes no SRTP keys, but its crypto provider is pluggable: [`capturing_provider`] wraps the
//! aws-lc-rs DTLS provider, and the DTLS instance it builds copies `DtlsOutput::KeyingMaterial` (and
//! whether it is the DTLS client) into the peer's [`KeySlot`] before str0m sees it. Should the instance
//! export material again (a new handshake), it goes into the next link of the slot's chain and the
//! peer re-keys its egress; a peer that joins again gets a new `Rtc`, a new slot and new keys anyway.
//!
//! The slot is write-once links (`OnceLock`), not a lock or an atomic counter: str0m wants the DTLS
//! instance `Send + Sync`, but it is written and read on its shard's thread only, and nothing of it is
//! shared between shards (tests/architecture.rs keeps locks and atomics out of the data plane).
//!
//! str0m builds the DTLS instance inside `RtcConfig::build`, on the calling thread, so the slot is handed
//! over through a thread-local set just around that call ([`build_with_slot`]): each `Rtc` gets its own
//! slot, and a `Rtc` built without one (a test's client sharing the provider) is not wrapped at all.
//!
//! The wrapped instances are dimpl's own, built from one configuration per process ([`shared_config`]):
//! str0m-aws-lc-rs builds a new `dimpl::Config` for every peer, and building one validates the crypto
//! provider — a key exchange round trip on each of X25519, P-256 and P-384, hash, HMAC and AEAD checks —
//! which made up most of a join's CPU on the shard (P-384 alone ≈ 20 % of a join storm's profile).

#![warn(missing_docs)]

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use str0m::config::{CryptoProvider, DtlsCert};
use str0m::crypto::dtls::{
    DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::CryptoError;
use str0m::{Rtc, RtcConfig};

use super::srtp::Profile;

/// Keying material exported by one completed DTLS handshake.
#[derive(Clone)]
pub struct Captured {
    /// The negotiated SRTP protection profile.
    pub profile: Profile,
    /// `client key | server key | client salt | server salt` (RFC 5764 §4.2).
    pub material: Vec<u8>,
    /// The local side was the DTLS client.
    pub active: bool,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captured")
            .field("profile", &self.profile)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Where one peer's DTLS instance leaves its keying material: a chain of write-once links, one per
/// export (in practice one: str0m runs a single handshake per `Rtc`).
#[derive(Default)]
pub struct KeySlot {
    captured: OnceLock<Captured>,
    next: OnceLock<Arc<KeySlot>>,
    /// The DTLS instance, left here when its `Rtc` is dropped: a settled peer keeps reading the
    /// client's alerts with it ([`super::settled`]). Set once, taken once, never per packet.
    left: OnceLock<dimpl::Dtls>,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySlot")
            .field("captured", &self.captured.get())
            .finish_non_exhaustive()
    }
}

impl KeySlot {
    /// The latest keying material and its generation (1 for the first handshake's), if any.
    pub fn latest(&self) -> Option<(u64, &Captured)> {
        let (mut slot, mut generation, mut found) = (self, 0, None);
        while let Some(c) = slot.captured.get() {
            generation += 1;
            found = Some((generation, c));
            match slot.next.get() {
                Some(next) => slot = next,
                None => break,
            }
        }
        found
    }

    /// The DTLS instance its `Rtc` left behind when it was dropped (once). `None` while the instance
    /// is alive: it holds the other reference to the slot, and taking needs the only one.
    pub fn take_dtls(slot: &mut Arc<KeySlot>) -> Option<dimpl::Dtls> {
        Arc::get_mut(slot)?.left.take()
    }

    fn store(&self, captured: Captured) {
        let (mut slot, mut captured) = (self, captured);
        while let Err(c) = slot.captured.set(captured) {
            captured = c;
            slot = slot.next.get_or_init(Default::default);
        }
    }
}

thread_local! {
    /// The slot the next DTLS instance built on this thread reports to (set only inside
    /// [`build_with_slot`]).
    static NEXT_SLOT: RefCell<Option<Arc<KeySlot>>> = const { RefCell::new(None) };
}

/// Builds an `Rtc` whose DTLS instance reports its keying material to `slot`. The config must carry
/// [`capturing_provider`] (otherwise nothing is captured).
pub fn build_with_slot(config: RtcConfig, now: Instant, slot: Arc<KeySlot>) -> Rtc {
    NEXT_SLOT.with(|s| *s.borrow_mut() = Some(slot));
    let rtc = config.build(now);
    NEXT_SLOT.with(|s| s.borrow_mut().take());
    rtc
}

/// The DTLS provider wrapper: the inner provider's instance, wrapped when a slot is waiting.
#[derive(Debug)]
struct CapturingDtlsProvider {
    inner: &'static dyn DtlsProvider,
}

impl DtlsProvider for CapturingDtlsProvider {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.inner.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let Some(slot) = NEXT_SLOT.with(|s| s.borrow_mut().take()) else {
            return self.inner.new_dtls(cert, now, dtls_version, mtu);
        };
        let config = shared_config(mtu)?;
        let cert = cert.clone();
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            other => {
                return Err(CryptoError::Other(format!(
                    "unsupported DTLS version: {other}"
                )))
            }
        };
        Ok(Box::new(CapturingDtls {
            inner: Some(dtls),
            slot,
        }))
    }

    fn is_test(&self) -> bool {
        self.inner.is_test()
    }
}

/// The DTLS configuration every server peer shares, for the MTU str0m asks for (it is the same for every
/// `Rtc` of the process; another one gets a configuration of its own, not cached). Built as
/// str0m-aws-lc-rs builds it: aws-lc-rs crypto, no server cookie (ICE has verified the return path
/// before DTLS starts).
fn shared_config(mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
    static SHARED: OnceLock<(Option<usize>, Arc<dimpl::Config>)> = OnceLock::new();
    if let Some((_, config)) = SHARED.get().filter(|(m, _)| *m == mtu) {
        return Ok(config.clone());
    }
    let mut builder = dimpl::Config::builder().use_server_cookie(false);
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    let config = builder
        .build()
        .map(Arc::new)
        .map_err(|e| CryptoError::Other(format!("DTLS configuration: {e}")))?;
    // The first configuration built is the one kept (a race between shards builds two, keeps one).
    let _ = SHARED.set((mtu, config.clone()));
    Ok(config)
}

/// One peer's DTLS instance: everything passes through; keying material is also copied to the slot,
/// and the instance itself is left there when str0m drops it. (`inner` is `None` only in `drop`.)
struct CapturingDtls {
    inner: Option<dimpl::Dtls>,
    slot: Arc<KeySlot>,
}

impl Drop for CapturingDtls {
    fn drop(&mut self) {
        if let Some(dtls) = self.inner.take() {
            let _ = self.slot.left.set(dtls);
        }
    }
}

impl CapturingDtls {
    fn dtls(&mut self) -> Result<&mut dimpl::Dtls, DtlsImplError> {
        self.inner.as_mut().ok_or(DtlsImplError::ConnectionClosed)
    }

    /// Reads a flag of the instance (false once it is gone, which only `drop` sees).
    fn flag(&self, f: impl Fn(&dimpl::Dtls) -> bool) -> bool {
        self.inner.as_ref().is_some_and(f)
    }
}

impl std::fmt::Debug for CapturingDtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturingDtls").finish_non_exhaustive()
    }
}

impl DtlsInstance for CapturingDtls {
    fn set_active(&mut self, active: bool) {
        if let Ok(d) = self.dtls() {
            d.set_active(active)
        }
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.dtls()?.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let Some(inner) = self.inner.as_mut() else {
            return DtlsOutput::Timeout(Instant::now() + std::time::Duration::from_secs(3600));
        };
        let active = inner.is_active();
        let out = inner.poll_output(buf);
        if let DtlsOutput::KeyingMaterial(km, profile) = &out {
            match Profile::from_str0m(*profile) {
                Some(profile) => self.slot.store(Captured {
                    profile,
                    material: km.to_vec(),
                    active,
                }),
                None => tracing::warn!(?profile, "DTLS negotiated an SRTP profile we cannot seal"),
            }
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.dtls()?.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.dtls()?.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.flag(|d| d.is_active())
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.as_ref().and_then(|d| d.protocol_version())
    }

    fn is_closing(&self) -> bool {
        self.flag(|d| d.is_closing())
    }

    fn is_closed(&self) -> bool {
        self.flag(|d| d.is_closed())
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.dtls()?.close()
    }
}

/// The compiled-in crypto provider (aws-lc-rs) with its DTLS provider wrapped. One per process: str0m
/// wants `&'static` providers.
pub fn capturing_provider() -> CryptoProvider {
    static DTLS: OnceLock<CapturingDtlsProvider> = OnceLock::new();
    let base = str0m::crypto::from_feature_flags();
    let dtls = DTLS.get_or_init(|| CapturingDtlsProvider {
        inner: base.dtls_provider,
    });
    CryptoProvider {
        dtls_provider: dtls,
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(b: u8) -> Captured {
        Captured {
            profile: Profile::AeadAes128Gcm,
            material: vec![b; 56],
            active: false,
        }
    }

    /// Each export of keying material is a new generation; the peer sees the latest.
    #[test]
    fn the_slot_keeps_the_latest_material_and_counts_generations() {
        let slot = KeySlot::default();
        assert!(slot.latest().is_none());
        slot.store(captured(1));
        assert_eq!(slot.latest().map(|(g, c)| (g, c.material[0])), Some((1, 1)));
        slot.store(captured(2));
        slot.store(captured(3));
        assert_eq!(slot.latest().map(|(g, c)| (g, c.material[0])), Some((3, 3)));
    }
}
