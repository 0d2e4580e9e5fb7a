//! A real PocketBase on each side: the primary's under `replited replicate`, the replica's as
//! the `--exec` child of `replited replica-sidecar`. A record created through the primary's HTTP
//! API is read through the replica's.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const EMAIL: &str = "admin@example.com";
const PASSWORD: &str = "replited-test-pass";

/// The pinned PocketBase binary (installed and checksummed by scripts/install-pocketbase).
fn pocketbase() -> PathBuf {
    let out = Command::new(repo().join("scripts/install-pocketbase"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/install-pocketbase: {}",
        stderr(&out)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn pb_py(args: &[&str]) -> std::process::Output {
    Command::new("python3")
        .arg(repo().join("tests/pb.py"))
        .args(args)
        .output()
        .unwrap()
}

fn spawn_logged(mut cmd: Command, log: PathBuf) -> Daemon {
    let child = cmd
        .stdout(fs::File::create(log.with_extension("out")).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon { child, log }
}

#[test]
fn record_created_on_the_primary_is_read_on_the_replica() {
    let pb = pocketbase();
    let dir = tempfile::Builder::new()
        .prefix("replited-pb")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let pdata = d.join("primary/pb_data");
    let rdata = d.join("replica/pb_data");
    fs::create_dir_all(&pdata).unwrap();
    fs::create_dir_all(&rdata).unwrap();
    let certs = d.join("certs");
    let c = certs.to_str().unwrap();
    make_certs(&certs, &["127.0.0.1"]);
    let quic = free_udp_port();
    let (pport, rport) = (free_tcp_port(), free_tcp_port());

    // The primary PocketBase, with its superuser.
    let o = Command::new(&pb)
        .args(["superuser", "upsert", EMAIL, PASSWORD, "--dir"])
        .arg(&pdata)
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "superuser upsert: {}", stderr(&o));
    let mut cmd = Command::new(&pb);
    cmd.args(["serve", "--automigrate=false", "--http"])
        .arg(format!("127.0.0.1:{pport}"))
        .arg("--dir")
        .arg(&pdata)
        .current_dir(d);
    let primary_pb = spawn_logged(cmd, d.join("pb-primary.log"));
    let purl = format!("http://127.0.0.1:{pport}");
    let rurl = format!("http://127.0.0.1:{rport}");
    let o = pb_py(&["wait-health", "--url", &purl, "--timeout", "30"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let pcfg = d.join("primary.toml");
    fs::write(
        &pcfg,
        format!(
            "[[database]]\ndb = \"{}/data.db\"\n\n[[database.replicate]]\nname = \"backup\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"{}/backup\"\n\n[[database.replicate]]\nname = \"stream\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:{quic}\"\ntls_cert = \"{c}/primary.pem\"\ntls_key = \"{c}/primary-key.pem\"\ntls_client_ca = \"{c}/ca.pem\"\n",
            pdata.display(),
            d.display()
        ),
    )
    .unwrap();
    let rcfg = d.join("replica.toml");
    fs::write(
        &rcfg,
        format!(
            "[[database]]\ndb = \"{}/data.db\"\n\n[[database.replicate]]\nname = \"primary\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"http://127.0.0.1:{quic}\"\ntls_ca = \"{c}/ca.pem\"\ntls_cert = \"{c}/replica-1.pem\"\ntls_key = \"{c}/replica-1-key.pem\"\n",
            rdata.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["-c", pcfg.to_str().unwrap(), "replicate"]);
    let primary = spawn_logged(cmd, d.join("replited-primary.log"));
    primary.wait_for_log("capturing", Duration::from_secs(30));

    let exec = format!(
        "{} serve --automigrate=false --http 127.0.0.1:{rport} --dir {}",
        pb.display(),
        rdata.display()
    );
    let mut cmd = Command::new(bin());
    cmd.args(["-c", rcfg.to_str().unwrap(), "replica-sidecar", "--exec"])
        .arg(&exec)
        .arg("--restart-on-schema-change")
        .current_dir(d);
    let replica = spawn_logged(cmd, d.join("replited-replica.log"));
    replica.wait_for_log("started the app", Duration::from_secs(60));
    let o = pb_py(&["wait-health", "--url", &rurl, "--timeout", "30"]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), replica.log_text());

    // A collection (a schema change: the replica's PocketBase is restarted to see it) and a
    // record, through the primary's API.
    let o = pb_py(&[
        "setup",
        "--url",
        &purl,
        "--email",
        EMAIL,
        "--password",
        PASSWORD,
    ]);
    assert!(o.status.success(), "setup: {}", stderr(&o));
    let o = pb_py(&[
        "create",
        "--url",
        &purl,
        "--email",
        EMAIL,
        "--password",
        PASSWORD,
        "--title",
        "written on the primary",
    ]);
    assert!(o.status.success(), "create: {}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();

    // Read through the replica's API.
    let start = Instant::now();
    loop {
        let o = pb_py(&["get", "--url", &rurl, "--id", &id]);
        if o.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&o.stdout).trim(),
                "written on the primary"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the record never appeared on the replica ({}):\n{}",
            stderr(&o),
            replica.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = replica.log_text();
    assert!(
        log.contains("the primary changed the schema"),
        "the schema change was seen:\n{log}"
    );
    // The app starts only once the replica has caught up.
    let caught = log.find("caught up with the primary").expect("caught up");
    let started = log.find("started the app").expect("started");
    assert!(caught < started, "{log}");
    // PocketBase's first start on a new replica creates its own auxiliary.db and records that
    // migration in data.db: a write on the replica, which replited reports and repairs (once;
    // the restored data.db already holds the record).
    let rebuilds = log.matches("must be rebuilt").count();
    assert!(rebuilds <= 1, "{rebuilds} rebuilds:\n{log}");
    if rebuilds == 1 {
        assert!(log.contains("local write detected"), "{log}");
    }
    // SIGTERM reaches the app through replited.
    let log = replica.stop();
    assert!(log.contains("the app stopped"), "{log}");
    primary.stop();
    drop(primary_pb);
}
