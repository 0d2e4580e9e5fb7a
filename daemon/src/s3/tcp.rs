//! The TCP connections of the S3 client ([`super::agent`]): as ureq's own, except that every
//! read first asks the kernel to acknowledge what arrives at once (`TCP_QUICKACK`).
//!
//! On a connection kept open between requests Linux delays its ACKs (up to 40 ms: it expects
//! to send something the ACK can ride on). A server that writes an answer's head and its body
//! separately with Nagle's algorithm on — s3s-fs does — holds the body until the head is
//! acknowledged, so each small GET on a kept-open connection waited for the delayed ACK: a
//! restore of 300 small files took 3.5 s instead of 0.16 s with a new connection per file,
//! whose first segments are acknowledged at once (0.11 s now; `scripts/restore-far --direct`).
//! `TCP_QUICKACK` is not sticky (the kernel goes back to delaying as the exchange goes on),
//! hence once per read.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};
use ureq::Timeout;

/// Opens the TCP connection (in place of ureq's `TcpConnector`, which keeps its socket to
/// itself). A connection made by an earlier connector of the chain (a proxy's) passes through
/// as it is.
#[derive(Debug, Default)]
pub(super) struct QuickAckConnector;

impl<In: Transport> Connector<In> for QuickAckConnector {
    type Out = Either<In, QuickAck>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if chained.is_some() {
            return Ok(chained.map(Either::A));
        }
        let timeout = details.timeout.not_zero().map(|t| *t);
        let mut last = None;
        for addr in details.addrs.iter() {
            let tried = match timeout {
                Some(t) => TcpStream::connect_timeout(addr, t),
                None => TcpStream::connect(addr),
            };
            match tried {
                Ok(stream) => {
                    if details.config.no_delay() {
                        stream.set_nodelay(true)?;
                    }
                    let stream = Arc::new(stream);
                    (details.register_shutdown)(
                        Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>
                    )?;
                    let buffers = LazyBuffers::new(
                        details.config.input_buffer_size(),
                        details.config.output_buffer_size(),
                    );
                    return Ok(Some(Either::B(QuickAck {
                        stream,
                        buffers,
                        read_timeout: None,
                        write_timeout: None,
                    })));
                }
                Err(e) if timed_out(&e) => {
                    last = Some(ureq::Error::Timeout(details.timeout.reason))
                }
                Err(e) => last = Some(e.into()),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the host has no address").into()
        }))
    }
}

/// A TCP connection that acknowledges at once what it reads ([module docs](self)).
pub(super) struct QuickAck {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl std::fmt::Debug for QuickAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuickAck")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

/// The time this step has left, or its timeout error when none.
fn left(timeout: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if timeout.after.is_zero() {
        return Err(ureq::Error::Timeout(timeout.reason));
    }
    Ok(timeout.not_zero().map(|t| *t))
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// An I/O error of a step as ureq reports it: its timeout by the step's name.
fn step_error(e: io::Error, reason: Timeout) -> ureq::Error {
    if timed_out(&e) {
        ureq::Error::Timeout(reason)
    } else {
        e.into()
    }
}

impl Transport for QuickAck {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let t = left(timeout)?;
        if t != self.write_timeout {
            self.stream.set_write_timeout(t)?;
            self.write_timeout = t;
        }
        (&*self.stream)
            .write_all(&self.buffers.output()[..amount])
            .map_err(|e| step_error(e, timeout.reason))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let t = left(timeout)?;
        if t != self.read_timeout {
            self.stream.set_read_timeout(t)?;
            self.read_timeout = t;
        }
        quick_ack(&self.stream);
        let n = loop {
            match (&*self.stream).read(self.buffers.input_append_buf()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| step_error(e, timeout.reason))?,
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    /// Whether a kept-open connection can take the next request: nothing to read on it yet
    /// (the server has neither closed it nor sent anything unasked).
    fn is_open(&mut self) -> bool {
        let mut byte = [0];
        let open = self.stream.set_nonblocking(true).is_ok()
            && matches!(self.stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        open && self.stream.set_nonblocking(false).is_ok()
    }
}

/// Asks the kernel to acknowledge at once what arrives next on `stream`. An error leaves the
/// kernel's usual delayed ACKs: slower, never wrong.
fn quick_ack(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
