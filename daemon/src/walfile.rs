//! Reading the `-wal` file: io_uring (tokio-uring on its own thread) or plain `pread`.
//!
//! The backend is chosen once at start-up: `auto` tries io_uring and falls back to `pread` when
//! the kernel or a seccomp profile refuses it (logged once); `uring` and `pread` force one
//! (`--io` or `REPLITED_IO`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;

/// Which implementation reads the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoBackend {
    /// io_uring when it can be set up, else pread.
    Auto,
    /// io_uring only; start-up fails if it cannot be set up.
    Uring,
    /// Plain pread(2).
    Pread,
}

/// The backend actually in use (never `Auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// tokio-uring.
    Uring,
    /// pread(2).
    Pread,
}

impl Resolved {
    /// For logs.
    pub fn name(self) -> &'static str {
        match self {
            Resolved::Uring => "io_uring",
            Resolved::Pread => "pread",
        }
    }
}

impl IoBackend {
    /// Decides once: probes io_uring for `Auto`.
    pub fn resolve(self) -> io::Result<Resolved> {
        match self {
            IoBackend::Pread => Ok(Resolved::Pread),
            IoBackend::Uring => {
                probe_uring()?;
                Ok(Resolved::Uring)
            }
            IoBackend::Auto => match probe_uring() {
                Ok(()) => Ok(Resolved::Uring),
                Err(e) => {
                    tracing::warn!(
                        "io_uring is unavailable ({e}); reading the WAL with pread instead"
                    );
                    Ok(Resolved::Pread)
                }
            },
        }
    }
}

fn probe_uring() -> io::Result<()> {
    std::thread::Builder::new()
        .name("uring-probe".into())
        .spawn(|| tokio_uring::Runtime::new(&tokio_uring::builder()).map(drop))
        .map_err(io::Error::other)?
        .join()
        .map_err(|_| io::Error::other("io_uring probe panicked"))?
}

/// An open WAL file.
pub trait WalFile: Send {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads `len` bytes at each offset, concatenated into `out` (cleared first), as one batch.
    /// Fails with `UnexpectedEof` if any read comes back short.
    fn read_many(&mut self, offsets: &[u64], len: usize, out: &mut Vec<u8>) -> io::Result<()>;
}

/// Opens `path` with the chosen backend.
pub fn open(backend: Resolved, path: &Path) -> io::Result<Box<dyn WalFile>> {
    match backend {
        Resolved::Pread => Ok(Box::new(PreadFile(File::open(path)?))),
        Resolved::Uring => Ok(Box::new(UringFile::open(path)?)),
    }
}

struct PreadFile(File);

fn fill_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl WalFile for PreadFile {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        fill_at(&self.0, buf, offset)
    }

    fn read_many(&mut self, offsets: &[u64], len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        out.resize(offsets.len() * len, 0);
        for (i, &off) in offsets.iter().enumerate() {
            if fill_at(&self.0, &mut out[i * len..(i + 1) * len], off)? != len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
}

enum Req {
    Read {
        offsets: Vec<u64>,
        len: usize,
        reply: mpsc::SyncSender<io::Result<Vec<Vec<u8>>>>,
    },
}

/// A WAL file read by a tokio-uring runtime on its own thread; a batch of reads is submitted
/// together and completes together.
struct UringFile {
    tx: Option<mpsc::Sender<Req>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UringFile {
    fn open(path: &Path) -> io::Result<UringFile> {
        let (tx, rx) = mpsc::channel::<Req>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("wal-uring".into())
            .spawn(move || {
                let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let file = match tokio_uring::fs::File::open(&path).await {
                        Ok(f) => std::rc::Rc::new(f),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    // Blocking on the channel is fine: this runtime serves this file only, and
                    // no operation is in flight while it waits.
                    while let Ok(Req::Read {
                        offsets,
                        len,
                        reply,
                    }) = rx.recv()
                    {
                        let handles: Vec<_> = offsets
                            .into_iter()
                            .map(|off| {
                                let file = file.clone();
                                tokio_uring::spawn(async move { read_full(&file, off, len).await })
                            })
                            .collect();
                        let mut bufs = Vec::with_capacity(handles.len());
                        let mut err = None;
                        for h in handles {
                            match h.await {
                                Ok(Ok(b)) => bufs.push(b),
                                Ok(Err(e)) => err = err.or(Some(e)),
                                Err(e) => err = err.or(Some(io::Error::other(e))),
                            }
                        }
                        let _ = reply.send(match err {
                            Some(e) => Err(e),
                            None => Ok(bufs),
                        });
                    }
                });
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("io_uring thread exited"))??;
        Ok(UringFile {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn call(&self, offsets: Vec<u64>, len: usize) -> io::Result<Vec<Vec<u8>>> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .as_ref()
            .expect("open until dropped")
            .send(Req::Read {
                offsets,
                len,
                reply,
            })
            .map_err(|_| io::Error::other("io_uring thread exited"))?;
        rx.recv()
            .map_err(|_| io::Error::other("io_uring thread exited"))?
    }
}

/// Reads up to `len` bytes at `off`, short only at end of file.
async fn read_full(file: &tokio_uring::fs::File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let want = len - out.len();
        let buf = vec![0u8; want];
        let (res, buf) = file.read_at(buf, off + out.len() as u64).await;
        let n = res?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

impl WalFile for UringFile {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut r = self.call(vec![offset], buf.len())?;
        let data = r.pop().unwrap_or_default();
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }

    fn read_many(&mut self, offsets: &[u64], len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        out.reserve(offsets.len() * len);
        for b in self.call(offsets.to_vec(), len)? {
            if b.len() != len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            out.extend_from_slice(&b);
        }
        Ok(())
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
