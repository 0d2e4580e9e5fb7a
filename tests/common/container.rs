//! A booted systemd for the tests that need a real service manager (`tests/systemd.rs`): a
//! Debian bookworm root file system (built once by `scripts/make-rootfs` and cached outside the
//! repository) booted with `systemd-nspawn --boot`, systemd as its PID 1, on a fresh overlay per
//! container so that nothing a test does reaches the cache.
//!
//! Inside each container:
//! - `/usr/bin/replited` is the binary cargo just built (bound read-only),
//! - the units of the repository's `systemd/` directory are in `/etc/systemd/system`, its
//!   sysusers and tmpfiles files in `/usr/lib/{sysusers,tmpfiles}.d/replited.conf`, the
//!   `replited` user exists and systemd has reloaded them,
//! - `/srv` is a host directory (`Container::host`), where the tests keep databases, backups
//!   and certificates: the host runs loads (python3 tests/load.py) and restores against the same
//!   files the service uses (same kernel, same inodes: SQLite's locks, shared memory and inotify
//!   work across the mount namespaces).
//!
//! Commands run inside with `nsenter` into every namespace of the container's PID 1. No systemd
//! is needed on the host (`--register=no --keep-unit`), only root, `systemd-nspawn`
//! (systemd-container) and, for the first build of the root file system, `debootstrap`.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The PATH commands run with inside the container.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everything a command printed, for failure messages.
pub fn output_text(o: &Output) -> String {
    let mut s = text(&o.stdout);
    let e = text(&o.stderr);
    if !e.is_empty() {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&e);
    }
    s
}

fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: the booted-systemd tests need it (apt-get install {package}; \
         scripts/test installs it)"
    );
}

/// The cached root file system, built by `scripts/make-rootfs` when missing (about a minute).
/// A machine where it cannot be built fails the test with the script's reason.
pub fn rootfs() -> PathBuf {
    static ROOTFS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let script = repo().join("scripts/make-rootfs");
            let o = Command::new(&script)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                o.status.success(),
                "{} failed ({}), so no systemd container can boot here:\n{}",
                script.display(),
                o.status,
                output_text(&o)
            );
            let dir = PathBuf::from(text(&o.stdout).trim());
            assert!(
                dir.join(".complete").exists() && dir.join("lib/systemd/systemd").exists(),
                "{} printed {dir:?}, which is not a complete root file system",
                script.display()
            );
            dir
        })
        .clone()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One booted container at a time per test process. With `--keep-unit` every container's
/// systemd manages the same cgroup tree (the test process's own; this host has no systemd to
/// hand out scopes): two at once removed each other's unit cgroups ("Failed to attach to
/// cgroup …: No such file or directory", status 219/CGROUP, seen in CI).
static BOOTED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One booted container (systemd as PID 1). Dropping it powers it off and removes its files.
pub struct Container {
    /// The machine name (`-M`), unique per container.
    pub name: String,
    dir: Option<tempfile::TempDir>,
    srv: PathBuf,
    log: PathBuf,
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    pub leader: u32,
    /// Held until the container is powered off (fields drop after `Drop::drop`).
    _booted: std::sync::MutexGuard<'static, ()>,
}

impl Container {
    /// Boots a container and installs replited's units; returns once systemd reports the
    /// system running (or degraded) and the units are loaded.
    pub fn boot() -> Container {
        let c = Container::boot_bare();
        c.install_units();
        c
    }

    /// Boots a container with nothing of replited's in it, not even the binary: a clean host
    /// for installing the packages (`tests/packages.rs`). The binary `boot_bare` binds at
    /// `/usr/bin/replited` is unmounted (in the namespace of PID 1, which every service started
    /// afterwards inherits) and the empty file nspawn made for the mount point removed, so that
    /// a package can install its own `/usr/bin/replited`.
    pub fn boot_clean() -> Container {
        let c = Container::boot_bare();
        c.sh_ok(
            "umount /usr/bin/replited && rm -f /usr/bin/replited && ! test -e /usr/bin/replited",
        );
        c
    }

    /// Boots a container without installing anything of replited's but the binary.
    pub fn boot_bare() -> Container {
        need("systemd-nspawn", "systemd-container");
        need("nsenter", "util-linux");
        // A test that failed while holding it poisoned it; its container is gone all the same.
        let booted = BOOTED.lock().unwrap_or_else(|e| e.into_inner());
        let rootfs = rootfs();
        let dir = tempfile::Builder::new()
            .prefix("replited-sysd")
            .tempdir()
            .unwrap();
        let upper = dir.path().join("upper");
        let srv = dir.path().join("srv");
        fs::create_dir(&upper).unwrap();
        fs::create_dir(&srv).unwrap();
        let log = dir.path().join("nspawn.log");
        let log_file = fs::File::create(&log).unwrap();
        let name = format!(
            "replited-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let bin = env!("CARGO_BIN_EXE_replited");
        // -D names the cached tree (nspawn checks it is an OS tree); the overlay on / makes
        // every write land in this container's own upper directory.
        let mut nspawn = Command::new("systemd-nspawn");
        nspawn
            .arg("-D")
            .arg(&rootfs)
            .arg(format!(
                "--overlay={}:{}:/",
                rootfs.display(),
                upper.display()
            ))
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=read-only",
                "-M",
                &name,
            ])
            .arg(format!("--bind={}:/srv", srv.display()))
            .arg(format!("--bind-ro={bin}:/usr/bin/replited"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        // Should the test process die without dropping the Container, nspawn gets SIGTERM and
        // shuts the container down (SIGRTMIN+3 to its PID 1) instead of leaving it running.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            nspawn.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let nspawn = nspawn
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start systemd-nspawn: {e}"));
        let mut c = Container {
            name,
            dir: Some(dir),
            srv,
            log,
            nspawn,
            leader: 0,
            _booted: booted,
        };
        c.leader = c.find_leader();
        c.wait_running();
        c
    }

    /// The container's PID 1: the child of systemd-nspawn that is PID 1 in its own PID
    /// namespace (nspawn's intermediate child comes and goes first).
    fn find_leader(&mut self) -> u32 {
        let start = Instant::now();
        let np = self.nspawn.id();
        loop {
            if let Some(st) = self.nspawn.try_wait().unwrap() {
                panic!(
                    "systemd-nspawn exited ({st}) before the container booted:\n{}",
                    self.nspawn_log()
                );
            }
            let mut children =
                fs::read_to_string(format!("/proc/{np}/task/{np}/children")).unwrap_or_default();
            if children.trim().is_empty() {
                // Kernels without CONFIG_PROC_CHILDREN.
                if let Ok(o) = Command::new("pgrep").args(["-P", &np.to_string()]).output() {
                    children = text(&o.stdout);
                }
            }
            for pid in children.split_whitespace() {
                let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let is_init = status
                    .lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .is_some_and(|l| l.split_whitespace().last() == Some("1"));
                if is_init {
                    return pid.parse().unwrap();
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the container's PID 1 did not appear within 20 s:\n{}",
                self.nspawn_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What systemd-nspawn and the container's console printed.
    pub fn nspawn_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `systemctl is-system-running` says running (or degraded: a unit of the
    /// minimal image failed, which the tests report but do not mind), at most 30 s.
    pub fn wait_running(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.nspawn.try_wait().unwrap() {
                panic!(
                    "the container stopped ({st}) while booting:\n{}",
                    self.nspawn_log()
                );
            }
            let o = self.exec(&["systemctl", "is-system-running"]);
            let last = output_text(&o).trim().to_string();
            match last.as_str() {
                "running" => return,
                "degraded" => {
                    let failed = self.systemctl(&["--failed", "--plain", "--no-legend"]);
                    eprintln!(
                        "container {}: degraded; failed units:\n{}",
                        self.name,
                        output_text(&failed)
                    );
                    return;
                }
                _ => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the container did not finish booting within 30 s (is-system-running: {last}):\n{}\n{}",
                self.nspawn_log(),
                self.journal_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Installs the repository's units, sysusers and tmpfiles files and applies them.
    fn install_units(&self) {
        let units = repo().join("systemd");
        let mut found = 0;
        for e in fs::read_dir(&units).unwrap().flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let dest = if file.ends_with(".service") || file.ends_with(".socket") {
                found += 1;
                format!("/etc/systemd/system/{file}")
            } else if file == "replited.sysusers" {
                "/usr/lib/sysusers.d/replited.conf".to_string()
            } else if file == "replited.tmpfiles" {
                "/usr/lib/tmpfiles.d/replited.conf".to_string()
            } else {
                continue;
            };
            self.write_file(&dest, fs::read(e.path()).unwrap());
        }
        assert!(found > 0, "no units in {}", units.display());
        self.sh_ok(
            "systemd-sysusers && systemd-tmpfiles --create /usr/lib/tmpfiles.d/replited.conf \
             && systemctl daemon-reload && id replited",
        );
    }

    /// Runs a command inside the container (every namespace of its PID 1, a clean environment).
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// A `Command` running `args` inside the container, to add stdin or more.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .args(["-a", "--"])
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("TERM", "dumb")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a command inside and asserts it succeeded; returns its stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "{args:?} in the container failed ({}):\n{}\n--- journal:\n{}",
            o.status,
            output_text(&o),
            self.journal_tail()
        );
        text(&o.stdout)
    }

    /// `sh -c script` inside.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// `sh -c script` inside, asserting success; returns its stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        self.exec_ok(&["sh", "-c", script])
    }

    /// `systemctl --no-pager ARGS` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut v = vec!["systemctl", "--no-pager"];
        v.extend_from_slice(args);
        self.exec(&v)
    }

    /// `systemctl ARGS` inside, asserting success (with the journal in the message).
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let o = self.systemctl(args);
        assert!(
            o.status.success(),
            "systemctl {args:?} failed ({}):\n{}\n--- journal:\n{}",
            o.status,
            output_text(&o),
            self.journal_tail()
        );
        text(&o.stdout)
    }

    /// `systemctl daemon-reload` (after writing units or drop-ins).
    pub fn daemon_reload(&self) {
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn property(&self, unit: &str, name: &str) -> String {
        self.systemctl_ok(&["show", "-p", name, "--value", unit])
            .trim()
            .to_string()
    }

    /// `systemctl is-active UNIT`: active, inactive, activating, failed, …
    pub fn is_active(&self, unit: &str) -> String {
        text(&self.systemctl(&["is-active", unit]).stdout)
            .trim()
            .to_string()
    }

    /// The unit's main process (in the container's PID namespace), 0 when there is none.
    pub fn main_pid(&self, unit: &str) -> u32 {
        let v = self.property(unit, "MainPID");
        v.parse()
            .unwrap_or_else(|_| panic!("MainPID of {unit}: {v:?}"))
    }

    /// Waits until the unit is active; fails at once if it fails, or after `limit`.
    pub fn wait_active(&self, unit: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            let state = self.is_active(unit);
            match state.as_str() {
                "active" => return,
                "failed" => panic!(
                    "{unit} failed while waiting for it to be active:\n{}",
                    self.journal(unit)
                ),
                _ => {}
            }
            assert!(
                start.elapsed() < limit,
                "{unit} is not active after {limit:?} (it is {state}):\n{}\n--- journal:\n{}",
                output_text(&self.systemctl(&["status", unit])),
                self.journal_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The unit's journal (`journalctl -u UNIT`), timestamps to the microsecond.
    pub fn journal(&self, unit: &str) -> String {
        let o = self.exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-precise",
            "-u",
            unit,
        ]);
        output_text(&o)
    }

    /// The last 200 lines of this boot's journal, for failure messages.
    pub fn journal_tail(&self) -> String {
        let o = self.exec(&[
            "sh",
            "-c",
            "journalctl -b --no-pager -o short-precise | tail -200",
        ]);
        output_text(&o)
    }

    /// Writes a file inside the container (parents created, mode 0644, owner root).
    pub fn write_file(&self, path: &str, contents: impl AsRef<[u8]>) {
        let mut child = self
            .command(&[
                "sh",
                "-c",
                "mkdir -p \"$(dirname \"$1\")\" && cat > \"$1\" && chmod 0644 \"$1\"",
                "sh",
                path,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(contents.as_ref())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "writing {path} in the container failed:\n{}",
            output_text(&o)
        );
    }

    /// The host path of a path under the container's `/srv` (`/srv/db/data.db` or
    /// `db/data.db`).
    pub fn host(&self, path: &str) -> PathBuf {
        let rel = path.strip_prefix("/srv").unwrap_or(path);
        self.srv.join(rel.trim_start_matches('/'))
    }

    /// The host directory bound at `/srv`.
    pub fn srv(&self) -> &Path {
        &self.srv
    }

    /// This container's scratch directory on the host (overlay upper, nspawn log, `/srv`).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Powers the container off; waits up to `limit`, then kills it. Idempotent.
    pub fn poweroff(&mut self, limit: Duration) {
        if self.nspawn.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = self.systemctl(&["--no-block", "poweroff"]);
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.nspawn.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "container {} did not power off within {limit:?}: killing it",
            self.name
        );
        // SIGKILL to PID 1 ends its whole PID namespace; then nspawn itself.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.leader as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.poweroff(Duration::from_secs(10));
        let _ = fs::remove_dir_all(format!("/run/systemd/nspawn/propagate/{}", self.name));
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("REPLITED_KEEP_CONTAINER").is_some() {
                eprintln!("kept {}", dir.keep().display());
            }
        }
    }
}
