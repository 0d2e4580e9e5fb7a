//! Micro-benchmarks of the core's hot paths: the SQLite WAL checksum (beside a
//! plain memcpy of the same bytes), WAL frame checksum/encoding, segment and
//! snapshot encoding/decoding (raw and lz4), a segment whose transactions write the same few
//! pages again (stored as deltas) beside the same transactions one file each, and raw lz4 on
//! one page.
//!
//! `cargo bench -p replited-core` runs them (well under two minutes);
//! `cargo bench -p replited-core -- --test` runs each once (CI).
//! Every group reports throughput in bytes of page data (or checksummed bytes).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use replited_core::format::{Compression, Decoder, Encoder, Event, FileHeader, Kind, TxnHeader};
use replited_core::hash::{page_hash, DbHashes};
use replited_core::wal::{encode_frame, frame_checksum, wal_checksum, WalHeader};

const PAGE_SIZE: usize = 4096;
/// Transactions in the benchmarked segment.
const SEGMENT_TXNS: u32 = 256;
/// Pages written by each transaction of the segment.
const PAGES_PER_TXN: u32 = 4;
/// Pages in the benchmarked snapshot.
const SNAPSHOT_PAGES: u32 = 1024;
const T0: u64 = 1_700_000_000_000;

/// A short, fixed measurement so the whole run stays well under two minutes.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    g
}

/// xorshift64: deterministic "random" bytes without a rand dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// A page of realistic content: the first half random bytes, the second half
/// zeros (free space), so lz4 has something to do. Different per seed.
fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    let mut r = XorShift((0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d)) | 1);
    r.fill(&mut p[..PAGE_SIZE / 2]);
    p
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift(seed | 1).fill(&mut v);
    v
}

fn bench_wal_checksum(c: &mut Criterion) {
    let mut g = group(c, "wal_checksum");
    for len in [PAGE_SIZE, 4 << 20] {
        let src = random_bytes(len, 1);
        let mut dst = vec![0u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        for (name, big_endian) in [("checksum_le", false), ("checksum_be", true)] {
            g.bench_with_input(BenchmarkId::new(name, len), &src, |b, src| {
                b.iter(|| wal_checksum(black_box(big_endian), black_box((0, 0)), black_box(src)))
            });
        }
        g.bench_with_input(BenchmarkId::new("memcpy", len), &src, |b, src| {
            b.iter(|| {
                dst.copy_from_slice(black_box(src));
                black_box(&mut dst);
            })
        });
    }
    g.finish();
}

fn wal_header() -> WalHeader {
    WalHeader {
        big_endian_checksum: false,
        page_size: PAGE_SIZE as u32,
        checkpoint_seq: 1,
        salt1: 0x1234_5678,
        salt2: 0x9abc_def0,
        checksum: (0, 0),
    }
    .with_computed_checksum()
}

fn bench_frame(c: &mut Criterion) {
    let mut g = group(c, "frame");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let h = wal_header();
    let data = page(7);
    let mut frame = Vec::with_capacity(h.frame_len());
    encode_frame(&h, h.checksum, 3, 10, &data, &mut frame);
    g.bench_function(BenchmarkId::new("frame_checksum", PAGE_SIZE), |b| {
        b.iter(|| frame_checksum(false, black_box(h.checksum), black_box(&frame)))
    });
    let mut out = Vec::with_capacity(h.frame_len());
    g.bench_function(BenchmarkId::new("encode_frame", PAGE_SIZE), |b| {
        b.iter(|| {
            out.clear();
            let s = encode_frame(&h, black_box(h.checksum), 3, 10, black_box(&data), &mut out);
            black_box(&out);
            s
        })
    });
    g.finish();
}

/// A transaction's page records: (page number, page data).
type Pages = Vec<(u32, Vec<u8>)>;

/// One file to encode: its header, its transactions and their pages.
struct File {
    header: FileHeader,
    txns: Vec<(TxnHeader, Pages)>,
}

impl File {
    fn page_bytes(&self) -> u64 {
        self.txns
            .iter()
            .map(|(_, pages)| pages.len() as u64 * PAGE_SIZE as u64)
            .sum()
    }
}

fn file_header(kind: Kind, compression: Compression, last_txid: u64, last_time: u64) -> FileHeader {
    FileHeader {
        kind,
        compression,
        page_size: PAGE_SIZE as u32,
        level: 0,
        generation: 1,
        first_txid: 1,
        last_txid,
        first_time_ms: T0,
        last_time_ms: last_time,
        wal: None,
        db_checksum: 0,
        db_pages: 1,
    }
}

/// 256 transactions of 4 pages each over a 1,024-page database (every page
/// written once), with the database checksums a capture would compute.
fn segment(compression: Compression) -> File {
    segment_of(compression, SEGMENT_TXNS * PAGES_PER_TXN, |k| {
        (0..PAGES_PER_TXN)
            .map(|j| {
                let pgno = k * PAGES_PER_TXN + j + 1;
                (pgno, page(u64::from(pgno)))
            })
            .collect()
    })
}

/// 256 transactions of 4 pages each, all within 16 hot pages (a counter, a table's last leaf,
/// an index's...): each write changes 48 bytes of the page's previous version, as an insert
/// changes a cell, its pointer and the page header. Page 1 is in every transaction.
fn hot_segment() -> File {
    let db_pages = 16;
    let mut current: Vec<Vec<u8>> = (0..=db_pages).map(|p| page(u64::from(p))).collect();
    segment_of(Compression::Lz4, db_pages, |k| {
        [1, 2 + k % 4, 6 + k % 4, 10 + k % 6]
            .iter()
            .map(|&pgno| {
                let p = &mut current[pgno as usize];
                let at = 100 + (k as usize * 37) % (PAGE_SIZE - 200);
                XorShift(u64::from(k) << 8 | u64::from(pgno) | 1).fill(&mut p[at..at + 40]);
                p[8..16].copy_from_slice(&u64::from(k).to_be_bytes());
                (pgno, p.clone())
            })
            .collect()
    })
}

/// A segment of [`SEGMENT_TXNS`] transactions of a `db_pages`-page database, transaction `k`
/// writing `pages_of(k)`, with the database checksums a capture would compute.
fn segment_of(
    compression: Compression,
    db_pages: u32,
    mut pages_of: impl FnMut(u32) -> Pages,
) -> File {
    let mut db = DbHashes::new(PAGE_SIZE as u32);
    let mut txns = Vec::new();
    for k in 0..SEGMENT_TXNS {
        let pages = pages_of(k);
        for (pgno, data) in &pages {
            db.set(*pgno, page_hash(*pgno, data));
        }
        db.set_page_count(db_pages);
        let th = TxnHeader {
            txid: u64::from(k) + 1,
            time_ms: T0 + u64::from(k),
            db_pages,
            page_count: pages.len() as u32,
            db_checksum: db.checksum(),
        };
        txns.push((th, pages));
    }
    let last = txns.last().unwrap().0;
    let header = FileHeader {
        db_checksum: last.db_checksum,
        db_pages,
        ..file_header(Kind::Segment, compression, last.txid, last.time_ms)
    };
    File { header, txns }
}

/// Encodes each transaction of `f` as a file of its own (as capture with `sync-interval = "0s"`
/// does under a steady load: nothing earlier in the file to be a delta against); returns the
/// bytes written.
fn encode_each(f: &File, out: &mut Vec<u8>) -> usize {
    let mut total = 0;
    for (th, pages) in &f.txns {
        out.clear();
        let h = FileHeader {
            first_txid: th.txid,
            last_txid: th.txid,
            first_time_ms: th.time_ms,
            last_time_ms: th.time_ms,
            db_checksum: th.db_checksum,
            db_pages: th.db_pages,
            ..f.header
        };
        let mut enc = Encoder::new(&h, out).unwrap();
        enc.begin_txn(th, out).unwrap();
        for (pgno, data) in pages {
            enc.page(*pgno, data, out).unwrap();
        }
        enc.finish(out).unwrap();
        total += out.len();
    }
    total
}

/// One transaction holding all 1,024 pages of the database.
fn snapshot(compression: Compression) -> File {
    let pages: Pages = (1..=SNAPSHOT_PAGES)
        .map(|pgno| (pgno, page(u64::from(pgno))))
        .collect();
    let db_checksum = pages.iter().fold(0, |x, (p, d)| x ^ page_hash(*p, d));
    let th = TxnHeader {
        txid: 1,
        time_ms: T0,
        db_pages: SNAPSHOT_PAGES,
        page_count: SNAPSHOT_PAGES,
        db_checksum,
    };
    let header = FileHeader {
        db_checksum,
        db_pages: SNAPSHOT_PAGES,
        ..file_header(Kind::Snapshot, compression, 1, T0)
    };
    File {
        header,
        txns: vec![(th, pages)],
    }
}

/// Encodes the whole file into `out` (cleared first); returns the file hash.
fn encode(f: &File, out: &mut Vec<u8>) -> u64 {
    out.clear();
    let mut enc = Encoder::new(&f.header, out).unwrap();
    for (th, pages) in &f.txns {
        enc.begin_txn(th, out).unwrap();
        for (pgno, data) in pages {
            enc.page(*pgno, data, out).unwrap();
        }
    }
    enc.finish(out).unwrap()
}

/// Decodes a whole file, reading every page; returns the page count and an
/// XOR of one byte per page so the pages are touched.
fn decode(file: &[u8]) -> (u32, u8) {
    let mut d = Decoder::new();
    let mut pos = 0;
    let (mut pages, mut touch) = (0u32, 0u8);
    while !d.is_done() {
        let (n, ev) = d.decode(&file[pos..]).unwrap();
        pos += n;
        match ev {
            Some(Event::Page(_)) => {
                let p = black_box(d.page());
                touch ^= p[p.len() / 3];
                pages += 1;
            }
            Some(_) => {}
            None => panic!("truncated at {pos}"),
        }
    }
    d.finish().unwrap();
    (pages, touch)
}

/// Encode and decode benchmarks of `files` (label, file) in one group.
fn bench_files(c: &mut Criterion, name: &str, files: &[(&str, File)]) {
    let mut g = group(c, name);
    for (label, f) in files {
        let mut out = Vec::new();
        encode(f, &mut out);
        let (pages, _) = decode(&out);
        let page_bytes = f.page_bytes();
        assert_eq!(u64::from(pages) * PAGE_SIZE as u64, page_bytes);
        eprintln!(
            "{name}/{label}: {pages} pages, {page_bytes} page bytes -> {} file bytes ({:.1}%)",
            out.len(),
            100.0 * out.len() as f64 / page_bytes as f64
        );
        g.throughput(Throughput::Bytes(page_bytes));
        let file = out.clone();
        g.bench_function(BenchmarkId::new("encode", label), |b| {
            b.iter(|| encode(black_box(f), &mut out))
        });
        g.bench_function(BenchmarkId::new("decode", label), |b| {
            b.iter(|| decode(black_box(&file)))
        });
    }
    g.finish();
}

fn bench_segment(c: &mut Criterion) {
    let files = [
        ("none", segment(Compression::None)),
        ("lz4", segment(Compression::Lz4)),
        ("lz4-hot", hot_segment()),
    ];
    bench_files(c, "segment", &files);
    // The hot transactions one file each: lz4 only.
    let hot = hot_segment();
    let mut out = Vec::new();
    let bytes = encode_each(&hot, &mut out);
    eprintln!(
        "segment/lz4-hot-each: {} files, {} page bytes -> {bytes} file bytes ({:.1}%)",
        hot.txns.len(),
        hot.page_bytes(),
        100.0 * bytes as f64 / hot.page_bytes() as f64
    );
    let mut g = group(c, "segment");
    g.throughput(Throughput::Bytes(hot.page_bytes()));
    g.bench_function(BenchmarkId::new("encode", "lz4-hot-each"), |b| {
        b.iter(|| encode_each(black_box(&hot), &mut out))
    });
    g.finish();
}

fn bench_snapshot(c: &mut Criterion) {
    bench_files(c, "snapshot", &[("lz4", snapshot(Compression::Lz4))]);
}

fn bench_lz4(c: &mut Criterion) {
    let mut g = group(c, "lz4");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let data = page(7);
    let mut compressed = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)];
    let n = lz4_flex::block::compress_into(&data, &mut compressed).unwrap();
    eprintln!("lz4: one {PAGE_SIZE}-byte page -> {n} bytes");
    let mut scratch = compressed.clone();
    g.bench_function(BenchmarkId::new("compress", PAGE_SIZE), |b| {
        b.iter(|| lz4_flex::block::compress_into(black_box(&data), &mut scratch).unwrap())
    });
    let compressed = &compressed[..n];
    let mut page_out = vec![0u8; PAGE_SIZE];
    g.bench_function(BenchmarkId::new("decompress", PAGE_SIZE), |b| {
        b.iter(|| {
            let m = lz4_flex::block::decompress_into(black_box(compressed), &mut page_out).unwrap();
            black_box(&page_out);
            m
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_wal_checksum,
    bench_frame,
    bench_segment,
    bench_snapshot,
    bench_lz4
);
criterion_main!(benches);
