//! The few things replited asks of SQLite itself: connections, locks and page images.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use replited_core::hash::{page_hash, DbHashes};
use rusqlite::{Connection, OpenFlags};

/// Opens a read-write connection to an existing database with a busy timeout.
pub fn open(path: &Path, busy: Duration) -> Result<Connection> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening database {}", path.display()))?;
    c.busy_timeout(busy)?;
    // When replited's connection is the last one to close, SQLite would checkpoint and delete
    // the WAL — frames replited is the reference point for. The WAL is left as it is.
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(c)
}

/// Makes sure the database is in WAL mode (switching it if it is not).
pub fn ensure_wal(c: &Connection, path: &Path) -> Result<()> {
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        let now: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !now.eq_ignore_ascii_case("wal") {
            bail!(
                "database {} is in journal mode {mode} and could not be switched to WAL",
                path.display()
            );
        }
        tracing::info!(db = %path.display(), "switched the database from journal mode {mode} to WAL");
    }
    Ok(())
}

/// Starts a read transaction that pins the current snapshot (and so keeps checkpoints from
/// overwriting WAL frames past it).
pub fn begin_read(c: &Connection) -> Result<()> {
    // Cached statements: this runs at every capture (a thousand times a second under load).
    c.prepare_cached("BEGIN DEFERRED")?.execute([])?;
    let read = c
        .prepare_cached("SELECT count(*) FROM sqlite_master")
        .and_then(|mut s| s.query_row([], |_| Ok(())));
    if let Err(e) = read {
        // Not left inside the transaction: every later BEGIN would fail ("cannot start a
        // transaction within a transaction").
        end_txn(c);
        return Err(e).context("starting a read transaction");
    }
    Ok(())
}

/// Ends whatever transaction the connection has.
pub fn end_txn(c: &Connection) {
    if !c.is_autocommit() {
        let _ = c
            .prepare_cached("ROLLBACK")
            .and_then(|mut s| s.execute([]).map(drop));
    }
}

/// A busy handler that retries every 50 µs for the first 100 ms, then every millisecond, and
/// gives up after about a second (the caller decides whether to try again). SQLite's default
/// sleeps up to 100 ms between tries and keeps missing the short gaps between an app's commits.
fn eager_busy(count: i32) -> bool {
    match count {
        0..2000 => std::thread::sleep(Duration::from_micros(50)),
        2000..2900 => std::thread::sleep(Duration::from_millis(1)),
        _ => return false,
    }
    true
}

/// Opens the connection replited takes SQLite's write lock with.
pub fn open_locker(path: &Path) -> Result<Connection> {
    let c = open(path, Duration::from_secs(1))?;
    c.busy_handler(Some(eager_busy))?;
    Ok(c)
}

/// Takes SQLite's write lock (`BEGIN IMMEDIATE`), retrying while the app holds it, for at most
/// `patience`.
pub fn lock_writes(c: &Connection, patience: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match c.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => return Ok(()),
            Err(e) if is_busy(&e) && start.elapsed() < patience => {
                tracing::debug!("waiting for the database write lock");
            }
            Err(e) => return Err(e).context("taking the database write lock (BEGIN IMMEDIATE)"),
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Runs `PRAGMA wal_checkpoint(MODE)`: (busy, frames in the log, frames checkpointed).
pub fn checkpoint(c: &Connection, mode: &str) -> Result<(i64, i64, i64)> {
    c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .with_context(|| format!("wal_checkpoint({mode})"))
}

/// The page size and page count seen by the connection's current transaction.
pub fn page_geometry(c: &Connection) -> Result<(u32, u32)> {
    let ps: u32 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let n: u32 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    Ok((ps, n))
}

/// Visits every page of the main database as the connection's transaction sees it, in page
/// order, through `sqlite_dbpage`.
pub fn for_each_page(c: &Connection, mut f: impl FnMut(u32, &[u8]) -> Result<()>) -> Result<()> {
    let mut stmt = c
        .prepare_cached("SELECT pgno, data FROM sqlite_dbpage('main')")
        .context(
            "reading pages through sqlite_dbpage (is SQLite built with SQLITE_ENABLE_DBPAGE_VTAB?)",
        )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let pgno: u32 = row.get(0)?;
        let data = row.get_ref(1)?.as_blob()?;
        f(pgno, data)?;
    }
    Ok(())
}

/// The whole-database hashes of what the connection's transaction sees.
pub fn db_hashes(c: &Connection) -> Result<DbHashes> {
    let (ps, n) = page_geometry(c)?;
    let mut h = DbHashes::new(ps);
    for_each_page(c, |pgno, data| {
        if data.len() != ps as usize {
            bail!("page {pgno} has {} bytes, expected {ps}", data.len());
        }
        h.set(pgno, page_hash(pgno, data));
        Ok(())
    })?;
    h.set_page_count(n);
    Ok(h)
}

/// Runs `PRAGMA integrity_check` on a database file; Ok only for "ok". For a file nothing else
/// in the process has open (a restore's or a received snapshot's temporary file): see
/// `checkvfs`.
pub fn integrity_check(path: &Path) -> Result<()> {
    let rc = crate::checkvfs::register();
    if rc != rusqlite::ffi::SQLITE_OK {
        bail!(
            "registering SQLite's check VFS: {}",
            rusqlite::ffi::code_to_str(rc)
        );
    }
    let c = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        crate::checkvfs::NAME,
    )?;
    // Memory-mapped reads, from the check VFS's small windows (see checkvfs): pages walked
    // in file order are read in place, about a third of the time through `pread`. Any positive
    // limit turns them on; the windows cover the whole file whatever it is.
    c.pragma_update(None, "mmap_size", i64::MAX)?;
    let mut stmt = c.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    drop(stmt);
    c.close().map_err(|(_, e)| e)?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        bail!("integrity check failed: {}", rows.join("; "))
    }
}
