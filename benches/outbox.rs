//! Benchmark 1 as a criterion micro-benchmark: 10,000 readings through `ZmqSource` (calloop
//! loop, bounded outbox) vs a plain libzmq loop, both to a ROUTER peer on tcp loopback in the
//! same process layout. The end-to-end harness (`bench_e2e`) reports the ratio of the two.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;

#[path = "e2e/outbox.rs"]
mod outbox;

const N: usize = 10_000;

fn outbox_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("outbox_10k");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.bench_function("zmq_source", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| outbox::zmq_source(N)).sum::<Duration>())
    });
    g.bench_function("plain_libzmq", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| outbox::plain(N)).sum::<Duration>())
    });
    g.finish();
}

criterion_group!(benches, outbox_benches);
criterion_main!(benches);
