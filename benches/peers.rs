//! replited beside its peers, the same workloads in the same run, alternating:
//!
//! - replited (this repository's release binary): an `s3` target on a local S3 server (s3s-fs)
//!   and a QUIC `stream` target with a `replica-sidecar`; a second row with
//!   `sync-interval = "1s"` (Litestream-style batching);
//! - mrchypark/replited (`REPLITED_PEER_BIN`, built by hand: gRPC stream replication, stream
//!   only);
//! - walrust 0.7.0 (`WALRUST_BIN`, else `cargo install walrust --version 0.7.0 --locked --root
//!   ~/.cache/replited-test/walrust-0.7.0`): `walrust watch` to the same S3 server and
//!   `walrust replicate` as its read replica;
//! - SQLite alone, `cp` + fsync, `VACUUM INTO` and the sqlite3 shell's `.backup` as the
//!   physical references.
//!
//! Workloads (`REPLITED_BENCH=rates|bulk|restore|idle` runs one): single-row commits at 100,
//! 1,000 and 10,000 tx/s and as fast as possible; a bulk load of 100 transactions of 1 MB; a
//! 1 GB restore; an idle minute (`REPLITED_IDLE_SECS=3600` for the hour). Sizes:
//! `REPLITED_BENCH_SECS` (default 10), `REPLITED_BENCH_ROUNDS` (2), `REPLITED_BENCH_RATES`
//! (`100,1000,10000`), `REPLITED_RESTORE_MB` (1024). A peer that is absent or fails gets "n/a (reason)"; replited failing fails the run.
//! The report ends with issue 8's targets and whether this run met them;
//! `REPLITED_BENCH_STRICT=1` fails the run on a target missed.
//!
//! The markdown report goes to stdout and to target/bench-peers.md. `cargo bench -- --test`
//! runs a tiny version of everything.

#[path = "common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/common/s3.rs"]
mod fixture;
#[path = "common/observe.rs"]
mod observe;

use std::cell::{Cell as Counter, RefCell};
use std::fmt::Write as _;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{
    bench_dir, bin, cpu_ticks, fill_db, fill_rows, immutable_max_id, median, new_db,
    wait_immutable, write_and_read, Lag, Pair, Payload, Reader, Trace,
};
use fixture::S3Server;
use observe::{peak_rss_mb, run_measured, since, wait_for, CountingProxy, Counts, ObjectWatch};

const WALRUST_VERSION: &str = "0.7.0";
/// The walrust replica's poll of the bucket (its default is 5 s; 1 s matches its WAL upload
/// interval, which cannot go below 1 s).
const WALRUST_POLL: &str = "1s";

/// A figure, or why there is none.
type Cell = Result<f64, String>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Ours,
    Ours1s,
    Fork,
    Walrust,
}

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Ours => "replited (S3 + QUIC stream)",
            Tool::Ours1s => "replited, `sync-interval = \"1s\"`",
            Tool::Fork => "mrchypark/replited (gRPC stream)",
            Tool::Walrust => "walrust (S3; replica: `walrust replicate`)",
        }
    }

    fn ours(self) -> bool {
        matches!(self, Tool::Ours | Tool::Ours1s)
    }

    fn reader(self) -> Reader {
        match self {
            Tool::Ours | Tool::Ours1s => Reader::Open,
            // Its replica rewrites its -wal under open connections (they fail and replication
            // stops); walrust's replaces the database file by a rename on every apply (a
            // connection kept open goes on reading the old file).
            Tool::Fork | Tool::Walrust => Reader::Immutable,
        }
    }
}

/// mrchypark/replited runs stream only: with a backup target beside the stream it starts a new
/// generation every few seconds under load (the replica restores again each time).
const NO_BACKUP: &str = "stream only";
const NO_STORE: &str = "no object store";

/// Settings of the run, from the environment.
struct Opts {
    test: bool,
    secs: f64,
    rounds: usize,
    rates: Vec<u32>,
    sustained_n: usize,
    bulk_rows: usize,
    bulk_row_bytes: usize,
    restore_mb: u64,
    idle_secs: f64,
    settle: Duration,
    /// How long a run waits for the last transaction.
    limit: Duration,
    /// How long a snapshot or upload of the restore database may take.
    long: Duration,
    only: String,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Opts {
    fn from_env() -> Opts {
        let test = std::env::args().any(|a| a == "--test");
        let only = std::env::var("REPLITED_BENCH").unwrap_or_default();
        assert!(
            ["", "rates", "bulk", "restore", "idle"].contains(&only.as_str()),
            "REPLITED_BENCH={only:?}: one of rates, bulk, restore, idle (or unset for all)"
        );
        if test {
            return Opts {
                test,
                secs: 0.25,
                rounds: 1,
                rates: vec![200],
                sustained_n: 200,
                bulk_rows: 4,
                bulk_row_bytes: 250_000,
                restore_mb: 4,
                idle_secs: 1.0,
                settle: Duration::from_millis(300),
                limit: Duration::from_secs(20),
                long: Duration::from_secs(60),
                only,
            };
        }
        let secs = env_num("REPLITED_BENCH_SECS", 10.0);
        Opts {
            test,
            secs,
            rounds: env_num("REPLITED_BENCH_ROUNDS", 2),
            rates: std::env::var("REPLITED_BENCH_RATES").map_or_else(
                |_| vec![100, 1000, 10_000],
                |v| {
                    v.split(',')
                        .map(|r| {
                            r.trim().parse().unwrap_or_else(|_| {
                                panic!("REPLITED_BENCH_RATES={v:?}: rates, comma-separated")
                            })
                        })
                        .collect()
                },
            ),
            sustained_n: (2000.0 * secs) as usize,
            bulk_rows: 100,
            bulk_row_bytes: 1_000_000,
            restore_mb: env_num("REPLITED_RESTORE_MB", 1024),
            idle_secs: env_num("REPLITED_IDLE_SECS", 60.0),
            // Past replited's 10 s compaction interval: the compaction of the 1,000 rows is
            // not idle work.
            settle: Duration::from_secs(15),
            limit: Duration::from_secs(60),
            long: Duration::from_secs(1800),
            only,
        }
    }

    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only == part
    }
}

/// The S3 server, the peers found, and the report so far.
struct World {
    opts: Opts,
    s3: S3Server,
    fork: Result<String, String>,
    walrust: Result<String, String>,
    buckets: Counter<u32>,
    report: String,
    /// replited's failures: the run fails once the report is written.
    failures: RefCell<Vec<String>>,
    /// Issue 8's targets as this run measured them, in the order met.
    targets: RefCell<Vec<Verdict>>,
    notes: RefCell<Vec<String>>,
    load_start: RefCell<String>,
}

fn rounds_text(n: usize) -> String {
    if n == 1 {
        "one round".to_string()
    } else {
        format!("median of {n} rounds")
    }
}

/// The last `k` non-empty lines of a log, joined, without their timestamps: where a failing
/// tool says why.
fn last_lines(s: &str, k: usize) -> String {
    let v: Vec<&str> = s
        .lines()
        .map(|l| {
            let l = l.trim();
            match l.split_once(' ') {
                Some((t, rest)) if t.starts_with("20") && t.ends_with('Z') => rest.trim(),
                _ => l,
            }
        })
        .filter(|l| !l.is_empty())
        .collect();
    v[v.len().saturating_sub(k)..].join(" / ")
}

fn load_average() -> String {
    let l = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn version(exe: &str) -> String {
    Command::new(exe)
        .arg("--version")
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_else(|e| format!("({e})"))
}

impl World {
    fn new(opts: Opts) -> World {
        let fork = match std::env::var("REPLITED_PEER_BIN") {
            Ok(p) if Path::new(&p).is_file() => Ok(p),
            Ok(p) => Err(format!(
                "not installed: REPLITED_PEER_BIN={p} is not a file"
            )),
            Err(_) => Err("not installed: set REPLITED_PEER_BIN to a build of \
                           github.com/mrchypark/replited"
                .to_string()),
        };
        let cache = std::env::var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
        let root = cache.join(format!("replited-test/walrust-{WALRUST_VERSION}"));
        let walrust = std::env::var("WALRUST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("bin/walrust"));
        let walrust = if walrust.is_file() {
            Ok(walrust.display().to_string())
        } else {
            Err(format!(
                "not installed: cargo install walrust --version {WALRUST_VERSION} --locked --root {}",
                root.display()
            ))
        };
        let s3 = S3Server::start();
        World {
            opts,
            s3,
            fork,
            walrust,
            buckets: Counter::new(0),
            report: String::new(),
            failures: RefCell::new(Vec::new()),
            targets: RefCell::new(Vec::new()),
            notes: RefCell::new(Vec::new()),
            load_start: RefCell::new(String::new()),
        }
    }

    /// Why `tool` cannot run here, if it cannot.
    fn absent(&self, tool: Tool) -> Option<String> {
        match tool {
            Tool::Fork => self.fork.as_ref().err().cloned(),
            Tool::Walrust => self.walrust.as_ref().err().cloned(),
            Tool::Ours | Tool::Ours1s => None,
        }
    }

    /// The tools of the row-based workloads, in their first-round order.
    fn tools(&self) -> Vec<Tool> {
        if self.opts.test {
            // The sync-interval row is ours with one more key: not worth the seconds in CI.
            vec![Tool::Ours, Tool::Fork, Tool::Walrust]
        } else {
            vec![Tool::Ours, Tool::Ours1s, Tool::Fork, Tool::Walrust]
        }
    }

    /// A fresh bucket on the S3 server.
    fn bucket(&self, what: &str) -> String {
        let n = self.buckets.get() + 1;
        self.buckets.set(n);
        let b = format!("b{n:03}-{what}");
        self.s3.create_bucket(&b);
        b
    }

    fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.s3.root.join(bucket)
    }

    fn command(&self) -> String {
        let mut c = String::new();
        for v in [
            "REPLITED_PEER_BIN",
            "WALRUST_BIN",
            "REPLITED_BENCH",
            "REPLITED_BENCH_SECS",
            "REPLITED_BENCH_ROUNDS",
            "REPLITED_BENCH_RATES",
            "REPLITED_RESTORE_MB",
            "REPLITED_IDLE_SECS",
            "REPLITED_BENCH_KEEP",
            "REPLITED_BENCH_DIR",
        ] {
            if let Ok(x) = std::env::var(v) {
                let _ = write!(c, "{v}={x} ");
            }
        }
        c.push_str("cargo bench -p replited --bench peers");
        if self.opts.test {
            c.push_str(" -- --test");
        }
        c
    }

    /// What precedes every table: the command, the versions, the machine's load.
    fn preamble(&mut self, title: &str) {
        let peer = |r: &Result<String, String>| match r {
            Ok(p) => format!("`{}` ({p})", version(p)),
            Err(e) => format!("n/a ({e})"),
        };
        let text = format!(
            "\n### {title}\n\nCommand: `{}`  \nreplited: `{}` ({}); walrust: {}; mrchypark/replited: {}; \
             load average (1, 5, 15 min) at the start: {}, at the end: {}\n\n",
            self.command(),
            version(bin()),
            bin(),
            peer(&self.walrust),
            peer(&self.fork),
            self.load_start.borrow(),
            load_average()
        );
        self.out(&text);
    }

    fn out(&mut self, s: &str) {
        print!("{s}");
        self.report.push_str(s);
    }

    /// Runs `f` for `tool`: replited's failures fail the benchmark, a peer's become a reason.
    fn attempt<T>(&self, tool: Tool, f: impl FnOnce() -> T) -> Result<T, String> {
        if let Some(why) = self.absent(tool) {
            return Err(why);
        }
        catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".to_string());
            let mut line = first_line(&msg);
            if line.len() > 200 {
                line.truncate(line.char_indices().nth(200).map_or(line.len(), |(i, _)| i));
                line.push('…');
            }
            if tool.ours() {
                // The run goes on (the report is written) and fails at the end.
                self.failures
                    .borrow_mut()
                    .push(format!("{}: {line}", tool.label()));
                format!("FAILED: {line}")
            } else {
                format!("failed: {line}")
            }
        })
    }

    /// Marks the start of a workload (for the load average its table shows).
    fn begin(&self) {
        *self.load_start.borrow_mut() = load_average();
    }

    /// A note for the next table.
    fn note(&self, s: String) {
        self.notes.borrow_mut().push(s);
    }

    /// Records how a target fared: `met` is None when the figure is missing (a peer absent).
    fn verdict(&self, target: String, measured: String, met: Option<bool>) {
        self.targets.borrow_mut().push(Verdict {
            target,
            measured,
            met,
        });
    }

    /// The notes gathered since the last table, as a list.
    fn take_notes(&self) -> String {
        self.notes
            .borrow_mut()
            .drain(..)
            .map(|n| format!("\n- {n}\n"))
            .collect()
    }
}

/// One of the targets (issue 8), as this run measured it.
struct Verdict {
    target: String,
    measured: String,
    met: Option<bool>,
}

/// The verdict on `c` against `ok`, with the figure and its unit.
fn against(c: &Cell, prec: usize, unit: &str, ok: impl Fn(f64) -> bool) -> (String, Option<bool>) {
    match c {
        Ok(v) => (
            format!("{} {unit}", cell(c, prec)).trim().to_string(),
            Some(ok(*v)),
        ),
        Err(_) => (cell(c, prec), None),
    }
}

/// The table of verdicts; with `REPLITED_BENCH_STRICT=1` a target missed fails the run.
fn targets(w: &mut World) {
    let verdicts = std::mem::take(&mut *w.targets.borrow_mut());
    if verdicts.is_empty() {
        return;
    }
    let strict = std::env::var("REPLITED_BENCH_STRICT").is_ok_and(|v| v == "1");
    let mut t = String::from(
        "\n### The targets, as this run measured them\n\n| target | measured | verdict |\n|---|---|---|\n",
    );
    for v in &verdicts {
        let verdict = match v.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "n/a",
        };
        let _ = writeln!(t, "| {} | {} | {verdict} |", v.target, v.measured);
        if strict && v.met == Some(false) {
            w.failures
                .borrow_mut()
                .push(format!("target not met: {}: {}", v.target, v.measured));
        }
    }
    if w.opts.test {
        t.push_str("\n(`--test`: tiny sizes and rates; the verdicts only show that each figure is there.)\n");
    }
    w.out(&t);
}

/// A tool running: primary and replica (in `pair`), and what observes it.
struct Running {
    tool: Tool,
    pair: Pair,
    /// Object arrivals in the tool's bucket (tools with an object store).
    watch: Option<ObjectWatch>,
    /// Request counters in front of the S3 server: the primary's and the replica's.
    proxies: Option<(CountingProxy, CountingProxy)>,
}

/// Where a run's counters stood.
struct Mark {
    at: Instant,
    cpu: (u64, Option<u64>),
    req: Option<(Counts, Counts)>,
}

/// CPU (% of one core, primary and replica), requests (primary, replica) between two marks.
struct Usage {
    cpu_primary: f64,
    cpu_replica: Option<f64>,
    req: Option<(Counts, Counts)>,
    secs: f64,
}

fn pid(c: &Option<Child>) -> Option<u32> {
    c.as_ref().map(|c| c.id())
}

impl Running {
    fn mark(&self) -> Mark {
        let p = pid(&self.pair.primary).unwrap();
        Mark {
            at: Instant::now(),
            cpu: (cpu_ticks(p), pid(&self.pair.replica).map(cpu_ticks)),
            req: self.proxies.as_ref().map(|(a, b)| (a.counts(), b.counts())),
        }
    }

    fn usage(&self, from: &Mark) -> Usage {
        let to = self.mark();
        let secs = to.at.duration_since(from.at).as_secs_f64();
        let pct = |a: u64, b: u64| (b - a) as f64 / 100.0 / secs * 100.0;
        Usage {
            cpu_primary: pct(from.cpu.0, to.cpu.0),
            cpu_replica: from.cpu.1.zip(to.cpu.1).map(|(a, b)| pct(a, b)),
            req: from
                .req
                .as_ref()
                .zip(to.req.as_ref())
                .map(|(a, b)| (since(&b.0, &a.0), since(&b.1, &a.1))),
            secs,
        }
    }

    /// Notes how often our replica had to be rebuilt from the backup during `what` (a
    /// rebuild replaces the database file: a connection kept open goes on reading the old one).
    fn rebuilds(&self, w: &World, what: &str) {
        if !self.tool.ours() {
            return;
        }
        let log = fs::read_to_string(self.pair.dir.path().join("replica.log")).unwrap_or_default();
        let n = log.matches("the replica must be rebuilt").count();
        if n > 0 {
            let why = log
                .lines()
                .find(|l| l.contains("the replica must be rebuilt"))
                .and_then(|l| l.split_once("must be rebuilt: "))
                .map_or("", |(_, r)| r.split(" db=").next().unwrap_or(""));
            w.note(format!(
                "{}, {what}: the replica was rebuilt from the backup {n} time(s) ({why})",
                self.tool.label()
            ));
        }
    }

    fn peak_rss(&self) -> Cell {
        pid(&self.pair.primary)
            .and_then(peak_rss_mb)
            .ok_or_else(|| "primary gone".to_string())
    }

    /// Whether an object appeared at or after `t` (true for tools without an object store).
    fn durable_after(&self, t: Instant) -> bool {
        self.watch
            .as_ref()
            .is_none_or(|w| w.first_at_or_after(t).is_some())
    }

    /// Commits `n` rows at `rate` (0: as fast as possible) and waits for the replica and the
    /// store to have the last one.
    fn write(&self, rate: u32, n: usize, payload: Payload, limit: Duration) -> Trace {
        write_and_read(
            &self.pair.pdb,
            Some((&self.pair.rdb, self.tool.reader())),
            rate,
            n,
            payload,
            &|last| self.durable_after(last),
            limit,
        )
    }

    /// Commit → durable per transaction, or why there is none.
    fn durable(&self, t: &Trace) -> Result<Vec<Option<Instant>>, String> {
        match &self.watch {
            Some(w) => Ok(w.durable(&t.commits)),
            None => Err(NO_BACKUP.to_string()),
        }
    }
}

/// Waits for `needle` in `log`, failing at once if `child` exits.
fn wait_up(child: &mut Option<Child>, log: &Path, needle: &str, limit: Duration) {
    let c = child.as_mut().unwrap();
    let text = || fs::read_to_string(log).unwrap_or_default();
    let ok = wait_for(limit, || {
        let up = text().contains(needle);
        assert!(
            up || c.try_wait().unwrap().is_none(),
            "exited before {needle:?}: {}",
            last_lines(&text(), 3)
        );
        up
    });
    assert!(
        ok,
        "{needle:?} not logged within {limit:?}: {}",
        last_lines(&text(), 3)
    );
}

/// The S3 credentials of the server, for the peers' environment.
fn aws_env(s: &S3Server, c: &mut Command) {
    c.env("AWS_ACCESS_KEY_ID", &s.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s.secret_key)
        .env("AWS_REGION", &s.region)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_COLOR", "1");
}

fn spawn_logged(mut c: Command, log: &Path) -> Child {
    let f = fs::File::create(log).unwrap();
    c.stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {c:?}: {e}"))
}

/// replited's `[[database.replicate]]` block for an S3 bucket at `endpoint`.
fn s3_target(w: &World, endpoint: &str, bucket: &str) -> String {
    format!(
        "[[database.replicate]]\nname = \"s3\"\n[database.replicate.params]\ntype = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\nroot = \"backups\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        w.s3.access_key, w.s3.secret_key
    )
}

/// Starts `tool` on a new database (with one row) and waits until its replica has it.
fn start(w: &World, tool: Tool) -> Running {
    match tool {
        Tool::Ours | Tool::Ours1s => {
            let bucket = w.bucket("ours");
            let watch = ObjectWatch::start(&w.bucket_dir(&bucket));
            let proxies = (
                CountingProxy::start(&w.s3.endpoint),
                CountingProxy::start(&w.s3.endpoint),
            );
            let keys = if tool == Tool::Ours1s {
                "sync-interval = \"1s\"\n"
            } else {
                ""
            };
            let block = s3_target(w, &proxies.0.endpoint, &bucket);
            let pair = Pair::ours_with("replited-bench-peers", keys, &|_| block.clone());
            Running {
                tool,
                pair,
                watch: Some(watch),
                proxies: Some(proxies),
            }
        }
        Tool::Fork => Running {
            tool,
            pair: Pair::peer(w.fork.as_ref().unwrap()),
            watch: None,
            proxies: None,
        },
        Tool::Walrust => start_walrust(w),
    }
}

fn start_walrust(w: &World) -> Running {
    let exe = w.walrust.as_ref().unwrap();
    let (dir, pdb, rdb) = Pair::dirs("replited-bench-walrust");
    {
        let c = rusqlite::Connection::open(&pdb).unwrap();
        c.execute("INSERT INTO t (v) VALUES (x'00')", []).unwrap();
    }
    let bucket = w.bucket("walrust");
    let watch = ObjectWatch::start(&w.bucket_dir(&bucket));
    let proxies = (
        CountingProxy::start(&w.s3.endpoint),
        CountingProxy::start(&w.s3.endpoint),
    );
    let (plog, rlog) = (
        dir.path().join("primary.log"),
        dir.path().join("replica.log"),
    );
    let mut pair = Pair::unstarted(dir, pdb, rdb, None);
    let mut c = Command::new(exe);
    c.arg("watch")
        .arg(&pair.pdb)
        .args(["-b", &format!("s3://{bucket}/w"), "--no-metrics"])
        .args(["--endpoint", &proxies.0.endpoint]);
    aws_env(&w.s3, &mut c);
    pair.primary = Some(spawn_logged(c, &plog));
    wait_up(
        &mut pair.primary,
        &plog,
        "shadow mode running",
        Duration::from_secs(60),
    );
    // walrust uploads a second start-up snapshot just after it logs that it runs; a replica
    // started in between can get stuck for good ("TXID gap in incremental chain … and no
    // snapshot at or past TXID 3"), so it starts 2 s later, as an operator's would.
    std::thread::sleep(Duration::from_secs(2));
    let mut c = Command::new(exe);
    c.args(["replicate", &format!("s3://{bucket}/w/data"), "--local"])
        .arg(&pair.rdb)
        .args(["--interval", WALRUST_POLL])
        .args(["--endpoint", &proxies.1.endpoint]);
    aws_env(&w.s3, &mut c);
    pair.replica = Some(spawn_logged(c, &rlog));
    wait_immutable(
        &pair.rdb,
        1,
        Duration::from_secs(60),
        &format!(
            "the replica never bootstrapped: {}",
            last_lines(&fs::read_to_string(&rlog).unwrap_or_default(), 2)
        ),
    );
    Running {
        tool: Tool::Walrust,
        pair,
        watch: Some(watch),
        proxies: Some(proxies),
    }
}

// ---------------------------------------------------------------------------------------------
// Figures and their cells.

fn cell(c: &Cell, prec: usize) -> String {
    match c {
        Ok(v) if v.is_finite() => format!("{v:.prec$}"),
        Ok(_) => "—".to_string(),
        Err(r) if r.is_empty() => "n/a".to_string(),
        Err(r) => format!("n/a ({r})"),
    }
}

/// The median over rounds of the rounds that have the figure (NaN: not measured, "—"); else
/// the first reason.
fn med(cells: &[Cell]) -> Cell {
    let ok: Vec<f64> = cells.iter().filter_map(|c| c.clone().ok()).collect();
    let mut ok: Vec<f64> = if ok.iter().any(|v| v.is_finite()) {
        ok.into_iter().filter(|v| v.is_finite()).collect()
    } else {
        ok
    };
    if ok.is_empty() {
        return Err(cells
            .iter()
            .find_map(|c| c.clone().err())
            .unwrap_or_else(|| "no run".to_string()));
    }
    Ok(median(&mut ok))
}

/// p50 and p99 of commit → `at`, or why not (some never arrived).
fn p50_p99(
    commits: &[Instant],
    at: &Result<Vec<Option<Instant>>, String>,
    what: &str,
) -> (Cell, Cell) {
    match at {
        Err(r) => (Err(r.clone()), Err(r.clone())),
        Ok(at) => {
            let l = Lag::of(commits, at);
            if l.seen < l.n {
                let r = format!("{} of {} {what}", l.seen, l.n);
                (Err(r.clone()), Err(r))
            } else {
                (Ok(l.p50), Ok(l.p99))
            }
        }
    }
}

fn per_1000(req: &Option<(Counts, Counts)>, n: usize, replica: bool) -> Cell {
    match req {
        None => Err(NO_STORE.to_string()),
        Some((p, r)) => {
            let c = if replica { r } else { p };
            Ok(c.values().sum::<u64>() as f64 * 1000.0 / n as f64)
        }
    }
}

fn kinds(c: &Counts) -> String {
    if c.is_empty() {
        return "none".to_string();
    }
    c.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn replica_cpu(u: &Usage) -> Cell {
    u.cpu_replica.ok_or_else(|| "no replica".to_string())
}

/// Rounds of `tools`, the order rotating each round; `f` measures one tool once.
fn alternate<T>(
    w: &World,
    tools: &[Tool],
    rounds: usize,
    mut f: impl FnMut(Tool) -> T,
) -> Vec<(Tool, Vec<Result<T, String>>)> {
    let mut out: Vec<(Tool, Vec<Result<T, String>>)> =
        tools.iter().map(|t| (*t, Vec::new())).collect();
    for r in 0..rounds {
        for k in 0..tools.len() {
            let i = (k + r) % tools.len();
            let tool = tools[i];
            eprintln!("peers: {} round {}", tool.label(), r + 1);
            let res = w.attempt(tool, || f(tool));
            if let Err(e) = &res {
                eprintln!("peers: {}: {e}", tool.label());
            }
            out[i].1.push(res);
        }
    }
    out
}

/// One figure over the rounds of a tool.
fn over<T>(runs: &[Result<T, String>], f: impl Fn(&T) -> Cell) -> Cell {
    let cells: Vec<Cell> = runs
        .iter()
        .map(|r| r.as_ref().map_err(|e| e.clone()).and_then(&f))
        .collect();
    med(&cells)
}

/// One figure over the rounds of a tool, formatted; a round that ran but lacks the figure
/// while others have it is named beside the median of the others.
fn fig<T>(runs: &[Result<T, String>], prec: usize, f: impl Fn(&T) -> Cell) -> String {
    let mut text = cell(&over(runs, &f), prec);
    let missing = runs
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().ok().and_then(|r| f(r).err()).map(|e| (i, e)));
    if let (Some((i, e)), true) = (missing, over(runs, &f).is_ok()) {
        let _ = write!(text, " (round {}: {e})", i + 1);
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Workload 1: paced single-row commits; as fast as possible.

struct RateRun {
    n: usize,
    achieved: f64,
    durable: (Cell, Cell),
    visible: (Cell, Cell),
    usage: Usage,
    rss: Cell,
}

fn rate_run(w: &World, tool: Tool, rate: u32) -> RateRun {
    let n = ((rate as f64 * w.opts.secs) as usize).max(1);
    let r = start(w, tool);
    let m = r.mark();
    let t = r.write(rate, n, Payload::Random(100), w.opts.limit);
    r.rebuilds(w, &format!("{rate} tx/s"));
    let usage = r.usage(&m);
    let rss = r.peak_rss();
    let last = t.commits[n - 1].duration_since(t.t0).as_secs_f64();
    let seen = Ok(t.seen.clone());
    let (d50, d99) = p50_p99(&t.commits, &r.durable(&t), "durable in time");
    let (v50, v99) = p50_p99(&t.commits, &seen, "visible in time");
    let what = format!("{rate} tx/s");
    RateRun {
        n,
        achieved: n as f64 / last.max(1e-9),
        durable: (must(w, tool, &what, d50), must(w, tool, "", d99)),
        visible: (must(w, tool, &what, v50), must(w, tool, "", v99)),
        usage,
        rss,
    }
}

fn rates(w: &mut World) {
    let tools = w.tools();
    let rates = w.opts.rates.clone();
    for rate in rates {
        w.begin();
        let runs = alternate(w, &tools, w.opts.rounds, |t| rate_run(w, t, rate));
        let n = ((rate as f64 * w.opts.secs) as usize).max(1);
        w.preamble(&format!(
            "{rate} transactions/s: single-row commits for {n} transactions ({})",
            rounds_text(w.opts.rounds)
        ));
        let mut t = String::new();
        t.push_str("| tool | achieved tx/s | commit → durable p50 (ms) | p99 (ms) | commit → visible on the replica p50 (ms) | p99 (ms) | replica reader | primary CPU (% of a core) | replica CPU (%) | primary peak RSS (MB) | requests / 1,000 tx: primary | replica |\n");
        t.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        let mut notes = String::new();
        for (tool, rs) in &runs {
            t.push_str(&row(
                tool.label(),
                rs,
                vec![
                    fig(rs, 0, |r| Ok(r.achieved)),
                    fig(rs, 2, |r| r.durable.0.clone()),
                    fig(rs, 2, |r| r.durable.1.clone()),
                    fig(rs, 2, |r| r.visible.0.clone()),
                    fig(rs, 2, |r| r.visible.1.clone()),
                    reader_text(*tool).to_string(),
                    fig(rs, 1, |r| Ok(r.usage.cpu_primary)),
                    fig(rs, 1, |r| replica_cpu(&r.usage)),
                    fig(rs, 1, |r| r.rss.clone()),
                    fig(rs, 1, |r| per_1000(&r.usage.req, r.n, false)),
                    fig(rs, 1, |r| per_1000(&r.usage.req, r.n, true)),
                ],
            ));
            request_notes(
                &mut notes,
                *tool,
                rs.iter().map(|r| r.as_ref().ok().map(|r| &r.usage)),
            );
            failure_notes(&mut notes, *tool, rs);
        }
        notes.push_str(&w.take_notes());
        w.out(&t);
        w.out(&notes);
        // The targets are set at 1,000 tx/s (the one rate of a `--test` run).
        if rate == 1000 || w.opts.test {
            rate_verdicts(w, rate, &runs);
        }
    }
    sustained(w, &tools);
}

/// Lag p99 < 10 ms and ten times lower than every peer's; < 5 % of a core.
fn rate_verdicts(w: &World, rate: u32, runs: &[(Tool, Vec<Result<RateRun, String>>)]) {
    let p99 = |tool: Tool| -> Cell {
        runs.iter().find(|(t, _)| *t == tool).map_or_else(
            || Err("not run".to_string()),
            |(_, rs)| over(rs, |r| r.visible.1.clone()),
        )
    };
    let ours = p99(Tool::Ours);
    let (measured, met) = against(&ours, 2, "ms", |v| v < 10.0);
    w.verdict(
        format!(
            "replica lag p99 < 10 ms at {rate} tx/s on loopback ({})",
            Tool::Ours.label()
        ),
        measured,
        met,
    );
    for peer in [Tool::Fork, Tool::Walrust] {
        let theirs = p99(peer);
        let ratio = match (&ours, &theirs) {
            (Ok(o), Ok(t)) => Ok(t / o),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        let (mut measured, met) = against(&ratio, 0, "×", |r| r >= 10.0);
        if let Ok(t) = &theirs {
            let _ = write!(measured, " (its p99 {t:.2} ms)");
        }
        w.verdict(
            format!("… ten times lower than {}", peer.label()),
            measured,
            met,
        );
    }
    for (tool, rs) in runs.iter().filter(|(t, _)| t.ours()) {
        let cpu = over(rs, |r| Ok(r.usage.cpu_primary));
        let (measured, met) = against(&cpu, 1, "%", |c| c < 5.0);
        w.verdict(
            format!(
                "primary CPU < 5 % of a core at {rate} tx/s ({})",
                tool.label()
            ),
            measured,
            met,
        );
    }
}

/// replited must have every figure: a missing one is marked FAILED and recorded (with
/// `what`; "" for a figure whose failure the previous one recorded), and the bench fails once
/// the report is written.
fn must(w: &World, tool: Tool, what: &str, c: Cell) -> Cell {
    match c {
        Err(e) if tool.ours() => {
            if !what.is_empty() {
                w.failures
                    .borrow_mut()
                    .push(format!("{}, {what}: {e}", tool.label()));
            }
            Err(format!("FAILED: {e}"))
        }
        c => c,
    }
}

fn reader_text(t: Tool) -> &'static str {
    match t.reader() {
        Reader::Open => "one connection kept open",
        Reader::Immutable => "a new `immutable=1` connection per poll",
    }
}

/// Requests by kind, from each tool's first successful round.
fn request_notes<'a>(
    notes: &mut String,
    tool: Tool,
    usages: impl Iterator<Item = Option<&'a Usage>>,
) {
    if let Some(u) = usages.flatten().next() {
        if let Some((p, r)) = &u.req {
            let _ = writeln!(
                notes,
                "\n- {}: requests in the first round, primary: {}; replica: {} ({:.1} s)",
                tool.label(),
                kinds(p),
                kinds(r),
                u.secs
            );
        }
    }
}

/// The rounds that failed, when others did not (a tool that never ran has its reason in its
/// row).
fn failure_notes<T>(notes: &mut String, tool: Tool, rs: &[Result<T, String>]) {
    if rs.iter().all(|r| r.is_err()) {
        return;
    }
    for (i, r) in rs.iter().enumerate() {
        if let Err(e) = r {
            let _ = writeln!(notes, "\n- {}, round {}: {e}", tool.label(), i + 1);
        }
    }
}

/// A table row: the tool's cells, or its reason once when every round failed.
fn row<T>(label: &str, rs: &[Result<T, String>], mut cells: Vec<String>) -> String {
    if let (true, Some(Err(e))) = (rs.iter().all(|r| r.is_err()), rs.first()) {
        let k = cells.len();
        cells = vec![format!("n/a ({e})")];
        cells.resize(k, "n/a".to_string());
    }
    format!("| {label} | {} |\n", cells.join(" | "))
}

/// The writer as fast as it can for n transactions: n / (time until the last one is durable,
/// and visible on the replica); SQLite alone (no tool) is the ceiling.
fn sustained(w: &mut World, tools: &[Tool]) {
    w.begin();
    let n = w.opts.sustained_n;
    let limit = w.opts.limit;
    let alone: Vec<Cell> = (0..w.opts.rounds)
        .map(|_| {
            let (dir, pdb, _) = Pair::dirs("replited-bench-alone");
            let t = write_and_read(&pdb, None, 0, n, Payload::Random(100), &|_| true, limit);
            drop(dir);
            Ok(n as f64 / t.commits[n - 1].duration_since(t.t0).as_secs_f64())
        })
        .collect();
    let alone = med(&alone);
    let runs = alternate(w, tools, w.opts.rounds, |tool| {
        let r = start(w, tool);
        let t = r.write(0, n, Payload::Random(100), limit);
        r.rebuilds(w, "as fast as possible");
        let secs = |x: Option<Instant>| -> Cell {
            x.map(|x| n as f64 / x.duration_since(t.t0).as_secs_f64())
                .ok_or_else(|| format!("not all {n} in {} s", limit.as_secs()))
        };
        let committed = n as f64 / t.commits[n - 1].duration_since(t.t0).as_secs_f64();
        let durable = r.durable(&t).and_then(|d| secs(d[n - 1]));
        let visible = secs(t.seen[n - 1]);
        let durable = must(w, tool, "as fast as possible, durable", durable);
        let visible = must(w, tool, "as fast as possible, visible", visible);
        (committed, durable, visible)
    });
    w.preamble(&format!(
        "highest sustained rate: {n} single-row transactions as fast as the writer can ({})",
        rounds_text(w.opts.rounds)
    ));
    let mut t = String::new();
    t.push_str("| tool | committed (tx/s) | all durable (tx/s) | all visible on the replica (tx/s) | visible ÷ SQLite alone |\n|---|---|---|---|---|\n");
    let _ = writeln!(
        t,
        "| SQLite alone (the same writer, no tool) | {} | — | — | 1 |",
        cell(&alone, 0)
    );
    let mut notes = String::new();
    for (tool, rs) in &runs {
        let vis = over(rs, |r| r.2.clone());
        let ratio = match (&vis, &alone) {
            (Ok(v), Ok(a)) => Ok(v / a),
            _ => Err(String::new()),
        };
        if *tool == Tool::Ours {
            let (mut measured, met) = against(&vis, 0, "tx/s", |v| v >= 20_000.0);
            let _ = write!(measured, " ({} of SQLite alone)", cell(&ratio, 2));
            w.verdict(
                format!(
                    "≥ 20,000 single-row tx/s replicated, all visible on the replica ({})",
                    tool.label()
                ),
                measured,
                met,
            );
        }
        t.push_str(&row(
            tool.label(),
            rs,
            vec![
                fig(rs, 0, |r| Ok(r.0)),
                fig(rs, 0, |r| r.1.clone()),
                fig(rs, 0, |r| r.2.clone()),
                cell(&ratio, 2),
            ],
        ));
        failure_notes(&mut notes, *tool, rs);
    }
    notes.push_str(&w.take_notes());
    w.out(&t);
    w.out(&notes);
}

// ---------------------------------------------------------------------------------------------
// Workload 2: bulk load.

struct BulkRun {
    durable: Cell,
    visible: Cell,
    usage: Usage,
    rss: Cell,
}

fn bulk(w: &mut World) {
    w.begin();
    let (rows, size) = (w.opts.bulk_rows, w.opts.bulk_row_bytes);
    let mb = (rows * size) as f64 / 1e6;
    let limit = w.opts.limit;
    let tools = w.tools();
    let runs = alternate(w, &tools, w.opts.rounds, |tool| {
        let r = start(w, tool);
        let m = r.mark();
        let t = r.write(0, rows, Payload::Random(size), limit);
        r.rebuilds(w, "bulk load");
        let usage = r.usage(&m);
        let rate = |x: Option<Instant>| -> Cell {
            x.map(|x| mb / x.duration_since(t.t0).as_secs_f64())
                .ok_or_else(|| format!("not all within {} s", limit.as_secs()))
        };
        let durable = r.durable(&t).and_then(|d| rate(d[rows - 1]));
        let visible = rate(t.seen[rows - 1]);
        let durable = must(w, tool, "bulk load, durable", durable);
        let visible = must(w, tool, "bulk load, visible", visible);
        BulkRun {
            durable,
            visible,
            usage,
            rss: r.peak_rss(),
        }
    });
    // The physical references: SQLite alone, then copies of the file it wrote.
    let mut alone = Vec::new();
    let mut copies: Vec<(&str, Vec<Cell>)> =
        copy_methods().iter().map(|m| (*m, Vec::new())).collect();
    for _ in 0..w.opts.rounds {
        let (dir, pdb, _) = Pair::dirs("replited-bench-alone");
        let t = write_and_read(&pdb, None, 0, rows, Payload::Random(size), &|_| true, limit);
        alone.push(Ok(
            mb / t.commits[rows - 1].duration_since(t.t0).as_secs_f64()
        ));
        checkpoint(&pdb);
        let bytes = fs::metadata(&pdb).unwrap().len() as f64;
        for (m, v) in copies.iter_mut() {
            let out = dir.path().join("copy.db");
            v.push(copy(m, &pdb, &out, dir.path()).map(|r| bytes / 1e6 / r.secs));
            let _ = fs::remove_file(&out);
        }
    }
    w.preamble(&format!(
        "bulk load: {rows} transactions of {} KB of random bytes, {mb:.0} MB, as fast as possible ({})",
        size / 1000,
        rounds_text(w.opts.rounds)
    ));
    let mut t = String::new();
    t.push_str("| tool | MB/s until all durable | MB/s until all visible on the replica | primary CPU (% of a core) | primary peak RSS (MB) | requests: primary | replica |\n|---|---|---|---|---|---|---|\n");
    let mut notes = String::new();
    for (tool, rs) in &runs {
        let total = |replica: bool| {
            over(rs, |r| match &r.usage.req {
                None => Err(NO_STORE.to_string()),
                Some((p, q)) => Ok((if replica { q } else { p }).values().sum::<u64>() as f64),
            })
        };
        t.push_str(&row(
            tool.label(),
            rs,
            vec![
                fig(rs, 1, |r| r.durable.clone()),
                fig(rs, 1, |r| r.visible.clone()),
                fig(rs, 1, |r| Ok(r.usage.cpu_primary)),
                fig(rs, 1, |r| r.rss.clone()),
                cell(&total(false), 0),
                cell(&total(true), 0),
            ],
        ));
        failure_notes(&mut notes, *tool, rs);
    }
    let _ = writeln!(
        t,
        "| SQLite alone: the same commits, no tool (MB/s committed) | {} | — | — | — | — | — |",
        cell(&med(&alone), 1)
    );
    for (m, v) in &copies {
        let _ = writeln!(
            t,
            "| then {m} of the {mb:.0} MB database file (MB/s of file) | {} | — | — | — | — | — |",
            cell(&med(v), 1)
        );
    }
    notes.push_str(&w.take_notes());
    w.out(&t);
    w.out(&notes);
}

fn checkpoint(db: &Path) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The physical copies.

fn copy_methods() -> [&'static str; 3] {
    [
        "`cp` + fsync",
        "`VACUUM INTO` (rusqlite) + fsync",
        "sqlite3 `.backup` + fsync",
    ]
}

fn fsync(p: &Path) {
    fs::File::open(p).unwrap().sync_all().unwrap();
}

/// Copies `src` to `out` by `method`, timed with the final fsync.
fn copy(method: &str, src: &Path, out: &Path, dir: &Path) -> Result<observe::Ran, String> {
    let log = dir.join("copy.log");
    let t = Instant::now();
    let mut ran = if method.starts_with("`cp`") {
        run_measured(Command::new("cp").arg(src).arg(out), &log)
    } else if method.starts_with("`VACUUM") {
        let c = rusqlite::Connection::open(src).unwrap();
        c.execute("VACUUM INTO ?1", [out.to_str().unwrap()])
            .unwrap();
        observe::Ran {
            ok: true,
            secs: 0.0,
            peak_rss_mb: f64::NAN,
            output: String::new(),
        }
    } else {
        let ran = Command::new("sqlite3").arg("--version").output();
        if !ran.is_ok_and(|o| o.status.success()) {
            return Err("the sqlite3 shell is not installed".to_string());
        }
        run_measured(
            Command::new("sqlite3")
                .arg(src)
                .arg(format!(".backup '{}'", out.display())),
            &log,
        )
    };
    if !ran.ok {
        return Err(format!("failed: {}", last_lines(&ran.output, 2)));
    }
    fsync(out);
    ran.secs = t.elapsed().as_secs_f64();
    Ok(ran)
}

// ---------------------------------------------------------------------------------------------
// Workload 3: restore of a large database.

/// The command that restores into a path.
type RestoreCommand<'a> = dyn Fn(&Path) -> Command + 'a;

/// A way to restore the database: its name and the command (None: a physical copy).
struct Restorer<'a> {
    name: String,
    /// Snapshot to the store, MB/s (or why not).
    backup: Cell,
    cmd: Option<Box<RestoreCommand<'a>>>,
    tool: Option<Tool>,
    /// The last row the restored database must have.
    rows: i64,
}

fn restore(w: &mut World) {
    w.begin();
    let (title, table) = restore_table(w);
    w.preamble(&title);
    w.out(&table);
}

/// Builds the database, lets each tool back it up, restores alternately; (title, table).
fn restore_table(w: &World) -> (String, String) {
    let mb = w.opts.restore_mb;
    let dir = tempfile::Builder::new()
        .prefix("replited-bench-peers-restore")
        .tempdir_in(bench_dir())
        .unwrap();
    let d = dir.path().to_path_buf();
    let db = d.join("data.db");

    // walrust, the same rows loaded while it watches (incremental LTX files rather than a
    // start-up snapshot), with its recommended wal_autocheckpoint = 0 on the loading
    // connection; first, before anything else of this workload is on the disk.
    let live = w.attempt(Tool::Walrust, || {
        let bucket = w.bucket("restore-walrust-live");
        fs::create_dir_all(d.join("live")).unwrap();
        let ldb = d.join("live/data.db");
        new_db(&ldb);
        let watch = ObjectWatch::start(&w.bucket_dir(&bucket));
        let mut c = Command::new(w.walrust.as_ref().unwrap());
        c.args(walrust_watch(w, &ldb, &bucket));
        aws_env(&w.s3, &mut c);
        let log = d.join("live.log");
        let mut child = Stopped(Some(spawn_logged(c, &log)));
        wait_up(
            &mut child.0,
            &log,
            "shadow mode running",
            Duration::from_secs(60),
        );
        let conn = rusqlite::Connection::open(&ldb).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        fill_rows(&conn, mb);
        // Done when nothing more arrives in the bucket for 3 s.
        let quiet = wait_for(w.opts.long, || {
            watch
                .last()
                .is_some_and(|t| t.elapsed() > Duration::from_secs(3))
        });
        drop(child);
        drop(conn);
        assert!(quiet, "uploads never ended");
        let rows = immutable_max_id(&ldb);
        // Only its backup is needed from here on (the disk may be small).
        fs::remove_dir_all(d.join("live")).unwrap();
        (Err("—".to_string()), walrust_restore(w, &bucket), rows)
    });

    eprintln!("peers: building a {mb} MB database");
    fill_db(&db, mb);
    let bytes = fs::metadata(&db).unwrap().len();
    let rows = immutable_max_id(&db);
    let size = bytes as f64 / 1e6;
    let mut rs: Vec<Restorer> = Vec::new();

    // replited, S3 (the same server as walrust) and a local directory.
    let bucket = w.bucket("restore-ours");
    let cfg = d.join("s3.toml");
    fs::write(
        &cfg,
        format!(
            "[[database]]\ndb = \"{}\"\n{}",
            db.display(),
            s3_target(w, &w.s3.endpoint, &bucket)
        ),
    )
    .unwrap();
    let spool = d.join(".data.db-replited-spool");
    let up = snapshot(
        &d,
        bin(),
        &["-c", cfg.to_str().unwrap(), "replicate"],
        None,
        w.opts.long,
        &|log| {
            log.contains("capturing")
                && walk_files(&w.bucket_dir(&bucket))
                    .iter()
                    .any(|k| k.ends_with(".snap"))
                && walk_files(&spool).iter().all(|f| f.ends_with(".up"))
        },
    );
    let url = format!("s3://{bucket}/backups/data.db");
    rs.push(Restorer {
        name: "replited restore (from S3)".to_string(),
        backup: Ok(size / up),
        cmd: Some(Box::new(move |out: &Path| {
            w.s3.restore_command(bin(), &url, out)
        })),
        tool: Some(Tool::Ours),
        rows,
    });
    let fcfg = d.join("fs.toml");
    fs::write(
        &fcfg,
        format!(
            "[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"fs\"\nparams.type = \"fs\"\nparams.root = \"{}/backup\"\n",
            db.display(),
            d.display()
        ),
    )
    .unwrap();
    let up = snapshot(
        &d,
        bin(),
        &["-c", fcfg.to_str().unwrap(), "replicate"],
        None,
        w.opts.long,
        &|log| log.contains("capturing"),
    );
    rs.push(Restorer {
        name: "replited restore (from a local directory)".to_string(),
        backup: Ok(size / up),
        cmd: Some(Box::new(move |out: &Path| {
            let mut c = Command::new(bin());
            c.args([
                "-c",
                fcfg.to_str().unwrap(),
                "restore",
                "-o",
                out.to_str().unwrap(),
            ]);
            c
        })),
        tool: Some(Tool::Ours),
        rows,
    });

    // walrust: its snapshot at start-up is uploaded before it logs that it runs.
    let walrust = w.attempt(Tool::Walrust, || {
        let bucket = w.bucket("restore-walrust");
        let up = snapshot(
            &d,
            w.walrust.as_ref().unwrap(),
            &walrust_watch(w, &db, &bucket),
            Some(&w.s3),
            w.opts.long,
            &|log| {
                // It logs a failed snapshot and runs on.
                if let Some(l) = log.lines().find(|l| l.contains("Initial snapshot failed")) {
                    panic!("{}", last_lines(l, 1));
                }
                log.contains("shadow mode running")
            },
        );
        (Ok(size / up), walrust_restore(w, &bucket), rows)
    });
    // A failed walrust snapshot leaves its database-sized temporary copy behind.
    for e in fs::read_dir(&d).unwrap().flatten() {
        if e.file_name()
            .to_string_lossy()
            .contains(".walrust-snapshot-")
        {
            let _ = fs::remove_file(e.path());
        }
    }
    peer_restorer(&mut rs, "walrust restore (from S3)", Tool::Walrust, walrust);
    peer_restorer(
        &mut rs,
        "walrust restore (from S3), the rows loaded while it watched",
        Tool::Walrust,
        live,
    );

    // mrchypark/replited from a local directory; last, as it adds its own tables to the
    // database (the restored rows are checked in table t only). Its snapshot is complete when
    // it has written the generation's pointer.
    let fork = w.attempt(Tool::Fork, || {
        let exe = w.fork.clone().unwrap();
        let cfg = d.join("fork.toml");
        fs::create_dir_all(d.join("fork-log")).unwrap();
        fs::write(
            &cfg,
            format!(
                "[log]\nlevel = \"Info\"\ndir = \"{d}/fork-log\"\n\n[[database]]\ndb = \"{}\"\n\n[[database.replicate]]\nname = \"fs\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"{d}/fork-backup\"\n",
                db.display(),
                d = d.display()
            ),
        )
        .unwrap();
        let pointer = d.join("fork-backup/data.db/pointers/latest.json");
        let c = cfg.to_str().unwrap().to_string();
        let args = ["--config", &c, "replicate"];
        let up = snapshot(&d, &exe, &args, None, w.opts.long, &|_| pointer.exists());
        let db = db.to_str().unwrap().to_string();
        let cmd = move |out: &Path| {
            let mut x = Command::new(&exe);
            x.args(["--config", &c, "restore", "--db", &db, "--output"])
                .arg(out);
            x
        };
        (Ok(size / up), cmd, rows)
    });
    peer_restorer(
        &mut rs,
        "mrchypark/replited restore (from a local directory)",
        Tool::Fork,
        fork,
    );
    for m in copy_methods() {
        rs.push(Restorer {
            name: m.to_string(),
            backup: Err("—".to_string()),
            cmd: None,
            tool: None,
            rows,
        });
    }

    // Alternate the restores, the order rotating per round.
    let rounds = w.opts.rounds;
    let mut mbps: Vec<Vec<Cell>> = rs.iter().map(|_| Vec::new()).collect();
    let mut rss: Vec<Vec<Cell>> = rs.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for k in 0..rs.len() {
            let i = (k + r) % rs.len();
            let x = &rs[i];
            let out = d.join(format!("restored-{i}.db"));
            eprintln!("peers: {} round {}", x.name, r + 1);
            let res: Result<observe::Ran, String> = match (&x.cmd, x.tool) {
                (None, Some(_)) => Err(String::new()),
                (None, None) => copy(&x.name, &db, &out, &d),
                (Some(cmd), tool) => {
                    let tool = tool.unwrap();
                    w.attempt(tool, || {
                        let t = Instant::now();
                        let mut ran = run_measured(&mut cmd(&out), &d.join("restore.log"));
                        assert!(ran.ok, "{}", last_lines(&ran.output, 3));
                        fsync(&out);
                        ran.secs = t.elapsed().as_secs_f64();
                        let got = immutable_max_id(&out);
                        assert_eq!(got, x.rows, "the restored database's last row");
                        ran
                    })
                }
            };
            mbps[i].push(res.as_ref().map(|r| size / r.secs).map_err(|e| e.clone()));
            rss[i].push(res.map(|r| r.peak_rss_mb).map_err(|_| String::new()));
            for f in ["", "-wal", "-shm"] {
                let _ = fs::remove_file(format!("{}{f}", out.display()));
            }
        }
    }
    let cp = med(&mbps[rs.iter().position(|x| x.name.starts_with("`cp`")).unwrap()]);
    let title = format!(
        "restore of a {size:.0} MB database (rows of 1,500 random and 1,500 zero bytes; {}, alternating)",
        rounds_text(rounds)
    );
    let mut t = String::new();
    t.push_str("| method | snapshot to the store (MB/s) | restore (MB/s) | ÷ cp | peak RSS of the restoring process (MB) |\n|---|---|---|---|---|\n");
    for (i, x) in rs.iter().enumerate() {
        let m = med(&mbps[i]);
        let ratio = match (&m, &cp) {
            (Ok(a), Ok(b)) => Ok(a / b),
            _ => Err(String::new()),
        };
        if x.tool == Some(Tool::Ours) {
            if x.name.contains("local directory") {
                let (measured, met) = against(&ratio, 2, "of `cp`", |r| r >= 0.8);
                w.verdict(
                    format!("restore ≥ 80 % of `cp`'s throughput, the same {size:.0} MB on the local disk"),
                    measured,
                    met,
                );
            }
            let (measured, met) = against(&med(&rss[i]), 1, "MB", |r| r < 30.0);
            w.verdict(
                format!("peak RSS < 30 MB for a {size:.0} MB database: {}", x.name),
                measured,
                met,
            );
        }
        let backup = match &x.backup {
            Err(e) if e == "—" => "—".to_string(),
            b => cell(b, 0),
        };
        let _ = writeln!(
            t,
            "| {} | {backup} | {} | {} | {} |",
            x.name,
            cell(&m, 0),
            cell(&ratio, 2),
            cell(&med(&rss[i]), 1)
        );
    }
    t.push_str(
        "\nEvery restore is timed to its output fsynced and is checked for the last row; \
         \"snapshot to the store\" is from the tool's start on the finished database to its \
         snapshot complete in the store. The second walrust row loads the same rows while \
         `walrust watch` runs (with its recommended `wal_autocheckpoint = 0`), so that they \
         reach the bucket as incremental LTX files rather than in a start-up snapshot.\n",
    );
    (title, t)
}

/// A peer's restorer: (its snapshot MB/s, its restore command, the last row), or why not.
type PeerRestore<F> = Result<(Cell, F, i64), String>;

fn peer_restorer<'a, F: Fn(&Path) -> Command + 'a>(
    rs: &mut Vec<Restorer<'a>>,
    name: &str,
    tool: Tool,
    r: PeerRestore<F>,
) {
    let (backup, cmd, rows) = match r {
        Ok((up, cmd, rows)) => (up, Some(Box::new(cmd) as Box<RestoreCommand<'a>>), rows),
        Err(e) => (Err(e), None, 0),
    };
    rs.push(Restorer {
        name: name.to_string(),
        backup,
        cmd,
        tool: Some(tool),
        rows,
    });
}

/// `walrust watch DB` to `bucket` on the S3 server.
fn walrust_watch(w: &World, db: &Path, bucket: &str) -> Vec<String> {
    [
        "watch",
        db.to_str().unwrap(),
        "-b",
        &format!("s3://{bucket}/w"),
        "--no-metrics",
        "--endpoint",
        &w.s3.endpoint,
    ]
    .map(String::from)
    .to_vec()
}

/// `walrust restore data -o OUT` from `bucket` on the S3 server.
fn walrust_restore<'a>(w: &'a World, bucket: &str) -> impl Fn(&Path) -> Command + 'a {
    let bucket = format!("s3://{bucket}/w");
    move |out: &Path| {
        let mut c = Command::new(w.walrust.as_ref().unwrap());
        c.args(["restore", "data", "-o", out.to_str().unwrap()])
            .args(["-b", &bucket, "--endpoint", &w.s3.endpoint]);
        aws_env(&w.s3, &mut c);
        c
    }
}

/// Every file under `dir` (relative names).
fn walk_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(
                walk_files(&e.path())
                    .into_iter()
                    .map(|f| format!("{name}/{f}")),
            );
        } else {
            out.push(name);
        }
    }
    out
}

/// Starts `exe args` on the big database, waits until `ready(log)`, stops it; returns seconds.
fn snapshot<S: AsRef<std::ffi::OsStr>>(
    d: &Path,
    exe: &str,
    args: &[S],
    s3: Option<&S3Server>,
    limit: Duration,
    ready: &dyn Fn(&str) -> bool,
) -> f64 {
    let log = d.join("snapshot.log");
    let mut c = Command::new(exe);
    c.args(args);
    if let Some(s) = s3 {
        aws_env(s, &mut c);
    }
    let t = Instant::now();
    let mut child = Stopped(Some(spawn_logged(c, &log)));
    let ok = wait_for(limit, || {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let r = ready(&text);
        if !r {
            if let Some(st) = child.0.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "exited ({st}) before its snapshot: {}",
                    last_lines(&text, 3)
                );
            }
        }
        r
    });
    let secs = t.elapsed().as_secs_f64();
    drop(child);
    assert!(ok, "{exe}: no snapshot within {limit:?}");
    secs
}

/// A child stopped (SIGTERM, then wait) when dropped, on a panic too.
struct Stopped(Option<Child>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            common::stop(c);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workload 4: idle.

struct IdleRun {
    usage: Usage,
    rss: Cell,
}

fn idle(w: &mut World) {
    w.begin();
    let secs = w.opts.idle_secs;
    let (settle, limit) = (w.opts.settle, w.opts.limit);
    let tools = w.tools();
    let runs = alternate(w, &tools, 1, |tool| {
        let r = start(w, tool);
        // Data first, then quiet.
        let t = r.write(0, 1000, Payload::Random(100), limit);
        let seen = t.seen[999].ok_or_else(|| "1,000 rows never visible".to_string());
        let _ = must(w, tool, "idle, before", seen.map(|_| 0.0));
        std::thread::sleep(settle);
        let m = r.mark();
        std::thread::sleep(Duration::from_secs_f64(secs));
        IdleRun {
            usage: r.usage(&m),
            rss: r.peak_rss(),
        }
    });
    w.preamble(&format!(
        "idle: {secs:.0} s with nothing written, after 1,000 rows and {:.1} s to settle",
        settle.as_secs_f64()
    ));
    let mut t = String::new();
    t.push_str("| tool | primary CPU (% of a core) | replica CPU (%) | requests per hour: primary | replica | primary peak RSS (MB) |\n|---|---|---|---|---|---|\n");
    let mut notes = String::new();
    for (tool, rs) in &runs {
        let per_hour = |replica: bool| {
            over(rs, |r| match &r.usage.req {
                None => Err(NO_STORE.to_string()),
                Some((p, q)) => Ok((if replica { q } else { p }).values().sum::<u64>() as f64
                    * 3600.0
                    / r.usage.secs),
            })
        };
        if tool.ours() {
            for (who, cpu) in [
                ("primary", over(rs, |r| Ok(r.usage.cpu_primary))),
                ("replica", over(rs, |r| replica_cpu(&r.usage))),
            ] {
                let (measured, met) = against(&cpu, 2, "%", |c| c < 0.1);
                w.verdict(
                    format!("idle: {who} CPU < 0.1 % of a core ({})", tool.label()),
                    measured,
                    met,
                );
            }
            for (who, replica) in [("primary", false), ("replica", true)] {
                let (measured, met) = against(&per_hour(replica), 0, "per hour", |r| r <= 60.0);
                w.verdict(
                    format!(
                        "idle: {who}'s object-store requests no more than a bounded heartbeat (≤ 60 per hour; {})",
                        tool.label()
                    ),
                    measured,
                    met,
                );
            }
        }
        t.push_str(&row(
            tool.label(),
            rs,
            vec![
                fig(rs, 2, |r| Ok(r.usage.cpu_primary)),
                fig(rs, 2, |r| replica_cpu(&r.usage)),
                cell(&per_hour(false), 0),
                cell(&per_hour(true), 0),
                fig(rs, 1, |r| r.rss.clone()),
            ],
        ));
        request_notes(
            &mut notes,
            *tool,
            rs.iter().map(|r| r.as_ref().ok().map(|r| &r.usage)),
        );
        failure_notes(&mut notes, *tool, rs);
    }
    let _ = writeln!(
        notes,
        "\n- Requests per hour are those of the {secs:.0} s window × 3600 / {secs:.0}: a one-off \
         request in the window counts {:.0} times.",
        3600.0 / secs
    );
    notes.push_str(&w.take_notes());
    w.out(&t);
    w.out(&notes);
}

// ---------------------------------------------------------------------------------------------

fn method(w: &mut World) {
    let text = format!(
        "## replited beside its peers\n\n\
         How each figure is measured, the same for every tool:\n\n\
         - **Writer**: single-row INSERTs of 100 pseudo-random bytes (different in every row), WAL \
         mode, `synchronous = NORMAL`, `wal_autocheckpoint = 0` (checkpoints left to the tool, as \
         walrust recommends), paced at the rate from the benchmark process; N = rate × {secs} s. \
         Every tool starts afresh (new database, new bucket) for every measurement.\n\
         - **replited** has an `s3` target on the S3 server and a QUIC `stream` target with one \
         `replica-sidecar`; the second replited row adds `sync-interval = \"1s\"` (writes batched \
         for a second, as Litestream does by default).\n\
         - **commit → durable**: a recursive inotify watch on the tool's bucket directory of the \
         S3 server (s3s-fs on 127.0.0.1, which writes each object to a temporary file and renames \
         it into place) records when objects appear complete (IN_CLOSE_WRITE / IN_MOVED_TO); a \
         transaction counts as durable at the first such event at or after its commit returned. \
         That is a **lower bound** for every tool (any object counts, whichever transactions it \
         holds): generous to all, and loosest at high rates.\n\
         - **commit → visible**: a reader thread polls `max(id)` on the replica — through one \
         connection kept open (every 0.1 ms) where the replica tolerates it, else through a new \
         `immutable=1` connection per poll (every 1 ms), which sees only what is in the main \
         database file. mrchypark/replited's replica rewrites its `-wal` under open connections \
         (they fail and replication stops); walrust's replaces the database file by a rename on \
         every apply (a connection kept open never sees a new row).\n\
         - **CPU**: user + system time of the tool's primary (and replica) process over the run \
         (from /proc/PID/stat) ÷ wall time, % of one core. **Peak RSS**: VmHWM of the primary at \
         the end of the run; for restores, the restoring process's VmHWM polled every 5 ms while \
         it runs.\n\
         - **Requests**: every HTTP request the tool sends to the S3 server, counted by a proxy \
         in front of it (one for the primary, one for the replica) from the first commit to the \
         end of the run. replited's replica reads the bucket only to rebuild, through the \
         endpoint its primary hands it: those requests count in the primary's column.\n\
         - Rows run in rounds, the order of the tools rotating each round; figures are medians \
         over rounds. walrust's replica polls the bucket every {WALRUST_POLL} (its default is 5 \
         s). mrchypark/replited runs its low-latency profile (50 ms WAL poll) and stream only \
         (\"stream only\" in the durable columns): with a backup target beside the stream it \
         starts a new generation every few seconds under load and its replica restores again \
         each time.\n\
         - A peer that is absent or fails gets \"n/a (reason)\"; a figure replited misses is \
         marked FAILED and fails the run once this report is written. The report ends with the \
         targets and whether this run met them (`REPLITED_BENCH_STRICT=1`: a target missed \
         fails the run too).{}\n",
        if w.opts.test {
            " (`--test`: tiny sizes, one round, no `sync-interval` row.)"
        } else {
            ""
        },
        secs = w.opts.secs
    );
    w.out(&text);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let opts = Opts::from_env();
    let mut w = World::new(opts);
    let started = Instant::now();
    method(&mut w);
    if w.opts.runs("rates") {
        rates(&mut w);
    }
    if w.opts.runs("bulk") {
        bulk(&mut w);
    }
    if w.opts.runs("restore") {
        restore(&mut w);
    }
    if w.opts.runs("idle") {
        idle(&mut w);
    }
    targets(&mut w);
    let end = format!(
        "\nWhole run: {:.0} s; load average at the end: {}\n",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    w.out(&end);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-peers.md");
    fs::write(&path, &w.report).unwrap();
    eprintln!("peers: report written to {}", path.display());
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
    if w.opts.test {
        // The tiny run's figures mean nothing: the splice is checked on a copy instead.
        check_doc_splice(&doc);
    } else if w.opts.only.is_empty() {
        let text = fs::read_to_string(&doc).unwrap();
        let dated = format!("{}{}", run_stamp(), w.report);
        fs::write(&doc, splice_report(&text, &dated).unwrap()).unwrap();
        eprintln!(
            "peers: the report of every workload written into {}",
            doc.display()
        );
    } else {
        eprintln!(
            "peers: REPLITED_BENCH={}: one workload, so {} keeps the last run of all of them",
            w.opts.only,
            doc.display()
        );
    }
    let failures = w.failures.borrow();
    assert!(
        failures.is_empty(),
        "replited failed:\n{}",
        failures.join("\n")
    );
}

/// Where docs/BENCHMARKS.md holds the last report of a run of every workload.
const DOC_BEGIN: &str = "<!-- peers report: begin (benches/peers.rs writes what is between) -->";
const DOC_END: &str = "<!-- peers report: end -->";

/// `text` with the report between its markers replaced by `report`, its headings nested four
/// levels deeper (under the document's "Beside the peers"); None without both markers in order.
fn splice_report(text: &str, report: &str) -> Option<String> {
    let begin = text.find(DOC_BEGIN)? + DOC_BEGIN.len();
    let end = begin + text[begin..].find(DOC_END)?;
    let mut body = String::from("\n\n");
    for line in report.trim().lines() {
        if line.starts_with('#') {
            body.push_str("##");
        }
        body.push_str(line);
        body.push('\n');
    }
    body.push('\n');
    Some(format!("{}{body}{}", &text[..begin], &text[end..]))
}

/// The date and replited's commit, for the report written into the docs.
fn run_stamp() -> String {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "Run ended {} (UTC), replited at commit {}{}, as the harness wrote it:\n\n",
        out("date", &["-u", "+%Y-%m-%d %H:%M"]),
        out("git", &["rev-parse", "--short", "HEAD"]),
        match out("git", &["status", "--porcelain", "--", "core", "daemon"]).as_str() {
            "" | "?" => "",
            _ => " with uncommitted changes",
        }
    )
}

/// The splice, on a copy of the document: the report lands between the markers, once, and
/// everything outside them is kept byte for byte.
fn check_doc_splice(doc: &Path) {
    let text = fs::read_to_string(doc).unwrap();
    assert!(
        splice_report(&text, "x").is_some(),
        "{} lacks the markers of the peers report",
        doc.display()
    );
    let first = splice_report(&text, "## a report\n\n| a | b |").unwrap();
    let again = splice_report(&first, "## a report\n\n| a | b |").unwrap();
    assert_eq!(
        first, again,
        "writing the same report twice changes nothing"
    );
    assert!(
        first.contains("#### a report\n"),
        "headings nested under the document's"
    );
    let (head, tail) = text.split_once(DOC_BEGIN).unwrap();
    assert!(first.starts_with(head) && first.ends_with(&tail[tail.find(DOC_END).unwrap()..]));
    assert!(splice_report("no markers", "x").is_none());
}
