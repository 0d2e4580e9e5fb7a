//! S3-compatible storage (AWS S3, R2, Backblaze B2, MinIO, Garage, …) through rust-s3's blocking
//! client.
//!
//! Layout: the same names as a local directory, under the prefix: `ROOT/NAME/GEN/FILE`. Nothing
//! is listed per sync: the capture thread knows what it wrote and lists only when it
//! (re-)establishes. Files are written to a temporary file beside the database first (memory
//! stays bounded whatever their size), then uploaded — in 5 MiB parts from 5 MiB on, each
//! request's body read from the file as it is sent (presigned with its `Content-MD5`) — with
//! retries (exponential backoff with jitter); `commit` returns only once the object is complete.
//! An upload of the same name is idempotent (the names say what they hold). Reads stream: a
//! thread downloads the object and hands it to the reader in chunks as it arrives (a few ahead
//! at most); an attempt that fails midway resumes with a ranged GET from the byte it reached,
//! and a reader that stops early (a header read) stops the download. Uploads, downloads and
//! listings go through one HTTP client whose connections stay open between requests
//! ([`agent`]); rust-s3 sends the rest (the start-up check, deletes, multipart's start and end),
//! one connection each.

mod tcp;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use http::{HeaderMap, HeaderName};
use replited_core::name::FileMeta;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::serde_types::{ListBucketResult, ObjectIdentifier, Part};
use s3::{Bucket, Region};
use ureq::unversioned::transport::{ConnectProxyConnector, Connector, RustlsConnector};

use crate::config::S3Params;
use crate::storage::{ObjectWriter, Storage};

/// Attempts per request before the error is returned (the capture loop then retries later).
const ATTEMPTS: u32 = 4;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Requests sent to S3 by this process, by kind (what a bill counts).
pub static REQUESTS: Requests = Requests::new();

/// Request counters.
pub struct Requests {
    put: AtomicU64,
    get: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

impl Requests {
    const fn new() -> Requests {
        Requests {
            put: AtomicU64::new(0),
            get: AtomicU64::new(0),
            list: AtomicU64::new(0),
            delete: AtomicU64::new(0),
        }
    }

    /// (PUT, GET, LIST, DELETE) so far; a multipart upload counts its initiate, part and
    /// complete requests.
    pub fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.put.load(Relaxed),
            self.get.load(Relaxed),
            self.list.load(Relaxed),
            self.delete.load(Relaxed),
        )
    }

    /// Logs the counts (at exit).
    pub fn log(&self) {
        let (p, g, l, d) = self.get();
        if p + g + l + d > 0 {
            tracing::info!(
                put = p,
                get = g,
                list = l,
                delete = d,
                "S3 requests sent: PUT {p}, GET {g}, LIST {l}, DELETE {d}"
            );
        }
    }
}

/// Where distributions keep the system's CA bundle (Debian and Ubuntu, Fedora and RHEL,
/// openSUSE).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];

/// Set when [`trust_system_bundle`] set `SSL_CERT_FILE` itself.
static SET_CERT_FILE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// rust-s3 makes a new HTTP client for every request, which reads the trusted certificates
/// again; with neither `SSL_CERT_FILE` nor `SSL_CERT_DIR` set that is the system's bundle *and*
/// every file of its certificate directory — the same certificates twice, 3.8 instead of 1.5 ms
/// of CPU per HTTPS request (docs/BENCHMARKS.md). So, with neither set, `SSL_CERT_FILE` names
/// the bundle. Call before any thread starts (it changes the process's environment); the app
/// replited starts gets the environment replited was given ([`cert_file_was_set`]).
pub fn trust_system_bundle() {
    if std::env::var_os("SSL_CERT_FILE").is_some() || std::env::var_os("SSL_CERT_DIR").is_some() {
        return;
    }
    if let Some(b) = SYSTEM_BUNDLES.iter().find(|p| Path::new(p).is_file()) {
        std::env::set_var("SSL_CERT_FILE", b);
        SET_CERT_FILE.store(true, Relaxed);
    }
}

/// Whether [`trust_system_bundle`] set `SSL_CERT_FILE` (not inherited from the caller).
pub fn cert_file_was_set() -> bool {
    SET_CERT_FILE.load(Relaxed)
}

/// Multipart uploads from this size on, in parts of this size: S3's smallest part (all but
/// the last). Parts are read from the file as they are sent ([`put_range`]), so their size
/// costs no memory.
const PART: u64 = 5 << 20;

const CONTENT_TYPE: &str = "application/octet-stream";

/// How long a presigned upload request stays valid: it is sent at once.
const PRESIGN_SECS: u32 = 15 * 60;

/// Bytes read from the file per read while uploading.
const UPLOAD_READ: usize = 256 << 10;

/// Uploads the rest of `file` (from its current position) as `key`: one PUT below [`PART`]
/// bytes, else a multipart upload of [`PART`]-sized parts; retried as a whole (a failed
/// multipart upload is aborted first). Every request streams its bytes from the file.
fn upload(bucket: &Bucket, what: &str, key: &str, file: &mut File) -> Result<()> {
    let start = file.stream_position()?;
    let len = file.metadata()?.len().saturating_sub(start);
    let t = std::time::Instant::now();
    let mut buf = vec![0; UPLOAD_READ.min(len as usize).max(1)];
    if len < PART {
        retry(what, &format!("uploading {key}"), || {
            REQUESTS.put.fetch_add(1, Relaxed);
            put_range(bucket, key, file, start, len, None, &mut buf).map(|_| ())
        })?;
        tracing::trace!(len, ms = t.elapsed().as_millis() as u64, "uploaded {key}");
        return Ok(());
    }
    retry(what, &format!("uploading {key}"), || {
        REQUESTS.put.fetch_add(1, Relaxed);
        let up = bucket.initiate_multipart_upload(key, CONTENT_TYPE)?;
        let parts = (|| {
            let mut parts = Vec::new();
            for n in 1..=len.div_ceil(PART) {
                let off = (n - 1) * PART;
                let want = PART.min(len - off);
                REQUESTS.put.fetch_add(1, Relaxed);
                let etag = put_range(
                    bucket,
                    key,
                    file,
                    start + off,
                    want,
                    Some((n as u32, &up.upload_id)),
                    &mut buf,
                )?;
                if etag.is_empty() {
                    return Err(S3Error::Io(io::Error::other(format!(
                        "the store answered part {n} of {key} without an ETag"
                    ))));
                }
                parts.push(Part {
                    part_number: n as u32,
                    etag,
                });
            }
            REQUESTS.put.fetch_add(1, Relaxed);
            bucket.complete_multipart_upload(&up.key, &up.upload_id, parts)
        })();
        if parts.is_err() {
            REQUESTS.delete.fetch_add(1, Relaxed);
            let _ = bucket.abort_upload(&up.key, &up.upload_id);
        }
        parts.map(|_| ())
    })?;
    tracing::trace!(len, ms = t.elapsed().as_millis() as u64, "uploaded {key}");
    Ok(())
}

/// PUTs `len` bytes of `file` at `start` as `key` (or as part `n` of multipart upload `id`),
/// read from the file while they are sent: no copy of them is held in memory (rust-s3's own
/// requests take the body as one buffer and copy it). The request is presigned by rust-s3
/// with the bytes' `Content-MD5`, which the store checks against what it received. Returns
/// the object's (part's) ETag. Sent by [`agent`], on a connection kept open for the next.
fn put_range(
    bucket: &Bucket,
    key: &str,
    file: &File,
    start: u64,
    len: u64,
    part: Option<(u32, &str)>,
    buf: &mut [u8],
) -> Result<String, S3Error> {
    let mut md5 = md5::Context::new();
    for_each_chunk(file, start, len, buf, |b| {
        md5.consume(b);
        Ok(())
    })?;
    let digest = base64::engine::general_purpose::STANDARD.encode(md5.finalize().0);
    let mut headers = HeaderMap::new();
    headers.insert(HeaderName::from_static("content-md5"), digest.parse()?);
    if part.is_none() {
        headers.insert(http::header::CONTENT_TYPE, CONTENT_TYPE.parse()?);
    }
    let queries = part.map(|(n, id)| {
        HashMap::from([
            ("partNumber".to_string(), n.to_string()),
            ("uploadId".to_string(), id.to_string()),
        ])
    });
    let url = bucket.presign_put(key, PRESIGN_SECS, Some(headers.clone()), queries)?;
    let mut url = url::Url::parse(&url).map_err(S3Error::UrlParse)?;
    if let Some((n, id)) = part {
        // rust-s3 0.38's blocking presign signs the queries but leaves them out of the URL.
        if !url.query_pairs().any(|(k, _)| k == "uploadId") {
            url.query_pairs_mut()
                .append_pair("partNumber", &n.to_string())
                .append_pair("uploadId", id);
        }
    }
    let mut req = agent()
        .put(url.as_str())
        .header(http::header::CONTENT_LENGTH, len);
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let mut body = FileBody {
        file,
        start,
        len,
        sent: 0,
        buf,
    };
    let mut resp = req
        .send(ureq::SendBody::from_reader(&mut body))
        .map_err(http_error)?;
    text_of(&mut resp)?;
    Ok(resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string())
}

/// The client uploads and downloads are sent with, one for the process (made at the first
/// request): its connections stay open between requests (with `sync-interval = "0s"` a PUT per
/// commit: a new TCP connection, and a thread for its deadline, per request was much of the
/// cost of each, and for `https://` a TLS handshake too; a restore reads many small files, a
/// round trip or more each to open a connection), the roots it trusts loaded once — the
/// system's, or `SSL_CERT_FILE` / `SSL_CERT_DIR` as rust-s3's own requests. Each step of a
/// request (connecting, sending it, sending its body, the answer's head, its body) must end
/// within [`REQUEST_TIMEOUT`] — no timeout over the whole request, with which ureq resolves the
/// host on a new thread for every request. A download longer than that resumes where it
/// stopped ([`Download`]). Its connections acknowledge what they receive at once ([`tcp`]):
/// on a kept-open connection the kernel's delayed ACKs stalled small GETs.
fn agent() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(new_agent)
}

fn new_agent() -> ureq::Agent {
    let roots: Vec<ureq::tls::Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
        .build();
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(REQUEST_TIMEOUT))
        .timeout_send_request(Some(REQUEST_TIMEOUT))
        .timeout_send_body(Some(REQUEST_TIMEOUT))
        .timeout_recv_response(Some(REQUEST_TIMEOUT))
        .timeout_recv_body(Some(REQUEST_TIMEOUT))
        .http_status_as_error(false)
        // A restore downloads the file it applies and three ahead (`reader::open_ahead`) while
        // the daemon may upload: their connections all stay.
        .max_idle_connections_per_host(8)
        .tls_config(tls)
        .build();
    // ureq's own chain (a CONNECT proxy if one is configured, TCP, TLS for `https://`) with
    // connections that acknowledge at once ([`tcp`]).
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(tcp::QuickAckConnector)
            .chain(RustlsConnector::default());
    ureq::Agent::with_parts(
        config,
        connector,
        ureq::unversioned::resolver::DefaultResolver::default(),
    )
}

/// One page (up to 1,000 keys) of the bucket's keys under `prefix` (ListObjectsV2), after
/// `start_after` or from a continuation token: presigned by rust-s3, sent by [`agent`] on a
/// kept-open connection (a replica following the bucket lists it every second), parsed as
/// rust-s3 parses its own listings.
fn list_page(
    bucket: &Bucket,
    prefix: &str,
    token: Option<&str>,
    start_after: Option<&str>,
) -> Result<ListBucketResult, S3Error> {
    let mut queries = HashMap::from([
        ("list-type".to_string(), "2".to_string()),
        ("prefix".to_string(), prefix.to_string()),
    ]);
    if let Some(t) = token {
        queries.insert("continuation-token".into(), t.into());
    }
    if let Some(a) = start_after {
        queries.insert("start-after".into(), a.into());
    }
    let url = bucket.presign_get("/", PRESIGN_SECS, Some(queries))?;
    let mut resp = agent().get(&url).call().map_err(http_error)?;
    Ok(quick_xml::de::from_str(&text_of(&mut resp)?)?)
}

/// The text of an answer of [`agent`]'s, read to its end so that the connection can carry the
/// next request; the store's error (its status and text) when it is one.
fn text_of(resp: &mut http::Response<ureq::Body>) -> Result<String, S3Error> {
    let status = resp.status();
    let text = resp.body_mut().read_to_string().map_err(http_error)?;
    if !status.is_success() {
        return Err(S3Error::HttpFailWithBody(status.as_u16(), text));
    }
    Ok(text)
}

/// A failed request of [`agent`] as rust-s3's error (its I/O error as it is).
fn http_error(e: ureq::Error) -> S3Error {
    match e {
        ureq::Error::Io(e) => S3Error::Io(e),
        e => S3Error::Io(io::Error::other(e)),
    }
}

/// Calls `f` with `len` bytes of `file` from `start`, a whole buffer at a time (so a range that
/// fits in `buf` is left in it); an error if the file ends before.
fn for_each_chunk(
    file: &File,
    start: u64,
    len: u64,
    buf: &mut [u8],
    mut f: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, start + done)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was uploaded",
                ),
                _ => e,
            })?;
        f(chunk)?;
        done += chunk.len() as u64;
    }
    Ok(())
}

/// A range of a file as a request's body, read as it is written — or, for a range that fit in
/// `buf` (most files: one write-out's transactions), the bytes `buf` already holds from the
/// digest's pass, not read a second time.
struct FileBody<'a> {
    file: &'a File,
    start: u64,
    len: u64,
    sent: u64,
    /// The range's bytes, when they fit (read there while the digest was taken).
    buf: &'a [u8],
}

impl Read for FileBody<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = (self.len - self.sent).min(out.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let at = self.sent as usize;
        let got = if self.len as usize <= self.buf.len() {
            out[..n].copy_from_slice(&self.buf[at..at + n]);
            n
        } else {
            self.file.read_at(&mut out[..n], self.start + self.sent)?
        };
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file being uploaded ended early",
            ));
        }
        self.sent += got as u64;
        Ok(got)
    }
}

/// One database's files in a bucket.
pub struct S3Storage {
    bucket: Box<Bucket>,
    /// `ROOT/NAME` without a trailing slash (no leading slash).
    prefix: String,
    endpoint: String,
    /// Where temporary files go.
    spool: PathBuf,
    /// Set once the store answered a multi-object delete with "not implemented": files are
    /// then deleted one request each.
    one_by_one: AtomicBool,
}

/// Where a value comes from: the config, else an environment variable.
fn setting(v: &Option<String>, env: &str) -> Option<String> {
    v.clone()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var(env).ok().filter(|s| !s.is_empty()))
}

/// `p` with the credentials and region taken from the environment where the file has none
/// (what a replica needs to read the same bucket).
pub fn resolved(p: &S3Params) -> S3Params {
    let mut r = p.clone();
    r.access_key_id = setting(&p.access_key_id, "AWS_ACCESS_KEY_ID");
    r.secret_access_key = setting(&p.secret_access_key, "AWS_SECRET_ACCESS_KEY");
    r.region = setting(&p.region, "AWS_REGION");
    r.spool_dir = None;
    r.spool_limit_mb = None;
    r
}

impl S3Storage {
    /// The target for database `name` described by `p`; temporary files go to `spool`.
    pub fn new(p: &S3Params, name: &str, spool: &Path) -> Result<S3Storage> {
        let region_name = setting(&p.region, "AWS_REGION")
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        let (region, endpoint) = match &p.endpoint {
            Some(e) if !e.is_empty() => (
                Region::Custom {
                    region: region_name.clone(),
                    endpoint: e.trim_end_matches('/').to_string(),
                },
                e.clone(),
            ),
            _ => {
                let r: Region = region_name
                    .parse()
                    .map_err(|e| anyhow!("invalid region \"{region_name}\": {e}"))?;
                let ep = r.endpoint();
                (r, ep)
            }
        };
        let ak = setting(&p.access_key_id, "AWS_ACCESS_KEY_ID").ok_or_else(|| {
            anyhow!(
                "no access key for bucket {}: set params.access_key_id or AWS_ACCESS_KEY_ID",
                p.bucket
            )
        })?;
        let sk = setting(&p.secret_access_key, "AWS_SECRET_ACCESS_KEY").ok_or_else(|| {
            anyhow!(
                "no secret key for bucket {}: set params.secret_access_key or AWS_SECRET_ACCESS_KEY",
                p.bucket
            )
        })?;
        // Retries are ours (`retry`): rust-s3's own would sleep seconds inside each attempt.
        s3::set_retries(0);
        let creds = Credentials::new(Some(&ak), Some(&sk), None, None, None)
            .map_err(|e| anyhow!("credentials: {e}"))?;
        let mut bucket = Bucket::new(&p.bucket, region, creds)
            .map_err(|e| anyhow!("bucket {} at {endpoint}: {e}", p.bucket))?;
        if p.path_style.unwrap_or(p.endpoint.is_some()) {
            bucket = bucket.with_path_style();
        }
        // A request that hangs (a store stuck mid-response) fails and is retried rather than
        // holding its thread for rust-s3's default minute. A 5 MiB part needs 0.25 MB/s.
        bucket.request_timeout = Some(REQUEST_TIMEOUT);
        let root = p.root.trim_matches('/');
        let prefix = if root.is_empty() {
            name.to_string()
        } else {
            format!("{root}/{name}")
        };
        Ok(S3Storage {
            bucket,
            prefix,
            endpoint,
            spool: spool.to_path_buf(),
            one_by_one: AtomicBool::new(false),
        })
    }

    /// The target at `s3://bucket/prefix/NAME` (restore from a URL).
    pub fn from_url(
        bucket: &str,
        key_prefix: &str,
        endpoint: Option<String>,
        spool: &Path,
    ) -> Result<S3Storage> {
        let (root, name) = match key_prefix.trim_matches('/').rsplit_once('/') {
            Some((r, n)) => (r.to_string(), n.to_string()),
            None => (String::new(), key_prefix.trim_matches('/').to_string()),
        };
        if name.is_empty() {
            bail!("the URL names no database: expected s3://BUCKET/PREFIX/NAME");
        }
        let p = S3Params {
            bucket: bucket.to_string(),
            endpoint: endpoint.or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()),
            region: None,
            root,
            access_key_id: None,
            secret_access_key: None,
            path_style: None,
            spool_dir: None,
            spool_limit_mb: None,
        };
        S3Storage::new(&p, &name, spool)
    }

    /// The files whose keys sort after `after`'s (every file when None): one LIST request per
    /// 1,000 keys returned, so a poll that finds nothing new costs one request.
    pub fn list_after(&self, after: Option<&FileMeta>) -> Result<Vec<FileMeta>> {
        let strip = format!("{}/", self.prefix);
        let mut out = Vec::new();
        let mut token = None;
        let start_after = after.map(|m| self.key(m));
        loop {
            let page = self.retry("listing", || {
                REQUESTS.list.fetch_add(1, Relaxed);
                list_page(
                    &self.bucket,
                    &strip,
                    token.as_deref(),
                    start_after.as_deref().filter(|_| token.is_none()),
                )
            })?;
            out.extend(
                page.contents
                    .iter()
                    .filter_map(|o| o.key.strip_prefix(&strip))
                    .filter_map(FileMeta::parse_path),
            );
            match (page.is_truncated, page.next_continuation_token) {
                (true, Some(t)) => {
                    // A store that hands the same token back would make this loop forever.
                    if token.as_deref() == Some(t.as_str()) {
                        bail!("listing {} did not advance ({})", strip, self.what());
                    }
                    token = Some(t)
                }
                _ => return Ok(out),
            }
        }
    }

    fn key(&self, meta: &FileMeta) -> String {
        format!("{}/{}", self.prefix, meta.path())
    }

    fn what(&self) -> String {
        format!("bucket {} at {}", self.bucket.name(), self.endpoint)
    }

    fn retry<T>(&self, doing: &str, f: impl FnMut() -> Result<T, S3Error>) -> Result<T> {
        retry(&self.what(), doing, f)
    }

    fn temp_file(&self) -> Result<File> {
        std::fs::create_dir_all(&self.spool)
            .with_context(|| format!("creating {}", self.spool.display()))?;
        tempfile::tempfile_in(&self.spool)
            .with_context(|| format!("creating a temporary file in {}", self.spool.display()))
    }
}

/// Bytes of a download handed to its reader at once.
const CHUNK: usize = 256 << 10;
/// Chunks a download gets ahead of its reader at most.
const CHUNKS_AHEAD: usize = 4;

/// What a download thread hands its reader.
enum Chunk {
    Data(Vec<u8>),
    End,
    Failed(anyhow::Error),
}

/// A stored object read as it downloads (see the module's documentation).
struct Download {
    rx: std::sync::mpsc::Receiver<Chunk>,
    cur: Vec<u8>,
    pos: usize,
    ended: bool,
    /// Set when the reader is dropped: the download stops.
    gone: std::sync::Arc<AtomicBool>,
}

/// The download thread's side: bytes received, gathered into chunks for the reader.
struct Handover {
    tx: std::sync::mpsc::SyncSender<Chunk>,
    buf: Vec<u8>,
    /// Bytes of the object received so far (where a resumed attempt starts).
    received: u64,
}

impl Handover {
    fn send(&mut self, c: Chunk) -> io::Result<()> {
        self.tx
            .send(c)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader is gone"))
    }

    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let c = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.send(Chunk::Data(c))
    }
}

impl Write for Handover {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        self.received += n as u64;
        if self.buf.len() == CHUNK {
            self.hand_over()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One GET of `key` into `h`, from the byte `h` reached (a ranged GET then). An answer shorter
/// than it announced (the connection cut midway) is an error, not a short object: the bytes
/// that came stay in `h`, and the next attempt asks for the rest.
fn get_into(bucket: &Bucket, key: &str, h: &mut Handover) -> Result<(), S3Error> {
    let url = bucket.presign_get(key, PRESIGN_SECS, None)?;
    let from = h.received;
    let mut req = agent().get(&url);
    if from > 0 {
        req = req.header(http::header::RANGE, format!("bytes={from}-"));
    }
    let mut resp = req.call().map_err(http_error)?;
    let status = resp.status().as_u16();
    if !resp.status().is_success() {
        return text_of(&mut resp).map(drop); // the store's error, never Ok here
    }
    let announced = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .filter(|_| !resp.headers().contains_key(http::header::CONTENT_ENCODING));
    let mut body = resp.into_body().into_reader();
    // A store that ignores the range answers the whole object: skip what is already here.
    let skip = if from > 0 && status != 206 { from } else { 0 };
    let skipped = io::copy(&mut (&mut body).take(skip), &mut io::sink())?;
    let got = skipped + io::copy(&mut body, h)?;
    match announced {
        Some(n) if got < n => Err(S3Error::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the answer ended after {got} of its {n} bytes"),
        ))),
        _ => Ok(()),
    }
}

impl Download {
    /// Starts downloading `key` and waits for its first chunk: an object that cannot be read
    /// (missing, access denied, the store down through every retry) fails here, as a whole
    /// download did.
    fn start(bucket: Box<Bucket>, what: String, key: String) -> Result<Box<dyn Read + Send>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(CHUNKS_AHEAD);
        let gone = std::sync::Arc::new(AtomicBool::new(false));
        let g = gone.clone();
        std::thread::Builder::new()
            .name("download".into())
            .spawn(move || {
                let mut h = Handover {
                    tx,
                    buf: Vec::with_capacity(CHUNK),
                    received: 0,
                };
                let doing = format!("downloading {key}");
                loop {
                    let from = h.received;
                    let r = retry(&what, &doing, || {
                        if g.load(Relaxed) {
                            return Ok(());
                        }
                        REQUESTS.get.fetch_add(1, Relaxed);
                        get_into(&bucket, &key, &mut h)
                    });
                    // (A reader gone meanwhile takes nothing more.)
                    let _ = match r {
                        Ok(()) => h.hand_over().and_then(|_| h.send(Chunk::End)),
                        // Progress since the last round: resume with fresh attempts.
                        Err(_) if h.received > from && !g.load(Relaxed) => continue,
                        Err(e) => h.send(Chunk::Failed(e)),
                    };
                    return;
                }
            })
            .context("starting a download thread")?;
        let mut d = Download {
            rx,
            cur: Vec::new(),
            pos: 0,
            ended: false,
            gone,
        };
        match d.next() {
            Err(e) => Err(e),
            Ok(()) => Ok(Box::new(d)),
        }
    }

    /// Takes the next chunk from the download thread.
    fn next(&mut self) -> Result<()> {
        match self.rx.recv() {
            Ok(Chunk::Data(c)) => {
                self.cur = c;
                self.pos = 0;
                Ok(())
            }
            Ok(Chunk::End) => {
                self.ended = true;
                Ok(())
            }
            Ok(Chunk::Failed(e)) => Err(e),
            Err(_) => Err(anyhow!(
                "the download thread ended before the object's last byte"
            )),
        }
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() && !self.ended {
            self.next().map_err(io::Error::other)?;
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        self.gone.store(true, Relaxed);
    }
}

/// Runs `f` up to [`ATTEMPTS`] times with exponential backoff and jitter; errors that retrying
/// cannot fix (access denied, no such bucket, a bad request) are returned at once.
fn retry<T>(what: &str, doing: &str, mut f: impl FnMut() -> Result<T, S3Error>) -> Result<T> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => {
                // A 4xx is permanent, but for BadDigest: bytes that arrived other than they
                // were sent (the file is read again for the next attempt).
                let permanent = untrusted(&e)
                    || not_implemented(&e)
                    || matches!(&e, S3Error::HttpFailWithBody(code, body)
                    if (400..500).contains(code) && *code != 408 && *code != 429
                        && !body.contains("<Code>BadDigest</Code>"));
                if permanent || attempt >= ATTEMPTS {
                    return Err(anyhow!("{doing} ({what}): {}", explain(&e)));
                }
                let jitter = Duration::from_millis(
                    u64::from(jitter_ms()) % (delay.as_millis() as u64 / 2 + 1),
                );
                tracing::debug!("{doing}: {} (attempt {attempt}); retrying", explain(&e));
                std::thread::sleep(delay + jitter);
                delay *= 2;
                attempt += 1;
            }
        }
    }
}

fn jitter_ms() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_micros())
        .unwrap_or(0)
}

/// An S3 error in a few words: the HTTP status and the S3 error code.
fn explain(e: &S3Error) -> String {
    match e {
        S3Error::HttpFailWithBody(code, body) => {
            let tag = |t: &str| {
                let open = format!("<{t}>");
                let close = format!("</{t}>");
                body.split_once(&open)
                    .and_then(|(_, r)| r.split_once(&close))
                    .map(|(v, _)| v.to_string())
            };
            match (tag("Code"), tag("Message")) {
                (Some(c), Some(m)) => format!("HTTP {code} {c}: {m}"),
                (Some(c), None) => format!("HTTP {code} {c}"),
                _ => format!("HTTP {code}"),
            }
        }
        e if untrusted(e) => format!(
            "{e} (the endpoint's certificate is not trusted here: install the system's CA \
             certificates, or name its CA in SSL_CERT_FILE)"
        ),
        e => e.to_string(),
    }
}

/// A request the store does not implement (some S3-compatible stores lack DeleteObjects).
fn not_implemented(e: &S3Error) -> bool {
    matches!(e, S3Error::HttpFailWithBody(code, body)
        if *code == 501 || body.contains("<Code>NotImplemented</Code>"))
}

/// A TLS certificate the client does not accept: asking again will not change it.
fn untrusted(e: &S3Error) -> bool {
    matches!(e, S3Error::Atto(_) | S3Error::Io(_))
        && e.to_string().contains("invalid peer certificate")
}

struct S3Writer {
    bucket: Box<Bucket>,
    what: String,
    key: String,
    file: File,
}

impl Write for S3Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn commit(self: Box<Self>) -> io::Result<()> {
        let S3Writer {
            bucket,
            what,
            key,
            mut file,
        } = *self;
        file.seek(SeekFrom::Start(0))?;
        upload(&bucket, &what, &key, &mut file).map_err(io::Error::other)
    }
}

impl S3Storage {
    /// Deletes `metas` with DeleteObjects requests of up to 1,000 keys; a key the store
    /// reports it could not delete (but for one already gone) is an error naming it.
    /// `Ok(Some(why))`: the store does not implement DeleteObjects, nothing was deleted.
    fn delete_many(&self, metas: &[FileMeta]) -> Result<Option<String>> {
        let keys: Vec<ObjectIdentifier> = metas
            .iter()
            .map(|m| ObjectIdentifier::new(self.key(m)))
            .collect();
        let mut unsupported = None;
        let done = self.retry(&format!("deleting {} objects", keys.len()), || {
            REQUESTS
                .delete
                .fetch_add(keys.len().div_ceil(1000) as u64, Relaxed);
            self.bucket.delete_objects(keys.clone()).inspect_err(|e| {
                if not_implemented(e) {
                    unsupported = Some(explain(e));
                }
            })
        });
        if unsupported.is_some() {
            return Ok(unsupported);
        }
        match done?.errors.iter().find(|e| e.code != "NoSuchKey") {
            Some(e) => bail!(
                "deleting {} ({}): the store refused it: {} {}",
                e.key,
                self.what(),
                e.code,
                e.message
            ),
            None => Ok(None),
        }
    }

    /// Proves the bucket can be listed (a replica following it only reads).
    pub fn check_readable(&self) -> Result<()> {
        self.retry("listing", || {
            REQUESTS.list.fetch_add(1, Relaxed);
            // One page is enough to prove access (rust-s3's `list` follows continuation
            // tokens without looking at `IsTruncated`, which can loop forever).
            self.bucket
                .list_page(
                    format!("{}/", self.prefix),
                    Some("/".into()),
                    None,
                    None,
                    Some(1),
                )
                .map(|_| ())
        })
        .with_context(|| {
            format!(
                "S3 target s3://{}/{} cannot be used",
                self.bucket.name(),
                self.prefix
            )
        })
    }
}

impl Storage for S3Storage {
    fn describe(&self) -> String {
        format!(
            "s3://{}/{} at {}",
            self.bucket.name(),
            self.prefix,
            self.endpoint
        )
    }

    fn check_writable(&self) -> Result<()> {
        // A listing first: a missing bucket is a 404 there (some stores create buckets on PUT).
        self.check_readable()?;
        let probe = format!("{}/.replited-probe", self.prefix);
        self.retry("writing a probe object", || {
            REQUESTS.put.fetch_add(1, Relaxed);
            self.bucket.put_object(&probe, b"ok").map(|_| ())
        })
        .and_then(|_| {
            self.retry("deleting the probe object", || {
                REQUESTS.delete.fetch_add(1, Relaxed);
                self.bucket.delete_object(&probe).map(|_| ())
            })
        })
        .with_context(|| {
            format!(
                "S3 target s3://{}/{} is not writable",
                self.bucket.name(),
                self.prefix
            )
        })?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<FileMeta>> {
        self.list_after(None)
    }

    fn size(&self, meta: &FileMeta) -> Result<u64> {
        let key = self.key(meta);
        let (head, _) = self.retry(&format!("looking up {key}"), || {
            // Billed as a GET.
            REQUESTS.get.fetch_add(1, Relaxed);
            self.bucket.head_object(&key)
        })?;
        Ok(head.content_length.unwrap_or(0).max(0) as u64)
    }

    fn create(&self, meta: &FileMeta) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(S3Writer {
            bucket: self.bucket.clone(),
            what: self.what(),
            key: self.key(meta),
            file: self.temp_file()?,
        }))
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn Read + Send>> {
        Download::start(self.bucket.clone(), self.what(), self.key(meta))
    }

    /// Compaction deletes the files it merged together: up to 1,000 per request
    /// (DeleteObjects), else — a store that does not implement it — one request each.
    fn delete(&self, metas: &[FileMeta]) -> Result<()> {
        if metas.len() > 1 && !self.one_by_one.load(Relaxed) {
            match self.delete_many(metas)? {
                None => return Ok(()),
                Some(why) => {
                    tracing::info!(
                        "{}: multi-object delete not implemented ({why}); deleting one object \
                         per request",
                        self.describe()
                    );
                    self.one_by_one.store(true, Relaxed);
                }
            }
        }
        for m in metas {
            let key = self.key(m);
            match self.retry(&format!("deleting {key}"), || {
                REQUESTS.delete.fetch_add(1, Relaxed);
                self.bucket.delete_object(&key).map(|_| ())
            }) {
                Ok(()) => {}
                Err(e) if e.to_string().contains("HTTP 404") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn locate(&self, meta: &FileMeta) -> String {
        format!("s3://{}/{}", self.bucket.name(), self.key(meta))
    }

    fn put_file(&self, meta: &FileMeta, file: &mut File) -> Result<()> {
        upload(&self.bucket, &self.what(), &self.key(meta), file)
    }
}
