//! A TLS front for the S3 server: accepts TLS on a free 127.0.0.1 port with a certificate made
//! by `replited cert` and forwards the decrypted bytes to a plain-HTTP upstream (s3s-fs speaks
//! plain HTTP only), as a load balancer in front of MinIO or an S3 gateway does. Declared from
//! a test file with `#[path = "common/tls_front.rs"] mod tls_front;`.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct TlsFront {
    /// `https://127.0.0.1:PORT`
    pub endpoint: String,
    handshakes: Arc<AtomicU64>,
}

impl TlsFront {
    /// Serves `cert`/`key` (PEM files) on a free port, forwarding to `upstream` (HOST:PORT).
    pub fn start(cert: &Path, key: &Path, upstream: &str) -> TlsFront {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("https://{}", listener.local_addr().unwrap());
        let handshakes = Arc::new(AtomicU64::new(0));
        let (n, upstream) = (handshakes.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let (config, upstream, n) = (config.clone(), upstream.clone(), n.clone());
                std::thread::spawn(move || {
                    let _ = relay(c, config, &upstream, &n);
                });
            }
        });
        TlsFront {
            endpoint,
            handshakes,
        }
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

/// Shuttles one connection's bytes both ways until either side closes it.
fn relay(
    c: TcpStream,
    config: Arc<rustls::ServerConfig>,
    upstream: &str,
    handshakes: &AtomicU64,
) -> std::io::Result<()> {
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, c);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    handshakes.fetch_add(1, Ordering::Relaxed);
    let mut up = TcpStream::connect(upstream)?;
    tls.sock.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let tick = Some(Duration::from_millis(2));
    tls.sock.set_read_timeout(tick)?;
    up.set_read_timeout(tick)?;
    let mut buf = vec![0u8; 64 << 10];
    let quiet =
        |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => up.write_all(&buf[..n])?,
            Err(e) if quiet(&e) => {}
            Err(e) => return Err(e),
        }
        match up.read(&mut buf) {
            Ok(0) => {
                tls.conn.send_close_notify();
                let _ = tls.flush();
                return Ok(());
            }
            Ok(n) => {
                tls.write_all(&buf[..n])?;
                tls.flush()?;
            }
            Err(e) if quiet(&e) => {}
            Err(e) => return Err(e),
        }
    }
}
