//! replited under a real systemd: each test boots its own container (Debian bookworm, systemd as
//! PID 1, `tests/common/container.rs`) with the repository's units and the binary cargo just
//! built, starts `replited@data` there with `systemctl`, runs a load against the database from
//! the host (the container's `/srv` is a host directory) and restores the backup on the host.
//!
//! Needs root, systemd-nspawn (systemd-container) and the cached root file system of
//! `scripts/make-rootfs` (built on first use, about a minute, with debootstrap). A machine where
//! a container cannot boot fails these tests with the reason.

mod common;
#[path = "common/container.rs"]
mod container;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use container::{output_text, Container};

/// The primary's database, as the service sees it.
const DB: &str = "/srv/db/data.db";
/// The primary's fs backup root.
const BACKUP: &str = "/srv/backup";
/// The instance every test runs (`/etc/replited/data.toml`).
const UNIT: &str = "replited@data.service";
const SOCKET: &str = "replited@data.socket";
/// A replica instance of the same unit (`/etc/replited/replica.toml`, `role = "replica"`).
const REPLICA: &str = "replited@replica.service";
/// The drop-in every test gives the service: the database and backups live under /srv, which
/// `ProtectSystem=strict` makes read-only unless named; and how the process ended goes to the
/// journal (`EXIT_MARK`).
const DROPIN: &str = "/etc/systemd/system/replited@.service.d/test.conf";

/// A booted container with the units installed, `/srv/db` and `/srv/backup` owned by the
/// `replited` user and a drop-in adding `ReadWritePaths=/srv`, an `ExecStopPost=` that logs how
/// the process ended (`EXIT_MARK`) and `service_extra` (lines for `[Service]`) to
/// `replited@.service`.
fn boot_with(service_extra: &str) -> Container {
    let c = Container::boot();
    c.write_file(
        DROPIN,
        format!(
            "[Service]\nReadWritePaths=/srv\n\
             ExecStopPost=/bin/sh -c 'echo \"{EXIT_MARK} $$SERVICE_RESULT $$EXIT_CODE $$EXIT_STATUS\"'\n\
             {service_extra}"
        ),
    );
    c.sh_ok("mkdir -p /srv/db /srv/backup && chown replited:replited /srv/db /srv/backup");
    c.daemon_reload();
    c
}

fn boot() -> Container {
    boot_with("")
}

/// A primary's config: `DB` backed up to the fs root `BACKUP`, plus `extra` (more
/// `[[database.replicate]]` targets or keys).
fn primary_config(extra: &str) -> String {
    format!(
        "[log]\nlevel = \"info\"\n\n[[database]]\ndb = \"{DB}\"\n\n\
         [[database.replicate]]\nname = \"backup\"\n[database.replicate.params]\n\
         type = \"fs\"\nroot = \"{BACKUP}\"\n{extra}"
    )
}

/// The stream server target of a primary on `addr` (`quic://127.0.0.1:50051`), with the
/// certificates of `make_tls`.
fn stream_server_target(addr: &str) -> String {
    format!(
        "\n[[database.replicate]]\nname = \"stream-server\"\n[database.replicate.params]\n\
         type = \"stream\"\naddr = \"{addr}\"\ntls_cert = \"/srv/tls/primary.pem\"\n\
         tls_key = \"/srv/tls/primary-key.pem\"\n"
    )
}

/// A replica's config: `db` follows the primary at `addr` (`http://127.0.0.1:50051`).
fn replica_config(db: &str, addr: &str) -> String {
    format!(
        "role = \"replica\"\n\n[log]\nlevel = \"info\"\n\n[[database]]\ndb = \"{db}\"\n\n\
         [[database.replicate]]\nname = \"stream-client\"\n[database.replicate.params]\n\
         type = \"stream\"\naddr = \"{addr}\"\ntls_ca = \"/srv/tls/ca.pem\"\n"
    )
}

/// A development CA and certificates for 127.0.0.1 in `/srv/tls`, readable by `replited`.
fn make_tls(c: &Container) {
    let dir = c.host("/srv/tls");
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir, &["127.0.0.1", "localhost"]);
    c.sh_ok("chown -R replited:replited /srv/tls && chmod 0750 /srv/tls");
}

/// Creates the primary's database from the host as the app would (load.py's schema, WAL mode),
/// owned by `replited` so the service can open it read-write; returns its host path.
fn create_db(c: &Container) -> PathBuf {
    let db = c.host(DB);
    run_load(&db, 1, 0);
    c.sh_ok(&format!("chown replited:replited {DB}"));
    db
}

/// `systemctl start` (which returns once replited sent READY=1) and `is-active`.
fn start(c: &Container, unit: &str) {
    c.systemctl_ok(&["start", unit]);
    assert_eq!(
        c.is_active(unit),
        "active",
        "{unit} is not active after start:\n{}",
        c.journal(unit)
    );
}

/// Written to the journal by the drop-in's `ExecStopPost=` each time the service's process
/// ended: `replited-exit: $SERVICE_RESULT $EXIT_CODE $EXIT_STATUS`. (`systemctl show` cannot
/// tell: an instance that stopped and is referenced by nothing is unloaded at once, and its
/// exit status with it.)
const EXIT_MARK: &str = "replited-exit:";

/// The `EXIT_MARK` lines of the unit's journal: `(service result, exit code, exit status)`.
fn exits(c: &Container, unit: &str) -> Vec<String> {
    c.journal(unit)
        .lines()
        .filter_map(|l| l.split_once(EXIT_MARK).map(|(_, r)| r.trim().to_string()))
        .collect()
}

/// `systemctl stop`, and replited exited by itself with status 0 (it got SIGTERM, wrote out
/// what it had captured and returned), not killed by a signal or failing.
fn stop_cleanly(c: &Container, unit: &str) {
    let before = exits(c, unit).len();
    let start = Instant::now();
    c.systemctl_ok(&["stop", unit]);
    let took = start.elapsed();
    assert_eq!(c.is_active(unit), "inactive");
    // The ExecStopPost= line reaches the journal shortly after.
    let mut all = exits(c, unit);
    while all.len() <= before && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        all = exits(c, unit);
    }
    assert_eq!(
        all.get(before).map(String::as_str),
        Some("success exited 0"),
        "{unit} did not exit 0 by itself on stop (stop took {took:?}; exits: {all:?}):\n{}",
        c.journal(unit)
    );
}

/// The `Status:` line of `systemctl status`.
fn status_line(c: &Container, unit: &str) -> String {
    let out = output_text(&c.systemctl(&["status", unit]));
    out.lines()
        .find(|l| l.trim_start().starts_with("Status:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("no Status: line in systemctl status {unit}:\n{out}"))
}

/// The largest number following "txid" in a status line.
fn status_txid(line: &str) -> Option<u64> {
    line.split("txid")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest
                .trim_start_matches([' ', '=', ':'])
                .chars()
                .take_while(|ch| ch.is_ascii_digit())
                .collect();
            digits.parse().ok()
        })
        .max()
}

/// Restores the latest backup on the host with the built binary (a `file://` URL, no config)
/// and checks it with SQLite's integrity_check; returns the restored file.
fn restore_latest(c: &Container) -> PathBuf {
    let out = c.dir().join(format!(
        "restored-{}.db",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let url = format!("file://{}", c.host(BACKUP).join("data.db").display());
    let r = Command::new(bin())
        .args(["restore", &url, "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "replited restore {url} failed:\n{}",
        output_text(&r)
    );
    assert_eq!(integrity(&out), "ok", "integrity_check of the restore");
    out
}

/// `state()` that does not panic while a database does not exist or is being created.
fn try_state(db: &Path) -> Option<(u64, String)> {
    if !db.exists() {
        return None;
    }
    let o = Command::new("python3")
        .arg(load_py())
        .arg("state")
        .arg(db)
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&o.stdout);
    let (i, h) = s.trim().split_once('\t')?;
    Some((i.parse().ok()?, h.to_string()))
}

/// `systemctl start replited@data` runs a primary as the `replited` user under the units'
/// hardening: READY=1 and a STATUS line with the txid, every transaction of a load from
/// another process captured, a clean exit 0 on `systemctl stop`, and the backup restores to
/// the primary's content. The units pass `systemd-analyze verify` where they are installed.
#[test]
fn primary_runs_under_systemd() {
    let c = boot();
    c.write_file("/etc/replited/data.toml", primary_config(""));
    let db = create_db(&c);
    // Transactions committed before replited starts are captured too.
    run_load(&db, 1, 100);
    start(&c, UNIT);

    let pid = c.main_pid(UNIT);
    assert_ne!(pid, 0, "no MainPID:\n{}", c.journal(UNIT));
    let user = c.sh_ok(&format!("stat -c %U /proc/{pid}"));
    assert_eq!(
        user.trim(),
        "replited",
        "the service does not run as replited"
    );

    let first = status_line(&c, UNIT);
    assert!(first.contains("txid"), "status without a txid: {first}");
    let first_txid =
        status_txid(&first).unwrap_or_else(|| panic!("no txid number in status: {first}"));

    run_load(&db, 101, 400);
    // STATUS= follows the capture: the txid moves on (within a few seconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut later = status_line(&c, UNIT);
    while status_txid(&later) <= Some(first_txid) {
        assert!(
            Instant::now() < deadline,
            "STATUS still says {later:?} after 300 more transactions (was {first:?}):\n{}",
            c.journal(UNIT)
        );
        std::thread::sleep(Duration::from_millis(200));
        later = status_line(&c, UNIT);
    }

    stop_cleanly(&c, UNIT);
    let owner = c.sh_ok(&format!("stat -c %U {BACKUP}/data.db"));
    assert_eq!(
        owner.trim(),
        "replited",
        "backup files not written by the service user"
    );

    let restored = restore_latest(&c);
    let primary = state(&db);
    assert_eq!(primary.0, 400);
    assert_eq!(
        state(&restored),
        primary,
        "the restore differs from the primary:\n{}",
        c.journal(UNIT)
    );

    // Last, so that everything above is checked even when this fails.
    let v = c.exec(&["systemd-analyze", "verify", UNIT, SOCKET]);
    assert!(
        v.status.success(),
        "systemd-analyze verify {UNIT} {SOCKET} failed in the container:\n{}",
        output_text(&v)
    );
}

/// With `WatchdogSec=3s` replited keeps the watchdog fed while healthy, and when its process is
/// frozen (SIGSTOP) mid-load systemd declares a watchdog timeout and restarts it; the restarted
/// replited picks up where the frozen one stopped: the backup restores to the primary's
/// content.
#[test]
fn watchdog_restarts_a_frozen_daemon() {
    let c = boot_with("WatchdogSec=3s\n");
    c.write_file("/etc/replited/data.toml", primary_config(""));
    let db = create_db(&c);
    start(&c, UNIT);
    assert_eq!(
        c.property(UNIT, "WatchdogUSec"),
        "3s",
        "the drop-in did not apply"
    );
    let pid = c.main_pid(UNIT);

    // Healthy and idle for more than two watchdog intervals: no restart.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        (c.main_pid(UNIT), c.property(UNIT, "NRestarts").as_str()),
        (pid, "0"),
        "replited was restarted while healthy (WATCHDOG=1 not sent in time?):\n{}",
        c.journal(UNIT)
    );

    let load = spawn_load(&db, 1, 3000, &["--rate", "300"]);
    std::thread::sleep(Duration::from_secs(1));
    // The shell's kill: the minimal image has no /bin/kill (procps).
    c.sh_ok(&format!("kill -STOP {pid}"));
    let frozen = Instant::now();
    let limit = Duration::from_secs(30);
    let new_pid = loop {
        let now = c.main_pid(UNIT);
        if now != 0 && now != pid && c.is_active(UNIT) == "active" {
            break now;
        }
        assert!(
            frozen.elapsed() < limit,
            "systemd did not restart the frozen replited within {limit:?} (MainPID {now}, {}):\n{}",
            c.is_active(UNIT),
            c.journal(UNIT)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = frozen.elapsed();
    eprintln!("frozen replited (pid {pid}) replaced by pid {new_pid} after {took:?}");
    let journal = c.journal(UNIT);
    assert!(
        journal.contains("Watchdog timeout"),
        "no watchdog timeout in the journal:\n{journal}"
    );
    assert_ne!(c.property(UNIT, "NRestarts"), "0");
    // The frozen process ended for the watchdog (SERVICE_RESULT=watchdog, killed by a signal).
    let ends = exits(&c, UNIT);
    eprintln!("service exits: {ends:?}");
    assert!(
        ends.first().is_some_and(|e| e.starts_with("watchdog ")),
        "the first exit was not for the watchdog: {ends:?}\n{journal}"
    );

    wait_ok(load);
    run_load(&db, 3001, 3100);
    stop_cleanly(&c, UNIT);
    let restored = restore_latest(&c);
    let primary = state(&db);
    assert_eq!(primary.0, 3100);
    assert_eq!(
        state(&restored),
        primary,
        "the restore after the watchdog restart differs from the primary:\n{}",
        c.journal(UNIT)
    );
}

/// `replited@data.socket` alone holds the QUIC port; the first datagram of a replica
/// (a transient unit in the same container) starts `replited@data.service`, which serves on the
/// socket systemd passed, and the replica follows the primary's load to the same content.
#[test]
fn socket_activation_starts_the_primary() {
    let c = boot();
    make_tls(&c);
    c.write_file(
        "/etc/replited/data.toml",
        primary_config(&stream_server_target("quic://127.0.0.1:50051")),
    );
    c.write_file(
        "/etc/replited/replica.toml",
        replica_config("/srv/replica/data.db", "http://127.0.0.1:50051"),
    );
    c.sh_ok("mkdir -p /srv/replica && chown replited:replited /srv/replica");
    let db = create_db(&c);
    run_load(&db, 1, 200);

    c.systemctl_ok(&["start", SOCKET]);
    assert_eq!(c.is_active(SOCKET), "active");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        c.is_active(UNIT),
        "inactive",
        "the service started before anything reached the socket:\n{}",
        c.journal(UNIT)
    );

    // The replica: a second instance of the same unit, whose config declares the role. Its
    // first QUIC connection starts the primary; it is active (READY=1) once caught up.
    c.systemctl_ok(&["start", "--no-block", REPLICA]);
    c.wait_active(UNIT, Duration::from_secs(30));
    c.wait_active(REPLICA, Duration::from_secs(60));
    let journal = c.journal(UNIT);
    assert!(
        journal.contains("using the UDP socket passed by systemd"),
        "the service did not use the socket systemd passed:\n{journal}"
    );
    assert_eq!(c.is_active(SOCKET), "active");

    run_load(&db, 201, 700);
    let primary = state(&db);
    let replica = c.host("/srv/replica/data.db");
    let start = Instant::now();
    let limit = Duration::from_secs(60);
    loop {
        let now = try_state(&replica);
        if now.as_ref() == Some(&primary) {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "the replica did not reach the primary's state {primary:?} within {limit:?} \
             (it has {now:?}):\n--- primary:\n{}\n--- replica:\n{}",
            c.journal(UNIT),
            c.journal(REPLICA)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(primary.0, 700);
    assert_eq!(integrity(&replica), "ok");
    assert_eq!(c.is_active(REPLICA), "active", "{}", c.journal(REPLICA));

    // The status port of the same socket unit (ListenStream=) reached the service too.
    let (code, body) = http_get(&c, "http://127.0.0.1:50052/status");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["role"], "primary", "{body}");
    assert_eq!(v["databases"][0]["db"], DB, "{body}");
    assert!(v["databases"][0]["txid"].as_u64().unwrap() > 0, "{body}");
    let (code, body) = http_get(&c, "http://127.0.0.1:50052/health");
    assert_eq!(code, 200, "{body}");
    assert!(
        c.journal(UNIT)
            .contains("status server on the TCP socket passed by systemd"),
        "{}",
        c.journal(UNIT)
    );

    stop_cleanly(&c, REPLICA);
    stop_cleanly(&c, UNIT);
}

/// `GET url` from inside the container's network namespace (the host's python3): the status
/// code and the body.
fn http_get(c: &Container, url: &str) -> (u16, String) {
    const GET: &str = "import sys, urllib.request, urllib.error\n\
try:\n    r = urllib.request.urlopen(sys.argv[1], timeout=10)\n    code, body = r.status, r.read()\n\
except urllib.error.HTTPError as e:\n    code, body = e.code, e.read()\n\
print(code)\nprint(body.decode())\n";
    let o = Command::new("nsenter")
        .args(["-t", &c.leader.to_string(), "-n", "python3", "-c", GET, url])
        .output()
        .unwrap();
    assert!(o.status.success(), "GET {url}: {}", output_text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (code, body) = out.split_once('\n').unwrap_or((&out, ""));
    (code.trim().parse().unwrap(), body.to_string())
}

/// `systemctl reload` applies a new sync interval in the running process (same MainPID): with
/// `sync-interval = "1h"` new transactions wait in memory instead of reaching the backup, and
/// back at `0s` they are written at once. The journal holds replited's entries with their
/// structured fields (DB, TXID, GENERATION), as `journalctl -o json` shows them.
#[test]
fn reload_applies_the_sync_interval_without_a_restart() {
    let c = boot();
    c.write_file("/etc/replited/data.toml", primary_config(""));
    let db = create_db(&c);
    run_load(&db, 1, 100);
    start(&c, UNIT);
    let pid = c.main_pid(UNIT);
    let backed_up = |want: u64| {
        let start = Instant::now();
        loop {
            let got = state(&restore_latest(&c)).0;
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the backup holds {got} transactions, not {want}:\n{}",
                c.journal(UNIT)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    backed_up(100);

    c.write_file(
        "/etc/replited/data.toml",
        primary_config("").replace(
            &format!("db = \"{DB}\"\n"),
            &format!("db = \"{DB}\"\nsync-interval = \"1h\"\n"),
        ),
    );
    c.systemctl_ok(&["reload", UNIT]);
    assert_eq!(c.main_pid(UNIT), pid, "reload restarted the process");
    let journal = c.journal(UNIT);
    assert!(
        journal.contains("configuration reloaded: sync-interval 0s → 1h"),
        "{journal}"
    );
    run_load(&db, 101, 150);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        state(&restore_latest(&c)).0,
        100,
        "with sync-interval = 1h new transactions must wait:\n{}",
        c.journal(UNIT)
    );

    c.write_file("/etc/replited/data.toml", primary_config(""));
    c.systemctl_ok(&["reload", UNIT]);
    assert_eq!(c.main_pid(UNIT), pid, "reload restarted the process");
    backed_up(150);
    assert_eq!(state(&restore_latest(&c)), state(&db));

    // Structured journal entries: the database and the transaction id as fields of their own.
    let json = c.exec_ok(&["journalctl", "-u", UNIT, "-o", "json", "--no-pager"]);
    let entries: Vec<serde_json::Value> = json
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let with_fields = entries
        .iter()
        .filter(|e| e.get("DB").is_some_and(|d| d == DB) && e.get("TXID").is_some())
        .count();
    assert!(
        with_fields > 0,
        "no journal entry with DB={DB} and TXID fields among {} entries:\n{json}",
        entries.len()
    );
    assert!(
        entries.iter().any(|e| e.get("GENERATION").is_some()
            && e.get("SYSLOG_IDENTIFIER").is_some_and(|i| i == "replited")),
        "{json}"
    );
    stop_cleanly(&c, UNIT);
}

const PB_EMAIL: &str = "admin@example.com";
const PB_PASSWORD: &str = "correct-horse-battery";

/// tests/pb.py run in the container's network namespace (PocketBase listens on its loopback).
fn pb_py(c: &Container, args: &[&str]) -> std::process::Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new("nsenter")
        .args(["-t", &c.leader.to_string(), "-n", "python3"])
        .arg(repo.join("tests/pb.py"))
        .args(args)
        .output()
        .unwrap()
}

fn pb_ok(c: &Container, args: &[&str]) -> String {
    let o = pb_py(c, args);
    assert!(o.status.success(), "pb.py {args:?}: {}", output_text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Polls `pb.py get` until the record's title is `want`.
fn wait_for_record(c: &Container, url: &str, id: &str, want: &str, journal_of: &[&str]) {
    let start = Instant::now();
    loop {
        let o = pb_py(c, &["get", "--url", url, "--id", id]);
        if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{url} does not serve record {id} = {want:?}: {}\n{}",
            output_text(&o),
            journal_of
                .iter()
                .map(|u| format!("--- {u}:\n{}", c.journal(u)))
                .collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A monotonic timestamp property of a unit (µs).
fn usec(c: &Container, unit: &str, prop: &str) -> u64 {
    c.property(unit, prop).parse().unwrap_or(0)
}

/// Waits until `unit` has been active with the same MainPID for `calm` (no restart meanwhile).
fn settled(c: &Container, unit: &str, calm: Duration, limit: Duration) -> u32 {
    let start = Instant::now();
    let mut pid = 0;
    let mut since = Instant::now();
    loop {
        let now = if c.is_active(unit) == "active" {
            c.main_pid(unit)
        } else {
            0
        };
        if now != pid {
            pid = now;
            since = Instant::now();
        }
        if pid != 0 && since.elapsed() >= calm {
            return pid;
        }
        assert!(
            start.elapsed() < limit,
            "{unit} did not settle:\n{}",
            c.journal(unit)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// PocketBase under systemd on both sides: `pocketbase@data` beside the primary, and
/// `pocketbase@replica` bound to a replica instance (`role = "replica"`, `exit-on-rebuild`).
/// The replica's PocketBase starts only after replited@replica is ready (restored and caught
/// up) and serves what was written through the primary's; a write made on the replica makes
/// replited exit 75, systemd stops PocketBase, restarts replited (which restores) and starts
/// PocketBase again, which then serves the primary's data, old and new.
#[test]
fn pocketbase_follows_replited_under_systemd() {
    let c = boot();
    c.write_file(
        "/etc/systemd/system/pocketbase@.service.d/test.conf",
        "[Service]\nReadWritePaths=/srv\n",
    );
    let pb =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-pocketbase"))
            .output()
            .unwrap();
    assert!(pb.status.success(), "{}", output_text(&pb));
    let pb = String::from_utf8_lossy(&pb.stdout).trim().to_string();
    std::fs::create_dir_all(c.host("/srv/bin")).unwrap();
    std::fs::copy(&pb, c.host("/srv/bin/pocketbase")).unwrap();
    c.sh_ok("ln -s /srv/bin/pocketbase /usr/local/bin/pocketbase");
    make_tls(&c);
    c.sh_ok("mkdir -p /srv/pb/data /srv/pb/replica && chown -R replited:replited /srv/pb");
    c.write_file(
        "/etc/replited/data.toml",
        primary_config(&stream_server_target("quic://127.0.0.1:50051"))
            .replace(DB, "/srv/pb/data/data.db"),
    );
    c.write_file(
        "/etc/replited/replica.toml",
        replica_config("/srv/pb/replica/data.db", "http://127.0.0.1:50051").replace(
            "role = \"replica\"\n",
            "role = \"replica\"\n\n[replica]\nexit-on-rebuild = true\nrestart-on-schema-change = true\n",
        ),
    );
    c.write_file(
        "/etc/replited/data.pocketbase.env",
        "PB_HTTP=127.0.0.1:8090\nPB_DIR=/srv/pb/data\nPB_FLAGS=--automigrate=false\n",
    );
    c.write_file(
        "/etc/replited/replica.pocketbase.env",
        "PB_HTTP=127.0.0.1:8091\nPB_DIR=/srv/pb/replica\nPB_FLAGS=--automigrate=false\n",
    );
    c.daemon_reload();
    c.exec_ok(&[
        "runuser",
        "-u",
        "replited",
        "--",
        "/usr/local/bin/pocketbase",
        "superuser",
        "upsert",
        PB_EMAIL,
        PB_PASSWORD,
        "--dir",
        "/srv/pb/data",
    ]);

    // The primary side: starting PocketBase starts replited@data first.
    let primary_pb = "pocketbase@data.service";
    let replica_pb = "pocketbase@replica.service";
    c.systemctl_ok(&["start", primary_pb]);
    c.wait_active(UNIT, Duration::from_secs(30));
    c.wait_active(primary_pb, Duration::from_secs(30));
    let purl = "http://127.0.0.1:8090";
    let rurl = "http://127.0.0.1:8091";
    pb_ok(&c, &["wait-health", "--url", purl, "--timeout", "30"]);
    pb_ok(
        &c,
        &[
            "setup",
            "--url",
            purl,
            "--email",
            PB_EMAIL,
            "--password",
            PB_PASSWORD,
        ],
    );
    let one = pb_ok(
        &c,
        &[
            "create",
            "--url",
            purl,
            "--email",
            PB_EMAIL,
            "--password",
            PB_PASSWORD,
            "--title",
            "one",
        ],
    );

    // The replica side, enabled so that every start of replited@replica pulls it in.
    c.systemctl_ok(&["enable", replica_pb]);
    c.systemctl_ok(&["start", replica_pb]);
    c.wait_active(REPLICA, Duration::from_secs(60));
    c.wait_active(replica_pb, Duration::from_secs(60));
    let units = [REPLICA, replica_pb, UNIT];
    wait_for_record(&c, rurl, &one, "one", &units);
    // PocketBase started only once replited was ready (active = READY=1 received).
    let ready = usec(&c, REPLICA, "ActiveEnterTimestampMonotonic");
    let pb_started = usec(&c, replica_pb, "ExecMainStartTimestampMonotonic");
    assert!(
        ready > 0 && pb_started >= ready,
        "PocketBase started at {pb_started} µs, before replited was ready at {ready} µs"
    );

    // Let PocketBase's first start on the replica settle (it records its auxiliary database
    // in data.db once, which replited repairs), then force a rebuild with a local write.
    // One line per rebuild: the exit that follows (`exiting with status 75`) repeats the
    // reason, and whether it is in the journal yet depends on when it is read.
    let rebuilds = |j: &str| {
        j.lines()
            .filter(|l| l.contains("the replica must be rebuilt") && !l.contains("exiting with"))
            .count()
    };
    let rebuilds_before = rebuilds(&c.journal(REPLICA));
    assert!(rebuilds_before <= 1, "{}", c.journal(REPLICA));
    let pb_pid = settled(
        &c,
        replica_pb,
        Duration::from_secs(4),
        Duration::from_secs(60),
    );
    let replited_pid = settled(&c, REPLICA, Duration::from_secs(1), Duration::from_secs(60));
    let replica_db = c.host("/srv/pb/replica/data.db");
    let o = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=10); \
             c.execute('CREATE TABLE local_write(x)'); c.commit()",
        ])
        .arg(&replica_db)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));

    let start = Instant::now();
    loop {
        let j = c.journal(REPLICA);
        let done = rebuilds(&j) > rebuilds_before
            && c.is_active(REPLICA) == "active"
            && c.main_pid(REPLICA) != replited_pid
            && c.is_active(replica_pb) == "active"
            && c.main_pid(replica_pb) != pb_pid;
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no rebuild with PocketBase stopped and started again:\n--- {REPLICA}:\n{j}\n--- {replica_pb}:\n{}",
            c.journal(replica_pb)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let j = c.journal(REPLICA);
    assert!(j.contains("exiting with status 75"), "{j}");
    // PocketBase was stopped before the database was replaced: its stop precedes replited's
    // restart, and it started again only after replited was ready again.
    let ready = usec(&c, REPLICA, "ActiveEnterTimestampMonotonic");
    let pb_started = usec(&c, replica_pb, "ExecMainStartTimestampMonotonic");
    assert!(
        pb_started >= ready,
        "PocketBase restarted before replited was ready"
    );
    let pbj = c.journal(replica_pb);
    assert!(
        pbj.contains("Stopped") || pbj.contains("Stopping"),
        "PocketBase was not stopped for the rebuild:\n{pbj}"
    );
    pb_ok(&c, &["wait-health", "--url", rurl, "--timeout", "30"]);
    wait_for_record(&c, rurl, &one, "one", &units);
    let t = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); \
             print(c.execute(\"SELECT count(*) FROM sqlite_master WHERE name = 'local_write'\").fetchone()[0])",
        ])
        .arg(&replica_db)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&t.stdout).trim(),
        "0",
        "the local write survived the rebuild"
    );
    let two = pb_ok(
        &c,
        &[
            "create",
            "--url",
            purl,
            "--email",
            PB_EMAIL,
            "--password",
            PB_PASSWORD,
            "--title",
            "two",
        ],
    );
    wait_for_record(&c, rurl, &two, "two", &units);

    // The replica's journal entries carry its lag as a field.
    let json = c.exec_ok(&["journalctl", "-u", REPLICA, "-o", "json", "--no-pager"]);
    assert!(
        json.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e.get("LAG_MS").is_some() && e.get("DB").is_some()),
        "no LAG_MS field in the replica's journal:\n{json}"
    );

    c.systemctl_ok(&["stop", replica_pb, REPLICA, primary_pb]);
    stop_cleanly(&c, UNIT);
    let v = c.exec(&["systemd-analyze", "verify", primary_pb, replica_pb, REPLICA]);
    assert!(
        v.status.success(),
        "systemd-analyze verify of the PocketBase units failed:\n{}",
        output_text(&v)
    );
}
