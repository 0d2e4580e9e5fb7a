//! The replica-side applier, end to end: history captured by the real `replited` binary from a
//! real SQLite load (python3's sqlite3), read back from the backup directory through the
//! daemon's decoder, applied with `replited::apply::Applier` to a replica restored by the real
//! `replited restore`, while another connection keeps reading the replica.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use replited::apply::{Applier, ApplyError};
use replited::reader::decode_file;
use replited::storage::{FsStorage, Storage};
use replited_core::format::Event;
use replited_core::hash::{page_hash, DbHashes};
use replited_core::name::FileMeta;
use replited_core::plan::{plan_restore, Target};
use rusqlite::Connection;

const BUSY: Duration = Duration::from_secs(5);

/// One transaction as stored.
struct Txn {
    txid: u64,
    db_pages: u32,
    db_checksum: u64,
    pages: Vec<(u32, Vec<u8>)>,
}

/// Every transaction of a stored file, in order.
fn read_txns(storage: &FsStorage, meta: &FileMeta) -> Vec<Txn> {
    let mut out: Vec<Txn> = Vec::new();
    decode_file(storage, meta, |ev, dec| {
        match ev {
            Event::Txn(t) => out.push(Txn {
                txid: t.txid,
                db_pages: t.db_pages,
                db_checksum: t.db_checksum,
                pages: Vec::with_capacity(t.page_count as usize),
            }),
            Event::Page(pgno) => out
                .last_mut()
                .expect("a transaction header first")
                .pages
                .push((*pgno, dec.page().to_vec())),
            Event::Header(_) | Event::End => {}
        }
        Ok(true)
    })
    .unwrap();
    out
}

/// The latest plan of the backup: the snapshot's transaction and every later one.
fn stored_history(w: &World) -> (Txn, Vec<Txn>) {
    let storage = FsStorage::new(&w.backup, "data.db");
    let files = storage.list().unwrap();
    let plan = plan_restore(&files, Target::Latest).unwrap();
    let mut snap = read_txns(&storage, &files[plan.snapshot]);
    assert_eq!(snap.len(), 1, "a snapshot holds one transaction");
    let snap = snap.pop().unwrap();
    let mut txns = Vec::new();
    for &i in &plan.segments {
        txns.extend(read_txns(&storage, &files[i]));
    }
    assert_eq!(txns.last().map_or(snap.txid, |t| t.txid), plan.last_txid);
    (snap, txns)
}

/// `replited restore --txid` into `out`.
fn restore_at(w: &World, out: &Path, txid: u64) {
    let r = w.restore(&["-o", out.to_str().unwrap(), "--txid", &txid.to_string()]);
    assert!(r.status.success(), "restore --txid {txid}: {}", stderr(&r));
}

/// Applies every transaction after the applier's position; returns the page count after each.
fn apply_all(a: &mut Applier, txns: &[Txn], check: &Connection) -> Vec<u32> {
    let mut counts = Vec::new();
    for t in txns {
        if t.txid <= a.applied_txid().unwrap() {
            continue;
        }
        let sum = a
            .apply(t.txid, t.db_pages, t.db_checksum, &t.pages)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sum, t.db_checksum);
        assert_eq!(a.page_count(), t.db_pages);
        // What SQLite itself reports to a fresh read transaction of another connection.
        let n: u32 = check
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, t.db_pages, "PRAGMA page_count after {:016x}", t.txid);
        counts.push(n);
    }
    counts
}

/// A connection opened on the replica before anything is applied, reading it continuously
/// (never reopened): the ledger total is always 4000 and meta.i never goes back.
struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, u64, u64)>,
}

impl Reader {
    fn spawn(db: &Path) -> Reader {
        let c = Connection::open(db).unwrap();
        c.busy_timeout(BUSY).unwrap();
        let first = read_state(&c);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut last, mut reads, mut changes) = (first, 0u64, 0u64);
            loop {
                let done = s.load(Ordering::SeqCst);
                let i = read_state(&c);
                assert!(i >= last, "meta.i went back from {last} to {i}");
                if i != last {
                    changes += 1;
                }
                last = i;
                reads += 1;
                if done {
                    return (last, reads, changes);
                }
            }
        });
        Reader { stop, thread }
    }

    /// Stops the reader after one more read; (last i seen, reads, times i changed).
    fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("reader")
    }
}

fn read_state(c: &Connection) -> u64 {
    let total: i64 = c
        .prepare_cached("SELECT sum(balance) FROM ledger")
        .unwrap()
        .query_row([], |r| r.get(0))
        .unwrap();
    assert_eq!(total, 4000, "a reader saw a ledger total of {total}");
    c.prepare_cached("SELECT v FROM meta WHERE k = 'i'")
        .unwrap()
        .query_row([], |r| r.get(0))
        .unwrap()
}

fn meta_i(db: &Path) -> u64 {
    read_state(&Connection::open(db).unwrap())
}

/// The whole-database checksum SQLite shows for a database, page 1 taken as it is.
fn file_checksum(db: &Path) -> u64 {
    Tracker::read(db).1.checksum()
}

/// Replays the primary's whole history onto a replica restored from its snapshot, with a
/// reader on the replica all along; returns (page count after each transaction, snapshot).
fn replay(w: &World, replica: &Path) -> (Vec<u32>, u32) {
    let (snap, txns) = stored_history(w);
    restore_at(w, replica, snap.txid);
    let mut a = Applier::open(replica, BUSY).unwrap();
    assert_eq!(
        a.checksum(),
        snap.db_checksum,
        "the restored snapshot's checksum"
    );
    assert_eq!(a.page_count(), snap.db_pages);
    a.set_applied_txid(snap.txid);
    let check = Connection::open(replica).unwrap();
    let reader = Reader::spawn(replica);
    let started = Instant::now();
    let counts = apply_all(&mut a, &txns, &check);
    let took = started.elapsed();
    let (last_i, reads, changes) = reader.finish();
    eprintln!(
        "applied {} transactions in {took:?}; the reader read {reads} times and saw meta.i change {changes} times",
        counts.len()
    );
    assert!(!txns.is_empty());
    assert_eq!(a.applied_txid(), Some(txns.last().unwrap().txid));
    assert_eq!(last_i, state(&w.db).0, "the reader sees the final state");
    assert!(changes > 1, "the reader saw the replica move along");
    assert!(!a.local_write_detected().unwrap());
    // Reopened with the primary's page-1 stamp, the database reads back to the same checksum.
    let stamp = a.stamp();
    drop(a);
    let b = Applier::open_with_stamp(replica, BUSY, stamp).unwrap();
    assert_eq!(b.checksum(), txns.last().unwrap().db_checksum);
    drop(b);
    assert_eq!(integrity(replica), "ok");
    assert_eq!(
        state(replica),
        state(&w.db),
        "replica content differs from the primary"
    );
    (counts, snap.db_pages)
}

/// The scenario of the brief: 1,500 transactions captured by replited, applied one SQLite
/// transaction each while a reader keeps one connection open on the replica.
#[test]
fn replica_follows_primary_with_live_reader() {
    let w = World::new("");
    let d = w.start("pread");
    run_load(&w.db, 1, 1500);
    d.stop();
    let replica = w.path("replica.db");
    let (counts, _) = replay(&w, &replica);
    assert!(counts.len() >= 1500, "{} transactions", counts.len());
    assert_eq!(state(&replica).0, 1500);
}

/// The database grows (300 rows of 3,000 bytes in a new table), then shrinks (VACUUM on the
/// primary after deleting them and most items, while replited runs, between loads); the replica
/// follows, PRAGMA page_count agreeing after every transaction.
#[test]
fn growth_and_shrink() {
    let w = World::new("");
    grow_and_shrink(&w);
    let replica = w.path("replica.db");
    let (counts, snap_pages) = replay(&w, &replica);
    let peak = *counts.iter().max().unwrap();
    let at = counts.iter().position(|&n| n == peak).unwrap();
    let after = *counts[at..].iter().min().unwrap();
    eprintln!(
        "pages: snapshot {snap_pages}, peak {peak}, after VACUUM {after}, final {}",
        counts.last().unwrap()
    );
    assert!(peak > 300, "grew from {snap_pages} to {peak}");
    assert!(after * 5 < peak, "shrank from {peak} to {after}");
    let r = Connection::open(&replica).unwrap();
    let n: u32 = r.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    assert_eq!(n, *counts.last().unwrap());
    let big: i64 = r
        .query_row("SELECT count(*) FROM big", [], |r| r.get(0))
        .unwrap();
    assert_eq!(big, 0);
}

/// The same history applied as a replica that is behind applies it: runs of transactions that
/// each `joins_batch` the one before, merged into one (`Txn::merged`) and applied as one SQLite
/// transaction (`Applier::apply_run`), a shrinking transaction starting a run alone. Every run
/// ends at its last transaction's checksum (the applier checks it before COMMIT), and the
/// replica ends equal to the primary, as one-by-one does.
#[test]
fn runs_merged_into_one_reach_the_same_states() {
    use replited_core::proto::{joins_batch, Txn as Wire, TxnInfo};
    let w = World::new("");
    grow_and_shrink(&w);
    let (snap, txns) = stored_history(&w);
    let replica = w.path("replica.db");
    restore_at(&w, &replica, snap.txid);
    let mut a = Applier::open(&replica, BUSY).unwrap();
    a.set_applied_txid(snap.txid);
    let mut txns = txns
        .into_iter()
        .filter(|t| t.txid > snap.txid)
        .map(|t| Wire {
            generation: 1,
            header: TxnInfo {
                txid: t.txid,
                time_ms: 0,
                db_pages: t.db_pages,
                db_checksum: t.db_checksum,
            },
            pages: t.pages,
        })
        .peekable();
    let (mut runs, mut merged, mut shrinks, mut last) = (0, 0, 0, 0);
    while let Some(t) = txns.next() {
        let mut run = vec![t];
        if run[0].header.db_pages >= a.page_count() {
            let mut bytes = run[0].data_len();
            while let Some(t) =
                txns.next_if(|t| joins_batch(&run[run.len() - 1], t, bytes, 1 << 20))
            {
                bytes += t.data_len();
                run.push(t);
            }
        } else {
            shrinks += 1;
        }
        let first = run[0].header.txid;
        merged += run.len() - 1;
        let t = Wire::merged(run).unwrap();
        let h = t.header;
        let sum = a
            .apply_run(first, h.txid, h.db_pages, h.db_checksum, &t.pages)
            .unwrap_or_else(|e| panic!("run {first:016x}..={:016x}: {e}", h.txid));
        assert_eq!(sum, h.db_checksum);
        assert_eq!(a.page_count(), h.db_pages);
        last = h.db_checksum;
        runs += 1;
    }
    eprintln!("{runs} runs, {merged} transactions merged into another, {shrinks} shrinking");
    assert!(
        merged > runs,
        "runs were merged: {runs} runs, {merged} merged"
    );
    assert!(shrinks >= 1, "the VACUUM shrank the database");
    // Reopened with the primary's page-1 stamp, the database reads back to the last checksum.
    let stamp = a.stamp();
    drop(a);
    let b = Applier::open_with_stamp(&replica, BUSY, stamp).unwrap();
    assert_eq!(b.checksum(), last);
    drop(b);
    assert_eq!(integrity(&replica), "ok");
    assert_eq!(state(&replica), state(&w.db));
}

/// A history that grows the database (300 rows of 3,000 bytes in a new table), then shrinks it
/// (VACUUM on the primary after deleting them and most items, while replited runs, between
/// loads).
fn grow_and_shrink(w: &World) {
    let d = w.start("pread");
    run_load(&w.db, 1, 300);
    let c = Connection::open(&w.db).unwrap();
    c.busy_timeout(BUSY).unwrap();
    c.execute_batch("CREATE TABLE big (id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
        .unwrap();
    for _ in 0..3 {
        c.execute_batch(
            "BEGIN IMMEDIATE;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
             INSERT INTO big (b) SELECT randomblob(3000) FROM n;
             COMMIT;",
        )
        .unwrap();
    }
    run_load(&w.db, 301, 350);
    c.execute_batch("DELETE FROM big; DELETE FROM items WHERE id % 10 != 0; VACUUM;")
        .unwrap();
    drop(c);
    run_load(&w.db, 351, 400);
    d.stop();
}

/// Reads a database's pages through sqlite_dbpage and hands out the difference since the
/// last read as a transaction: a miniature capture, for tests that need no daemon.
struct Tracker {
    db: PathBuf,
    pages: Vec<Vec<u8>>,
}

impl Tracker {
    fn new(db: &Path) -> Tracker {
        Tracker {
            db: db.to_path_buf(),
            pages: Tracker::read(db).0,
        }
    }

    fn read(db: &Path) -> (Vec<Vec<u8>>, DbHashes) {
        let c = Connection::open(db).unwrap();
        c.busy_timeout(BUSY).unwrap();
        c.execute_batch("BEGIN").unwrap();
        let ps: u32 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        let mut h = DbHashes::new(ps);
        let mut pages = Vec::new();
        let mut stmt = c
            .prepare("SELECT pgno, data FROM sqlite_dbpage('main')")
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            let pgno: u32 = r.get(0).unwrap();
            let data: Vec<u8> = r.get(1).unwrap();
            assert_eq!(pgno as usize, pages.len() + 1);
            h.set(pgno, page_hash(pgno, &data));
            pages.push(data);
        }
        (pages, h)
    }

    /// The primary's changes since the last call: (db_pages, checksum, changed pages).
    fn next(&mut self) -> (u32, u64, Vec<(u32, Vec<u8>)>) {
        let (now, h) = Tracker::read(&self.db);
        let changed = now
            .iter()
            .enumerate()
            .filter(|(i, p)| self.pages.get(*i) != Some(p))
            .map(|(i, p)| (i as u32 + 1, p.clone()))
            .collect();
        self.pages = now;
        (h.page_count(), h.checksum(), changed)
    }
}

/// A primary with 100 transactions of the load, no daemon, and a replica copied from it.
fn mini_world() -> (World, PathBuf, Tracker, Applier) {
    let w = World::new("");
    run_load(&w.db, 1, 100);
    let r = checkpoint(&w.db, "TRUNCATE");
    assert!(r.contains("(0, 0, 0)"), "checkpoint: {r}");
    let replica = w.path("replica.db");
    std::fs::copy(&w.db, &replica).unwrap();
    let tracker = Tracker::new(&w.db);
    let mut a = Applier::open(&replica, BUSY).unwrap();
    a.set_applied_txid(100);
    assert_eq!(a.checksum(), file_checksum(&w.db));
    (w, replica, tracker, a)
}

/// Runs load transaction `i` on the primary and applies it to the replica as txid `i`.
fn step(w: &World, tr: &mut Tracker, a: &mut Applier, i: u64) {
    run_load(&w.db, i, i);
    let (n, sum, pages) = tr.next();
    a.apply(i, n, sum, &pages).unwrap_or_else(|e| panic!("{e}"));
}

/// The schema grows past page 1 (`sqlite_master` becomes a b-tree of several pages), one
/// table per transaction with a row written after each: every transaction applies, and the
/// replica's own schema reads (the local-write check) see each new table. Before the applier
/// dropped its page cache after a schema change, SQLite re-read `sqlite_master` with the cell
/// layout it had parsed before `sqlite_dbpage` replaced the bytes: "database disk image is
/// malformed" (found by the soak at the 45th table of tests/load.py).
#[test]
fn schema_outgrowing_page_one() {
    let (w, replica, mut tr, mut a) = mini_world();
    let c = Connection::open(&w.db).unwrap();
    let mut txid = 100;
    let mut apply = |a: &mut Applier, tr: &mut Tracker| {
        txid += 1;
        let (n, sum, pages) = tr.next();
        a.apply(txid, n, sum, &pages)
            .unwrap_or_else(|e| panic!("transaction {txid}: {e}"));
        assert!(!a.local_write_detected().unwrap());
    };
    for k in 0..80 {
        c.execute_batch(&format!(
            "CREATE TABLE side_{k} (x INTEGER NOT NULL, note_{k}_with_a_long_column_name TEXT)"
        ))
        .unwrap();
        apply(&mut a, &mut tr);
        c.execute(&format!("INSERT INTO side_{k} (x) VALUES ({k})"), [])
            .unwrap();
        apply(&mut a, &mut tr);
    }
    let master_pages: i64 = c
        .query_row(
            "SELECT count(*) FROM dbstat WHERE name = 'sqlite_schema'",
            [],
            |r| r.get(0),
        )
        .or_else(|_| {
            c.query_row(
                "SELECT (SELECT sum(length(sql)) FROM sqlite_master) / 3000 + 1",
                [],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert!(
        master_pages > 1,
        "sqlite_master spans {master_pages} page(s)"
    );
    drop(a);
    assert_eq!(integrity(&replica), "ok");
    let r = Connection::open(&replica).unwrap();
    let n: i64 = r
        .query_row("SELECT count(*) FROM side_79", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(state(&replica), state(&w.db));
}

/// A transaction whose recorded checksum (or page count) is wrong is written, found wrong
/// before COMMIT and rolled back: the replica is exactly as before, and the right one then
/// applies.
#[test]
fn bad_transaction_is_refused() {
    let (w, replica, mut tr, mut a) = mini_world();
    // Make the replica's page 1 carry this SQLite's stamp first.
    for i in 101..=110 {
        step(&w, &mut tr, &mut a, i);
    }
    let reader = Reader::spawn(&replica);
    let before = (a.checksum(), a.page_count(), state(&replica));
    let stamp = a.stamp();

    // Transaction 160 grows the database (3,000-byte rows every 50th transaction).
    run_load(&w.db, 111, 160);
    let (n, sum, pages) = tr.next();
    assert!(n > a.page_count(), "the transaction grows the database");
    assert!(pages.iter().any(|(p, _)| *p == 1));

    let e = a.apply(111, n, sum ^ 1, &pages).unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(e, ApplyError::ChecksumMismatch { txid: 111, expected, actual } if expected == sum ^ 1 && actual == sum),
        "{e:?}"
    );
    assert_eq!((a.checksum(), a.page_count(), state(&replica)), before);
    assert_eq!(meta_i(&replica), 110);

    // A page count the pages do not agree with (and a checksum that would match it).
    let bigger = sum ^ DbHashes::new(a.page_size()).zero_page_hash(n + 1);
    let e = a.apply(111, n + 1, bigger, &pages).unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(e, ApplyError::PageCountMismatch { txid: 111, expected, actual } if expected == n + 1 && actual == n),
        "{e:?}"
    );
    assert_eq!((a.checksum(), a.page_count(), state(&replica)), before);

    // Malformed transactions are refused before anything starts.
    let mut short = pages.clone();
    short[0].1.pop();
    let e = a.apply(111, n, sum, &short).unwrap_err();
    assert!(matches!(e, ApplyError::Invalid { txid: 111, .. }), "{e:?}");
    let e = a.apply(112, n, sum, &pages).unwrap_err();
    assert!(
        matches!(
            e,
            ApplyError::OutOfOrder {
                txid: 112,
                applied: 110
            }
        ),
        "{e:?}"
    );

    // Nothing changed on disk: the file reads back to the same checksum.
    assert!(!a.local_write_detected().unwrap());
    let again = Applier::open_with_stamp(&replica, BUSY, stamp).unwrap();
    assert_eq!(again.checksum(), before.0);
    drop(again);

    assert_eq!(a.apply(111, n, sum, &pages).unwrap(), sum);
    let (last_i, _, _) = reader.finish();
    assert_eq!(last_i, 160);
    assert_eq!(integrity(&replica), "ok");
    assert_eq!(state(&replica), state(&w.db));
}

/// A write made on the replica behind the applier's back is detected (and then every apply is
/// refused); reads, checkpoints and the applier's own writes are not local writes, and neither
/// are commits that leave the content as it was.
#[test]
fn local_write_is_detected() {
    let (w, replica, mut tr, mut a) = mini_world();
    assert!(!a.local_write_detected().unwrap());
    for i in 101..=160 {
        step(&w, &mut tr, &mut a, i);
    }
    assert!(!a.local_write_detected().unwrap());

    let other = Connection::open(&replica).unwrap();
    other.busy_timeout(BUSY).unwrap();
    assert_eq!(read_state(&other), 160);
    other
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .unwrap();
    assert!(!a.local_write_detected().unwrap());
    // Two commits that end where they started: data_version moves, the content does not.
    other
        .execute_batch("UPDATE meta SET v = v + 1 WHERE k = 'i'")
        .unwrap();
    other
        .execute_batch("UPDATE meta SET v = v - 1 WHERE k = 'i'")
        .unwrap();
    assert!(!a.local_write_detected().unwrap());
    step(&w, &mut tr, &mut a, 161);

    other
        .execute_batch("INSERT INTO meta VALUES('x', 1)")
        .unwrap();
    assert!(a.local_write_detected().unwrap());
    assert!(a.local_write_detected().unwrap(), "stays detected");
    run_load(&w.db, 162, 162);
    let (n, sum, pages) = tr.next();
    let e = a.apply(162, n, sum, &pages).unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(e, ApplyError::LocalWrite { txid: 162, .. }),
        "{e:?}"
    );
    assert_eq!(meta_i(&replica), 161);
}

/// apply itself notices a local write made since the last apply, without being asked.
#[test]
fn apply_refuses_after_local_write() {
    let (w, replica, mut tr, mut a) = mini_world();
    step(&w, &mut tr, &mut a, 101);
    let other = Connection::open(&replica).unwrap();
    other
        .execute_batch("UPDATE ledger SET balance = balance + 1 WHERE acct = 0")
        .unwrap();
    run_load(&w.db, 102, 102);
    let (n, sum, pages) = tr.next();
    let e = a.apply(102, n, sum, &pages).unwrap_err();
    assert!(
        matches!(e, ApplyError::LocalWrite { txid: 102, .. }),
        "{e:?}"
    );
    assert!(a.local_write_detected().unwrap());
}

/// A reader holding one long read transaction keeps its snapshot while transactions are
/// applied (they are not blocked by it), and sees the newest state once it ends it.
#[test]
fn long_read_transaction() {
    let (w, replica, mut tr, mut a) = mini_world();
    let reader = Connection::open(&replica).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    assert_eq!(read_state(&reader), 100);
    a.checkpoint_every = 4;
    for i in 101..=170 {
        step(&w, &mut tr, &mut a, i);
        assert_eq!(read_state(&reader), 100, "the snapshot holds");
    }
    reader.execute_batch("COMMIT").unwrap();
    assert_eq!(read_state(&reader), 170);
    assert_eq!(integrity(&replica), "ok");
    assert_eq!(state(&replica), state(&w.db));
    // With the reader gone, the periodic checkpoints let the WAL be reused.
    for i in 171..=200 {
        step(&w, &mut tr, &mut a, i);
    }
    let wal = std::fs::metadata(w.path("replica.db-wal")).unwrap().len();
    eprintln!("replica WAL: {wal} bytes");
    assert_eq!(state(&replica), state(&w.db));
}

/// History read back for a replica (`stream_history`) stops at its byte budget in whole
/// transactions, even inside a file holding many more (compaction's merged segments are large):
/// what it keeps in memory is bounded by the budget, not by the file. Unbounded, it returns
/// every later transaction.
#[test]
fn history_reads_stop_at_their_budget() {
    use replited::server::stream_history;
    use replited_core::format::Kind;
    use replited_core::pos::Pos;
    let w = World::new("sync-interval = \"300ms\"\ncompaction-interval = \"1h\"");
    let d = w.start("pread");
    run_load(&w.db, 1, 600);
    d.stop();
    let storage = FsStorage::new(&w.backup, "data.db");
    let files = storage.list().unwrap();
    let big = *files
        .iter()
        .filter(|m| m.kind == Kind::Segment)
        .max_by_key(|m| m.last_txid - m.first_txid)
        .unwrap();
    let held = (big.last_txid - big.first_txid + 1) as usize;
    assert!(held >= 10, "the largest segment holds {held} transactions");
    let after = Pos {
        generation: big.generation,
        txid: big.first_txid - 1,
    };
    let budget = 4096;
    // Whole transactions up to `max_bytes` of page data (the one that crosses it is the last).
    let read_up_to = |max_bytes: usize| {
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        stream_history(&storage, &files, after, &mut |t| {
            bytes += t.data_len();
            out.push(t);
            Ok(bytes < max_bytes)
        })
        .unwrap();
        out
    };
    let got = read_up_to(budget);
    assert!(!got.is_empty());
    for (i, t) in got.iter().enumerate() {
        assert_eq!(t.header.txid, big.first_txid + i as u64);
    }
    let bytes: usize = got.iter().map(|t| t.data_len()).sum();
    let last = got.last().unwrap().data_len();
    assert!(
        bytes - last < budget && got.len() < held,
        "{} transactions, {bytes} bytes for a budget of {budget} (the file holds {held})",
        got.len()
    );
    let all = read_up_to(usize::MAX);
    let newest = files.iter().map(|m| m.last_txid).max().unwrap();
    assert_eq!(all.len() as u64, newest - big.first_txid + 1);
    assert_eq!(all.last().unwrap().header.txid, newest);
}
