//! Helpers of the crash and storage-fault suites (`tests/crash.rs`, `tests/storage_faults.rs`):
//! checks that return errors instead of panicking (a long run counts its failures and goes on),
//! a memo of the load's expected states, restores, log parsing, a seeded random source.
//! Declared from a test file with `#[path = "common/faults.rs"] mod faults;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::s3::S3Server;
use crate::common::{bin, load_py};

/// xorshift64*, seeded from `CRASH_SEED` or the clock (the seed is printed, so a failing run
/// can be repeated).
pub struct Rng(u64);

impl Rng {
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    ^ u64::from(std::process::id()) << 40
            });
        eprintln!("{what}: seed {seed} (CRASH_SEED={seed} repeats it)");
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// An iteration count from `CRASH_ITERATIONS`, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Prints a result line and appends it to `$CRASH_REPORT` when set (scripts/crash-matrix
/// gathers these lines).
pub fn report(line: &str) {
    eprintln!("{line}");
    if let Ok(p) = std::env::var("CRASH_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(p) {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn py(args: &[&str]) -> Result<String, String> {
    let o = Command::new("python3")
        .arg(load_py())
        .args(args)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "load.py {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn split(s: &str) -> Result<(u64, String), String> {
    let (i, h) = s
        .split_once('\t')
        .ok_or_else(|| format!("bad state line {s:?}"))?;
    Ok((
        i.parse()
            .map_err(|e| format!("bad state line {s:?}: {e}"))?,
        h.to_string(),
    ))
}

/// (last transaction, content hash) of a database; an error when the ledger's invariant (the
/// total of every committed state) is broken or the file cannot be read.
pub fn db_state(db: &Path) -> Result<(u64, String), String> {
    split(&py(&["state", db.to_str().unwrap()])?)
}

/// The content hash after each transaction i of the load, computed once each.
#[derive(Default)]
pub struct Expected(Mutex<HashMap<u64, String>>);

impl Expected {
    pub fn hash(&self, i: u64) -> Result<String, String> {
        if let Some(h) = self.0.lock().unwrap().get(&i) {
            return Ok(h.clone());
        }
        let (_, h) = split(&py(&["expect", &i.to_string()])?)?;
        self.0.lock().unwrap().insert(i, h.clone());
        Ok(h)
    }
}

/// `PRAGMA integrity_check` through the real SQLite, without panicking.
pub fn integrity_of(db: &Path) -> Result<(), String> {
    let c = rusqlite::Connection::open(db).map_err(|e| format!("opening {}: {e}", db.display()))?;
    let r: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| format!("integrity_check of {}: {e}", db.display()))?;
    if r != "ok" {
        return Err(format!("integrity_check of {}: {r}", db.display()));
    }
    Ok(())
}

/// The database at `db` holds a state the load committed — exactly the content after some
/// transaction i, never a torn one — and passes integrity_check. Returns i.
pub fn committed_state(db: &Path, exp: &Expected) -> Result<u64, String> {
    integrity_of(db)?;
    let (i, h) = db_state(db)?;
    let want = exp.hash(i)?;
    if h != want {
        return Err(format!(
            "{} claims transaction {i} but its content is not the state after it (torn or wrong)",
            db.display()
        ));
    }
    Ok(i)
}

/// `replited restore ARGS` (no config), returning the output.
pub fn replited(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// `replited -c CONFIG restore -o OUT EXTRA...`.
pub fn restore_cfg(config: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .args(["-c", config.to_str().unwrap(), "restore", "-o"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// The txid a successful restore reached (from its last log line).
pub fn restored_txid(o: &Output) -> Option<u64> {
    let err = String::from_utf8_lossy(&o.stderr);
    let at = err.rfind("to txid ")?;
    u64::from_str_radix(err[at + 8..].get(..16)?, 16).ok()
}

pub fn err_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Removes a database file and its -wal and -shm.
pub fn remove_db(p: &Path) {
    let _ = fs::remove_file(p);
    for s in ["-wal", "-shm", "-journal"] {
        let mut q = p.as_os_str().to_owned();
        q.push(s);
        let _ = fs::remove_file(PathBuf::from(q));
    }
}

/// The highest txid a log says was made durable: "segment written … txid=N", "snapshot written
/// … txid=N" and the position capture started from.
pub fn durable_txid(log: &str) -> u64 {
    log.lines()
        .filter(|l| {
            l.contains("segment written")
                || l.contains("snapshot written")
                || l.contains("capturing ")
        })
        .filter_map(|l| {
            let at = l.find(" txid=")?;
            l[at + 6..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Polls `f` every 20 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Appends to `config` an S3 target named `s3` (prefix `backups`) in `bucket` of `s`, reached
/// at `endpoint` (the server's, or a proxy's in front of it).
pub fn add_s3_target(config: &Path, endpoint: &str, bucket: &str, s: &S3Server) {
    let mut cfg = fs::read_to_string(config).unwrap();
    cfg.push_str(&format!(
        "\n[[database.replicate]]\nname = \"s3\"\n[database.replicate.params]\ntype = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\nroot = \"backups\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        s.access_key, s.secret_key
    ));
    fs::write(config, cfg).unwrap();
}

/// Reports a suite's result line, then fails with `failures` (and `extra`) if there are any.
pub fn conclude(line: &str, failures: &[String], extra: &str) {
    report(line);
    assert!(
        failures.is_empty(),
        "failures:\n{}\n{extra}",
        failures.join("\n")
    );
}

/// Every regular file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A stored file's place in the history, from its name: (generation, last txid, is a segment).
pub fn file_rank(p: &Path) -> Option<(u64, u64, bool)> {
    let name = p.file_name()?.to_str()?;
    let generation = u64::from_str_radix(p.parent()?.file_name()?.to_str()?, 16).ok()?;
    if name.ends_with(".snap") {
        Some((
            generation,
            u64::from_str_radix(name.get(..16)?, 16).ok()?,
            false,
        ))
    } else if name.ends_with(".seg") {
        Some((
            generation,
            u64::from_str_radix(name.get(17..33)?, 16).ok()?,
            true,
        ))
    } else {
        None
    }
}

/// `GET /status` of a status server, or "" while nothing answers.
pub fn status(addr: &str) -> String {
    crate::common::http_get(addr, "/status")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// `GET /metrics`, or "".
pub fn metrics(addr: &str) -> String {
    crate::common::http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// The value of one metric line (`name{labels} value`) whose text starts with `prefix`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
