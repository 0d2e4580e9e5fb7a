//! The operator's surface: `/metrics` checked by Prometheus's own `promtool` and holding every
//! metric docs/METRICS.md lists; lag and `/health` following a replica frozen with SIGSTOP;
//! the example alert rules and dashboard naming only real metrics; `replited status`,
//! `snapshots` and `verify` (which names a flipped byte).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Opts};
use common::s3::S3Server;
use common::*;

fn promtool() -> PathBuf {
    let o = Command::new(repo().join("scripts/install-promtool"))
        .output()
        .unwrap();
    assert!(o.status.success(), "install-promtool: {}", stderr(&o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// The metric names docs/METRICS.md lists (its table's first column).
fn documented() -> BTreeSet<String> {
    let doc = fs::read_to_string(repo().join("docs/METRICS.md")).unwrap();
    let names: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `replited_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("replited_{n}"))
        .collect();
    assert!(names.len() > 20, "docs/METRICS.md lists {names:?}");
    names
}

/// The metric families (`# TYPE` lines) of an exposition.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn promtool_check_metrics(text: &str) {
    let mut c = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A primary with an fs target, an S3 target and a stream server, and a replica: both
/// `/metrics` pass `promtool check metrics`, and between them hold every metric
/// docs/METRICS.md lists, with values that follow the load.
#[test]
fn metrics_pass_promtool_and_hold_every_documented_metric() {
    let mut s3 = S3Server::start();
    s3.create_bucket("backups");
    let c = Cluster::new(Opts::default());
    let (pa, ra) = (
        format!("127.0.0.1:{}", free_tcp_port()),
        format!("127.0.0.1:{}", free_tcp_port()),
    );
    with_http(&c.pcfg, &pa, "");
    with_http(&c.rcfg, &ra, "");
    let mut cfg = fs::read_to_string(&c.pcfg).unwrap();
    cfg.push_str(&format!(
        "\n[[database.replicate]]\nname = \"s3\"\n[database.replicate.params]\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"backups\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        s3.endpoint, s3.access_key, s3.secret_key
    ));
    fs::write(&c.pcfg, cfg).unwrap();
    let p = c.primary();
    run_load(&c.pdb, 1, 300);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    run_load(&c.pdb, 301, 400);
    let want = state(&c.pdb);
    wait_until("the replica catching up", Duration::from_secs(30), || {
        (state(&c.rdb) == want).then_some(String::new())
    });

    let pm = wait_until("the S3 target catching up", Duration::from_secs(30), || {
        let m = get_ok(&pa, "/metrics");
        (sample(&m, "replited_target_lag_transactions", "target=\"s3\"") == Some(0.0)
            && sample(&m, "replited_replica_lag_transactions", "") == Some(0.0))
        .then_some(m)
    });
    let rm = get_ok(&ra, "/metrics");
    promtool_check_metrics(&pm);
    promtool_check_metrics(&rm);
    let have: BTreeSet<String> = families(&pm).union(&families(&rm)).cloned().collect();
    let missing: Vec<_> = documented().difference(&have).cloned().collect();
    assert!(
        missing.is_empty(),
        "documented but not exported: {missing:?}\n--- primary:\n{pm}\n--- replica:\n{rm}"
    );
    let undocumented: Vec<_> = have.difference(&documented()).cloned().collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/METRICS.md: {undocumented:?}"
    );

    // The figures follow the load.
    let db = "db=\"data.db\"";
    assert!(
        sample(&pm, "replited_transactions_captured_total", db).unwrap() >= 400.0,
        "{pm}"
    );
    assert!(
        sample(
            &pm,
            "replited_upload_duration_seconds_count",
            "target=\"s3\""
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(sample(&pm, "replited_up", db), Some(1.0));
    assert!(sample(&pm, "replited_s3_requests_total", "kind=\"put\"").unwrap() > 0.0);
    assert!(
        sample(&rm, "replited_records_replicated_total", db).unwrap() >= 100.0,
        "{rm}"
    );
    assert!(
        sample(&rm, "replited_lag_seconds", db).unwrap() < 5.0,
        "{rm}"
    );
    assert_eq!(sample(&rm, "replited_info", "role=\"replica\""), Some(1.0));

    // /status agrees: the primary's targets and replica, the replica's position.
    let ps: serde_json::Value = serde_json::from_str(&get_ok(&pa, "/status")).unwrap();
    let d = &ps["databases"][0];
    assert_eq!(ps["role"], "primary");
    let names: Vec<&str> = d["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["backup", "s3"], "{ps}");
    assert_eq!(d["replicas"].as_array().unwrap().len(), 1, "{ps}");
    assert_eq!(d["txid"], d["last_lsn"]);
    let rs: serde_json::Value = serde_json::from_str(&get_ok(&ra, "/status")).unwrap();
    assert_eq!(rs["role"], "replica");
    assert_eq!(rs["databases"][0]["txid"], d["txid"], "{rs}\n{ps}");
    assert_eq!(get_ok(&pa, "/health"), "{\"status\":\"ok\"}\n");
    assert_eq!(get_ok(&ra, "/health"), "{\"status\":\"ok\"}\n");

    // `replited status` asks the running daemon.
    let o = Command::new(bin())
        .args(["-c", c.pcfg.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("healthy")
            && out.contains("target s3: lag")
            && out.contains("replica 127.0.0.1:"),
        "{out}"
    );
    let o = Command::new(bin())
        .args(["status", "--json", "--addr", &ra])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["role"], "replica");
    r.stop();
    p.stop();
    s3.stop();
}

/// A replica frozen with SIGSTOP under load: on the primary, its lag in `/metrics` and
/// `/status` grows and `/health` turns 503 naming it; after SIGCONT they return to normal.
#[test]
fn frozen_replica_shows_in_lag_and_health() {
    let c = Cluster::new(Opts::default());
    let pa = format!("127.0.0.1:{}", free_tcp_port());
    with_http(&c.pcfg, &pa, "max-lag = \"1s\"");
    let p = c.primary();
    run_load(&c.pdb, 1, 100);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    let load = spawn_load(&c.pdb, 101, 2100, &["--rate", "100"]);
    wait_until(
        "/health 200 with the replica streaming",
        Duration::from_secs(20),
        || (http_get(&pa, "/health").map(|x| x.0) == Some(200)).then_some(String::new()),
    );
    let pid = nix::unistd::Pid::from_raw(r.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    // Within the QUIC idle timeout (10 s) the session is still there, its lag growing.
    let reason = wait_until(
        "/health 503 for the frozen replica",
        Duration::from_secs(8),
        || {
            let (code, body) = http_get(&pa, "/health")?;
            (code == 503).then_some(body)
        },
    );
    assert!(
        reason.contains("replica 127.0.0.1:") && reason.contains("behind"),
        "{reason}"
    );
    let m = get_ok(&pa, "/metrics");
    let lag = sample(&m, "replited_replica_lag_seconds", "db=\"data.db\"").unwrap();
    let txns = sample(&m, "replited_replica_lag_transactions", "db=\"data.db\"").unwrap();
    assert!(
        lag >= 1.0 && txns >= 50.0,
        "lag {lag} s, {txns} transactions\n{m}"
    );
    let st: serde_json::Value = serde_json::from_str(&get_ok(&pa, "/status")).unwrap();
    let lag_ms = st["databases"][0]["replicas"][0]["lag_ms"]
        .as_u64()
        .unwrap();
    assert!(lag_ms >= 1000, "{st}");
    // Still frozen a moment later: the lag has only grown.
    std::thread::sleep(Duration::from_millis(700));
    let st2: serde_json::Value = serde_json::from_str(&get_ok(&pa, "/status")).unwrap();
    let later = st2["databases"][0]["replicas"][0]["lag_ms"]
        .as_u64()
        .unwrap();
    assert!(
        later > lag_ms,
        "lag did not grow while frozen: {lag_ms} → {later}"
    );
    assert!(
        frozen.elapsed() < Duration::from_secs(10),
        "the checks outlasted the idle timeout"
    );

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_ok(load);
    wait_until("/health 200 after SIGCONT", Duration::from_secs(60), || {
        (http_get(&pa, "/health").map(|x| x.0) == Some(200)).then_some(String::new())
    });
    let m = wait_until("replica lag back to 0", Duration::from_secs(30), || {
        let m = get_ok(&pa, "/metrics");
        (sample(&m, "replited_replica_lag_transactions", "db=\"data.db\"") == Some(0.0))
            .then_some(m)
    });
    assert_eq!(
        sample(&m, "replited_replica_lag_seconds", "db=\"data.db\""),
        Some(0.0)
    );
    // The last transactions of the load may still be on their way (lag 0 is measured against
    // what is durable): the replica converges.
    let want = state(&c.pdb);
    wait_until("the replica converging", Duration::from_secs(30), || {
        (state(&c.rdb) == want).then_some(String::new())
    });
    r.stop();
    p.stop();
}

/// Every `replited_*` name in `text`, with histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("replited_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(n) = name.strip_suffix(suffix) {
                if n.ends_with("_seconds") {
                    name = n;
                }
            }
        }
        out.insert(name.to_string());
        rest = &tail[end..];
    }
    out
}

/// promtool accepts the alert rules; the rules and the dashboard (valid JSON) name only
/// metrics docs/METRICS.md lists (which the first test checks are exported).
#[test]
fn alert_rules_and_dashboard_use_real_metrics() {
    let rules = repo().join("examples/prometheus/replited-alerts.yml");
    let o = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let docs = documented();
    let in_rules = metric_names(&fs::read_to_string(&rules).unwrap());
    let unknown: Vec<_> = in_rules.difference(&docs).collect();
    assert!(
        unknown.is_empty(),
        "alert rules name unknown metrics: {unknown:?}"
    );
    for m in [
        "replited_target_lag_seconds",
        "replited_replica_lag_seconds",
        "replited_errors_total",
        "replited_wal_size_bytes",
        "replited_target_last_sync_timestamp_seconds",
    ] {
        assert!(in_rules.contains(m), "no alert on {m}");
    }

    let dash: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(repo().join("examples/grafana/replited-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let used = metric_names(&exprs.join("\n"));
    let unknown: Vec<_> = used.difference(&docs).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard names unknown metrics: {unknown:?}"
    );
}

/// `replited snapshots` lists what the backup holds; `replited verify` passes on a good backup
/// and fails, naming the file, on one with a flipped byte — leaving nothing behind.
#[test]
fn snapshots_and_verify() {
    let w = World::new("");
    let d = w.start("auto");
    run_load(&w.db, 1, 200);
    d.stop();
    let cfg = w.config.to_str().unwrap();
    let o = Command::new(bin())
        .args(["-c", cfg, "snapshots"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("data.db in backup") && out.contains("snapshot"),
        "{out}"
    );
    let o = Command::new(bin())
        .args(["-c", cfg, "snapshots", "--all"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(" L0 "),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    let o = Command::new(bin())
        .args(["-c", cfg, "verify"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.starts_with("ok: data.db in backup"), "{out}");

    let seg = w
        .stored_files()
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".seg"))
        .unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    fs::write(&seg, bytes).unwrap();
    let before: Vec<_> = fs::read_dir(w.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let o = Command::new(bin())
        .args(["-c", cfg, "verify"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{out}{}", stderr(&o));
    assert!(out.contains("FAILED: data.db in backup"), "{out}");
    assert!(
        out.contains(&seg.display().to_string()),
        "the damaged file is not named: {out}"
    );
    assert!(stderr(&o).contains("verification failed"), "{}", stderr(&o));
    let after: Vec<_> = fs::read_dir(w.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after, "verify left files behind");
}
