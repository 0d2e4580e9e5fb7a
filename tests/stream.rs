//! Streaming replicas end to end: a real primary (`replited replicate` with an fs target and a
//! stream server) and a real replica (`replited replica-sidecar`) over QUIC on loopback (or
//! between network namespaces), real SQLite loads, a reader holding one connection open on the
//! replica.

mod common;

use std::fs;
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Opts};
use common::*;

/// A hash of a database's whole logical content (schema and rows).
fn dump(db: &Path) -> String {
    let out = Command::new("python3")
        .arg(load_py())
        .args(["dump", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dump {}: {}",
        db.display(),
        stderr(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until the replica's content equals the primary's.
fn wait_equal(primary: &Path, replica: &Path, limit: Duration, logs: &[&Daemon]) {
    let start = Instant::now();
    let want = dump(primary);
    loop {
        if replica.exists() && dump(replica) == want {
            return;
        }
        if start.elapsed() > limit {
            let logs: Vec<String> = logs.iter().map(|d| d.log_text()).collect();
            panic!(
                "the replica did not converge within {limit:?}: primary {:?}, replica {:?}\n{}",
                state(primary),
                replica.exists().then(|| state(replica)),
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// The first acceptance test: a 100 MB database, --force-restore over a stale replica, 10,000
/// transactions (INSERT, UPDATE, DELETE, schema changes), app autocheckpoints plus TRUNCATE
/// checkpoints on the primary, and a reader with one connection open on the replica for the
/// whole run that must never see half a transaction and must see the last one without
/// reopening.
#[test]
fn replica_follows_a_load_with_one_reader_connection() {
    let c = Cluster::new(Opts::default());
    fill(&c.pdb, 100);
    assert!(fs::metadata(&c.pdb).unwrap().len() > 100_000_000);
    // A stale replica database that --force-restore must replace.
    run_load(&c.rdb, 1, 40);
    let p = c.primary();
    let r = c.replica(&["--force-restore"]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(180));
    let log = r.log_text();
    assert!(
        log.contains("restoring from the primary's backup"),
        "--force-restore restores from the primary's backup:\n{log}"
    );
    let watcher = Command::new("python3")
        .arg(load_py())
        .args([
            "watch",
            c.rdb.to_str().unwrap(),
            "--until",
            "10000",
            "--timeout",
            "900",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let load = spawn_load(&c.pdb, 1, 10_000, &[]);
    // The app's own checkpoints run (autocheckpoint); add TRUNCATE ones while it writes.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(3));
        checkpoint(&c.pdb, "TRUNCATE");
    }
    wait_ok(load);
    let out = watcher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reader failed: {}\n{}",
        stderr(&out),
        r.log_text()
    );
    let seen = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = seen.trim().split('\t').collect();
    let (i, hash) = expect(10_000);
    assert_eq!(fields[0], i.to_string());
    assert_eq!(
        fields[1], hash,
        "the reader's one connection sees the primary's last state"
    );
    let states: u64 = fields[2].parse().unwrap();
    assert!(states > 50, "the reader saw only {states} states");
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    assert_eq!(integrity(&c.rdb), "ok");
    let rlog = r.stop();
    assert_eq!(
        count(&rlog, "must be rebuilt"),
        0,
        "no rebuild during a plain run:\n{rlog}"
    );
    p.stop();
}

/// The replica restarted mid-stream resumes without a restore; the primary killed and
/// restarted: the replica keeps serving reads and catches up.
#[test]
fn replica_and_primary_restarts() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 200);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    let load = spawn_load(&c.pdb, 201, 2500, &["--rate", "400"]);
    std::thread::sleep(Duration::from_millis(1500));
    r.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    let log = r.log_text();
    assert!(log.contains("resuming at txid"), "{log}");
    assert!(
        !log.contains("restoring from"),
        "a restarted replica resumes without a restore:\n{log}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    p.kill9();
    // The primary's replited is gone; the replica's readers go on.
    let (a, _) = state(&c.rdb);
    std::thread::sleep(Duration::from_millis(1500));
    let (b, _) = state(&c.rdb);
    assert!(a >= 200 && b >= a);
    let p = c.primary();
    wait_ok(load);
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(90), &[&p, &r]);
    assert_eq!(state(&c.rdb), expect(2500));
    assert_eq!(integrity(&c.rdb), "ok");
    // The database shrinks on the primary (VACUUM): the replica follows.
    let pages = |db: &Path| -> i64 {
        rusqlite::Connection::open(db)
            .unwrap()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap()
    };
    {
        let conn = rusqlite::Connection::open(&c.pdb).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.execute_batch("DELETE FROM items WHERE id % 3 = 0; VACUUM;")
            .unwrap();
    }
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    assert_eq!(pages(&c.rdb), pages(&c.pdb));
    assert_eq!(integrity(&c.rdb), "ok");
    r.stop();
    p.stop();
}

/// A replica frozen (SIGSTOP) while the primary commits 3,000 transactions — a schema change,
/// a new index, a VACUUM that shrinks the database, growth again — takes what has arrived once
/// thawed and applies runs of them as one SQLite transaction each (one commit, the newest copy
/// of each page, the last one's checksum checked): `replited_replica_commits_total` grows far
/// less than `replited_records_replicated_total`. It ends equal to the primary, page count
/// included, without a rebuild.
#[test]
fn a_replica_behind_applies_runs_of_transactions_as_one() {
    let c = Cluster::new(Opts::default());
    let ra = format!("127.0.0.1:{}", free_tcp_port());
    with_http(&c.rcfg, &ra, "");
    let p = c.primary();
    run_load(&c.pdb, 1, 100);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(30), &[&p, &r]);
    let counts = || {
        let m = get_ok(&ra, "/metrics");
        let get = |name| sample(&m, name, "db=\"data.db\"").unwrap_or(0.0);
        (
            get("replited_records_replicated_total"),
            get("replited_replica_commits_total"),
        )
    };
    let (records0, commits0) = counts();
    let pid = nix::unistd::Pid::from_raw(r.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    run_load(&c.pdb, 101, 2600);
    {
        let conn = rusqlite::Connection::open(&c.pdb).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.execute_batch("DELETE FROM items WHERE id % 3 = 0; VACUUM;")
            .unwrap();
    }
    run_load(&c.pdb, 2601, 3100);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(90), &[&p, &r]);
    let pages = |db: &Path| -> i64 {
        rusqlite::Connection::open(db)
            .unwrap()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(pages(&c.rdb), pages(&c.pdb));
    assert_eq!(integrity(&c.rdb), "ok");
    // The metrics follow the applies: every transaction since the freeze (the VACUUM's too).
    let start = Instant::now();
    let (records, commits) = loop {
        let (records, commits) = counts();
        if records - records0 >= 3001.0 || start.elapsed() > Duration::from_secs(10) {
            break (records - records0, commits - commits0);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(records >= 3001.0, "{records} transactions counted");
    let log = r.stop();
    assert!(
        commits * 2.0 <= records,
        "{records} transactions applied in {commits} commits: not batched\n{log}"
    );
    assert_eq!(
        count(&log, "restoring from the primary's backup"),
        1,
        "no rebuild:\n{log}"
    );
    assert_eq!(count(&log, "must be rebuilt"), 0, "{log}");
    p.stop();
}

/// With a `sync-interval` above zero one write-out can hold more than the stream server keeps
/// in memory (8 MiB of transactions): only the batch's last 8 MiB are copied for it, and a
/// replica following live gets the batch's earlier transactions read back from storage, in
/// order. It ends equal to the primary, without a rebuild.
#[test]
fn a_replica_follows_write_outs_larger_than_the_stream_keeps_in_memory() {
    let c = Cluster::new(Opts::default());
    // 5 s and no checkpoint before 100,000 pages (a checkpoint writes the batch out early):
    // the 16 MB below stay one write-out even on a busy machine (with 1 s and the default
    // checkpoints CI once split them into write-outs of 34–65 transactions, none over 8 MiB).
    let cfg = fs::read_to_string(&c.pcfg).unwrap().replacen(
        "\n\n[[database.replicate]]",
        "\nsync-interval = \"5s\"\nmin-checkpoint-page-count = 100000\nmax-checkpoint-page-count = 100000\n\n[[database.replicate]]",
        1,
    );
    fs::write(&c.pcfg, cfg).unwrap();
    let p = c.primary();
    run_load(&c.pdb, 1, 100);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(30), &[&p, &r]);
    // 16 MB in 160 transactions, well within 5 s: one write-out.
    write_blobs(&c.pdb, 160);
    run_load(&c.pdb, 101, 200);
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    assert_eq!(integrity(&c.rdb), "ok");
    let rlog = r.stop();
    let plog = p.stop();
    assert!(
        plog.contains("read back from storage"),
        "the replica was not served from storage:\n{plog}"
    );
    assert_eq!(count(&rlog, "must be rebuilt"), 0, "{rlog}");
}

/// A write made on the replica is detected, reported and repaired.
#[test]
fn local_write_on_the_replica_is_repaired() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 300);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(30), &[&p, &r]);
    {
        let conn = rusqlite::Connection::open(&c.rdb).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute("UPDATE ledger SET balance = balance + 5 WHERE acct = 0", [])
            .unwrap();
    }
    r.wait_for_log("a write was made on the replica", Duration::from_secs(30));
    r.wait_for_log("local write detected", Duration::from_secs(30));
    run_load(&c.pdb, 301, 400);
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    assert_eq!(state(&c.rdb), expect(400));
    let log = r.stop();
    assert!(
        count(&log, "restoring from the primary's backup") >= 2,
        "the replica was rebuilt from the backup:\n{log}"
    );
    p.stop();
}

/// The replica cannot apply for a while (another process holds the replica's write lock
/// beyond the busy timeout: SQLite refuses the transaction, nothing is applied). Once the lock
/// is gone it takes the primary's resends and converges, without a rebuild. Found by the soak:
/// the failed transaction stayed "received", its resends were dropped as duplicates and the
/// replica looped on "does not follow the last applied transaction" until restarted.
#[test]
fn replica_recovers_from_a_failed_apply() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 200);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(30), &[&p, &r]);
    let locker = rusqlite::Connection::open(&c.rdb).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let load = spawn_load(&c.pdb, 201, 500, &["--rate", "100"]);
    // The default busy timeout is 5 s: the first apply gives up after it.
    r.wait_for_log("taking the write lock", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    assert!(load.wait_with_output().unwrap().status.success());
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    assert_eq!(state(&c.rdb), expect(500));
    assert_eq!(integrity(&c.rdb), "ok");
    let log = r.stop();
    assert_eq!(count(&log, "does not follow"), 0, "{log}");
    assert_eq!(
        count(&log, "restoring from the primary's backup"),
        1,
        "no rebuild:\n{log}"
    );
    p.stop();
}

/// Mutual TLS: a replica without a client certificate is refused.
#[test]
fn replica_without_client_certificate_is_refused() {
    let c = Cluster::new(Opts {
        replica_cert: false,
        ..Opts::default()
    });
    let p = c.primary();
    run_load(&c.pdb, 1, 50);
    let r = c.replica(&[]);
    std::thread::sleep(Duration::from_secs(4));
    let log = r.log_text();
    assert!(!log.contains("caught up"), "{log}");
    assert!(
        !c.rdb.exists(),
        "nothing restored for an unauthenticated replica"
    );
    assert!(
        log.contains("connection to the primary lost") || log.contains("cannot reach the primary"),
        "{log}"
    );
    let plog = p.log_text();
    assert!(
        plog.contains("refused connection"),
        "the primary logs the refusal:\n{plog}"
    );
    drop(r);
    p.stop();
}

/// A replica asking for a database the primary does not serve stops with "Database not found".
#[test]
fn wrong_database_name_is_database_not_found() {
    let c = Cluster::new(Opts {
        replica_name: "other.db",
        ..Opts::default()
    });
    let p = c.primary();
    run_load(&c.pdb, 1, 20);
    let mut r = c.replica(&[]);
    let start = Instant::now();
    let st = loop {
        if let Some(st) = r.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the replica did not stop:\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!st.success());
    let log = r.log_text();
    assert!(log.contains("Database not found"), "{log}");
    assert!(!c.rdb.exists());
    p.stop();
}

/// Random datagrams at the QUIC port do not disturb a replica that is streaming.
#[test]
fn random_bytes_at_the_quic_port_do_not_disturb_a_stream() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 100);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    let load = spawn_load(&c.pdb, 101, 1500, &["--rate", "500"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..4000usize {
        let len = 1 + (i * 37) % 1400;
        let buf: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = sock.send_to(&buf, ("127.0.0.1", c.port));
    }
    wait_ok(load);
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    let log = r.stop();
    assert!(
        !log.contains("connection to the primary lost"),
        "the stream was not disturbed:\n{log}"
    );
    p.stop();
}

/// Between two network namespaces with 10 % packet loss each way (nftables), the replica
/// converges.
#[test]
fn replica_converges_under_packet_loss() {
    let net = common::netns::NetPair::new().expect(
        "network namespaces (run as root with iproute2 and nftables; scripts/test installs them)",
    );
    let c = Cluster::new(Opts {
        host: net.a_ip.clone(),
        ..Opts::default()
    });
    net.set_loss(10).unwrap();
    let loss = net.measured_loss(1000).unwrap();
    assert!(loss > 0.04 && loss < 0.2, "measured loss {loss}");
    let p = c.primary_cmd(net.command(&net.a, bin()));
    run_load(&c.pdb, 1, 200);
    let r = c.replica_cmd(net.command(&net.b, bin()), &[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(120));
    run_load(&c.pdb, 201, 1500);
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(120), &[&p, &r]);
    assert_eq!(state(&c.rdb), expect(1500));
    r.stop();
    p.stop();
    drop(net);
}

/// `--exec`: the app starts once the replica has caught up, is restarted with backoff when it
/// exits, and receives SIGTERM when replited stops.
#[test]
fn exec_child_is_supervised() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 100);
    let runs = c.dir.path().join("runs");
    let env = c.dir.path().join("app-env");
    let script = c.dir.path().join("app.sh");
    // Each start appends a line; the first two starts exit by themselves (a crash), the third
    // waits for SIGTERM and records it. The app also records its SSL_CERT_FILE.
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"${{SSL_CERT_FILE-unset}}\" > {env}\necho start >> {runs}\nn=$(wc -l < {runs})\nif [ \"$n\" -lt 3 ]; then exit 3; fi\ntrap 'echo term >> {runs}; exit 0' TERM\nwhile true; do sleep 0.1; done\n",
            runs = runs.display(),
            env = env.display()
        ),
    )
    .unwrap();
    // Started without SSL_CERT_FILE / SSL_CERT_DIR: replited sets SSL_CERT_FILE for its own S3
    // client (the system's bundle), not for the app.
    let mut cmd = Command::new(bin());
    cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
    let r = c.replica_cmd(cmd, &["--exec", &format!("sh {}", script.display())]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    let start = Instant::now();
    while fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count()
        < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the app was not restarted:\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = r.log_text();
    let caught = log.find("caught up with the primary").unwrap();
    let started = log.find("started the app").unwrap();
    assert!(caught < started, "the app starts after catching up:\n{log}");
    assert!(log.contains("the app exited: exit status: 3"), "{log}");
    assert!(log.contains("restarting the app in"), "{log}");
    std::thread::sleep(Duration::from_millis(300));
    let log = r.stop();
    assert!(log.contains("the app stopped"), "{log}");
    let lines = fs::read_to_string(&runs).unwrap();
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        ["start", "start", "start", "term"],
        "SIGTERM reached the app"
    );
    assert_eq!(fs::read_to_string(&env).unwrap().trim(), "unset");
    p.stop();
}

/// A replica that cannot read the primary's backup directory (here: an empty tmpfs mounted over
/// it in the replica's own mount namespace) gets the snapshot streamed by the primary.
#[test]
fn snapshot_is_streamed_when_the_backup_is_unreachable() {
    let c = Cluster::new(Opts::default());
    fill(&c.pdb, 12);
    let p = c.primary();
    run_load(&c.pdb, 1, 300);
    let backup = c.dir.path().join("backup");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none {} && exec {} \"$@\"",
            backup.display(),
            bin()
        ))
        .arg("sh");
    let r = c.replica_cmd(cmd, &[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(120));
    let log = r.log_text();
    assert!(
        log.contains("asking the primary to stream a snapshot"),
        "{log}"
    );
    assert!(log.contains("snapshot installed"), "{log}");
    run_load(&c.pdb, 301, 600);
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    assert_eq!(integrity(&c.rdb), "ok");
    r.stop();
    let plog = p.stop();
    assert!(plog.contains("snapshot streamed"), "{plog}");
}

/// The replica tells the service manager READY=1 only once it has caught up, then
/// `STATUS=… streaming at txid N, lag …`, and STOPPING=1 on SIGTERM.
#[test]
fn replica_is_ready_once_caught_up() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 500);
    let n = NotifyListener::start(c.dir.path());
    let mut cmd = Command::new(bin());
    cmd.env("NOTIFY_SOCKET", &n.socket)
        .env("WATCHDOG_USEC", "2000000");
    let r = c.replica_cmd(cmd, &[]);
    n.wait_for("READY=1", Duration::from_secs(60));
    // Ready means caught up: the replica already holds everything committed before.
    assert_eq!(state(&c.rdb), expect(500));
    // The restore before it asked systemd for more start-up time and said so.
    let msgs = n.messages();
    let ready = msgs.iter().position(|m| m.contains("READY=1")).unwrap();
    let extend = msgs
        .iter()
        .position(|m| m.contains("EXTEND_TIMEOUT_USEC=30000000") && m.contains("restoring from"));
    assert!(
        extend.is_some_and(|e| e < ready),
        "no EXTEND_TIMEOUT_USEC with a restoring status before READY=1: {msgs:?}"
    );
    run_load(&c.pdb, 501, 520);
    n.wait_for("streaming at txid 521", Duration::from_secs(20));
    n.wait_for("WATCHDOG=1", Duration::from_secs(5));
    r.stop();
    n.wait_for("STOPPING=1", Duration::from_secs(5));
    p.stop();
}

/// Socket activation: started by `systemd-socket-activate` with a UDP socket named "quic"
/// (as `replited@.socket` passes it), the primary serves replicas on that socket instead of
/// binding its configured address.
#[test]
fn primary_uses_the_udp_socket_systemd_passes() {
    let c = Cluster::new(Opts::default());
    run_load(&c.pdb, 1, 100);
    // The config names another port: the passed socket must be the one used.
    let activated = free_udp_port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &format!("127.0.0.1:{activated}"),
        "--datagram",
        "--fdname=quic",
        bin(),
    ]);
    let p = c.spawn(
        {
            cmd.args(["-c", c.pcfg.to_str().unwrap(), "replicate"]);
            cmd
        },
        "primary",
    );
    // The replica connects to the activated port (its first datagram starts replited).
    let rcfg = fs::read_to_string(&c.rcfg)
        .unwrap()
        .replace(&format!(":{}\"", c.port), &format!(":{activated}\""));
    fs::write(&c.rcfg, rcfg).unwrap();
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    p.wait_for_log(
        "using the UDP socket passed by systemd (quic)",
        Duration::from_secs(5),
    );
    run_load(&c.pdb, 101, 200);
    wait_equal(&c.pdb, &c.rdb, Duration::from_secs(30), &[&p, &r]);
    r.stop();
    p.stop();
}
