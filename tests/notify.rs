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
