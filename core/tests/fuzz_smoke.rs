//! A deterministic "fuzz smoke" test: a seeded xorshift generates thousands of
//! random and mutated inputs for every decoder and runs the same harnesses as
//! the cargo-fuzz targets (`replited_core::fuzzing`). Also replays the inputs
//! kept under tests/fixtures/fuzz/<target>/.

mod common;

use common::Rng;
use replited_core::format::{Compression, Encoder, FileHeader, Kind, TxnHeader};
use replited_core::fuzzing;
use replited_core::hash::{page_hash, DbHashes};
use replited_core::name::FileMeta;
use replited_core::wal::WalHeader;

/// Applies 1..=4 random mutations.
fn mutate(rng: &mut Rng, v: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = v.len() as u64;
        match rng.below(7) {
            0 | 1 if len > 0 => {
                let i = rng.below(len) as usize;
                v[i] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let i = rng.below(len) as usize;
                v[i] = rng.next() as u8;
            }
            3 => {
                let i = rng.below(len + 1) as usize;
                let k = 1 + rng.below(8) as usize;
                let extra = rng.bytes(k);
                v.splice(i..i, extra);
            }
            4 if len > 0 => {
                let i = rng.below(len) as usize;
                let j = (i + 1 + rng.below(8) as usize).min(v.len());
                v.drain(i..j);
            }
            5 => v.truncate(rng.below(len + 1) as usize),
            _ if len > 0 => {
                // Interesting values at a random aligned position.
                let i = (rng.below(len) as usize) & !3;
                let val: u32 = [0, 1, u32::MAX, 512, 65536, 0x8000_0000][rng.below(6) as usize];
                for (k, b) in val.to_be_bytes().iter().enumerate() {
                    if let Some(x) = v.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            _ => {}
        }
    }
}

#[test]
fn wal_header_smoke() {
    let mut rng = Rng::new(1);
    let mut n_ok = 0;
    for i in 0..3000 {
        let mut input = if i % 3 == 0 {
            let len = rng.below(40) as usize;
            rng.bytes(len)
        } else {
            WalHeader {
                big_endian_checksum: rng.below(2) == 1,
                page_size: 512 << rng.below(8),
                checkpoint_seq: rng.next() as u32,
                salt1: rng.next() as u32,
                salt2: rng.next() as u32,
                checksum: (0, 0),
            }
            .encode()
            .to_vec()
        };
        if i % 3 == 2 {
            mutate(&mut rng, &mut input);
        }
        if WalHeader::decode(&input).is_ok() {
            n_ok += 1;
        }
        fuzzing::wal_header(&input);
    }
    assert!(n_ok > 500);
}

#[test]
fn wal_scan_smoke() {
    let mut rng = Rng::new(2);
    for i in 0..1500 {
        let n = 1 + rng.below(12) as usize;
        let flags = (rng.below(4) as u8) << 1 | rng.below(2) as u8;
        let mut input = vec![flags, n as u8];
        input.extend(rng.bytes(4 * n));
        match i % 3 {
            0 => {}
            1 => {
                // Exactly one single-byte change (checked for exact outcome).
                input.extend(rng.bytes(2));
                input.push(1 + rng.below(255) as u8);
            }
            _ => {
                let k = 3 * (1 + rng.below(5) as usize);
                input.extend(rng.bytes(k))
            }
        }
        fuzzing::wal_scan(&input);
    }
    // Raw mode: mutated generated WALs as is.
    for _ in 0..500 {
        let n = 1 + rng.below(6) as usize;
        let mut input = vec![rng.below(2) as u8, n as u8];
        input.extend(rng.bytes(4 * n));
        let (wal, _, _) = fuzzing::build_wal(&input);
        let mut raw = vec![8u8];
        raw.extend(wal);
        mutate(&mut rng, &mut raw);
        raw[0] = 8;
        fuzzing::wal_scan(&raw);
    }
}

/// A small valid file: a snapshot or a segment, compressed or not; a page of a segment is
/// often its earlier version with a few bytes changed (a delta record in an lz4 one).
fn valid_file(rng: &mut Rng) -> Vec<u8> {
    let kind = if rng.below(2) == 0 {
        Kind::Snapshot
    } else {
        Kind::Segment
    };
    let compression = if rng.below(2) == 0 {
        Compression::None
    } else {
        Compression::Lz4
    };
    let ntx = if kind == Kind::Snapshot {
        1
    } else {
        1 + rng.below(3)
    };
    let mut db = DbHashes::new(512);
    let mut txns = Vec::new();
    let mut earlier = std::collections::HashMap::<u32, Vec<u8>>::new();
    for k in 0..ntx {
        let db_pages = 1 + rng.below(3) as u32;
        let pgnos: Vec<u32> = if kind == Kind::Snapshot {
            (1..=db_pages).collect()
        } else {
            (1..=db_pages).filter(|_| rng.below(2) == 0).collect()
        };
        let pages: Vec<Vec<u8>> = pgnos
            .iter()
            .map(|p| {
                let d = match earlier.get(p) {
                    Some(e) if rng.below(2) == 0 => {
                        let mut d = e.clone();
                        for _ in 0..1 + rng.below(4) {
                            d[rng.below(512) as usize] ^= 1 + rng.below(255) as u8;
                        }
                        d
                    }
                    _ if rng.below(2) == 0 => rng.bytes(512),
                    _ => vec![rng.next() as u8; 512],
                };
                earlier.insert(*p, d.clone());
                d
            })
            .collect();
        for (p, d) in pgnos.iter().zip(&pages) {
            db.set(*p, page_hash(*p, d));
        }
        db.set_page_count(db_pages);
        let t = TxnHeader {
            txid: 5 + k,
            time_ms: 100 + 50 * k,
            db_pages,
            page_count: pgnos.len() as u32,
            db_checksum: db.checksum(),
        };
        txns.push((t, pgnos, pages));
    }
    let last = txns.last().expect("at least one").0;
    let h = FileHeader {
        kind,
        compression,
        page_size: 512,
        level: 0,
        generation: 1 + rng.below(3),
        first_txid: 5,
        last_txid: 4 + ntx,
        first_time_ms: 100,
        last_time_ms: if kind == Kind::Snapshot { 100 } else { 200 },
        wal: None,
        db_checksum: last.db_checksum,
        db_pages: last.db_pages,
    };
    let mut out = Vec::new();
    let mut e = Encoder::new(&h, &mut out).unwrap();
    for (t, pgnos, pages) in &txns {
        e.begin_txn(t, &mut out).unwrap();
        for (p, d) in pgnos.iter().zip(pages) {
            e.page(*p, d, &mut out).unwrap();
        }
    }
    e.finish(&mut out).unwrap();
    out
}

#[test]
fn segment_decode_smoke() {
    let mut rng = Rng::new(3);
    for i in 0..2500 {
        let mut file = if i % 10 == 0 {
            let len = rng.below(200) as usize;
            rng.bytes(len)
        } else {
            valid_file(&mut rng)
        };
        if i % 10 != 1 {
            mutate(&mut rng, &mut file);
        }
        let fix_up = rng.below(2) as u8;
        let mut input = vec![fix_up, rng.below(40) as u8];
        input.extend(file);
        fuzzing::segment_decode(&input);
    }
}

#[test]
fn file_name_smoke() {
    let mut rng = Rng::new(4);
    const ALPHABET: &[u8] = b"0123456789abcdefA/-.lsegnapx";
    for i in 0..4000 {
        let mut name = if i % 4 == 0 {
            let len = rng.below(100) as usize;
            (0..len)
                .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
                .collect()
        } else {
            let m = FileMeta {
                kind: if rng.below(2) == 0 {
                    Kind::Snapshot
                } else {
                    Kind::Segment
                },
                generation: rng.below(5),
                level: rng.below(12) as u32,
                first_txid: rng.below(1000),
                last_txid: rng.below(1000),
                first_time_ms: rng.next() >> rng.below(64),
                last_time_ms: rng.next() >> rng.below(64),
            };
            m.path().into_bytes()
        };
        mutate(&mut rng, &mut name);
        fuzzing::file_name(&name);
    }
}

/// Inputs kept from fuzzing runs (crashes fixed since): replay them through
/// the same harnesses.
#[test]
fn replay_saved_fuzz_inputs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    type Harness = fn(&[u8]);
    let targets: [(&str, Harness); 4] = [
        ("wal_header", fuzzing::wal_header),
        ("wal_scan", fuzzing::wal_scan),
        ("segment_decode", fuzzing::segment_decode),
        ("file_name", fuzzing::file_name),
    ];
    for (name, harness) in targets {
        let Ok(dir) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        for entry in dir {
            let path = entry.unwrap().path();
            harness(&std::fs::read(&path).unwrap());
        }
    }
}

/// Writes seed inputs for the cargo-fuzz targets into `fuzz/corpus/<target>/`:
/// `cargo test -p replited-core --test fuzz_smoke -- --ignored`.
#[test]
#[ignore = "writes the fuzz seed corpus"]
fn write_fuzz_seed_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let write = |target: &str, i: usize, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{i:03}")), data).unwrap();
    };
    let mut rng = Rng::new(5);
    for i in 0..8 {
        let h = WalHeader {
            big_endian_checksum: i % 2 == 1,
            page_size: 512 << i,
            checkpoint_seq: i as u32,
            salt1: rng.next() as u32,
            salt2: rng.next() as u32,
            checksum: (0, 0),
        };
        write("wal_header", i, &h.encode());
    }
    for i in 0..8 {
        let n = 1 + rng.below(8) as usize;
        let mut input = vec![(i as u8 & 1) | ((i as u8 % 4) << 1), n as u8];
        input.extend(rng.bytes(4 * n));
        write("wal_scan", i, &input);
        let (wal, _, _) = fuzzing::build_wal(&input);
        let mut raw = vec![8u8];
        raw.extend(wal);
        if raw.len() < 8192 {
            write("wal_scan", 100 + i, &raw);
        }
    }
    for i in 0..12 {
        let mut input = vec![(i % 2) as u8, rng.below(40) as u8];
        input.extend(valid_file(&mut rng));
        write("segment_decode", i, &input);
    }
    for i in 0..8 {
        let m = FileMeta {
            kind: if i % 2 == 0 {
                Kind::Snapshot
            } else {
                Kind::Segment
            },
            generation: 1 + i as u64,
            level: i as u32 % 3,
            first_txid: 10 * i as u64 + 1,
            last_txid: 10 * i as u64 + if i % 2 == 0 { 1 } else { 9 },
            first_time_ms: 1_700_000_000_000,
            last_time_ms: 1_700_000_000_000 + if i % 2 == 0 { 0 } else { 5000 },
        };
        write("file_name", i, m.path().as_bytes());
    }
}
