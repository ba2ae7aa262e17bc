//! The keys the server trusts, from `--auth-key SECRET` (one HS256 shared secret, any `kid`) and
//! `--auth-keys-file PATH` (several keys by `kid`, for rotation), and minting tokens with them
//! (`talkgroup token`, as LiveKit's `lk token create`).
//!
//! The keys file is TOML, one `[[key]]` table per key:
//!
//! ```toml
//! [[key]]
//! kid = "2026-11"          # the JWT header's kid
//! alg = "HS256"            # HS256 | EdDSA | ES256 | RS256
//! secret = "…"             # HS256: the shared secret
//!
//! [[key]]
//! kid = "ed-1"
//! alg = "EdDSA"
//! public_key = """
//! -----BEGIN PUBLIC KEY-----
//! …
//! -----END PUBLIC KEY-----
//! """                      # or public_key_file = "ed-1.pub.pem" (relative to this file)
//! private_key_file = "ed-1.pem"  # optional: lets `talkgroup token --kid ed-1` sign
//! ```
//!
//! Rotation: add the new key, start issuing tokens with it, and remove the old one once its tokens have
//! expired; both verify meanwhile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::Deserialize;
use thiserror::Error;

use super::token::{Claims, Rights, Verifier, VerifyKey};

/// Why the keys could not be loaded, or a token minted.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The keys file could not be read.
    #[error("cannot read the keys file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The keys file is not valid TOML of the expected shape.
    #[error("the keys file {path} is invalid: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What was wrong (with the line, from the TOML parser).
        message: String,
    },
    /// A key entry is unusable.
    #[error("key {kid:?}: {message}")]
    Key {
        /// The key id.
        kid: String,
        /// What was wrong.
        message: String,
    },
    /// `talkgroup token` found no key it can sign with.
    #[error("{0}")]
    NoSigner(String),
    /// Signing failed.
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    kid: String,
    alg: String,
    secret: Option<String>,
    public_key: Option<String>,
    public_key_file: Option<PathBuf>,
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
}

/// A key tokens can be signed with.
pub struct SigningKey {
    /// Put in the header (`None` for the `--auth-key` secret).
    pub kid: Option<String>,
    /// The algorithm.
    pub alg: Algorithm,
    /// The secret or private key.
    pub key: EncodingKey,
}

/// Everything loaded: the verifier, and the keys that can also sign.
pub struct KeySet {
    /// Checks member tokens.
    pub verifier: Verifier,
    /// Keys `talkgroup token` can sign with.
    pub signers: Vec<SigningKey>,
}

/// Loads the configured keys; `None` when neither option is given (the server runs open).
pub fn load(auth_key: Option<&str>, keys_file: Option<&Path>) -> Result<Option<KeySet>, KeyError> {
    let mut verify = Vec::new();
    let mut signers = Vec::new();
    if let Some(secret) = auth_key.filter(|s| !s.is_empty()) {
        verify.push(VerifyKey {
            kid: None,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret.as_bytes()),
        });
        signers.push(SigningKey {
            kid: None,
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret.as_bytes()),
        });
    }
    if let Some(path) = keys_file {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: KeysFile = toml::from_str(&text).map_err(|e| KeyError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for entry in file.key {
            let (v, s) = entry.load(dir)?;
            verify.push(v);
            signers.extend(s);
        }
    }
    if verify.is_empty() {
        return Ok(None);
    }
    Ok(Some(KeySet {
        verifier: Verifier::new(verify),
        signers,
    }))
}

impl KeyEntry {
    fn load(self, dir: &Path) -> Result<(VerifyKey, Option<SigningKey>), KeyError> {
        let kid = self.kid.clone();
        let bad = |message: String| KeyError::Key {
            kid: kid.clone(),
            message,
        };
        let alg = match self.alg.as_str() {
            "HS256" => Algorithm::HS256,
            "EdDSA" => Algorithm::EdDSA,
            "ES256" => Algorithm::ES256,
            "RS256" => Algorithm::RS256,
            other => {
                return Err(bad(format!(
                    "alg {other:?} is not HS256, EdDSA, ES256 or RS256"
                )))
            }
        };
        if alg == Algorithm::HS256 {
            let secret = self
                .secret
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("HS256 needs `secret`".into()))?;
            let verify = VerifyKey {
                kid: Some(self.kid.clone()),
                alg,
                key: DecodingKey::from_secret(secret.as_bytes()),
            };
            let sign = SigningKey {
                kid: Some(self.kid),
                alg,
                key: EncodingKey::from_secret(secret.as_bytes()),
            };
            return Ok((verify, Some(sign)));
        }
        let read = |inline: Option<String>, file: Option<PathBuf>, what: &str| match (inline, file)
        {
            (Some(pem), _) => Ok(Some(pem)),
            (None, Some(f)) => std::fs::read_to_string(dir.join(&f))
                .map(Some)
                .map_err(|e| bad(format!("cannot read {what} file {}: {e}", f.display()))),
            (None, None) => Ok(None),
        };
        let public = read(self.public_key, self.public_key_file, "public key")?
            .ok_or_else(|| bad(format!("{alg:?} needs `public_key` or `public_key_file`")))?;
        let key = match alg {
            Algorithm::EdDSA => DecodingKey::from_ed_pem(public.as_bytes()),
            Algorithm::ES256 => DecodingKey::from_ec_pem(public.as_bytes()),
            _ => DecodingKey::from_rsa_pem(public.as_bytes()),
        }
        .map_err(|e| bad(format!("bad public key PEM: {e}")))?;
        let verify = VerifyKey {
            kid: Some(self.kid.clone()),
            alg,
            key,
        };
        let sign = match read(self.private_key, self.private_key_file, "private key")? {
            None => None,
            Some(pem) => {
                let key = match alg {
                    Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()),
                    Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
                    _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
                }
                .map_err(|e| bad(format!("bad private key PEM: {e}")))?;
                Some(SigningKey {
                    kid: Some(self.kid),
                    alg,
                    key,
                })
            }
        };
        Ok((verify, sign))
    }
}

/// Signs `claims` with `key`.
pub fn mint(claims: &Claims, key: &SigningKey) -> Result<String, KeyError> {
    let mut header = Header::new(key.alg);
    header.kid = key.kid.clone();
    jsonwebtoken::encode(&header, claims, &key.key).map_err(|e| KeyError::Sign(e.to_string()))
}

/// Claims for `sub`, valid from `now` (Unix seconds) for `ttl`.
pub fn claims(sub: &str, rights: Rights, now: u64, ttl: Duration) -> Claims {
    Claims {
        sub: sub.to_string(),
        exp: Some(now.saturating_add(ttl.as_secs())),
        nbf: None,
        iat: Some(now),
        tg: rights,
    }
}

impl KeySet {
    /// The key to sign with: the one named by `kid`, or the only (or `--auth-key`) one.
    pub fn signer(&self, kid: Option<&str>) -> Result<&SigningKey, KeyError> {
        match kid {
            Some(kid) => self
                .signers
                .iter()
                .find(|s| s.kid.as_deref() == Some(kid))
                .ok_or_else(|| {
                    KeyError::NoSigner(format!(
                        "no key {kid:?} that can sign (HS256 secret or a private key)"
                    ))
                }),
            None => match self.signers.as_slice() {
                [one] => Ok(one),
                [] => Err(KeyError::NoSigner(
                    "no configured key can sign: give --auth-key, or a key with a secret or \
                     private key in --auth-keys-file"
                        .into(),
                )),
                many => many.iter().find(|s| s.kid.is_none()).ok_or_else(|| {
                    KeyError::NoSigner("several keys can sign: choose one with --kid".into())
                }),
            },
        }
    }
}
