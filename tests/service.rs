//! replited as a service, end to end with the real binary: the status server (`/health`,
//! `/status`) on a socket systemd passes or on `[http] addr`, both sockets of socket activation
//! used, `replited run` choosing the role the config declares, and SIGHUP applying new storage
//! targets in the running process.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;

/// Sends `raw` to 127.0.0.1:`port` and reads until the server closes the connection.
fn exchange(port: u16, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// An HTTP/1.1 response: status code, headers (lower-case names), body.
struct Response {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?;
    assert!(status.starts_with("HTTP/1.1 "), "status line {status:?}");
    let code = status.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Response {
        code,
        headers,
        body: body.to_string(),
    })
}

/// A request with method and path; None when the server could not be reached or answered
/// nothing parseable.
fn request(port: u16, method: &str, path: &str) -> Option<Response> {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: replited-tests\r\nConnection: close\r\n\r\n"
    );
    let r = parse_response(&exchange(port, raw.as_bytes()).ok()?)?;
    if method != "HEAD" {
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str()),
            "{method} {path}: Content-Length must be the body's length: {:?}",
            r.body
        );
    }
    Some(r)
}

fn get(port: u16, path: &str) -> Option<Response> {
    request(port, "GET", path)
}

/// `GET /status`, parsed.
fn status(port: u16) -> serde_json::Value {
    let r = get(port, "/status").expect("GET /status answered");
    assert_eq!(r.code, 200, "/status: {}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", r.body))
}

/// Polls `f` every 50 ms until it gives Some, or panics after `limit` with the logs.
fn wait_until<T>(
    limit: Duration,
    what: &str,
    logs: &[&Daemon],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            let logs: Vec<String> = logs.iter().map(|d| d.log_text()).collect();
            panic!("{what}: not within {limit:?}\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(mut cmd: Command, log: PathBuf) -> Daemon {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon { child, log }
}

/// A primary database, a replica directory, a development CA and certificates.
struct Setup {
    dir: tempfile::TempDir,
    pdb: PathBuf,
    rdb: PathBuf,
    backup: PathBuf,
    certs: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("replited-service")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for sub in ["primary", "replica"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let certs = d.join("certs");
        make_certs(&certs, &["127.0.0.1", "localhost"]);
        let pdb = d.join("primary/data.db");
        // The app creates its database before replited starts.
        run_load(&pdb, 1, 0);
        Setup {
            pdb,
            rdb: d.join("replica/data.db"),
            backup: d.join("backup"),
            certs,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A primary config: an fs target and a stream server on `quic_port`, then `extra` (TOML
    /// tables such as `[http]`).
    fn primary_config(&self, quic_port: u16, extra: &str) -> PathBuf {
        let c = self.certs.display();
        let p = self.path("primary.toml");
        fs::write(
            &p,
            format!(
                "[log]\nlevel = \"debug\"\n\n{extra}\n[[database]]\ndb = \"{}\"\n\n[[database.replicate]]\nname = \"backup\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"{}\"\n\n[[database.replicate]]\nname = \"stream\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:{quic_port}\"\ntls_cert = \"{c}/primary.pem\"\ntls_key = \"{c}/primary-key.pem\"\ntls_client_ca = \"{c}/ca.pem\"\n",
                self.pdb.display(),
                self.backup.display(),
            ),
        )
        .unwrap();
        p
    }

    /// A replica config following 127.0.0.1:`quic_port`; `top` goes before every table (e.g.
    /// `role = "replica"`), `extra` after `[log]`.
    fn replica_config(&self, quic_port: u16, top: &str, extra: &str) -> PathBuf {
        let c = self.certs.display();
        let p = self.path("replica.toml");
        fs::write(
            &p,
            format!(
                "{top}\n[log]\nlevel = \"debug\"\n\n{extra}\n[[database]]\ndb = \"{}\"\n\n[[database.replicate]]\nname = \"primary\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"http://127.0.0.1:{quic_port}\"\ntls_ca = \"{c}/ca.pem\"\ntls_cert = \"{c}/replica-1.pem\"\ntls_key = \"{c}/replica-1-key.pem\"\n",
                self.rdb.display(),
            ),
        )
        .unwrap();
        p
    }

    fn log(&self, what: &str) -> PathBuf {
        self.path(&format!(
            "{what}-{}.log",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ))
    }
}

/// The first database's object of a `/status` answer.
fn db0(s: &serde_json::Value) -> &serde_json::Value {
    &s["databases"][0]
}

fn txid(s: &serde_json::Value) -> Option<u64> {
    db0(s)["txid"].as_u64()
}

/// Waits until the replica holds the primary's content.
fn wait_same_state(primary: &Path, replica: &Path, limit: Duration, logs: &[&Daemon]) {
    let want = state(primary);
    wait_until(
        limit,
        "the replica reaching the primary's state",
        logs,
        || (replica.exists() && state(replica) == want).then_some(()),
    );
}

/// Checks `last_sync_time` is an RFC 3339 time of the last minute.
fn assert_recent_rfc3339(v: &serde_json::Value) {
    let t = v
        .as_str()
        .unwrap_or_else(|| panic!("last_sync_time is not a string: {v}"));
    let at = humantime::parse_rfc3339(t)
        .unwrap_or_else(|e| panic!("last_sync_time {t:?} is not RFC 3339: {e}"));
    let age = SystemTime::now()
        .duration_since(at)
        .unwrap_or(Duration::ZERO);
    assert!(age < Duration::from_secs(60), "last_sync_time {t} is old");
}

/// Socket activation with both of replited's sockets: `systemd-socket-activate` cannot pass a
/// stream and a datagram socket in one invocation, so two are nested: the outer listens on TCP
/// (named "http") and execs the inner, which adds a UDP socket and names both `http:quic`. One
/// TCP connection starts replited with LISTEN_FDS=2. The config has no `[http]` and names
/// another QUIC port, so serving on the passed ports proves the passed sockets are used.
#[test]
fn systemd_socket_activate_passes_both_sockets() {
    let s = Setup::new();
    let (http_port, quic_port, configured_quic) =
        (free_tcp_port(), free_udp_port(), free_udp_port());
    assert_ne!(quic_port, configured_quic);
    let pcfg = s.primary_config(configured_quic, "");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &format!("127.0.0.1:{http_port}"),
        "--fdname=http",
        "systemd-socket-activate",
        "-d",
        "-l",
        &format!("127.0.0.1:{quic_port}"),
        "--fdname=http:quic",
        bin(),
        "-c",
        pcfg.to_str().unwrap(),
        "replicate",
    ]);
    let p = spawn(cmd, s.log("primary"));
    // The first connection starts replited; /health is 503 until capture runs.
    let health = wait_until(Duration::from_secs(30), "GET /health = 200", &[&p], || {
        get(http_port, "/health").filter(|r| r.code == 200)
    });
    assert_eq!(health.header("content-type"), Some("application/json"));
    assert!(health.body.contains("\"ok\""), "{}", health.body);
    p.wait_for_log(
        "status server on the TCP socket passed by systemd (http)",
        Duration::from_secs(5),
    );
    p.wait_for_log(
        "using the UDP socket passed by systemd (quic)",
        Duration::from_secs(5),
    );
    // Exec'd in place: the process systemd-socket-activate started is replited itself.
    let comm = fs::read_to_string(format!("/proc/{}/comm", p.child.id())).unwrap();
    assert_eq!(comm.trim(), "replited");
    // The configured QUIC port was not bound: the passed socket serves instead.
    UdpSocket::bind(("127.0.0.1", configured_quic)).unwrap_or_else(|e| {
        panic!("the primary bound its configured port {configured_quic} despite the passed socket: {e}")
    });

    run_load(&s.pdb, 1, 100);
    // Transaction 1 is the generation's snapshot of the database the app created; each of the
    // load's transactions is one more.
    let st = wait_until(
        Duration::from_secs(10),
        "/status txid 101 after 100 transactions",
        &[&p],
        || Some(status(http_port)).filter(|s| txid(s) == Some(101)),
    );
    assert_eq!(st["role"], "primary", "{st:#}");
    assert_eq!(st["ready"], true, "{st:#}");
    let d = db0(&st);
    assert_eq!(d["role"], "primary", "{st:#}");
    assert_eq!(d["db"], s.pdb.to_str().unwrap(), "{st:#}");
    assert_eq!(d["ready"], true, "{st:#}");
    assert_eq!(d["is_running"], true, "{st:#}");
    assert_eq!(d["error_count"], 0, "{st:#}");
    assert!(
        d["records_replicated"].as_u64().is_some_and(|n| n >= 100),
        "records_replicated counts the 100 transactions made durable: {st:#}"
    );
    assert_eq!(d["generation"].as_str().map(str::len), Some(16), "{st:#}");
    assert_recent_rfc3339(&d["last_sync_time"]);

    // A replica follows through the passed UDP socket.
    let rcfg = s.replica_config(quic_port, "", "");
    let mut cmd = Command::new(bin());
    cmd.args(["-c", rcfg.to_str().unwrap(), "replica-sidecar"]);
    let r = spawn(cmd, s.log("replica"));
    r.wait_for_log("caught up with the primary", Duration::from_secs(30));
    run_load(&s.pdb, 101, 200);
    wait_same_state(&s.pdb, &s.rdb, Duration::from_secs(20), &[&p, &r]);
    assert_eq!(state(&s.rdb), expect(200));
    assert_eq!(integrity(&s.rdb), "ok");
    let st = wait_until(Duration::from_secs(10), "/status txid 201", &[&p], || {
        Some(status(http_port)).filter(|s| txid(s) == Some(201))
    });
    assert!(
        db0(&st)["records_replicated"].as_u64().unwrap() >= 200,
        "{st:#}"
    );
    r.stop();
    p.stop();
}

/// `[http] addr` on a replica started with `replited run` and `role = "replica"`: /status says
/// so and follows the primary's position, /health is 200 once caught up, and the server answers
/// only what it should (404, 405, HEAD, 431) and keeps answering.
#[test]
fn status_server_on_a_configured_address() {
    let s = Setup::new();
    let (quic_port, phttp, rhttp) = (free_udp_port(), free_tcp_port(), free_tcp_port());
    let pcfg = s.primary_config(
        quic_port,
        &format!("[http]\naddr = \"127.0.0.1:{phttp}\"\n"),
    );
    let mut cmd = Command::new(bin());
    cmd.args(["-c", pcfg.to_str().unwrap(), "replicate"]);
    let p = spawn(cmd, s.log("primary"));
    p.wait_for_log("capturing", Duration::from_secs(30));
    p.wait_for_log(
        &format!("status server on http://127.0.0.1:{phttp}"),
        Duration::from_secs(5),
    );
    run_load(&s.pdb, 1, 50);

    let rcfg = s.replica_config(
        quic_port,
        "role = \"replica\"\n",
        &format!("[http]\naddr = \"127.0.0.1:{rhttp}\"\n"),
    );
    let mut cmd = Command::new(bin());
    cmd.args(["-c", rcfg.to_str().unwrap(), "run"]);
    let r = spawn(cmd, s.log("replica"));
    r.wait_for_log(
        &format!("status server on http://127.0.0.1:{rhttp}"),
        Duration::from_secs(30),
    );
    let health = wait_until(
        Duration::from_secs(30),
        "replica GET /health = 200",
        &[&p, &r],
        || get(rhttp, "/health").filter(|r| r.code == 200),
    );
    assert!(health.body.contains("\"ok\""), "{}", health.body);
    assert!(
        r.log_text().contains("caught up with the primary"),
        "/health is 200 only once caught up:\n{}",
        r.log_text()
    );
    // Ready means caught up: the replica holds what was committed before it started.
    assert_eq!(state(&s.rdb), expect(50));

    run_load(&s.pdb, 51, 100);
    let (ps, rs) = wait_until(
        Duration::from_secs(20),
        "the replica's /status txid equal to the primary's (101)",
        &[&p, &r],
        || {
            let (ps, rs) = (status(phttp), status(rhttp));
            (txid(&ps) == Some(101) && txid(&rs) == txid(&ps)).then_some((ps, rs))
        },
    );
    assert_eq!(ps["role"], "primary", "{ps:#}");
    assert_eq!(
        rs["role"], "replica",
        "`run` with role = \"replica\": {rs:#}"
    );
    let d = db0(&rs);
    assert_eq!(d["role"], "replica", "{rs:#}");
    assert_eq!(d["db"], s.rdb.to_str().unwrap(), "{rs:#}");
    assert_eq!(d["generation"], db0(&ps)["generation"], "{ps:#}\n{rs:#}");
    assert!(d["lag_ms"].is_u64(), "lag_ms is a number: {rs:#}");
    assert!(
        d["records_replicated"].as_u64().is_some_and(|n| n >= 50),
        "the 50 streamed transactions were applied: {rs:#}"
    );
    assert_recent_rfc3339(&d["last_sync_time"]);
    assert_eq!(state(&s.rdb), expect(100));

    // A client that never finishes its request head is cut off (after the server's read
    // timeout, 5 s), and others are served meanwhile.
    let addr = SocketAddr::from(([127, 0, 0, 1], rhttp));
    let mut slow = TcpStream::connect(addr).unwrap();
    let slow_since = Instant::now();
    slow.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();

    // Only GET and HEAD of /health and /status.
    let nope = get(rhttp, "/nope").expect("GET /nope answered");
    assert_eq!(nope.code, 404, "{}", nope.body);
    let post = request(rhttp, "POST", "/status").expect("POST answered");
    assert_eq!(post.code, 405, "{}", post.body);
    let head = request(rhttp, "HEAD", "/health").expect("HEAD answered");
    assert_eq!(head.code, 200);
    assert!(head.body.is_empty(), "HEAD has no body: {:?}", head.body);
    let q = get(rhttp, "/health?verbose=1").expect("query string");
    assert_eq!(q.code, 200, "{}", q.body);

    // A request head one byte over 8 KiB: 431.
    let head_of = |len: usize| {
        let mut h = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Filler: ".to_vec();
        h.resize(len, b'a');
        h
    };
    let raw = exchange(rhttp, &head_of(8 * 1024 + 1)).expect("an answer to 8 KiB + 1");
    let resp = parse_response(&raw).expect("an HTTP response");
    assert_eq!(resp.code, 431, "over-long head: {}", resp.body);
    // Far over: 431 or the connection closed, at once (not after the read timeout).
    let t = Instant::now();
    match exchange(rhttp, &head_of(64 * 1024)) {
        Ok(raw) if !raw.is_empty() => {
            let resp = parse_response(&raw).expect("an HTTP response");
            assert_eq!(resp.code, 431, "over-long head: {}", resp.body);
        }
        _ => {}
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    for _ in 0..3 {
        let ok = get(rhttp, "/health").expect("the server keeps answering");
        assert_eq!(ok.code, 200, "{}", ok.body);
    }
    assert_eq!(status(rhttp)["role"], "replica");
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = slow_since.elapsed();
    assert!(
        rest.is_empty() && waited >= Duration::from_secs(4) && waited < Duration::from_secs(10),
        "an unfinished request is closed after the read timeout, unanswered: {waited:?} {:?}",
        String::from_utf8_lossy(&rest)
    );

    r.stop();
    p.stop();
}

/// A config with fs targets `(name, root)` and nothing else.
fn fs_config(path: &Path, db: &Path, targets: &[(&str, &Path)]) {
    let mut s = format!(
        "[log]\nlevel = \"debug\"\n\n[[database]]\ndb = \"{}\"\n",
        db.display()
    );
    for (name, root) in targets {
        s.push_str(&format!(
            "\n[[database.replicate]]\nname = \"{name}\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"{}\"\n",
            root.display()
        ));
    }
    fs::write(path, s).unwrap();
}

fn sighup(d: &Daemon) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

/// Waits until `needle` appears `n` times in the log.
fn wait_for_count(d: &Daemon, needle: &str, n: usize) {
    wait_until(
        Duration::from_secs(15),
        &format!("{needle:?} logged {n} time(s)"),
        &[d],
        || (d.log_text().matches(needle).count() >= n).then_some(()),
    );
}

/// `replited restore file://ROOT/data.db -o OUT`; the output's state, or None when it failed.
fn restore_from(root: &Path, out: &Path) -> Option<(u64, String)> {
    let _ = fs::remove_file(out);
    let o = Command::new(bin())
        .args([
            "restore",
            &format!("file://{}", root.join("data.db").display()),
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    if !o.status.success() {
        return None;
    }
    assert_eq!(integrity(out), "ok");
    Some(state(out))
}

fn assert_running(d: &mut Daemon, when: &str) {
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "replited exited {when}:\n{}",
        d.log_text()
    );
}

/// SIGHUP with a new set of storage targets: a new one gets the current generation's files
/// and then every transaction, a removed one gets nothing more, one that cannot be used makes
/// the reload refused while capture goes on — all in the same process.
#[test]
fn reload_adds_and_removes_storage_targets() {
    let w = World::new("");
    let (root_a, root_b) = (w.path("root-a"), w.path("root-b"));
    let cfg = w.path("reload.toml");
    fs_config(&cfg, &w.db, &[("a", &root_a)]);
    let mut cmd = Command::new(bin());
    cmd.args(["-c", cfg.to_str().unwrap(), "replicate"]);
    let mut d = spawn(cmd, w.path("replited.log"));
    d.wait_for_log("capturing", Duration::from_secs(30));
    let pid = d.child.id();
    run_load(&w.db, 1, 50);
    let out = w.path("restored.db");
    wait_until(Duration::from_secs(10), "target a at 50", &[&d], || {
        (restore_from(&root_a, &out) == Some(expect(50))).then_some(())
    });
    assert!(
        restore_from(&root_b, &out).is_none(),
        "b exists before it is configured"
    );

    // Add b.
    fs_config(&cfg, &w.db, &[("a", &root_a), ("b", &root_b)]);
    sighup(&d);
    wait_for_count(&d, "configuration reloaded", 1);
    assert_running(&mut d, "on the first reload");
    // The current generation's files were copied into b.
    wait_until(
        Duration::from_secs(10),
        "target b holding the primary's state",
        &[&d],
        || (restore_from(&root_b, &out) == Some(state(&w.db))).then_some(()),
    );
    assert_eq!(state(&w.db), expect(50));
    run_load(&w.db, 51, 100);
    // Both get what follows.
    for root in [&root_a, &root_b] {
        wait_until(
            Duration::from_secs(10),
            &format!("{} at 100", root.display()),
            &[&d],
            || (restore_from(root, &out) == Some(expect(100))).then_some(()),
        );
    }

    // Only b.
    fs_config(&cfg, &w.db, &[("b", &root_b)]);
    sighup(&d);
    wait_for_count(&d, "configuration reloaded", 2);
    assert_running(&mut d, "on the second reload");
    let log = d.log_text();
    assert!(
        log.contains("no longer") && log.contains(root_a.to_str().unwrap()),
        "the reload says a was dropped:\n{log}"
    );

    // A target that cannot be created: the reload is refused and the running set kept.
    let afile = w.path("afile");
    fs::write(&afile, "a regular file").unwrap();
    let bad = afile.join("sub");
    fs_config(&cfg, &w.db, &[("b", &root_b), ("c", &bad)]);
    sighup(&d);
    wait_for_count(
        &d,
        "configuration reload refused, keeping the running one",
        1,
    );
    assert_eq!(
        d.log_text().matches("configuration reloaded").count(),
        2,
        "the refused reload was not applied:\n{}",
        d.log_text()
    );
    assert_running(&mut d, "on the refused reload");

    // Capture goes on into b.
    run_load(&w.db, 101, 150);
    wait_until(Duration::from_secs(10), "target b at 150", &[&d], || {
        (restore_from(&root_b, &out) == Some(expect(150))).then_some(())
    });
    assert_running(&mut d, "after the reloads");
    assert_eq!(d.child.id(), pid);
    let log = d.stop();
    assert_eq!(
        log.matches("capturing ").count(),
        1,
        "one start, no restart:\n{log}"
    );
    assert_eq!(state(&w.db), expect(150));
    assert_eq!(restore_from(&root_b, &out), Some(expect(150)));
    // a stopped at what it held when it was removed.
    assert_eq!(
        restore_from(&root_a, &out),
        Some(expect(100)),
        "the removed target kept receiving transactions"
    );
    assert!(!bad.exists());
}
