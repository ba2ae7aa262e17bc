//! Member tokens (protocol v1.1 "Identity: signed tokens"): a JWT whose `sub` is the member name and
//! whose `tg` claim says which channels it may join and what it may do there.
//!
//! Verification runs on the control thread at join, never on the packet path. The signature and the
//! algorithm are checked by `jsonwebtoken`; the times (`exp`, `nbf`) are checked here against the time the
//! control core is given, so the rules are testable in virtual time and a token cannot pass because the
//! crate read a different clock. Every failure names what was wrong: the client sees it in
//! `error.message`.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Clock leeway on `exp` and `nbf` (protocol: at most 30 s).
pub const LEEWAY_S: u64 = 30;

/// The `tg` claim: what the token allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rights {
    /// Channel names, or prefixes ending in `*` (`"fire-*"`).
    #[serde(default)]
    pub channels: Vec<String>,
    /// May receive the channel's audio.
    #[serde(default = "yes")]
    pub listen: bool,
    /// May press to talk.
    #[serde(default = "yes")]
    pub talk: bool,
    /// Highest floor priority; a join asking more gets this.
    #[serde(default)]
    pub max_priority: u8,
    /// May press with `"emergency": true`.
    #[serde(default)]
    pub emergency: bool,
    /// May use `/api/*` and `/metrics`.
    #[serde(default)]
    pub admin: bool,
}

fn yes() -> bool {
    true
}

impl Default for Rights {
    fn default() -> Self {
        Rights {
            channels: Vec::new(),
            listen: true,
            talk: true,
            max_priority: 0,
            emergency: false,
            admin: false,
        }
    }
}

impl Rights {
    /// Whether `channel` is one of the token's channels (exactly, or under a `prefix*`).
    pub fn allows(&self, channel: &str) -> bool {
        self.channels.iter().any(|c| match c.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => c == channel,
        })
    }

    /// Everything allowed: the rights of a member on a server that runs open.
    pub fn open() -> Self {
        Rights {
            channels: vec!["*".into()],
            max_priority: u8::MAX,
            emergency: true,
            admin: true,
            ..Rights::default()
        }
    }
}

/// The claims of a member token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The member name.
    pub sub: String,
    /// Expiry, Unix seconds (required).
    pub exp: Option<u64>,
    /// Not valid before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// What the token allows.
    #[serde(default)]
    pub tg: Rights,
}

/// Why a token was refused (`error` `unauthorized`, with this as the message).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    /// No token on a server that checks them.
    #[error("this server checks signed tokens: the join needs \"token\"")]
    Missing,
    /// Not a JWT, or claims of the wrong shape.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// No configured key has the token's `kid`.
    #[error("the token's key id {0:?} is not a key this server trusts")]
    UnknownKey(String),
    /// The key for this `kid` uses another algorithm (algorithm confusion is refused).
    #[error("the token is signed with {got:?} but key {kid:?} is {want:?}")]
    WrongAlgorithm {
        /// The key id.
        kid: String,
        /// The token's algorithm.
        got: Algorithm,
        /// The key's algorithm.
        want: Algorithm,
    },
    /// The signature does not verify: forged, or signed with another key.
    #[error("the token's signature does not verify (forged, or signed with another key)")]
    BadSignature,
    /// No `exp` claim.
    #[error("the token has no exp (expiry) claim")]
    NoExpiry,
    /// Past `exp` (plus leeway).
    #[error("the token expired at {exp} (Unix seconds; now {now})")]
    Expired {
        /// The `exp` claim.
        exp: u64,
        /// The server's time.
        now: u64,
    },
    /// Before `nbf` (less leeway).
    #[error("the token is not valid before {nbf} (Unix seconds; now {now})")]
    NotYetValid {
        /// The `nbf` claim.
        nbf: u64,
        /// The server's time.
        now: u64,
    },
    /// `sub` is not a valid member name.
    #[error("the token's sub {0:?} is not a valid member name")]
    BadSubject(String),
    /// The join names another member than the token's `sub`.
    #[error("member {member:?} differs from the token's sub {sub:?}")]
    WrongMember {
        /// The join's `member`.
        member: String,
        /// The token's `sub`.
        sub: String,
    },
    /// The token does not list the channel.
    #[error("the token does not grant channel {0:?}")]
    WrongChannel(String),
}

impl TokenError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed(_) => "malformed",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::WrongAlgorithm { .. } => "wrong_algorithm",
            TokenError::BadSignature => "bad_signature",
            TokenError::NoExpiry => "no_expiry",
            TokenError::Expired { .. } => "expired",
            TokenError::NotYetValid { .. } => "not_yet_valid",
            TokenError::BadSubject(_) => "bad_subject",
            TokenError::WrongMember { .. } => "wrong_member",
            TokenError::WrongChannel(_) => "wrong_channel",
        }
    }
}

/// One key a token may be verified with.
#[derive(Clone)]
pub struct VerifyKey {
    /// `None`: the key of `--auth-key`, which verifies a token whatever its `kid`.
    pub kid: Option<String>,
    /// The algorithm this key verifies.
    pub alg: Algorithm,
    /// The secret or public key.
    pub key: DecodingKey,
}

/// The keys the server trusts, and the checks of a token against them.
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<Vec<VerifyKey>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| (&k.kid, k.alg)).collect();
        f.debug_struct("Verifier").field("keys", &kids).finish()
    }
}

impl Verifier {
    /// A verifier trusting `keys`.
    pub fn new(keys: Vec<VerifyKey>) -> Self {
        Verifier {
            keys: Arc::new(keys),
        }
    }

    /// Verifies `token` at `now` (Unix seconds): signature, algorithm, `exp`, `nbf`, and `sub` as a name.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Malformed(describe(e.kind())))?;
        let kid = header.kid.clone().unwrap_or_default();
        let key = self
            .keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid.as_str()))
            .or_else(|| self.keys.iter().find(|k| k.kid.is_none()))
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        if header.alg != key.alg {
            return Err(TokenError::WrongAlgorithm {
                kid,
                got: header.alg,
                want: key.alg,
            });
        }
        let mut validation = Validation::new(key.alg);
        // Times are checked below against the core's clock, not the crate's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    other => TokenError::Malformed(describe(other)),
                }
            })?;
        let claims = data.claims;
        let exp = claims.exp.ok_or(TokenError::NoExpiry)?;
        if exp.saturating_add(LEEWAY_S) < now {
            return Err(TokenError::Expired { exp, now });
        }
        if let Some(nbf) = claims.nbf {
            if nbf > now.saturating_add(LEEWAY_S) {
                return Err(TokenError::NotYetValid { nbf, now });
            }
        }
        if crate::signal::protocol::validate_name("member", &claims.sub).is_err() {
            return Err(TokenError::BadSubject(claims.sub));
        }
        Ok(claims)
    }
}

/// A short description of a decoding failure, for the client.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidToken => "not a JWT (three base64url parts)".into(),
        ErrorKind::Base64(e) => format!("bad base64: {e}"),
        ErrorKind::Json(e) => format!("bad JSON: {e}"),
        ErrorKind::Utf8(e) => format!("not UTF-8: {e}"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "unsupported algorithm".into()
        }
        other => format!("{other:?}"),
    }
}
