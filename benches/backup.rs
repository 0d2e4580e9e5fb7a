//! Backup benchmarks, run against the real release binary:
//!
//! 1. commit on the primary → transaction durable in the backup directory (p50, p99) at 100 and
//!    1,000 transactions/s, with replited's CPU use at each rate;
//! 2. restore of a large database from the local backup, MB/s, beside `cp` of the same bytes.
//!
//! `cargo bench --bench backup` runs the full sizes (1 GB restore); `cargo bench -- --test`
//! runs a tiny version that only proves the benchmark still works. Results go to stdout as a
//! markdown table; docs/BENCHMARKS.md records them with the command.
//!
//! "Durable" is observed from outside: a segment appears under its final name only after its
//! data and directory were fsynced, so the moment inotify reports the rename is the moment the
//! transaction was durable.

#[path = "common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::io::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    bench_dir, bin, cpu_ticks, fill_db, median, pace, percentile, stop_ok as stop, wait_log,
};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use replited_core::name::FileMeta;

struct World {
    dir: tempfile::TempDir,
    db: PathBuf,
    backup: PathBuf,
    config: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::Builder::new()
            .prefix("replited-bench")
            .tempdir_in(bench_dir())
            .unwrap();
        let db = dir.path().join("data.db");
        let backup = dir.path().join("backup");
        let config = dir.path().join("replited.toml");
        fs::write(
            &config,
            format!(
                "[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"b\"\nparams.type = \"fs\"\nparams.root = \"{}\"\n",
                db.display(),
                backup.display()
            ),
        )
        .unwrap();
        World {
            dir,
            db,
            backup,
            config,
        }
    }

    fn start(&self) -> Child {
        let log = self.dir.path().join("replited.log");
        let child = Command::new(bin())
            .args(["-c", self.config.to_str().unwrap(), "replicate"])
            .stderr(fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_log(&log, "capturing", Duration::from_secs(600));
        child
    }
}

struct Latency {
    rate: u32,
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_pct: f64,
}

/// Commits `n` single-row transactions at `rate`/s and measures commit → durable.
fn latency(rate: u32, n: usize) -> Latency {
    let w = World::new();
    let conn = rusqlite::Connection::open(&w.db).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.pragma_update(None, "synchronous", "normal").unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        .unwrap();
    let child = w.start();
    let pid = child.id();
    let gen_dir = fs::read_dir(w.backup.join("data.db"))
        .unwrap()
        .flatten()
        .find(|e| e.path().is_dir())
        .unwrap()
        .path();
    let snap_txid = fs::read_dir(&gen_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let rel = format!(
                "{}/{}",
                gen_dir.file_name()?.to_str()?,
                e.file_name().to_str()?
            );
            FileMeta::parse_path(&rel)
        })
        .map(|m| m.last_txid)
        .max()
        .unwrap();

    // Watcher: when each txid became durable.
    let durable: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let durable = durable.clone();
        let done = done.clone();
        let gen_dir = gen_dir.clone();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        inotify
            .add_watch(&gen_dir, AddWatchFlags::IN_MOVED_TO)
            .unwrap();
        std::thread::spawn(move || {
            let gname = gen_dir.file_name().unwrap().to_str().unwrap().to_string();
            let mut upto = snap_txid;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
                let now = Instant::now();
                while let Ok(evs) = inotify.read_events() {
                    if evs.is_empty() {
                        break;
                    }
                    for ev in evs {
                        let Some(name) = ev.name else { continue };
                        let Some(m) =
                            FileMeta::parse_path(&format!("{gname}/{}", name.to_string_lossy()))
                        else {
                            continue;
                        };
                        let mut d = durable.lock().unwrap();
                        while upto < m.last_txid {
                            upto += 1;
                            let i = (upto - snap_txid - 1) as usize;
                            if i < d.len() && d[i].is_none() {
                                d[i] = Some(now);
                            }
                        }
                    }
                }
            }
        })
    };

    let mut commits = Vec::with_capacity(n);
    let payload = vec![7u8; 100];
    let cpu0 = cpu_ticks(pid);
    let t0 = Instant::now();
    let mut stmt = conn.prepare("INSERT INTO t (v) VALUES (?)").unwrap();
    for i in 0..n {
        pace(t0, i, rate);
        stmt.execute([&payload]).unwrap();
        commits.push(Instant::now());
    }
    drop(stmt);
    // Wait for the last one to be durable.
    let wait = Instant::now();
    while durable.lock().unwrap()[n - 1].is_none() {
        assert!(
            wait.elapsed() < Duration::from_secs(60),
            "transactions never became durable"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / 100.0; // USER_HZ
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watcher.join().unwrap();
    stop(child);
    let d = durable.lock().unwrap();
    let mut lat: Vec<f64> = commits
        .iter()
        .zip(d.iter())
        .map(|(c, d)| {
            let d = d.expect("every transaction became durable");
            d.saturating_duration_since(*c).as_secs_f64() * 1e3
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Latency {
        rate,
        n,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: *lat.last().unwrap(),
        cpu_pct: cpu / wall * 100.0,
    }
}

struct RestoreResult {
    bytes: u64,
    restore_mbps: Vec<f64>,
    cp_mbps: Vec<f64>,
}

/// Builds a database of about `mb` MB, backs it up, then alternates restore and cp.
fn restore_throughput(mb: u64, rounds: usize) -> RestoreResult {
    let w = World::new();
    // Rows of 3,000 bytes, half random, half zeros: neither all-compressible nor not at all.
    fill_db(&w.db, mb);
    let child = w.start();
    stop(child);
    let bytes = fs::metadata(&w.db).unwrap().len();
    let mut restore_mbps = Vec::new();
    let mut cp_mbps = Vec::new();
    for r in 0..rounds {
        let out = w.dir.path().join(format!("restored-{r}.db"));
        let t = Instant::now();
        let o = Command::new(bin())
            .args([
                "-c",
                w.config.to_str().unwrap(),
                "restore",
                "-o",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        restore_mbps.push(bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
        fs::remove_file(&out).unwrap();

        let out = w.dir.path().join(format!("cp-{r}.db"));
        let t = Instant::now();
        let st = Command::new("cp").arg(&w.db).arg(&out).status().unwrap();
        assert!(st.success());
        // cp does not fsync; replited does: sync so both bytes are on disk when timed.
        let st = Command::new("sync").arg(&out).status().unwrap();
        assert!(st.success());
        cp_mbps.push(bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
        fs::remove_file(&out).unwrap();
    }
    RestoreResult {
        bytes,
        restore_mbps,
        cp_mbps,
    }
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (rates, secs, mb, rounds): (&[u32], f64, u64, usize) = if test {
        (&[200], 0.25, 4, 1)
    } else {
        (&[100, 1000], 10.0, 1024, 5)
    };
    // REPLITED_BENCH=latency or =restore runs one part only.
    let only = std::env::var("REPLITED_BENCH").unwrap_or_default();
    if only != "restore" {
        latency_table(rates, secs);
    }
    if only != "latency" {
        restore_table(mb, rounds);
    }
}

fn latency_table(rates: &[u32], secs: f64) {
    println!("### commit → durable in the backup directory\n");
    println!("| rate (tx/s) | transactions | p50 (ms) | p99 (ms) | max (ms) | replited CPU (% of one core) |");
    println!("|---|---|---|---|---|---|");
    for &r in rates {
        let l = latency(r, (r as f64 * secs) as usize);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
            l.rate, l.n, l.p50_ms, l.p99_ms, l.max_ms, l.cpu_pct
        );
    }
}

fn restore_table(mb: u64, rounds: usize) {
    let mut r = restore_throughput(mb, rounds);
    let (rm, cm) = (median(&mut r.restore_mbps), median(&mut r.cp_mbps));
    println!("\n### restore from the local backup beside cp (+ sync) of the same bytes\n");
    println!("| database | replited restore (MB/s, median of {rounds}) | cp + sync (MB/s, median of {rounds}) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| {:.0} MB | {rm:.0} | {cm:.0} | {:.2} |",
        r.bytes as f64 / 1e6,
        rm / cm
    );
}
