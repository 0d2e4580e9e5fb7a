//! Streaming-replica benchmarks, against the real release binary on loopback:
//!
//! 1. commit on the primary → visible to a reader holding one connection open on the replica
//!    (p50, p99, max) at 100 and 1,000 transactions/s;
//! 2. the highest sustained rate the replica keeps up with: the writer commits as fast as it can
//!    (small rows, then 64 KiB rows) and the replica's apply rate is measured from the first
//!    commit to the moment the last one is visible;
//! 3. with `REPLITED_PEER_BIN` set to a build of another replited (github.com/mrchypark/replited,
//!    built by hand — this repository never builds it), the same 100 tx/s workload against its
//!    stream replication in the same run, and the ratio of the lags.
//!
//! `cargo bench --bench stream` runs the full sizes; `cargo bench -- --test` a tiny version.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use common::{lag, Pair, Reader};

/// Commits as fast as possible; the replica's sustained rate is n / (last visible − first
/// commit).
fn throughput(pair: &Pair, n: usize, payload: usize) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let l = lag(pair, 0, n, payload, Reader::Open);
    // lag() returns when the last row is visible (or gave up).
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(l.seen, n, "the replica did not keep up at all");
    let tps = n as f64 / secs;
    (tps, tps * payload as f64 / 1e6, l.max)
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (rates, secs, small, big): (&[u32], f64, usize, usize) = if test {
        (&[200], 0.25, 200, 20)
    } else {
        (&[100, 1000], 10.0, 20_000, 2_000)
    };
    // REPLITED_BENCH=peer runs only the side-by-side comparison.
    let only_peer = std::env::var("REPLITED_BENCH").is_ok_and(|b| b == "peer");
    if !only_peer {
        ours_tables(rates, secs, small, big);
    }
    if let Ok(peer) = std::env::var("REPLITED_PEER_BIN") {
        side_by_side(&peer, secs);
    }
}

fn ours_tables(rates: &[u32], secs: f64, small: usize, big: usize) {
    let pair = Pair::ours();
    println!("### commit on the primary → visible to an open reader on the replica (loopback)\n");
    println!("| rate (tx/s) | transactions | p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---|---|---|---|");
    for &r in rates {
        let l = lag(&pair, r, (r as f64 * secs) as usize, 100, Reader::Open);
        assert_eq!(l.seen, l.n, "every transaction reached the replica");
        println!(
            "| {r} | {} | {:.2} | {:.2} | {:.2} |",
            l.n, l.p50, l.p99, l.max
        );
    }
    println!("\n### sustained: the writer as fast as it can, the replica following\n");
    println!("| rows | transactions | replica tx/s | MB/s of rows | lag at the end (ms) |");
    println!("|---|---|---|---|---|");
    for (rows, n, payload) in [("100 B", small, 100), ("64 KiB", big, 65536)] {
        let (tps, mbps, last) = throughput(&pair, n, payload);
        println!("| {rows} | {n} | {tps:.0} | {mbps:.1} | {last:.1} |");
    }
}

fn side_by_side(peer: &str, secs: f64) {
    {
        let rate = 100;
        let n = (rate as f64 * secs.max(20.0)) as usize;
        let ours = lag(&Pair::ours(), rate, n, 100, Reader::Open);
        let theirs = lag(&Pair::peer(peer), rate, n, 100, Reader::Immutable);
        println!("\n### the same run: {rate} tx/s for {n} transactions, ours beside {peer}\n");
        println!("| replica | reader | seen | p50 (ms) | p99 (ms) | max (ms) |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| replited (this repository, QUIC) | one connection kept open | {}/{} | {:.2} | {:.2} | {:.2} |",
            ours.seen, ours.n, ours.p50, ours.p99, ours.max
        );
        println!(
            "| mrchypark/replited (gRPC) | a new immutable=1 connection per poll | {}/{} | {:.2} | {:.2} | {:.2} |",
            theirs.seen, theirs.n, theirs.p50, theirs.p99, theirs.max
        );
        println!(
            "\nratio of lags (theirs / ours): p50 {:.1}, p99 {:.1}",
            theirs.p50 / ours.p50,
            theirs.p99 / ours.p99
        );
    }
}
