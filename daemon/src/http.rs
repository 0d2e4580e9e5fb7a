//! The status server: `GET /health` (200 when every database is ready, its loop alive and
//! everything following it within `max-lag`; 503 with the reason otherwise), `GET /status`
//! (JSON, one object per database) and `GET /metrics` (Prometheus). It listens on the TCP socket
//! systemd passes (`replited@.socket`, `FileDescriptorName=http`), else on `[http] addr`, else
//! not at all. Plain HTTP/1.1, one request per connection, GET and HEAD only: a monitoring
//! probe's protocol, kept small on purpose (bounded requests, connections and time).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::config::HttpConfig;
use crate::notify::Health;

/// Longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 32;
/// A client has this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the status server when a socket was passed or `[http] addr` is set; returns where it
/// listens.
pub fn start(cfg: &HttpConfig, health: Arc<Health>) -> Result<Option<std::net::SocketAddr>> {
    let mut passed = crate::sockets::take(nix::sys::socket::SockType::Stream);
    let pick = passed
        .iter()
        .position(|(name, _)| name == "http")
        .or((passed.len() == 1).then_some(0));
    let listener = match (pick, &cfg.addr) {
        (Some(i), _) => {
            let (name, fd) = passed.swap_remove(i);
            let l = TcpListener::from(fd);
            tracing::info!(
                "status server on the TCP socket passed by systemd ({name}) at {}",
                l.local_addr()
                    .map_or_else(|_| "?".into(), |a| a.to_string())
            );
            l
        }
        (None, Some(addr)) => {
            let a = addr
                .to_socket_addrs()
                .with_context(|| format!("http.addr = \"{addr}\""))?
                .next()
                .ok_or_else(|| anyhow!("http.addr = \"{addr}\" resolves to no address"))?;
            let l = TcpListener::bind(a)
                .with_context(|| format!("status server: cannot listen on {addr}"))?;
            tracing::info!("status server on http://{a}");
            l
        }
        (None, None) => return Ok(None),
    };
    listener.set_nonblocking(false)?;
    let local = listener.local_addr()?;
    health.enable_status();
    if let Some(d) = cfg.max_lag {
        health.set_max_lag(d);
    }
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let (health, count) = (health.clone(), busy.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("http conn".into())
                        .spawn(move || {
                            let _ = serve(conn, &health);
                            count.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    // The closure (and its count) went with the failed spawn.
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(Some(local))
}

fn serve(mut conn: TcpStream, health: &Health) -> std::io::Result<()> {
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(&mut conn, 431, "text/plain", "request too large\n", false);
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut conn, 405, "text/plain", "only GET and HEAD\n", false);
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/health" | "/healthz" => {
            let limit = sd_notify::watchdog_enabled().unwrap_or(Duration::from_secs(30));
            match health.healthy(limit) {
                Ok(()) => respond(
                    &mut conn,
                    200,
                    "application/json",
                    "{\"status\":\"ok\"}\n",
                    head_only,
                ),
                Err(why) => {
                    let body =
                        serde_json::json!({"status": "unavailable", "reason": why}).to_string();
                    respond(
                        &mut conn,
                        503,
                        "application/json",
                        &(body + "\n"),
                        head_only,
                    )
                }
            }
        }
        "/metrics" => {
            let body = crate::metrics::render();
            respond(
                &mut conn,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                head_only,
            )
        }
        "/status" => {
            let body = serde_json::to_string_pretty(&health.status_json()).unwrap_or_default();
            respond(
                &mut conn,
                200,
                "application/json",
                &(body + "\n"),
                head_only,
            )
        }
        _ => respond(
            &mut conn,
            404,
            "text/plain",
            "not found: try /health, /status or /metrics\n",
            head_only,
        ),
    }
}

fn respond(
    conn: &mut TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    conn.write_all(out.as_bytes())?;
    conn.flush()
}
