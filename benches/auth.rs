//! What a token costs a join: verifying a member's JWT (signature, algorithm, `exp`/`nbf`, `sub`), the
//! only work tokens add to a join (the rights are then compared as plain values). HS256 (`--auth-key`)
//! and EdDSA / ES256 public keys (`--auth-keys-file`); the asymmetric key pairs are made by `openssl`
//! for the run, which the bench says it needs when it is missing.
//!
//! `cargo bench --bench auth`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use talkgroup::auth::keys::{self, KeySet};
use talkgroup::auth::Rights;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Runs `openssl` with `args` in `dir`; panics with what to install when it is missing.
fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .status()
        .expect("this bench makes its EdDSA/ES256 keys with openssl: apt-get install openssl");
    assert!(status.success(), "openssl {args:?} failed");
}

/// A keys file with an HS256 secret and EdDSA and ES256 key pairs.
fn key_set(dir: &Path) -> KeySet {
    openssl(dir, &["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]);
    openssl(
        dir,
        &["pkey", "-in", "ed.pem", "-pubout", "-out", "ed.pub.pem"],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ],
    );
    openssl(
        dir,
        &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"],
    );
    let file = dir.join("keys.toml");
    std::fs::write(
        &file,
        "[[key]]\nkid = \"hs\"\nalg = \"HS256\"\nsecret = \"bench-secret-bench-secret\"\n\n\
         [[key]]\nkid = \"ed\"\nalg = \"EdDSA\"\npublic_key_file = \"ed.pub.pem\"\nprivate_key_file = \"ed.pem\"\n\n\
         [[key]]\nkid = \"ec\"\nalg = \"ES256\"\npublic_key_file = \"ec.pub.pem\"\nprivate_key_file = \"ec.pem\"\n",
    )
    .expect("write the keys file");
    keys::load(None, Some(&file))
        .expect("keys load")
        .expect("keys configured")
}

fn verify(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let set = key_set(dir.path());
    let rights = Rights {
        channels: vec!["ops-*".into()],
        ..Rights::default()
    };
    let mut group = c.benchmark_group("token_verify");
    for kid in ["hs", "ed", "ec"] {
        let signer = set.signer(Some(kid)).expect("signer");
        let claims = keys::claims("alice", rights.clone(), now(), Duration::from_secs(3600));
        let token = keys::mint(&claims, signer).expect("mint");
        let t = now();
        assert!(set.verifier.verify(&token, t).is_ok(), "{kid}: verifies");
        group.bench_function(kid, |b| {
            b.iter(|| set.verifier.verify(std::hint::black_box(&token), t))
        });
    }
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
