//! WAL decoding and scanning: synthetic WALs in both byte orders and several
//! page sizes, failure modes, resume, and a real SQLite fixture.

mod common;

use common::{build_wal, page, wal_header, TxnSpec};
use replited_core::hash::{page_hash, DbHashes};
use replited_core::scan::{EndOfLog, Frame, ScanError, WalPos, WalScanner, WalTxn};
use replited_core::wal::{WalHeader, FRAME_HEADER_LEN, WAL_HEADER_LEN};

/// What scanning a WAL file from `scanner`'s position to its end gives.
struct Scan {
    commits: Vec<WalTxn>,
    end: Option<EndOfLog>,
    pending_at_eof: bool,
}

fn scan_from(mut s: WalScanner, wal: &[u8]) -> (Scan, WalScanner) {
    let mut commits = Vec::new();
    let mut end = None;
    loop {
        let at = s.next_offset() as usize;
        let Some(frame) = wal.get(at..at + s.frame_len()) else {
            break;
        };
        match s.handle_frame(frame) {
            Frame::Pending => {}
            Frame::Commit(t) => commits.push(t),
            Frame::End(why) => {
                end = Some(why);
                break;
            }
        }
    }
    let pending_at_eof = s.has_pending();
    (
        Scan {
            commits,
            end,
            pending_at_eof,
        },
        s,
    )
}

fn scan(wal: &[u8]) -> (Scan, WalScanner) {
    let h = WalHeader::decode(wal).expect("header");
    scan_from(WalScanner::new(&h), wal)
}

fn three_txns() -> Vec<TxnSpec> {
    vec![
        TxnSpec {
            frames: vec![(1, 0), (2, 0), (3, 0)],
            db_pages: 3,
            commit: true,
        },
        // Page 2 written twice: the latest frame wins.
        TxnSpec {
            frames: vec![(2, 1), (5, 1), (2, 2)],
            db_pages: 5,
            commit: true,
        },
        // Not committed.
        TxnSpec {
            frames: vec![(4, 3)],
            db_pages: 0,
            commit: false,
        },
    ]
}

#[test]
fn synthetic_wals_all_orders_and_page_sizes() {
    for be in [false, true] {
        for ps in [512u32, 4096, 65536] {
            let h = wal_header(be, ps, 0xdead_beef, 0x0102_0304);
            let wal = build_wal(&h, &three_txns());
            let (r, s) = scan(&wal);
            let fl = h.frame_len() as u64;
            assert_eq!(r.commits.len(), 2, "be={be} ps={ps}");
            assert_eq!(r.end, None);
            assert!(r.pending_at_eof);
            let t1 = &r.commits[0];
            assert_eq!(t1.db_pages, 3);
            assert_eq!(t1.frames, 3);
            assert_eq!(t1.end.offset, 32 + 3 * fl);
            assert_eq!(
                t1.pages.iter().map(|p| p.pgno).collect::<Vec<_>>(),
                [1, 2, 3]
            );
            let t2 = &r.commits[1];
            assert_eq!((t2.db_pages, t2.frames), (5, 3));
            assert_eq!(t2.pages.iter().map(|p| p.pgno).collect::<Vec<_>>(), [2, 5]);
            // Latest frame for page 2 (the third frame of the txn) wins.
            assert_eq!(t2.pages[0].offset, 32 + 5 * fl + 24);
            assert_eq!(t2.pages[0].hash, page_hash(2, &page(ps, 2, 2)));
            for t in &r.commits {
                for p in &t.pages {
                    let data = &wal[p.offset as usize..p.offset as usize + ps as usize];
                    assert_eq!(p.hash, page_hash(p.pgno, data));
                }
            }
            assert_eq!(s.committed(), t2.end);
            assert_eq!(s.frames_committed(), 6);
            assert_eq!(s.next_offset(), 32 + 7 * fl);
            assert_eq!((t2.end.salt1, t2.end.salt2), (0xdead_beef, 0x0102_0304));
        }
    }
}

#[test]
fn torn_last_frame_ends_the_log() {
    let h = wal_header(false, 1024, 1, 2);
    let mut txns = three_txns();
    txns[2].frames.push((6, 3));
    txns[2].db_pages = 6;
    txns[2].commit = true;
    let mut wal = build_wal(&h, &txns);
    let fl = h.frame_len();
    // Half of the last frame's page never reached the disk.
    let n = wal.len();
    wal[n - 300..].fill(0);
    let (r, s) = scan(&wal);
    assert_eq!(r.commits.len(), 2);
    assert_eq!(r.end, Some(EndOfLog::ChecksumMismatch));
    assert!(!s.has_pending());
    assert_eq!(s.next_offset(), s.committed().offset);
    assert_eq!(s.committed().offset, (32 + 6 * fl) as u64);
    // A file cut in the middle of a frame: the caller cannot read a whole
    // frame, so the transaction stays pending.
    let cut = &wal[..n - 10];
    let (r, s) = scan(cut);
    assert_eq!((r.commits.len(), r.end), (2, None));
    assert!(s.has_pending());
}

#[test]
fn wrong_salt_ends_the_log() {
    let h = wal_header(true, 512, 10, 20);
    let wal = build_wal(&h, &three_txns());
    let fl = h.frame_len();
    // After a WAL reset, SQLite rewrites the header with new salts and then
    // overwrites frames from the start: old frames keep the old salts.
    let h2 = wal_header(true, 512, 11, 99);
    let new = build_wal(
        &h2,
        &[TxnSpec {
            frames: vec![(1, 9)],
            db_pages: 1,
            commit: true,
        }],
    );
    let mut mixed = wal.clone();
    mixed[..new.len()].copy_from_slice(&new);
    let (r, s) = scan(&mixed);
    assert_eq!(r.commits.len(), 1);
    assert_eq!(r.commits[0].pages[0].hash, page_hash(1, &page(512, 1, 9)));
    assert_eq!(r.end, Some(EndOfLog::SaltMismatch));
    assert_eq!(s.committed().offset, (32 + fl) as u64);
    // One salt differing is enough.
    for at in [8usize, 12] {
        let mut w = wal.clone();
        w[32 + 3 * fl + at] ^= 1;
        let (r, s) = scan(&w);
        assert_eq!(r.commits.len(), 1);
        assert_eq!(r.end, Some(EndOfLog::SaltMismatch));
        assert!(!s.has_pending());
    }
}

#[test]
fn corrupted_checksum_ends_the_log_and_drops_pending() {
    let h = wal_header(false, 512, 3, 4);
    let wal = build_wal(&h, &three_txns());
    let fl = h.frame_len();
    // Corrupt, in turn, each byte class of the 5th frame (2nd of txn 2).
    for at in [0usize, 3, 4, 7, 16, 20, 23, 24, 200, fl - 1] {
        let mut w = wal.clone();
        w[32 + 4 * fl + at] ^= 0x40;
        let (r, s) = scan(&w);
        assert_eq!(r.commits.len(), 1, "byte {at}");
        assert_eq!(r.end, Some(EndOfLog::ChecksumMismatch), "byte {at}");
        assert!(!s.has_pending());
        assert_eq!(s.next_offset(), s.committed().offset);
        assert_eq!(s.committed(), r.commits[0].end);
    }
    // A valid chain is not enough: page number 0 is invalid as in SQLite.
    let mut out = h.encode().to_vec();
    replited_core::wal::encode_frame(&h, h.checksum, 0, 1, &page(512, 0, 0), &mut out);
    let (r, _) = scan(&out);
    assert_eq!(r.end, Some(EndOfLog::ChecksumMismatch));
}

#[test]
fn frames_written_after_the_end_are_picked_up() {
    let h = wal_header(false, 512, 5, 6);
    let full = build_wal(&h, &three_txns());
    let fl = h.frame_len();
    // The scanner sees garbage where txn 2 will be written...
    let mut early = full.clone();
    early[32 + 3 * fl..].fill(0xaa);
    let (r, s) = scan(&early);
    assert_eq!((r.commits.len(), r.end), (1, Some(EndOfLog::SaltMismatch)));
    // ...then the writer finishes: scanning again from the same scanner.
    let (r2, s2) = scan_from(s, &full);
    assert_eq!(r2.commits.len(), 1);
    assert_eq!(r2.commits[0].db_pages, 5);
    assert_eq!(s2.frames_committed(), 6);
}

#[test]
fn resume_continues_identically() {
    let h = wal_header(true, 1024, 77, 88);
    let mut txns = Vec::new();
    for i in 0..8u32 {
        txns.push(TxnSpec {
            frames: (0..=i % 3).map(|k| (1 + (i * 7 + k) % 9, i)).collect(),
            db_pages: 9,
            commit: true,
        });
    }
    let wal = build_wal(&h, &txns);
    let (all, _) = scan(&wal);
    assert_eq!(all.commits.len(), 8);
    let mut positions = vec![WalPos::start(&h)];
    positions.extend(all.commits.iter().map(|t| t.end));
    for (k, pos) in positions.iter().enumerate() {
        let s = WalScanner::resume(&h, *pos).unwrap();
        assert_eq!(s.committed(), *pos);
        assert_eq!(s.next_offset(), pos.offset);
        assert_eq!(
            s.frames_committed(),
            (pos.offset - 32) / h.frame_len() as u64
        );
        let (rest, _) = scan_from(s, &wal);
        assert_eq!(rest.commits, all.commits[k..]);
    }
    // Positions that cannot be resumed from.
    let mut bad = all.commits[0].end;
    bad.salt2 ^= 1;
    assert!(matches!(
        WalScanner::resume(&h, bad),
        Err(ScanError::SaltMismatch { .. })
    ));
    for offset in [0u64, 31, 33, 32 + h.frame_len() as u64 - 1] {
        let mut bad = all.commits[0].end;
        bad.offset = offset;
        assert_eq!(
            WalScanner::resume(&h, bad).err(),
            Some(ScanError::BadOffset {
                offset,
                frame_len: h.frame_len() as u64
            })
        );
    }
    // A resume position with the wrong checksum: the next frame does not chain.
    let mut bad = all.commits[2].end;
    bad.checksum.0 ^= 1;
    let (r, _) = scan_from(WalScanner::resume(&h, bad).unwrap(), &wal);
    assert_eq!(
        (r.commits.len(), r.end),
        (0, Some(EndOfLog::ChecksumMismatch))
    );
}

fn read_fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A WAL written by SQLite itself (see tests/fixtures/make_wal_fixture.py):
/// scanning finds exactly the committed transactions, and applying their
/// pages to the database file gives the checkpointed database.
#[test]
fn real_sqlite_wal() {
    let wal = read_fixture("sqlite.db-wal");
    let base = read_fixture("sqlite.db-base");
    let fin = read_fixture("sqlite.db-final");
    let sizes: Vec<Option<u32>> = String::from_utf8(read_fixture("sqlite.txns"))
        .unwrap()
        .lines()
        .map(|l| l.parse().ok())
        .collect();
    let h = WalHeader::decode(&wal).unwrap();
    assert_eq!(h.page_size, 1024);
    let (r, s) = scan(&wal);
    assert_eq!(r.end, None);
    assert!(!r.pending_at_eof);
    assert_eq!(s.committed().offset, wal.len() as u64);
    assert_eq!(r.commits.len(), sizes.len());
    let ps = h.page_size as usize;
    let mut db = base.clone();
    let mut hashes = DbHashes::new(h.page_size);
    for (i, chunk) in base.chunks(ps).enumerate() {
        hashes.set(i as u32 + 1, page_hash(i as u32 + 1, chunk));
    }
    for (t, want) in r.commits.iter().zip(&sizes) {
        if let Some(want) = want {
            assert_eq!(t.db_pages, *want);
        }
        for p in &t.pages {
            let data = &wal[p.offset as usize..p.offset as usize + ps];
            let at = (p.pgno as usize - 1) * ps;
            if db.len() < at + ps {
                db.resize(at + ps, 0);
            }
            db[at..at + ps].copy_from_slice(data);
            hashes.set(p.pgno, p.hash);
        }
        db.resize(t.db_pages as usize * ps, 0);
        hashes.set_page_count(t.db_pages);
        assert!(t.pages.windows(2).all(|w| w[0].pgno < w[1].pgno));
        assert!(t.frames as usize >= t.pages.len());
    }
    assert_eq!(db, fin);
    let mut want = DbHashes::new(h.page_size);
    for (i, chunk) in fin.chunks(ps).enumerate() {
        want.set(i as u32 + 1, page_hash(i as u32 + 1, chunk));
    }
    assert_eq!(hashes.checksum(), want.checksum());
    assert_eq!(WAL_HEADER_LEN + FRAME_HEADER_LEN, 56);
}
