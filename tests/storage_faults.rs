//! The storage-fault suite: the backup directory full (a small tmpfs filled up), read-only, or
//! not writable by replited (run as `nobody`, the directory chmod 0500); S3 answering 500s and
//! hanging (a proxy between replited and the S3 server). Each time replited keeps running,
//! says what is wrong in its log and its status (`/status`: `error_count`, `last_error`, the
//! status line; `/metrics`: `replited_errors_total`), retries, and once the fault clears the
//! backup catches up and restores exactly what the primary holds: nothing is lost.
//!
//! The default run is a few minutes; the long S3 hang (long enough for every attempt of an
//! upload to time out and the target to show as degraded) is `#[ignore]`d and run by
//! `scripts/crash-matrix`.

mod common;
#[path = "common/faults.rs"]
mod faults;
#[path = "common/s3proxy.rs"]
mod s3proxy;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::*;
use faults::*;
use s3proxy::{Mode, S3Proxy};

const BUCKET: &str = "replited-faults";

/// A tmpfs mounted for the test; unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs(dir.to_path_buf())
    }

    /// `mount -o remount,ro|rw`; a remount to read-only fails while a file is open for
    /// writing, so it is tried again for a while.
    fn remount(&self, opt: &str) {
        let start = Instant::now();
        loop {
            let o = Command::new("mount")
                .args(["-o", &format!("remount,{opt}"), self.0.to_str().unwrap()])
                .output()
                .unwrap();
            if o.status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "remount,{opt}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn sh(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 16 << 10];
    let mut n = 0;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    // The last partial chunk may have gone in; what matters is that nothing more fits.
    let _ = f.sync_all();
    n
}

/// Adds a status server to the world's config; returns its address.
fn with_http(w: &World) -> String {
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let cfg = fs::read_to_string(&w.config).unwrap();
    fs::write(&w.config, format!("{cfg}\n[http]\naddr = \"{addr}\"\n")).unwrap();
    addr
}

/// The first database of `/status`.
fn db_status(addr: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&status(addr))
        .ok()
        .and_then(|v| v["databases"].get(0).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until `/status` of the first database satisfies `f`, or fails with what it said.
fn wait_status(addr: &str, d: &Daemon, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let ok = wait_until(Duration::from_secs(60), || f(&db_status(addr)));
    assert!(
        ok,
        "/status never showed {what}: {}\n{}",
        status(addr),
        d.log_text()
    );
}

fn is_alive(d: &Daemon) -> bool {
    let stat = fs::read_to_string(format!("/proc/{}/stat", d.child.id())).unwrap_or_default();
    !stat.is_empty() && stat.split_whitespace().nth(2) != Some("Z")
}

/// The error counter of `kind` for data.db in `/metrics`.
fn errors(addr: &str, kind: &str) -> f64 {
    metric(
        &metrics(addr),
        &format!("replited_errors_total{{db=\"data.db\",kind=\"{kind}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Holds a storage fault for `hold` while a load runs, checking that replited says so and keeps
/// running; `cause` and `heal` make and clear it; `needle` is what the error says.
struct Fault<'a> {
    name: &'a str,
    needle: &'a str,
    hold: Duration,
}

/// Runs `fault` during a load of 2,000 transactions: the error is logged, counted and shown in
/// `/status` while replited keeps running; after `heal` the backup catches up. Returns
/// `replited_errors_total{kind="capture"}` at the end of the fault (errors met and retried).
fn ride_out(
    w: &World,
    d: &Daemon,
    addr: &str,
    first: u64,
    fault: Fault,
    cause: impl FnOnce(),
    heal: impl FnOnce(),
) -> f64 {
    let last = first + 1999;
    cause();
    let load = spawn_load(&w.db, first, last, &["--rate", "250"]);
    d.wait_for_log(fault.needle, Duration::from_secs(30));
    wait_status(addr, d, &format!("{} in last_error", fault.name), |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(fault.needle))
            && s["error_count"].as_u64().unwrap_or(0) > 0
            && s["status"]
                .as_str()
                .is_some_and(|l| l.contains("(retrying after an error)"))
    });
    assert!(
        errors(addr, "capture") > 0.0,
        "no capture error counted in /metrics"
    );
    std::thread::sleep(fault.hold);
    assert!(
        is_alive(d),
        "replited died on {}:\n{}",
        fault.name,
        d.log_text()
    );
    let during = errors(addr, "capture");
    let st = db_status(addr);
    eprintln!(
        "{}: during the fault /status said: error_count {}, last_error {:?}, status {:?}",
        fault.name, st["error_count"], st["last_error"], st["status"]
    );
    let frozen = st["txid"].as_u64().unwrap_or(0);
    heal();
    wait_ok(load);
    // Caught up: the error is behind it and the durable txid moved on.
    wait_status(addr, d, "the backup caught up", |s| {
        s["status"]
            .as_str()
            .is_some_and(|l| !l.contains("retrying"))
            && s["txid"].as_u64().unwrap_or(0) > frozen
    });
    during
}

/// Restores the latest backup and compares it with the primary and the load's state `n`.
fn restore_equals_primary(w: &World, n: u64) {
    let out = w.restore_ok(&format!("restored-{n}.db"));
    assert_eq!(integrity(&out), "ok");
    assert_eq!(
        state(&out),
        state(&w.db),
        "the restore differs from the primary"
    );
    assert_eq!(state(&out), expect(n));
}

/// The backup directory is a 32 MB tmpfs: filled up (ENOSPC) for 4 s, then remounted read-only
/// (EROFS) for 3 s, each during a load. replited keeps running, logs and shows the error,
/// retries, and once space is back the backup catches up and restores to the primary.
#[test]
fn full_and_read_only_backup_directory() {
    let w = World::new("snapshot-interval = \"1s\"\ncompaction-interval = \"1s\"");
    let fsys = Tmpfs::mount(&w.backup, "32m");
    let addr = with_http(&w);
    let d = w.start("auto");
    run_load(&w.db, 1, 300);
    let filler = w.backup.join("filler");
    let enospc = ride_out(
        &w,
        &d,
        &addr,
        301,
        Fault {
            name: "a full disk",
            needle: "No space left on device",
            hold: Duration::from_secs(4),
        },
        || {
            let n = fill(&filler);
            eprintln!("filled the backup tmpfs with {n} bytes");
        },
        || fs::remove_file(&filler).unwrap(),
    );
    let erofs = ride_out(
        &w,
        &d,
        &addr,
        2301,
        Fault {
            name: "a read-only file system",
            needle: "Read-only file system",
            hold: Duration::from_secs(3),
        },
        || fsys.remount("ro"),
        || fsys.remount("rw"),
    );
    let log = d.stop();
    let leftovers: Vec<_> = walk(&w.backup)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    restore_equals_primary(&w, 4300);
    report(&format!(
        "STORAGE full disk / read-only: ENOSPC for 4 s and EROFS for 3 s under a 250 tx/s load; replited kept running; replited_errors_total{{kind=\"capture\"}} {enospc} at the end of ENOSPC, {} at the end of EROFS (each error retried with backoff); {} error lines logged; restore after healing equals the primary (4300 transactions): nothing lost",
        erofs,
        log.lines().filter(|l| l.contains("ERROR")).count()
    ));
}

/// replited runs as `nobody`; its backup directory is chmod 0500 (EACCES) for 4 s during a
/// load: it keeps running, says so, retries, and loses nothing once the mode is back.
#[test]
fn backup_directory_not_writable() {
    let w = World::new("");
    let addr = with_http(&w);
    fs::create_dir_all(&w.backup).unwrap();
    sh(
        "chown",
        &["-R", "nobody:nogroup", w.dir.path().to_str().unwrap()],
    );
    let d = w.start_under(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
        ],
        "auto",
    );
    // The app runs as root; SQLite gives the files it creates (-wal, -shm) the database
    // file's owner.
    run_load(&w.db, 1, 300);
    let root = w.backup.join("data.db");
    let mut dirs: Vec<PathBuf> = walk(&root)
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.dedup();
    dirs.push(root.clone());
    let chmod = |mode: &str| {
        for dir in &dirs {
            sh("chmod", &[mode, dir.to_str().unwrap()]);
        }
    };
    let n = ride_out(
        &w,
        &d,
        &addr,
        301,
        Fault {
            name: "a directory it may not write",
            needle: "Permission denied",
            hold: Duration::from_secs(4),
        },
        || chmod("0500"),
        || chmod("0755"),
    );
    d.stop();
    restore_equals_primary(&w, 2300);
    report(&format!(
        "STORAGE permissions: backup directory chmod 0500 for 4 s under a 250 tx/s load (replited as nobody); kept running; replited_errors_total{{kind=\"capture\"}} {n} at the end of the fault (each retried); restore after healing equals the primary (2300 transactions): nothing lost"
    ));
}

// ---- S3 ------------------------------------------------------------------------------------

struct S3Rig {
    s: S3Server,
    p: S3Proxy,
    w: World,
    addr: String,
    spool: PathBuf,
}

impl S3Rig {
    /// A world with an fs target and an S3 target reached through the proxy, a status server,
    /// and `extra` lines for the database.
    fn new(extra: &str) -> S3Rig {
        let s = S3Server::start();
        s.create_bucket(BUCKET);
        let p = S3Proxy::start(&s.endpoint);
        let w = World::new(extra);
        add_s3_target(&w.config, &p.endpoint, BUCKET, &s);
        let addr = with_http(&w);
        let spool = w.dir.path().join(".data.db-replited-spool/s3");
        S3Rig {
            s,
            p,
            w,
            addr,
            spool,
        }
    }

    /// Files waiting for upload.
    fn waiting(&self) -> usize {
        spooled(&walk(&self.spool)).len()
    }

    fn restore_from_bucket(&self, n: u64) {
        let out = self.w.path(&format!("from-bucket-{n}.db"));
        let o = self
            .s
            .restore_command(bin(), &format!("s3://{BUCKET}/backups/data.db"), &out)
            .current_dir(self.w.dir.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "restore from the bucket: {}",
            stderr(&o)
        );
        assert_eq!(integrity(&out), "ok");
        assert_eq!(
            state(&out),
            state(&self.w.db),
            "the bucket differs from the primary"
        );
        assert_eq!(state(&out), expect(n));
    }

    /// Everything uploaded and the target no longer degraded.
    fn wait_drained(&self, d: &Daemon) {
        let ok = wait_until(Duration::from_secs(120), || {
            self.waiting() == 0 && !status(&self.addr).contains("degraded")
        });
        assert!(
            ok,
            "the spool did not drain: {} files wait; {}\n{}",
            self.waiting(),
            status(&self.addr),
            d.log_text()
        );
    }
}

/// S3 answers every request with 500 for 8 s during a load: capture and the local target go
/// on, the S3 target shows as degraded in `/status` with the error, upload errors are counted;
/// once S3 answers again the spool drains and the bucket alone restores to the primary.
#[test]
fn s3_answering_500() {
    let r = S3Rig::new("");
    let d = r.w.start("auto");
    run_load(&r.w.db, 1, 200);
    r.wait_drained(&d);
    r.p.set_mode(Mode::Fail500);
    let before = r.w.stored_files().len();
    let load = spawn_load(&r.w.db, 201, 2200, &["--rate", "250"]);
    d.wait_for_log(
        "retrying with backoff while files wait in the spool",
        Duration::from_secs(30),
    );
    wait_status(&r.addr, &d, "the S3 target degraded", |s| {
        s["status"].as_str().is_some_and(|l| {
            l.contains("degraded: s3://") && l.contains("HTTP 500") && l.contains("spool")
        })
    });
    let e1 = errors(&r.addr, "upload");
    std::thread::sleep(Duration::from_secs(6));
    let e2 = errors(&r.addr, "upload");
    assert!(
        e1 >= 1.0 && e2 > e1,
        "upload errors not counted: {e1} then {e2}"
    );
    let during = r.w.stored_files().len();
    assert!(
        during > before,
        "the local target stalled while S3 failed ({before} -> {during} files)"
    );
    assert!(is_alive(&d));
    let line = db_status(&r.addr)["status"].clone();
    eprintln!("during the 500s the status line said: {line}");
    r.p.set_mode(Mode::Pass);
    d.wait_for_log("answers again", Duration::from_secs(60));
    wait_ok(load);
    r.wait_drained(&d);
    let log = d.stop();
    assert!(!log.contains("stay in the spool"), "{log}");
    r.restore_from_bucket(2200);
    let (_, failed, _) = r.p.counts();
    report(&format!(
        "STORAGE S3 500s: every request answered 500 for ~8 s under a 250 tx/s load; {failed} requests failed; upload errors counted {e2}; status {line}; the local target kept up; restore from the bucket after healing equals the primary (2200 transactions): nothing lost"
    ));
}

/// S3 stops answering (requests hang) for `hang`: capture and the local target go on; each
/// hung request fails at replited's 20 s request timeout and is retried; once S3 answers the
/// spool drains and the bucket restores to the primary. Returns the status line seen during
/// the fault.
fn s3_hang(hang: Duration, expect_degraded: bool) -> String {
    let r = S3Rig::new("");
    let d = r.w.start("auto");
    run_load(&r.w.db, 1, 200);
    r.wait_drained(&d);
    r.p.set_mode(Mode::Hang);
    let before = r.w.stored_files().len();
    let rate = 100;
    let n = 200 + rate * hang.as_secs().max(5);
    let load = spawn_load(&r.w.db, 201, n, &["--rate", &rate.to_string()]);
    let start = Instant::now();
    let mut seen = String::new();
    while start.elapsed() < hang {
        std::thread::sleep(Duration::from_secs(1));
        assert!(is_alive(&d), "replited died:\n{}", d.log_text());
        let l = db_status(&r.addr)["status"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if l.contains("degraded") {
            seen = l;
        }
    }
    assert!(
        r.w.stored_files().len() > before,
        "the local target stalled while S3 hung"
    );
    let log = d.log_text();
    assert!(
        log.contains("(attempt 1); retrying"),
        "no request timed out and was retried:\n{log}"
    );
    if expect_degraded {
        assert!(
            seen.contains("degraded: s3://"),
            "/status never showed the S3 target degraded: {}\n{log}",
            status(&r.addr)
        );
        assert!(errors(&r.addr, "upload") >= 1.0);
    }
    let (_, _, hung) = r.p.counts();
    assert!(hung >= 1, "no request reached the hanging proxy");
    r.p.set_mode(Mode::Pass);
    wait_ok(load);
    r.wait_drained(&d);
    d.stop();
    r.restore_from_bucket(n);
    let timeouts = log
        .lines()
        .filter(|l| l.contains("(attempt") && l.contains("retrying"))
        .count();
    report(&format!(
        "STORAGE S3 hang: requests hung for {:?} under a {rate} tx/s load; {hung} requests hung, {timeouts} attempts failed and were retried; status during it {:?}; restore from the bucket after healing equals the primary ({n} transactions): nothing lost",
        hang,
        if seen.is_empty() { "not degraded (each upload still within its retries)" } else { &seen }
    ));
    seen
}

/// S3 hangs for 25 s: at least one request meets the 20 s timeout and is retried.
#[test]
fn s3_hanging_requests_time_out() {
    s3_hang(Duration::from_secs(25), false);
}

/// S3 hangs for 110 s: every attempt of an upload times out (4 × 20 s), the target shows as
/// degraded, upload errors are counted; nothing is lost once it answers.
#[test]
#[ignore]
fn s3_hanging_long_degrades_then_recovers() {
    s3_hang(Duration::from_secs(110), true);
}

/// Uploads keep their connection to the store open: with the default `sync-interval = "0s"`
/// (a PUT per commit) 40 commits a moment apart open a few connections, not one each (a new
/// TCP connection per request, and for `https://` a TLS handshake, was most of a PUT's cost).
#[test]
fn uploads_keep_their_connections_open() {
    let r = S3Rig::new("");
    let d = r.w.start("auto");
    run_load(&r.w.db, 1, 1);
    r.wait_drained(&d);
    let (before, _, _) = r.p.counts();
    for i in 2..=41 {
        run_load(&r.w.db, i, i);
        std::thread::sleep(Duration::from_millis(20));
    }
    r.wait_drained(&d);
    let (after, _, _) = r.p.counts();
    let log = d.stop();
    let puts: u64 = log
        .lines()
        .rev()
        .find_map(|l| l.split("S3 requests sent: PUT ").nth(1))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no request counts logged:\n{log}"));
    assert!(puts >= 40, "{puts} PUTs for 40 commits:\n{log}");
    let opened = after - before;
    assert!(
        opened <= 10,
        "{opened} connections opened for the uploads of 40 commits ({puts} PUTs in all)"
    );
    r.restore_from_bucket(41);
    report(&format!(
        "STORAGE S3 connections: 40 commits uploaded one at a time ({puts} PUTs in all) over {opened} new connections"
    ));
}
