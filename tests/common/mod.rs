//! Shared pieces of the end-to-end tests: a scratch directory with a database, a config and a
//! backup root; the real `replited` binary started and stopped; the deterministic load of
//! `tests/load.py` run by the real python3 sqlite3 module.
#![allow(dead_code)]

pub mod cluster;
pub mod netns;
pub mod s3;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_replited")
}

/// The repository's root.
/// Of the files under an S3 target's spool, those waiting for upload: not the `.up` copies kept
/// after an upload, nor the emptied files kept in `.recycle/` for reuse.
pub fn spooled(files: &[PathBuf]) -> Vec<&PathBuf> {
    files
        .iter()
        .filter(|p| {
            !p.to_string_lossy().ends_with(".up")
                && !p.components().any(|c| c.as_os_str() == ".recycle")
        })
        .collect()
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn load_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/load.py")
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn disk_free(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path)
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    st.blocks_available() as u64 * st.fragment_size() as u64
}

/// Whether the temporary directory has `need` bytes free. A test that writes gigabytes calls
/// this first: on a machine whose disk is nearly full it says so on stderr and returns false
/// (the test then ends there) instead of failing later on errors from a full disk.
pub fn enough_disk(test: &str, need: u64) -> bool {
    let tmp = std::env::temp_dir();
    let free = disk_free(&tmp);
    if free >= need {
        return true;
    }
    eprintln!(
        "{test}: NOT RUN: it needs {:.1} GB free under {}, the disk has {:.1} GB",
        need as f64 / 1e9,
        tmp.display(),
        free as f64 / 1e9
    );
    false
}

/// The last `n` bytes of `s` or a little more (from a character boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[i..]
}

/// A scratch world for one test.
pub struct World {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub backup: PathBuf,
    pub config: PathBuf,
}

impl World {
    /// A database path, a backup root and a config with `extra` lines added to `[[database]]`.
    pub fn new(extra: &str) -> World {
        let dir = tempfile::Builder::new()
            .prefix("replited-e2e")
            .tempdir()
            .unwrap();
        let db = dir.path().join("data.db");
        let backup = dir.path().join("backup");
        let config = dir.path().join("replited.toml");
        fs::write(
            &config,
            format!(
                "[log]\nlevel = \"debug\"\n\n[[database]]\ndb = \"{}\"\n{extra}\n\n[[database.replicate]]\nname = \"backup\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"{}\"\n",
                db.display(),
                backup.display()
            ),
        )
        .unwrap();
        // The app creates its database before replited starts, as PocketBase does.
        run_load(&db, 1, 0);
        World {
            dir,
            db,
            backup,
            config,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `replited replicate` with the given I/O backend, logging to a file.
    pub fn start(&self, io: &str) -> Daemon {
        self.start_under(&[], io)
    }

    /// Starts `replited replicate` as `start` does, run by `wrapper` (e.g. `setpriv … --`).
    pub fn start_under(&self, wrapper: &[&str], io: &str) -> Daemon {
        let log = self.path(&format!("replited-{}.log", now_ns()));
        let mut argv = wrapper.to_vec();
        argv.push(bin());
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .args(["-c", self.config.to_str().unwrap(), "replicate", "--io", io])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { child, log };
        d.wait_for_log("capturing", Duration::from_secs(30));
        d
    }

    /// `replited restore` with extra args; returns the process output.
    pub fn restore(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(["-c", self.config.to_str().unwrap(), "restore"])
            .args(args)
            .output()
            .unwrap()
    }

    /// `replited restore -o NAME` (a path in the world's directory), which must succeed;
    /// returns that path.
    pub fn restore_ok(&self, name: &str) -> PathBuf {
        let out = self.path(name);
        let r = self.restore(&["-o", out.to_str().unwrap()]);
        assert!(r.status.success(), "restore failed: {}", stderr(&r));
        out
    }

    /// Every stored file in the backup's generations (not `.recycle/`, emptied files waiting
    /// for reuse), sorted.
    pub fn stored_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.backup.join("data.db");
        if let Ok(gens) = fs::read_dir(&root) {
            // Generations only: not `.recycle/` (emptied files waiting for reuse).
            for g in gens.flatten() {
                if g.path().is_dir() && !g.file_name().to_string_lossy().starts_with('.') {
                    for f in fs::read_dir(g.path()).unwrap().flatten() {
                        out.push(f.path());
                    }
                }
            }
        }
        out.sort();
        out
    }
}

pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.log_text().contains(needle) {
                return;
            }
            if let Ok(Some(st)) = self.child_status() {
                panic!(
                    "replited exited ({st}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "replited did not log {needle:?} within {limit:?}:\n{}",
            self.log_text()
        );
    }

    fn child_status(&self) -> std::io::Result<Option<std::process::ExitStatus>> {
        // try_wait needs &mut; peek through /proc instead.
        let pid = self.child.id();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z") {
            return Ok(Some(std::os::unix::process::ExitStatusExt::from_raw(0)));
        }
        Ok(None)
    }

    /// kill -9.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; asserts a clean exit (0) within the limit and returns the log.
    pub fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let log = self.log_text();
                assert!(
                    st.success(),
                    "replited exited with {st} after SIGTERM:\n{log}"
                );
                return log;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "replited did not stop within 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python(args: &[&str]) -> Output {
    let out = Command::new("python3")
        .arg(load_py())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 load.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs transactions `from..=to` to completion.
pub fn run_load(db: &Path, from: u64, to: u64) {
    python(&[
        "run",
        db.to_str().unwrap(),
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
    ]);
}

/// `load.py fill DB MB`: MB megabytes of incompressible rows in one transaction, then the app's
/// TRUNCATE checkpoint.
pub fn fill(db: &Path, mb: u32) {
    python(&["fill", db.to_str().unwrap(), &mb.to_string()]);
}

/// Starts transactions `from..=to` in the background with extra options.
pub fn spawn_load(db: &Path, from: u64, to: u64, extra: &[&str]) -> Child {
    Command::new("python3")
        .arg(load_py())
        .args([
            "run",
            db.to_str().unwrap(),
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ])
        .args(extra)
        .spawn()
        .unwrap()
}

pub fn wait_ok(mut c: Child) {
    let st = c.wait().unwrap();
    assert!(st.success(), "load exited with {st}");
}

/// (last transaction, content hash) of a database.
pub fn state(db: &Path) -> (u64, String) {
    let out = python(&["state", db.to_str().unwrap()]);
    parse_state(&out.stdout)
}

/// (i, content hash) expected after transaction i.
pub fn expect(i: u64) -> (u64, String) {
    parse_state(&python(&["expect", &i.to_string()]).stdout)
}

fn parse_state(b: &[u8]) -> (u64, String) {
    let s = String::from_utf8_lossy(b);
    let (i, h) = s.trim().split_once('\t').expect("i<TAB>hash");
    (i.parse().unwrap(), h.to_string())
}

pub fn checkpoint(db: &Path, mode: &str) -> String {
    String::from_utf8_lossy(&python(&["checkpoint", db.to_str().unwrap(), mode]).stdout)
        .into_owned()
}

/// `PRAGMA integrity_check` through the real SQLite.
pub fn integrity(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A stand-in for systemd's `NOTIFY_SOCKET` (tests/notify_listener.py): what replited told the
/// service manager, one message per line.
pub struct NotifyListener {
    pub socket: PathBuf,
    pub out: PathBuf,
    child: Child,
}

impl NotifyListener {
    pub fn start(dir: &Path) -> NotifyListener {
        let socket = dir.join("notify.sock");
        let out = dir.join("notify.log");
        let child = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/notify_listener.py"))
            .arg(&socket)
            .arg(&out)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no notify socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        NotifyListener { socket, out, child }
    }

    pub fn messages(&self) -> Vec<String> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Waits until a message containing `needle` arrived.
    pub fn wait_for(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.messages().iter().any(|m| m.contains(needle)) {
            assert!(
                start.elapsed() < limit,
                "no {needle:?} notification within {limit:?}: {:?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates table `blobs` in `db` and commits `n` transactions of one 100 KB row each (bytes
/// that differ row to row and compress poorly): `n` × 100 KB of pages for capture to ship.
pub fn write_blobs(db: &Path, n: u32) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("CREATE TABLE blobs (b BLOB)").unwrap();
    for i in 0..n {
        let b: Vec<u8> = (0..100_000u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 13) as u8)
            .collect();
        conn.execute("INSERT INTO blobs VALUES (?1)", [b]).unwrap();
    }
}

/// A development CA and certificates made with `replited cert` in `dir`: `ca.pem`, the
/// primary's `primary.pem` for `sans`, and the client certificate `replica-1.pem`.
pub fn make_certs(dir: &Path, sans: &[&str]) {
    let c = dir.to_str().unwrap();
    let mut server = vec!["server", "--ca-dir", c];
    for s in sans {
        server.extend(["--san", s]);
    }
    for args in [
        vec!["ca", "--dir", c],
        server,
        vec!["client", "--ca-dir", c, "--name", "replica-1"],
    ] {
        let o = Command::new(bin())
            .arg("cert")
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "replited cert {args:?}: {}", stderr(&o));
    }
}

/// A UDP port free on 127.0.0.1 at the time of asking.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` from a status server at `addr` (HOST:PORT): the status code and the body; None
/// while nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((code, body))
}

/// The value of the first sample of `name` whose labels contain `label` (e.g. `db="data.db"`).
pub fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split(['{', ' ']).next() == Some(name) && (label.is_empty() || l.contains(label))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn get_ok(addr: &str, path: &str) -> String {
    let (code, body) =
        http_get(addr, path).unwrap_or_else(|| panic!("nothing answers at {addr}{path}"));
    assert_eq!(code, 200, "{addr}{path}: {body}");
    body
}

/// Adds `[http]` (and more keys) to the top of a config file.
pub fn with_http(cfg: &Path, addr: &str, extra: &str) {
    let text = fs::read_to_string(cfg).unwrap();
    fs::write(cfg, format!("[http]\naddr = \"{addr}\"\n{extra}\n{text}")).unwrap();
}

/// Waits until the replica's (last txid, content hash) equals the primary's; the time it took.
/// Panics with the daemons' logs after `limit`.
pub fn wait_converged(
    primary: &Path,
    replica: &Path,
    limit: Duration,
    logs: &[&Daemon],
) -> Duration {
    let start = Instant::now();
    loop {
        let want = state(primary);
        if replica.exists() && state(replica) == want {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            let logs: Vec<String> = logs.iter().map(|d| d.log_text()).collect();
            panic!(
                "the replica did not converge within {limit:?}: primary {want:?}, replica {:?}\n{}",
                replica.exists().then(|| state(replica)),
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
