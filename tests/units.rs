//! The systemd units: `systemd-analyze verify` accepts them (with ExecStart pointing at the
//! built binary), and `systemd-analyze security` rates the service's exposure "OK" or better.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn units_verify_and_are_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let service = fs::read_to_string(units.join("replited@.service"))
        .unwrap()
        .replace("/usr/bin/replited", bin());
    fs::write(dir.path().join("replited@.service"), service).unwrap();
    fs::copy(
        units.join("replited@.socket"),
        dir.path().join("replited@.socket"),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .args([
            "verify",
            "./replited@data.service",
            "./replited@data.socket",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "./replited@data.service"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{out}"));
    let score: f64 = line
        .split("replited@data.service: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"));
    // systemd rates < 2.0 "OK" (and < 1.0 "SAFE").
    assert!(score < 2.0, "exposure {score}: {line}");
    let service = fs::read_to_string(units.join("replited@.service")).unwrap();
    for needed in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "ProtectSystem=strict",
        "StateDirectory=",
    ] {
        assert!(
            service.contains(needed),
            "replited@.service lacks {needed:?}"
        );
    }
    let socket = fs::read_to_string(units.join("replited@.socket")).unwrap();
    for needed in [
        "ListenDatagram=",
        "ListenStream=127.0.0.1:",
        "FileDescriptorName=",
    ] {
        assert!(socket.contains(needed), "replited@.socket lacks {needed:?}");
    }
}
