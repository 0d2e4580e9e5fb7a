//! A local spool in front of a remote target (S3), so a slow or failing store never stalls
//! capture or the other targets.
//!
//! `commit` makes a file durable in the spool directory (fdatasync, rename, directory fsync) and
//! queues it; two upload threads send queued files to the remote target, retrying with
//! exponential backoff and jitter (100 ms doubling to 30 s) while it fails, and remove each
//! spooled file once its upload is complete. One sends the commits' segments (level 0), in
//! order, one at a time; the other everything else in order: compaction's merged files and
//! snapshots (which may take seconds: a commit's durability never waits for them) and the
//! deletions (compaction, retention), queued behind the uploads of the files that replace what
//! they delete, so they never fail because the store is down either.
//!
//! The spool is bounded ([`SpoolStorage::limit`] bytes): past it, `create` fails with an error
//! that says how much waits and since when the store has been failing — capture then retries
//! with backoff, as for any failing target. Files left in the spool by a previous run (a crash,
//! or a stop while the store was down) are queued again at start.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use replited_core::format::Kind;
use replited_core::name::FileMeta;

use crate::storage::{FsStorage, ObjectWriter, Storage};

/// Default bound on the bytes waiting in a spool.
pub const DEFAULT_LIMIT: u64 = 1 << 30;
/// How long a file waits for room in a full spool while the store answers.
const ROOM_WAIT: Duration = Duration::from_secs(5);

enum Job {
    Upload(FileMeta, u64),
    Delete(Vec<FileMeta>),
}

#[derive(Default)]
struct Queue {
    /// The jobs waiting in each [`Lane`], in order.
    jobs: [VecDeque<Job>; 2],
    bytes: u64,
    /// Since when the remote target has been failing, and why.
    failing: Option<(Instant, String)>,
    stop: bool,
    /// The upload in progress in each [`Lane`] (its spool file must stay until it ends).
    busy: [Option<FileMeta>; 2],
    /// Whether each [`Lane`]'s thread is running a job (an upload or a delete).
    running: [bool; 2],
    /// Unix ms of the last completed upload (0: none yet).
    last_upload_ms: u64,
    /// Files taken out of the queue before their upload (a merge took them in) whose
    /// transactions the store lacks until a file covering them is uploaded, and files queued
    /// again at start-up (their inputs' fate is unknown).
    dropped: Vec<FileMeta>,
    /// Per generation, the first transaction of the earliest segment queued in this run: a
    /// snapshot at or after it repeats what segments hold.
    segments_from: BTreeMap<u64, u64>,
}

/// Which upload thread takes a job.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lane {
    /// The commits' segments (level 0), in order: each commit's first copy in the store, which
    /// its durability waits for.
    Fresh,
    /// Everything else, in order: merged files, snapshots (a merge of hundreds of segments or
    /// a snapshot takes seconds to upload) and deletes.
    Rest,
}

/// Whether `a` holds every transaction of `b`.
fn covers(a: &FileMeta, b: &FileMeta) -> bool {
    a.generation == b.generation && a.first_txid <= b.first_txid && b.last_txid <= a.last_txid
}

/// The lane whose thread uploads `m`.
fn lane(m: &FileMeta) -> Lane {
    if m.kind == Kind::Segment && m.level == 0 {
        Lane::Fresh
    } else {
        Lane::Rest
    }
}

impl Queue {
    /// Queues `job` at the end of its lane.
    fn push(&mut self, job: Job) {
        let l = match &job {
            Job::Upload(m, _) => lane(m),
            Job::Delete(_) => Lane::Rest,
        };
        if let Job::Upload(m, _) = &job {
            if l == Lane::Fresh {
                let f = self
                    .segments_from
                    .entry(m.generation)
                    .or_insert(m.first_txid);
                *f = (*f).min(m.first_txid);
            }
        }
        self.jobs[l as usize].push_back(job);
    }

    /// Whether the store lacks transactions of `m` while `m` waits for upload. Not those of a
    /// merged file: its inputs stay in the store until it is uploaded (deleted behind it), or
    /// were dropped from the queue (see `dropped`). Not those of a snapshot repeating the
    /// state segments of its generation hold; a generation's first snapshot, though.
    fn lacks(&self, m: &FileMeta) -> bool {
        match lane(m) {
            Lane::Fresh => true,
            Lane::Rest => {
                m.kind == Kind::Snapshot
                    && self
                        .segments_from
                        .get(&m.generation)
                        .is_none_or(|&f| m.first_txid < f)
            }
        }
    }

    /// The oldest file whose transactions the store lacks (waiting, in progress or dropped).
    fn oldest_lacking(&self) -> Option<FileMeta> {
        self.pending()
            .filter(|m| self.lacks(m))
            .chain(self.dropped.iter().copied())
            .min_by_key(|m| (m.first_txid, m.first_time_ms))
    }

    /// `m` is in the store: what it covers no longer lacks.
    fn uploaded(&mut self, m: &FileMeta) {
        self.dropped.retain(|d| !covers(m, d));
    }

    /// The next job for `l`, if it may start now. A delete waits (and what follows it in its
    /// lane) while a file it deletes is being uploaded: it would come back after the delete.
    fn next_job(&mut self, l: Lane) -> Option<Job> {
        if let Some(Job::Delete(ms)) = self.jobs[l as usize].front() {
            if self.busy.iter().flatten().any(|b| ms.contains(b)) {
                return None;
            }
        }
        self.jobs[l as usize].pop_front()
    }

    /// The files waiting for upload (not those in progress).
    fn waiting(&self) -> impl Iterator<Item = FileMeta> + '_ {
        self.jobs.iter().flatten().filter_map(|j| match j {
            Job::Upload(m, _) => Some(*m),
            Job::Delete(_) => None,
        })
    }

    /// The files waiting for upload and those in progress.
    fn pending(&self) -> impl Iterator<Item = FileMeta> + '_ {
        self.waiting().chain(self.busy.iter().flatten().copied())
    }

    /// Whether no job waits and none is in progress (a delete included).
    fn idle(&self) -> bool {
        self.jobs.iter().all(VecDeque::is_empty) && !self.running.iter().any(|&r| r)
    }
}

struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
}

/// A remote target behind a local spool directory.
pub struct SpoolStorage {
    inner: Arc<dyn Storage>,
    dir: PathBuf,
    /// The spool directory, laid out and written like any local target (what the spool deletes
    /// is recycled there too: a spooled file per commit otherwise costs a fresh inode each).
    local: Arc<FsStorage>,
    limit: u64,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SpoolStorage {
    /// Spools for `inner` in `dir` (created if needed), at most `limit` bytes waiting; files
    /// left there by an earlier run are queued first.
    /// `labels`: the database's and the target's names, for the upload metrics.
    pub fn new(
        inner: Box<dyn Storage>,
        dir: PathBuf,
        limit: u64,
        labels: (&str, &str),
    ) -> Result<SpoolStorage> {
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating the spool {}", dir.display()))?;
        let l = [("db", labels.0), ("target", labels.1)];
        let metrics = UploadMetrics {
            upload: crate::metrics::histogram(
                "replited_upload_duration_seconds",
                "Time an upload to a remote target took (successful ones).",
                &l,
            ),
            errors: crate::metrics::counter(
                "replited_errors_total",
                "Errors by kind (each retried).",
                &[("db", labels.0), ("kind", "upload")],
            ),
        };
        let s = SpoolStorage::start(inner, dir, limit, metrics);
        s.recover()?;
        Ok(s)
    }

    fn start(
        inner: Box<dyn Storage>,
        dir: PathBuf,
        limit: u64,
        metrics: UploadMetrics,
    ) -> SpoolStorage {
        let inner: Arc<dyn Storage> = Arc::from(inner);
        let shared = Arc::new(Shared {
            q: Mutex::new(Queue::default()),
            cv: Condvar::new(),
        });
        let local = Arc::new(FsStorage::at(dir.clone()));
        let threads = [Lane::Fresh, Lane::Rest]
            .into_iter()
            .filter_map(|l| {
                let (inner, shared, local, dir, metrics) = (
                    inner.clone(),
                    shared.clone(),
                    local.clone(),
                    dir.clone(),
                    metrics.clone(),
                );
                let name = match l {
                    Lane::Fresh => "upload",
                    Lane::Rest => "upload-merged",
                };
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || upload_loop(l, &*inner, &shared, &local, &dir, metrics))
                    .ok()
            })
            .collect();
        SpoolStorage {
            inner,
            local,
            dir,
            limit,
            shared,
            threads,
        }
    }

    fn path(&self, meta: &FileMeta) -> PathBuf {
        self.dir.join(meta.path())
    }

    /// Files left in the spool directory: queued again, oldest first.
    fn recover(&self) -> Result<()> {
        let mut found = Vec::new();
        let Ok(gens) = fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for g in gens.flatten() {
            let gname = g.file_name().to_string_lossy().into_owned();
            // `.recycle`: emptied files waiting to be reused.
            if gname.starts_with('.') || !g.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(g.path())?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") || name.ends_with(".up") {
                    // Unfinished, or already uploaded (a local copy kept for compaction).
                    let _ = fs::remove_file(f.path());
                    continue;
                }
                if let Some(m) = FileMeta::parse_path(&format!("{gname}/{name}")) {
                    found.push((m, f.metadata()?.len()));
                }
            }
        }
        found.sort_by_key(|(m, _)| (m.generation, m.first_txid, m.level, m.last_txid));
        if !found.is_empty() {
            tracing::info!(
                files = found.len(),
                "{}: queueing files left in the spool {} by an earlier run",
                self.inner.describe(),
                self.dir.display()
            );
        }
        let mut q = self.shared.q.lock().expect("spool lock");
        for (m, len) in found {
            q.bytes += len;
            if lane(&m) == Lane::Rest && m.kind == Kind::Segment {
                // Its inputs may have been dropped from the previous run's queue.
                q.dropped.push(m);
            }
            q.push(Job::Upload(m, len));
        }
        self.shared.cv.notify_all();
        Ok(())
    }

    fn spooled(&self) -> Vec<FileMeta> {
        self.shared
            .q
            .lock()
            .expect("spool lock")
            .pending()
            .collect()
    }
}

/// How long a stopping spool keeps uploading what waits (while the store answers).
const DRAIN: Duration = Duration::from_secs(10);

impl Drop for SpoolStorage {
    fn drop(&mut self) {
        {
            let deadline = Instant::now() + DRAIN;
            let mut q = self.shared.q.lock().expect("spool lock");
            while !q.idle() && q.failing.is_none() && Instant::now() < deadline {
                q = self
                    .shared
                    .cv
                    .wait_timeout(q, Duration::from_millis(100))
                    .expect("spool lock")
                    .0;
            }
            if q.bytes > 0 {
                tracing::warn!(
                    "{}: {} bytes stay in the spool {}; they are uploaded at the next start",
                    self.inner.describe(),
                    q.bytes,
                    self.dir.display()
                );
            }
            q.stop = true;
            self.shared.cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Local copies of uploaded files are a cache for this run's compaction only.
        if let Ok(gens) = fs::read_dir(&self.dir) {
            for g in gens.flatten() {
                for f in fs::read_dir(g.path()).into_iter().flatten().flatten() {
                    if f.file_name().to_string_lossy().ends_with(".up") {
                        let _ = fs::remove_file(f.path());
                    }
                }
                let _ = fs::remove_dir(g.path());
            }
        }
        // So are the emptied files kept for reuse: a spool stopped cleanly is empty.
        let _ = fs::remove_dir_all(self.dir.join(crate::storage::RECYCLE));
    }
}

/// The upload threads' metrics.
#[derive(Clone)]
struct UploadMetrics {
    upload: Arc<crate::metrics::Histogram>,
    errors: Arc<crate::metrics::Counter>,
}

fn upload_loop(
    lane: Lane,
    inner: &dyn Storage,
    shared: &Shared,
    local: &FsStorage,
    dir: &Path,
    metrics: UploadMetrics,
) {
    let mut delay = Duration::from_millis(100);
    // Whether a backoff may end when the other lane reaches the store (see below).
    let mut wake_early = true;
    loop {
        let job = {
            let mut q = shared.q.lock().expect("spool lock");
            loop {
                if q.stop {
                    return;
                }
                if let Some(j) = q.next_job(lane) {
                    if let Job::Upload(m, _) = &j {
                        q.busy[lane as usize] = Some(*m);
                    }
                    q.running[lane as usize] = true;
                    break j;
                }
                q = shared.cv.wait(q).expect("spool lock");
            }
        };
        let started = Instant::now();
        let r = match &job {
            Job::Upload(m, _) => {
                let p = dir.join(m.path());
                File::open(&p)
                    .with_context(|| format!("opening {}", p.display()))
                    .and_then(|mut f| inner.put_file(m, &mut f))
            }
            Job::Delete(ms) => inner.delete(ms),
        };
        match (&r, &job) {
            (Ok(()), Job::Upload(..)) => metrics.upload.observe(started.elapsed()),
            (Err(_), _) => metrics.errors.inc(),
            _ => {}
        }
        let mut q = shared.q.lock().expect("spool lock");
        q.busy[lane as usize] = None;
        q.running[lane as usize] = false;
        shared.cv.notify_all();
        match r {
            Ok(()) => {
                if matches!(job, Job::Upload(..)) {
                    q.last_upload_ms = crate::replicate::now_ms();
                }
                if let Some((since, _)) = q.failing.take() {
                    tracing::info!(
                        "{} answers again after {:.0?}; {} bytes still wait in the spool",
                        inner.describe(),
                        since.elapsed(),
                        q.bytes
                    );
                }
                delay = Duration::from_millis(100);
                wake_early = true;
                if let Job::Upload(m, len) = job {
                    q.bytes -= len;
                    q.uploaded(&m);
                    drop(q);
                    let p = dir.join(m.path());
                    if m.kind == Kind::Segment && m.level == 0 {
                        // Compaction reads every level-0 segment once, soon: keep a local copy
                        // (`.up`, uploaded) so that read is no GET; deleting the file removes it.
                        let _ = fs::rename(&p, uploaded(&p));
                    } else {
                        let _ = local.discard(&p);
                        if let Some(d) = p.parent() {
                            let _ = fs::remove_dir(d);
                        }
                    }
                }
            }
            Err(e) => {
                if q.failing.is_none() {
                    tracing::warn!(
                        "{}: {e:#}; retrying with backoff while files wait in the spool {} (capture goes on)",
                        inner.describe(),
                        dir.display()
                    );
                    q.failing = Some((Instant::now(), format!("{e:#}")));
                } else {
                    tracing::debug!("{}: {e:#}", inner.describe());
                }
                // Back at the head of the queue, in order.
                q.jobs[lane as usize].push_front(job);
                let jitter = Duration::from_micros(
                    u64::from(std::process::id()).wrapping_mul(now_micros())
                        % (delay.as_micros() as u64 / 2 + 1),
                );
                let wait = delay + jitter;
                delay = (delay * 2).min(Duration::from_secs(30));
                // The other lane's success (the store answers again) ends the wait too: a lane
                // left sleeping out a backoff of up to 30 s held its files back that long (past
                // a stop's wait for the spool to drain). Not twice in a row: a file that fails
                // alone while the other lane's uploads succeed is retried at most twice per
                // backoff, not at every one of their successes.
                let early = wake_early;
                let (_q, waited) = shared
                    .cv
                    .wait_timeout_while(q, wait, |q| !q.stop && (q.failing.is_some() || !early))
                    .expect("spool lock");
                wake_early = waited.timed_out();
            }
        }
    }
}

/// The name of an uploaded file's local copy.
/// The files `stored` in a store and those `waiting` in its spool, in order, each once.
fn merged(mut all: Vec<FileMeta>, waiting: Vec<FileMeta>) -> Vec<FileMeta> {
    all.extend(waiting);
    all.sort_by_key(|m| {
        (
            m.generation,
            m.first_txid,
            m.last_txid,
            m.level,
            m.kind as u8,
        )
    });
    all.dedup();
    all
}

/// A file from the spool at `p` (waiting, or its copy kept after the upload), else from the
/// store. A small file is read whole at once: once deleted (compaction) it is emptied for reuse,
/// so one found empty or cut short is read from the store instead (where it still is, or is
/// gone too: then the reader lists again) — never half a file.
fn open_local_or_stored(
    p: &Path,
    meta: &FileMeta,
    store: &dyn Storage,
) -> Result<Box<dyn Read + Send>> {
    let Ok(f) = File::open(p).or_else(|_| File::open(uploaded(p))) else {
        return store.open(meta);
    };
    let len = f.metadata()?.len();
    if len > crate::storage::RECYCLE_SIZE {
        return Ok(Box::new(io::BufReader::with_capacity(1 << 20, f)));
    }
    let mut whole = Vec::with_capacity(len as usize);
    (&f).take(len).read_to_end(&mut whole)?;
    if len == 0 || whole.len() as u64 != len {
        return store.open(meta);
    }
    Ok(Box::new(io::Cursor::new(whole)))
}

/// A read-only view of the spool that a capture running beside keeps for a store, and of
/// the store: what the stream server reads history through. It lists the spool's directory
/// (files waiting and the copies of uploaded ones) before the store, so a file uploaded
/// meanwhile is listed either way, and opens the spool's copy when there is one.
pub struct SpoolView {
    inner: Box<dyn Storage>,
    dir: PathBuf,
}

impl SpoolView {
    pub fn new(inner: Box<dyn Storage>, dir: PathBuf) -> SpoolView {
        SpoolView { inner, dir }
    }

    fn path(&self, meta: &FileMeta) -> PathBuf {
        self.dir.join(meta.path())
    }

    /// The files in the spool directory, waiting or kept after their upload.
    fn local(&self) -> Vec<FileMeta> {
        let mut out = Vec::new();
        for g in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let gname = g.file_name().to_string_lossy().into_owned();
            if gname.starts_with('.') || !g.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(g.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let name = name.strip_suffix(".up").unwrap_or(&name);
                if let Some(m) = FileMeta::parse_path(&format!("{gname}/{name}")) {
                    out.push(m);
                }
            }
        }
        out
    }
}

impl Storage for SpoolView {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn check_writable(&self) -> Result<()> {
        bail!("{}: a read-only view", self.describe())
    }

    /// With the store unreachable, what the spool holds alone: the transactions a replica a
    /// little behind needs are there (the reason for the spool), and whoever reads finds out
    /// from the chain whether they are all there.
    fn list(&self) -> Result<Vec<FileMeta>> {
        let waiting = self.local();
        let stored = self.inner.list().unwrap_or_else(|e| {
            tracing::debug!("{e:#}: listing the spool {} alone", self.dir.display());
            Vec::new()
        });
        Ok(merged(stored, waiting))
    }

    fn create(&self, meta: &FileMeta) -> Result<Box<dyn ObjectWriter>> {
        bail!("{}: a read-only view", self.locate(meta))
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn Read + Send>> {
        open_local_or_stored(&self.path(meta), meta, &*self.inner)
    }

    fn delete(&self, metas: &[FileMeta]) -> Result<()> {
        match metas.first() {
            Some(m) => bail!("{}: a read-only view", self.locate(m)),
            None => Ok(()),
        }
    }

    fn locate(&self, meta: &FileMeta) -> String {
        self.inner.locate(meta)
    }

    fn size(&self, meta: &FileMeta) -> Result<u64> {
        let p = self.path(meta);
        fs::metadata(&p)
            .or_else(|_| fs::metadata(uploaded(&p)))
            .map(|m| m.len())
            .or_else(|_| self.inner.size(meta))
    }
}

fn uploaded(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".up");
    PathBuf::from(s)
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

/// A file written to the spool directory (atomically and durably, as in any local
/// directory), queued for upload once committed.
struct SpoolWriter {
    local: Box<dyn ObjectWriter>,
    path: PathBuf,
    meta: FileMeta,
    shared: Arc<Shared>,
}

impl Write for SpoolWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.local.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.local.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.local.flush()
    }
}

impl ObjectWriter for SpoolWriter {
    fn commit(self: Box<Self>) -> io::Result<()> {
        self.local.commit()?;
        let len = fs::metadata(&self.path)?.len();
        let mut q = self.shared.q.lock().expect("spool lock");
        q.bytes += len;
        q.push(Job::Upload(self.meta, len));
        self.shared.cv.notify_all();
        Ok(())
    }
}

impl Storage for SpoolStorage {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn backlog(&self) -> Option<FileMeta> {
        self.shared.q.lock().expect("spool lock").oldest_lacking()
    }

    fn last_sync_ms(&self) -> Option<u64> {
        Some(self.shared.q.lock().expect("spool lock").last_upload_ms)
    }

    fn degraded(&self) -> Option<String> {
        let q = self.shared.q.lock().expect("spool lock");
        let (since, e) = q.failing.as_ref()?;
        Some(format!(
            "degraded: {} failing for {:.0?} ({e}), {} MB waiting in the spool",
            self.inner.describe(),
            since.elapsed(),
            q.bytes >> 20
        ))
    }

    fn check_writable(&self) -> Result<()> {
        self.inner.check_writable()
    }

    fn size(&self, meta: &FileMeta) -> Result<u64> {
        self.local.size(meta).or_else(|_| self.inner.size(meta))
    }

    fn list(&self) -> Result<Vec<FileMeta>> {
        // What waits first, then the store: a file whose upload completes between the two is
        // in one of them either way. (The other order missed it: the stream server, reading
        // history for a replica a little behind, then found a gap and had the replica rebuilt.)
        let waiting = self.spooled();
        Ok(merged(self.inner.list()?, waiting))
    }

    fn create(&self, meta: &FileMeta) -> Result<Box<dyn ObjectWriter>> {
        {
            let mut q = self.shared.q.lock().expect("spool lock");
            // A store that answers but is slower than capture gets a moment to make room.
            let deadline = Instant::now() + ROOM_WAIT;
            while q.bytes >= self.limit && q.failing.is_none() && Instant::now() < deadline {
                q = self
                    .shared
                    .cv
                    .wait_timeout(q, Duration::from_millis(50))
                    .expect("spool lock")
                    .0;
            }
            if q.bytes >= self.limit {
                let why = q
                    .failing
                    .as_ref()
                    .map(|(since, e)| {
                        format!(": it has been failing for {:.0?} ({e})", since.elapsed())
                    })
                    .unwrap_or_default();
                bail!(
                    "{}: {} MB wait for upload in the spool {}, at its limit of {} MB{why}",
                    self.inner.describe(),
                    q.bytes >> 20,
                    self.dir.display(),
                    self.limit >> 20
                );
            }
        }
        Ok(Box::new(SpoolWriter {
            local: self.local.create(meta)?,
            path: self.path(meta),
            meta: *meta,
            shared: self.shared.clone(),
        }))
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn Read + Send>> {
        open_local_or_stored(&self.path(meta), meta, &*self.inner)
    }

    fn delete(&self, metas: &[FileMeta]) -> Result<()> {
        // Files still waiting are simply dropped; the rest are deleted remotely, in order
        // behind the uploads (the one being uploaded included). The local files go once the
        // lock is released (capture takes it to spool its next file).
        let mut waiting = Vec::new();
        let mut remote = Vec::new();
        {
            let mut q = self.shared.q.lock().expect("spool lock");
            for m in metas {
                let jobs = &mut q.jobs[lane(m) as usize];
                let pos = jobs
                    .iter()
                    .position(|j| matches!(j, Job::Upload(x, _) if x == m));
                match pos {
                    Some(i) => {
                        if let Some(Job::Upload(_, len)) = jobs.remove(i) {
                            q.bytes -= len;
                        }
                        // A segment's transactions are lacking until the file replacing it
                        // (queued before this call) is uploaded; one no pending file covers
                        // (deleted by retention, or its replacement already stored) lacks
                        // nothing. (A merged file's inputs are in the store, or dropped too.)
                        if lane(m) == Lane::Fresh && q.pending().any(|p| covers(&p, m)) {
                            q.dropped.push(*m);
                        }
                        waiting.push(self.path(m));
                    }
                    None => remote.push(*m),
                }
            }
            // What no pending file covers any more was deleted without a replacement
            // (retention took a whole generation): nothing is coming for it.
            let dropped = std::mem::take(&mut q.dropped);
            q.dropped = dropped
                .into_iter()
                .filter(|d| q.pending().any(|p| covers(&p, d)))
                .collect();
            if !waiting.is_empty() {
                // A file dropped here was to cover what deletes queued earlier take out of the
                // store (the inputs of the merge that made it, deleted once it was queued):
                // they now wait for the file that replaces it, queued before this call, so the
                // store never lacks a transaction it held.
                let rest = &mut q.jobs[Lane::Rest as usize];
                let (deletes, uploads): (VecDeque<Job>, VecDeque<Job>) =
                    rest.drain(..).partition(|j| matches!(j, Job::Delete(_)));
                *rest = uploads;
                rest.extend(deletes);
            }
            if !remote.is_empty() {
                q.push(Job::Delete(remote.clone()));
                self.shared.cv.notify_all();
            }
        }
        for p in waiting {
            let _ = self.local.discard(&p);
        }
        // An emptied directory goes too: one look per directory, not per file (compaction
        // deletes hundreds of a generation's files at once).
        let mut dirs = std::collections::BTreeSet::new();
        for m in &remote {
            let p = self.path(m);
            if self.local.discard(&uploaded(&p)).is_ok() {
                if let Some(d) = p.parent() {
                    dirs.insert(d.to_path_buf());
                }
            }
        }
        for d in dirs {
            let _ = fs::remove_dir(d);
        }
        Ok(())
    }

    fn locate(&self, meta: &FileMeta) -> String {
        self.inner.locate(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FsStorage;
    use crate::wait_until;
    use replited_core::format::Kind;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A local directory as the remote store, with two hooks to line up a race: an upload
    /// (`create`) waits until a listing has been read, and the listing is returned only after
    /// that upload had time to complete.
    struct Racing {
        fs: FsStorage,
        listed: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Storage for Racing {
        fn describe(&self) -> String {
            self.fs.describe()
        }
        fn check_writable(&self) -> Result<()> {
            self.fs.check_writable()
        }
        fn list(&self) -> Result<Vec<FileMeta>> {
            let l = self.fs.list();
            *self.listed.0.lock().unwrap() = true;
            self.listed.1.notify_all();
            std::thread::sleep(Duration::from_millis(300));
            l
        }
        fn create(&self, meta: &FileMeta) -> Result<Box<dyn crate::storage::ObjectWriter>> {
            let mut g = self.listed.0.lock().unwrap();
            while !*g {
                g = self.listed.1.wait(g).unwrap();
            }
            self.fs.create(meta)
        }
        fn open(&self, meta: &FileMeta) -> Result<Box<dyn Read + Send>> {
            self.fs.open(meta)
        }
        fn delete(&self, metas: &[FileMeta]) -> Result<()> {
            self.fs.delete(metas)
        }
        fn locate(&self, meta: &FileMeta) -> String {
            self.fs.locate(meta)
        }
        fn size(&self, meta: &FileMeta) -> Result<u64> {
            self.fs.size(meta)
        }
    }

    /// A spool in `dir/spool` (1 MiB at most) in front of `store`.
    fn spool_over(store: Box<dyn Storage>, dir: &Path) -> SpoolStorage {
        SpoolStorage::new(store, dir.join("spool"), 1 << 20, ("d", "s")).unwrap()
    }

    /// A spool in front of a local directory, `dir/store`.
    fn spool_in(dir: &Path) -> SpoolStorage {
        spool_over(Box::new(FsStorage::at(dir.join("store"))), dir)
    }

    /// A local directory as the remote store whose uploads of the files in `held` wait until
    /// they leave it, and which records every delete that would leave the store without a file
    /// covering what it deleted.
    struct Gated {
        fs: FsStorage,
        gate: Gate,
    }

    /// What a test sees of a [`Gated`] store.
    #[derive(Clone)]
    struct Gate {
        held: Arc<(Mutex<Vec<FileMeta>>, Condvar)>,
        uncovered: Arc<Mutex<Vec<FileMeta>>>,
        /// Every upload, in the order they started.
        uploads: Arc<Mutex<Vec<FileMeta>>>,
        /// While set, every upload fails.
        down: Arc<AtomicBool>,
    }

    impl Storage for Gated {
        fn describe(&self) -> String {
            self.fs.describe()
        }
        fn check_writable(&self) -> Result<()> {
            self.fs.check_writable()
        }
        fn list(&self) -> Result<Vec<FileMeta>> {
            self.fs.list()
        }
        fn create(&self, meta: &FileMeta) -> Result<Box<dyn crate::storage::ObjectWriter>> {
            if self.gate.down.load(Ordering::SeqCst) {
                bail!("the store is down");
            }
            self.gate.uploads.lock().unwrap().push(*meta);
            {
                // Bounded, so a test that failed before opening the gate still ends.
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut g = self.gate.held.0.lock().unwrap();
                while g.contains(meta) && Instant::now() < deadline {
                    g = self
                        .gate
                        .held
                        .1
                        .wait_timeout(g, Duration::from_millis(100))
                        .unwrap()
                        .0;
                }
            }
            self.fs.create(meta)
        }
        fn open(&self, meta: &FileMeta) -> Result<Box<dyn Read + Send>> {
            self.fs.open(meta)
        }
        fn delete(&self, metas: &[FileMeta]) -> Result<()> {
            let stored = self.fs.list()?;
            for m in metas {
                let covered = stored.iter().any(|f| {
                    !metas.contains(f)
                        && f.level > m.level
                        && f.first_txid <= m.first_txid
                        && f.last_txid >= m.last_txid
                });
                if !covered {
                    self.gate.uncovered.lock().unwrap().push(*m);
                }
            }
            self.fs.delete(metas)
        }
        fn locate(&self, meta: &FileMeta) -> String {
            self.fs.locate(meta)
        }
        fn size(&self, meta: &FileMeta) -> Result<u64> {
            self.fs.size(meta)
        }
    }

    /// Once the store answers again on one upload thread, the other one resumes at once
    /// instead of sleeping out its backoff: after a 10 s outage that wait has at least 2.7 s
    /// left (waits of 0.1, 0.2, ... 6.4 s, each up to half again longer), which held the
    /// merged files back past a stop's 10 s wait for the spool to drain.
    #[test]
    fn an_upload_thread_backing_off_resumes_when_the_store_answers_again() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, store) = gated(dir.path(), &[]);
        store.down.store(true, Ordering::SeqCst);
        let merged = file(1, 1, 5);
        spool.put(&merged, b"merged").unwrap();
        std::thread::sleep(Duration::from_secs(10));
        store.down.store(false, Ordering::SeqCst);
        let fresh = file(0, 6, 6);
        spool.put(&fresh, b"six").unwrap();
        wait_uploaded(&spool, &fresh);
        let back = Instant::now();
        while !spool.spooled().is_empty() {
            assert!(
                back.elapsed() < Duration::from_millis(1500),
                "the merged file still waits {:?} after the store answered again",
                back.elapsed()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut stored = FsStorage::at(dir.path().join("store")).list().unwrap();
        stored.sort_by_key(|m| m.first_txid);
        assert_eq!(stored, vec![merged, fresh]);
    }

    /// Waits (up to 10 s) until `meta` is uploaded and its spooled copy kept.
    fn wait_uploaded(spool: &SpoolStorage, meta: &FileMeta) {
        wait_until("not uploaded", || uploaded(&spool.path(meta)).exists());
    }

    /// A file whose upload completes while the store is being listed is in the listing (the
    /// stream server reads history through it; a missing file had replicas rebuilt).
    #[test]
    fn a_file_uploaded_during_a_listing_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Racing {
            fs: FsStorage::at(dir.path().join("store")),
            listed: Arc::new((Mutex::new(false), Condvar::new())),
        };
        let spool = spool_over(Box::new(store), dir.path());
        let meta = FileMeta {
            kind: Kind::Segment,
            generation: 1,
            level: 0,
            first_txid: 2,
            last_txid: 2,
            first_time_ms: 1,
            last_time_ms: 1,
        };
        spool.put(&meta, b"segment").unwrap();
        // The upload has started and waits for the listing.
        wait_until("the upload never started", || {
            !spool.spooled().is_empty()
                && spool
                    .shared
                    .q
                    .lock()
                    .unwrap()
                    .busy
                    .iter()
                    .any(Option::is_some)
        });
        assert_eq!(spool.list().unwrap(), vec![meta]);
        // And the upload did complete meanwhile.
        assert!(spool.shared.q.lock().unwrap().idle());
    }

    /// What the spool deletes is recycled as a local target's files are: an uploaded
    /// segment's copy, once compaction deletes it, lends its inode to a file spooled later (a
    /// fresh inode per commit was the largest cost of capture at `0s` on ext4 without a
    /// journal).
    #[test]
    fn deleted_spool_files_are_recycled() {
        use crate::storage::tests::{recycled, seg};
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_in(dir.path());
        let inode = |m: &FileMeta| {
            let p = spool.path(m);
            fs::metadata(&p)
                .or_else(|_| fs::metadata(uploaded(&p)))
                .unwrap()
                .ino()
        };
        spool.put(&seg(1), b"one").unwrap();
        wait_uploaded(&spool, &seg(1));
        let ino = inode(&seg(1));
        spool.delete(&[seg(1)]).unwrap();
        assert!(!uploaded(&spool.path(&seg(1))).exists());
        let waiting: Vec<u64> = recycled(&dir.path().join("spool"))
            .into_iter()
            .map(|(ino, _)| ino)
            .collect();
        assert_eq!(waiting, vec![ino], "emptied into the spool's .recycle");
        std::thread::sleep(crate::storage::REUSE_AFTER + Duration::from_millis(100));
        spool.put(&seg(2), b"two").unwrap();
        assert_eq!(inode(&seg(2)), ino, "the deleted copy's inode is reused");
        // A clean stop leaves the spool empty; emptied files left by a crash are not taken
        // for spooled ones at the next start.
        drop(spool);
        let recycle = dir.path().join("spool/.recycle");
        assert!(!recycle.exists());
        fs::create_dir_all(&recycle).unwrap();
        fs::write(recycle.join("7"), b"").unwrap();
        assert!(spool_in(dir.path()).spooled().is_empty());
    }

    /// A spooled copy emptied under a reader (compaction deleted it, the spool recycles it) is
    /// read from the store, whole, not as an empty or short file.
    #[test]
    fn a_copy_emptied_for_reuse_is_read_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_in(dir.path());
        let meta = crate::storage::tests::seg(2);
        spool.put(&meta, b"segment").unwrap();
        wait_uploaded(&spool, &meta);
        let up = uploaded(&spool.path(&meta));
        let read = |s: &dyn Storage| {
            let mut v = Vec::new();
            s.open(&meta).unwrap().read_to_end(&mut v).unwrap();
            v
        };
        assert_eq!(read(&spool), b"segment");
        // Emptied as `discard` empties it, before it is renamed away.
        File::options()
            .write(true)
            .open(&up)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert_eq!(read(&spool), b"segment");
        let view = SpoolView::new(
            Box::new(FsStorage::at(dir.path().join("store"))),
            dir.path().join("spool"),
        );
        assert_eq!(read(&view), b"segment");
    }

    /// A segment of generation 1 at `level` with transactions `first..=last`.
    fn file(level: u32, first: u64, last: u64) -> FileMeta {
        FileMeta {
            kind: Kind::Segment,
            generation: 1,
            level,
            first_txid: first,
            last_txid: last,
            first_time_ms: first,
            last_time_ms: last,
        }
    }

    /// A spool over a [`Gated`] store holding the uploads of `held`, and the store's gate.
    fn gated(dir: &Path, held: &[FileMeta]) -> (SpoolStorage, Gate) {
        let gate = Gate {
            held: Arc::new((Mutex::new(held.to_vec()), Condvar::new())),
            uncovered: Arc::new(Mutex::new(Vec::new())),
            uploads: Arc::new(Mutex::new(Vec::new())),
            down: Arc::new(AtomicBool::new(false)),
        };
        let store = Gated {
            fs: FsStorage::at(dir.join("store")),
            gate: gate.clone(),
        };
        (spool_over(Box::new(store), dir), gate)
    }

    /// Spools `held` and waits until its upload has started (and waits for the gate).
    fn hold(spool: &SpoolStorage, held: &FileMeta) {
        spool.put(held, b"held").unwrap();
        wait_until("the held upload never started", || {
            spool.shared.q.lock().unwrap().busy.contains(&Some(*held))
        });
    }

    /// Lets `m`'s upload go.
    fn let_go(store: &Gate, m: &FileMeta) {
        store.held.0.lock().unwrap().retain(|h| h != m);
        store.held.1.notify_all();
    }

    /// Lets the held uploads go and waits until every job is done.
    fn release(spool: &SpoolStorage, store: &Gate) {
        store.held.0.lock().unwrap().clear();
        store.held.1.notify_all();
        wait_until("uploads never ended", || {
            spool.shared.q.lock().unwrap().idle()
        });
    }

    /// Compaction merges files the uploader has not reached yet: a merged file still waiting
    /// in the spool is dropped when a later merge takes it in, and the deletes of its own
    /// inputs, queued behind it, wait for the file that replaces it — the store is never left
    /// without transactions it held (they were deleted before the replacement was uploaded).
    #[test]
    fn deletes_wait_for_the_file_replacing_a_dropped_merge() {
        let (a0, a1) = (file(0, 1, 1), file(0, 2, 2));
        let (l1, l2) = (file(1, 1, 2), file(2, 1, 2));
        // A merge of other segments whose upload is held: what follows waits behind it.
        let held = file(1, 3, 9);
        let dir = tempfile::tempdir().unwrap();
        let (spool, store) = gated(dir.path(), &[held]);
        spool.put(&a0, b"a0").unwrap();
        spool.put(&a1, b"a1").unwrap();
        wait_uploaded(&spool, &a1);
        hold(&spool, &held);
        // Level 0 merged (its inputs uploaded: deleted from the store behind l1), then level 1
        // merged while l1 still waits.
        spool.put(&l1, b"a0a1").unwrap();
        spool.delete(&[a0, a1]).unwrap();
        spool.put(&l2, b"a0a1").unwrap();
        spool.delete(&[l1]).unwrap();
        release(&spool, &store);
        assert_eq!(
            *store.uncovered.lock().unwrap(),
            Vec::<FileMeta>::new(),
            "deleted from the store while nothing stored covered them"
        );
        let mut stored = FsStorage::at(dir.path().join("store")).list().unwrap();
        stored.sort_by_key(|m| (m.first_txid, m.level));
        assert_eq!(stored, vec![l2, held]);
    }

    /// A delete of a segment whose upload is in progress waits for it to end (deleted first,
    /// the upload would leave the object in the store for good).
    #[test]
    fn a_delete_waits_for_the_upload_of_what_it_deletes() {
        let (seg, merged) = (file(0, 1, 1), file(1, 1, 1));
        let dir = tempfile::tempdir().unwrap();
        let (spool, store) = gated(dir.path(), &[seg]);
        hold(&spool, &seg);
        spool.put(&merged, b"merged").unwrap();
        wait_until("not uploaded", || {
            store.uploads.lock().unwrap().contains(&merged) && spool.spooled().eq(&[seg])
        });
        spool.delete(&[seg]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        release(&spool, &store);
        let stored = FsStorage::at(dir.path().join("store")).list().unwrap();
        assert_eq!(stored, vec![merged]);
    }

    /// A commit's segment is not uploaded behind a merged file or a snapshot (they take
    /// seconds to upload under a busy load; the commit's durability in the store would wait for
    /// them), nor do they wait for it.
    #[test]
    fn fresh_segments_do_not_wait_for_merged_files_and_snapshots() {
        let merged = file(1, 1, 5);
        let snapshot = FileMeta {
            kind: Kind::Snapshot,
            ..file(0, 5, 5)
        };
        let fresh = [file(0, 6, 6), file(0, 7, 7)];
        let dir = tempfile::tempdir().unwrap();
        let (spool, store) = gated(dir.path(), &[merged]);
        hold(&spool, &merged);
        spool.put(&snapshot, b"snapshot").unwrap();
        spool.put(&fresh[0], b"six").unwrap();
        spool.put(&fresh[1], b"seven").unwrap();
        wait_uploaded(&spool, &fresh[1]);
        assert_eq!(
            *store.uploads.lock().unwrap(),
            vec![merged, fresh[0], fresh[1]],
            "uploads started while the merged file's was in progress"
        );
        release(&spool, &store);
        let mut stored = FsStorage::at(dir.path().join("store")).list().unwrap();
        stored.sort_by_key(|m| (m.first_txid, m.level));
        assert_eq!(stored.len(), 4);
    }

    /// The oldest file whose transactions the store lacks, which a target's lag is measured
    /// from: not a merged file whose inputs are stored (its upload takes seconds under a busy
    /// load: the lag alert fired while nothing was missing), not a snapshot repeating what
    /// stored segments hold; but a segment dropped from the queue, until the merged file
    /// replacing it is stored, and a generation's first snapshot.
    #[test]
    fn the_backlog_is_what_the_store_lacks() {
        let (a0, a1, l1) = (file(0, 1, 1), file(0, 2, 2), file(1, 1, 2));
        let (h, b, m) = (file(0, 3, 3), file(0, 4, 4), file(1, 3, 4));
        let again = FileMeta {
            kind: Kind::Snapshot,
            ..file(0, 2, 2)
        };
        let first = FileMeta {
            kind: Kind::Snapshot,
            generation: 2,
            ..file(0, 9, 9)
        };
        let dir = tempfile::tempdir().unwrap();
        let (spool, store) = gated(dir.path(), &[l1, h]);
        spool.put(&a0, b"a0").unwrap();
        spool.put(&a1, b"a1").unwrap();
        wait_uploaded(&spool, &a1);
        assert_eq!(spool.backlog(), None);
        // Stored segments merged; the merged file's upload is held (what follows in its lane
        // waits behind it).
        hold(&spool, &l1);
        spool.delete(&[a0, a1]).unwrap();
        assert_eq!(spool.backlog(), None);
        spool.put(&again, b"snapshot").unwrap();
        assert_eq!(spool.backlog(), None);
        spool.put(&first, b"snapshot").unwrap();
        assert_eq!(spool.backlog(), Some(first));
        // h's upload is held and b waits behind it; both are merged into m, then h uploads:
        // b's transactions are only in m, which waits.
        hold(&spool, &h);
        spool.put(&b, b"b").unwrap();
        assert_eq!(spool.backlog(), Some(h));
        spool.put(&m, b"m").unwrap();
        spool.delete(&[h, b]).unwrap();
        let_go(&store, &h);
        wait_uploaded(&spool, &h);
        assert_eq!(spool.backlog(), Some(b));
        release(&spool, &store);
        assert_eq!(spool.backlog(), None);
        assert_eq!(*store.uncovered.lock().unwrap(), Vec::<FileMeta>::new());
    }

    /// A segment dropped for a merged file that is itself deleted before its upload (retention
    /// took the generation while the store was down) lacks nothing any more: the lag does not
    /// stay up for good.
    #[test]
    fn a_dropped_segment_whose_replacement_is_deleted_lacks_nothing() {
        let (h, b, m) = (file(0, 1, 1), file(0, 2, 2), file(1, 1, 2));
        // Another merge, held, so that m waits behind it.
        let x = file(1, 10, 12);
        let dir = tempfile::tempdir().unwrap();
        let (spool, store) = gated(dir.path(), &[h, x]);
        hold(&spool, &h);
        hold(&spool, &x);
        spool.put(&b, b"b").unwrap();
        spool.put(&m, b"m").unwrap();
        spool.delete(&[b]).unwrap();
        let_go(&store, &h);
        wait_uploaded(&spool, &h);
        assert_eq!(spool.backlog(), Some(b));
        spool.delete(&[h, m]).unwrap();
        assert_eq!(spool.backlog(), None);
        release(&spool, &store);
        assert_eq!(spool.backlog(), None);
    }
}
