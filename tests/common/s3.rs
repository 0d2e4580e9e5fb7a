//! A real S3-compatible server for the end-to-end tests: `s3s-fs` (installed by
//! `scripts/install-s3s`) serving a fresh directory on 127.0.0.1 and checking SigV4 signatures
//! against fresh credentials. Path-style addressing only (no `--domain`).
//!
//! Layout of `root`: each bucket is a plain directory `root/<bucket>`, each object a file
//! `root/<bucket>/<key>` (`/` in keys become subdirectories). s3s-fs keeps its own bookkeeping
//! (`.bucket-*.json` metadata, `.upload-*` multipart state, `.tmp.*` partial writes) directly in
//! `root`, never inside a bucket directory.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The s3s-fs binary, installed once per test process (the script itself caches across runs).
fn s3s_fs() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-s3s");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed: {}",
            script.display(),
            out.status
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(
            path.is_file(),
            "install-s3s printed {path:?}, which is not a file"
        );
        path
    })
}

/// Random-ish, distinct per call: time, pid and a counter mixed together (no rand crate needed).
fn token(len: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz";
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ALPHABET[(v >> 58) as usize % ALPHABET.len()] as char
        })
        .collect()
}

pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// The served directory: one subdirectory per bucket.
    pub root: PathBuf,
    /// Region to sign with; s3s-fs accepts any, this is just a consistent choice.
    pub region: String,
    port: u16,
    child: Option<Child>,
    /// Owns `root` and the server's log; removed on drop.
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Installs s3s-fs if needed and starts it on a free 127.0.0.1 port with fresh credentials
    /// and a fresh, empty root; returns once it accepts TCP connections.
    pub fn start() -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("replited-s3")
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let mut server = S3Server {
            endpoint: String::new(),
            access_key: format!("AK{}", token(18)),
            secret_key: token(40),
            root,
            region: "us-east-1".to_string(),
            port: 0,
            child: None,
            dir,
        };
        // Port 0: s3s-fs binds a free port itself (no probe-then-bind race) and logs which.
        server
            .spawn()
            .unwrap_or_else(|e| panic!("s3s-fs did not start: {e}"));
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `BIN restore s3://URL -o OUT --endpoint …` with this server's credentials in the
    /// environment, as an operator would run it; the caller adds what else it needs.
    pub fn restore_command(&self, bin: &str, url: &str, out: &Path) -> Command {
        let mut c = Command::new(bin);
        c.args(["restore", url, "-o", out.to_str().unwrap()])
            .args(["--endpoint", &self.endpoint])
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_REGION", &self.region);
        c
    }

    /// The s3s-fs log (stdout and stderr; set `RUST_LOG` to make it chatty).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("s3s-fs.log")).unwrap_or_default()
    }

    /// Creates a bucket. For s3s-fs a bucket is exactly a directory under `root` (its
    /// CreateBucket does nothing but `mkdir`), so this works with the server stopped too.
    /// The name must be a valid S3 bucket name (3..=63 of `a-z0-9.-`): s3s rejects e.g. "bk"
    /// with 400 InvalidBucketName.
    ///
    /// Beware: s3s-fs does not check that the bucket exists on PutObject or multipart uploads
    /// (it creates the directory); only List/Delete/Head answer 404 NoSuchBucket.
    pub fn create_bucket(&self, name: &str) {
        assert!(
            (3..=63).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'.'
                    || b == b'-'),
            "invalid S3 bucket name {name:?}"
        );
        fs::create_dir_all(self.root.join(name)).unwrap();
    }

    /// Kills the server (SIGKILL, no graceful shutdown) and waits for it; the port, credentials
    /// and root are kept for `restart`. Connections are refused until then.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same credentials and root.
    pub fn restart(&mut self) {
        self.stop();
        // The port was ours a moment ago; give the kernel a few tries to hand it back.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("s3s-fs restart on port {}: {e}; retrying", self.port);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("s3s-fs did not restart on port {}: {e}", self.port),
            }
        }
    }

    /// Every object key stored in `bucket`, sorted (empty if the bucket does not exist).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                let key = format!("{prefix}{name}");
                if entry.file_type().unwrap().is_dir() {
                    walk(&entry.path(), &format!("{key}/"), out);
                } else {
                    out.push(key);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root.join(bucket), "", &mut out);
        out.sort();
        out
    }

    /// Starts the child on `self.port` (0: any free port, then recorded in `self.port` and
    /// `self.endpoint`) and waits until it has bound its socket and accepts connections.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "s3s-fs already running");
        let log_path = self.dir.path().join("s3s-fs.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let log_start = log.metadata().unwrap().len() as usize;
        // The "server is running at http://ADDR" line (target s3s_fs, level INFO) is how we learn
        // that the bind succeeded and on which port; keep it on whatever else RUST_LOG asks for.
        let rust_log = match std::env::var("RUST_LOG") {
            Ok(v) if !v.is_empty() => format!("{v},s3s_fs=info"),
            _ => "s3s_fs=info".to_string(),
        };
        let mut child = Command::new(s3s_fs())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(&self.access_key)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg(&self.root)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", s3s_fs().display()))?;
        let read_log = || {
            let all = fs::read(&log_path).unwrap_or_default();
            String::from_utf8_lossy(&all[log_start.min(all.len())..]).into_owned()
        };
        const MARK: &str = "server is running at http://";
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("s3s-fs exited with {status}; log:\n{}", read_log()));
            }
            let text = read_log();
            if let Some(i) = text.find(MARK) {
                let addr: String = text[i + MARK.len()..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                let addr: SocketAddr = match addr.parse() {
                    Ok(a) => a,
                    // the line may still be half written
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(e) => panic!("s3s-fs logged an unparsable address {addr:?}: {e}"),
                };
                if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                    self.port = addr.port();
                    self.endpoint = format!("http://127.0.0.1:{}", self.port);
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "s3s-fs not listening after 20s; log:\n{}",
                    read_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
