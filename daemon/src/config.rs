//! The configuration file: TOML in the shape replited users already have.
//!
//! ```toml
//! [log]
//! level = "info"
//!
//! [[database]]
//! db = "/var/lib/pocketbase/pb_data/data.db"
//!
//! [[database.replicate]]
//! name = "backup"
//! [database.replicate.params]
//! type = "fs"
//! root = "/var/backups/replited"
//! ```
//!
//! `${VAR}` and `${VAR:-default}` are expanded from the environment before parsing. Every key
//! has a default documented in README.md; unknown keys, wrong types and bad values are refused
//! with the file, the key and what was expected.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/replited.toml";

/// A whole configuration file, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// `[log]`.
    pub log: LogConfig,
    /// `role`: what `replited run` (and so `replited@NAME.service`) runs; `None` when the file
    /// does not say (then `run` is a primary).
    pub role: Option<Role>,
    /// `[replica]`: how a replica runs (role = "replica" only).
    pub replica: ReplicaOptions,
    /// `[http]`: the status server.
    pub http: HttpConfig,
    /// `[[database]]`, at least one.
    pub databases: Vec<DbConfig>,
}

/// `role`: the primary captures and serves; a replica follows a primary or a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `replited replicate`.
    Primary,
    /// `replited replica-sidecar`.
    Replica,
}

impl Role {
    /// As written in the config and shown in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

fn de_role<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Role>, D::Error> {
    let s = String::deserialize(d)?;
    match s.to_ascii_lowercase().as_str() {
        "primary" => Ok(Some(Role::Primary)),
        "replica" => Ok(Some(Role::Replica)),
        _ => Err(de::Error::custom(format!(
            "invalid role \"{s}\"; expected \"primary\" or \"replica\""
        ))),
    }
}

/// `[replica]`: what `replica-sidecar`'s flags say, for a replica started by `replited run`
/// (the flags, when given, win).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplicaOptions {
    /// The app to run once caught up (`--exec`).
    #[serde(default)]
    pub exec: Option<String>,
    /// Restart the app when the primary changes the schema (`--restart-on-schema-change`).
    #[serde(default, alias = "restart_on_schema_change")]
    pub restart_on_schema_change: bool,
    /// systemd-unit mode (`--exit-on-rebuild`): the app runs as its own unit bound to
    /// replited's; a rebuild (and, with `restart-on-schema-change`, a schema change) makes
    /// replited exit with status 75 for systemd to stop the app, restart replited and start the
    /// app again.
    #[serde(default, alias = "exit_on_rebuild")]
    pub exit_on_rebuild: bool,
}

/// `[http]`: the status server (`/health`, `/status`, `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpConfig {
    /// `HOST:PORT` to listen on (TCP); none by default. A socket systemd passes (named `http`)
    /// is used instead.
    #[serde(default)]
    pub addr: Option<String>,
    /// `/health` answers 503 when a target or replica is further behind (default 1m).
    #[serde(default, deserialize_with = "de_opt_duration", alias = "max_lag")]
    pub max_lag: Option<Duration>,
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    /// trace, debug, info, warn or error (any case).
    #[serde(default = "default_log_level", deserialize_with = "de_level")]
    pub level: String,
    /// Accepted for files written for replited's fork; replited logs to the journal or stderr.
    #[serde(default)]
    pub dir: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            dir: None,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// One `[[database]]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DbConfig {
    /// Path of the SQLite database file.
    pub db: PathBuf,
    /// How long captured transactions may wait before they are written out together
    /// (0: each wake-up writes what it captured at once).
    #[serde(
        default = "defaults::sync_interval",
        deserialize_with = "de_duration",
        alias = "sync_interval"
    )]
    pub sync_interval: Duration,
    /// How often a new full snapshot is written.
    #[serde(
        default = "defaults::snapshot_interval",
        deserialize_with = "de_duration",
        alias = "snapshot_interval"
    )]
    pub snapshot_interval: Duration,
    /// How far back point-in-time restore must reach; older files are deleted.
    #[serde(default = "defaults::retention", deserialize_with = "de_duration")]
    pub retention: Duration,
    /// How often retention runs.
    #[serde(
        default = "defaults::retention_check_interval",
        deserialize_with = "de_duration",
        alias = "retention_check_interval"
    )]
    pub retention_check_interval: Duration,
    /// WAL size in pages at which replited runs a PASSIVE checkpoint once the frames are safe.
    #[serde(
        default = "defaults::min_checkpoint_page_count",
        alias = "min_checkpoint_page_number",
        alias = "min-checkpoint-page-number"
    )]
    pub min_checkpoint_page_count: u64,
    /// WAL size in pages past which replited runs a TRUNCATE checkpoint.
    #[serde(
        default = "defaults::max_checkpoint_page_count",
        alias = "max_checkpoint_page_number",
        alias = "truncate_page_number",
        alias = "max-checkpoint-page-number"
    )]
    pub max_checkpoint_page_count: u64,
    /// A PASSIVE checkpoint also runs when this long has passed since the last one.
    #[serde(
        default = "defaults::checkpoint_interval",
        deserialize_with = "de_duration",
        alias = "checkpoint_interval"
    )]
    pub checkpoint_interval: Duration,
    /// How often small segments are merged into larger ones.
    #[serde(
        default = "defaults::compaction_interval",
        deserialize_with = "de_duration",
        alias = "compaction_interval"
    )]
    pub compaction_interval: Duration,
    /// How long replited waits for SQLite's locks.
    #[serde(
        default = "defaults::busy_timeout",
        deserialize_with = "de_duration",
        alias = "busy_timeout"
    )]
    pub busy_timeout: Duration,
    /// lz4 (default) or none.
    #[serde(default = "defaults::compression", deserialize_with = "de_compression")]
    pub compression: Compression,
    /// Where the backup targets are.
    #[serde(default)]
    pub replicate: Vec<ReplicateConfig>,
}

/// Page compression in stored files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// lz4 blocks, one per page.
    Lz4,
    /// Raw pages.
    None,
}

mod defaults {
    use super::Compression;
    use std::time::Duration;
    pub fn sync_interval() -> Duration {
        Duration::ZERO
    }
    pub fn snapshot_interval() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn retention_check_interval() -> Duration {
        Duration::from_secs(300)
    }
    pub fn min_checkpoint_page_count() -> u64 {
        1000
    }
    pub fn max_checkpoint_page_count() -> u64 {
        10000
    }
    pub fn checkpoint_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn compaction_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn busy_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn compression() -> Compression {
        Compression::Lz4
    }
}

/// One `[[database.replicate]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicateConfig {
    /// Unique within its database.
    pub name: String,
    /// The target.
    pub params: TargetParams,
}

/// `params` of a `[[database.replicate]]`, by `params.type`.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetParams {
    /// `type = "fs"`: a local directory.
    Fs(FsParams),
    /// `type = "s3"`: an S3-compatible bucket.
    S3(S3Params),
    /// `type = "stream"`: the QUIC stream server on a primary (`replicate`), or the primary a
    /// replica follows (`replica-sidecar`).
    Stream(StreamParams),
}

/// `type = "s3"`. Credentials and region fall back to `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY` and `AWS_REGION` when absent.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct S3Params {
    /// The bucket.
    pub bucket: String,
    /// The endpoint (`https://s3.example.com`, `http://127.0.0.1:9000`); AWS's regional
    /// endpoint when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region (default `AWS_REGION`, else `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Key prefix under which each database gets `NAME/` (default: the bucket's root).
    #[serde(default)]
    pub root: String,
    /// Access key id (default `AWS_ACCESS_KEY_ID`).
    #[serde(default, alias = "access_key_id")]
    pub access_key_id: Option<String>,
    /// Secret access key (default `AWS_SECRET_ACCESS_KEY`).
    #[serde(default, alias = "secret_access_key")]
    pub secret_access_key: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default: on when `endpoint` is set
    /// (MinIO, Garage, s3s), off for AWS.
    #[serde(default, alias = "path_style", alias = "force-path-style")]
    pub path_style: Option<bool>,
    /// Where files wait for upload (default: `.NAME-replited-spool/TARGET` beside the
    /// database).
    #[serde(default, alias = "spool_dir")]
    pub spool_dir: Option<PathBuf>,
    /// How many MB may wait for upload before capture is held back (default 1024).
    #[serde(default, alias = "spool_limit_mb")]
    pub spool_limit_mb: Option<u64>,
}

/// `type = "stream"`. Which keys are needed depends on the role: the primary's stream server
/// needs `tls-cert` and `tls-key` (and `tls-client-ca` to require client certificates); a
/// replica needs `tls-ca` (and `tls-cert`/`tls-key` when the primary requires them).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StreamParams {
    /// `quic://HOST:PORT` or `http://HOST:PORT`: where the primary listens (primary: the
    /// address to bind, e.g. `quic://0.0.0.0:50051`; replica: the primary's address).
    pub addr: String,
    /// Certificate chain (PEM): the server's on the primary, the client's on a replica.
    #[serde(default, alias = "tls_cert")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls-cert` (PEM).
    #[serde(default, alias = "tls_key")]
    pub tls_key: Option<PathBuf>,
    /// Primary: replicas must present a certificate signed by this CA (PEM).
    #[serde(default, alias = "tls_client_ca")]
    pub tls_client_ca: Option<PathBuf>,
    /// Replica: the CA the primary's certificate must chain to (PEM).
    #[serde(default, alias = "tls_ca")]
    pub tls_ca: Option<PathBuf>,
    /// Replica: the name the primary's certificate must hold (default: the host of `addr`).
    #[serde(default, alias = "server_name")]
    pub server_name: Option<String>,
}

/// `type = "fs"`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsParams {
    /// The directory under which each database gets a directory named after its file.
    pub root: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplicate {
    name: String,
    params: toml::Table,
}

impl<'de> Deserialize<'de> for ReplicateConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawReplicate::deserialize(d)?;
        let mut params = raw.params;
        let ty = match params.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(other) => {
                return Err(de::Error::custom(format!(
                "replicate \"{}\": params.type must be a string (\"fs\", \"s3\" or \"stream\"), found {}",
                raw.name,
                other.type_str()
            )))
            }
            None => {
                return Err(de::Error::custom(format!(
                    "replicate \"{}\": missing params.type (expected \"fs\", \"s3\" or \"stream\")",
                    raw.name
                )))
            }
        };
        fn parse<'de, T: Deserialize<'de>, E: de::Error>(
            name: &str,
            params: toml::Table,
        ) -> Result<T, E> {
            toml::Value::Table(params)
                .try_into::<T>()
                .map_err(|e| E::custom(format!("replicate \"{name}\": params: {}", e.message())))
        }
        let params = match ty.to_ascii_lowercase().as_str() {
            "fs" => TargetParams::Fs(parse(&raw.name, params)?),
            "s3" => TargetParams::S3(parse(&raw.name, params)?),
            "stream" => {
                let sp: StreamParams = parse(&raw.name, params)?;
                if let Err(e) = crate::transport::parse_stream_addr(&sp.addr) {
                    return Err(de::Error::custom(format!(
                        "replicate \"{}\": params.addr: {e}",
                        raw.name
                    )));
                }
                TargetParams::Stream(sp)
            }
            _ => {
                return Err(de::Error::custom(format!(
                    "replicate \"{}\": unknown params.type \"{ty}\" (expected \"fs\", \"s3\" or \"stream\")",
                    raw.name
                )))
            }
        };
        Ok(ReplicateConfig {
            name: raw.name,
            params,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, deserialize_with = "de_role")]
    role: Option<Role>,
    #[serde(default)]
    replica: Option<ReplicaOptions>,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    database: Vec<DbConfig>,
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as \"250ms\", \"1s\", \"5m\" or \"7d\"")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            humantime::parse_duration(s.trim()).map_err(|e| {
                E::custom(format!(
                    "invalid duration \"{s}\" ({e}); expected e.g. \"250ms\", \"1s\", \"5m\", \"7d\""
                ))
            })
        }
    }
    d.deserialize_str(V)
}

fn de_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let l = s.to_ascii_lowercase();
    match l.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" => Ok(l),
        _ => Err(de::Error::custom(format!(
            "invalid log level \"{s}\"; expected trace, debug, info, warn or error"
        ))),
    }
}

fn de_compression<'de, D: Deserializer<'de>>(d: D) -> Result<Compression, D::Error> {
    let s = String::deserialize(d)?;
    match s.to_ascii_lowercase().as_str() {
        "lz4" => Ok(Compression::Lz4),
        "none" => Ok(Compression::None),
        _ => Err(de::Error::custom(format!(
            "invalid compression \"{s}\"; expected \"lz4\" or \"none\""
        ))),
    }
}

/// A configuration error, already worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads, expands, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Config::parse(path, &text)
    }

    /// Parses and validates configuration text (`path` is used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let p = path.display();
        let expanded = expand_env(text, |k| std::env::var(k).ok())
            .map_err(|e| ConfigError(format!("{p}: {e}")))?;
        let raw: RawConfig =
            toml::from_str(&expanded).map_err(|e| ConfigError(format!("{p}: {e}")))?;
        if raw.database.is_empty() {
            return Err(ConfigError(format!(
                "{p}: no [[database]] configured; add one with `db = \"/path/to/data.db\"`"
            )));
        }
        let mut names = HashSet::new();
        for (i, db) in raw.database.iter().enumerate() {
            let key = format!("database[{i}]");
            if db.db.as_os_str().is_empty() {
                return Err(ConfigError(format!("{p}: {key}.db must not be empty")));
            }
            if db.db.file_name().is_none() {
                return Err(ConfigError(format!(
                    "{p}: {key}.db = \"{}\" does not name a file",
                    db.db.display()
                )));
            }
            if !names.insert(db_name(&db.db)) {
                return Err(ConfigError(format!(
                    "{p}: {key}.db: two databases share the file name \"{}\"; their backups would collide",
                    db_name(&db.db)
                )));
            }
            if db.replicate.is_empty() {
                return Err(ConfigError(format!(
                    "{p}: {key} (db = \"{}\") has no [[database.replicate]] target",
                    db.db.display()
                )));
            }
            let mut tnames = HashSet::new();
            for t in &db.replicate {
                if !tnames.insert(t.name.as_str()) {
                    return Err(ConfigError(format!(
                        "{p}: {key}.replicate: the name \"{}\" is used twice",
                        t.name
                    )));
                }
                if let TargetParams::Fs(fs) = &t.params {
                    if fs.root.as_os_str().is_empty() {
                        return Err(ConfigError(format!(
                            "{p}: {key}.replicate \"{}\": params.root must not be empty",
                            t.name
                        )));
                    }
                }
            }
            if db
                .replicate
                .iter()
                .filter(|t| matches!(t.params, TargetParams::Stream(_)))
                .count()
                > 1
            {
                return Err(ConfigError(format!(
                    "{p}: {key} has more than one replicate target of type \"stream\"; one stream server (or one primary to follow) per database"
                )));
            }
            if db.max_checkpoint_page_count < db.min_checkpoint_page_count {
                return Err(ConfigError(format!(
                    "{p}: {key}: max-checkpoint-page-count ({}) is below min-checkpoint-page-count ({})",
                    db.max_checkpoint_page_count, db.min_checkpoint_page_count
                )));
            }
            if db.min_checkpoint_page_count == 0 {
                return Err(ConfigError(format!(
                    "{p}: {key}: min-checkpoint-page-count must be at least 1"
                )));
            }
        }
        if raw.replica.is_some() && raw.role != Some(Role::Replica) {
            return Err(ConfigError(format!(
                "{p}: [replica] is set but role is not \"replica\": add `role = \"replica\"` at the top of the file, or remove [replica]"
            )));
        }
        if let Some(a) = &raw.http.addr {
            if !a
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok())
            {
                return Err(ConfigError(format!(
                    "{p}: http.addr = \"{a}\": expected HOST:PORT, e.g. \"127.0.0.1:9090\""
                )));
            }
        }
        Ok(Config {
            path: path.to_path_buf(),
            log: raw.log,
            role: raw.role,
            replica: raw.replica.unwrap_or_default(),
            http: raw.http,
            databases: raw.database,
        })
    }

    /// The database `wanted` names (`--db`), or every database when None; `Database not
    /// found` when it names none of them.
    pub fn select(&self, wanted: Option<&Path>) -> Result<Vec<&DbConfig>, ConfigError> {
        let Some(w) = wanted else {
            return Ok(self.databases.iter().collect());
        };
        match self.find_db(w) {
            Some(d) => Ok(vec![d]),
            None => Err(ConfigError(format!(
                "Database not found: {} is not configured in {} (configured: {})",
                w.display(),
                self.path.display(),
                self.databases
                    .iter()
                    .map(|d| d.db.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The database whose `db` is `wanted` (same path, or same canonical path).
    pub fn find_db(&self, wanted: &Path) -> Option<&DbConfig> {
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        self.databases.iter().find(|d| d.db == wanted).or_else(|| {
            let w = canon(wanted)?;
            self.databases
                .iter()
                .find(|d| canon(&d.db) == Some(w.clone()))
        })
    }
}

impl DbConfig {
    /// The `type = "stream"` target, if any, with its name.
    pub fn stream(&self) -> Option<(&str, &StreamParams)> {
        self.replicate.iter().find_map(|t| match &t.params {
            TargetParams::Stream(s) => Some((t.name.as_str(), s)),
            _ => None,
        })
    }
}

/// The name a database's backups are stored under: its file name.
pub fn db_name(db: &Path) -> String {
    db.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Expands `${VAR}` and `${VAR:-default}`; a `$` not followed by `{` is kept.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| {
            let line = text[..text.len() - rest.len() + i].matches('\n').count() + 1;
            format!("line {line}: unterminated \"${{\" (expected ${{VAR}} or ${{VAR:-default}})")
        })?;
        let inner = &after[..end];
        let (name, default) = match inner.find(":-") {
            Some(j) => (&inner[..j], Some(&inner[j + 2..])),
            None => (inner, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        let line = text[..text.len() - rest.len() + i].matches('\n').count() + 1;
        if !valid {
            return Err(format!(
                "line {line}: \"${{{inner}}}\" is not a valid variable reference"
            ));
        }
        match (lookup(name), default) {
            (Some(v), _) if !(v.is_empty() && default.is_some()) => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            (Some(v), None) => out.push_str(&v),
            (None, None) => {
                return Err(format!(
                    "line {line}: environment variable {name} is not set (use ${{{name}:-default}} for a default)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), s)
    }

    const MIN: &str = r#"
[[database]]
db = "/tmp/x/data.db"
[[database.replicate]]
name = "backup"
params.type = "Fs"
params.root = "/tmp/backup"
"#;

    #[test]
    fn minimal_with_defaults() {
        let c = parse(MIN).unwrap();
        let d = &c.databases[0];
        assert_eq!(d.sync_interval, Duration::ZERO);
        assert_eq!(d.retention, Duration::from_secs(86400));
        assert_eq!(d.min_checkpoint_page_count, 1000);
        assert_eq!(c.log.level, "info");
        assert!(matches!(d.replicate[0].params, TargetParams::Fs(_)));
    }

    #[test]
    fn env_expansion() {
        let f = |k: &str| (k == "HOME_X").then(|| "/h".to_string());
        assert_eq!(expand_env("a ${HOME_X} b", f).unwrap(), "a /h b");
        assert_eq!(expand_env("${NOPE:-/d}", f).unwrap(), "/d");
        assert_eq!(expand_env("$x ${HOME_X:-z}", f).unwrap(), "$x /h");
        let e = expand_env("x\n${NOPE}", f).unwrap_err();
        assert!(e.contains("NOPE") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&MIN.replace("name = \"backup\"", "name = \"backup\"\nbogus = 1"))
            .unwrap_err()
            .0;
        assert!(e.contains("bogus"), "{e}");
        let e = parse(&format!("{MIN}\nsync-interval = \"fast\""))
            .unwrap_err()
            .0;
        assert!(e.contains("sync-interval") || e.contains("fast"), "{e}");
        let e = parse("[[database]]\nsync-interval = \"1s\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("db"), "{e}");
        let e = parse(&MIN.replace("Fs", "ftp")).unwrap_err().0;
        assert!(e.contains("ftp"), "{e}");
    }
}
