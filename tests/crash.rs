//! The crash suite: `kill -9` of the primary at chosen moments (while a snapshot, a segment or a
//! compacted segment is being written, right after a checkpoint wrote the database file or a
//! TRUNCATE checkpoint emptied the WAL, while an upload to S3 is in flight, at random), `kill -9`
//! of the app (SQLite's writer) in the middle of its commits, `kill -9` of a replica while it
//! applies a load, and simulated power losses (the newest stored file lost or cut short, a
//! partial temporary file left, the app's WAL cut short).
//!
//! After every crash: a restore (and a replica) equals a state the load committed — never a
//! torn one — passes integrity_check, holds everything replited had reported durable, and never
//! goes backwards; restarted, replited resumes, and at the end the restore equals the primary.
//!
//! The default run is short; `scripts/crash-matrix` runs the `#[ignore]`d long variants for
//! hundreds of iterations (`CRASH_ITERATIONS`) and gathers the figures (docs/RELIABILITY.md).

mod common;
#[path = "common/faults.rs"]
mod faults;
#[path = "common/s3proxy.rs"]
mod s3proxy;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Opts};
use common::s3::S3Server;
use common::*;
use faults::*;
use s3proxy::{Mode, S3Proxy};

const BUCKET: &str = "replited-crash";

/// Where a kill is aimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// A snapshot's temporary file exists (the snapshot is being written).
    Snapshot,
    /// A level-0 segment's temporary file exists.
    Segment,
    /// A compacted (level >= 1) segment's temporary file exists.
    Compaction,
    /// The database file was just written: a checkpoint copied frames back.
    Checkpoint,
    /// The WAL was just truncated to 0 bytes by a TRUNCATE checkpoint.
    Truncate,
    /// An upload (PUT) to S3 is in flight.
    Upload,
    /// A uniformly random moment.
    Random,
}

/// What the primary matrix counts.
#[derive(Default)]
struct Tally {
    kills: BTreeMap<Moment, usize>,
    /// Aimed kills whose moment did not come within the wait (killed anyway, at that point).
    missed: BTreeMap<Moment, usize>,
    /// The last thing the log said before each kill.
    last_logged: BTreeMap<&'static str, usize>,
    /// What replited did at each restart.
    restarts: BTreeMap<String, usize>,
    restores: usize,
    bucket_restores: usize,
    bucket_empty: usize,
    final_restores: usize,
    failures: Vec<String>,
}

/// One round's world: a database with a 4 MB table (snapshots take long enough to be hit), an
/// fs target, and in some rounds an S3 target behind a proxy that slows each request.
struct Rig {
    w: World,
    s3: Option<(S3Server, S3Proxy)>,
    moments: Vec<Moment>,
}

impl Rig {
    fn new(variant: usize) -> Rig {
        let (extra, moments) = match variant % 3 {
            0 => (
                "max-checkpoint-page-count = 10000",
                vec![
                    Moment::Snapshot,
                    Moment::Segment,
                    Moment::Compaction,
                    Moment::Checkpoint,
                    Moment::Random,
                ],
            ),
            // Every checkpoint a TRUNCATE (the guard released for it).
            1 => (
                "max-checkpoint-page-count = 120",
                vec![
                    Moment::Truncate,
                    Moment::Segment,
                    Moment::Snapshot,
                    Moment::Checkpoint,
                    Moment::Random,
                ],
            ),
            _ => (
                "max-checkpoint-page-count = 10000",
                vec![
                    Moment::Upload,
                    Moment::Segment,
                    Moment::Upload,
                    Moment::Snapshot,
                    Moment::Random,
                ],
            ),
        };
        let w = World::new(&format!(
            "snapshot-interval = \"1s\"\ncompaction-interval = \"1s\"\ncheckpoint-interval = \"1s\"\nmin-checkpoint-page-count = 20\n{extra}"
        ));
        fill(&w.db, 4);
        let s3 = (variant % 3 == 2).then(|| {
            let s = S3Server::start();
            s.create_bucket(BUCKET);
            let p = S3Proxy::start(&s.endpoint);
            p.set_mode(Mode::Delay(Duration::from_millis(30)));
            add_s3_target(&w.config, &p.endpoint, BUCKET, &s);
            (s, p)
        });
        Rig { w, s3, moments }
    }

    /// Directories whose temporary files show what is being written.
    fn gen_dirs(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.w.backup.join("data.db")];
        if self.s3.is_some() {
            roots.push(self.w.dir.path().join(".data.db-replited-spool/s3"));
        }
        let mut out = Vec::new();
        for r in roots {
            if let Ok(rd) = fs::read_dir(&r) {
                out.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        out
    }

    fn tmp_matching(&self, f: impl Fn(&str) -> bool) -> bool {
        self.gen_dirs().iter().any(|d| {
            fs::read_dir(d).is_ok_and(|rd| {
                rd.flatten().any(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.ends_with(".tmp") && f(&n)
                })
            })
        })
    }

    /// Waits for moment `m` (at most 4 s after a random pause); true when it came.
    fn aim(&self, m: Moment, rng: &mut Rng) -> bool {
        if m == Moment::Random {
            std::thread::sleep(Duration::from_millis(50 + rng.below(900)));
            return true;
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        let stamp = |p: &Path| {
            fs::metadata(p)
                .map(|m| (m.mtime_nsec(), m.mtime(), m.len()))
                .ok()
        };
        let wal = self.w.path("data.db-wal");
        let db0 = stamp(&self.w.db);
        let mut wal_seen_nonempty = false;
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            let hit = match m {
                Moment::Snapshot => self.tmp_matching(|n| !n.contains(".l")),
                Moment::Segment => self.tmp_matching(|n| n.ends_with(".l0.tmp")),
                Moment::Compaction => {
                    self.tmp_matching(|n| n.contains(".l") && !n.ends_with(".l0.tmp"))
                }
                Moment::Checkpoint => stamp(&self.w.db) != db0,
                Moment::Truncate => {
                    let len = fs::metadata(&wal).map_or(u64::MAX, |m| m.len());
                    if len > 0 && len != u64::MAX {
                        wal_seen_nonempty = true;
                    }
                    len == 0 && wal_seen_nonempty
                }
                Moment::Upload => self.s3.as_ref().is_some_and(|(_, p)| p.put_in_flight()),
                Moment::Random => true,
            };
            if hit {
                return true;
            }
            std::thread::sleep(Duration::from_micros(250));
        }
        false
    }

    /// Restores from the bucket alone (straight from the server).
    fn restore_bucket(&self, out: &Path) -> std::process::Output {
        let (s, _) = self.s3.as_ref().unwrap();
        s.restore_command(bin(), &format!("s3://{BUCKET}/backups/data.db"), out)
            .current_dir(self.w.dir.path())
            .output()
            .unwrap()
    }
}

/// The last thing a primary's log said that names a phase.
fn last_logged(log: &str) -> &'static str {
    const PHASES: [(&str, &str); 6] = [
        ("segment written", "segment written"),
        ("snapshot written", "snapshot written"),
        ("PASSIVE checkpoint", "PASSIVE checkpoint"),
        ("TRUNCATE checkpoint", "TRUNCATE checkpoint"),
        ("segments merged", "segments merged"),
        ("capturing ", "start-up"),
    ];
    for l in log.lines().rev() {
        for (needle, name) in PHASES {
            if l.contains(needle) {
                return name;
            }
        }
    }
    "nothing"
}

/// What a start-up did, from its log.
fn restart_kind(log: &str) -> String {
    // The latest stored file failed its check at start-up (cut short, damaged).
    if let Some(l) = log
        .lines()
        .find(|l| l.contains("ERROR") && l.ends_with(": starting a new generation"))
    {
        let what = if l.contains("truncated") {
            "cut short"
        } else {
            "damaged"
        };
        return format!(
            "new generation (the latest stored file is {what}: detected and logged as an error)"
        );
    }
    for l in log.lines() {
        if let Some(at) = l.find("starting a new generation: ") {
            let why = &l[at + 27..];
            let why = why.split(" generation=").next().unwrap_or(why).trim();
            return format!("new generation ({why})");
        }
    }
    for (needle, name) in [
        (
            "the WAL continues exactly where the backup ends",
            "resumed: the WAL continues where the backup ends",
        ),
        (
            "committed while replited was stopped as one",
            "resumed: the downtime's transactions captured as one",
        ),
        (
            "checkpointed meanwhile but the database is unchanged",
            "resumed: WAL checkpointed meanwhile, database unchanged",
        ),
    ] {
        if log.contains(needle) {
            return name.into();
        }
    }
    "other".into()
}

/// After a kill, with replited down: the latest restore holds everything reported durable, is
/// a committed state no newer than the primary and no older than the last one; the bucket
/// alone restores a committed state too.
/// `running`: replited was started again before the check (the backup may then move on
/// between the two restores).
fn check_after_kill(
    rig: &Rig,
    exp: &Expected,
    durable: u64,
    last: &mut u64,
    running: bool,
    t: &mut Tally,
) -> Result<(), String> {
    let out = rig.w.path("check.db");
    remove_db(&out);
    let o = restore_cfg(&rig.w.config, &out, &[]);
    if !o.status.success() {
        return Err(format!("restore failed: {}", err_text(&o)));
    }
    t.restores += 1;
    let txid = restored_txid(&o).ok_or_else(|| format!("no txid in {}", err_text(&o)))?;
    if txid < durable {
        return Err(format!(
            "restore reached txid {txid}, but txid {durable} was reported durable before the kill"
        ));
    }
    let i = committed_state(&out, exp)?;
    let (now, _) = db_state(&rig.w.db)?;
    if i > now {
        return Err(format!(
            "restore holds transaction {i}; the primary only {now}"
        ));
    }
    if i < *last {
        return Err(format!(
            "restore went back from transaction {} to {i}",
            *last
        ));
    }
    *last = i;
    remove_db(&out);
    if rig.s3.is_some() {
        let o = rig.restore_bucket(&out);
        if o.status.success() {
            t.bucket_restores += 1;
            let j = committed_state(&out, exp).map_err(|e| format!("from the bucket: {e}"))?;
            // Uploads follow the local target; while replited runs both move on.
            let (limit, what) = if running {
                (db_state(&rig.w.db)?.0, "the primary's")
            } else {
                (i, "the local target's")
            };
            if j > limit {
                return Err(format!(
                    "the bucket holds transaction {j}, beyond {what} {limit}"
                ));
            }
        } else if err_text(&o).contains("NoSnapshotError") {
            t.bucket_empty += 1;
        } else {
            return Err(format!("restore from the bucket failed: {}", err_text(&o)));
        }
        remove_db(&out);
    }
    Ok(())
}

/// One round: a load at 400 transactions/s, `kills` kills -9 of replited at the round's
/// moments, each followed by the checks and a restart; then the app is killed too, a last
/// batch committed, replited stopped, and the restore must equal the primary.
fn primary_round(variant: usize, kills: usize, rng: &mut Rng, exp: &Expected, t: &mut Tally) {
    let rig = Rig::new(variant);
    let w = &rig.w;
    let mut d = w.start("auto");
    let mut durable = durable_txid(&d.log_text());
    let mut load: Child = spawn_load(&w.db, 1, 10_000_000, &["--rate", "400"]);
    let mut last = 0;
    let first = rng.below(rig.moments.len() as u64) as usize;
    for k in 0..kills {
        let m = rig.moments[(first + k) % rig.moments.len()];
        let hit = rig.aim(m, rng);
        let log_path = d.log.clone();
        d.kill9();
        *t.kills.entry(m).or_default() += 1;
        if !hit {
            *t.missed.entry(m).or_default() += 1;
        }
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        durable = durable.max(durable_txid(&log));
        *t.last_logged.entry(last_logged(&log)).or_default() += 1;
        // Every other time replited comes back at once (the WAL as the crash left it) and the
        // backup is checked while it runs again; otherwise it is checked first, while the app
        // goes on without replited (its own checkpoints may then reset the WAL).
        let check_first = k % 2 == 0;
        let mut check = |t: &mut Tally| {
            if let Err(e) = check_after_kill(&rig, exp, durable, &mut last, !check_first, t) {
                t.failures
                    .push(format!("variant {variant} kill {k} ({m:?}): {e}"));
            }
        };
        if check_first {
            check(t);
        }
        d = w.start("auto");
        if !check_first {
            check(t);
        }
        let text = d.log_text();
        *t.restarts.entry(restart_kind(&text)).or_default() += 1;
        durable = durable.max(durable_txid(&text));
    }
    // The app crashes too (mid-transaction, perhaps), then commits a last batch.
    let _ = load.kill();
    let _ = load.wait();
    let r = (|| -> Result<(), String> {
        let (i, _) = db_state(&w.db)?;
        run_load(&w.db, i + 1, i + 50);
        let stop_log = d.stop();
        let out = w.path("final.db");
        let o = restore_cfg(&w.config, &out, &[]);
        if !o.status.success() {
            return Err(format!("final restore failed: {}", err_text(&o)));
        }
        let got = committed_state(&out, exp)?;
        if got != i + 50 || db_state(&out)? != db_state(&w.db)? {
            return Err(format!("final restore holds {got}, the primary {}", i + 50));
        }
        if rig.s3.is_some() {
            if stop_log.contains("stay in the spool") {
                // A stopping replited uploads for at most 10 s; the rest waits, durable, in the
                // spool for the next start: run it again until the spool is empty.
                let again = w.start("auto");
                let spool = w.dir.path().join(".data.db-replited-spool/s3");
                let t0 = Instant::now();
                while !spooled(&walk(&spool)).is_empty() {
                    if t0.elapsed() > Duration::from_secs(120) {
                        return Err("the spool did not drain at the next start".into());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let log = again.stop();
                if log.contains("stay in the spool") {
                    return Err("files stayed in the spool after it drained".into());
                }
                *t.restarts
                    .entry("end of round: the spool's rest uploaded at the next start".into())
                    .or_default() += 1;
            }
            let out2 = w.path("final-bucket.db");
            let o = rig.restore_bucket(&out2);
            if !o.status.success() {
                return Err(format!(
                    "final restore from the bucket failed: {}",
                    err_text(&o)
                ));
            }
            if db_state(&out2)? != db_state(&w.db)? {
                let spooled = stop_log
                    .lines()
                    .filter(|l| l.contains("stay in the spool"))
                    .collect::<Vec<_>>()
                    .join(" / ");
                return Err(format!(
                    "the bucket's final restore differs from the primary (bucket {:?}, primary {:?}; at the stop: {spooled:?})",
                    db_state(&out2)?.0,
                    db_state(&w.db)?.0
                ));
            }
            integrity_of(&out2)?;
        }
        t.final_restores += 1;
        Ok(())
    })();
    if let Err(e) = r {
        t.failures
            .push(format!("variant {variant} end of round: {e}"));
    }
}

fn primary_matrix(total: usize, per_round: usize) {
    let mut rng = Rng::new("primary kill -9 matrix");
    let exp = Expected::default();
    let mut t = Tally::default();
    let started = Instant::now();
    let mut round = 0;
    let mut done = 0;
    while done < total {
        let n = per_round.min(total - done);
        primary_round(round, n, &mut rng, &exp, &mut t);
        done += n;
        round += 1;
        eprintln!(
            "primary matrix: {done}/{total} kills, {} failures, {:.0?}",
            t.failures.len(),
            started.elapsed()
        );
    }
    conclude(
        &format!(
        "CRASH primary: {done} kill -9 in {round} rounds ({:.0?}); aimed at {:?}; moment not reached (killed anyway) {:?}; last logged before the kill {:?}; restarts {:?}; restores checked {} (+{} from the bucket alone, {} when it had no snapshot yet), final restores equal to the primary {}/{round}; failures {}",
        started.elapsed(),
        t.kills,
        t.missed,
        t.last_logged,
        t.restarts,
        t.restores,
        t.bucket_restores,
        t.bucket_empty,
        t.final_restores,
        t.failures.len()
    ),
        &t.failures,
        "",
    );
}

/// kill -9 of the primary's replited at aimed moments: 15 kills over 3 rounds (fs; fs with
/// every checkpoint a TRUNCATE; fs + S3 through a slow proxy).
#[test]
fn primary_kill9_matrix() {
    primary_matrix(15, 5);
}

/// The long run: `CRASH_ITERATIONS` kills (default 300), 10 per round.
#[test]
#[ignore]
fn primary_kill9_matrix_long() {
    primary_matrix(iterations(300), 10);
}

// ---- the app killed mid-commit ---------------------------------------------------------------

/// A write the load's content hash ignores (a table of its own), made by a new connection as
/// the app's next start would: it overwrites whatever a killed writer left in the WAL past
/// SQLite's committed end with different bytes.
fn side_write(db: &Path, k: usize) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch("CREATE TABLE IF NOT EXISTS crash_marks (k INTEGER NOT NULL)")
        .unwrap();
    c.execute("INSERT INTO crash_marks (k) VALUES (?1)", [k as i64])
        .unwrap();
}

fn app_kills(n: usize) {
    let mut rng = Rng::new("app kill -9 mid-commit");
    let exp = Expected::default();
    let w = World::new("");
    let d = w.start("auto");
    let mut failures = Vec::new();
    let mut i = 0;
    let started = Instant::now();
    for k in 0..n {
        let mut load = spawn_load(&w.db, i + 1, i + 10_000_000, &["--rate", "1000"]);
        std::thread::sleep(Duration::from_millis(150 + rng.below(400)));
        let _ = load.kill();
        let _ = load.wait();
        side_write(&w.db, k);
        let primary = db_state(&w.db).unwrap();
        // The backup reaches exactly what SQLite committed: never a transaction the killed
        // writer had written but SQLite never published, and capture goes on.
        let out = w.path("app-kill.db");
        let mut last = Err(String::new());
        let ok = wait_until(Duration::from_secs(15), || {
            remove_db(&out);
            let o = restore_cfg(&w.config, &out, &[]);
            last = if o.status.success() {
                db_state(&out)
            } else {
                Err(err_text(&o))
            };
            last.as_ref() == Ok(&primary)
        });
        if !ok {
            failures.push(format!(
                "kill {k}: the backup holds {last:?}, SQLite committed {primary:?}"
            ));
        } else if let Err(e) = committed_state(&out, &exp) {
            failures.push(format!("kill {k}: {e}"));
        }
        i = primary.0;
    }
    run_load(&w.db, i + 1, i + 50);
    let log = d.stop();
    let out = w.path("final.db");
    let o = restore_cfg(&w.config, &out, &[]);
    if !o.status.success() || db_state(&out) != db_state(&w.db) {
        failures.push(format!(
            "final restore: {:?} {}",
            db_state(&out),
            err_text(&o)
        ));
    }
    // Why continuity had to be re-established, if it had: each reason and how often.
    let mut reestablished: BTreeMap<String, usize> = BTreeMap::new();
    for l in log.lines().filter(|l| l.contains("; re-establishing")) {
        let why = l.split("WAL continuity lost: ").nth(1).unwrap_or(l);
        let why = why.split("; re-establishing").next().unwrap_or(why);
        // Offsets and numbers differ each time; the words say what happened.
        let words: String = why
            .split_whitespace()
            .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join(" ");
        *reestablished.entry(words).or_default() += 1;
    }
    conclude(
        &format!(
        "CRASH app: {n} kill -9 of the app (SQLite's writer, 1000 tx/s, synchronous=FULL) with replited running ({:.0?}); backup equal to what SQLite committed after each: {}/{n}; continuity re-established (why: how often) {reestablished:?}; failures {}",
        started.elapsed(),
        n - failures.iter().filter(|f| f.starts_with("kill")).count(),
        failures.len()
    ),
        &failures,
        &log,
    );
}

/// kill -9 of the app in the middle of its commits, 20 times: a killed writer may leave a
/// complete-looking transaction in the WAL that SQLite never published (and then overwrites);
/// the backup must never hold it, and capture must go on.
#[test]
fn app_kill9_mid_commit() {
    app_kills(20);
}

#[test]
#[ignore]
fn app_kill9_mid_commit_long() {
    app_kills(iterations(200));
}

// ---- replicas ----------------------------------------------------------------------------

fn replica_kills(kills: usize) {
    let mut rng = Rng::new("replica kill -9");
    let exp = Expected::default();
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 200);
    let mut r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    let mut load = spawn_load(&c.pdb, 201, 10_000_000, &["--rate", "300"]);
    let mut failures = Vec::new();
    let mut how: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last = 0;
    let started = Instant::now();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(100 + rng.below(900)));
        r.kill9();
        // The replica's file as the crash left it (opened as an app would): a committed state
        // of the primary, never half a transaction.
        match committed_state(&c.rdb, &exp) {
            Ok(i) if i < last => failures.push(format!("kill {k}: went back from {last} to {i}")),
            Ok(i) => last = i,
            Err(e) => failures.push(format!("kill {k}: {e}")),
        }
        r = c.replica(&[]);
        r.wait_for_log("caught up with the primary", Duration::from_secs(60));
        let log = r.log_text();
        let kind = if log.contains("must be rebuilt") {
            "rebuilt"
        } else if log.contains("restoring from") {
            "restored"
        } else if log.contains("resuming at txid") {
            "resumed without a restore"
        } else {
            "other"
        };
        *how.entry(kind).or_default() += 1;
    }
    let _ = load.kill();
    let _ = load.wait();
    let (i, _) = db_state(&c.pdb).unwrap();
    run_load(&c.pdb, i + 1, i + 50);
    let want = db_state(&c.pdb).unwrap();
    let converged = wait_until(Duration::from_secs(60), || {
        c.rdb.exists() && db_state(&c.rdb).ok() == Some(want.clone())
    });
    if !converged {
        let tail = |d: &Daemon| {
            let t = d.log_text();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        failures.push(format!(
            "the replica did not converge: {:?} vs {want:?}\n--- replica log (end):\n{}\n--- primary log (end):\n{}",
            db_state(&c.rdb),
            tail(&r),
            tail(&p)
        ));
    } else if let Err(e) = committed_state(&c.rdb, &exp) {
        failures.push(format!("at the end: {e}"));
    }
    r.stop();
    p.stop();
    conclude(
        &format!(
        "CRASH replica: {kills} kill -9 of replica-sidecar during a 300 tx/s load ({:.0?}); restarts {how:?}; replica file after each crash a committed state: {}/{kills}; converged to the primary: {converged}; failures {}",
        started.elapsed(),
        kills - failures.iter().filter(|f| f.starts_with("kill")).count(),
        failures.len()
    ),
        &failures,
        "",
    );
}

/// kill -9 of a replica while it applies a load, 8 times: each time its file is a committed
/// state, it resumes, and it ends equal to the primary.
#[test]
fn replica_kill9_during_apply() {
    replica_kills(8);
}

#[test]
#[ignore]
fn replica_kill9_during_apply_long() {
    replica_kills(iterations(100));
}

// ---- power loss ----------------------------------------------------------------------------

/// What a simulated power loss takes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Loss {
    /// The newest stored file (its rename never reached the disk).
    NewestLost,
    /// The newest stored file cut short at a random length.
    NewestCut,
    /// The newest file back under its temporary name, cut short (rename and data both lost).
    NewestAsPartialTmp,
    /// The app's WAL cut at a random length (SQLite's own un-synced frames lost).
    WalCut,
}

/// The newest stored file.
fn newest(w: &World) -> Option<PathBuf> {
    w.stored_files()
        .into_iter()
        .filter_map(|p| file_rank(&p).map(|r| (r, p)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, p)| p)
}

/// How much of the WAL a power loss cannot take: its header and every frame a checkpoint may
/// have copied into the database. A checkpoint records the frames it is about to copy
/// (`nBackfillAttempted`, byte 128 of the wal-index in `-shm`), syncs the WAL up to them and
/// only then writes the database, so it is the larger of that and what is copied
/// (`nBackfill`, byte 96; both native byte order). Taking `nBackfill` alone cut frames whose
/// pages a checkpoint killed midway had written into the database already: a malformed
/// database no power loss can make. (The page size is in the WAL header, big-endian, at 8.)
fn synced_wal_len(w: &World) -> u64 {
    let shm = fs::read(w.path("data.db-shm")).unwrap_or_default();
    let wal = fs::read(w.path("data.db-wal")).unwrap_or_default();
    if shm.len() < 136 || wal.len() < 32 {
        return 32;
    }
    let at = |i: usize| u32::from_ne_bytes(shm[i..i + 4].try_into().unwrap()) as u64;
    let backfill = at(96).max(at(128));
    let page = u32::from_be_bytes(wal[8..12].try_into().unwrap()) as u64;
    32 + backfill * (24 + page)
}

#[derive(Default)]
struct LossTally {
    runs: BTreeMap<Loss, usize>,
    /// How the restore taken right after the loss ended.
    restore: BTreeMap<String, usize>,
    restarts: BTreeMap<String, usize>,
    failures: Vec<String>,
}

fn power_loss(loss: Loss, rng: &mut Rng, exp: &Expected, t: &mut LossTally) -> Result<(), String> {
    let w = World::new(
        // No periodic snapshot after the restart may paper over a broken history: the final
        // restore chains from the first snapshot (or a new generation's).
        "snapshot-interval = \"1h\"\ncompaction-interval = \"1s\"\nmin-checkpoint-page-count = 50",
    );
    let d = w.start("auto");
    let mut load = spawn_load(&w.db, 1, 10_000_000, &["--rate", "500"]);
    std::thread::sleep(Duration::from_millis(700 + rng.below(2500)));
    // The power goes: the app and replited stop at the same moment.
    let _ = load.kill();
    d.kill9();
    let _ = load.wait();
    let victim = newest(&w).ok_or("nothing stored")?;
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let len = fs::metadata(&victim).map_err(|e| e.to_string())?.len();
    let mut wal_cut = false;
    match loss {
        Loss::NewestLost => fs::remove_file(&victim).map_err(|e| e.to_string())?,
        Loss::NewestCut => {
            let f = fs::OpenOptions::new().write(true).open(&victim).unwrap();
            f.set_len(rng.below(len)).unwrap();
        }
        Loss::NewestAsPartialTmp => {
            let tmp = victim.with_extension("tmp");
            fs::rename(&victim, &tmp).unwrap();
            let f = fs::OpenOptions::new().write(true).open(&tmp).unwrap();
            f.set_len(rng.below(len)).unwrap();
        }
        Loss::WalCut => {
            // With synchronous=NORMAL (PocketBase's setting) SQLite syncs the WAL only before a
            // checkpoint: frames past the last checkpointed one may be lost, those before it
            // may not (their pages are already in the database file).
            let wal = w.path("data.db-wal");
            let wlen = fs::metadata(&wal).map_or(0, |m| m.len());
            let from = synced_wal_len(&w);
            if wlen > from {
                let f = fs::OpenOptions::new().write(true).open(&wal).unwrap();
                f.set_len(from + rng.below(wlen - from)).unwrap();
                wal_cut = true;
            }
            let _ = fs::remove_file(w.path("data.db-shm"));
        }
    }
    *t.runs.entry(loss).or_default() += 1;
    // A restore now: an earlier committed state, or a failure naming the damaged file.
    let out = w.path("after-loss.db");
    let o = restore_cfg(&w.config, &out, &[]);
    let outcome = if o.status.success() {
        let i = committed_state(&out, exp)?;
        let (p, _) = db_state(&w.db)?;
        if i > p && !wal_cut {
            return Err(format!("restore holds {i}, beyond the primary's {p}"));
        }
        "restored a committed state".to_string()
    } else {
        let err = err_text(&o);
        if loss != Loss::NewestCut {
            return Err(format!("restore after {loss:?} failed: {err}"));
        }
        if !err.contains(&name) {
            return Err(format!("the restore's error does not name {name}: {err}"));
        }
        if out.exists() {
            return Err("a failed restore left its output behind".into());
        }
        // Everything before the damaged file still restores.
        let (_, last, seg) = file_rank(&victim).unwrap();
        let before = if seg {
            u64::from_str_radix(&name[..16], 16).unwrap() - 1
        } else {
            last - 1
        };
        let o = restore_cfg(&w.config, &out, &["--txid", &before.to_string()]);
        if o.status.success() {
            committed_state(&out, exp)?;
            "failed naming the cut file; --txid before it restored a committed state".to_string()
        } else if err_text(&o).contains("is not in") {
            "failed naming the cut file; nothing earlier to restore".to_string()
        } else {
            return Err(format!("restore --txid {before} failed: {}", err_text(&o)));
        }
    };
    *t.restore.entry(format!("{loss:?}: {outcome}")).or_default() += 1;
    remove_db(&out);
    // replited again: it must not continue a broken history.
    let d = w.start("auto");
    *t.restarts
        .entry(format!("{loss:?}: {}", restart_kind(&d.log_text())))
        .or_default() += 1;
    let (i, _) = db_state(&w.db)?;
    run_load(&w.db, i + 1, i + 300);
    d.stop();
    let out = w.path("final.db");
    let o = restore_cfg(&w.config, &out, &[]);
    if !o.status.success() {
        return Err(format!(
            "restore after the restart failed ({loss:?} of {name}): {}",
            err_text(&o)
        ));
    }
    let got = committed_state(&out, exp)?;
    if got != i + 300 || db_state(&out)? != db_state(&w.db)? {
        return Err(format!(
            "restore after the restart holds {got}, the primary {}",
            i + 300
        ));
    }
    Ok(())
}

fn power_losses(n: usize) {
    let mut rng = Rng::new("power loss");
    let exp = Expected::default();
    let mut t = LossTally::default();
    let started = Instant::now();
    let kinds = [
        Loss::NewestLost,
        Loss::NewestCut,
        Loss::NewestAsPartialTmp,
        Loss::WalCut,
    ];
    for k in 0..n {
        let loss = kinds[k % kinds.len()];
        if let Err(e) = power_loss(loss, &mut rng, &exp, &mut t) {
            t.failures.push(format!("{k} ({loss:?}): {e}"));
        }
    }
    conclude(
        &format!(
        "CRASH power loss: {n} simulated power losses ({:.0?}) {:?}; restore right after: {:?}; replited at restart: {:?}; failures {}",
        started.elapsed(),
        t.runs,
        t.restore,
        t.restarts,
        t.failures.len()
    ),
        &t.failures,
        "",
    );
}

/// Eight simulated power losses, two of each kind.
#[test]
fn power_loss_of_unsynced_files() {
    power_losses(8);
}

#[test]
#[ignore]
fn power_loss_of_unsynced_files_long() {
    power_losses(iterations(100));
}
