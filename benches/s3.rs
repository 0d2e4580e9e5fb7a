//! S3 benchmarks against a real S3-compatible server on 127.0.0.1 (s3s-fs, which checks
//! signatures), with the release binary:
//!
//! 1. a 1 GB database: its snapshot's upload (from replited's start to the object complete and
//!    the spool empty) and its restore from the bucket by URL, in MB/s;
//! 2. requests sent to S3 (PUT, GET, LIST, DELETE, as replited counts and logs them at exit)
//!    while single-row transactions commit at 1 and at 100 transactions/s, scaled to an hour,
//!    with the default settings and with `sync-interval = "1s"`;
//! 3. the CPU an S3 request costs over plain HTTP and over HTTPS: a backup of many small
//!    objects restored by URL from the server directly and through a TLS front (a certificate
//!    of a private CA made by `replited cert`, trusted through `SSL_CERT_FILE`), alternating;
//! 4. the CPU of `replicate` uploading each commit as it is made (the default
//!    `sync-interval = "0s"`: a PUT per commit) over plain HTTP and over HTTPS, alternating.
//!
//! `cargo bench --bench s3` runs the full sizes (`REPLITED_BENCH_S3=uploads`: section 4 alone);
//! `cargo bench -- --test` a tiny version.

#[allow(dead_code)]
#[path = "../tests/common/s3.rs"]
mod fixture;
#[path = "../tests/common/tls_front.rs"]
mod tls_front;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fixture::S3Server;

const BUCKET: &str = "replited-bench";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_replited")
}

fn bench_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-scratch");
    fs::create_dir_all(&d).unwrap();
    d
}

struct World {
    dir: tempfile::TempDir,
    db: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl World {
    fn new(s: &S3Server, extra: &str) -> World {
        let dir = tempfile::Builder::new()
            .prefix("replited-bench-s3")
            .tempdir_in(bench_dir())
            .unwrap();
        let db = dir.path().join("data.db");
        let config = dir.path().join("replited.toml");
        fs::write(
            &config,
            format!(
                "[[database]]\ndb = \"{}\"\n{extra}\n[[database.replicate]]\nname = \"s3\"\n[database.replicate.params]\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nroot = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                db.display(),
                s.endpoint,
                dir.path().file_name().unwrap().to_string_lossy(),
                s.access_key,
                s.secret_key
            ),
        )
        .unwrap();
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            .unwrap();
        let log = dir.path().join("replited.log");
        World {
            dir,
            db,
            config,
            log,
        }
    }

    fn start(&self) -> Child {
        Command::new(bin())
            .args(["-c", self.config.to_str().unwrap(), "replicate"])
            .stderr(fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap()
    }

    /// Starts `replicate` and waits until it captures.
    fn start_capturing(&self) -> Child {
        let child = self.start();
        let t = Instant::now();
        while !self.log_text().contains("capturing") {
            assert!(t.elapsed() < Duration::from_secs(60), "not capturing");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join(".data.db-replited-spool")
    }
}

fn stop(mut c: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(c.wait().unwrap().success());
}

fn files_in(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            n += if e.path().is_dir() {
                files_in(&e.path())
            } else {
                usize::from(!e.file_name().to_string_lossy().ends_with(".up"))
            };
        }
    }
    n
}

/// (upload MB/s, restore MB/s, database bytes).
fn snapshot_round_trip(s: &S3Server, mb: u64) -> (f64, f64, u64) {
    let w = World::new(s, "");
    {
        let conn = rusqlite::Connection::open(&w.db).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        let mut st = conn
            .prepare("INSERT INTO t (v) VALUES (randomblob(65536))")
            .unwrap();
        for _ in 0..mb * 16 {
            st.execute([]).unwrap();
        }
        drop(st);
        conn.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
    }
    let bytes = fs::metadata(&w.db).unwrap().len();
    let t0 = Instant::now();
    let child = w.start();
    loop {
        let done = s.keys(BUCKET).iter().any(|k| k.ends_with(".snap"))
            && w.log_text().contains("capturing")
            && files_in(&w.spool()) == 0;
        if done {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(900), "no upload");
        std::thread::sleep(Duration::from_millis(20));
    }
    let up = t0.elapsed().as_secs_f64();
    stop(child);
    let out = w.dir.path().join("restored.db");
    let prefix = w
        .dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let t1 = Instant::now();
    let o = s
        .restore_command(bin(), &format!("s3://{BUCKET}/{prefix}/data.db"), &out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let down = t1.elapsed().as_secs_f64();
    (bytes as f64 / 1e6 / up, bytes as f64 / 1e6 / down, bytes)
}

/// Requests per hour while committing at `rate` for `secs`.
fn requests(s: &S3Server, rate: u32, secs: f64, extra: &str) -> [f64; 4] {
    let w = World::new(s, extra);
    let child = w.start_capturing();
    // Start-up requests (listing, probe, first snapshot) are not counted: they are logged too,
    // so count from a baseline taken with no load.
    let conn = rusqlite::Connection::open(&w.db).unwrap();
    conn.pragma_update(None, "synchronous", "normal").unwrap();
    let n = (rate as f64 * secs) as usize;
    let t0 = Instant::now();
    for i in 0..n {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        conn.execute("INSERT INTO t (v) VALUES (randomblob(100))", [])
            .unwrap();
    }
    let wall = t0.elapsed().as_secs_f64().max(secs);
    stop(child);
    let log = w.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("S3 requests sent"))
        .unwrap_or_else(|| panic!("no request counts logged:\n{log}"));
    let count = |k: &str| -> f64 {
        let at = line.find(&format!("{k} ")).unwrap() + k.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    // Minus the start-up: 1 LIST + probe PUT/DELETE + 1 LIST (establish) + snapshot PUT.
    let per_hour = |v: f64, startup: f64| (v - startup).max(0.0) / wall * 3600.0;
    [
        per_hour(count("PUT"), 2.0),
        per_hour(count("GET"), 0.0),
        per_hour(count("LIST"), 2.0),
        per_hour(count("DELETE"), 1.0),
    ]
}

/// The user + system CPU of `c` run to its end (ms), and whether it succeeded.
fn cpu_ms(c: &mut Command) -> (f64, std::process::Output) {
    use nix::sys::resource::{getrusage, UsageWho};
    let ms = |u: nix::sys::resource::Usage| {
        let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 * 1e3 + v.tv_usec() as f64 / 1e3;
        t(u.user_time()) + t(u.system_time())
    };
    let before = ms(getrusage(UsageWho::RUSAGE_CHILDREN).unwrap());
    let o = c.output().unwrap();
    (
        ms(getrusage(UsageWho::RUSAGE_CHILDREN).unwrap()) - before,
        o,
    )
}

/// What the client trusts for the TLS front's private CA.
#[derive(Clone, Copy)]
enum Trust {
    /// `SSL_CERT_FILE` = the CA alone.
    Ca,
    /// `SSL_CERT_FILE` = the system's bundle with the CA appended (one file, no directory).
    Bundle,
    /// `SSL_CERT_FILE` = the CA and `SSL_CERT_DIR` = the system's certificate directory: what
    /// is read without either variable (the system's bundle and its directory).
    CaAndSystemDir,
}

/// How a restore reaches the bucket: a name, and HTTPS with what trust (None: plain HTTP).
const REQUEST_VARIANTS: [(&str, Option<Trust>); 4] = [
    ("http:// (s3s-fs)", None),
    ("https://, the CA alone (`SSL_CERT_FILE`)", Some(Trust::Ca)),
    (
        "https://, the system's bundle + the CA in one file (`SSL_CERT_FILE`)",
        Some(Trust::Bundle),
    ),
    (
        "https://, the CA + the system's certificate directory (`SSL_CERT_DIR=/etc/ssl/certs`, as read by default)",
        Some(Trust::CaAndSystemDir),
    ),
];

/// The system's CA bundle (Debian's, Fedora's).
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// `n` single-row transactions, 20 ms apart (each its own segment with `sync-interval = "0s"`).
fn commit_singly(db: &Path, n: u64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    for _ in 0..n {
        conn.execute("INSERT INTO t (v) VALUES (randomblob(100))", [])
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A backup of `n` single-transaction segments (nothing compacted), restored by URL `rounds`
/// times in each of [`REQUEST_VARIANTS`], rotating: (objects, median CPU ms per variant).
fn request_cpu(s: &S3Server, n: u64, rounds: usize) -> (usize, Vec<f64>) {
    let w = World::new(
        s,
        "compaction-interval = \"1h\"\nsnapshot-interval = \"1h\"",
    );
    let child = w.start_capturing();
    commit_singly(&w.db, n);
    stop(child);
    let (certs, front) = front(s, w.dir.path());
    let mut bundle = SYSTEM_BUNDLES
        .iter()
        .find_map(|p| fs::read(p).ok())
        .unwrap_or_default();
    bundle.extend(fs::read(certs.join("ca.pem")).unwrap());
    fs::write(certs.join("bundle.pem"), bundle).unwrap();
    let prefix = w.dir.path().file_name().unwrap().to_string_lossy();
    let objects = s
        .keys(BUCKET)
        .iter()
        .filter(|k| k.starts_with(&format!("{prefix}/")))
        .count();
    let k = REQUEST_VARIANTS.len();
    let mut cpu = vec![Vec::new(); k];
    for r in 0..rounds {
        for j in 0..k {
            let i = (r + j) % k;
            let (_, trust) = REQUEST_VARIANTS[i];
            let out = w.dir.path().join(format!("restored-{r}-{i}.db"));
            let mut cmd = Command::new(bin());
            cmd.args(["restore", &format!("s3://{BUCKET}/{prefix}/data.db")])
                .args(["-o", out.to_str().unwrap(), "--endpoint"])
                .arg(match trust {
                    Some(_) => &front.endpoint,
                    None => &s.endpoint,
                })
                .env("AWS_ACCESS_KEY_ID", &s.access_key)
                .env("AWS_SECRET_ACCESS_KEY", &s.secret_key)
                .env("AWS_REGION", &s.region)
                .env("SSL_CERT_FILE", certs.join("ca.pem"))
                .env_remove("SSL_CERT_DIR");
            match trust {
                Some(Trust::Bundle) => {
                    cmd.env("SSL_CERT_FILE", certs.join("bundle.pem"));
                }
                Some(Trust::CaAndSystemDir) => {
                    cmd.env("SSL_CERT_DIR", "/etc/ssl/certs");
                }
                _ => {}
            }
            let (ms, o) = cpu_ms(&mut cmd);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            cpu[i].push(ms);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (objects, cpu.into_iter().map(median).collect())
}

/// A private CA and a server certificate (made by `replited cert`) in `dir`/certs, and a TLS
/// front with that certificate before `s`: (the certificates' directory, the front).
fn front(s: &S3Server, dir: &Path) -> (PathBuf, tls_front::TlsFront) {
    let certs = dir.join("certs");
    let c = certs.to_str().unwrap();
    for args in [
        vec!["ca", "--dir", c],
        vec!["server", "--ca-dir", c, "--san", "127.0.0.1"],
    ] {
        let o = Command::new(bin())
            .arg("cert")
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let front = tls_front::TlsFront::start(
        &certs.join("primary.pem"),
        &certs.join("primary-key.pem"),
        s.endpoint.trim_start_matches("http://"),
    );
    (certs, front)
}

/// The endpoints uploads are measured through.
const UPLOAD_VARIANTS: [&str; 2] = [
    "http:// (s3s-fs)",
    "https://, the CA alone (`SSL_CERT_FILE`)",
];

/// `replicate` with the defaults (`sync-interval = "0s"`: a PUT per commit) while `n`
/// single-row transactions commit 20 ms apart, `rounds` times over each of
/// [`UPLOAD_VARIANTS`], rotating: the median CPU (ms, user + system, start-up and shutdown
/// included) of the replicate process per variant.
fn upload_cpu(s: &S3Server, n: u64, rounds: usize) -> Vec<f64> {
    let scratch = tempfile::Builder::new()
        .prefix("replited-bench-s3-certs")
        .tempdir_in(bench_dir())
        .unwrap();
    let (certs, front) = front(s, scratch.path());
    let k = UPLOAD_VARIANTS.len();
    let mut cpu = vec![Vec::new(); k];
    for r in 0..rounds {
        for j in 0..k {
            let i = (r + j) % k;
            let w = World::new(
                s,
                "compaction-interval = \"1h\"\nsnapshot-interval = \"1h\"",
            );
            if i == 1 {
                let toml = fs::read_to_string(&w.config).unwrap();
                fs::write(&w.config, toml.replace(&s.endpoint, &front.endpoint)).unwrap();
            }
            let usage = || {
                use nix::sys::resource::{getrusage, UsageWho};
                let u = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
                let t =
                    |v: nix::sys::time::TimeVal| v.tv_sec() as f64 * 1e3 + v.tv_usec() as f64 / 1e3;
                t(u.user_time()) + t(u.system_time())
            };
            let before = usage();
            let child = Command::new(bin())
                .args(["-c", w.config.to_str().unwrap(), "replicate"])
                .env("SSL_CERT_FILE", certs.join("ca.pem"))
                .env_remove("SSL_CERT_DIR")
                .stderr(fs::File::create(&w.log).unwrap())
                .spawn()
                .unwrap();
            let t = Instant::now();
            while !w.log_text().contains("capturing") {
                assert!(t.elapsed() < Duration::from_secs(60), "not capturing");
                std::thread::sleep(Duration::from_millis(20));
            }
            commit_singly(&w.db, n);
            stop(child);
            cpu[i].push(usage() - before);
            // Every commit was uploaded on its own (the count replited logs at exit).
            let log = w.log_text();
            let puts = log
                .lines()
                .rev()
                .find_map(|l| l.split("S3 requests sent: PUT ").nth(1))
                .and_then(|v| v.split(',').next()?.parse::<u64>().ok());
            assert!(
                puts.is_some_and(|p| p >= n),
                "{puts:?} PUTs for {n} commits over {}:\n{log}",
                UPLOAD_VARIANTS[i]
            );
        }
    }
    cpu.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (mb, secs) = if test { (8, 2.0) } else { (1024, 60.0) };
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let (n, rounds) = if test { (20, 1) } else { (300, 5) };
    // `REPLITED_BENCH_S3=uploads`: section 4 alone.
    if std::env::var("REPLITED_BENCH_S3").is_ok_and(|v| v == "uploads") {
        return print_upload_cpu(&s, n, rounds);
    }
    let (up, down, bytes) = snapshot_round_trip(&s, mb);
    println!(
        "### a {:.0} MB database through the local S3 server (s3s-fs)\n",
        bytes as f64 / 1e6
    );
    println!("| snapshot upload (MB/s) | restore from the bucket (MB/s) |");
    println!("|---|---|");
    println!("| {up:.0} | {down:.0} |");
    println!(
        "\n### S3 requests per hour while committing ({secs:.0} s per row, start-up excluded)\n"
    );
    println!("| settings | tx/s | PUT/h | GET/h | LIST/h | DELETE/h |");
    println!("|---|---|---|---|---|---|");
    for (name, extra) in [
        ("defaults (sync-interval 0s)", ""),
        ("sync-interval = \"1s\"", "sync-interval = \"1s\""),
    ] {
        for rate in [1, 100] {
            let r = requests(&s, rate, secs, extra);
            println!(
                "| {name} | {rate} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r[0], r[1], r[2], r[3]
            );
        }
    }
    let (objects, cpu) = request_cpu(&s, n, rounds);
    println!(
        "\n### CPU of a restore by URL of {objects} objects (single-transaction segments), median of {rounds}\n"
    );
    println!("| endpoint | restore CPU (ms) | per object (ms) |");
    println!("|---|---|---|");
    for ((name, _), ms) in REQUEST_VARIANTS.iter().zip(cpu) {
        println!("| {name} | {ms:.0} | {:.2} |", ms / objects as f64);
    }
    print_upload_cpu(&s, n, rounds);
}

fn print_upload_cpu(s: &S3Server, n: u64, rounds: usize) {
    let cpu = upload_cpu(s, n, rounds);
    println!(
        "\n### CPU of `replicate` uploading each of {n} commits as it is made (the default `sync-interval = \"0s\"`: a PUT each), median of {rounds}\n"
    );
    println!("| endpoint | replicate CPU (ms) | per commit (ms) |");
    println!("|---|---|---|");
    for (name, ms) in UPLOAD_VARIANTS.iter().zip(cpu) {
        println!("| {name} | {ms:.0} | {:.2} |", ms / n as f64);
    }
}
