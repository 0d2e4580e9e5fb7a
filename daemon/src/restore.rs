//! `restore`: rebuilds a database from a snapshot and the segments after it, into a temporary
//! file that is verified (the whole-database checksum after every transaction, then SQLite's
//! integrity check) before it is renamed into place.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use replited_core::format::{Decoder, Event, TxnHeader};
use replited_core::hash::{page_hash, DbHashes};
use replited_core::name::FileMeta;
use replited_core::plan::{plan_restore, PlanError, RestorePlan, Target};

use crate::reader::{decode_opened_into, open_ahead, Reading};
use crate::sqlite;
use crate::storage::{parent_dir, sync_dir, Storage};

/// What to restore and where.
pub struct RestoreOptions {
    /// Latest, a txid or a time.
    pub target: Target,
    /// The file to create.
    pub output: PathBuf,
    /// Replace an existing output file.
    pub force: bool,
    /// Succeed without doing anything when the output already exists.
    pub if_db_not_exists: bool,
    /// Succeed without doing anything when there is no backup.
    pub if_replica_exists: bool,
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The position reached.
    pub generation: u64,
    /// The last transaction applied.
    pub txid: u64,
    /// Its commit time.
    pub time_ms: u64,
    /// Size of the database.
    pub bytes: u64,
    /// Its size in pages.
    pub db_pages: u32,
    /// Its page size.
    pub page_size: u32,
    /// Its whole-database checksum.
    pub db_checksum: u64,
}

/// Restores from the best of `sources` (the one whose plan reaches furthest).
///
/// A replited running meanwhile may delete files between the listing and the reading
/// (compaction replaces small segments by a merged one, retention removes old files): when a
/// planned file is gone, the sources are listed and the restore planned again.
pub fn restore(sources: &[&dyn Storage], opts: &RestoreOptions) -> Result<Option<Restored>> {
    let mut attempt = 1;
    loop {
        match restore_once(sources, opts) {
            Err(e) if attempt < 5 && vanished(&e) => {
                tracing::info!("{e:#}; listing again (a running replited replaced it)");
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// A file that was listed is no longer there.
pub fn vanished(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
            || c.to_string().contains("HTTP 404")
    })
}

fn restore_once(sources: &[&dyn Storage], opts: &RestoreOptions) -> Result<Option<Restored>> {
    if opts.output.exists() {
        if opts.if_db_not_exists {
            tracing::info!(
                "{} already exists; nothing restored (--if-db-not-exists)",
                opts.output.display()
            );
            return Ok(None);
        }
        if !opts.force {
            bail!(
                "{} already exists; pass --force to replace it, or -o to restore elsewhere",
                opts.output.display()
            );
        }
    }
    let mut best: Option<(usize, Vec<FileMeta>, RestorePlan)> = None;
    let mut first_err = None;
    for (i, s) in sources.iter().enumerate() {
        let files = s.list().with_context(|| s.describe())?;
        match plan_restore(&files, opts.target) {
            Ok(p) => {
                if best
                    .as_ref()
                    .is_none_or(|(_, _, b)| p.last_txid > b.last_txid)
                {
                    best = Some((i, files, p));
                }
            }
            Err(e) => {
                first_err.get_or_insert((i, e));
            }
        }
    }
    let Some((i, files, plan)) = best else {
        let (i, e) = first_err.expect("at least one source");
        let at = sources[i].describe();
        return match e {
            PlanError::NoSnapshot if opts.if_replica_exists => {
                tracing::info!("no backup in {at}; nothing restored (--if-replica-exists)");
                Ok(None)
            }
            PlanError::NoSnapshot => bail!("NoSnapshotError: no snapshot found in {at}"),
            PlanError::TimeBeforeFirstSnapshot { time_ms, first_ms } => bail!(
                "no backup in {at} reaches back to {}: the oldest snapshot is from {}",
                fmt_ms(time_ms),
                fmt_ms(first_ms)
            ),
            PlanError::TxidNotFound { txid, latest } => bail!(
                "txid {txid} ({txid:016x}) is not in {at}: the latest restorable txid is {latest} ({latest:016x})"
            ),
            e => bail!("{at}: {e}"),
        };
    };
    let src = sources[i];
    tracing::info!(
        "restoring from {}: generation {:016x}, snapshot {:016x}, {} segment file(s), up to txid {:016x}",
        src.describe(),
        plan.generation,
        files[plan.snapshot].last_txid,
        plan.segments.len(),
        plan.last_txid
    );
    let started = Instant::now();
    let tmp = temp_path(&opts.output);
    let r = build(src, &files, &plan, &tmp).and_then(|(done, file)| {
        let built = started.elapsed();
        // The file goes to the disk while SQLite checks it (the check reads the page cache,
        // the fsync is the disk's work): both finish before anything is replaced.
        let syncing = std::thread::Builder::new()
            .name("restore-fsync".into())
            .spawn(move || file.sync_all())?;
        let checked =
            sqlite::integrity_check(&tmp).with_context(|| format!("checking {}", tmp.display()));
        let checked_in = started.elapsed() - built;
        syncing
            .join()
            .map_err(|_| anyhow!("the restore's fsync thread panicked"))?
            .with_context(|| format!("writing {} to the disk (fsync)", tmp.display()))?;
        checked?;
        tracing::info!(
            "rebuilt and checksummed in {:.3}s; integrity check in {:.3}s beside the fsync, both done in {:.3}s",
            built.as_secs_f64(),
            checked_in.as_secs_f64(),
            (started.elapsed() - built).as_secs_f64()
        );
        Ok(done)
    });
    let done = match r {
        Ok(d) => d,
        Err(e) => {
            remove_db_files(&tmp);
            return Err(e.context("restore failed; nothing was written"));
        }
    };
    if let Some(t) = opts.target_txid() {
        if done.txid != t {
            remove_db_files(&tmp);
            bail!(
                "restore reached txid {:016x}, not the requested {t:016x}",
                done.txid
            );
        }
    }
    install(&tmp, &opts.output)?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "restored {} ({} bytes) to txid {:016x} in {:.3}s ({:.1} MB/s; peak resident size {} kB)",
        opts.output.display(),
        done.bytes,
        done.txid,
        secs,
        done.bytes as f64 / 1e6 / secs.max(1e-9),
        crate::memory::peak_kb().map_or("unknown".into(), |k| k.to_string())
    );
    Ok(Some(done))
}

/// Puts a verified database file in place of `output`: a `-wal` or `-shm` left by an older
/// database at the output path would be replayed onto the new one, so they go first; then the
/// rename and the directory fsync.
pub fn install(tmp: &Path, output: &Path) -> Result<()> {
    for suffix in ["-wal", "-shm"] {
        let mut p = output.to_path_buf().into_os_string();
        p.push(suffix);
        let _ = fs::remove_file(PathBuf::from(p));
    }
    fs::rename(tmp, output)
        .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))?;
    sync_dir(parent_dir(output))?;
    Ok(())
}

impl RestoreOptions {
    fn target_txid(&self) -> Option<u64> {
        match self.target {
            Target::Txid(t) => Some(t),
            _ => None,
        }
    }
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// A temporary file name beside `out`, unique to this process.
pub fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    parent_dir(out).join(format!(".{name}.replited-restore-{}", std::process::id()))
}

/// Removes a database file and its -wal, -shm and -journal.
pub fn remove_db_files(p: &Path) {
    let _ = fs::remove_file(p);
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut q = p.to_path_buf().into_os_string();
        q.push(suffix);
        let _ = fs::remove_file(PathBuf::from(q));
    }
}

/// Applies the plan into `tmp`, checking the whole-database checksum after every transaction.
/// Rebuilds the database of `plan` into `tmp`, every page and the whole database checksummed;
/// returns what it restored and the file, written but not yet synced.
fn build(
    src: &dyn Storage,
    files: &[FileMeta],
    plan: &RestorePlan,
    tmp: &Path,
) -> Result<(Restored, File)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // Decoding (reading, lz4, hashing) runs here; writing the pages on a thread of its own, so
    // the two overlap. Runs of pages go over in order, with the file's length changes.
    let (to_writer, ops) = mpsc::sync_channel::<WriteOp>(WRITE_QUEUE);
    let (give_back, spare) = mpsc::channel::<Vec<u8>>();
    let writer = {
        let file = file.try_clone()?;
        std::thread::Builder::new()
            .name("restore-write".into())
            .spawn(move || -> std::io::Result<()> {
                // The span written since the last writeback hint.
                let mut span: Option<(u64, u64)> = None;
                for op in ops {
                    match op {
                        WriteOp::Pages(buf, len, at) => {
                            file.write_all_at(&buf[..len], at)?;
                            let end = at + len as u64;
                            let (lo, hi) = span.map_or((at, end), |(l, h)| (l.min(at), h.max(end)));
                            span = Some((lo, hi));
                            if hi - lo >= FLUSH_AFTER {
                                start_writeback(&file, lo, hi - lo);
                                span = None;
                            }
                            let _ = give_back.send(buf);
                        }
                        WriteOp::SetLen(len) => file.set_len(len)?,
                    }
                }
                Ok(())
            })?
    };
    let mut st = Apply {
        writer: to_writer,
        spare,
        hashes: None,
        cur: None,
        applying: false,
        last: None,
        run: vec![0; RUN_CAP],
        run_len: 0,
        run_at: 0,
        placed: false,
    };
    let applied = apply_plan(&mut st, src, files, plan);
    // The writer ends when its queue is dropped; a failed write is what stopped the decoding.
    let Apply { writer: queue, .. } = st;
    drop(queue);
    let written = writer
        .join()
        .map_err(|_| anyhow!("the restore's writer thread panicked"))?;
    let last = match (applied, written) {
        (_, Err(e)) => return Err(e).with_context(|| format!("writing {}", tmp.display())),
        (Err(e), Ok(())) => return Err(e),
        (Ok(last), Ok(())) => last,
    };
    let done = Restored {
        generation: plan.generation,
        txid: last.0.txid,
        time_ms: last.0.time_ms,
        bytes: file.metadata()?.len(),
        db_pages: last.0.db_pages,
        page_size: last.1,
        db_checksum: last.0.db_checksum,
    };
    Ok((done, file))
}

/// Applies the snapshot and segments of `plan`; returns the last transaction applied and the
/// page size.
fn apply_plan(
    st: &mut Apply,
    src: &dyn Storage,
    files: &[FileMeta],
    plan: &RestorePlan,
) -> Result<(TxnHeader, u32)> {
    let snap = &files[plan.snapshot];
    let order: Vec<FileMeta> = std::iter::once(*snap)
        .chain(plan.segments.iter().map(|&i| files[i]))
        .collect();
    open_ahead(src, &order, |ahead| {
        for (k, m) in order.iter().enumerate() {
            // The snapshot whole; the segments up to the plan's txid and time.
            let (what, mut apply) = match k {
                0 => ("applying the snapshot", ApplyFile(st, u64::MAX, None)),
                _ => (
                    "applying a segment",
                    ApplyFile(st, plan.last_txid, plan.stop_time_ms),
                ),
            };
            ahead
                .take()
                .and_then(|f| decode_opened_into(src, m, f, &mut apply))
                .context(what)?;
            st.end_txn()
                .map_err(|e| anyhow!("{}: {e}", src.locate(m)))?;
        }
        Ok(())
    })?;
    st.write_run()?;
    let last = st
        .last
        .ok_or_else(|| anyhow!("the snapshot held no transaction"))?;
    Ok((last, st.hashes.as_ref().map_or(0, |h| h.page_size())))
}

/// One file of the plan applied up to a txid and a time: pages of the transactions applied are
/// decoded straight into the run to write.
struct ApplyFile<'a>(&'a mut Apply, u64, Option<u64>);

impl Reading for ApplyFile<'_> {
    fn place(&mut self, pgno: u32) -> Result<Option<&mut [u8]>> {
        if !self.0.applying {
            return Ok(None);
        }
        self.0.placed = true;
        self.0.room(pgno).map(Some)
    }

    fn event(&mut self, ev: &Event, dec: &Decoder) -> Result<bool> {
        self.0.event(ev, dec, self.1, self.2)
    }
}

/// What the restore's writer thread does, in order.
enum WriteOp {
    /// Consecutive pages at this byte offset.
    Pages(Vec<u8>, usize, u64),
    /// The database's new length.
    SetLen(u64),
}

/// Bytes of the file written between two hints to the kernel to start writing them out.
const FLUSH_AFTER: u64 = 32 << 20;

/// Starts writing `len` bytes of the file from `at` out to the disk without waiting for them
/// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`, as PostgreSQL's `checkpoint_flush_after`
/// does): the disk works while the restore goes on instead of all at the end. A hint: the
/// final fsync stays the only durability point and reports any error.
fn start_writeback(file: &File, at: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a system call on a descriptor borrowed for its duration; no memory is passed.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            at as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r != 0 {
        tracing::debug!(
            "sync_file_range: {} (the final fsync decides)",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs of pages queued for the writer at most (each up to `RUN_BYTES`).
const WRITE_QUEUE: usize = 4;

struct Apply {
    writer: mpsc::SyncSender<WriteOp>,
    /// Buffers the writer is done with, to reuse.
    spare: mpsc::Receiver<Vec<u8>>,
    hashes: Option<DbHashes>,
    /// The transaction being applied.
    cur: Option<TxnHeader>,
    /// Whether the pages that follow are applied (false for txids already applied or past the
    /// target: they are still decoded, so the whole file is checked).
    applying: bool,
    last: Option<TxnHeader>,
    /// Pages waiting to be written: a run of consecutive pages, `run[..run_len]`, starting at
    /// `run_at` (bytes). The buffer is `RUN_CAP` long: pages are decoded straight into it.
    run: Vec<u8>,
    run_len: usize,
    run_at: u64,
    /// The page of the current `Event::Page` was decoded into the run (by `place`).
    placed: bool,
}

/// Bytes of consecutive pages gathered into one write.
const RUN_BYTES: usize = 1 << 20;
/// A run's buffer: room for one more page of the largest size past `RUN_BYTES`.
const RUN_CAP: usize = RUN_BYTES + 65536;

impl Apply {
    /// Hands the gathered run of pages to the writer.
    fn write_run(&mut self) -> Result<()> {
        if self.run_len > 0 {
            // Buffers keep their whole length (zeroed once, when first allocated): a run is
            // `run[..run_len]`, however short (a restore of many small transactions writes
            // one per transaction).
            let next = self.spare.try_recv().unwrap_or_else(|_| vec![0; RUN_CAP]);
            let run = std::mem::replace(&mut self.run, next);
            let len = std::mem::take(&mut self.run_len);
            self.send(WriteOp::Pages(run, len, self.run_at))?;
        }
        Ok(())
    }

    /// Room in the run for page `pgno` (the run is written first when the page does not
    /// follow it or it is full).
    fn room(&mut self, pgno: u32) -> Result<&mut [u8]> {
        let ps = self.hashes.as_ref().expect("header first").page_size() as usize;
        let at = (pgno as u64 - 1) * ps as u64;
        if self.run_at + self.run_len as u64 != at || self.run_len >= RUN_BYTES {
            self.write_run()?;
            self.run_at = at;
        }
        let from = self.run_len;
        self.run_len += ps;
        Ok(&mut self.run[from..from + ps])
    }

    fn send(&self, op: WriteOp) -> Result<()> {
        self.writer
            .send(op)
            .map_err(|_| anyhow!("the restore's writer stopped"))
    }

    fn event(
        &mut self,
        ev: &Event,
        dec: &Decoder,
        stop_txid: u64,
        stop_time: Option<u64>,
    ) -> Result<bool> {
        match ev {
            Event::Header(h) => {
                let hs = self
                    .hashes
                    .get_or_insert_with(|| DbHashes::new(h.page_size));
                if hs.page_size() != h.page_size {
                    bail!(
                        "page size {} differs from the snapshot's {}",
                        h.page_size,
                        hs.page_size()
                    );
                }
            }
            Event::Txn(t) => {
                self.end_txn()?;
                let done = self.last.map_or(0, |l| l.txid);
                let past = t.txid > stop_txid || stop_time.is_some_and(|s| t.time_ms > s);
                if self.last.is_some() && t.txid > done + 1 && !past {
                    bail!(
                        "transaction {:016x} follows {:016x}: history has a gap",
                        t.txid,
                        done
                    );
                }
                self.applying = t.txid > done && !past;
                self.cur = Some(*t);
            }
            Event::Page(pgno) => {
                if self.applying {
                    if !std::mem::take(&mut self.placed) {
                        self.room(*pgno)?.copy_from_slice(dec.page());
                    }
                    let ps = dec.page().len();
                    let page = &self.run[self.run_len - ps..self.run_len];
                    // A snapshot's pages were hashed by the decoder already.
                    let hash = dec.page_hash().unwrap_or_else(|| page_hash(*pgno, page));
                    self.hashes.as_mut().expect("header first").set(*pgno, hash);
                }
            }
            Event::End => {}
        }
        Ok(true)
    }

    /// Finishes the transaction being applied: size, then the checksum it recorded.
    fn end_txn(&mut self) -> Result<()> {
        let Some(t) = self.cur.take() else {
            return Ok(());
        };
        if !std::mem::take(&mut self.applying) {
            return Ok(());
        }
        self.write_run()?;
        let hs = self.hashes.as_mut().expect("header first");
        hs.set_page_count(t.db_pages);
        let (len, sum) = (t.db_pages as u64 * hs.page_size() as u64, hs.checksum());
        self.send(WriteOp::SetLen(len))?;
        if sum != t.db_checksum {
            bail!(
                "database checksum mismatch after transaction {:016x}: recorded {:#018x}, rebuilt {sum:#018x}",
                t.txid,
                t.db_checksum,
            );
        }
        self.last = Some(t);
        Ok(())
    }
}
