//! The snapshot/segment file format: round trips, streaming, corruption.

mod common;

use common::{page, Rng};
use replited_core::format::*;
use replited_core::hash::{page_hash, DbHashes, FileHasher};
use replited_core::scan::WalPos;

/// A transaction to encode: header fields and pages.
#[derive(Clone)]
struct Txn {
    time_ms: u64,
    db_pages: u32,
    pages: Vec<(u32, Vec<u8>)>,
}

fn header(
    kind: Kind,
    compression: Compression,
    page_size: u32,
    first: u64,
    last: u64,
) -> FileHeader {
    FileHeader {
        kind,
        compression,
        page_size,
        level: 0,
        generation: 3,
        first_txid: first,
        last_txid: last,
        first_time_ms: 1_700_000_000_000,
        last_time_ms: 1_700_000_000_000 + if kind == Kind::Snapshot { 0 } else { 500 },
        wal: Some(WalPos {
            salt1: 0x1111,
            salt2: 0x2222,
            offset: 32 + 10 * (24 + u64::from(page_size)),
            checksum: (7, 8),
        }),
        db_checksum: 0,
        db_pages: 1,
    }
}

/// The header with the final state of `txns` (as `encode` computes it) filled in.
fn finalized(h: &FileHeader, txns: &[Txn]) -> FileHeader {
    let mut db = DbHashes::new(h.page_size);
    for t in txns {
        for (pgno, data) in &t.pages {
            db.set(*pgno, page_hash(*pgno, data));
        }
        db.set_page_count(t.db_pages);
    }
    FileHeader {
        db_checksum: db.checksum(),
        db_pages: txns.last().map_or(h.db_pages, |t| t.db_pages),
        ..*h
    }
}

/// Encodes `txns` (whose checksums are computed with DbHashes, the database
/// starting empty), draining the output every call to check streaming.
fn encode(h: &FileHeader, txns: &[Txn]) -> (Vec<u8>, u64, Vec<TxnHeader>) {
    let h = &finalized(h, txns);
    let mut file = Vec::new();
    let mut out = Vec::new();
    let mut enc = Encoder::new(h, &mut out).unwrap();
    file.append(&mut out);
    let mut db = DbHashes::new(h.page_size);
    let mut headers = Vec::new();
    for (k, t) in txns.iter().enumerate() {
        for (pgno, data) in &t.pages {
            db.set(*pgno, page_hash(*pgno, data));
        }
        db.set_page_count(t.db_pages);
        let th = TxnHeader {
            txid: h.first_txid + k as u64,
            time_ms: t.time_ms,
            db_pages: t.db_pages,
            page_count: t.pages.len() as u32,
            db_checksum: db.checksum(),
        };
        enc.begin_txn(&th, &mut out).unwrap();
        file.append(&mut out);
        headers.push(th);
        for (pgno, data) in &t.pages {
            enc.page(*pgno, data, &mut out).unwrap();
            assert!(out.len() <= PAGE_RECORD_HEADER_LEN + h.page_size as usize);
            file.append(&mut out);
        }
    }
    let hash = enc.finish(&mut out).unwrap();
    file.append(&mut out);
    (file, hash, headers)
}

#[derive(Debug, PartialEq)]
enum Ev {
    Header(FileHeader),
    Txn(TxnHeader),
    Page(u32, Vec<u8>),
    End,
}

/// Decodes a whole file, feeding `step` more bytes each time the decoder
/// needs more (usize::MAX: everything at once). Decodes it twice: with page
/// data in the decoder's buffer, and into buffers of the caller's
/// (`next_page`/`decode_page_into`); both must give the same events or error.
fn decode(file: &[u8], step: usize) -> Result<Vec<Ev>, FormatError> {
    let own = decode_with(file, step, false);
    assert_eq!(
        decode_with(file, step, true),
        own,
        "decoded into the caller's buffers"
    );
    own
}

fn decode_with(file: &[u8], step: usize, into: bool) -> Result<Vec<Ev>, FormatError> {
    let mut d = Decoder::new();
    let mut evs = Vec::new();
    let mut pos = 0;
    let mut avail = step.min(file.len());
    let mut placed = Vec::new();
    loop {
        let input = &file[pos..avail];
        let (n, ev) = match d.next_page(input).filter(|_| into) {
            Some(_) => {
                placed = vec![0xa5; d.header().unwrap().page_size as usize];
                d.decode_page_into(input, &mut placed)?
            }
            None => {
                placed.clear();
                d.decode(input)?
            }
        };
        pos += n;
        match ev {
            Some(Event::Header(h)) => {
                assert_eq!(d.header(), Some(&h));
                assert_eq!(d.max_item_len(), 8 + h.page_size as usize);
                evs.push(Ev::Header(h));
            }
            Some(Event::Txn(t)) => evs.push(Ev::Txn(t)),
            Some(Event::Page(p)) => {
                let data = if placed.is_empty() {
                    d.page()
                } else {
                    &placed[..]
                };
                // A snapshot's page hash is handed out as computed (restores reuse it).
                let snapshot = d.header().is_some_and(|h| h.kind == Kind::Snapshot);
                assert_eq!(d.page_hash(), snapshot.then(|| page_hash(p, data)));
                evs.push(Ev::Page(p, data.to_vec()))
            }
            Some(Event::End) => evs.push(Ev::End),
            None => {
                assert_eq!(n, 0);
                if avail == file.len() {
                    break;
                }
                avail = avail.saturating_add(step).min(file.len());
            }
        }
    }
    d.finish()?;
    Ok(evs)
}

fn expected_events(h: &FileHeader, headers: &[TxnHeader], txns: &[Txn]) -> Vec<Ev> {
    let mut v = vec![Ev::Header(finalized(h, txns))];
    for (th, t) in headers.iter().zip(txns) {
        v.push(Ev::Txn(*th));
        for (p, d) in &t.pages {
            v.push(Ev::Page(*p, d.clone()));
        }
    }
    v.push(Ev::End);
    v
}

fn snapshot_txns(page_size: u32, n: u32) -> Vec<Txn> {
    let mut r = Rng::new(42);
    let pages = (1..=n)
        .map(|p| {
            let data = if p % 3 == 0 {
                r.bytes(page_size as usize) // incompressible
            } else {
                page(page_size, p, 0)
            };
            (p, data)
        })
        .collect();
    vec![Txn {
        time_ms: 1_700_000_000_000,
        db_pages: n,
        pages,
    }]
}

fn segment_txns(page_size: u32) -> Vec<Txn> {
    let mut r = Rng::new(7);
    vec![
        Txn {
            time_ms: 1_700_000_000_000,
            db_pages: 4,
            pages: vec![(1, page(page_size, 1, 1)), (4, page(page_size, 4, 1))],
        },
        // A transaction with no page record (allowed in segments).
        Txn {
            time_ms: 1_700_000_000_100,
            db_pages: 4,
            pages: vec![],
        },
        Txn {
            time_ms: 1_700_000_000_100,
            db_pages: 6,
            pages: vec![
                (2, r.bytes(page_size as usize)),
                (5, vec![0; page_size as usize]),
                (6, page(page_size, 6, 2)),
            ],
        },
        // Shrinks the database.
        Txn {
            time_ms: 1_700_000_000_500,
            db_pages: 2,
            pages: vec![(1, page(page_size, 1, 3))],
        },
    ]
}

/// Where each page record of `file` starts, with its page number and stored-length field.
fn records(file: &[u8]) -> Vec<(usize, u32, u32)> {
    let mut d = Decoder::new();
    let mut pos = 0;
    let mut v = Vec::new();
    loop {
        let at = pos;
        let (used, ev) = d.decode(&file[pos..]).unwrap();
        pos += used;
        match ev.unwrap() {
            Event::Page(p) => v.push((
                at,
                p,
                u32::from_be_bytes(file[at + 4..at + 8].try_into().unwrap()),
            )),
            Event::End => return v,
            _ => {}
        }
    }
}

/// The payload length of each page record of `file` (a delta's without its flag).
fn stored_lengths(file: &[u8]) -> Vec<u32> {
    records(file)
        .iter()
        .map(|&(_, _, field)| field & !DELTA_FLAG)
        .collect()
}

#[test]
fn round_trip() {
    for compression in [Compression::None, Compression::Lz4] {
        for page_size in [512u32, 4096, 65536] {
            let sn = snapshot_txns(page_size, 5);
            let seg = segment_txns(page_size);
            let cases = [
                (header(Kind::Snapshot, compression, page_size, 9, 9), sn),
                (header(Kind::Segment, compression, page_size, 10, 13), seg),
            ];
            for (h, txns) in cases {
                let (file, hash, headers) = encode(&h, &txns);
                let evs = decode(&file, usize::MAX).unwrap();
                assert_eq!(evs, expected_events(&h, &headers, &txns));
                let mut fh = FileHasher::new();
                fh.update(&file[..file.len() - TRAILER_LEN]);
                assert_eq!(fh.finish(), hash);
                let mut d = Decoder::new();
                let mut pos = 0;
                while !d.is_done() {
                    pos += d.decode(&file[pos..]).unwrap().0;
                }
                assert_eq!(d.file_hash(), Some(hash));
                let lens = stored_lengths(&file);
                for (l, ev) in lens
                    .iter()
                    .zip(evs.iter().filter(|e| matches!(e, Ev::Page(..))))
                {
                    let Ev::Page(_, data) = ev else {
                        unreachable!()
                    };
                    if compression == Compression::None {
                        assert_eq!(*l, page_size);
                    } else {
                        let compressible = data[16..64].iter().all(|&b| b == data[16]);
                        if compressible {
                            assert!(*l < page_size, "page stored raw: {l}");
                        }
                        assert!(*l <= page_size);
                    }
                }
                if compression == Compression::Lz4 {
                    // Incompressible pages are stored raw.
                    assert!(lens.contains(&page_size));
                }
            }
        }
    }
}

#[test]
fn byte_by_byte_gives_the_same_events() {
    for compression in [Compression::None, Compression::Lz4] {
        let h = header(Kind::Segment, compression, 512, 1, 4);
        let txns = segment_txns(512);
        let (file, _, headers) = encode(&h, &txns);
        let want = expected_events(&h, &headers, &txns);
        for step in [1, 7, 100] {
            assert_eq!(decode(&file, step).unwrap(), want);
        }
        let h = header(Kind::Snapshot, compression, 512, 1, 1);
        let txns = snapshot_txns(512, 3);
        let (file, _, headers) = encode(&h, &txns);
        assert_eq!(
            decode(&file, 1).unwrap(),
            expected_events(&h, &headers, &txns)
        );
    }
}

fn small_files() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for compression in [Compression::None, Compression::Lz4] {
        let h = header(Kind::Segment, compression, 512, 5, 6);
        let txns = vec![
            Txn {
                time_ms: 1_700_000_000_000,
                db_pages: 3,
                pages: vec![(1, page(512, 1, 0)), (3, page(512, 3, 0))],
            },
            Txn {
                time_ms: 1_700_000_000_500,
                db_pages: 3,
                pages: vec![(2, page(512, 2, 0))],
            },
        ];
        v.push(encode(&h, &txns).0);
        // Page 2 changed by three transactions: in an lz4 file, two delta records.
        let h = header(Kind::Segment, compression, 512, 5, 7);
        let v2 = edited(&page(512, 2, 0), 1, 40);
        let txns = vec![
            Txn {
                time_ms: 1_700_000_000_000,
                db_pages: 3,
                pages: vec![(2, page(512, 2, 0))],
            },
            Txn {
                time_ms: 1_700_000_000_100,
                db_pages: 3,
                pages: vec![(1, page(512, 1, 0)), (2, v2.clone())],
            },
            Txn {
                time_ms: 1_700_000_000_500,
                db_pages: 3,
                pages: vec![(2, edited(&v2, 2, 300))],
            },
        ];
        let file = encode(&h, &txns).0;
        assert_eq!(
            deltas(&file),
            if compression == Compression::Lz4 {
                2
            } else {
                0
            }
        );
        v.push(file);
        let mut h = header(Kind::Snapshot, compression, 512, 5, 5);
        h.wal = None;
        v.push(encode(&h, &snapshot_txns(512, 2)).0);
    }
    v
}

/// `p` with a few bytes changed at `at` (as an insert into a B-tree page changes a header, a
/// cell pointer and a cell).
fn edited(p: &[u8], seed: u8, at: usize) -> Vec<u8> {
    let mut p = p.to_vec();
    p[at] ^= seed;
    p[at + 1] = p[at + 1].wrapping_add(seed);
    let n = p.len();
    p[n - 20..n - 20 + 10].fill(seed);
    p
}

/// How many page records of `file` are deltas.
fn deltas(file: &[u8]) -> usize {
    records(file)
        .iter()
        .filter(|&&(_, _, field)| field & DELTA_FLAG != 0)
        .count()
}

#[test]
fn flipping_any_byte_fails() {
    for file in small_files() {
        decode(&file, usize::MAX).unwrap();
        for i in 0..file.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut f = file.clone();
                f[i] ^= x;
                assert!(
                    decode(&f, usize::MAX).is_err(),
                    "flip 0x{x:02x} at byte {i} of {} went unnoticed",
                    file.len()
                );
            }
        }
    }
}

#[test]
fn truncation_at_every_length_fails() {
    for file in small_files() {
        for len in 0..file.len() {
            let r = decode(&file[..len], usize::MAX);
            assert!(r.is_err(), "truncated to {len}");
            if !(4..FILE_HEADER_LEN).contains(&len) {
                assert_eq!(r.unwrap_err(), FormatError::Truncated, "truncated to {len}");
            }
        }
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(decode(&longer, usize::MAX), Err(FormatError::TrailingBytes));
    }
}

#[test]
fn file_header_round_trip_and_rules() {
    let h = header(Kind::Segment, Compression::Lz4, 4096, 10, 20);
    assert_eq!(FileHeader::decode(&h.encode()), Ok(h));
    let mut n = h;
    n.wal = None;
    assert_eq!(FileHeader::decode(&n.encode()), Ok(n));
    assert_eq!(n.encode()[56..80], [0u8; 24]);
    let bad = |f: &dyn Fn(&mut FileHeader)| {
        let mut x = h;
        f(&mut x);
        let e = x.validate().unwrap_err();
        assert_eq!(FileHeader::decode(&x.encode()), Err(e));
        let mut out = Vec::new();
        assert_eq!(Encoder::new(&x, &mut out).unwrap_err(), e);
        assert!(out.is_empty());
        e
    };
    assert_eq!(bad(&|x| x.page_size = 1000), FormatError::BadPageSize(1000));
    assert_eq!(bad(&|x| x.page_size = 256), FormatError::BadPageSize(256));
    assert_eq!(
        bad(&|x| x.page_size = 131072),
        FormatError::BadPageSize(131072)
    );
    assert_eq!(bad(&|x| x.generation = 0), FormatError::ZeroGeneration);
    assert_eq!(bad(&|x| x.first_txid = 0), FormatError::ZeroTxid);
    assert_eq!(
        bad(&|x| x.last_txid = 9),
        FormatError::TxidRange { first: 10, last: 9 }
    );
    assert!(matches!(
        bad(&|x| x.last_time_ms = 0),
        FormatError::TimeRange { .. }
    ));
    assert!(matches!(
        bad(&|x| x.kind = Kind::Snapshot),
        FormatError::SnapshotTxidRange {
            first: 10,
            last: 20
        }
    ));
    assert!(matches!(
        bad(&|x| {
            x.kind = Kind::Snapshot;
            x.last_txid = 10
        }),
        FormatError::SnapshotTimeRange { .. }
    ));
    assert_eq!(
        bad(&|x| {
            x.kind = Kind::Snapshot;
            x.last_txid = 10;
            x.last_time_ms = x.first_time_ms;
            x.level = 1
        }),
        FormatError::SnapshotLevel(1)
    );
    for off in [1u64, 31, 33, 32 + 4120 + 1] {
        assert_eq!(
            bad(&|x| x.wal.as_mut().unwrap().offset = off),
            FormatError::BadWalOffset {
                offset: off,
                frame_len: 4120
            }
        );
    }
    // Byte-level rules: re-hash so only the rule under test is broken.
    let rehashed = |f: &dyn Fn(&mut [u8; FILE_HEADER_LEN])| {
        let mut b = h.encode();
        f(&mut b);
        let hh = xxhash_rust::xxh3::xxh3_64(&b[..FH_HASH]);
        b[FH_HASH..].copy_from_slice(&hh.to_be_bytes());
        FileHeader::decode(&b)
    };
    assert_eq!(rehashed(&|b| b[0] = b'X'), Err(FormatError::BadMagic));
    // An lz4 segment of several transactions is version 2 (its records may be deltas); any
    // other file version 1; both must be the one the fields call for.
    assert_eq!(h.encode()[4..6], [0, 2]);
    assert_eq!(
        rehashed(&|b| b[5] = 3),
        Err(FormatError::UnsupportedVersion(3))
    );
    assert_eq!(
        rehashed(&|b| b[5] = 1),
        Err(FormatError::WrongVersion {
            version: 1,
            expected: 2
        })
    );
    for x in [
        FileHeader {
            compression: Compression::None,
            ..h
        },
        FileHeader {
            last_txid: 10,
            last_time_ms: h.first_time_ms,
            ..h
        },
    ] {
        let mut b = x.encode();
        assert_eq!(b[4..6], [0, 1]);
        assert_eq!(FileHeader::decode(&b), Ok(x));
        b[5] = 2;
        let hh = xxhash_rust::xxh3::xxh3_64(&b[..FH_HASH]);
        b[FH_HASH..].copy_from_slice(&hh.to_be_bytes());
        assert_eq!(
            FileHeader::decode(&b),
            Err(FormatError::WrongVersion {
                version: 2,
                expected: 1
            })
        );
    }
    assert_eq!(rehashed(&|b| b[6] = 3), Err(FormatError::BadKind(3)));
    assert_eq!(rehashed(&|b| b[6] = 0), Err(FormatError::BadKind(0)));
    assert_eq!(rehashed(&|b| b[7] = 2), Err(FormatError::BadCompression(2)));
    assert_eq!(rehashed(&|b| b[92] = 1), Err(FormatError::ReservedNotZero));
    assert_eq!(rehashed(&|b| b[95] = 1), Err(FormatError::ReservedNotZero));
    assert_eq!(
        rehashed(&|b| b[88..92].copy_from_slice(&[0; 4])),
        Err(FormatError::ZeroDbSize { txid: 20 })
    );
    assert_eq!(
        rehashed(&|b| b[64..72].fill(0)),
        Err(FormatError::UnknownWalPosNotZero)
    );
    let mut b = h.encode();
    b[20] ^= 1;
    assert!(matches!(
        FileHeader::decode(&b),
        Err(FormatError::HeaderChecksum { .. })
    ));
    assert_eq!(FileHeader::decode(&b[..50]), Err(FormatError::Truncated));
}

fn txn(txid: u64, time_ms: u64, db_pages: u32, page_count: u32) -> TxnHeader {
    TxnHeader {
        txid,
        time_ms,
        db_pages,
        page_count,
        db_checksum: 0,
    }
}

#[test]
fn encoder_checks_sequencing() {
    let h = FileHeader {
        db_pages: 3,
        ..header(Kind::Segment, Compression::None, 512, 10, 11)
    };
    let t0 = h.first_time_ms;
    let p = page(512, 1, 0);
    let mut out = Vec::new();
    let mut e = Encoder::new(&h, &mut out).unwrap();
    assert_eq!(e.header(), &h);
    assert_eq!(
        e.page(1, &p, &mut out),
        Err(FormatError::NoPageExpected { pgno: 1 })
    );
    assert_eq!(
        e.begin_txn(&txn(11, t0, 3, 1), &mut out),
        Err(FormatError::TxidOutOfSequence {
            expected: 10,
            found: 11
        })
    );
    assert!(matches!(
        e.begin_txn(&txn(10, t0 - 1, 3, 1), &mut out),
        Err(FormatError::TimeOutOfRange { .. })
    ));
    assert!(matches!(
        e.begin_txn(&txn(10, h.last_time_ms + 1, 3, 1), &mut out),
        Err(FormatError::TimeOutOfRange { .. })
    ));
    assert_eq!(
        e.begin_txn(&txn(10, t0, 0, 0), &mut out),
        Err(FormatError::ZeroDbSize { txid: 10 })
    );
    assert_eq!(
        e.begin_txn(&txn(10, t0, 3, 4), &mut out),
        Err(FormatError::PageCountExceedsDbSize {
            txid: 10,
            page_count: 4,
            db_pages: 3
        })
    );
    let len = out.len();
    e.begin_txn(&txn(10, t0 + 10, 3, 2), &mut out).unwrap();
    assert_eq!(out.len(), len + TXN_HEADER_LEN);
    assert_eq!(
        e.begin_txn(&txn(11, t0 + 10, 3, 1), &mut out),
        Err(FormatError::TxnIncomplete {
            txid: 10,
            missing: 2
        })
    );
    assert_eq!(
        e.page(0, &p, &mut out),
        Err(FormatError::ZeroPageNumber { txid: 10 })
    );
    assert_eq!(
        e.page(4, &p, &mut out),
        Err(FormatError::PageBeyondDbSize {
            pgno: 4,
            db_pages: 3
        })
    );
    assert_eq!(
        e.page(2, &p[..100], &mut out),
        Err(FormatError::PageDataLength {
            pgno: 2,
            len: 100,
            page_size: 512
        })
    );
    e.page(2, &p, &mut out).unwrap();
    assert_eq!(
        e.page(2, &p, &mut out),
        Err(FormatError::PageOutOfOrder {
            pgno: 2,
            previous: 2
        })
    );
    assert_eq!(
        e.page(1, &p, &mut out),
        Err(FormatError::PageOutOfOrder {
            pgno: 1,
            previous: 2
        })
    );
    e.page(3, &p, &mut out).unwrap();
    assert_eq!(
        e.page(4, &p, &mut out),
        Err(FormatError::NoPageExpected { pgno: 4 })
    );
    assert!(matches!(
        e.begin_txn(&txn(11, t0 + 9, 3, 1), &mut out),
        Err(FormatError::TimeDecreasing { .. })
    ));
    assert_eq!(
        e.clone().finish(&mut Vec::new()),
        Err(FormatError::MissingTxns { next: 11, last: 11 })
    );
    e.begin_txn(&txn(11, t0 + 10, 3, 1), &mut out).unwrap();
    assert_eq!(
        e.clone().finish(&mut Vec::new()),
        Err(FormatError::TxnIncomplete {
            txid: 11,
            missing: 1
        })
    );
    e.page(1, &p, &mut out).unwrap();
    assert_eq!(
        e.begin_txn(&txn(12, t0 + 10, 3, 1), &mut out),
        Err(FormatError::TooManyTxns { txid: 12, last: 11 })
    );
    let hash = e.finish(&mut out).unwrap();
    assert_eq!(decode(&out, usize::MAX).unwrap().len(), 7);
    assert_eq!(&out[out.len() - 8..], &hash.to_be_bytes());
}

#[test]
fn snapshot_rules() {
    let h = FileHeader {
        db_pages: 3,
        ..header(Kind::Snapshot, Compression::Lz4, 512, 4, 4)
    };
    let t0 = h.first_time_ms;
    let mut out = Vec::new();
    let mut e = Encoder::new(&h, &mut out).unwrap();
    assert_eq!(
        e.begin_txn(&txn(4, t0, 3, 2), &mut out),
        Err(FormatError::SnapshotIncomplete {
            page_count: 2,
            db_pages: 3
        })
    );
    let pages: Vec<Vec<u8>> = (1..=2).map(|p| page(512, p, 0)).collect();
    let sum = page_hash(1, &pages[0]) ^ page_hash(2, &pages[1]);
    let mut wrong = txn(4, t0, 2, 2);
    wrong.db_checksum = sum ^ 1;
    // The transaction must agree with the file header; here both claim the wrong checksum.
    let wrong_h = FileHeader {
        db_checksum: sum ^ 1,
        db_pages: 2,
        ..h
    };
    let mut out = Vec::new();
    let mut e = Encoder::new(&wrong_h, &mut out).unwrap();
    assert!(matches!(
        e.begin_txn(&txn(4, t0, 2, 2), &mut out),
        Err(FormatError::LastTxnMismatch { txid: 4, .. })
    ));
    e.begin_txn(&wrong, &mut out).unwrap();
    e.page(1, &pages[0], &mut out).unwrap();
    assert_eq!(
        e.page(2, &pages[1], &mut out),
        Err(FormatError::DbChecksumMismatch {
            txid: 4,
            stored: sum ^ 1,
            computed: sum
        })
    );
    // The decoder checks it too: build the file with the right checksum, then
    // patch it (and re-hash the trailer) so only the database checksum is off.
    let mut right = wrong;
    right.db_checksum = sum;
    let h = FileHeader {
        db_checksum: sum,
        db_pages: 2,
        ..h
    };
    let mut out = Vec::new();
    let mut e = Encoder::new(&h, &mut out).unwrap();
    e.begin_txn(&right, &mut out).unwrap();
    e.page(1, &pages[0], &mut out).unwrap();
    e.page(2, &pages[1], &mut out).unwrap();
    e.finish(&mut out).unwrap();
    decode(&out, usize::MAX).unwrap();
    let at = FILE_HEADER_LEN + 24;
    out[at..at + 8].copy_from_slice(&(sum ^ 1).to_be_bytes());
    out[FH_DB_CHECKSUM..FH_DB_CHECKSUM + 8].copy_from_slice(&(sum ^ 1).to_be_bytes());
    let hh = xxhash_rust::xxh3::xxh3_64(&out[..FH_HASH]);
    out[FH_HASH..FILE_HEADER_LEN].copy_from_slice(&hh.to_be_bytes());
    retrailer(&mut out);
    assert!(matches!(
        decode(&out, usize::MAX),
        Err(FormatError::DbChecksumMismatch { txid: 4, .. })
    ));
}

/// Recomputes the trailer hash of a file.
fn retrailer(f: &mut [u8]) {
    let n = f.len() - TRAILER_LEN;
    let h = xxhash_rust::xxh3::xxh3_64(&f[..n]);
    f[n + 8..].copy_from_slice(&h.to_be_bytes());
}

/// `file` changed by `f` (its trailer hash made right again) is refused with `want`, decoded
/// whole or a byte at a time.
fn refused_when(file: &[u8], f: &dyn Fn(&mut Vec<u8>), want: FormatError) {
    let mut x = file.to_vec();
    f(&mut x);
    retrailer(&mut x);
    assert_eq!(decode(&x, usize::MAX), Err(want));
    assert_eq!(decode(&x, 1), Err(want));
}

#[test]
fn decoder_rules_on_crafted_files() {
    let h = header(Kind::Segment, Compression::None, 512, 1, 2);
    let txns = segment_txns(512)[..2].to_vec();
    let (file, _, _) = encode(&h, &txns);
    let rec = FILE_HEADER_LEN + TXN_HEADER_LEN; // first page record
    let expect = |f: &dyn Fn(&mut Vec<u8>), want| refused_when(&file, f, want);
    expect(
        &|x| x[rec + 4..rec + 8].copy_from_slice(&100u32.to_be_bytes()),
        FormatError::UnexpectedCompression { pgno: 1, len: 100 },
    );
    expect(
        &|x| x[rec + 4..rec + 8].copy_from_slice(&0u32.to_be_bytes()),
        FormatError::BadPageLength {
            pgno: 1,
            len: 0,
            page_size: 512,
        },
    );
    expect(
        &|x| x[rec + 4..rec + 8].copy_from_slice(&513u32.to_be_bytes()),
        FormatError::BadPageLength {
            pgno: 1,
            len: 513,
            page_size: 512,
        },
    );
    expect(
        &|x| x[rec..rec + 4].copy_from_slice(&9u32.to_be_bytes()),
        FormatError::PageBeyondDbSize {
            pgno: 9,
            db_pages: 4,
        },
    );
    let second = rec + 8 + 512;
    expect(
        &|x| x[second..second + 4].copy_from_slice(&1u32.to_be_bytes()),
        FormatError::PageOutOfOrder {
            pgno: 1,
            previous: 1,
        },
    );
    expect(
        &|x| x[FILE_HEADER_LEN..FILE_HEADER_LEN + 8].copy_from_slice(&2u64.to_be_bytes()),
        FormatError::TxidOutOfSequence {
            expected: 1,
            found: 2,
        },
    );
    let n = file.len();
    expect(&|x| x[n - 16] = b'X', FormatError::BadTrailerMagic);
    let mut x = file.clone();
    x[rec + 100] ^= 1;
    assert!(matches!(
        decode(&x, usize::MAX),
        Err(FormatError::ChecksumMismatch { .. })
    ));
    // Compressed page in an lz4 file that decompresses to the wrong size.
    let h = header(Kind::Segment, Compression::Lz4, 512, 1, 1);
    let t = Txn {
        time_ms: h.first_time_ms,
        db_pages: 1,
        pages: vec![(1, vec![0; 512])],
    };
    let (mut file, _, _) = encode(&h, &[t]);
    let len = u32::from_be_bytes(file[rec + 4..rec + 8].try_into().unwrap()) as usize;
    assert!(len < 512);
    // Replace the block with one that decompresses to 511 bytes.
    let block = lz4_flex::block::compress(&[0u8; 511]);
    let mut x = file[..rec].to_vec();
    x.extend_from_slice(&1u32.to_be_bytes());
    x.extend_from_slice(&(block.len() as u32).to_be_bytes());
    x.extend_from_slice(&block);
    x.extend_from_slice(&file[rec + 8 + len..]);
    retrailer(&mut x);
    assert_eq!(
        decode(&x, usize::MAX),
        Err(FormatError::Decompress { pgno: 1 })
    );
    file.truncate(3);
    assert_eq!(decode(&file, usize::MAX), Err(FormatError::Truncated));
    assert_eq!(Decoder::new().max_item_len(), FILE_HEADER_LEN);
    assert_eq!(Decoder::new().decode(b"RPLX"), Err(FormatError::BadMagic));
}

#[test]
fn error_messages() {
    assert_eq!(
        FormatError::ChecksumMismatch {
            stored: 1,
            computed: 0xab
        }
        .to_string(),
        "checksum mismatch: stored 0x0000000000000001, computed 0x00000000000000ab"
    );
    assert_eq!(
        FormatError::UnsupportedVersion(7).to_string(),
        "unsupported version 7"
    );
    assert_eq!(
        FormatError::Truncated.to_string(),
        "truncated: the file ends before its trailer"
    );
    assert_eq!(
        FormatError::PageOutOfOrder {
            pgno: 9,
            previous: 12
        }
        .to_string(),
        "page 9 out of order after page 12"
    );
    let e: &dyn std::error::Error = &FormatError::BadMagic;
    assert_eq!(e.to_string(), "bad magic");
}

/// `file` copied record by record with `page_as_stored`, as compaction does, into a file
/// compressed with `compression`; and how many pages were given a compressed payload.
fn copy_as_stored(file: &[u8], compression: Compression) -> (Vec<u8>, usize) {
    let mut d = Decoder::new();
    let mut copy = Vec::new();
    let mut enc = None;
    let mut at = 0;
    let mut compressed = 0;
    while at < file.len() {
        let (used, ev) = d.decode(&file[at..]).unwrap();
        at += used;
        match ev.unwrap() {
            Event::Header(fh) => {
                let fh = FileHeader { compression, ..fh };
                enc = Some(Encoder::new(&fh, &mut copy).unwrap())
            }
            Event::Txn(t) => enc.as_mut().unwrap().begin_txn(&t, &mut copy).unwrap(),
            Event::Page(pgno) => {
                assert!(d.stored().len() <= d.page().len());
                if d.stored().len() < d.page().len() {
                    compressed += 1;
                }
                enc.as_mut()
                    .unwrap()
                    .page_as_stored(pgno, d.page(), Some(d.stored()), &mut copy)
                    .unwrap()
            }
            Event::End => {
                enc.take().unwrap().finish(&mut copy).unwrap();
            }
        }
    }
    (copy, compressed)
}

/// A file copied record by record with `page_as_stored` (as compaction does) is byte for byte
/// the file encoded from the pages, for both compressions, compressible and incompressible
/// pages alike; a page given with a payload that is not compressed is compressed as usual.
#[test]
fn copying_pages_as_stored_gives_the_same_file() {
    for compression in [Compression::Lz4, Compression::None] {
        let h = header(Kind::Segment, compression, 4096, 10, 13);
        let (file, _, _) = encode(&h, &segment_txns(4096));
        let (copy, copied_compressed) = copy_as_stored(&file, compression);
        assert_eq!(copy, file, "{compression:?}");
        assert_eq!(
            copied_compressed > 0,
            compression == Compression::Lz4,
            "{compression:?}"
        );
    }
    // An uncompressed payload for a compressed file: compressed here.
    let h = header(Kind::Segment, Compression::Lz4, 4096, 10, 13);
    let txns = segment_txns(4096);
    let (want, _, _) = encode(&h, &txns);
    let (raw, _, _) = encode(
        &FileHeader {
            compression: Compression::None,
            ..h
        },
        &txns,
    );
    assert_eq!(copy_as_stored(&raw, Compression::Lz4).0, want);
}

/// A page that many transactions of a segment change is stored whole once and then as the
/// bytes that changed: the file is a small fraction of the same transactions' files one by one
/// (lz4 only, nothing earlier to refer to), and decodes (into the decoder's buffer and the
/// caller's, in any chunks) to every version.
#[test]
fn deltas_store_a_page_many_transactions_change_once() {
    let ps = 4096;
    let (mut counter, mut leaf) = (page(ps, 1, 0), page(ps, 5, 0));
    let mut txns = Vec::new();
    for k in 0..200u32 {
        counter = edited(&counter, (k % 250 + 1) as u8, 60);
        leaf = edited(&leaf, (k % 200 + 3) as u8, 100 + (k as usize * 13) % 3000);
        txns.push(Txn {
            time_ms: 1_700_000_000_000 + u64::from(k),
            db_pages: 8,
            pages: vec![(1, counter.clone()), (5, leaf.clone())],
        });
    }
    let h = header(Kind::Segment, Compression::Lz4, ps, 1, 200);
    let (file, _, headers) = encode(&h, &txns);
    let want = expected_events(&h, &headers, &txns);
    assert_eq!(decode(&file, usize::MAX).unwrap(), want);
    assert_eq!(decode(&file, 1000).unwrap(), want);
    assert_eq!(deltas(&file), 2 * 199);
    let one_by_one: usize = txns
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let txid = k as u64 + 1;
            let h = header(Kind::Segment, Compression::Lz4, ps, txid, txid);
            let (f, _, _) = encode(&h, std::slice::from_ref(t));
            assert_eq!(deltas(&f), 0);
            f.len()
        })
        .sum();
    assert!(
        file.len() * 10 < one_by_one,
        "{} bytes with deltas, {one_by_one} one by one",
        file.len()
    );
}

/// A delta refers only to a page in the window, the last record of the `DELTA_WINDOW_BYTES /
/// page size` page numbers most recently recorded (16 of 64 KiB pages): a page changed again
/// after 15 others is a delta, after 16 others it is stored whole again; either way the file
/// decodes to every version.
#[test]
fn a_delta_refers_only_to_a_page_in_the_window() {
    let ps = 65536u32;
    assert_eq!(DELTA_WINDOW_BYTES / ps as usize, 16);
    for (distinct, want) in [(16u32, 16), (17, 0)] {
        let mut versions: Vec<Vec<u8>> = (1..=distinct).map(|p| page(ps, p, 0)).collect();
        let mut txns = Vec::new();
        for k in 0..2 * distinct {
            let i = (k % distinct) as usize;
            versions[i] = edited(&versions[i], (k + 1) as u8, 200);
            txns.push(Txn {
                time_ms: 1_700_000_000_000 + u64::from(k),
                db_pages: distinct,
                pages: vec![(i as u32 + 1, versions[i].clone())],
            });
        }
        let h = header(
            Kind::Segment,
            Compression::Lz4,
            ps,
            1,
            u64::from(2 * distinct),
        );
        let (file, _, headers) = encode(&h, &txns);
        assert_eq!(
            decode(&file, 10_000).unwrap(),
            expected_events(&h, &headers, &txns)
        );
        assert_eq!(deltas(&file), want, "{distinct} pages in turn");
    }
}

/// Crafted delta records are refused with the rule they break: one in a file that cannot hold
/// deltas, one for a page with no earlier version, patches outside the page, a delta as long
/// as a page.
#[test]
fn decoder_rules_on_crafted_deltas() {
    let ps = 512;
    let v0 = page(ps, 2, 0);
    let txns = vec![
        Txn {
            time_ms: 1_700_000_000_000,
            db_pages: 3,
            pages: vec![(2, v0.clone())],
        },
        Txn {
            time_ms: 1_700_000_000_100,
            db_pages: 3,
            pages: vec![(2, edited(&v0, 1, 40))],
        },
        Txn {
            time_ms: 1_700_000_000_200,
            db_pages: 3,
            pages: vec![(3, page(ps, 3, 0))],
        },
    ];
    let (file, _, _) = encode(&header(Kind::Segment, Compression::Lz4, ps, 1, 3), &txns);
    let recs = records(&file);
    let (at, pgno, field) = recs[1];
    assert_eq!(pgno, 2);
    assert!(field & DELTA_FLAG != 0);
    let expect = |f: &dyn Fn(&mut Vec<u8>), want| refused_when(&file, f, want);
    expect(
        &|x| x[at..at + 4].copy_from_slice(&1u32.to_be_bytes()),
        FormatError::DeltaWithoutBase { pgno: 1 },
    );
    expect(
        &|x| x[at + 8..at + 10].copy_from_slice(&510u16.to_be_bytes()),
        FormatError::BadDelta { pgno: 2 },
    );
    expect(
        &|x| {
            let len = (field & !DELTA_FLAG) as usize;
            x[at + 4..at + 8].copy_from_slice(&(DELTA_FLAG | (len as u32 - 1)).to_be_bytes());
            x.remove(at + 8 + len - 1);
        },
        FormatError::BadDelta { pgno: 2 },
    );
    expect(
        &|x| x[at + 4..at + 8].copy_from_slice(&(DELTA_FLAG | ps).to_be_bytes()),
        FormatError::BadPageLength {
            pgno: 2,
            len: DELTA_FLAG | ps,
            page_size: ps,
        },
    );
    // The same transactions uncompressed (version 1): the second page raw; as an empty delta
    // (the page unchanged) it is refused.
    let (raw, _, _) = encode(&header(Kind::Segment, Compression::None, ps, 1, 3), &txns);
    assert_eq!(raw[4..6], [0, 1]);
    let (at, _, field) = records(&raw)[1];
    assert_eq!(field, ps);
    let mut x = raw[..at + 4].to_vec();
    x.extend_from_slice(&DELTA_FLAG.to_be_bytes());
    x.extend_from_slice(&raw[at + 8 + ps as usize..]);
    retrailer(&mut x);
    assert_eq!(
        decode(&x, usize::MAX),
        Err(FormatError::UnexpectedDelta { pgno: 2 })
    );
}

/// Patches: none for an equal page, the changed bytes otherwise (runs fewer than 8 equal bytes
/// apart in one patch), refused once they would take the limit; applying them gives the page.
#[test]
fn delta_patches() {
    let base = page(4096, 9, 0);
    let mut out = Vec::new();
    assert!(delta_into(&base, &base, &mut out, 100));
    assert!(out.is_empty());
    let mut p = base.clone();
    p[0] ^= 1;
    p[5] ^= 1; // 4 equal bytes between: one patch
    p[4095] ^= 1;
    assert!(delta_into(&base, &p, &mut out, 100));
    assert_eq!(out.len(), 4 + 6 + 4 + 1);
    assert_eq!(out[..4], [0, 0, 0, 5]);
    assert_eq!(out[10..14], [0x0f, 0xff, 0, 0]);
    let mut back = vec![0; 4096];
    assert!(apply_delta(&base, &out, &mut back));
    assert_eq!(back, p);
    assert!(!delta_into(&base, &p, &mut out, 15));
    let other = Rng::new(3).bytes(4096);
    assert!(!delta_into(&base, &other, &mut out, 2048));
    assert!(delta_into(&base, &other, &mut out, 8192));
    assert!(apply_delta(&base, &out, &mut back));
    assert_eq!(back, other);
}
