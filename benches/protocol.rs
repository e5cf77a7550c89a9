//! Micro-benchmarks of the per-message protocol work on the loop thread:
//! serial line → values (kv / JSON), values → reading body → Message, command parse.
//!
//! `cargo bench --bench protocol` (or `make bench`, which runs it in its quick mode).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use zgate::config::LineFormat;
use zgate::protocol::{self, Message};

const KV_LINE: &[u8] = b"temperature=21.5 humidity=40,pressure=1013.2 ok=true t=123456789012 n=42";
const JSON_LINE: &[u8] =
    br#"{"temperature":21.5,"humidity":40,"pressure":1013.2,"ok":true,"n":42}"#;
const COMMAND: &[u8] = br#"{"id":"c-000042","target":"relay1","action":"set","value":1}"#;

fn protocol_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("protocol");
    g.bench_function("parse_kv", |b| {
        b.iter(|| protocol::parse_line(LineFormat::Kv, black_box(KV_LINE)).unwrap())
    });
    g.bench_function("parse_json_line", |b| {
        b.iter(|| protocol::parse_line(LineFormat::Json, black_box(JSON_LINE)).unwrap())
    });
    let values = protocol::parse_line(LineFormat::Kv, KV_LINE).unwrap();
    g.bench_function("reading_encode", |b| {
        b.iter(|| {
            let body = protocol::reading_body(
                black_box("gw-01"),
                black_box(42),
                "weather",
                "2026-11-28T01:02:03.456Z",
                &values,
            );
            Message {
                kind: protocol::KIND_READING,
                body,
            }
        })
    });
    g.bench_function("now_rfc3339", |b| b.iter(protocol::now_rfc3339));
    // Everything the gateway does per serial line before the outbox.
    g.bench_function("line_to_message", |b| {
        b.iter(|| {
            let values = protocol::parse_line(LineFormat::Kv, black_box(KV_LINE)).unwrap();
            let body =
                protocol::reading_body("gw-01", 42, "weather", &protocol::now_rfc3339(), &values);
            Message {
                kind: protocol::KIND_READING,
                body,
            }
        })
    });
    g.bench_function("parse_command", |b| {
        b.iter(|| protocol::parse_command(black_box(COMMAND)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, protocol_benches);
criterion_main!(benches);
