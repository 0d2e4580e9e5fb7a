//! `replicate`: the capture loop of one database.
//!
//! One thread per database. The loop sleeps on inotify (the database's directory, filtered to
//! its `-wal` file) and wakes within microseconds of a write; it scans the new WAL frames
//! (checking SQLite's salts and cumulative checksums), groups them into whole transactions,
//! and writes them as a segment to every target, durably, before the guard moves.
//!
//! ## Why nothing is lost to a checkpoint
//! replited always holds a read transaction (the *guard*) on one of two connections. While a
//! reader holds a WAL read mark, checkpoints cannot copy frames past it into the database and no
//! writer can restart the WAL, so frames are never overwritten before replited read them. The
//! guard moves in one order only: start a read transaction on the other connection, capture up
//! to the end of the WAL, write everything captured durably, then end the old one. Whatever a
//! later WAL restart may overwrite is therefore already durable. replited's own PASSIVE
//! checkpoints run right after a move; a TRUNCATE checkpoint (when the WAL passes its bound)
//! must release the guard briefly, so afterwards the database (as a new guard sees it) is compared
//! page by page with what replited tracked, and anything committed in that window is captured as
//! one transaction.
//!
//! ## Start-up and continuity
//! The latest stored file records the WAL position (salts, offset, cumulative checksum) and the
//! whole-database checksum after its last transaction. At start-up, under SQLite's write lock
//! for a moment, replited checks that the WAL still continues from that position; transactions
//! committed while it was down are captured as one transaction. If the WAL was checkpointed and
//! restarted meanwhile but the database is unchanged, the history simply continues; otherwise a
//! new generation starts with a fresh snapshot. Nothing is lost either way.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use replited_core::format::{self, Encoder, Event, FileHeader, Kind, TxnHeader};
use replited_core::hash::{page_hash, DbHashes};
use replited_core::name::FileMeta;
use replited_core::plan;
use replited_core::proto::{Txn, TxnInfo};
use replited_core::scan::{Frame, PageRef, WalPos, WalScanner, WalTxn};
use replited_core::wal::{FrameHeader, WalHeader, FRAME_HEADER_LEN, WAL_HEADER_LEN};
use rusqlite::Connection;

use crate::config::{db_name, Compression, DbConfig, ReplicateConfig, TargetParams};
use crate::reader::{decode_file, read_header};
use crate::s3::S3Storage;
use crate::server::{Hub, RECENT_BYTES};
use crate::shutdown::Shutdown;
use crate::spool::SpoolStorage;
use crate::sqlite;
use crate::storage::{parent_dir, FsStorage, ObjectWriter, Storage};
use crate::walfile::{self, Resolved, WalFile};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A named backup target.
#[derive(Clone)]
pub struct Target {
    /// `name` from the config.
    pub name: String,
    /// Where it writes (shared with the compaction thread).
    pub storage: Arc<dyn Storage>,
}

/// Builds the storage targets of a database from its config (a stream server is not one), for
/// reading and checking them.
pub fn targets(cfg: &DbConfig) -> Result<Vec<Target>> {
    build_targets(cfg, Spool::None)
}

/// The targets capture writes to: remote ones (S3) behind a local spool, so a failing store
/// never holds capture or the other targets back.
fn capture_targets(cfg: &DbConfig) -> Result<Vec<Target>> {
    build_targets(cfg, Spool::Own)
}

/// The targets the stream server reads history from: remote ones together with what waits in
/// capture's spool for them (a replica a little behind needs transactions not uploaded yet).
pub fn history_targets(cfg: &DbConfig) -> Result<Vec<Target>> {
    build_targets(cfg, Spool::Read)
}

/// What a remote target has of its local spool.
#[derive(Clone, Copy, PartialEq)]
enum Spool {
    /// Nothing: the store alone.
    None,
    /// The spool itself (capture: writes wait in it until uploaded).
    Own,
    /// Read-only: what waits in the spool of the capture running beside it, and the store.
    Read,
}

fn build_targets(cfg: &DbConfig, spool: Spool) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for r in &cfg.replicate {
        out.extend(build_target(cfg, r, spool)?);
    }
    Ok(out)
}

/// One storage target (None for a stream server).
fn build_target(cfg: &DbConfig, r: &ReplicateConfig, spool: Spool) -> Result<Option<Target>> {
    let name = db_name(&cfg.db);
    let storage = match &r.params {
        TargetParams::Fs(p) => Box::new(FsStorage::new(&p.root, &name)) as Box<dyn Storage>,
        // Temporary files (unnamed) go beside the database.
        TargetParams::S3(p) => {
            let s3 = S3Storage::new(p, &name, parent_dir(&cfg.db))
                .with_context(|| format!("replicate \"{}\"", r.name))?;
            let dir = p.spool_dir.clone().unwrap_or_else(|| {
                parent_dir(&cfg.db)
                    .join(format!(".{name}-replited-spool"))
                    .join(&r.name)
            });
            match spool {
                Spool::Own => {
                    let limit = p
                        .spool_limit_mb
                        .map_or(crate::spool::DEFAULT_LIMIT, |mb| mb << 20);
                    Box::new(SpoolStorage::new(
                        Box::new(s3),
                        dir,
                        limit,
                        (&name, &r.name),
                    )?) as Box<dyn Storage>
                }
                Spool::Read => Box::new(crate::spool::SpoolView::new(Box::new(s3), dir)),
                Spool::None => Box::new(s3),
            }
        }
        TargetParams::Stream(_) => return Ok(None),
    };
    Ok(Some(Target {
        name: r.name.clone(),
        storage: Arc::from(storage),
    }))
}

/// The storage targets of a config (its stream server left out).
fn storage_entries(cfg: &DbConfig) -> Vec<&ReplicateConfig> {
    cfg.replicate
        .iter()
        .filter(|r| !matches!(r.params, TargetParams::Stream(_)))
        .collect()
}

/// A target's lag tracker and the figures behind it.
struct Follow {
    lag: Arc<crate::notify::Lagging>,
    /// Unix ms commit time of the oldest transaction the target lacks (0: none).
    since: Arc<AtomicU64>,
    txns: Arc<AtomicU64>,
}

/// A database's counters and gauges (`/metrics`).
struct DbMetrics {
    db: String,
    txns: Arc<crate::metrics::Counter>,
    wal_bytes: Arc<crate::metrics::Counter>,
    segments: Arc<crate::metrics::Counter>,
    snapshots: Arc<crate::metrics::Counter>,
    sync: Arc<crate::metrics::Histogram>,
    txid: Arc<crate::metrics::Gauge>,
    generation: Arc<crate::metrics::Gauge>,
    db_size: Arc<crate::metrics::Gauge>,
    wal_size: Arc<crate::metrics::Gauge>,
    wal_max: Arc<crate::metrics::Gauge>,
}

impl DbMetrics {
    fn new(db: &str) -> DbMetrics {
        use crate::metrics::{counter, gauge, histogram};
        let l = [("db", db)];
        // Present (at 0) before the first of them happens.
        for mode in ["passive", "truncate"] {
            let l = [("db", db), ("mode", mode)];
            counter(
                "replited_checkpoints_total",
                "Checkpoints run by replited, by mode.",
                &l,
            );
            histogram(
                "replited_checkpoint_duration_seconds",
                "Time checkpoints took, by mode.",
                &l,
            );
        }
        for kind in ["capture", "continuity"] {
            counter(
                "replited_errors_total",
                "Errors by kind (each retried).",
                &[("db", db), ("kind", kind)],
            );
        }
        DbMetrics {
            db: db.to_string(),
            txns: counter(
                "replited_transactions_captured_total",
                "Transactions captured from the WAL and made durable in the targets.",
                &l,
            ),
            wal_bytes: counter(
                "replited_wal_bytes_captured_total",
                "WAL bytes (frames) captured.",
                &l,
            ),
            segments: counter(
                "replited_segments_written_total",
                "Segments written (each a batch of transactions).",
                &l,
            ),
            snapshots: counter(
                "replited_snapshots_written_total",
                "Snapshots written.",
                &l,
            ),
            sync: histogram(
                "replited_sync_duration_seconds",
                "Time to write a batch of captured transactions durably to every target.",
                &l,
            ),
            txid: gauge(
                "replited_txid",
                "Last transaction id durable in the targets.",
                &l,
            ),
            generation: gauge("replited_generation", "Current generation.", &l),
            db_size: gauge(
                "replited_database_size_bytes",
                "Size of the database file.",
                &l,
            ),
            wal_size: gauge("replited_wal_size_bytes", "Size of the WAL file.", &l),
            wal_max: gauge(
                "replited_wal_max_bytes",
                "The WAL size past which replited runs a TRUNCATE checkpoint (max-checkpoint-page-count pages).",
                &l,
            ),
        }
    }

    fn checkpoint(&self, mode: &str, took: Duration) {
        let l = [("db", self.db.as_str()), ("mode", mode)];
        crate::metrics::counter(
            "replited_checkpoints_total",
            "Checkpoints run by replited, by mode.",
            &l,
        )
        .inc();
        crate::metrics::histogram(
            "replited_checkpoint_duration_seconds",
            "Time checkpoints took, by mode.",
            &l,
        )
        .observe(took);
    }
}

/// A reloaded configuration and where the capture loop's answer goes.
type Reload = (DbConfig, std::sync::mpsc::Sender<Result<String, String>>);

/// A configuration for a running capture loop to apply (SIGHUP), and where its answer goes.
pub struct ReloadSlot {
    pending: Mutex<Option<Reload>>,
    read: UnixStream,
    write: UnixStream,
}

impl ReloadSlot {
    /// An empty slot.
    pub fn new() -> std::io::Result<Arc<ReloadSlot>> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        Ok(Arc::new(ReloadSlot {
            pending: Mutex::new(None),
            read,
            write,
        }))
    }

    /// Hands `cfg` to the capture loop and waits for what it changed (or why it could not).
    pub fn request(&self, cfg: DbConfig, limit: Duration) -> Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.pending.lock().expect("reload lock") = Some((cfg, tx));
        let _ = (&self.write).write_all(&[1]);
        rx.recv_timeout(limit).map_err(|_| {
            format!("the capture loop did not take the new configuration within {limit:?}")
        })?
    }

    fn take(&self) -> Option<Reload> {
        let mut b = [0u8; 64];
        while matches!((&self.read).read(&mut b), Ok(n) if n > 0) {}
        self.pending.lock().expect("reload lock").take()
    }
}

/// Where the pages of a captured transaction are.
enum Pages {
    /// Still in the WAL, read back (and checked against the hash taken at scan time) when the
    /// segment is written.
    Wal(Vec<PageRef>),
    /// Already in memory.
    Inline(Vec<(u32, Vec<u8>)>),
}

struct Captured {
    header: TxnHeader,
    pages: Pages,
}

/// Where the transactions a stream hub keeps of `batch` begin, and their bytes: the hub holds
/// only the last [`RECENT_BYTES`] of transactions (at least one; replicas further behind read
/// from storage), so the pages of the earlier ones are not copied for it.
fn hub_tail(batch: &[Captured], page_size: usize) -> (usize, usize) {
    let mut bytes = 0;
    for (i, c) in batch.iter().enumerate().rev() {
        let more = c.header.page_count as usize * page_size + 64;
        if bytes + more > RECENT_BYTES && i + 1 < batch.len() {
            return (i + 1, bytes);
        }
        bytes += more;
    }
    (0, bytes)
}

struct OpenWal {
    file: Box<dyn WalFile>,
    dev: u64,
    ino: u64,
    /// Its length when last looked at (reads never ask past it).
    len: u64,
}

/// What the latest stored file says about the history.
#[derive(Clone, Copy, Debug)]
struct Stored {
    generation: u64,
    txid: u64,
    wal: Option<WalPos>,
    db_checksum: u64,
    page_size: u32,
    page_count: u32,
}

/// Continuity with the WAL could not be established; the loop re-establishes it.
#[derive(Debug, thiserror::Error)]
#[error("WAL continuity lost: {0}")]
struct ContinuityLost(String);

/// The capture state of one database.
pub struct Replicator {
    cfg: DbConfig,
    db_path: PathBuf,
    wal_path: PathBuf,
    wal_name: std::ffi::OsString,
    targets: Vec<Target>,
    io: Resolved,
    compression: format::Compression,
    /// Takes SQLite's write lock when the guard must land exactly on the WAL's end.
    writer: Connection,
    /// Runs checkpoints (a connection with an open transaction cannot).
    ckpt: Connection,
    guards: [Connection; 2],
    active: Option<usize>,
    wal: Option<OpenWal>,
    /// inotify: the WAL file for writes, its directory for the WAL's creation and removal.
    inotify: Option<Inotify>,
    scanner: Option<WalScanner>,
    hashes: DbHashes,
    generation: u64,
    /// Last captured txid (durable or in the batch).
    txid: u64,
    batch: Vec<Captured>,
    batch_wal: Option<WalPos>,
    batch_since: Option<Instant>,
    files: Vec<FileMeta>,
    last_progress: Instant,
    last_snapshot: Instant,
    /// The txid the last snapshot is at.
    last_snapshot_txid: u64,
    last_checkpoint: Instant,
    last_compaction: Instant,
    /// The round of compaction running on its own thread, if one is, and its flag to end
    /// after the merge in progress.
    compaction: Option<(std::thread::JoinHandle<Merged>, Arc<AtomicBool>)>,
    last_retention: Instant,
    failures: u32,
    retry_at: Option<Instant>,
    /// (WAL salt1, frames) when a checkpoint last found everything backfilled: nothing to do
    /// until the WAL grows or restarts.
    backfilled: Option<(u32, u64)>,
    /// Why continuity with the WAL must be established again before capturing.
    reestablish: Option<String>,
    /// The stream server's feed, when replicas follow this database.
    hub: Option<Arc<Hub>>,
    /// inotify watch of the database file: it changes only when a checkpoint copies frames
    /// back, which is when a waiting RESTART/TRUNCATE checkpoint may need the guard to move.
    db_watch: Option<nix::sys::inotify::WatchDescriptor>,
    /// The database file changed since the guard last moved.
    db_modified: bool,
    /// When the guard last moved.
    last_rotation: Instant,
    /// Heartbeats and status for the service manager, and this database's index in them.
    health: Option<(Arc<crate::notify::Health>, usize)>,
    /// Where a reloaded configuration arrives (SIGHUP).
    reload: Option<Arc<ReloadSlot>>,
    /// How far behind each target is (parallel to `targets`), for status and metrics.
    follows: Vec<Follow>,
    /// Counters and gauges of this database.
    m: Option<DbMetrics>,
    /// When the figures were last brought up to date.
    last_report: Option<Instant>,
    /// The txid last made durable in the targets.
    durable_txid: u64,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Since when a frame waits in the WAL past what SQLite has published (see
    /// `published_end`), and that published end: the loop looks again every few milliseconds
    /// for a while instead of waiting for inotify (publishing writes only `-shm`).
    unpublished: Option<(u64, Instant)>,
    /// WAL writes were noticed and left for the batch's deadline: until this instant the loop
    /// does not wait on inotify (see `defer_wal_writes`).
    deferred_until: Option<Instant>,
    /// Pages captured so far (all time) and when the last deferral began with that many: the
    /// rate the WAL grows at, to end the next deferral before the WAL reaches a checkpoint.
    pages_seen: u64,
    defer_sample: Option<(u64, Instant)>,
    /// Only the WAL's own writes woke this step: the WAL at its path is still the file open
    /// (replacing it makes directory events), so capture need not look it up again.
    wal_writes_woke: bool,
    /// The `-shm` file, read for the wal-index header. Opened once and never closed while the
    /// connections live: closing any descriptor of it would drop SQLite's POSIX locks on it.
    /// Declared last so that it is dropped after them.
    shm: Option<std::fs::File>,
}

/// Frames read at once at most, and at first. With [`PAGE_BATCH`] and [`FLUSH_BYTES`]: the
/// capture thread's buffers stay at 256 KiB each (4 KiB pages) — 1 MiB each cost a busy
/// primary ~3 MB of peak RSS and saved no measurable time (docs/BENCHMARKS.md, seventh pass).
const READ_FRAMES: usize = 64;
const FIRST_READ_FRAMES: usize = 4;
/// Pages of a batch read back from the WAL at once (one io_uring submission), across its
/// transactions.
const PAGE_BATCH: usize = 64;
/// Bytes of an encoded segment gathered before they are written to the targets.
const FLUSH_BYTES: usize = 256 << 10;
const PENDING_RECHECK: Duration = Duration::from_secs(1);
/// How often the loop looks for a commit being published (after its frames were written).
const REPOLL: Duration = Duration::from_millis(1);
/// How many times (50 µs apart) a scan looks again for a commit being published.
const PUBLISH_SPINS: usize = 6;
const MAX_LEVEL: u32 = 4;
const MERGE_AT: usize = 8;
/// The most files one merge reads.
const MERGE_MAX: usize = 256;
/// How long WAL writes are left for later when the WAL's rate of growth is not known (see
/// `defer_wal_writes`).
const DEFER_PROBE: Duration = Duration::from_millis(20);
/// The periodic work runs at least this often, whatever wakes the loop.
const IDLE_STEP: Duration = Duration::from_secs(1);
/// inotify reads per wake-up (each returns up to 4 KiB of events).
const DRAIN_READS: usize = 4;
/// How long a checkpoint waits for SQLite's write lock before it is postponed to a later
/// wake-up (capture goes on meanwhile).
const LOCK_PATIENCE: Duration = Duration::from_millis(200);
/// The longest wait before capture tries again after a failure (doubling from 200 ms): the
/// WAL grows while capture waits (the app's checkpoints cannot pass the guard), so capture
/// resumes within this once the store answers again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long capture waits before it tries again after `failures` failures in a row.
fn capture_backoff(failures: u32) -> Duration {
    Duration::from_millis(100 << failures.clamp(1, 8)).min(MAX_BACKOFF)
}

impl Replicator {
    /// Opens the database and checks every target, without capturing yet.
    pub fn open(cfg: DbConfig, io: Resolved) -> Result<Replicator> {
        let db_path = cfg.db.clone();
        if !db_path.exists() {
            bail!("database {} does not exist", db_path.display());
        }
        let mut wal_name = db_path.file_name().expect("validated").to_os_string();
        wal_name.push("-wal");
        let wal_path = db_path.with_file_name(&wal_name);
        let targets = capture_targets(&cfg)?;
        let writer = sqlite::open_locker(&db_path)?;
        sqlite::ensure_wal(&writer, &db_path)?;
        let ckpt = sqlite::open(&db_path, cfg.busy_timeout)?;
        let guards = [
            sqlite::open(&db_path, cfg.busy_timeout)?,
            sqlite::open(&db_path, cfg.busy_timeout)?,
        ];
        let compression = match cfg.compression {
            Compression::Lz4 => format::Compression::Lz4,
            Compression::None => format::Compression::None,
        };
        let now = Instant::now();
        Ok(Replicator {
            db_path,
            wal_path,
            wal_name,
            targets,
            io,
            compression,
            writer,
            ckpt,
            guards,
            active: None,
            wal: None,
            inotify: None,
            scanner: None,
            hashes: DbHashes::new(4096),
            generation: 0,
            txid: 0,
            batch: Vec::new(),
            batch_wal: None,
            batch_since: None,
            files: Vec::new(),
            last_progress: now,
            last_snapshot: now,
            last_snapshot_txid: 0,
            last_checkpoint: now,
            last_compaction: now,
            compaction: None,
            last_retention: now,
            failures: 0,
            retry_at: None,
            backfilled: None,
            reestablish: None,
            hub: None,
            db_watch: None,
            db_modified: false,
            last_rotation: now,
            health: None,
            reload: None,
            follows: Vec::new(),
            m: None,
            last_report: None,
            durable_txid: 0,
            buf: Vec::new(),
            out: Vec::new(),
            unpublished: None,
            deferred_until: None,
            pages_seen: 0,
            defer_sample: None,
            wal_writes_woke: false,
            shm: None,
            cfg,
        })
    }

    /// Reports heartbeats, status and readiness to `health` as worker `index`.
    pub fn set_health(&mut self, health: Arc<crate::notify::Health>, index: usize) {
        self.health = Some((health, index));
        self.m = Some(DbMetrics::new(&db_name(&self.db_path)));
        self.follow_targets();
    }

    /// (Re)creates the lag trackers of the targets.
    fn follow_targets(&mut self) {
        let Some((h, i)) = &self.health else { return };
        for f in self.follows.drain(..) {
            h.untrack(&f.lag);
        }
        for t in &self.targets {
            let since = Arc::new(AtomicU64::new(0));
            let txns = Arc::new(AtomicU64::new(0));
            let (s2, t2) = (since.clone(), txns.clone());
            let lag = h.track(*i, "target", &t.name, move |now| {
                let s = s2.load(Ordering::Relaxed);
                (
                    if s == 0 { 0 } else { now.saturating_sub(s) },
                    t2.load(Ordering::Relaxed),
                )
            });
            self.follows.push(Follow { lag, since, txns });
        }
    }

    /// Brings status and metrics up to date (at most every 200 ms).
    fn figures(&mut self) {
        if self
            .last_report
            .is_some_and(|t| t.elapsed() < crate::notify::STATUS_EVERY)
        {
            return;
        }
        self.last_report = Some(Instant::now());
        let pending = self
            .batch
            .first()
            .map(|c| (c.header.time_ms, c.header.txid));
        for (t, f) in self.targets.iter().zip(&self.follows) {
            // The oldest transaction the target does not hold: in the batch not written yet, or
            // in a file waiting for upload.
            let waiting = t.storage.backlog().map(|m| (m.first_time_ms, m.first_txid));
            let oldest = match (waiting, pending) {
                (Some(w), Some(p)) => Some(if w.1 <= p.1 { w } else { p }),
                (w, p) => w.or(p),
            };
            let (since, txns) = match oldest {
                Some((time, txid)) => (time.max(1), self.txid.saturating_sub(txid) + 1),
                None => (0, 0),
            };
            f.since.store(since, Ordering::Relaxed);
            f.txns.store(txns, Ordering::Relaxed);
            if let Some(ms) = t.storage.last_sync_ms() {
                f.lag.last_sync_ms.store(ms, Ordering::Relaxed);
            }
        }
        if let Some(m) = &self.m {
            m.txid.set(self.durable_txid as f64);
            m.generation.set(self.generation as f64);
            m.db_size
                .set(std::fs::metadata(&self.db_path).map_or(0, |x| x.len()) as f64);
            m.wal_size
                .set(std::fs::metadata(&self.wal_path).map_or(0, |x| x.len()) as f64);
            let ps = u64::from(self.hashes.page_size());
            m.wal_max.set(
                (WAL_HEADER_LEN as u64
                    + self.cfg.max_checkpoint_page_count * (ps + FRAME_HEADER_LEN as u64))
                    as f64,
            );
        }
    }

    fn report(&self) {
        if let Some((h, i)) = &self.health {
            h.beat(*i);
            h.set_status(*i, || {
                let mut line = format!(
                    "{}: generation {:016x}, txid {}",
                    db_name(&self.db_path),
                    self.generation,
                    self.txid,
                );
                if self.retry_at.is_some() {
                    line.push_str(" (retrying after an error)");
                }
                for d in self.targets.iter().filter_map(|t| t.storage.degraded()) {
                    line.push_str(", ");
                    line.push_str(&d);
                }
                line
            });
        }
    }

    /// Everything written so far is in the targets that write synchronously (a spooled target
    /// reports its own uploads).
    fn synced_targets(&self) {
        let now = now_ms();
        for (t, f) in self.targets.iter().zip(&self.follows) {
            if t.storage.last_sync_ms().is_none() {
                f.lag.last_sync_ms.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Takes reloaded configurations from `slot` (applied between wake-ups, nothing captured
    /// dropped).
    pub fn set_reload(&mut self, slot: Arc<ReloadSlot>) {
        self.reload = Some(slot);
    }

    /// Applies a reloaded configuration of this database: intervals and thresholds at once;
    /// changed storage targets after everything captured is written to the current ones, then
    /// the new set is reconciled as at start-up (a new target gets the files of the current
    /// generation copied from the others). New targets are built and checked first: a target
    /// that cannot be used leaves everything as it was.
    fn reconfigure(&mut self, new: DbConfig) -> Result<String> {
        let old = self.cfg.clone();
        let mut changes = Vec::new();
        macro_rules! note {
            ($show:expr; $($f:ident),*) => {$(
                if old.$f != new.$f {
                    changes.push(format!(
                        "{} {} → {}",
                        stringify!($f).replace('_', "-"),
                        $show(&old.$f),
                        $show(&new.$f)
                    ));
                }
            )*};
        }
        let dur = |d: &Duration| humantime::format_duration(*d).to_string();
        note!(dur; sync_interval, snapshot_interval, retention, retention_check_interval,
            checkpoint_interval, compaction_interval, busy_timeout);
        note!(|n: &u64| n.to_string(); min_checkpoint_page_count, max_checkpoint_page_count);
        note!(|c: &Compression| format!("{c:?}").to_lowercase(); compression);
        if old.stream() != new.stream() {
            changes
                .push("the stream server's settings are unchanged until the next restart".into());
        }
        let (before, after) = (storage_entries(&old), storage_entries(&new));
        if before != after {
            preflight(&new)?;
            // A round of compaction writes to the targets it started with.
            self.compaction_done(true);
            // Built before anything changes; None: kept as it is.
            let mut built = Vec::new();
            for r in &after {
                built.push(match before.iter().position(|b| b == r) {
                    Some(_) => None,
                    None => Some(build_target(&new, r, Spool::Own)?.expect("a storage target")),
                });
            }
            self.write_batch()
                .context("writing out captured transactions before changing targets")?;
            let mut current: Vec<Option<Target>> = std::mem::take(&mut self.targets)
                .into_iter()
                .map(Some)
                .collect();
            for (r, b) in after.iter().zip(built) {
                let t = match b {
                    Some(t) => t,
                    None => {
                        let i = before.iter().position(|x| x == r).expect("kept");
                        current[i].take().expect("each kept once")
                    }
                };
                self.targets.push(t);
            }
            let dropped: Vec<String> = current
                .iter()
                .flatten()
                .map(|t| t.storage.describe())
                .collect();
            drop(current);
            changes.push(format!(
                "targets now {}{}",
                self.targets
                    .iter()
                    .map(|t| t.storage.describe())
                    .collect::<Vec<_>>()
                    .join(", "),
                if dropped.is_empty() {
                    String::new()
                } else {
                    format!(" (no longer: {})", dropped.join(", "))
                }
            ));
            self.reestablish = Some("the targets changed".into());
            self.follow_targets();
        }
        if old.busy_timeout != new.busy_timeout {
            for c in [&self.writer, &self.ckpt, &self.guards[0], &self.guards[1]] {
                c.busy_timeout(new.busy_timeout)?;
            }
        }
        self.compression = match new.compression {
            Compression::Lz4 => format::Compression::Lz4,
            Compression::None => format::Compression::None,
        };
        self.cfg = new;
        Ok(if changes.is_empty() {
            "unchanged".into()
        } else {
            changes.join("; ")
        })
    }

    /// Publishes every durable transaction to `hub` (the stream server's feed).
    pub fn set_hub(&mut self, hub: Arc<Hub>) {
        self.hub = Some(hub);
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!("db", db = %self.db_path.display())
    }

    /// Runs until `shutdown` fires; then writes out everything captured and returns.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<()> {
        let span = self.span();
        let _e = span.enter();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let dir = parent_dir(&self.db_path).to_path_buf();
        inotify
            .add_watch(
                &dir,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_DELETE,
            )
            .with_context(|| format!("watching {} with inotify", dir.display()))?;
        self.db_watch = Some(
            inotify
                .add_watch(&self.db_path, AddWatchFlags::IN_MODIFY)
                .with_context(|| format!("watching {} with inotify", self.db_path.display()))?,
        );
        self.inotify = Some(inotify);
        self.establish()?;
        self.announce();
        self.report();
        self.figures();
        if let Some((h, i)) = &self.health {
            h.set_ready(*i);
        }
        tracing::info!(
            generation = self.generation,
            txid = self.txid,
            io = %self.io.name(),
            "capturing {} to {}",
            self.wal_path.display(),
            self.targets
                .iter()
                .map(|t| t.storage.describe())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut last_step = Instant::now();
        loop {
            if shutdown.requested() {
                break;
            }
            self.report();
            self.figures();
            // Deferred WAL writes are due: capture them now, whatever else arrived.
            let due = self.deferred_until.is_some_and(|t| Instant::now() >= t);
            if due {
                self.deferred_until = None;
            }
            let timeout = self.next_deadline();
            let fds_ready;
            let mut reload_ready = false;
            {
                let inotify = self.inotify.as_ref().expect("set above");
                let reload = self.reload.clone();
                let mut fds = vec![PollFd::new(shutdown.fd(), PollFlags::POLLIN)];
                if let Some(r) = &reload {
                    fds.push(PollFd::new(r.read.as_fd(), PollFlags::POLLIN));
                }
                if self.deferred_until.is_none() {
                    fds.push(PollFd::new(inotify.as_fd(), PollFlags::POLLIN));
                }
                fds_ready = match nix::poll::poll(&mut fds, crate::dbwatch::poll_timeout(timeout)) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => {
                        reload_ready = true;
                        1
                    }
                    Err(e) => return Err(e.into()),
                };
                if reload.is_some() {
                    reload_ready |= fds[1].revents().is_some_and(|r| !r.is_empty());
                }
            }
            // A bounded drain: under a steady load events keep arriving, and capture reads to
            // the end of the WAL whatever woke it. Events for the WAL itself carry no name; the
            // directory's do, and only the WAL's creation or removal matters.
            let mut woke = fds_ready == 0;
            if let Some((cfg, answer)) = self
                .reload
                .as_ref()
                .filter(|_| reload_ready)
                .and_then(|r| r.take())
            {
                let r = self.reconfigure(cfg);
                match &r {
                    Ok(what) => tracing::info!("configuration reloaded: {what}"),
                    Err(e) => tracing::error!(
                        "configuration reload refused, keeping the running one: {e:#}"
                    ),
                }
                let _ = answer.send(r.map_err(|e| format!("{e:#}")));
                // A new sync interval applies from now: stop leaving WAL writes for later.
                self.deferred_until = None;
                woke = true;
            }
            let inotify = self.inotify.as_ref().expect("set above");
            // Whether only the WAL's own writes woke the loop (nothing else it must act on).
            let mut wal_writes_only = fds_ready > 0 && !woke;
            let mut wal_writes = false;
            for _ in 0..DRAIN_READS {
                match inotify.read_events() {
                    Ok(events) if !events.is_empty() => {
                        for e in &events {
                            if Some(e.wd) == self.db_watch {
                                self.db_modified = true;
                                woke = true;
                            }
                            let wal_write = e.name.is_none()
                                && Some(e.wd) != self.db_watch
                                && e.mask.contains(AddWatchFlags::IN_MODIFY);
                            wal_writes |= wal_write;
                            wal_writes_only &= wal_write;
                        }
                        woke |= events.iter().any(|e| match &e.name {
                            None => Some(e.wd) != self.db_watch,
                            Some(n) => n.as_os_str() == self.wal_name.as_os_str(),
                        });
                    }
                    _ => break,
                }
            }
            let wal_writes_only = wal_writes && wal_writes_only;
            if !due && wal_writes_only && self.defer_wal_writes() {
                continue;
            }
            if !woke
                && self.batch_since.is_none()
                && self.retry_at.is_none()
                && !self.repoll()
                && last_step.elapsed() < IDLE_STEP
            {
                continue;
            }
            last_step = Instant::now();
            self.wal_writes_woke = wal_writes_only;
            let r = self.step();
            self.wal_writes_woke = false;
            if let Err(e) = r {
                self.fail(e);
            }
        }
        tracing::info!("shutting down: writing out everything captured");
        // What is already captured is written even if this last look at the WAL fails.
        if self.reestablish.is_none() {
            if let Err(e) = self.capture() {
                if let Some(c) = e.downcast_ref::<ContinuityLost>() {
                    self.reestablish = Some(c.to_string());
                }
                tracing::warn!("last capture before shutdown: {e:#}");
            }
        }
        let mut last = Ok(());
        for _ in 0..3 {
            last = self.write_batch();
            if last.is_ok() {
                break;
            }
        }
        last.context("writing out the last captured transactions at shutdown")?;
        self.compaction_done(true);
        for g in &self.guards {
            sqlite::end_txn(g);
        }
        match &self.reestablish {
            // Its transactions since are only in the database (not lost: the next start
            // compares it with the backup and takes them up).
            Some(why) => tracing::warn!(
                generation = self.generation,
                txid = self.txid,
                "stopped with the backup behind the database ({why}; not established again): \
                 the next start takes up what was committed after txid {}",
                self.txid
            ),
            None => tracing::info!(
                generation = self.generation,
                txid = self.txid,
                "stopped with everything captured written"
            ),
        }
        Ok(())
    }

    fn fail(&mut self, e: anyhow::Error) {
        if let Some(c) = e.downcast_ref::<ContinuityLost>() {
            self.reestablish = Some(c.to_string());
        }
        self.failures += 1;
        let backoff = capture_backoff(self.failures);
        tracing::error!(
            generation = self.generation,
            txid = self.txid,
            "{e:#}; retrying in {backoff:?}"
        );
        self.retry_at = Some(Instant::now() + backoff);
        if let Some((h, i)) = &self.health {
            let kind = if e.is::<ContinuityLost>() {
                "continuity"
            } else {
                "capture"
            };
            h.error(*i, kind, &format_args!("{e:#}"));
        }
    }

    /// With a `sync-interval` above zero, transactions wait for their batch's deadline
    /// anyway: the WAL's writes that woke the loop are left until then, and the loop stops
    /// waking on each of them; it then captures everything written meanwhile at once. The wait
    /// also ends when the WAL is due to reach `min-checkpoint-page-count` at the rate it grew
    /// lately (the checkpoint makes the batch durable early and keeps the WAL and the batch
    /// short, as when each commit is captured), after `DEFER_PROBE` when that rate is unknown
    /// or stale, and after a second at most (the WAL's creation or removal and the app's
    /// checkpoints are seen then). False (capture now) with `0s`, while capture is not steady,
    /// and while a checkpoint is due within `DEFER_PROBE` (it needs a moment between two
    /// commits to take SQLite's write lock: each commit's wake-up gives it one).
    fn defer_wal_writes(&mut self) -> bool {
        if self.cfg.sync_interval.is_zero()
            || self.retry_at.is_some()
            || self.reestablish.is_some()
            || self.scanner.is_none()
        {
            return false;
        }
        let now = Instant::now();
        let since = *self.batch_since.get_or_insert(now);
        let mut wait = IDLE_STEP.min(self.cfg.sync_interval);
        match self.defer_sample {
            Some((seen, at)) if now.duration_since(at) <= IDLE_STEP + IDLE_STEP => {
                let rate = (self.pages_seen - seen) as f64 / now.duration_since(at).as_secs_f64();
                let in_wal = self.scanner.as_ref().map_or(0, |s| s.frames_committed());
                let left = self.cfg.min_checkpoint_page_count.saturating_sub(in_wal) as f64;
                if rate > 0.0 {
                    let due = Duration::from_secs_f64(left / rate);
                    if due < DEFER_PROBE {
                        // A checkpoint is due (or waits for a moment between commits to take
                        // the write lock): capture each commit as it comes, as with `0s`.
                        // The sample stays, so the rate is measured over a longer span.
                        return false;
                    }
                    wait = wait.min(due);
                }
            }
            _ => wait = wait.min(DEFER_PROBE),
        }
        self.defer_sample = Some((self.pages_seen, now));
        self.deferred_until = Some((since + self.cfg.sync_interval).min(now + wait));
        true
    }

    fn next_deadline(&self) -> Duration {
        let now = Instant::now();
        let mut d = Duration::from_secs(1);
        if let Some(at) = self.deferred_until {
            d = d.min(at.saturating_duration_since(now));
        }
        if let Some(at) = self.retry_at {
            d = d.min(at.saturating_duration_since(now));
        }
        if let Some(since) = self.batch_since {
            d = d.min((since + self.cfg.sync_interval).saturating_duration_since(now));
        }
        if self.repoll() {
            d = d.min(REPOLL);
        }
        d
    }

    /// Frames past the published end appeared lately: a commit is being published.
    fn repoll(&self) -> bool {
        self.unpublished
            .is_some_and(|(_, t)| t.elapsed() < PENDING_RECHECK)
    }

    /// The end of what SQLite has published in the WAL whose header is `h`: the wal-index
    /// header's `mxFrame` (in `-shm`). A writer writes its frames, commit frame included (and
    /// with synchronous=FULL syncs them) before it publishes them; one killed in between leaves
    /// a complete-looking transaction that SQLite never committed and overwrites — it must not
    /// be captured. `Some(0)`: nothing can be said now (the header is being rewritten, or it
    /// already describes a restarted WAL), capture nothing yet; None: no wal-index to read
    /// (capture up to the end of the valid log).
    fn published_end(&mut self, h: &WalHeader) -> Option<u64> {
        if self.shm.is_none() {
            let mut p = self.db_path.clone().into_os_string();
            p.push("-shm");
            self.shm = walfile::open_noatime(&PathBuf::from(p)).ok();
        }
        let shm = self.shm.as_ref()?;
        let mut b = [0u8; 96];
        use std::os::unix::fs::FileExt;
        if shm.read_exact_at(&mut b, 0).is_err() {
            return Some(0);
        }
        // Two copies of the 48-byte WalIndexHdr (native byte order; the salts as the WAL
        // header's bytes); SQLite itself retries while they differ.
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if b[..48] != b[48..] || u32_at(0) != 3_007_000 || b[12] != 1 {
            return Some(0);
        }
        let salts = (
            u32::from_be_bytes(b[32..36].try_into().expect("4 bytes")),
            u32::from_be_bytes(b[36..40].try_into().expect("4 bytes")),
        );
        if salts != (h.salt1, h.salt2) {
            return Some(0);
        }
        Some(WAL_HEADER_LEN as u64 + u64::from(u32_at(16)) * h.frame_len() as u64)
    }

    /// One wake-up: capture, write when due, then the periodic work.
    fn step(&mut self) -> Result<()> {
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return Ok(());
            }
        }
        if self.reestablish.is_none() {
            match self.capture() {
                Ok(()) => {}
                Err(e) => match e.downcast::<ContinuityLost>() {
                    Ok(c) => {
                        tracing::warn!("{c}; re-establishing");
                        self.reestablish = Some(c.to_string());
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        if self.reestablish.is_some() {
            self.establish()?;
            self.reestablish = None;
            self.announce();
        }
        if let Some(since) = self.batch_since {
            if since.elapsed() >= self.cfg.sync_interval {
                self.sync()?;
            }
        }
        // Nothing to write, but the app may be running a RESTART or TRUNCATE checkpoint that
        // waits (holding SQLite's write lock) for every reader to leave the WAL, the guard
        // included: move the guard when the database file changed (a checkpoint copied frames
        // back) and at least every second, so such a checkpoint completes at once — a reader
        // that starts on a fully checkpointed WAL reads the database file only.
        if self.batch.is_empty()
            && self.active.is_some()
            && (self.db_modified || self.last_rotation.elapsed() >= IDLE_STEP)
        {
            self.db_modified = false;
            self.sync()?;
        }
        let frames = self.scanner.as_ref().map_or(0, |s| s.frames_committed());
        let wal_state = self
            .scanner
            .as_ref()
            .map(|s| (s.header().salt1, s.frames_committed()));
        if wal_state.is_some() && wal_state == self.backfilled {
            // Already checkpointed; the app's next write restarts the WAL.
        } else if frames >= self.cfg.max_checkpoint_page_count {
            self.checkpoint(true)?;
        } else if frames >= self.cfg.min_checkpoint_page_count
            || (frames > 0 && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval)
        {
            self.checkpoint(false)?;
        }
        if self.last_snapshot.elapsed() >= self.cfg.snapshot_interval {
            if self.txid == self.last_snapshot_txid {
                // Nothing changed since the last snapshot: it still is the latest state.
                self.last_snapshot = Instant::now();
            } else {
                self.snapshot()?;
            }
        }
        self.compaction_done(false);
        if self.compaction.is_none()
            && self.last_compaction.elapsed() >= self.cfg.compaction_interval
        {
            self.compact();
        }
        if self.last_retention.elapsed() >= self.cfg.retention_check_interval {
            self.retention()?;
        }
        self.failures = 0;
        self.retry_at = None;
        Ok(())
    }

    // ---- WAL access ------------------------------------------------------------------------

    /// Makes `self.wal` the file currently at the WAL's path (or None when there is none).
    fn refresh_wal(&mut self) -> Result<()> {
        match std::fs::metadata(&self.wal_path) {
            Ok(m) => {
                let same = self
                    .wal
                    .as_ref()
                    .is_some_and(|w| w.dev == m.dev() && w.ino == m.ino());
                if let Some(w) = self.wal.as_mut().filter(|_| same) {
                    w.len = m.len();
                }
                if !same {
                    let file = walfile::open(self.io, &self.wal_path)
                        .with_context(|| format!("opening {}", self.wal_path.display()))?;
                    self.wal = Some(OpenWal {
                        file,
                        dev: m.dev(),
                        ino: m.ino(),
                        len: m.len(),
                    });
                    if let Some(i) = &self.inotify {
                        i.add_watch(&self.wal_path, AddWatchFlags::IN_MODIFY)
                            .with_context(|| {
                                format!("watching {} with inotify", self.wal_path.display())
                            })?;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.wal = None,
            Err(e) => return Err(e).with_context(|| format!("{}", self.wal_path.display())),
        }
        Ok(())
    }

    fn read_wal_header(&mut self) -> Result<Option<WalHeader>> {
        let Some(w) = self.wal.as_mut() else {
            return Ok(None);
        };
        let mut b = [0u8; WAL_HEADER_LEN];
        if w.file.read_at(&mut b, 0)? < WAL_HEADER_LEN {
            return Ok(None);
        }
        Ok(WalHeader::decode(&b).ok())
    }

    /// Scans from the scanner's position to the end of the valid log, handing each committed
    /// transaction to `on_commit`.
    fn scan(&mut self, mut on_commit: impl FnMut(&mut Self, WalTxn)) -> Result<()> {
        // The file may be longer than its valid log (a restarted WAL keeps its old length and
        // old frames): read a few frames first and double while they keep being valid.
        let mut chunk = FIRST_READ_FRAMES;
        let Some(h) = self.scanner.as_ref().map(|sc| *sc.header()) else {
            return Ok(());
        };
        // A commit's frames are written a moment before SQLite publishes them (after its fsync
        // with synchronous=FULL): look again a few times before leaving it to the next poll.
        let mut published = self.published_end(&h);
        let mut waiting = self.note_unpublished(published)?;
        for _ in 0..PUBLISH_SPINS {
            if !waiting {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
            published = self.published_end(&h);
            waiting = self.note_unpublished(published)?;
        }
        if published.is_some_and(|p| p > 0) {
            // Everything up to the published end is this WAL's: read it whole.
            chunk = READ_FRAMES;
        }
        loop {
            let Some(sc) = self.scanner.as_ref() else {
                return Ok(());
            };
            let flen = sc.frame_len();
            let off = sc.next_offset();
            let w = self.wal.as_mut().expect("a scanner implies an open WAL");
            // The published end bounds the reads (a read past the file's end comes back
            // short); the length known from the last look only without a wal-index.
            let end = published.map_or(w.len, |p| p.max(sc.committed().offset));
            let avail = end.saturating_sub(off) as usize / flen;
            if avail == 0 {
                break;
            }
            let want = avail.min(chunk);
            chunk = (chunk * 2).min(READ_FRAMES);
            self.buf.resize(flen * want, 0);
            let n = w.file.read_at(&mut self.buf, off)?;
            let whole = n / flen;
            let mut ended = false;
            let mut i = 0;
            while i < whole {
                let frame = &self.buf[i * flen..(i + 1) * flen];
                match self.scanner.as_mut().expect("checked").handle_frame(frame) {
                    Frame::Pending => self.last_progress = Instant::now(),
                    Frame::Commit(txn) => {
                        self.last_progress = Instant::now();
                        on_commit(self, txn);
                    }
                    Frame::End(_) => {
                        ended = true;
                        break;
                    }
                }
                i += 1;
            }
            if ended || whole < want {
                break;
            }
        }
        // A transaction whose frames stopped arriving may have been rolled back after spilling
        // to the WAL and overwritten by a shorter one: look again from the last commit.
        if let Some(sc) = self.scanner.as_ref() {
            if sc.has_pending() && self.last_progress.elapsed() >= PENDING_RECHECK {
                let (h, at) = (*sc.header(), sc.committed());
                self.scanner = Some(WalScanner::resume(&h, at).map_err(|e| anyhow!("{e}"))?);
                self.last_progress = Instant::now();
            }
        }
        Ok(())
    }

    /// Reads every new committed transaction into the batch.
    fn capture(&mut self) -> Result<()> {
        // Without a wal-index to bound reads, the WAL's length must be current.
        if !self.wal_writes_woke || self.wal.is_none() || self.shm.is_none() {
            self.refresh_wal()?;
        }
        let header = self.read_wal_header()?;
        match (&self.scanner, header) {
            (_, None) => {
                // No WAL, or one being created: nothing committed to read.
                if self.wal.is_none() && self.scanner.is_some() {
                    return Err(ContinuityLost(format!(
                        "{} disappeared while replited held a read transaction",
                        self.wal_path.display()
                    ))
                    .into());
                }
                return Ok(());
            }
            (None, Some(h)) => {
                // A new WAL after an empty one (or after our own TRUNCATE): our guard kept it
                // from being checkpointed, so it starts right where we are.
                self.check_page_size(&h)?;
                self.scanner = Some(WalScanner::new(&h));
            }
            (Some(sc), Some(h)) => {
                let old = *sc.header();
                if (h.salt1, h.salt2) != (old.salt1, old.salt2) {
                    // SQLite restarted the WAL. A restart needs every frame checkpointed and no
                    // reader inside the WAL, which our guard allows only once all frames up to
                    // its mark are durable: the new WAL continues our history.
                    if h.salt1 != old.salt1.wrapping_add(1) && !self.restart_continues()? {
                        return Err(ContinuityLost(format!(
                            "WAL salt jumped from {:#x} to {:#x}",
                            old.salt1, h.salt1
                        ))
                        .into());
                    }
                    if sc.next_offset() > sc.committed().offset && sc.has_pending() {
                        tracing::debug!(
                            "dropping frames of a transaction the WAL restart discarded"
                        );
                    }
                    self.check_page_size(&h)?;
                    tracing::debug!(salt1 = h.salt1, "WAL restarted");
                    self.scanner = Some(WalScanner::new(&h));
                }
            }
        }
        self.scan(|me, txn| me.add_txn(txn))
    }

    /// True when a WAL that restarted with new salts (not the old salt + 1) starts from exactly
    /// the captured state. The first write after another connection's RESTART or TRUNCATE
    /// checkpoint picks new salts (only the connection that restarted the WAL counts on from
    /// the old ones). SQLite restarts the WAL only once every frame is copied back and no reader
    /// is inside it; the guard is always held, so it then reads the database file alone — and
    /// keeps any later frame from being copied back — and sees exactly the new WAL's base. That
    /// base must be the captured state, page for page, with nothing captured waiting unwritten
    /// (its pages were in the old WAL); anything else is a WAL replaced behind SQLite's back.
    fn restart_continues(&self) -> Result<bool> {
        if self.active.is_none() || !self.batch.is_empty() {
            return Ok(false);
        }
        let started = Instant::now();
        let mut changed = 0u32;
        let (page_size, pages) = self.changed_pages(|_, _, _| changed += 1)?;
        let same = changed == 0
            && page_size == self.hashes.page_size()
            && pages == self.hashes.page_count();
        tracing::debug!(
            same,
            pages,
            took = ?started.elapsed(),
            "the WAL restarted with new salts: the database compared with the captured state"
        );
        Ok(same)
    }

    /// Notes whether a frame of the current WAL waits past the published end (a commit being
    /// published, or left unpublished by a writer that died); true when one does.
    fn note_unpublished(&mut self, published: Option<u64>) -> Result<bool> {
        let (Some(p), Some(sc), Some(w)) = (published, self.scanner.as_ref(), self.wal.as_mut())
        else {
            self.unpublished = None;
            return Ok(false);
        };
        let (h, at) = (*sc.header(), p.max(sc.committed().offset));
        let mut fh = [0u8; FRAME_HEADER_LEN];
        let waiting = w.file.read_at(&mut fh, at)? == FRAME_HEADER_LEN && {
            let f = FrameHeader::decode(&fh);
            (f.salt1, f.salt2) == (h.salt1, h.salt2)
        };
        if !waiting {
            self.unpublished = None;
        } else if self.unpublished.is_none_or(|(end, _)| end != at) {
            self.unpublished = Some((at, Instant::now()));
        }
        Ok(waiting)
    }

    fn check_page_size(&self, h: &WalHeader) -> Result<()> {
        if h.page_size != self.hashes.page_size() {
            return Err(ContinuityLost(format!(
                "page size changed from {} to {}",
                self.hashes.page_size(),
                h.page_size
            ))
            .into());
        }
        Ok(())
    }

    fn add_txn(&mut self, mut txn: WalTxn) {
        txn.pages.retain(|p| p.pgno <= txn.db_pages);
        self.pages_seen += txn.pages.len() as u64;
        for p in &txn.pages {
            self.hashes.set(p.pgno, p.hash);
        }
        self.hashes.set_page_count(txn.db_pages);
        self.txid += 1;
        let header = TxnHeader {
            txid: self.txid,
            time_ms: now_ms(),
            db_pages: txn.db_pages,
            page_count: txn.pages.len() as u32,
            db_checksum: self.hashes.checksum(),
        };
        tracing::trace!(txid = self.txid, pages = txn.pages.len(), "captured");
        self.batch.push(Captured {
            header,
            pages: Pages::Wal(txn.pages),
        });
        self.batch_wal = Some(txn.end);
        self.batch_since.get_or_insert_with(Instant::now);
    }

    // ---- the guard -------------------------------------------------------------------------

    /// Moves the guard forward: a read transaction on the other connection, capture up to the
    /// end, everything durable, then the old read transaction ends.
    fn sync(&mut self) -> Result<()> {
        let next = match self.active {
            Some(a) => 1 - a,
            None => 0,
        };
        sqlite::begin_read(&self.guards[next])?;
        let r = self.capture().and_then(|_| self.write_batch());
        if let Err(e) = r {
            sqlite::end_txn(&self.guards[next]);
            return Err(e);
        }
        if let Some(a) = self.active {
            sqlite::end_txn(&self.guards[a]);
        }
        self.active = Some(next);
        self.last_rotation = Instant::now();
        Ok(())
    }

    /// Like `sync`, but under SQLite's write lock, so the guard's snapshot is exactly the
    /// position of the last captured transaction.
    fn sync_exact(&mut self) -> Result<()> {
        sqlite::lock_writes(&self.writer, self.cfg.busy_timeout)?;
        let r = self.sync();
        sqlite::end_txn(&self.writer);
        r
    }

    fn guard(&self) -> &Connection {
        &self.guards[self.active.expect("a guard is held")]
    }

    // ---- writing ---------------------------------------------------------------------------

    fn header_for(
        &self,
        kind: Kind,
        level: u32,
        first: &TxnHeader,
        last: &TxnHeader,
        wal: Option<WalPos>,
    ) -> FileHeader {
        FileHeader {
            kind,
            compression: self.compression,
            page_size: self.hashes.page_size(),
            level,
            generation: self.generation,
            first_txid: first.txid,
            last_txid: last.txid,
            first_time_ms: first.time_ms,
            last_time_ms: last.time_ms,
            wal,
            db_checksum: last.db_checksum,
            db_pages: last.db_pages,
        }
    }

    /// Writes the batch as one segment to every target, durably.
    fn write_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            // Deferred WAL writes that held no commit opened no batch.
            self.batch_since = None;
            return Ok(());
        }
        let started = Instant::now();
        let first = self.batch[0].header;
        let last = self.batch[self.batch.len() - 1].header;
        let header = self.header_for(Kind::Segment, 0, &first, &last, self.batch_wal);
        let meta = FileMeta::from_header(&header);
        let mut sink = Sink::create(&self.targets, &meta)?;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let mut stream: Vec<Txn> = Vec::new();
        let r = (|| -> Result<()> {
            let mut enc = Encoder::new(&header, &mut out)?;
            let ps = self.hashes.page_size() as usize;
            // Pages still in the WAL are read back `PAGE_BATCH` at a time across transactions
            // (one submission each), in the order the encoder takes them.
            let mut ahead = self.batch.iter().flat_map(|c| match &c.pages {
                Pages::Wal(refs) => refs.as_slice(),
                Pages::Inline(_) => &[],
            });
            let mut offsets: Vec<u64> = Vec::with_capacity(PAGE_BATCH);
            let mut data = Vec::new();
            let mut used = 0;
            let hub_from = match &self.hub {
                Some(hub) => {
                    let (from, bytes) = hub_tail(&self.batch, ps);
                    hub.make_room(bytes);
                    from
                }
                None => self.batch.len(),
            };
            for (i, c) in self.batch.iter().enumerate() {
                enc.begin_txn(&c.header, &mut out)?;
                let mut txn = (i >= hub_from).then(|| Txn {
                    generation: self.generation,
                    header: TxnInfo::from(&c.header),
                    pages: Vec::with_capacity(c.header.page_count as usize),
                });
                match &c.pages {
                    Pages::Inline(pages) => {
                        for (pgno, d) in pages {
                            enc.page(*pgno, d, &mut out)?;
                        }
                        if let Some(t) = txn.as_mut() {
                            t.pages.clone_from(pages);
                        }
                    }
                    Pages::Wal(refs) => {
                        let w = self
                            .wal
                            .as_mut()
                            .ok_or_else(|| anyhow!("WAL closed before its pages were written"))?;
                        for p in refs {
                            if used == offsets.len() {
                                offsets.clear();
                                offsets.extend(ahead.by_ref().take(PAGE_BATCH).map(|p| p.offset));
                                w.file.read_many(&offsets, ps, &mut data)?;
                                used = 0;
                            }
                            debug_assert_eq!(offsets.get(used), Some(&p.offset));
                            let page = &data[used * ps..(used + 1) * ps];
                            used += 1;
                            if page_hash(p.pgno, page) != p.hash {
                                return Err(ContinuityLost(format!(
                                    "page {} changed in the WAL at offset {} after it was scanned",
                                    p.pgno, p.offset
                                ))
                                .into());
                            }
                            enc.page(p.pgno, page, &mut out)?;
                            if let Some(t) = txn.as_mut() {
                                t.pages.push((p.pgno, page.to_vec()));
                            }
                        }
                    }
                }
                sink.spill(&mut out)?;
                stream.extend(txn);
            }
            enc.finish(&mut out)?;
            Ok(())
        })();
        let r = r.and_then(|_| sink.finish(&mut out));
        self.out = out;
        r?;
        tracing::debug!(
            generation = self.generation,
            txid = last.txid,
            first = first.txid,
            "segment written"
        );
        self.files.push(meta);
        if let Some(hub) = &self.hub {
            hub.publish(self.generation, self.hashes.page_size(), stream);
        }
        if let Some((h, i)) = &self.health {
            h.synced(*i, self.generation, last.txid, self.batch.len() as u64);
        }
        self.durable_txid = last.txid;
        self.synced_targets();
        if let Some(m) = &self.m {
            m.txns.add(self.batch.len() as u64);
            m.segments.inc();
            m.sync.observe(started.elapsed());
            let ps = u64::from(self.hashes.page_size());
            let frames: u64 = self
                .batch
                .iter()
                .map(|c| u64::from(c.header.page_count))
                .sum();
            m.wal_bytes.add(frames * (ps + FRAME_HEADER_LEN as u64));
        }
        self.batch.clear();
        self.batch_wal = None;
        self.batch_since = None;
        Ok(())
    }

    /// Writes a snapshot of what the guard sees, which must be exactly the state after
    /// `self.txid` (as `self.hashes` says); every page is checked against the tracked hashes.
    fn write_snapshot(&mut self, wal: Option<WalPos>) -> Result<()> {
        let txn = TxnHeader {
            txid: self.txid,
            time_ms: now_ms(),
            db_pages: self.hashes.page_count(),
            page_count: self.hashes.page_count(),
            db_checksum: self.hashes.checksum(),
        };
        let header = self.header_for(Kind::Snapshot, 0, &txn, &txn, wal);
        let meta = FileMeta::from_header(&header);
        let mut sink = Sink::create(&self.targets, &meta)?;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let hashes = &self.hashes;
        let guard = self.guard();
        let r = (|| -> Result<()> {
            let mut enc = Encoder::new(&header, &mut out)?;
            enc.begin_txn(&txn, &mut out)?;
            sqlite::for_each_page(guard, |pgno, data| {
                if hashes.get(pgno) != Some(page_hash(pgno, data)) {
                    bail!("page {pgno} differs from the tracked state; the snapshot is abandoned");
                }
                enc.page(pgno, data, &mut out)?;
                sink.spill(&mut out)?;
                Ok(())
            })?;
            enc.finish(&mut out)?;
            Ok(())
        })();
        let r = r.and_then(|_| sink.finish(&mut out));
        self.out = out;
        r?;
        tracing::info!(
            generation = self.generation,
            txid = self.txid,
            pages = txn.db_pages,
            "snapshot written"
        );
        self.files.push(meta);
        self.last_snapshot = Instant::now();
        self.last_snapshot_txid = self.txid;
        self.durable_txid = self.txid;
        self.synced_targets();
        if let Some(m) = &self.m {
            m.snapshots.inc();
        }
        Ok(())
    }

    // ---- start-up --------------------------------------------------------------------------

    /// Reconciles the targets and reads what the latest stored file says.
    fn stored(&mut self) -> Result<Option<Stored>> {
        let mut lists = Vec::new();
        for t in &self.targets {
            lists.push(t.storage.list().with_context(|| t.storage.describe())?);
        }
        // The most advanced target leads; the others get what they miss of its generation.
        let key = |l: &Vec<FileMeta>| l.iter().map(|m| (m.generation, m.last_txid)).max();
        let lead = (0..lists.len())
            .max_by_key(|&i| key(&lists[i]))
            .unwrap_or(0);
        for i in 0..lists.len() {
            if i == lead || key(&lists[i]) == key(&lists[lead]) {
                continue;
            }
            let Some((g, _)) = key(&lists[lead]) else {
                continue;
            };
            let missing: Vec<FileMeta> = lists[lead]
                .iter()
                .filter(|m| m.generation == g && !lists[i].contains(m))
                .copied()
                .collect();
            tracing::info!(
                target = %self.targets[i].name,
                files = missing.len(),
                "copying files the target missed from {}",
                self.targets[lead].name
            );
            for m in &missing {
                copy_file(&*self.targets[lead].storage, &*self.targets[i].storage, m)?;
            }
        }
        self.files = std::mem::take(&mut lists[lead]);
        self.files
            .sort_by_key(|m| (m.generation, m.first_txid, m.last_txid));
        let Some(latest) = self
            .files
            .iter()
            .max_by_key(|m| (m.generation, m.last_txid, m.is_segment()))
            .copied()
        else {
            return Ok(None);
        };
        // Read whole, every byte checked, not just its header: a file cut short or holed by a
        // crash of the machine (a disk that lost what it acknowledged) must not be continued,
        // or every later restore would stop at it.
        let h = match read_checked(&*self.targets[lead].storage, &latest) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("{e:#}: starting a new generation");
                return Ok(Some(Stored {
                    generation: latest.generation,
                    txid: self.max_txid(),
                    wal: None,
                    db_checksum: 0,
                    page_size: 0,
                    page_count: 0,
                }));
            }
        };
        if let Some(s) = self
            .files
            .iter()
            .filter(|m| m.is_snapshot())
            .max_by_key(|m| m.last_txid)
        {
            self.last_snapshot_txid = s.last_txid;
            let age = now_ms().saturating_sub(s.last_time_ms);
            self.last_snapshot = Instant::now()
                .checked_sub(Duration::from_millis(age))
                .unwrap_or_else(Instant::now);
        }
        Ok(Some(Stored {
            generation: h.generation,
            txid: h.last_txid,
            wal: h.wal,
            db_checksum: h.db_checksum,
            page_size: h.page_size,
            page_count: h.db_pages,
        }))
    }

    /// Tells the stream server the durable position after (re-)establishing. With captured
    /// transactions still to write, their publication does it instead.
    fn announce(&self) {
        if let Some((h, i)) = &self.health {
            h.position(*i, self.generation, self.txid);
        }
        if let Some(hub) = &self.hub {
            if self.batch.is_empty() && self.generation != 0 {
                hub.set_position(
                    self.generation,
                    self.txid,
                    self.hashes.checksum(),
                    self.hashes.page_size(),
                );
            }
        }
    }

    fn max_txid(&self) -> u64 {
        self.files.iter().map(|m| m.last_txid).max().unwrap_or(0)
    }

    /// Establishes where capture continues from; see the module docs.
    fn establish(&mut self) -> Result<()> {
        // The targets are listed and made consistent below: no merge may be half-written then.
        self.compaction_done(true);
        match self.write_batch() {
            Ok(()) => {}
            Err(e) if e.is::<ContinuityLost>() => {
                // Their pages are gone from the WAL; what they changed is in the database and
                // is taken up below (as one transaction or a new snapshot).
                tracing::warn!(
                    transactions = self.batch.len(),
                    "{e:#}: these captured transactions are taken up by the state read next"
                );
                self.batch.clear();
                self.batch_wal = None;
                self.batch_since = None;
            }
            Err(e) => return Err(e),
        }
        for g in &self.guards {
            sqlite::end_txn(g);
        }
        self.active = None;
        self.scanner = None;
        let stored = self.stored()?;

        sqlite::lock_writes(&self.writer, self.cfg.busy_timeout * 4)?;
        let locked = (|| -> Result<(bool, Vec<WalTxn>)> {
            self.refresh_wal()?;
            let header = self.read_wal_header()?;
            let mut chain = false;
            let mut range = Vec::new();
            if let (Some(h), Some(st)) = (header, stored) {
                if let Some(at) = st.wal {
                    if self.wal_continues(&h, &at)? {
                        chain = true;
                        self.hashes = DbHashes::new(h.page_size);
                        self.scanner =
                            Some(WalScanner::resume(&h, at).map_err(|e| anyhow!("{e}"))?);
                        let mut txns = Vec::new();
                        self.scan(|_, t| txns.push(t))?;
                        range = txns;
                    }
                }
            }
            if !chain {
                if let Some(h) = header {
                    self.scanner = Some(WalScanner::new(&h));
                    self.scan(|_, _| {})?;
                }
            }
            sqlite::begin_read(&self.guards[0])?;
            self.active = Some(0);
            Ok((chain, range))
        })();
        sqlite::end_txn(&self.writer);
        let (chain, range) = locked?;

        // Everything below reads the database as the guard sees it: exactly the WAL's end.
        self.hashes = sqlite::db_hashes(self.guard())?;
        if let Some(sc) = &self.scanner {
            if sc.header().page_size != self.hashes.page_size() {
                bail!(
                    "the WAL's page size {} differs from the database's {}",
                    sc.header().page_size,
                    self.hashes.page_size()
                );
            }
        }
        let wal_pos = self.scanner.as_ref().map(|s| s.committed());
        let Some(st) = stored else {
            // At start-up (1, 1); after a reload replaced every target, a generation and txids
            // beyond what replicas may hold, so none mistakes the new history for its own.
            let (g, t) = (self.generation + 1, self.txid + 1);
            return self.new_generation(g, t, "no backup exists yet", wal_pos);
        };
        let same_content = st.page_size == self.hashes.page_size()
            && st.page_count == self.hashes.page_count()
            && st.db_checksum == self.hashes.checksum();
        self.generation = st.generation;
        self.txid = st.txid;
        if chain && range.is_empty() && same_content {
            tracing::info!("resuming: the WAL continues exactly where the backup ends");
            return Ok(());
        }
        let shrank = range.windows(2).any(|w| w[1].db_pages < w[0].db_pages)
            || range.first().is_some_and(|t| t.db_pages < st.page_count);
        if chain && !range.is_empty() && !shrank && st.page_size == self.hashes.page_size() {
            // Transactions committed while replited was down, still in the WAL: captured as one.
            let mut pages = std::collections::BTreeMap::new();
            let db_pages = range.last().expect("non-empty").db_pages;
            let end = range.last().expect("non-empty").end;
            for t in &range {
                for p in &t.pages {
                    pages.insert(p.pgno, *p);
                }
            }
            let refs: Vec<PageRef> = pages.into_values().filter(|p| p.pgno <= db_pages).collect();
            for p in &refs {
                if self.hashes.get(p.pgno) != Some(p.hash) {
                    bail!("page {} in the WAL disagrees with the database", p.pgno);
                }
            }
            tracing::info!(
                transactions = range.len(),
                "resuming: capturing the transactions committed while replited was stopped as one"
            );
            self.txid += 1;
            self.batch.push(Captured {
                header: TxnHeader {
                    txid: self.txid,
                    time_ms: now_ms(),
                    db_pages,
                    page_count: refs.len() as u32,
                    db_checksum: self.hashes.checksum(),
                },
                pages: Pages::Wal(refs),
            });
            self.batch_wal = Some(end);
            return self.write_batch();
        }
        if same_content {
            tracing::info!(
                "resuming: the WAL was checkpointed meanwhile but the database is unchanged"
            );
            return Ok(());
        }
        let why = match (&self.reestablish, chain) {
            (Some(why), _) => why.clone(),
            (None, true) => "the database shrank while replited was stopped".into(),
            (None, false) => {
                "the WAL was checkpointed or replaced while replited was stopped".into()
            }
        };
        let next = self.max_txid().max(st.txid) + 1;
        self.new_generation(st.generation + 1, next, &why, wal_pos)
    }

    fn new_generation(
        &mut self,
        generation: u64,
        txid: u64,
        why: &str,
        wal: Option<WalPos>,
    ) -> Result<()> {
        tracing::info!(generation, txid, "starting a new generation: {why}");
        self.generation = generation;
        self.txid = txid;
        self.write_snapshot(wal)
    }

    /// True when the WAL still holds the frame chain that ended at `at`.
    fn wal_continues(&mut self, h: &WalHeader, at: &WalPos) -> Result<bool> {
        if (h.salt1, h.salt2) != (at.salt1, at.salt2) {
            return Ok(false);
        }
        let flen = h.frame_len() as u64;
        if at.offset == WAL_HEADER_LEN as u64 {
            return Ok(h.checksum == at.checksum);
        }
        if at.offset < WAL_HEADER_LEN as u64 + flen
            || (at.offset - WAL_HEADER_LEN as u64) % flen != 0
        {
            return Ok(false);
        }
        let mut fh = [0u8; FRAME_HEADER_LEN];
        let w = self.wal.as_mut().expect("header read implies open");
        if w.file.read_at(&mut fh, at.offset - flen)? < FRAME_HEADER_LEN {
            return Ok(false);
        }
        let f = FrameHeader::decode(&fh);
        Ok(f.salt1 == at.salt1
            && f.salt2 == at.salt2
            && f.checksum == at.checksum
            && f.commit_db_size > 0)
    }

    // ---- periodic work ---------------------------------------------------------------------

    fn checkpoint(&mut self, truncate: bool) -> Result<()> {
        self.last_checkpoint = Instant::now();
        if !truncate {
            // Under the write lock no commit can land, so once everything captured is durable
            // the checkpoint can copy the whole WAL, and a guard started afterwards reads
            // without the WAL: the app's next write then restarts it from the beginning.
            if let Err(e) = sqlite::lock_writes(&self.writer, LOCK_PATIENCE) {
                tracing::debug!("checkpoint postponed: {e:#}");
                return Ok(());
            }
            let r = (|| -> Result<()> {
                self.sync()?;
                let started = Instant::now();
                let (busy, log, done) = sqlite::checkpoint(&self.ckpt, "PASSIVE")?;
                if let Some(m) = &self.m {
                    m.checkpoint("passive", started.elapsed());
                }
                tracing::debug!(busy, log, done, "PASSIVE checkpoint");
                if log > 0 && log == done {
                    self.sync()?;
                    self.backfilled = self
                        .scanner
                        .as_ref()
                        .map(|s| (s.header().salt1, s.frames_committed()));
                }
                Ok(())
            })();
            sqlite::end_txn(&self.writer);
            return r;
        }
        self.sync_exact()?;
        let salts = self
            .scanner
            .as_ref()
            .map(|s| (s.header().salt1, s.header().salt2));
        for g in &self.guards {
            sqlite::end_txn(g);
        }
        self.active = None;
        let started = Instant::now();
        let r = sqlite::checkpoint(&self.ckpt, "TRUNCATE");
        if let Some(m) = &self.m {
            m.checkpoint("truncate", started.elapsed());
        }
        sqlite::begin_read(&self.guards[0])?;
        self.active = Some(0);
        let (busy, _, _) = r?;
        tracing::debug!(busy, "TRUNCATE checkpoint");
        if busy != 0 {
            // Not truncated. If the WAL restarted while no guard was held, frames may be gone.
            self.refresh_wal()?;
            let now = self.read_wal_header()?.map(|h| (h.salt1, h.salt2));
            if now != salts {
                return Err(ContinuityLost("the WAL restarted during a checkpoint".into()).into());
            }
            return Ok(());
        }
        // The WAL is empty (or a new one has begun): the database file holds everything.
        // Anything committed between our capture and the checkpoint is only there now.
        self.scanner = None;
        self.capture_db_changes()
    }

    /// Compares the database, as the guard sees it, page by page with the tracked hashes and
    /// captures any difference as one transaction.
    fn capture_db_changes(&mut self) -> Result<()> {
        let mut changed = Vec::new();
        let mut hashes = self.hashes.clone();
        let (_, pages) = self.changed_pages(|pgno, page, h| {
            hashes.set(pgno, h);
            changed.push((pgno, page.to_vec()));
        })?;
        hashes.set_page_count(pages);
        if changed.is_empty() && pages == self.hashes.page_count() {
            return Ok(());
        }
        tracing::warn!(
            pages = changed.len(),
            "transactions committed during a TRUNCATE checkpoint are captured as one"
        );
        self.hashes = hashes;
        self.txid += 1;
        self.batch.push(Captured {
            header: TxnHeader {
                txid: self.txid,
                time_ms: now_ms(),
                db_pages: pages,
                page_count: changed.len() as u32,
                db_checksum: self.hashes.checksum(),
            },
            pages: Pages::Inline(changed),
        });
        self.batch_wal = None;
        self.write_batch()
    }

    /// Calls `f` with each page of the database as the guard sees it whose hash differs from
    /// the tracked one (its number, data and hash); returns the guard's page size and count.
    /// Read through SQLite, at the guard's snapshot: consistent by SQLite's own locking even if
    /// the app commits and checkpoints meanwhile (and no descriptor of the database file is
    /// ever opened and closed beside SQLite's: that would drop its POSIX locks).
    fn changed_pages(&self, mut f: impl FnMut(u32, &[u8], u64)) -> Result<(u32, u32)> {
        let geometry = sqlite::page_geometry(self.guard())?;
        sqlite::for_each_page(self.guard(), |pgno, page| {
            let h = page_hash(pgno, page);
            if self.hashes.get(pgno) != Some(h) {
                f(pgno, page, h);
            }
            Ok(())
        })?;
        Ok(geometry)
    }

    fn snapshot(&mut self) -> Result<()> {
        self.sync_exact()?;
        let wal = self.scanner.as_ref().map(|s| s.committed());
        self.write_snapshot(wal)
    }

    /// Starts a round of compaction on a thread of its own: merging hundreds of segments takes
    /// tens of milliseconds each, and capture must not wait for them (at 1,000 commits/s a
    /// round on the capture thread held every commit back by up to 70 ms for ~2 s of every
    /// 10; docs/BENCHMARKS.md, ninth pass). The thread works on a copy of the file list; what
    /// it merged is taken into `files` by [`Self::compaction_done`].
    fn compact(&mut self) {
        self.last_compaction = Instant::now();
        let targets = self.targets.clone();
        let files = self.files.clone();
        let (generation, compression) = (self.generation, self.compression);
        // The database's span (capture runs inside it), so the round logs under it.
        let span = tracing::Span::current();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        match std::thread::Builder::new()
            .name("compact".into())
            .spawn(move || {
                let _e = span.enter();
                compact_round(&targets, files, generation, compression, &stopped)
            }) {
            Ok(h) => self.compaction = Some((h, stop)),
            Err(e) => tracing::error!("starting compaction: {e}; trying again later"),
        }
    }

    /// Takes in what the running round of compaction merged once it has ended (with `wait`,
    /// ends it after the merge in progress; the next round merges the rest).
    fn compaction_done(&mut self, wait: bool) {
        if !wait
            && !self
                .compaction
                .as_ref()
                .is_some_and(|(h, _)| h.is_finished())
        {
            return;
        }
        let Some((h, stop)) = self.compaction.take() else {
            return;
        };
        stop.store(true, Ordering::Relaxed);
        let done = h.join().unwrap_or_else(|_| Merged {
            merges: Vec::new(),
            error: Some(anyhow!("the compaction thread panicked")),
        });
        for (inputs, merged) in &done.merges {
            replace_merged(&mut self.files, inputs, *merged);
        }
        if let Some(e) = done.error {
            tracing::error!(
                merged = done.merges.len(),
                "compaction: {e:#}; trying again in {:?}",
                self.cfg.compaction_interval
            );
            if let Some((h, i)) = &self.health {
                h.error(*i, "compaction", &format_args!("{e:#}"));
            }
        }
    }

    fn retention(&mut self) -> Result<()> {
        if self.compaction.is_some() {
            // It may be merging files retention would delete: next step, once it is done.
            return Ok(());
        }
        self.last_retention = Instant::now();
        let doomed: Vec<FileMeta> =
            plan::plan_retention(&self.files, now_ms(), self.cfg.retention.as_millis() as u64)
                .into_iter()
                .map(|i| self.files[i])
                .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        for t in &self.targets {
            t.storage.delete(&doomed)?;
        }
        let deleted: std::collections::HashSet<&FileMeta> = doomed.iter().collect();
        self.files.retain(|m| !deleted.contains(m));
        tracing::info!(
            files = doomed.len(),
            "retention deleted files older than {:?}",
            self.cfg.retention
        );
        Ok(())
    }
}

impl Drop for Replicator {
    /// A round of compaction still running ends first: it holds the targets (a spool among
    /// them, which cleans up when the last holder drops it).
    fn drop(&mut self) {
        if let Some((h, stop)) = self.compaction.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }
}

/// What a round of compaction did: each merge's inputs and the file that replaced them, and
/// the error that ended the round early, if one did.
struct Merged {
    merges: Vec<(Vec<FileMeta>, FileMeta)>,
    error: Option<anyhow::Error>,
}

/// Merges runs of small segments of `generation` into larger ones, level by level, each merge
/// at most [`MERGE_MAX`] files, until no level has a run to merge or `stop` is set; deletes
/// what was merged.
fn compact_round(
    targets: &[Target],
    mut files: Vec<FileMeta>,
    generation: u64,
    compression: format::Compression,
    stop: &AtomicBool,
) -> Merged {
    tracing::debug!("compaction round started");
    let mut merges = Vec::new();
    let mut round = || -> Result<()> {
        for level in 0..MAX_LEVEL {
            let min = if level == 0 { 2 } else { MERGE_AT };
            // Each merge takes at least two files out of this level: the loop ends.
            while let Some(run) = plan::plan_compaction(&files, generation, level, min) {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let inputs: Vec<FileMeta> = run.iter().take(MERGE_MAX).map(|&i| files[i]).collect();
                let merged = merge(targets, &inputs, level + 1, compression)?;
                for t in targets {
                    t.storage.delete(&inputs)?;
                }
                replace_merged(&mut files, &inputs, merged);
                tracing::debug!(level = level + 1, files = inputs.len(), "segments merged");
                merges.push((inputs, merged));
            }
        }
        Ok(())
    };
    let error = round().err();
    tracing::debug!(merges = merges.len(), "compaction round ended");
    Merged { merges, error }
}

/// Puts `merged` in place of the files it merged in a list of stored files (once: a list read
/// from the targets since may hold it already).
fn replace_merged(files: &mut Vec<FileMeta>, inputs: &[FileMeta], merged: FileMeta) {
    let merged_away: std::collections::HashSet<&FileMeta> = inputs.iter().collect();
    files.retain(|m| !merged_away.contains(m));
    if !files.contains(&merged) {
        files.push(merged);
    }
}

/// Merges `inputs` (read from the first target) into one file at `level`, written to every
/// target. Pages are copied as stored: compressed once, at capture.
fn merge(
    targets: &[Target],
    inputs: &[FileMeta],
    level: u32,
    compression: format::Compression,
) -> Result<FileMeta> {
    let src = &*targets[0].storage;
    let first = read_header(src, &inputs[0])?;
    let last = read_header(src, &inputs[inputs.len() - 1])?;
    let mut header = last;
    header.level = level;
    header.first_txid = first.first_txid;
    header.first_time_ms = first.first_time_ms;
    header.compression = compression;
    let meta = FileMeta::from_header(&header);
    let mut sink = Sink::create(targets, &meta)?;
    let mut out = Vec::new();
    let mut enc = Encoder::new(&header, &mut out)?;
    for m in inputs {
        decode_file(src, m, |ev, dec| {
            match ev {
                Event::Txn(t) => enc.begin_txn(t, &mut out)?,
                Event::Page(pgno) => {
                    enc.page_as_stored(*pgno, dec.page(), Some(dec.stored()), &mut out)?
                }
                Event::Header(_) | Event::End => {}
            }
            sink.spill(&mut out)?;
            Ok(true)
        })?;
    }
    enc.finish(&mut out)?;
    sink.finish(&mut out)?;
    Ok(meta)
}

/// Decodes a whole stored file (checking every byte, trailer included) and returns its header.
fn read_checked(storage: &dyn Storage, meta: &FileMeta) -> Result<FileHeader> {
    let mut header = None;
    decode_file(storage, meta, |ev, _| {
        if let Event::Header(h) = ev {
            header = Some(*h);
        }
        Ok(header.is_none())
    })?;
    header.ok_or_else(|| anyhow!("{}: no header", storage.locate(meta)))
}

/// Copies one stored file between targets, checking it on the way.
fn copy_file(from: &dyn Storage, to: &dyn Storage, meta: &FileMeta) -> Result<()> {
    // Decode to check every byte, then copy the raw bytes.
    decode_file(from, meta, |_, _| Ok(false))?;
    let mut r = from.open(meta)?;
    let mut w = to.create(meta)?;
    std::io::copy(&mut r, &mut w)?;
    w.commit()?;
    Ok(())
}

/// One file being written to every target at once.
struct Sink {
    writers: Vec<(String, Box<dyn ObjectWriter>)>,
}

impl Sink {
    fn create(targets: &[Target], meta: &FileMeta) -> Result<Sink> {
        let mut writers = Vec::with_capacity(targets.len());
        for t in targets {
            writers.push((
                t.storage.locate(meta),
                t.storage
                    .create(meta)
                    .with_context(|| format!("replicate \"{}\"", t.name))?,
            ));
        }
        Ok(Sink { writers })
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        for (loc, w) in &mut self.writers {
            w.write_all(b).with_context(|| format!("writing {loc}"))?;
        }
        Ok(())
    }

    /// Writes `out` to every target once it holds `FLUSH_BYTES`, then empties it: memory stays
    /// bounded whatever the file's size.
    fn spill(&mut self, out: &mut Vec<u8>) -> Result<()> {
        if out.len() >= FLUSH_BYTES {
            self.write(out)?;
            out.clear();
        }
        Ok(())
    }

    /// Writes what remains of `out`, then makes the file durable on every target.
    fn finish(mut self, out: &mut Vec<u8>) -> Result<()> {
        self.write(out)?;
        out.clear();
        for (loc, w) in self.writers {
            w.commit().with_context(|| format!("writing {loc}"))?;
        }
        Ok(())
    }
}

/// Start-up checks that need no database: its directory exists and every target is writable.
pub fn preflight(cfg: &DbConfig) -> Result<()> {
    let dir = parent_dir(&cfg.db);
    if !dir.is_dir() {
        bail!(
            "db = \"{}\": directory {} does not exist",
            cfg.db.display(),
            dir.display()
        );
    }
    for t in targets(cfg)? {
        t.storage
            .check_writable()
            .with_context(|| format!("replicate \"{}\" ({})", t.name, t.storage.describe()))?;
    }
    Ok(())
}

/// Waits until the database file exists (an app creates it on its first start). False when
/// shutdown came first.
///
/// Waiting counts as ready (the app bound to replited's unit must start to create it, and
/// nothing exists yet that could be lost): `health` is told so and beats meanwhile.
pub fn wait_for_db(
    db: &Path,
    shutdown: &Shutdown,
    health: Option<(&crate::notify::Health, usize)>,
) -> Result<bool> {
    if db.exists() {
        return Ok(true);
    }
    tracing::info!(db = %db.display(), "waiting for the database to be created");
    if let Some((h, i)) = health {
        h.set_status(i, || {
            format!("{}: waiting for the app to create it", db_name(db))
        });
        h.set_ready(i);
    }
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        parent_dir(db),
        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
    )?;
    while !db.exists() {
        if shutdown.requested() {
            return Ok(false);
        }
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(shutdown.fd(), PollFlags::POLLIN),
        ];
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(1000u16));
        let _ = inotify.read_events();
        if let Some((h, i)) = health {
            h.beat(i);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a failure capture tries again in 200 ms, doubling, and never later than 5 s
    /// however long the outage (it waited up to 25.6 s before: a store that answered again
    /// could wait that long for capture to resume, with the WAL growing meanwhile).
    #[test]
    fn capture_retries_within_five_seconds_however_long_the_outage() {
        let waits: Vec<u128> = (1..=6).map(|f| capture_backoff(f).as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1_600, 3_200, 5_000]);
        for failures in [7, 8, 9, 100, u32::MAX] {
            assert_eq!(capture_backoff(failures), Duration::from_secs(5));
        }
    }
}
