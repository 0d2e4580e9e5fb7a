//! The operator's commands: `status` (asks the running daemon), `snapshots` (what storage
//! holds) and `verify` (restores the latest backup into a temporary file and checks it).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use replited_core::format::Kind;
use replited_core::plan::Target;

use crate::config::{db_name, Config};
use crate::replicate::targets;
use crate::restore::{restore, RestoreOptions};

fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `GET path` from the status server at `addr`: (status code, body).
fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow!(
            "no replited status server answers at {addr} ({e}): is replited running with `[http] addr` set, or replited@NAME.socket enabled? (--addr HOST:PORT to ask elsewhere)"
        )
    };
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(&e))?
        .next()
        .ok_or_else(|| unreachable(&"no address"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(|e| unreachable(&e))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("reading the answer of {addr}"))?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("{addr} did not answer HTTP"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

fn ms_text(v: &serde_json::Value) -> String {
    match v.as_u64() {
        Some(ms) if ms >= 1000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) => format!("{ms} ms"),
        None => "-".into(),
    }
}

/// `replited status [--json]`.
pub fn status(addr: &str, json: bool) -> Result<()> {
    let (code, body) = get(addr, "/status")?;
    if code != 200 {
        bail!("{addr}/status answered HTTP {code}: {}", body.trim());
    }
    let (hcode, hbody) = get(addr, "/health")?;
    if json {
        print!("{body}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{addr}/status is not JSON"))?;
    let health = if hcode == 200 {
        "healthy".to_string()
    } else {
        let why: serde_json::Value = serde_json::from_str(&hbody).unwrap_or_default();
        format!(
            "UNHEALTHY: {}",
            why["reason"].as_str().unwrap_or(hbody.trim())
        )
    };
    println!(
        "replited {} at {addr}: {health}, up {} s",
        v["role"].as_str().unwrap_or("?"),
        v["uptime_seconds"]
    );
    for d in v["databases"].as_array().into_iter().flatten() {
        println!(
            "{}: {}, generation {}, txid {}, last sync {}, {} transactions, {} errors{}",
            d["db"].as_str().unwrap_or("?"),
            if d["is_running"].as_bool() == Some(true) {
                "running"
            } else {
                "NOT RUNNING"
            },
            d["generation"].as_str().unwrap_or("?"),
            d["txid"],
            d["last_sync_time"].as_str().unwrap_or("never"),
            d["records_replicated"],
            d["error_count"],
            d["lag_ms"].as_u64().map_or(String::new(), |_| format!(
                ", lag {}",
                ms_text(&d["lag_ms"])
            ))
        );
        if let Some(e) = d["last_error"].as_str() {
            println!("  last error: {e}");
        }
        for (kind, key) in [("target", "targets"), ("replica", "replicas")] {
            for t in d[key].as_array().into_iter().flatten() {
                println!(
                    "  {kind} {}: lag {} ({} transactions), last sync {}",
                    t["name"].as_str().unwrap_or("?"),
                    ms_text(&t["lag_ms"]),
                    t["lag_transactions"],
                    t["last_sync_time"].as_str().unwrap_or("never")
                );
            }
        }
    }
    Ok(())
}

/// `replited snapshots [--db PATH] [--all]`.
pub fn snapshots(cfg: &Config, db: Option<&Path>, all: bool) -> Result<()> {
    for d in cfg.select(db)? {
        for t in targets(d)? {
            let mut files = t
                .storage
                .list()
                .with_context(|| format!("listing {}", t.storage.describe()))?;
            files.retain(|m| all || m.kind == Kind::Snapshot);
            files.sort_by_key(|m| (m.generation, m.first_txid, m.level, m.last_txid));
            println!(
                "{} in {} ({}): {} {}",
                db_name(&d.db),
                t.name,
                t.storage.describe(),
                files.len(),
                if all { "files" } else { "snapshots" }
            );
            if files.is_empty() {
                continue;
            }
            println!(
                "  {:<16}  {:<8}  {:>10}  {:>10}  {:<24}  {:>12}",
                "generation", "kind", "first txid", "last txid", "time", "bytes"
            );
            for m in files {
                let size = t.storage.size(&m).map_or("?".into(), |b| b.to_string());
                let kind = match m.kind {
                    Kind::Snapshot => "snapshot".to_string(),
                    Kind::Segment => format!("L{}", m.level),
                };
                println!(
                    "  {:016x}  {:<8}  {:>10}  {:>10}  {:<24}  {:>12}",
                    m.generation,
                    kind,
                    m.first_txid,
                    m.last_txid,
                    time(m.last_time_ms),
                    size
                );
            }
        }
    }
    Ok(())
}

/// `replited verify [--db PATH] [--dir DIR]`.
pub fn verify(cfg: &Config, db: Option<&Path>, dir: Option<&Path>) -> Result<()> {
    let mut failed = Vec::new();
    for d in cfg.select(db)? {
        for t in targets(d)? {
            let where_ = dir.unwrap_or_else(|| crate::storage::parent_dir(&d.db));
            let tmp = tempfile::Builder::new()
                .prefix(".replited-verify-")
                .tempdir_in(where_)
                .with_context(|| format!("a temporary directory in {}", where_.display()))?;
            let out = tmp.path().join(db_name(&d.db));
            let started = Instant::now();
            let r = restore(
                &[&*t.storage],
                &RestoreOptions {
                    target: Target::Latest,
                    output: out,
                    force: false,
                    if_db_not_exists: false,
                    if_replica_exists: false,
                },
            );
            let what = format!(
                "{} in {} ({})",
                db_name(&d.db),
                t.name,
                t.storage.describe()
            );
            match r {
                Ok(Some(r)) => println!(
                    "ok: {what}: generation {:016x}, txid {} of {}, {} pages of {} bytes, checksum {:#018x}: every checksum and SQLite's integrity check pass ({:.1} s)",
                    r.generation,
                    r.txid,
                    time(r.time_ms),
                    r.db_pages,
                    r.page_size,
                    r.db_checksum,
                    started.elapsed().as_secs_f64()
                ),
                Ok(None) => unreachable!("a new output and no --if options"),
                Err(e) => {
                    println!("FAILED: {what}: {e:#}");
                    failed.push(what);
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("verification failed for {}", failed.join("; "))
    }
}
