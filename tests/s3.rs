//! S3-compatible storage end to end, against a real S3 server on 127.0.0.1 that checks
//! signatures (s3s-fs, installed by scripts/install-s3s).

mod common;
#[path = "common/flip_front.rs"]
mod flip_front;
#[path = "common/tls_front.rs"]
mod tls_front;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::s3::S3Server;
use common::*;

const BUCKET: &str = "replited-test";

/// A `[[database.replicate]]` block for the server.
fn s3_target(s: &S3Server, bucket: &str, secret: &str) -> String {
    format!(
        "\n[[database.replicate]]\nname = \"s3\"\n[database.replicate.params]\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{bucket}\"\nroot = \"backups\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{secret}\"\n",
        s.endpoint, s.access_key
    )
}

/// The world's config with its fs target replaced by `targets`, or with `targets` added.
fn configure(w: &World, targets: &str, keep_fs: bool) {
    let cfg = fs::read_to_string(&w.config).unwrap();
    let base = if keep_fs {
        cfg
    } else {
        cfg[..cfg.find("[[database.replicate]]").unwrap()].to_string()
    };
    fs::write(&w.config, format!("{base}{targets}")).unwrap();
}

/// `replited restore s3://BUCKET/backups/data.db -o OUT` with credentials from the environment.
fn restore_from_url(s: &S3Server, w: &World, out: &std::path::Path) {
    let o = s
        .restore_command(bin(), &format!("s3://{BUCKET}/backups/data.db"), out)
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "restore from the URL: {}", stderr(&o));
}

fn load_kill_restore(keep_fs: bool) {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    configure(&w, &s3_target(&s, BUCKET, &s.secret_key), keep_fs);
    let mut d = w.start("auto");
    let load = spawn_load(&w.db, 1, 3000, &["--rate", "1500"]);
    for ms in [400, 700] {
        std::thread::sleep(Duration::from_millis(ms));
        d.kill9();
        std::thread::sleep(Duration::from_millis(100));
        d = w.start("auto");
    }
    wait_ok(load);
    run_load(&w.db, 3001, 3100);
    d.stop();
    let primary = state(&w.db);
    assert_eq!(primary.0, 3100);
    // From the config (every target), and from the bucket alone by URL.
    let out = w.restore_ok("restored.db");
    assert_eq!(state(&out), primary);
    let out2 = w.path("from-url.db");
    restore_from_url(&s, &w, &out2);
    assert_eq!(integrity(&out2), "ok");
    assert_eq!(state(&out2), primary);
    assert!(
        s.keys(BUCKET)
            .iter()
            .any(|k| k.starts_with("backups/data.db/")),
        "objects under the prefix: {:?}",
        s.keys(BUCKET)
    );
}

/// The foundation's load-kill-restore with S3 as the only target.
#[test]
fn load_kill_restore_s3_only() {
    load_kill_restore(false);
}

/// The same with S3 and a local directory together; both restore to the primary.
#[test]
fn load_kill_restore_s3_and_fs() {
    load_kill_restore(true);
}

/// Wrong credentials or a missing bucket: replited refuses to start, naming the endpoint and
/// the bucket, and nothing is written.
#[test]
fn wrong_credentials_and_missing_bucket_are_named() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    let run = |targets: String| {
        configure(&w, &targets, false);
        let o = Command::new(bin())
            .args(["-c", w.config.to_str().unwrap(), "replicate"])
            .output()
            .unwrap();
        assert!(!o.status.success());
        stderr(&o)
    };
    let err = run(s3_target(&s, BUCKET, "not-the-secret"));
    assert!(err.contains(&s.endpoint), "{err}");
    assert!(err.contains(BUCKET), "{err}");
    assert!(err.contains("SignatureDoesNotMatch"), "{err}");
    let err = run(s3_target(&s, "no-such-bucket", &s.secret_key));
    assert!(err.contains(&s.endpoint), "{err}");
    assert!(err.contains("no-such-bucket"), "{err}");
    assert!(err.contains("NoSuchBucket"), "{err}");
    assert!(s.keys(BUCKET).is_empty());
}

/// An `https://` endpoint (the S3 server behind TLS, its certificate issued by a private CA):
/// not trusted by default, replited refuses to start, naming the endpoint and the certificate,
/// and writes nothing; with the CA in `SSL_CERT_FILE` (as an operator sets it in a drop-in) it
/// backs up over TLS, and a restore over TLS equals the primary.
#[test]
fn an_https_endpoint_is_verified_against_the_trusted_certificates() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    let certs = w.path("certs");
    make_certs(&certs, &["127.0.0.1"]);
    let front = tls_front::TlsFront::start(
        &certs.join("primary.pem"),
        &certs.join("primary-key.pem"),
        s.endpoint.trim_start_matches("http://"),
    );
    configure(
        &w,
        &s3_target(&s, BUCKET, &s.secret_key).replace(&s.endpoint, &front.endpoint),
        false,
    );
    let ca = certs.join("ca.pem");
    // The system's trust store does not know the private CA.
    let o = Command::new(bin())
        .args(["-c", w.config.to_str().unwrap(), "replicate"])
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains(&front.endpoint), "{err}");
    assert!(err.contains("invalid peer certificate"), "{err}");
    assert!(err.contains("SSL_CERT_FILE"), "{err}");
    assert!(
        !err.contains("attempt 2"),
        "a certificate error is not retried: {err}"
    );
    assert!(s.keys(BUCKET).is_empty(), "{:?}", s.keys(BUCKET));
    // Trusted through SSL_CERT_FILE.
    let trust = format!("SSL_CERT_FILE={}", ca.display());
    let d = w.start_under(&["env", &trust], "auto");
    run_load(&w.db, 1, 300);
    d.stop();
    let primary = state(&w.db);
    assert!(
        s.keys(BUCKET)
            .iter()
            .any(|k| k.starts_with("backups/data.db/")),
        "{:?}",
        s.keys(BUCKET)
    );
    let out = w.path("from-https.db");
    let o = Command::new(bin())
        .args(["restore", &format!("s3://{BUCKET}/backups/data.db")])
        .args(["-o", out.to_str().unwrap(), "--endpoint", &front.endpoint])
        .env("AWS_ACCESS_KEY_ID", &s.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s.secret_key)
        .env("AWS_REGION", &s.region)
        .env("SSL_CERT_FILE", &ca)
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "restore over TLS: {}", stderr(&o));
    assert_eq!(state(&out), primary);
    assert!(front.handshakes() > 2, "{} handshakes", front.handshakes());
}

/// Every upload carries its bytes' `Content-MD5`: a body changed on its way to the store (a byte
/// flipped in transit) is refused there (`BadDigest`) and sent again, and the backup restores
/// equal to the database.
#[test]
fn an_upload_corrupted_in_transit_is_refused_and_sent_again() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let front = flip_front::FlipFront::start(s.endpoint.trim_start_matches("http://"), 2);
    let w = World::new("");
    configure(
        &w,
        &s3_target(&s, BUCKET, &s.secret_key).replace(&s.endpoint, &front.endpoint),
        false,
    );
    let d = w.start_under(&["env", "RUST_LOG=replited=debug"], "auto");
    run_load(&w.db, 1, 300);
    let log = d.stop();
    assert_eq!(front.flipped(), 2, "{log}");
    assert!(
        log.contains("BadDigest"),
        "the store did not refuse a corrupted body:\n{log}"
    );
    // From the store directly (not through the faulty relay).
    let out = w.path("restored.db");
    restore_from_url(&s, &w, &out);
    assert_eq!(integrity(&out), "ok");
    assert_eq!(state(&out), state(&w.db));
}

/// Requests a primary sent, from the count it logs at exit: (PUT, DELETE).
fn requests_sent(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .rfind(|l| l.contains("S3 requests sent"))
        .unwrap_or_else(|| panic!("no request counts logged:\n{log}"));
    let count = |kind: &str| -> u64 {
        let rest = line.split(&format!("{kind} ")).nth(1).unwrap();
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (count("PUT"), count("DELETE"))
}

/// Single-row commits, one object each, then compaction merging them; returns the primary's
/// log and how many objects were deleted (uploaded but no longer in the bucket).
fn load_and_compact(s: &S3Server, endpoint: &str) -> (String, u64) {
    let w = World::new("compaction-interval = \"1s\"");
    configure(
        &w,
        &s3_target(s, BUCKET, &s.secret_key).replace(&s.endpoint, endpoint),
        false,
    );
    let d = w.start("auto");
    // 100/s: a commit per wake-up of capture even on a busy machine (at 300/s CI once saw 600
    // commits in 89 segments, too few objects for the batching to show).
    wait_ok(spawn_load(&w.db, 1, 600, &["--rate", "100"]));
    let level0 = || {
        s.keys(BUCKET)
            .iter()
            .filter(|k| k.ends_with(".l0.seg"))
            .count()
    };
    let start = std::time::Instant::now();
    while level0() > 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} level-0 objects still in the bucket\n{}",
            level0(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = d.stop();
    let (put, _) = requests_sent(&log);
    let deleted = put - s.keys(BUCKET).len() as u64;
    // The bucket alone restores to the primary.
    let out = w.path("restored.db");
    restore_from_url(s, &w, &out);
    assert_eq!(state(&out), state(&w.db));
    (log, deleted)
}

/// Compaction deletes the objects it merged up to a thousand to a request (DeleteObjects), not
/// one request each: requests are what a store bills, and each costs the primary CPU.
#[test]
fn compaction_deletes_merged_objects_in_batches() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let (log, deleted) = load_and_compact(&s, &s.endpoint);
    let (_, delete) = requests_sent(&log);
    assert!(deleted >= 100, "{deleted} objects deleted\n{log}");
    assert!(
        delete * 10 <= deleted,
        "{delete} DELETE requests for {deleted} objects\n{log}"
    );
}

/// A merged file whose upload takes long is no lag: the store holds every transaction in it,
/// in the segments it merged (deleted only once it is stored). `replited_target_lag_seconds`
/// stays near zero while compaction's upload is held 8 s by a relay — it counted from the merged
/// file's first commit, so an alert on it fired while nothing was missing — and rises as soon as
/// a commit's own upload waits.
#[test]
fn a_merged_file_waiting_for_upload_is_no_lag() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let front = flip_front::FlipFront::start(s.endpoint.trim_start_matches("http://"), 0);
    // The first compaction comes 5 s after start: the load's segments are all stored by then.
    let w = World::new("compaction-interval = \"5s\"");
    configure(
        &w,
        &s3_target(&s, BUCKET, &s.secret_key).replace(&s.endpoint, &front.endpoint),
        false,
    );
    let http = format!("127.0.0.1:{}", free_tcp_port());
    with_http(&w.config, &http, "");
    front.hold(Some((".l1.seg", Duration::from_secs(8))));
    let d = w.start("auto");
    wait_ok(spawn_load(&w.db, 1, 100, &["--rate", "200"]));
    let lag = |what: &str| {
        sample(&get_ok(&http, "/metrics"), what, "target=\"s3\"")
            .unwrap_or_else(|| panic!("no {what} for the s3 target"))
    };
    let start = std::time::Instant::now();
    while front.held() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no merged file uploaded\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Held for 8 s: sampled over 4 of them (a status refresh comes every 200 ms).
    let held = std::time::Instant::now();
    while held.elapsed() < Duration::from_secs(4) {
        let (secs, txns) = (
            lag("replited_target_lag_seconds"),
            lag("replited_target_lag_transactions"),
        );
        assert!(
            secs < 1.0 && txns == 0.0,
            "lag {secs} s, {txns} transactions while only a merged file waits\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A commit's own segment held: the target lacks it, and says so.
    front.hold(Some((".l0.seg", Duration::from_secs(8))));
    run_load(&w.db, 101, 101);
    let start = std::time::Instant::now();
    while lag("replited_target_lag_seconds") < 1.0 || lag("replited_target_lag_transactions") < 1.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "no lag while a commit waits for upload\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    front.hold(None);
    d.stop();
}

/// Stops `d` once the bucket holds a snapshot and nothing waits in the spool.
fn stop_once_stored(s: &S3Server, w: &World, d: Daemon) {
    let spool = w.dir.path().join(".data.db-replited-spool");
    let start = std::time::Instant::now();
    while !s.keys(BUCKET).iter().any(|k| k.ends_with(".snap")) || waiting(&spool) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.stop();
}

/// `replited restore s3://BUCKET/backups/data.db` from `endpoint` (a relay before `s`), checked
/// to give the world's database; the restore's log.
fn restore_through(s: &S3Server, w: &World, endpoint: &str) -> String {
    let out = w.path("restored.db");
    let o = Command::new(bin())
        .args(["restore", &format!("s3://{BUCKET}/backups/data.db"), "-o"])
        .arg(&out)
        .args(["--endpoint", endpoint])
        .env("AWS_ACCESS_KEY_ID", &s.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s.secret_key)
        .env("AWS_REGION", &s.region)
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "restore: {}", stderr(&o));
    assert_eq!(state(&out), state(&w.db));
    stderr(&o)
}

/// A download cut midway (the connection drops after 1 MB of a 5 MB snapshot) resumes from the
/// byte it reached with a ranged GET, not from the first; the restore is checked as ever.
#[test]
fn a_download_cut_midway_resumes_where_it_stopped() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    configure(&w, &s3_target(&s, BUCKET, &s.secret_key), false);
    write_blobs(&w.db, 50);
    stop_once_stored(&s, &w, w.start("auto"));
    let front = flip_front::FlipFront::start(s.endpoint.trim_start_matches("http://"), 0);
    front.cut(".snap", 1 << 20);
    let log = restore_through(&s, &w, &front.endpoint);
    assert_eq!(front.cuts_and_ranges(), (1, 1), "{log}");
}

/// A restore from a store far away opens the files it applies a few ahead: each segment's GET,
/// held 100 ms by a relay, starts while the files before it are applied, so a restore of many
/// small files waits for a round trip per few files, not per file — on connections kept open.
#[test]
fn a_restore_downloads_files_ahead_of_applying_them() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    configure(&w, &s3_target(&s, BUCKET, &s.secret_key), false);
    let d = w.start("auto");
    // A commit per segment (compaction comes after 10 s, when the daemon is stopped).
    wait_ok(spawn_load(&w.db, 1, 30, &["--rate", "30"]));
    stop_once_stored(&s, &w, d);
    let segments = s
        .keys(BUCKET)
        .iter()
        .filter(|k| k.ends_with(".seg"))
        .count();
    assert!(segments >= 10, "{segments} segments");
    let front = flip_front::FlipFront::start(s.endpoint.trim_start_matches("http://"), 0);
    front.hold(Some((".seg", Duration::from_millis(100))));
    restore_through(&s, &w, &front.endpoint);
    assert!(front.held() >= 10, "{} segment GETs", front.held());
    assert!(
        front.most_held_at_once() >= 2,
        "segment GETs one at a time ({} held, at most {} at once)",
        front.held(),
        front.most_held_at_once()
    );
    // The downloads keep their connections open: a round trip per file, not two or more.
    assert!(
        front.connections() * 2 <= front.held(),
        "{} connections for {} segment GETs",
        front.connections(),
        front.held()
    );
}

/// A store that does not implement DeleteObjects (answering 501 NotImplemented) gets the
/// merged objects deleted one request each, after one refused batch: said once in the log,
/// nothing left behind.
#[test]
fn a_store_without_multi_object_delete_gets_one_request_per_object() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let front =
        flip_front::FlipFront::refusing_bulk_delete(s.endpoint.trim_start_matches("http://"));
    let (log, deleted) = load_and_compact(&s, &front.endpoint);
    let (_, delete) = requests_sent(&log);
    assert_eq!(front.refused(), 1, "{log}");
    assert_eq!(
        log.matches("multi-object delete not implemented").count(),
        1,
        "{log}"
    );
    assert!(deleted >= 100, "{deleted} objects deleted\n{log}");
    assert!(
        delete > deleted,
        "{delete} DELETE requests for {deleted} objects\n{log}"
    );
}

/// The S3 server stopped for 30 s during a load: capture and the local directory target go on,
/// the files wait in the spool, the backlog drains once S3 is back, and a restore from the
/// bucket alone equals the primary.
#[test]
fn s3_outage_during_a_load_loses_nothing() {
    let mut s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    configure(&w, &s3_target(&s, BUCKET, &s.secret_key), true);
    // The status server shows the target degraded while S3 is down.
    let http = format!("127.0.0.1:{}", free_tcp_port());
    let cfg = fs::read_to_string(&w.config).unwrap();
    fs::write(&w.config, format!("{cfg}\n[http]\naddr = \"{http}\"\n")).unwrap();
    let d = w.start("auto");
    run_load(&w.db, 1, 300);
    let status = || {
        http_get(&http, "/status")
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    assert!(!status().contains("degraded"), "{}", status());
    s.stop();
    let load = spawn_load(&w.db, 301, 3300, &["--rate", "100"]);
    // The local directory keeps up while S3 is down.
    let before = w.stored_files().len();
    std::thread::sleep(Duration::from_secs(15));
    let during = w.stored_files().len();
    assert!(
        during > before,
        "the fs target stalled while S3 was down ({before} -> {during} files)\n{}",
        d.log_text()
    );
    d.wait_for_log(
        "retrying with backoff while files wait in the spool",
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_secs(2));
    let during = status();
    assert!(
        during.contains("degraded: s3://") && during.contains("waiting in the spool"),
        "/status does not show the S3 target degraded: {during}"
    );
    std::thread::sleep(Duration::from_secs(13));
    s.restart();
    wait_ok(load);
    d.wait_for_log("answers again", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!status().contains("degraded"), "{}", status());
    let log = d.stop();
    assert!(
        !log.contains("stay in the spool"),
        "the backlog drained:\n{log}"
    );
    let spool = w.dir.path().join(".data.db-replited-spool");
    let left: Vec<_> = walk(&spool);
    assert!(left.is_empty(), "files left in the spool: {left:?}");
    let out = w.path("from-s3.db");
    restore_from_url(&s, &w, &out);
    assert_eq!(integrity(&out), "ok");
    assert_eq!(state(&out), state(&w.db));
    assert_eq!(state(&out), expect(3300));
}

/// Files waiting for upload in a spool (not the `.up` copies of uploaded ones).
fn waiting(spool: &std::path::Path) -> usize {
    spooled(&walk(spool)).len()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Peak resident memory of a running process (VmHWM), in MB.
fn peak_rss_mb(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// A 1 GB database: its snapshot goes to S3 and comes back by restore, with replited's memory
/// (peak RSS) under 100 MB both ways.
#[test]
fn one_gigabyte_snapshot_with_bounded_memory() {
    const LIMIT_MB: u64 = 100;
    // The database, its copy in the spool, the object in the bucket and the restored copy.
    if !enough_disk("one_gigabyte_snapshot_with_bounded_memory", 5_000_000_000) {
        return;
    }
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    configure(&w, &s3_target(&s, BUCKET, &s.secret_key), false);
    fill(&w.db, 1024);
    assert!(fs::metadata(&w.db).unwrap().len() > 1_000_000_000);
    let d = w.start("auto");
    // Wait until the snapshot is in the bucket and nothing waits in the spool.
    let spool = w.dir.path().join(".data.db-replited-spool");
    let start = std::time::Instant::now();
    loop {
        let uploaded = s.keys(BUCKET).iter().any(|k| k.ends_with(".snap"));
        if uploaded && waiting(&spool) == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the snapshot was not uploaded (disk free: {} MB):\n{}\ns3s-fs:\n{}",
            disk_free(w.dir.path()) / 1_000_000,
            d.log_text(),
            tail(&s.log(), 4000)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let up = start.elapsed();
    let rss = peak_rss_mb(d.child.id());
    d.stop();
    assert!(rss > 0 && rss < LIMIT_MB, "replicate peaked at {rss} MB");
    // Restore from the bucket, watching the restore's own peak.
    let out = w.path("restored.db");
    let t = std::time::Instant::now();
    let mut child = Command::new(bin())
        .args([
            "restore",
            &format!("s3://{BUCKET}/backups/data.db"),
            "-o",
            out.to_str().unwrap(),
            "--endpoint",
            &s.endpoint,
        ])
        .env("AWS_ACCESS_KEY_ID", &s.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s.secret_key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut restore_rss = 0;
    while child.try_wait().unwrap().is_none() {
        restore_rss = restore_rss.max(peak_rss_mb(child.id()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "restore: {}", stderr(&o));
    eprintln!(
        "1 GB snapshot: upload {:.1}s, replicate peak {rss} MB; restore {:.1}s, peak {restore_rss} MB",
        up.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        restore_rss > 0 && restore_rss < LIMIT_MB,
        "restore peaked at {restore_rss} MB"
    );
    assert_eq!(
        fs::metadata(&out).unwrap().len(),
        fs::metadata(&w.db).unwrap().len()
    );
    assert_eq!(state(&out), state(&w.db));
}

/// A replica with no connection to the primary: `replica-sidecar` with only an S3 target
/// restores the latest backup from the bucket, then follows it, and converges to the primary
/// across compactions of the files it reads.
#[test]
fn replica_follows_the_bucket_alone() {
    let (_s, w, d, r, rdb) = bucket_follower("2s", 200);
    let load = spawn_load(&w.db, 201, 1700, &["--rate", "150"]);
    wait_ok(load);
    wait_same(&w.db, &rdb, &r, Duration::from_secs(150));
    assert_eq!(integrity(&rdb), "ok");
    let rlog = r.stop();
    assert!(
        rlog.contains("restoring the latest backup from the bucket"),
        "{rlog}"
    );
    assert!(
        !rlog.contains("must be rebuilt"),
        "no rebuild while following:\n{rlog}"
    );
    d.stop();
}

/// A `replica-sidecar` following the bucket of `s` alone (debug logs); its database.
fn start_bucket_replica(w: &World, s: &S3Server) -> (Daemon, std::path::PathBuf) {
    start_bucket_replica_at(w, s, &s.endpoint)
}

/// As [`start_bucket_replica`], reaching the store at `endpoint` (a front before it).
fn start_bucket_replica_at(
    w: &World,
    s: &S3Server,
    endpoint: &str,
) -> (Daemon, std::path::PathBuf) {
    let rdir = w.path("replica");
    fs::create_dir_all(&rdir).unwrap();
    let rdb = rdir.join("data.db");
    let rcfg = w.path("replica.toml");
    fs::write(
        &rcfg,
        format!(
            "[log]\nlevel = \"debug\"\n[[database]]\ndb = \"{}\"\n{}",
            rdb.display(),
            s3_target(s, BUCKET, &s.secret_key).replace(&s.endpoint, endpoint)
        ),
    )
    .unwrap();
    let log = w.path(&format!("replica-{}.log", now_ns()));
    let child = Command::new(bin())
        .args(["-c", rcfg.to_str().unwrap(), "replica-sidecar"])
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Daemon { child, log }, rdb)
}

/// A replica following the bucket lists it (every second) on a kept-open connection, not on a
/// new connection — and for `https://` a TLS handshake — per poll.
#[test]
fn a_bucket_replica_lists_on_a_kept_open_connection() {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    configure(&w, &s3_target(&s, BUCKET, &s.secret_key), false);
    let d = w.start("auto");
    run_load(&w.db, 1, 20);
    let front = flip_front::FlipFront::start(s.endpoint.trim_start_matches("http://"), 0);
    let (r, rdb) = start_bucket_replica_at(&w, &s, &front.endpoint);
    r.wait_for_log("caught up with the bucket", Duration::from_secs(60));
    // Each listing from here on counted (held for no time), and the connections opened.
    front.hold(Some(("list-type=2", Duration::ZERO)));
    let (lists, connections) = (front.held(), front.connections());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while front.held() - lists < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let listed = front.held() - lists;
    assert!(listed >= 5, "{listed} listings in 60 s");
    let opened = front.connections() - connections;
    assert!(
        opened <= 1,
        "{opened} connections opened for {listed} listings"
    );
    // And it still follows.
    run_load(&w.db, 21, 25);
    wait_same(&w.db, &rdb, &r, Duration::from_secs(60));
    r.stop();
    d.stop();
}

/// A primary with only an S3 target on a new server (compaction every `compaction`), rows
/// 1..=`rows` committed, and a replica following its bucket, caught up: (server, world, primary,
/// replica, the replica's database).
fn bucket_follower(
    compaction: &str,
    rows: u64,
) -> (S3Server, World, Daemon, Daemon, std::path::PathBuf) {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new(&format!("compaction-interval = \"{compaction}\""));
    configure(&w, &s3_target(&s, BUCKET, &s.secret_key), false);
    let d = w.start("auto");
    run_load(&w.db, 1, rows);
    let (r, rdb) = start_bucket_replica(&w, &s);
    r.wait_for_log("caught up with the bucket", Duration::from_secs(60));
    (s, w, d, r, rdb)
}

/// Waits (up to `limit`) until the replica `rdb` holds what the primary `db` does.
fn wait_same(db: &std::path::Path, rdb: &std::path::Path, r: &Daemon, limit: Duration) {
    let want = state(db);
    let start = std::time::Instant::now();
    while !(rdb.exists() && state(rdb) == want) {
        assert!(
            start.elapsed() < limit,
            "the replica did not converge: {:?} vs {want:?}\n{}",
            state(rdb),
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Files reach a bucket out of order (the primary uploads compaction's merged files on a thread
/// of its own, behind later commits' segments): a replica following the bucket that finds newer
/// files but not the one continuing from its position waits for it, and goes on without a
/// rebuild once it arrives. (It rebuilt at once: with `--exec`, the app restarted for nothing.)
#[test]
fn a_bucket_replica_waits_for_a_file_that_reaches_the_bucket_late() {
    let (s, w, d, r, rdb) = bucket_follower("1h", 100);
    wait_same(&w.db, &rdb, &r, Duration::from_secs(60));
    let first = r.stop();
    let bucket = s.root.join(BUCKET);
    let segments = || {
        let mut v: Vec<_> = walk(&bucket)
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".seg"))
            .collect();
        v.sort();
        v
    };
    let seen = segments();
    run_load(&w.db, 101, 150);
    let spool = w.dir.path().join(".data.db-replited-spool");
    let start = std::time::Instant::now();
    while waiting(&spool) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The file continuing from the replica's position is held back; newer ones are there.
    let new: Vec<_> = segments()
        .into_iter()
        .filter(|p| !seen.contains(p))
        .collect();
    assert!(new.len() >= 2, "{new:?}");
    let late = &new[0];
    let aside = w.path("late.seg");
    fs::rename(late, &aside).unwrap();
    let (r, _) = start_bucket_replica(&w, &s);
    r.wait_for_log("waiting up to", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    fs::rename(&aside, late).unwrap();
    wait_same(&w.db, &rdb, &r, Duration::from_secs(60));
    assert_eq!(integrity(&rdb), "ok");
    let log = r.stop();
    assert!(!log.contains("must be rebuilt"), "{first}\n---\n{log}");
    assert!(!log.contains("restoring the latest backup"), "{log}");
    d.stop();
}

/// A streamed replica's initial restore downloads from the primary's bucket through the
/// restore-config flow (the primary requires client certificates, so it may hand out the
/// bucket's credentials), then follows the primary over QUIC.
/// A primary configured with an S3 target on `s` and a stream server requiring client
/// certificates; the stream's UDP port.
fn configure_stream(w: &World, s: &S3Server) -> u16 {
    let certs = w.path("certs");
    let c = certs.to_str().unwrap();
    make_certs(&certs, &["127.0.0.1"]);
    let port = free_udp_port();
    configure(
        w,
        &format!(
            "{}\n[[database.replicate]]\nname = \"stream\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:{port}\"\ntls_cert = \"{c}/primary.pem\"\ntls_key = \"{c}/primary-key.pem\"\ntls_client_ca = \"{c}/ca.pem\"\n",
            s3_target(s, BUCKET, &s.secret_key)
        ),
        false,
    );
    port
}

/// A `replica-sidecar` streaming from the primary of [`configure_stream`]; its database.
fn start_replica(w: &World, port: u16) -> (Daemon, std::path::PathBuf) {
    let c = w.path("certs");
    let c = c.to_str().unwrap();
    let rdir = w.path("replica");
    fs::create_dir_all(&rdir).unwrap();
    let rdb = rdir.join("data.db");
    let rcfg = w.path("replica.toml");
    fs::write(
        &rcfg,
        format!(
            "[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"primary\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"http://127.0.0.1:{port}\"\ntls_ca = \"{c}/ca.pem\"\ntls_cert = \"{c}/replica-1.pem\"\ntls_key = \"{c}/replica-1-key.pem\"\n",
            rdb.display()
        ),
    )
    .unwrap();
    let log = w.path("replica.log");
    let child = Command::new(bin())
        .args(["-c", rcfg.to_str().unwrap(), "replica-sidecar"])
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Daemon { child, log }, rdb)
}

/// A primary with an S3 target on a new server and a stream server (`extra` in its database's
/// section, `[http]` on `http` when given), rows 1..=`rows` committed, and a streamed replica
/// caught up: (server, world, stream port, primary, replica, the replica's database).
fn stream_follower(
    extra: &str,
    http: Option<&str>,
    rows: u64,
) -> (S3Server, World, u16, Daemon, Daemon, std::path::PathBuf) {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new(extra);
    let port = configure_stream(&w, &s);
    if let Some(a) = http {
        with_http(&w.config, a, "");
    }
    let d = w.start("auto");
    run_load(&w.db, 1, rows);
    let (r, rdb) = start_replica(&w, port);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    (s, w, port, d, r, rdb)
}

#[test]
fn stream_replica_restores_from_the_bucket() {
    let (s, w, _, d, r, rdb) = stream_follower("", None, 300);
    let text = r.log_text();
    assert!(
        text.contains(&format!(
            "restoring from the primary's backup s3://{BUCKET}/backups/data.db"
        )),
        "{text}"
    );
    assert!(!text.contains(&s.secret_key), "credentials never logged");
    run_load(&w.db, 301, 600);
    let want = state(&w.db);
    let start = std::time::Instant::now();
    while state(&rdb) != want {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    r.stop();
    let plog = d.stop();
    assert!(!plog.contains(&s.secret_key), "credentials never logged");
}

/// A replica further behind than the primary keeps in memory catches up from what waits in
/// the spool while S3 is down (the stream server reads history through the spool too: it
/// used to see only the bucket, and had the replica rebuilt from it).
#[test]
fn stream_replica_catches_up_from_the_spool_while_s3_is_down() {
    let (mut s, w, port, d, r, rdb) = stream_follower("", None, 100);
    wait_converged(&w.db, &rdb, Duration::from_secs(30), &[&d, &r]);
    let rlog = r.stop();
    s.stop();
    // More than the stream server's 8 MiB of recent transactions, written while the replica
    // is away and S3 cannot take them.
    write_blobs(&w.db, 120);
    run_load(&w.db, 101, 400);
    let (r, _) = start_replica(&w, port);
    wait_converged(&w.db, &rdb, Duration::from_secs(60), &[&d, &r]);
    let log = r.stop();
    assert!(!log.contains("must be rebuilt"), "{rlog}\n---\n{log}");
    assert_eq!(state(&rdb).0, 400);
    assert_eq!(state(&rdb), state(&w.db));
    assert_eq!(integrity(&rdb), "ok");
    s.restart();
    d.stop();
}

/// A replica further behind than the primary keeps in memory gets the rest read back from the
/// bucket with each stored file downloaded once: the stream server walks the chain of stored
/// files for it, handing the transactions over in batches as it goes. (It listed the bucket and
/// downloaded the files of each 4 MiB batch anew, a merged file once per batch it held: a
/// replica that fell behind at 10,000 commits/s read back slower than the primary wrote and
/// never caught up.)
#[test]
fn a_replica_far_behind_gets_each_stored_file_downloaded_once() {
    let http = format!("127.0.0.1:{}", free_tcp_port());
    let (s, w, port, d, r, rdb) = stream_follower("compaction-interval = \"2s\"", Some(&http), 100);
    wait_converged(&w.db, &rdb, Duration::from_secs(30), &[&d, &r]);
    let rlog = r.stop();
    // 100 MB in transactions of 100 KB while the replica is away, merged by compaction into
    // files of many batches each, uploaded (a merged file keeps no local copy).
    write_blobs(&w.db, 1000);
    // Then rows, so that the replica's state (the rows' ledger) is the primary's only once it has
    // every blob before them too.
    run_load(&w.db, 101, 200);
    let spool = w.dir.path().join(".data.db-replited-spool");
    let bucket = s.root.join(BUCKET);
    let segments = |level: &str| {
        walk(&bucket)
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(&format!(".l{level}.seg")))
            .count()
    };
    let start = std::time::Instant::now();
    let gets = || {
        sample(
            &get_ok(&http, "/metrics"),
            "replited_s3_requests_total",
            "kind=\"get\"",
        )
        .unwrap()
    };
    while waiting(&spool) > 0 || segments("0") > 1 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "compaction did not settle: {} waiting, {} level-0 objects\n{}",
            waiting(&spool),
            segments("0"),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let merged = segments("1");
    let before = gets();
    let (r, _) = start_replica(&w, port);
    wait_converged(&w.db, &rdb, Duration::from_secs(120), &[&d, &r]);
    let log = r.stop();
    let downloads = gets() - before;
    assert!(!log.contains("must be rebuilt"), "{rlog}\n---\n{log}");
    assert_eq!(state(&rdb), state(&w.db));
    assert_eq!(integrity(&rdb), "ok");
    let plog = d.stop();
    // At least one: the replica was further behind than the primary's memory.
    assert!(
        downloads >= 1.0 && downloads <= merged as f64,
        "{downloads} downloads for {merged} merged objects in the bucket\n{plog}"
    );
}

/// The spool is bounded: with S3 down and more waiting than `spool_limit_mb`, capture is held
/// back with an error saying so; once S3 is back everything drains and nothing is lost.
#[test]
fn spool_limit_holds_capture_back_with_a_clear_error() {
    let mut s = S3Server::start();
    s.create_bucket(BUCKET);
    let w = World::new("");
    configure(
        &w,
        &format!(
            "{}spool_limit_mb = 1\n",
            s3_target(&s, BUCKET, &s.secret_key)
        ),
        false,
    );
    let d = w.start("auto");
    run_load(&w.db, 1, 50);
    s.stop();
    run_load(&w.db, 51, 1500);
    // And 2 MB of incompressible rows in one transaction: more than the limit whatever
    // compaction makes of the commits (merged, their pages are stored as deltas: a fraction of
    // a megabyte for all). Then the app's TRUNCATE checkpoint, while capture is held back: the
    // next write (another process) starts the WAL with new salts, and the history goes on in
    // the same generation (a new one would need a snapshot the full spool cannot take).
    fill(&w.db, 2);
    d.wait_for_log("at its limit of 1 MB", Duration::from_secs(60));
    s.restart();
    run_load(&w.db, 1501, 1600);
    d.wait_for_log("answers again", Duration::from_secs(60));
    let log = d.stop();
    assert!(!log.contains("stay in the spool"), "{log}");
    assert_eq!(log.matches("starting a new generation").count(), 1, "{log}");
    let out = w.path("from-s3.db");
    restore_from_url(&s, &w, &out);
    assert_eq!(state(&out), expect(1600));
}
