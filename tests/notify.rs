//! The service manager's notifications (sd_notify), read from a stand-in NOTIFY_SOCKET:
//! READY=1 once capture runs, STATUS= lines, WATCHDOG=1 while the capture loop beats,
//! STOPPING=1 on SIGTERM.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::{Cluster, Opts};
use common::*;

/// `replited replicate` on the world's config, telling a stand-in service manager `n` (with
/// a watchdog of `watchdog_usec`).
fn notified_primary(w: &World, n: &NotifyListener, watchdog_usec: Option<&str>) -> Daemon {
    let log = w.path("replited.log");
    let mut cmd = Command::new(bin());
    cmd.args(["-c", w.config.to_str().unwrap(), "replicate"])
        .env("NOTIFY_SOCKET", &n.socket);
    if let Some(u) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", u);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon { child, log }
}

#[test]
fn replicate_tells_systemd_ready_status_watchdog_stopping() {
    let w = World::new("");
    let n = NotifyListener::start(w.dir.path());
    let d = notified_primary(&w, &n, Some("1000000"));
    n.wait_for("READY=1", Duration::from_secs(30));
    run_load(&w.db, 1, 50);
    n.wait_for("txid 51", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    let before_stop = n.messages();
    let watchdogs = before_stop.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        watchdogs >= 2,
        "WATCHDOG=1 every half interval: {before_stop:?}"
    );
    assert!(
        before_stop
            .iter()
            .any(|m| m.starts_with("STATUS=data.db: generation")),
        "{before_stop:?}"
    );
    assert!(!before_stop.iter().any(|m| m.contains("STOPPING=1")));
    d.stop();
    n.wait_for("STOPPING=1", Duration::from_secs(5));
    let all = n.messages();
    let ready = all.iter().position(|m| m.contains("READY=1")).unwrap();
    let stopping = all.iter().position(|m| m.contains("STOPPING=1")).unwrap();
    assert!(ready < stopping, "{all:?}");
}

/// An idle daemon pings the watchdog at half its interval, not every second (each ping wakes
/// the service manager too), and sends no status line while nothing changes; a change is
/// still sent.
#[test]
fn an_idle_primary_pings_the_watchdog_at_half_its_interval() {
    let w = World::new("");
    let n = NotifyListener::start(w.dir.path());
    // 8 s: a ping every 4 s.
    let d = notified_primary(&w, &n, Some("8000000"));
    n.wait_for("READY=1", Duration::from_secs(30));
    // The first status line goes out within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let before = n.messages().len();
    std::thread::sleep(Duration::from_secs(3));
    let quiet = n.messages()[before..].to_vec();
    let pings = quiet.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        pings <= 1,
        "WATCHDOG=1 at half the interval, not every second: {quiet:?}"
    );
    assert!(
        !quiet.iter().any(|m| m.contains("STATUS=")),
        "no status line while nothing changes: {quiet:?}"
    );
    run_load(&w.db, 1, 5);
    n.wait_for("txid 6", Duration::from_secs(10));
    d.stop();
    n.wait_for("STOPPING=1", Duration::from_secs(5));
}

/// SIGHUP reloads the config: RELOADING=1 with MONOTONIC_USEC, then READY=1; the new log level
/// applies at once; the process keeps running and capturing.
#[test]
fn sighup_reloads_the_log_level() {
    let w = World::new("");
    let cfg = fs::read_to_string(&w.config).unwrap();
    fs::write(
        &w.config,
        cfg.replace("level = \"debug\"", "level = \"info\""),
    )
    .unwrap();
    let n = NotifyListener::start(w.dir.path());
    let d = notified_primary(&w, &n, None);
    n.wait_for("READY=1", Duration::from_secs(30));
    run_load(&w.db, 1, 20);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !d.log_text().contains("segment written"),
        "debug lines at info level"
    );
    let cfg = fs::read_to_string(&w.config).unwrap();
    fs::write(
        &w.config,
        cfg.replace("level = \"info\"", "level = \"debug\""),
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    d.wait_for_log("reloaded", Duration::from_secs(10));
    n.wait_for("RELOADING=1|MONOTONIC_USEC=", Duration::from_secs(5));
    // READY=1 follows once the capture loop took the new settings.
    let start = std::time::Instant::now();
    loop {
        let msgs = n.messages();
        let reloading = msgs
            .iter()
            .position(|m| m.starts_with("RELOADING=1"))
            .unwrap();
        if msgs[reloading + 1..].iter().any(|m| m.contains("READY=1")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no READY=1 after RELOADING=1: {msgs:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run_load(&w.db, 21, 40);
    d.wait_for_log("segment written", Duration::from_secs(10));
    d.stop();
}

/// The fields of each notification (one datagram's lines, joined with `|` by the listener).
fn fields(m: &str) -> Vec<&str> {
    m.split('|').collect()
}

/// The order systemd relies on, in what a listener received: one READY=1, before any
/// WATCHDOG=1 and carrying the first status line; `progress` (a STATUS= update) after it; one
/// STOPPING=1 (with STATUS=stopping) and after it nothing but watchdog pings (no READY=1, no
/// STATUS= overwriting "stopping").
fn check_order(all: &[String], progress: &str) {
    let has = |m: &String, f: &str| fields(m).contains(&f);
    let ready: Vec<usize> = (0..all.len())
        .filter(|&i| has(&all[i], "READY=1"))
        .collect();
    assert_eq!(ready.len(), 1, "one READY=1: {all:?}");
    let ready = ready[0];
    assert!(
        fields(&all[ready])
            .iter()
            .any(|f| f.starts_with("STATUS=data.db: ")),
        "READY=1 comes with the database's status line: {all:?}"
    );
    let watchdogs: Vec<usize> = (0..all.len())
        .filter(|&i| has(&all[i], "WATCHDOG=1"))
        .collect();
    assert!(watchdogs.len() >= 2, "WATCHDOG=1 while running: {all:?}");
    assert!(
        watchdogs.iter().all(|&w| w > ready),
        "WATCHDOG=1 before READY=1: {all:?}"
    );
    let progress_at = all
        .iter()
        .position(|m| m.starts_with("STATUS=") && m.contains(progress))
        .unwrap_or_else(|| panic!("no STATUS= update with {progress:?}: {all:?}"));
    assert!(progress_at > ready, "{progress:?} before READY=1: {all:?}");
    let stopping: Vec<usize> = (0..all.len())
        .filter(|&i| has(&all[i], "STOPPING=1"))
        .collect();
    assert_eq!(stopping.len(), 1, "one STOPPING=1: {all:?}");
    let stopping = stopping[0];
    assert!(stopping > progress_at && stopping > ready, "{all:?}");
    assert!(has(&all[stopping], "STATUS=stopping"), "{all:?}");
    assert!(
        all[stopping + 1..].iter().all(|m| m == "WATCHDOG=1"),
        "after STOPPING=1 only watchdog pings may come: {all:?}"
    );
}

/// A primary: READY=1 first, STATUS= updates after it, STOPPING=1 last.
#[test]
fn primary_notifications_come_in_order() {
    let w = World::new("");
    let n = NotifyListener::start(w.dir.path());
    let d = notified_primary(&w, &n, Some("2000000"));
    n.wait_for("READY=1", Duration::from_secs(30));
    run_load(&w.db, 1, 50);
    n.wait_for("txid 51", Duration::from_secs(10));
    // Two watchdog ticks (every second).
    std::thread::sleep(Duration::from_millis(2200));
    d.stop();
    n.wait_for("STOPPING=1", Duration::from_secs(5));
    // Anything sent after it arrives meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    check_order(&n.messages(), "txid 51");
}

/// A replica (`replica-sidecar`): READY=1 once caught up, before any WATCHDOG=1, then its
/// streaming status, STOPPING=1 last.
#[test]
fn replica_notifications_come_in_order() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 200);
    let n = NotifyListener::start(c.dir.path());
    let mut cmd = Command::new(bin());
    cmd.env("NOTIFY_SOCKET", &n.socket)
        .env("WATCHDOG_USEC", "2000000");
    let r = c.replica_cmd(cmd, &[]);
    n.wait_for("READY=1", Duration::from_secs(30));
    assert_eq!(state(&c.rdb), expect(200), "READY=1 before catching up");
    run_load(&c.pdb, 201, 220);
    n.wait_for("streaming at txid 221", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(2200));
    r.stop();
    n.wait_for("STOPPING=1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    check_order(&n.messages(), "streaming at txid 221");
    p.stop();
}
