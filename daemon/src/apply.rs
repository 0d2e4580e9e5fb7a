//! The replica's side of replication: applying the primary's transactions to a local database
//! while applications keep reading it.
//!
//! Each primary transaction becomes **one SQLite write transaction** made through SQLite's own
//! pager with the `sqlite_dbpage` virtual table: `BEGIN IMMEDIATE`, one
//! `INSERT INTO sqlite_dbpage(schema, pgno, data)` per page, `COMMIT`. Readers with connections
//! open on the replica (PocketBase) see each transaction whole or not at all, and the WAL and
//! its index stay SQLite's business: replited never writes the database file, the `-wal` or the
//! `-shm` itself.
//!
//! Things about SQLite this module depends on (SQLite 3.50, `ext/misc/dbpage.c` and the pager):
//!
//! * **Page 1 is written last, pages in descending order.** A statement that (re)loads the
//!   schema once the new page 1 is in the pager checks every root page against the page count
//!   the b-tree layer read at `BEGIN`, which `sqlite_dbpage` writes do not update: a table
//!   created on the primary beyond the old end then gives "malformed database schema …
//!   invalid rootpage" (seen when page 1 went first). With page 1 last, nothing but the
//!   truncation (whose root pages are all below the old end) and `COMMIT` follows it. (The
//!   `sqlite_dbpage` statements themselves do not check the schema cookie, so this
//!   connection's cached schema may lag; it only ever uses `sqlite_dbpage` and pragmas.)
//! * **Truncation is an `INSERT` of `NULL` data at `new_page_count + 1`, and must be the last
//!   write.** SQLite only records it and truncates the pager's image just before the commit
//!   (`xSync`); any later page write cancels it.
//! * **`PRAGMA page_count` inside the transaction is the count at `BEGIN`.** It comes from the
//!   b-tree layer, which `sqlite_dbpage` bypasses. What SQLite reports once the transaction
//!   commits is the in-header database size of page 1 (offset 28), so that is what is checked
//!   before `COMMIT` (it must equal the transaction's page count), and the pager's own size
//!   (which becomes the WAL commit frame's size) is made equal to it by writing the last page
//!   or truncating.
//! * **SQLite stamps page 1 at every WAL commit that writes it**: the change counter (bytes
//!   24..28 and 92..96) and *its own* version number (96..100). The replica's page 1 therefore
//!   differs from the primary's in those 12 bytes whenever the two run different SQLite
//!   versions — and the counter can differ too: it is one more than the pager's cached copy,
//!   which is not refreshed after the connection's own WAL commits (seen: primary at 5, the
//!   replica stamped 4 again). The checksums this module tracks and compares are the primary's (computed from
//!   the bytes shipped); when it re-reads the database it hashes page 1 with the primary's
//!   stamp put back ([`Page1Stamp`]). A replica reopened after the applier wrote page 1 needs
//!   that stamp to match the primary's checksum again: [`Applier::stamp`] and
//!   [`Applier::open_with_stamp`].
//! * **`PRAGMA data_version`** changes only when *another* connection commits (not for this
//!   connection's own commits, nor for checkpoints), which makes detecting local writes cheap.
//!
//! Closing: unlike replited's connections to a primary (`sqlite::open` sets
//! `SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE` because the primary's WAL is what replited captures),
//! the replica's connection closes normally: if it is the last connection, SQLite checkpoints
//! the WAL into the database and removes it, which is what one wants of a replica — nothing reads
//! the replica's WAL but SQLite. While it runs, a PASSIVE checkpoint every
//! [`Applier::checkpoint_every`] applied transactions keeps the WAL from growing without bound
//! (a reader holding a read transaction can still hold the WAL's reset back; SQLite's own
//! autocheckpoint stays on too).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use replited_core::hash::{page_hash, DbHashes};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::sqlite;

/// The bytes of page 1 SQLite rewrites at every WAL commit that writes page 1, in order:
/// 24..28 (file change counter), 92..96 (version-valid-for) and 96..100 (SQLite version
/// number). [`Applier::stamp`] gives the primary's; the file may hold this SQLite's.
pub type Page1Stamp = [u8; 12];

/// The stamp bytes of a page 1 (see [`Page1Stamp`]).
pub fn stamp_of(page1: &[u8]) -> Page1Stamp {
    let mut s = [0u8; 12];
    let mut at = 0;
    for r in STAMP_RANGES {
        s[at..at + r.len()].copy_from_slice(&page1[r.clone()]);
        at += r.len();
    }
    s
}

/// Where the stamp's bytes live in page 1.
const STAMP_RANGES: [std::ops::Range<usize>; 2] = [24..28, 92..100];

/// Applied transactions between two PASSIVE checkpoints, by default.
pub const DEFAULT_CHECKPOINT_EVERY: u32 = 128;

/// Why a transaction was not applied. In every case the replica database and the applier's
/// state are as they were before the call (the SQLite transaction, if one was started, was
/// rolled back).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The whole-database checksum after the transaction (computed from the pages written)
    /// differs from the one the primary recorded.
    #[error("transaction {txid:016x}: whole-database checksum mismatch: the primary recorded {expected:#018x}, applying the transaction gives {actual:#018x}; rolled back, nothing applied")]
    ChecksumMismatch {
        /// The transaction.
        txid: u64,
        /// The checksum recorded with the transaction.
        expected: u64,
        /// The checksum the replica would have had.
        actual: u64,
    },
    /// The database size SQLite would report after the transaction (page 1's in-header
    /// database size) differs from the transaction's page count.
    #[error("transaction {txid:016x}: page count mismatch: the transaction says {expected} pages, SQLite would see {actual} (page 1's in-header database size); rolled back, nothing applied")]
    PageCountMismatch {
        /// The transaction.
        txid: u64,
        /// The transaction's page count.
        expected: u32,
        /// What page 1 says.
        actual: u32,
    },
    /// The transaction does not follow the last one applied.
    #[error("transaction {txid:016x} does not follow the last applied transaction {applied:016x}; nothing applied")]
    OutOfOrder {
        /// The transaction.
        txid: u64,
        /// The last transaction applied.
        applied: u64,
    },
    /// The transaction is malformed (page order, page number, page length, page 1 header).
    #[error("transaction {txid:016x} is malformed: {reason}; nothing applied")]
    Invalid {
        /// The transaction.
        txid: u64,
        /// What is wrong.
        reason: String,
    },
    /// The replica database no longer holds what the applier last applied: something wrote to
    /// it behind replited's back. The replica must be rebuilt; every later apply is refused.
    #[error("transaction {txid:016x} refused: the replica database was written behind replited's back (its checksum is {actual:#018x}, the last applied state's is {expected:#018x}); it must be rebuilt")]
    LocalWrite {
        /// The transaction refused.
        txid: u64,
        /// The checksum of the last applied state.
        expected: u64,
        /// The checksum of what the database holds.
        actual: u64,
    },
    /// SQLite failed; the transaction was rolled back.
    #[error("transaction {txid:016x}: SQLite failed while {doing}: {source}; rolled back, nothing applied")]
    Sqlite {
        /// The transaction.
        txid: u64,
        /// What the applier was doing.
        doing: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Re-reading the replica database (to rule out a local write) failed.
    #[error("transaction {txid:016x}: re-reading the replica database failed: {source:#}; nothing applied")]
    Reread {
        /// The transaction.
        txid: u64,
        /// What failed.
        #[source]
        source: anyhow::Error,
    },
}

/// Applies primary transactions to a replica database, one SQLite write transaction each.
pub struct Applier {
    /// The replica connection (WAL mode, closes normally).
    conn: Connection,
    /// Page hashes and whole-database checksum of the current content, as the primary has it
    /// (page 1 with the primary's stamp).
    hashes: DbHashes,
    /// Page 1 as the primary has it.
    page1: Vec<u8>,
    /// The last transaction applied, once known.
    applied: Option<u64>,
    /// `PRAGMA data_version` when the content was last known to equal `hashes`.
    data_version: i64,
    /// Re-read the database before trusting `hashes` again (after a failed SQLite write).
    recheck: bool,
    /// Set once a local write was found: the checksum the database had.
    diverged: Option<u64>,
    /// Applied transactions since the last PASSIVE checkpoint.
    since_checkpoint: u32,
    /// Run `PRAGMA wal_checkpoint(PASSIVE)` after this many applied transactions (0: never;
    /// SQLite's autocheckpoint still runs). [`DEFAULT_CHECKPOINT_EVERY`] by default.
    pub checkpoint_every: u32,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("page_size", &self.page_size())
            .field("page_count", &self.page_count())
            .field("checksum", &format_args!("{:#018x}", self.checksum()))
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl Applier {
    /// Opens an existing replica database (it must be in WAL mode) with a busy timeout, and
    /// reads every page through `sqlite_dbpage` to build its hashes. Page 1 is taken as it is
    /// in the file, which is the primary's for a freshly restored replica; see
    /// [`Applier::open_with_stamp`] for one the applier has written to before.
    pub fn open(path: &Path, busy: Duration) -> Result<Applier> {
        Self::open_inner(path, busy, None)
    }

    /// Like [`Applier::open`], but hashes page 1 with the primary's `stamp` (saved earlier
    /// from [`Applier::stamp`]) in place of the bytes SQLite stamped when the applier
    /// committed, so that [`Applier::checksum`] equals the primary's checksum again.
    pub fn open_with_stamp(path: &Path, busy: Duration, stamp: Page1Stamp) -> Result<Applier> {
        Self::open_inner(path, busy, Some(stamp))
    }

    fn open_inner(path: &Path, busy: Duration, stamp: Option<Page1Stamp>) -> Result<Applier> {
        if !path.is_file() {
            bail!("replica database {} does not exist", path.display());
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening replica database {}", path.display()))?;
        conn.busy_timeout(busy)?;
        // sqlite_dbpage refuses writes in defensive mode.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, false)?;
        sqlite::begin_read(&conn)
            .with_context(|| format!("reading replica database {}", path.display()))?;
        let r = read_state(&conn, stamp.as_ref());
        sqlite::end_txn(&conn);
        let (hashes, page1, data_version) =
            r.with_context(|| format!("reading replica database {}", path.display()))?;
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!(
                "replica database {} is in journal mode {mode}; a replica must be in WAL mode",
                path.display()
            );
        }
        tracing::debug!(
            db = %path.display(),
            pages = hashes.page_count(),
            page_size = hashes.page_size(),
            checksum = format_args!("{:#018x}", hashes.checksum()),
            "opened replica"
        );
        Ok(Applier {
            conn,
            hashes,
            page1,
            applied: None,
            data_version,
            recheck: false,
            diverged: None,
            since_checkpoint: 0,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
        })
    }

    /// The whole-database checksum of the current content (with the primary's page-1 stamp).
    pub fn checksum(&self) -> u64 {
        self.hashes.checksum()
    }

    /// The number of pages of the current content.
    pub fn page_count(&self) -> u32 {
        self.hashes.page_count()
    }

    /// The database's page size; every page applied must be this long.
    pub fn page_size(&self) -> u32 {
        self.hashes.page_size()
    }

    /// The last transaction applied, if any was applied (or set with
    /// [`Applier::set_applied_txid`]).
    pub fn applied_txid(&self) -> Option<u64> {
        self.applied
    }

    /// Records that the database holds the state right after transaction `txid` (for a
    /// database just restored or reopened); the next [`Applier::apply`] must be `txid + 1`.
    pub fn set_applied_txid(&mut self, txid: u64) {
        self.applied = Some(txid);
    }

    /// Tunes the applying connection for streaming: checkpoints are left to another connection
    /// ([`checkpoint_loop`]) — no PASSIVE checkpoint after every
    /// [`Applier::checkpoint_every`] transactions, no SQLite autocheckpoint on this connection's
    /// commits — and commits are not fsynced (`synchronous = NORMAL`; the WAL is synced at each
    /// checkpoint), so applying never waits for a disk flush. A transaction is visible to
    /// readers and survives a crash of any process once committed; a power loss may take the
    /// last ones away, which the replica's position check catches at start (it then resumes
    /// from an older position or restores — never a wrong database).
    pub fn tune_for_streaming(&mut self) -> Result<()> {
        self.checkpoint_every = 0;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(())
    }

    /// The primary's page-1 stamp of the current content (see [`Page1Stamp`]): keep it with
    /// the applied position to reopen the replica with [`Applier::open_with_stamp`].
    pub fn stamp(&self) -> Page1Stamp {
        stamp_of(&self.page1)
    }

    /// The schema cookie of the current content (page 1, bytes 40..44): it changes with every
    /// schema change on the primary.
    pub fn schema_cookie(&self) -> u32 {
        u32::from_be_bytes(self.page1[40..44].try_into().expect("4 bytes"))
    }

    /// Applies one transaction — `pages` sorted by page number, each exactly one page long,
    /// `db_pages` the database size after it — as one SQLite write transaction. Once every
    /// page is written, and before `COMMIT`, it checks that the whole-database checksum
    /// (computed incrementally from the bytes written) equals `db_checksum` and that SQLite
    /// will see `db_pages` pages (page 1's in-header size); on any failure the SQLite
    /// transaction is rolled back and nothing changes. Returns the new checksum.
    ///
    /// Before writing, it makes sure nothing else wrote to the database since the last apply
    /// (`PRAGMA data_version`, and a re-read when that changed); if something did, it returns
    /// [`ApplyError::LocalWrite`] now and for every later call.
    pub fn apply(
        &mut self,
        txid: u64,
        db_pages: u32,
        db_checksum: u64,
        pages: &[(u32, Vec<u8>)],
    ) -> Result<u64, ApplyError> {
        self.apply_run(txid, txid, db_pages, db_checksum, pages)
    }

    /// [`Applier::apply`] for the primary transactions `first_txid..=txid` merged into one
    /// ([`replited_core::proto::Txn::merged`]), as a replica that is behind applies them.
    pub fn apply_run(
        &mut self,
        first_txid: u64,
        txid: u64,
        db_pages: u32,
        db_checksum: u64,
        pages: &[(u32, Vec<u8>)],
    ) -> Result<u64, ApplyError> {
        if let Some(applied) = self.applied {
            if applied.checked_add(1) != Some(first_txid) || first_txid > txid {
                return Err(ApplyError::OutOfOrder {
                    txid: first_txid,
                    applied,
                });
            }
        }
        if let Some(actual) = self.diverged {
            return Err(ApplyError::LocalWrite {
                txid,
                expected: self.hashes.checksum(),
                actual,
            });
        }
        self.validate(txid, db_pages, pages)?;

        let sql = |doing: &'static str| {
            move |source| ApplyError::Sqlite {
                txid,
                doing,
                source,
            }
        };
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(sql("taking the write lock (BEGIN IMMEDIATE)"))?;
        match self.apply_in_txn(txid, db_pages, db_checksum, pages) {
            Ok(undo) => {
                if let Err(source) = self.conn.execute_batch("COMMIT") {
                    sqlite::end_txn(&self.conn);
                    self.undo(undo);
                    self.recheck = true;
                    return Err(ApplyError::Sqlite {
                        txid,
                        doing: "committing",
                        source,
                    });
                }
            }
            Err((e, undo)) => {
                sqlite::end_txn(&self.conn);
                if let Some(undo) = undo {
                    self.undo(undo);
                }
                return Err(e);
            }
        }
        if let Some((1, p)) = pages.first() {
            let schema_changed = p[40..44] != self.page1[40..44];
            self.page1.copy_from_slice(p);
            if schema_changed {
                self.forget_parsed_pages();
            }
        }
        self.applied = Some(txid);
        self.since_checkpoint += 1;
        if self.checkpoint_every > 0 && self.since_checkpoint >= self.checkpoint_every {
            self.since_checkpoint = 0;
            match sqlite::checkpoint(&self.conn, "PASSIVE") {
                Ok((_, log, done)) => {
                    tracing::debug!(log, done, "replica checkpoint (PASSIVE)")
                }
                Err(e) => tracing::warn!("replica checkpoint failed: {e:#}"),
            }
        }
        Ok(self.hashes.checksum())
    }

    /// Drops this connection's cached pages after a schema change. SQLite's b-tree layer keeps
    /// each cached page's parsed header (cell count, offsets) beside it, and `sqlite_dbpage`
    /// writes replace the bytes without touching that: the next schema load (SQLite re-reads
    /// `sqlite_master` when the schema cookie moved) then walked the old cell layout over the
    /// new bytes of a `sqlite_master` page and failed with "database disk image is malformed"
    /// (SQLITE_CORRUPT at OP_Column; seen by the soak once `sqlite_master` outgrew page 1).
    /// Pages loaded again are parsed again.
    fn forget_parsed_pages(&self) {
        if let Err(e) = self.conn.execute_batch("PRAGMA shrink_memory") {
            tracing::warn!("dropping the replica connection's page cache: {e}");
        }
    }

    /// Checks the transaction's shape before anything is touched.
    fn validate(
        &self,
        txid: u64,
        db_pages: u32,
        pages: &[(u32, Vec<u8>)],
    ) -> Result<(), ApplyError> {
        let invalid = |reason: String| Err(ApplyError::Invalid { txid, reason });
        if db_pages == 0 {
            return invalid("the database size after it is 0 pages".into());
        }
        let ps = self.page_size() as usize;
        let mut prev = 0u32;
        for (pgno, data) in pages {
            if *pgno <= prev {
                return invalid(format!(
                    "page {pgno} follows page {prev} (page numbers must be strictly increasing)"
                ));
            }
            if *pgno > db_pages {
                return invalid(format!(
                    "page {pgno} is beyond the database size {db_pages}"
                ));
            }
            if data.len() != ps {
                return invalid(format!(
                    "page {pgno} has {} bytes, the page size is {ps}",
                    data.len()
                ));
            }
            prev = *pgno;
        }
        if let Some((1, p1)) = pages.first() {
            let header_ps = match u16::from_be_bytes([p1[16], p1[17]]) {
                1 => 65536,
                n => u32::from(n),
            };
            if !p1.starts_with(b"SQLite format 3\0") || header_ps as usize != ps {
                return invalid(format!(
                    "page 1 is not a database header with page size {ps}"
                ));
            }
            if p1[18] != 2 || p1[19] != 2 {
                return invalid(format!(
                    "page 1 is not in WAL mode (read/write versions {}/{}): the replica would leave WAL mode",
                    p1[18], p1[19]
                ));
            }
        }
        Ok(())
    }

    /// Everything between `BEGIN IMMEDIATE` and `COMMIT`. On success returns how to undo the
    /// hash update (should the commit fail); on failure the error and, if the hashes were
    /// updated, the undo.
    fn apply_in_txn(
        &mut self,
        txid: u64,
        db_pages: u32,
        db_checksum: u64,
        pages: &[(u32, Vec<u8>)],
    ) -> Result<Undo, (ApplyError, Option<Undo>)> {
        let sql = |doing: &'static str| {
            move |source| {
                (
                    ApplyError::Sqlite {
                        txid,
                        doing,
                        source,
                    },
                    None,
                )
            }
        };
        // Nothing else may have written since the last apply.
        let dv: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(sql("reading PRAGMA data_version"))?;
        if dv != self.data_version || self.recheck {
            let actual = self
                .reread()
                .map_err(|source| (ApplyError::Reread { txid, source }, None))?;
            let expected = self.hashes.checksum();
            if actual != expected {
                tracing::warn!(
                    "the replica database was written behind replited's back: checksum {actual:#018x}, expected {expected:#018x}"
                );
                self.diverged = Some(actual);
                return Err((
                    ApplyError::LocalWrite {
                        txid,
                        expected,
                        actual,
                    },
                    None,
                ));
            }
            self.data_version = dv;
            self.recheck = false;
        }

        // Write every page into the transaction, then check what it leads to before COMMIT.
        let old_count = self.hashes.page_count();
        let undo = self.update_hashes(db_pages, pages);
        if let Err((doing, source)) = self.write_pages(old_count, db_pages, pages) {
            // The pager rolls the writes back; re-read before trusting the hashes again.
            self.recheck = true;
            return Err((
                ApplyError::Sqlite {
                    txid,
                    doing,
                    source,
                },
                Some(undo),
            ));
        }
        // The whole-database checksum, from the bytes written.
        let actual = self.hashes.checksum();
        if actual != db_checksum {
            return Err((
                ApplyError::ChecksumMismatch {
                    txid,
                    expected: db_checksum,
                    actual,
                },
                Some(undo),
            ));
        }
        // What SQLite will report as the page count once committed: page 1's in-header size
        // (`PRAGMA page_count` inside this transaction still says the size at BEGIN).
        let page1: &[u8] = match pages.first() {
            Some((1, p)) => p,
            _ => &self.page1,
        };
        let header_pages = u32::from_be_bytes(page1[28..32].try_into().expect("4 bytes"));
        if header_pages != db_pages {
            return Err((
                ApplyError::PageCountMismatch {
                    txid,
                    expected: db_pages,
                    actual: header_pages,
                },
                Some(undo),
            ));
        }
        Ok(undo)
    }

    /// Writes the pages through `sqlite_dbpage`: zero pages for any page between the old end
    /// and the new one the transaction does not write, everything in descending page order
    /// (page 1 last), then the truncation if the database shrinks.
    fn write_pages(
        &self,
        old_count: u32,
        db_pages: u32,
        pages: &[(u32, Vec<u8>)],
    ) -> Result<(), (&'static str, rusqlite::Error)> {
        let zeros;
        let mut writes: Vec<(u32, &[u8])> = pages.iter().map(|(p, d)| (*p, &d[..])).collect();
        if db_pages > old_count {
            // Pages the transaction adds without writing are zero pages (the format's rule);
            // SQLite would otherwise show whatever an older WAL frame or the file held there.
            let missing: Vec<u32> = (old_count + 1..=db_pages)
                .filter(|p| pages.binary_search_by_key(p, |(q, _)| *q).is_err())
                .collect();
            if !missing.is_empty() {
                zeros = vec![0u8; self.page_size() as usize];
                writes.extend(missing.into_iter().map(|p| (p, &zeros[..])));
            }
        }
        writes.sort_unstable_by_key(|w| std::cmp::Reverse(w.0));
        let mut stmt = self
            .conn
            .prepare_cached("INSERT INTO sqlite_dbpage(schema, pgno, data) VALUES('main', ?1, ?2)")
            .map_err(|e| ("preparing the sqlite_dbpage insert", e))?;
        for (pgno, data) in writes {
            stmt.execute(rusqlite::params![pgno, data])
                .map_err(|e| ("writing a page through sqlite_dbpage", e))?;
        }
        if db_pages < old_count {
            // Must be the last write: a later page write cancels it.
            self.conn
                .prepare_cached(
                    "INSERT INTO sqlite_dbpage(schema, pgno, data) VALUES('main', ?1, NULL)",
                )
                .and_then(|mut s| s.execute([db_pages + 1]))
                .map_err(|e| ("truncating through sqlite_dbpage", e))?;
        }
        Ok(())
    }

    /// Updates the hashes for the transaction and returns how to undo it.
    fn update_hashes(&mut self, db_pages: u32, pages: &[(u32, Vec<u8>)]) -> Undo {
        let h = &mut self.hashes;
        let old_count = h.page_count();
        let mut old = Vec::with_capacity(pages.len());
        for (pgno, data) in pages {
            if let Some(prev) = h.get(*pgno) {
                old.push((*pgno, prev));
            }
            h.set(*pgno, page_hash(*pgno, data));
        }
        for pgno in db_pages + 1..=old_count {
            old.push((pgno, h.get(pgno).expect("page within the old count")));
        }
        h.set_page_count(db_pages);
        Undo { old_count, old }
    }

    fn undo(&mut self, u: Undo) {
        self.hashes.set_page_count(u.old_count);
        for (pgno, hash) in u.old {
            self.hashes.set(pgno, hash);
        }
    }

    /// Re-reads every page (within the connection's current transaction, or a read
    /// transaction of its own) and returns the whole-database checksum, page 1 hashed with the
    /// primary's stamp.
    fn reread(&self) -> Result<u64> {
        let (h, _) = hash_pages(&self.conn, Some(&self.stamp()))?;
        Ok(h.checksum())
    }

    /// Detects a write made to the replica behind replited's back: returns true if the
    /// database's content differs from what was last applied. Cheap when nothing happened:
    /// it re-reads the database only when `PRAGMA data_version` says another connection
    /// committed since the last apply. Once true, it stays true (and [`Applier::apply`]
    /// refuses every transaction): the replica must be rebuilt.
    pub fn local_write_detected(&mut self) -> Result<bool> {
        if self.diverged.is_some() {
            return Ok(true);
        }
        let dv: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .context("reading PRAGMA data_version")?;
        if dv == self.data_version && !self.recheck {
            return Ok(false);
        }
        sqlite::begin_read(&self.conn)?;
        let r = self.reread().and_then(|sum| {
            let dv: i64 = self
                .conn
                .query_row("PRAGMA data_version", [], |r| r.get(0))?;
            Ok((sum, dv))
        });
        sqlite::end_txn(&self.conn);
        let (actual, dv) = r.context("re-reading the replica database")?;
        if actual == self.hashes.checksum() {
            self.data_version = dv;
            self.recheck = false;
            Ok(false)
        } else {
            tracing::warn!(
                "the replica database was written behind replited's back: checksum {actual:#018x}, expected {:#018x}",
                self.hashes.checksum()
            );
            self.diverged = Some(actual);
            Ok(true)
        }
    }
}

/// How to put the hashes back after a refused transaction.
struct Undo {
    old_count: u32,
    /// (page, hash before) for every page written within the old count or dropped.
    old: Vec<(u32, u64)>,
}

/// Reads the hashes, page 1 (with the stamp applied) and `PRAGMA data_version` within the
/// connection's read transaction.
fn read_state(c: &Connection, stamp: Option<&Page1Stamp>) -> Result<(DbHashes, Vec<u8>, i64)> {
    let (h, page1) = hash_pages(c, stamp)?;
    if h.page_count() == 0 {
        bail!("the database is empty (0 pages)");
    }
    let dv: i64 = c.query_row("PRAGMA data_version", [], |r| r.get(0))?;
    Ok((h, page1, dv))
}

/// The hashes of every page SQLite shows, page 1 with `stamp` put in first; and page 1 so.
fn hash_pages(c: &Connection, stamp: Option<&Page1Stamp>) -> Result<(DbHashes, Vec<u8>)> {
    let (ps, n) = sqlite::page_geometry(c)?;
    let mut h = DbHashes::new(ps);
    let mut page1 = Vec::new();
    sqlite::for_each_page(c, |pgno, data| {
        if data.len() != ps as usize {
            bail!("page {pgno} has {} bytes, expected {ps}", data.len());
        }
        if pgno == 1 {
            page1 = data.to_vec();
            if let Some(s) = stamp {
                put_stamp(&mut page1, s);
            }
            h.set(1, page_hash(1, &page1));
        } else {
            h.set(pgno, page_hash(pgno, data));
        }
        Ok(())
    })?;
    h.set_page_count(n);
    if n > 0 && page1.len() != ps as usize {
        bail!("page 1 could not be read");
    }
    Ok((h, page1))
}

fn put_stamp(page1: &mut [u8], s: &Page1Stamp) {
    let mut at = 0;
    for r in STAMP_RANGES {
        let len = r.len();
        page1[r].copy_from_slice(&s[at..at + len]);
        at += len;
    }
}

/// Runs a PASSIVE checkpoint of the replica at `path` when its WAL has changed, at most every
/// `every`, until `stop` is set and `wake` becomes readable; each with a connection of its own
/// (opened anew each time, so a database replaced by a restore is followed). Pair with
/// [`Applier::tune_for_streaming`]. A reader holding a read transaction can hold the WAL's
/// reset back, never the applier. A WAL that has not changed since a checkpoint copied all of
/// it back, or no WAL at all, is left alone: the loop sleeps until inotify reports a write to
/// the `-wal` (an idle replica wakes for nothing; it used to look every `every`, and before
/// that to open a connection each time — most of an idle replica's CPU), and looks again after
/// [`SETTLED_RECHECK`] at the latest. Without inotify it looks every `every` (a `stat` of the
/// `-wal`: a file's times are only as fine as the kernel's clock tick, hence the recheck).
/// `counts` counts the rounds (wake-ups) and the checkpoints run.
///
/// `lock` is held for each checkpoint: whoever replaces the database file holds it meanwhile, so
/// a checkpointing connection of the old file never closes (and deletes its `-wal`) next to the
/// new one.
pub fn checkpoint_loop(
    path: &Path,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
    wake: std::os::fd::BorrowedFd<'_>,
    lock: &tokio::sync::Mutex<()>,
    counts: &Counts,
) {
    use std::sync::atomic::Ordering;
    let watch = crate::dbwatch::DbWatch::new(path, &["-wal"])
        .map_err(|e| {
            tracing::debug!(
                "replica checkpoints: no inotify watch ({e}): looking every {every:?} instead"
            )
        })
        .ok();
    // The WAL as it was when a checkpoint last copied all of it back, and when.
    let mut settled: Option<(WalMark, std::time::Instant)> = None;
    // Nothing to do until the WAL changes.
    let mut idle = false;
    while !stop.load(Ordering::SeqCst) {
        if let (true, Some(w)) = (idle, &watch) {
            w.wait(SETTLED_RECHECK, wake);
        }
        // Writes come in bursts: one checkpoint per `every` at most.
        let mut fds = [nix::poll::PollFd::new(wake, nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, crate::dbwatch::poll_timeout(every));
        if stop.load(Ordering::SeqCst) {
            break;
        }
        counts.rounds.fetch_add(1, Ordering::Relaxed);
        // Read before the WAL's state is: a write after it wakes the next round.
        if let Some(w) = &watch {
            w.take();
        }
        idle = true;
        let _held = lock.blocking_lock();
        if !path.exists() {
            continue;
        }
        // Taken before the checkpoint: a write meanwhile changes it, and the next round looks.
        let Some(mark) = wal_mark(path) else {
            // No WAL: nothing to copy back.
            settled = None;
            continue;
        };
        if settled.is_some_and(|(m, at)| m == mark && at.elapsed() < SETTLED_RECHECK) {
            continue;
        }
        counts.runs.fetch_add(1, Ordering::Relaxed);
        let r = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.busy_timeout(Duration::from_millis(100))?;
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
        });
        settled = None;
        match r {
            Ok((log, done)) => {
                tracing::trace!(log, done, "replica checkpoint (PASSIVE)");
                if log == done {
                    settled = Some((mark, std::time::Instant::now()));
                }
            }
            Err(e) => tracing::debug!("replica checkpoint: {e}"),
        }
        // Frames a reader holds back: looked at again next round, whether written or not.
        idle = settled.is_some();
    }
}

/// How long [`checkpoint_loop`] leaves an unchanged, fully copied-back WAL alone at most.
const SETTLED_RECHECK: Duration = Duration::from_secs(10);

/// The `-wal` file's inode, length and modification time (from `stat`: no descriptor opened).
type WalMark = (u64, u64, i64, i64);

fn wal_mark(db: &Path) -> Option<WalMark> {
    use std::os::unix::fs::MetadataExt;
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    let m = std::fs::metadata(Path::new(&p)).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// What a [`checkpoint_loop`] has done.
#[derive(Default)]
pub struct Counts {
    /// Times it woke up to look at the WAL.
    pub rounds: std::sync::atomic::AtomicU64,
    /// Checkpoints it ran.
    pub runs: std::sync::atomic::AtomicU64,
}

/// A [`checkpoint_loop`] on a thread of its own, for one replica database.
pub struct Checkpointer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Written at [`Checkpointer::stop`]: the thread's sleep ends at once.
    wake: std::os::unix::net::UnixStream,
    thread: std::thread::JoinHandle<()>,
    #[cfg_attr(not(test), allow(dead_code))]
    counts: std::sync::Arc<Counts>,
}

impl Checkpointer {
    /// Starts checkpointing `path` when its WAL changes, at most every `every`, pausing while
    /// `lock` is held.
    pub fn start(
        path: &Path,
        every: Duration,
        lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    ) -> Result<Checkpointer> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts = std::sync::Arc::new(Counts::default());
        let (wake, woken) = std::os::unix::net::UnixStream::pair()?;
        let (db, flag, count) = (path.to_path_buf(), stop.clone(), counts.clone());
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                use std::os::fd::AsFd;
                checkpoint_loop(&db, every, &flag, woken.as_fd(), &lock, &count)
            })?;
        Ok(Checkpointer {
            stop,
            wake,
            thread,
            counts,
        })
    }

    /// Stops it and waits for its thread (the checkpoint under way, if one is).
    pub fn stop(self) {
        use std::io::Write;
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = (&self.wake).write_all(&[1]);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle replica's checkpoints: a WAL that changed is checkpointed; one a checkpoint
    /// copied all of back is left alone (no connection opened for it every 500 ms, which was
    /// most of an idle replica's CPU), and the loop does not even wake for it (inotify), until
    /// it changes again.
    #[test]
    fn an_unchanged_wal_is_not_checkpointed_again() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("replica.db");
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(9000));",
        )
        .unwrap();
        let every = Duration::from_millis(20);
        let lock = std::sync::Arc::new(tokio::sync::Mutex::new(()));
        let ck = Checkpointer::start(&db, every, lock).unwrap();
        let runs = || ck.counts.runs.load(Relaxed);
        let rounds = || ck.counts.rounds.load(Relaxed);
        // The first round copies the whole WAL back.
        let backfilled = || {
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok(r.get::<_, i64>(1)? == r.get::<_, i64>(2)?)
            })
            .unwrap()
        };
        crate::wait_until("no checkpoint ran", || runs() >= 1);
        assert!(backfilled());
        // (This test's own checkpoint just now may wake one round.)
        std::thread::sleep(every * 5);
        let (settled, woke) = (runs(), rounds());
        // 50 intervals with nothing written: no checkpoint, no wake-up.
        std::thread::sleep(every * 50);
        assert_eq!(runs(), settled, "checkpoints of an unchanged WAL");
        assert_eq!(rounds(), woke, "wake-ups with nothing written");
        // A write: the next round checkpoints it.
        c.execute("INSERT INTO t VALUES (randomblob(9000))", [])
            .unwrap();
        crate::wait_until("the written WAL was not checkpointed", || runs() > settled);
        // Stopping does not wait for a wake-up.
        let t = std::time::Instant::now();
        ck.stop();
        assert!(
            t.elapsed() < SETTLED_RECHECK,
            "stop waited {:?}",
            t.elapsed()
        );
    }
}
