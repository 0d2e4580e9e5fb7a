//! The service manager's notifications (sd_notify), read from a stand-in NOTIFY_SOCKET:
//! READY=1 once capture runs, STATUS= lines, WATCHDOG=1 while the capture loop beats,
//! STOPPING=1 on SIGTERM.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn replicate_tells_systemd_ready_status_watchdog_stopping() {
    let w = World::new("");
    let n = NotifyListener::start(w.dir.path());
    let log = w.path("replited.log");
    let child = Command::new(bin())
        .args(["-c", w.config.to_str().unwrap(), "replicate"])
        .env("NOTIFY_SOCKET", &n.socket)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, log };
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
    let log = w.path("replited.log");
    let child = Command::new(bin())
        .args(["-c", w.config.to_str().unwrap(), "replicate"])
        .env("NOTIFY_SOCKET", &n.socket)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { child, log };
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
    let msgs = n.messages();
    let reloading = msgs
        .iter()
        .position(|m| m.starts_with("RELOADING=1"))
        .unwrap();
    assert!(
        msgs[reloading + 1..].iter().any(|m| m.contains("READY=1")),
        "READY=1 after RELOADING=1: {msgs:?}"
    );
    run_load(&w.db, 21, 40);
    d.wait_for_log("segment written", Duration::from_secs(10));
    d.stop();
}
