//! Streaming-replica benchmarks, against the real release binary on loopback:
//!
//! 1. commit on the primary → visible to a reader holding one connection open on the replica
//!    (p50, p99, max) at 100 and 1,000 transactions/s;
//! 2. the highest sustained rate the replica keeps up with: the writer commits as fast as it can
//!    (small rows, then 64 KiB rows) and the replica's apply rate is measured from the first
//!    commit to the moment the last one is visible;
//! 3. with `REPLITED_PEER_BIN` set to a build of another replited (github.com/mrchypark/replited,
//!    built by hand — this repository never builds it), the same 100 tx/s workload against its
//!    stream replication in the same run, and the ratio of the lags.
//!
//! `cargo bench --bench stream` runs the full sizes; `cargo bench -- --test` a tiny version.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_replited")
}

fn bench_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-scratch");
    fs::create_dir_all(&d).unwrap();
    d
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_log(log: &Path, needle: &str, limit: Duration) {
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

fn stop(mut c: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = c.wait();
}

/// A primary and a replica, either ours or the peer's.
struct Pair {
    /// Kept for its lifetime (removed on drop).
    _dir: tempfile::TempDir,
    pdb: PathBuf,
    rdb: PathBuf,
    primary: Option<Child>,
    replica: Option<Child>,
    /// A connection held on the primary for the whole run (the peer needs one).
    _pin: Option<rusqlite::Connection>,
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

fn new_db(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        .unwrap();
}

impl Pair {
    fn dirs(prefix: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
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

    fn spawn(exe: &str, args: &[&str], log: &Path) -> Child {
        let f = fs::File::create(log).unwrap();
        Command::new(exe)
            .args(args)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap()
    }

    /// Ours: QUIC with mutual TLS.
    fn ours() -> Pair {
        let (dir, pdb, rdb) = Pair::dirs("replited-bench-stream");
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
            "[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"backup\"\nparams.type = \"fs\"\nparams.root = \"{}/backup\"\n[[database.replicate]]\nname = \"stream\"\nparams.type = \"stream\"\nparams.addr = \"quic://127.0.0.1:{port}\"\nparams.tls_cert = \"{cs}/primary.pem\"\nparams.tls_key = \"{cs}/primary-key.pem\"\nparams.tls_client_ca = \"{cs}/ca.pem\"\n",
            pdb.display(), d.display())).unwrap();
        let rcfg = d.join("replica.toml");
        fs::write(&rcfg, format!(
            "[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"primary\"\nparams.type = \"stream\"\nparams.addr = \"quic://127.0.0.1:{port}\"\nparams.tls_ca = \"{cs}/ca.pem\"\nparams.tls_cert = \"{cs}/replica-1.pem\"\nparams.tls_key = \"{cs}/replica-1-key.pem\"\n",
            rdb.display())).unwrap();
        let plog = d.join("primary.log");
        let primary = Pair::spawn(bin(), &["-c", pcfg.to_str().unwrap(), "replicate"], &plog);
        wait_log(&plog, "capturing", Duration::from_secs(60));
        let rlog = d.join("replica.log");
        let replica = Pair::spawn(
            bin(),
            &["-c", rcfg.to_str().unwrap(), "replica-sidecar"],
            &rlog,
        );
        wait_log(&rlog, "caught up with the primary", Duration::from_secs(60));
        Pair {
            _dir: dir,
            pdb,
            rdb,
            primary: Some(primary),
            replica: Some(replica),
            _pin: None,
        }
    }

    /// The peer (mrchypark/replited, its branch with the replica-recovery fixes): gRPC stream
    /// replication in its low-latency profile (primary WAL poll every 50 ms, replica checkpoint
    /// every 10 frames / 100 ms), stream only (with an fs target beside it the peer starts a new
    /// generation every few seconds under this load). Its primary loses its own SQLite lock on
    /// the database file, so another process's closing connection could delete the WAL under
    /// it: a connection held open for the whole run (`pin`) prevents that.
    fn peer(exe: &str) -> Pair {
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
        let primary = Pair::spawn(
            exe,
            &["--config", pcfg.to_str().unwrap(), "replicate"],
            &d.join("primary.log"),
        );
        std::thread::sleep(Duration::from_secs(2));
        let replica = Pair::spawn(
            exe,
            &[
                "--config",
                rcfg.to_str().unwrap(),
                "replica-sidecar",
                "--force-restore",
            ],
            &d.join("replica.log"),
        );
        let start = Instant::now();
        while immutable_max_id(&rdb) < 1 {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the peer's replica never restored"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Pair {
            _dir: dir,
            pdb,
            rdb,
            primary: Some(primary),
            replica: Some(replica),
            _pin: Some(pin),
        }
    }
}

/// max(id) read through a fresh `immutable=1` connection: the main database file only, no
/// locks, nothing touched (the only reader the peer's replica tolerates).
fn immutable_max_id(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(
        format!("file:{}?immutable=1", db.display()),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )
    .and_then(|c| c.query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0)))
    .unwrap_or(0)
}

/// How the replica is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// One connection opened once and kept (what an app does).
    Open,
    /// A new `immutable=1` connection per poll (for the peer).
    Immutable,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Lag {
    n: usize,
    seen: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Commits `n` one-row transactions at `rate`/s on the primary; a reader with one connection
/// open on the replica polls for the newest row; lag = first seen − commit.
fn lag(pair: &Pair, rate: u32, n: usize, payload: usize, how: Reader) -> Lag {
    let conn = rusqlite::Connection::open(&pair.pdb).unwrap();
    conn.pragma_update(None, "synchronous", "normal").unwrap();
    // Checkpoints are left to the replicator (the peer needs this; ours does not mind).
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    let base: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
        .unwrap();
    let seen: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let seen = seen.clone();
        let done = done.clone();
        let rdb = pair.rdb.clone();
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
    };
    let payload = vec![7u8; payload];
    let mut commits = Vec::with_capacity(n);
    let mut stmt = conn.prepare("INSERT INTO t (v) VALUES (?)").unwrap();
    let t0 = Instant::now();
    for i in 0..n {
        if rate > 0 {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        stmt.execute([&payload]).unwrap();
        commits.push(Instant::now());
    }
    let wait = Instant::now();
    while seen.lock().unwrap()[n - 1].is_none() && wait.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(1));
    }
    done.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    let s = seen.lock().unwrap();
    let mut v: Vec<f64> = commits
        .iter()
        .zip(s.iter())
        .filter_map(|(c, s)| s.map(|s| s.saturating_duration_since(*c).as_secs_f64() * 1e3))
        .collect();
    let seen_n = v.len();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        v.push(f64::NAN);
    }
    Lag {
        n,
        seen: seen_n,
        p50: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
        max: *v.last().unwrap(),
    }
}

/// Commits as fast as possible; the replica's sustained rate is n / (last visible − first
/// commit).
fn throughput(pair: &Pair, n: usize, payload: usize) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let l = lag(pair, 0, n, payload, Reader::Open);
    // lag() returns when the last row is visible (or gave up).
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(l.seen, n, "the replica did not keep up at all");
    let tps = n as f64 / secs;
    (tps, tps * payload as f64 / 1e6, l.max)
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (rates, secs, small, big): (&[u32], f64, usize, usize) = if test {
        (&[200], 0.25, 200, 20)
    } else {
        (&[100, 1000], 10.0, 20_000, 2_000)
    };
    // REPLITED_BENCH=peer runs only the side-by-side comparison.
    let only_peer = std::env::var("REPLITED_BENCH").is_ok_and(|b| b == "peer");
    if !only_peer {
        ours_tables(rates, secs, small, big);
    }
    if let Ok(peer) = std::env::var("REPLITED_PEER_BIN") {
        side_by_side(&peer, secs);
    }
}

fn ours_tables(rates: &[u32], secs: f64, small: usize, big: usize) {
    let pair = Pair::ours();
    println!("### commit on the primary → visible to an open reader on the replica (loopback)\n");
    println!("| rate (tx/s) | transactions | p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---|---|---|---|");
    for &r in rates {
        let l = lag(&pair, r, (r as f64 * secs) as usize, 100, Reader::Open);
        assert_eq!(l.seen, l.n, "every transaction reached the replica");
        println!(
            "| {r} | {} | {:.2} | {:.2} | {:.2} |",
            l.n, l.p50, l.p99, l.max
        );
    }
    println!("\n### sustained: the writer as fast as it can, the replica following\n");
    println!("| rows | transactions | replica tx/s | MB/s of rows | lag at the end (ms) |");
    println!("|---|---|---|---|---|");
    for (rows, n, payload) in [("100 B", small, 100), ("64 KiB", big, 65536)] {
        let (tps, mbps, last) = throughput(&pair, n, payload);
        println!("| {rows} | {n} | {tps:.0} | {mbps:.1} | {last:.1} |");
    }
}

fn side_by_side(peer: &str, secs: f64) {
    {
        let rate = 100;
        let n = (rate as f64 * secs.max(20.0)) as usize;
        let ours = lag(&Pair::ours(), rate, n, 100, Reader::Open);
        let theirs = lag(&Pair::peer(peer), rate, n, 100, Reader::Immutable);
        println!("\n### the same run: {rate} tx/s for {n} transactions, ours beside {peer}\n");
        println!("| replica | reader | seen | p50 (ms) | p99 (ms) | max (ms) |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| replited (this repository, QUIC) | one connection kept open | {}/{} | {:.2} | {:.2} | {:.2} |",
            ours.seen, ours.n, ours.p50, ours.p99, ours.max
        );
        println!(
            "| mrchypark/replited (gRPC) | a new immutable=1 connection per poll | {}/{} | {:.2} | {:.2} | {:.2} |",
            theirs.seen, theirs.n, theirs.p50, theirs.p99, theirs.max
        );
        println!(
            "\nratio of lags (theirs / ours): p50 {:.1}, p99 {:.1}",
            theirs.p50 / ours.p50,
            theirs.p99 / ours.p99
        );
    }
}
