//! What `lib.rs` and `shared/design.md` promise about the data plane's shape, checked on its sources:
//!
//! - a datagram's walk goes down the layers only (socket → classify → peer/member → floor check →
//!   rewrite → batch → socket): `forward` names no higher layer, `peer` neither `channel` nor `shard`,
//!   the sans-IO shard engine nothing of its I/O shell, `ids` and the timer heap nothing at all;
//! - shards share nothing and never block: no lock, no atomic, no `thread::sleep`, no `block_on` in the
//!   data plane.
//!
//! clippy's `disallowed-types` cannot be scoped to a folder (and the root `clippy.toml` is also the load
//! harness's, which rightly uses atomics and sleeps), so the data plane's rules live here.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every `.rs` file under `rel` (a file or a folder of the repository).
fn sources(rel: &str) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .map(|e| e.expect("directory entry").path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p.to_path_buf());
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(ROOT).join(rel), &mut out);
    assert!(!out.is_empty(), "no sources under {rel}");
    out
}

/// The file's code lines, without `//` comments (doc comments may name what the code must not use) and
/// without its tests (from the first `#[cfg(test)]` on: test modules come last).
fn code(path: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("").to_string()))
        .filter(|(_, l)| !l.trim().is_empty())
        .collect()
}

fn is_test_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name == "tests.rs" || name.ends_with("_tests.rs")
}

/// Fails with every line of `files` that contains one of `banned`.
fn assert_absent(files: &[PathBuf], banned: &[&str], why: &str) {
    let mut hits = Vec::new();
    for f in files {
        for (n, line) in code(f) {
            for b in banned {
                if line.contains(b) {
                    hits.push(format!("{}:{n}: `{b}`", f.display()));
                }
            }
        }
    }
    assert!(hits.is_empty(), "{why}:\n{}", hits.join("\n"));
}

/// The data plane, tests excluded (a test may sleep or look anywhere).
fn data_plane() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for rel in [
        "src/channel.rs",
        "src/forward.rs",
        "src/relay.rs",
        "src/ids.rs",
        "src/peer",
        "src/shard",
        "crates/rtpio/src",
    ] {
        files.extend(sources(rel));
    }
    // `rtpio::testing` (a file and its folder: the fault proxy, the replicated topologies) is test
    // support, not data plane.
    files.retain(|p| {
        !is_test_file(p)
            && !p.ends_with("testing.rs")
            && !p.components().any(|c| c.as_os_str() == "testing")
    });
    files
}

#[test]
fn the_data_plane_shares_nothing_and_never_blocks() {
    assert_absent(
        &data_plane(),
        &[
            "Mutex",
            "RwLock",
            "atomic::",
            "Atomic",
            "thread::sleep",
            "block_on",
        ],
        "shards share nothing (values over bounded channels) and never block their executor",
    );
}

#[test]
fn a_datagram_walks_down_the_layers_only() {
    let non_test = |rel: &str| -> Vec<PathBuf> {
        sources(rel)
            .into_iter()
            .filter(|p| !is_test_file(p))
            .collect()
    };
    assert_absent(
        &non_test("src/ids.rs"),
        &["crate::", "super::"],
        "ids is the leaf every layer shares",
    );
    assert_absent(
        &non_test("src/shard/timers.rs"),
        &["crate::", "super::"],
        "the timer heap is generic: it knows nothing of what it times",
    );
    assert_absent(
        &non_test("src/forward.rs"),
        &[
            "crate::peer",
            "crate::channel",
            "crate::shard",
            "crate::relay",
        ],
        "forward (the rewrite) is below peer, channel and shard",
    );
    assert_absent(
        &non_test("src/channel.rs"),
        &["crate::peer", "crate::shard"],
        "channel (the floor check) is below peer lookup and the shard",
    );
    assert_absent(
        &non_test("src/peer"),
        &["crate::channel", "crate::shard"],
        "peer is below channel and the shard",
    );
    // The sans-IO engine may use its siblings (command, stats, timers) but nothing of the I/O shell in
    // `shard/mod.rs`, not even its re-exports.
    let engine = non_test("src/shard/engine.rs")
        .into_iter()
        .chain(non_test("src/shard/engine"))
        .collect::<Vec<_>>();
    let mut hits = Vec::new();
    for f in &engine {
        let top = f.ends_with("engine.rs");
        for (n, line) in code(f) {
            for (at, _) in line.match_indices("crate::shard::") {
                let rest = &line[at + "crate::shard::".len()..];
                if !["command", "stats", "timers", "engine"]
                    .iter()
                    .any(|m| rest.starts_with(m))
                {
                    hits.push(format!("{}:{n}: {}", f.display(), line.trim()));
                }
            }
            // In engine.rs, `super` is the shell.
            if top {
                for (at, _) in line.match_indices("super::") {
                    let rest = &line[at + "super::".len()..];
                    let ok = ["command", "stats", "timers"]
                        .iter()
                        .any(|m| rest.starts_with(m));
                    if !ok {
                        hits.push(format!("{}:{n}: {}", f.display(), line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        hits.is_empty(),
        "the shard engine must not import its I/O shell:\n{}",
        hits.join("\n")
    );
}
