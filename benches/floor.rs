//! Floor press/release cycles through the sans-IO machine with an instantly answering store and shard:
//! the control-plane cost of one grant and one release, without network round trips.
//!
//! Run: `cargo bench --bench floor`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use talkgroup::floor::{Floor, FloorConfig, Input, Output};
use talkgroup::state::memory::MemoryFloorStore;
use talkgroup::state::{AcquireRequest, Acquired, FloorStore};

fn drain(floor: &mut Floor, store: &MemoryFloorStore, now: Instant) -> usize {
    let mut n = 0;
    while let Some(out) = floor.poll_output() {
        n += 1;
        match out {
            Output::Acquire {
                member,
                priority,
                emergency: false,
            } => {
                let req = AcquireRequest {
                    channel: "c".into(),
                    member: member.clone(),
                    priority,
                    ttl: Duration::from_secs(60),
                    emergency: false,
                };
                let fut = store.acquire(req);
                // The memory store answers without awaiting anything.
                let answer = futures_util::FutureExt::now_or_never(fut).and_then(Result::ok);
                if let Some(Acquired::Granted { epoch }) = answer {
                    floor.handle(Input::StoreGranted { member, epoch }, now);
                }
            }
            Output::Apply {
                speaker: Some(_),
                epoch,
                ..
            } => floor.handle(Input::ShardApplied { epoch }, now),
            Output::Release { epoch } => {
                let _ = futures_util::FutureExt::now_or_never(store.release("c", epoch));
                floor.handle(Input::StoreReleased { epoch }, now);
            }
            _ => {}
        }
    }
    n
}

fn press_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor");
    g.throughput(Throughput::Elements(1));
    let store = MemoryFloorStore::new("bench");
    let mut floor = Floor::new(FloorConfig::default());
    // What is timed must be a grant and a release, not a denial: one cycle is checked first.
    let now = Instant::now();
    let request = Input::Request {
        member: "alice".into(),
        priority: 0,
        queue: false,
    };
    floor.handle(request, now);
    drain(&mut floor, &store, now);
    assert_eq!(floor.speaker(), Some("alice"), "a press is granted");
    let epoch = floor.epoch();
    floor.handle(
        Input::Release {
            member: "alice".into(),
        },
        now,
    );
    drain(&mut floor, &store, now);
    assert_eq!(floor.speaker(), None, "a release frees the floor");
    g.bench_function("press_release_cycle", |b| {
        b.iter(|| {
            let now = Instant::now();
            floor.handle(
                Input::Request {
                    member: "alice".into(),
                    priority: 0,
                    queue: false,
                },
                now,
            );
            let a = drain(&mut floor, &store, now);
            floor.handle(
                Input::Release {
                    member: "alice".into(),
                },
                now,
            );
            black_box(a + drain(&mut floor, &store, now))
        })
    });
    assert!(
        floor.epoch() > epoch,
        "every timed cycle granted a newer epoch"
    );
    g.bench_function("denied_busy", |b| {
        let now = Instant::now();
        floor.handle(
            Input::Request {
                member: "alice".into(),
                priority: 0,
                queue: false,
            },
            now,
        );
        drain(&mut floor, &store, now);
        assert_eq!(
            floor.speaker(),
            Some("alice"),
            "alice holds: bob is denied busy"
        );
        b.iter(|| {
            floor.handle(
                Input::Request {
                    member: "bob".into(),
                    priority: 0,
                    queue: false,
                },
                now,
            );
            black_box(drain(&mut floor, &store, now))
        })
    });
    g.finish();
}

criterion_group!(benches, press_release);
criterion_main!(benches);
