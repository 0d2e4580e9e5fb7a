//! What the benchmarks share (benches/stream.rs, backup.rs, peers.rs): the release binary,
//! the scratch directory, a primary + replica pair (ours or mrchypark/replited's), the writer
//! that commits paced single-row transactions while a reader polls the replica, CPU time and
//! percentiles. Declared with `#[path = "common/mod.rs"] mod common;` (cargo does not take
//! `benches/common/` for a benchmark of its own: every bench is listed in daemon/Cargo.toml).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_replited")
}

/// Where benchmarks put their databases and backups: `REPLITED_BENCH_DIR` (to measure on
/// another file system), else beside target/, on the same disk as the build (not a tmpfs).
pub fn bench_dir() -> PathBuf {
    let d = std::env::var_os("REPLITED_BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-scratch"),
        PathBuf::from,
    );
    fs::create_dir_all(&d).unwrap();
    d
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_log(log: &Path, needle: &str, limit: Duration) {
    let start = Instant::now();
    while !fs::read_to_string(log).unwrap_or_default().contains(needle) {
        assert!(
            start.elapsed() < limit,
            "{needle:?} not logged within {limit:?}:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(c: &Child) -> nix::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
}

/// SIGTERM and wait, whatever the outcome.
pub fn stop(mut c: Child) {
    let _ = sigterm(&c);
    let _ = c.wait();
}

/// SIGTERM and wait; the process must exit with success.
pub fn stop_ok(mut c: Child) {
    sigterm(&c).unwrap();
    assert!(c.wait().unwrap().success());
}

/// User + system time of a process so far, in clock ticks (USER_HZ, 100 per second).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; rest starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

pub fn new_db(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        .unwrap();
}

/// Fills a new database with about `mb` MB of rows of 3,000 bytes, half random, half zeros:
/// neither all-compressible nor not at all. The WAL is checkpointed into the file at the end.
pub fn fill_db(db: &Path, mb: u64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        .unwrap();
    fill_rows(&conn, mb);
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

/// Adds about `mb` MB of those rows to table t, 2,000 rows per transaction.
pub fn fill_rows(conn: &rusqlite::Connection, mb: u64) {
    let rows = mb * 1_000_000 / 3100;
    let per_txn = 2000;
    let mut done = 0;
    while done < rows {
        let k = per_txn.min(rows - done);
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1) \
             INSERT INTO t (v) SELECT randomblob(1500) || zeroblob(1500) FROM c",
            [k],
        )
        .unwrap();
        done += k;
    }
}

/// A primary and a replica, either ours or the peer's.
pub struct Pair {
    /// Kept for its lifetime (removed on drop).
    pub dir: tempfile::TempDir,
    pub pdb: PathBuf,
    pub rdb: PathBuf,
    pub primary: Option<Child>,
    pub replica: Option<Child>,
    /// A connection held on the primary for the whole run (the peer needs one).
    pub pin: Option<rusqlite::Connection>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in [self.replica.take(), self.primary.take()]
            .into_iter()
            .flatten()
        {
            stop(c);
        }
    }
}

impl Pair {
    /// A pair with no process started yet: it owns each as soon as it runs, so a failed
    /// start stops the other on drop.
    pub fn unstarted(
        dir: tempfile::TempDir,
        pdb: PathBuf,
        rdb: PathBuf,
        pin: Option<rusqlite::Connection>,
    ) -> Pair {
        Pair {
            dir,
            pdb,
            rdb,
            primary: None,
            replica: None,
            pin,
        }
    }

    pub fn dirs(prefix: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let mut dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(bench_dir())
            .unwrap();
        // REPLITED_BENCH_KEEP=1 keeps the directories (logs) for a look afterwards.
        if std::env::var_os("REPLITED_BENCH_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        for s in ["primary", "replica"] {
            fs::create_dir_all(dir.path().join(s)).unwrap();
        }
        let pdb = dir.path().join("primary/data.db");
        let rdb = dir.path().join("replica/data.db");
        new_db(&pdb);
        (dir, pdb, rdb)
    }

    pub fn spawn(exe: &str, args: &[&str], log: &Path) -> Child {
        let f = fs::File::create(log).unwrap();
        Command::new(exe)
            .args(args)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap()
    }

    /// Ours: QUIC with mutual TLS, an `fs` backup target beside the stream.
    pub fn ours() -> Pair {
        Pair::ours_with("replited-bench-stream", "", &|d: &Path| {
            format!(
                "[[database.replicate]]\nname = \"backup\"\nparams.type = \"fs\"\nparams.root = \"{}/backup\"\n",
                d.display()
            )
        })
    }

    /// Ours with `db_keys` added to the `[[database]]` table and the storage target that
    /// `storage(dir)` writes (a whole `[[database.replicate]]` block) beside the stream.
    pub fn ours_with(prefix: &str, db_keys: &str, storage: &dyn Fn(&Path) -> String) -> Pair {
        let (dir, pdb, rdb) = Pair::dirs(prefix);
        let d = dir.path();
        let c = d.join("certs");
        let cs = c.to_str().unwrap();
        for args in [
            vec!["ca", "--dir", cs],
            vec!["server", "--ca-dir", cs, "--san", "127.0.0.1"],
            vec!["client", "--ca-dir", cs, "--name", "replica-1"],
        ] {
            assert!(Command::new(bin())
                .arg("cert")
                .args(&args)
                .output()
                .unwrap()
                .status
                .success());
        }
        let port = free_udp_port();
        let pcfg = d.join("primary.toml");
        fs::write(&pcfg, format!(
            "[[database]]\ndb = \"{}\"\n{db_keys}{}[[database.replicate]]\nname = \"stream\"\nparams.type = \"stream\"\nparams.addr = \"quic://127.0.0.1:{port}\"\nparams.tls_cert = \"{cs}/primary.pem\"\nparams.tls_key = \"{cs}/primary-key.pem\"\nparams.tls_client_ca = \"{cs}/ca.pem\"\n",
            pdb.display(), storage(d))).unwrap();
        let rcfg = d.join("replica.toml");
        fs::write(&rcfg, format!(
            "[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"primary\"\nparams.type = \"stream\"\nparams.addr = \"quic://127.0.0.1:{port}\"\nparams.tls_ca = \"{cs}/ca.pem\"\nparams.tls_cert = \"{cs}/replica-1.pem\"\nparams.tls_key = \"{cs}/replica-1-key.pem\"\n",
            rdb.display())).unwrap();
        let (plog, rlog) = (d.join("primary.log"), d.join("replica.log"));
        // The pair owns each process as soon as it runs: a failed start stops them on drop.
        let mut pair = Pair::unstarted(dir, pdb, rdb, None);
        pair.primary = Some(Pair::spawn(
            bin(),
            &["-c", pcfg.to_str().unwrap(), "replicate"],
            &plog,
        ));
        wait_log(&plog, "capturing", Duration::from_secs(60));
        pair.replica = Some(Pair::spawn(
            bin(),
            &["-c", rcfg.to_str().unwrap(), "replica-sidecar"],
            &rlog,
        ));
        wait_log(&rlog, "caught up with the primary", Duration::from_secs(60));
        pair
    }

    /// The peer (mrchypark/replited, its branch with the replica-recovery fixes): gRPC stream
    /// replication in its low-latency profile (primary WAL poll every 50 ms, replica checkpoint
    /// every 10 frames / 100 ms), stream only (with an fs target beside it the peer starts a new
    /// generation every few seconds under this load). Its primary loses its own SQLite lock on
    /// the database file, so another process's closing connection could delete the WAL under
    /// it: a connection held open for the whole run (`pin`) prevents that.
    pub fn peer(exe: &str) -> Pair {
        let (dir, pdb, _) = Pair::dirs("replited-bench-peer");
        let d = dir.path();
        let rdb = d.join("replica/replica.db");
        let port = free_udp_port();
        let pcfg = d.join("primary.toml");
        fs::write(&pcfg, format!(
            "[log]\nlevel = \"Info\"\ndir = \"{dir}/plog\"\n\n[[database]]\ndb = \"{}\"\nmonitor_interval_ms = 50\n\n[[database.replicate]]\nname = \"stream-primary\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"http://127.0.0.1:{port}\"\n",
            pdb.display(), dir = d.display())).unwrap();
        let rcfg = d.join("replica.toml");
        fs::write(&rcfg, format!(
            "[log]\nlevel = \"Info\"\ndir = \"{dir}/rlog\"\n\n[[database]]\ndb = \"{}\"\napply_checkpoint_frame_interval = 10\napply_checkpoint_interval_ms = 100\n\n[[database.replicate]]\nname = \"stream-primary\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"http://127.0.0.1:{port}\"\nremote_db_name = \"{}\"\n",
            rdb.display(), pdb.display(), dir = d.display())).unwrap();
        fs::create_dir_all(d.join("plog")).unwrap();
        fs::create_dir_all(d.join("rlog")).unwrap();
        {
            let c = rusqlite::Connection::open(&pdb).unwrap();
            c.execute("INSERT INTO t (v) VALUES (x'00')", []).unwrap();
        }
        let pin = rusqlite::Connection::open(&pdb).unwrap();
        pin.execute_batch("SELECT count(*) FROM t").unwrap();
        let (plog, rlog) = (d.join("primary.log"), d.join("replica.log"));
        let mut pair = Pair::unstarted(dir, pdb, rdb, Some(pin));
        pair.primary = Some(Pair::spawn(
            exe,
            &["--config", pcfg.to_str().unwrap(), "replicate"],
            &plog,
        ));
        std::thread::sleep(Duration::from_secs(2));
        pair.replica = Some(Pair::spawn(
            exe,
            &[
                "--config",
                rcfg.to_str().unwrap(),
                "replica-sidecar",
                "--force-restore",
            ],
            &rlog,
        ));
        wait_immutable(
            &pair.rdb,
            1,
            Duration::from_secs(120),
            "the peer's replica never restored",
        );
        pair
    }
}

/// max(id) read through a fresh `immutable=1` connection: the main database file only, no
/// locks, nothing touched (the only reader the peer's replica tolerates).
pub fn immutable_max_id(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(
        format!("file:{}?immutable=1", db.display()),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )
    .and_then(|c| c.query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0)))
    .unwrap_or(0)
}

/// Waits until an `immutable=1` reader sees row `id` in `db`; panics with `what` after `limit`.
pub fn wait_immutable(db: &Path, id: i64, limit: Duration, what: &str) {
    let start = Instant::now();
    while immutable_max_id(db) < id {
        assert!(start.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How the replica is read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reader {
    /// One connection opened once and kept (what an app does).
    Open,
    /// A new `immutable=1` connection per poll (for the peer).
    Immutable,
}

/// What each committed row holds.
#[derive(Clone, Copy)]
pub enum Payload {
    /// This many bytes of 7s (compress to nothing).
    Fixed(usize),
    /// This many pseudo-random bytes, different in every row (do not compress).
    Random(usize),
}

/// Sleeps until transaction `i` of a run started at `t0` is due at `rate` per second.
pub fn pace(t0: Instant, i: usize, rate: u32) {
    let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
    if let Some(d) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// What the writer did and when the replica's reader saw each row.
pub struct Trace {
    /// Return of each transaction's COMMIT.
    pub commits: Vec<Instant>,
    /// First poll of the replica that saw each row (all None without a replica).
    pub seen: Vec<Option<Instant>>,
    /// Just before the first commit.
    pub t0: Instant,
    /// When the wait for the replica (and `also`) ended.
    pub end: Instant,
}

fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Commits `n` one-row transactions at `rate`/s (0: as fast as possible) on `pdb`
/// (synchronous = NORMAL, checkpoints left to the replicator); with a replica, a reader thread
/// polls it for the newest row. Then waits, up to `limit`, until the replica has the last row
/// and `also(last commit)` holds.
pub fn write_and_read(
    pdb: &Path,
    replica: Option<(&Path, Reader)>,
    rate: u32,
    n: usize,
    payload: Payload,
    also: &dyn Fn(Instant) -> bool,
    limit: Duration,
) -> Trace {
    let conn = rusqlite::Connection::open(pdb).unwrap();
    conn.pragma_update(None, "synchronous", "normal").unwrap();
    // Checkpoints are left to the replicator (the peer needs this; ours does not mind).
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    let base: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
        .unwrap();
    let seen: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let done = Arc::new(AtomicBool::new(false));
    let reader = replica.map(|(rdb, how)| {
        let seen = seen.clone();
        let done = done.clone();
        let rdb = rdb.to_path_buf();
        std::thread::spawn(move || {
            // Only the Open reader holds a connection (the peer's replica breaks under one).
            let r = (how == Reader::Open).then(|| rusqlite::Connection::open(&rdb).unwrap());
            let mut upto = base;
            while !done.load(Ordering::SeqCst) {
                let m: i64 = match &r {
                    Some(r) => r
                        .prepare_cached("SELECT coalesce(max(id), 0) FROM t")
                        .and_then(|mut s| s.query_row([], |r| r.get(0)))
                        .unwrap_or(upto),
                    None => immutable_max_id(&rdb),
                };
                if m > upto {
                    let now = Instant::now();
                    let mut s = seen.lock().unwrap();
                    for id in upto + 1..=m {
                        let i = (id - base - 1) as usize;
                        if i < s.len() {
                            s[i] = Some(now);
                        }
                    }
                    upto = m;
                }
                // Opening a connection per poll costs far more than a query: poll it every ms
                // so the reader does not starve the replica of CPU.
                std::thread::sleep(match how {
                    Reader::Open => Duration::from_micros(100),
                    Reader::Immutable => Duration::from_millis(1),
                });
            }
        })
    });
    let (fixed, random) = match payload {
        Payload::Fixed(len) => (vec![7u8; len], 0),
        Payload::Random(len) => (Vec::new(), len),
    };
    let mut row = vec![0u8; random];
    let mut commits = Vec::with_capacity(n);
    let mut stmt = conn.prepare("INSERT INTO t (v) VALUES (?)").unwrap();
    let t0 = Instant::now();
    for i in 0..n {
        if rate > 0 {
            pace(t0, i, rate);
        }
        if random > 0 {
            fill_random(&mut row, ((base as u64) << 32) ^ i as u64);
            stmt.execute([&row]).unwrap();
        } else {
            stmt.execute([&fixed]).unwrap();
        }
        commits.push(Instant::now());
    }
    let last = commits[n - 1];
    let wait = Instant::now();
    let ready = || (reader.is_none() || seen.lock().unwrap()[n - 1].is_some()) && also(last);
    while !ready() && wait.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(1));
    }
    let end = Instant::now();
    done.store(true, Ordering::SeqCst);
    if let Some(r) = reader {
        r.join().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    Trace {
        commits,
        seen,
        t0,
        end,
    }
}

/// Sorted milliseconds from each commit to its moment in `at` (those that have one).
pub fn delays_ms(commits: &[Instant], at: &[Option<Instant>]) -> Vec<f64> {
    let mut v: Vec<f64> = commits
        .iter()
        .zip(at.iter())
        .filter_map(|(c, s)| s.map(|s| s.saturating_duration_since(*c).as_secs_f64() * 1e3))
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

pub struct Lag {
    pub n: usize,
    pub seen: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Lag {
    /// Percentiles of commit → first seen (NaN when nothing was seen).
    pub fn of(commits: &[Instant], at: &[Option<Instant>]) -> Lag {
        let mut v = delays_ms(commits, at);
        let seen = v.len();
        if v.is_empty() {
            v.push(f64::NAN);
        }
        Lag {
            n: commits.len(),
            seen,
            p50: percentile(&v, 0.5),
            p99: percentile(&v, 0.99),
            max: *v.last().unwrap(),
        }
    }
}

/// Commits `n` one-row transactions at `rate`/s on the primary; a reader with one connection
/// open on the replica polls for the newest row; lag = first seen − commit.
pub fn lag(pair: &Pair, rate: u32, n: usize, payload: usize, how: Reader) -> Lag {
    let t = write_and_read(
        &pair.pdb,
        Some((&pair.rdb, how)),
        rate,
        n,
        Payload::Fixed(payload),
        &|_| true,
        Duration::from_secs(120),
    );
    Lag::of(&t.commits, &t.seen)
}
