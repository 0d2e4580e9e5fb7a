//! Reading the `-wal` file: io_uring (a ring per file, on the capture thread) or plain `pread`.
//!
//! The backend is chosen once at start-up: `auto` tries io_uring and falls back to `pread` when
//! the kernel or a seccomp profile refuses it (logged once); `uring` and `pread` force one
//! (`--io` or `REPLITED_IO`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

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
    /// io_uring.
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

/// Sets up a ring and runs one no-op through it (a seccomp profile may allow the set-up and
/// refuse `io_uring_enter`).
fn probe_uring() -> io::Result<()> {
    let mut ring = io_uring::IoUring::new(2)?;
    let nop = io_uring::opcode::Nop::new().build();
    // SAFETY: a no-op refers to no memory.
    unsafe { ring.submission().push(&nop) }.map_err(io::Error::other)?;
    ring.submit_and_wait(1)?;
    let c = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("io_uring: no completion for a no-op"))?;
    if c.result() < 0 {
        return Err(io::Error::from_raw_os_error(-c.result()));
    }
    Ok(())
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
        Resolved::Pread => Ok(Box::new(PreadFile(open_noatime(path)?))),
        Resolved::Uring => Ok(Box::new(UringFile::open(path)?)),
    }
}

/// Opens `path` for reading without updating its access time where the kernel allows it (the
/// file's owner or CAP_FOWNER): the WAL and `-shm` are read after every commit and modified
/// between reads, so with `relatime` each read would otherwise dirty the inode again.
pub fn open_noatime(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        r => r,
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

/// Reads in flight at once at most (the ring's size).
const RING_ENTRIES: u32 = 64;

/// A WAL file read through an io_uring of its own, on the calling thread: a batch of reads is
/// submitted with one `io_uring_enter` that also waits for them all. (An earlier version ran
/// tokio-uring on a thread of its own; handing each read over to it and back cost two thread
/// wake-ups, three times the CPU of `pread` at 1,000 transactions/s — docs/BENCHMARKS.md.)
struct UringFile {
    ring: io_uring::IoUring,
    file: File,
}

impl UringFile {
    fn open(path: &Path) -> io::Result<UringFile> {
        Ok(UringFile {
            ring: io_uring::IoUring::new(RING_ENTRIES)?,
            file: open_noatime(path)?,
        })
    }

    /// Reads into each `(buffer, offset)` once (one read each, possibly short) and returns
    /// the byte counts. Every read has completed when this returns, error or not: the kernel
    /// writes into the buffers only meanwhile.
    fn read_once(&mut self, reqs: &mut [(&mut [u8], u64)]) -> io::Result<Vec<usize>> {
        use std::os::fd::AsRawFd;
        let fd = io_uring::types::Fd(self.file.as_raw_fd());
        let mut done = vec![0usize; reqs.len()];
        let mut first_err = None;
        for (base, chunk) in reqs.chunks_mut(RING_ENTRIES as usize).enumerate() {
            let base = base * RING_ENTRIES as usize;
            {
                let mut sq = self.ring.submission();
                for (i, (buf, off)) in chunk.iter_mut().enumerate() {
                    let len = u32::try_from(buf.len()).map_err(io::Error::other)?;
                    let e = io_uring::opcode::Read::new(fd, buf.as_mut_ptr(), len)
                        .offset(*off)
                        .build()
                        .user_data((base + i) as u64);
                    // SAFETY: the buffer outlives the read: every submitted read is reaped
                    // below before this function returns or the buffer is touched again.
                    unsafe { sq.push(&e) }.expect("the ring has room for a chunk");
                }
            }
            let mut left = chunk.len();
            while left > 0 {
                match self.ring.submit_and_wait(left) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Reads may be in flight into the caller's buffers: returning now would
                    // let the kernel write into freed memory.
                    Err(e) => panic!("io_uring: waiting for reads in flight failed: {e}"),
                }
                for c in self.ring.completion() {
                    let i = c.user_data() as usize;
                    match usize::try_from(c.result()) {
                        Ok(n) => done[i] = n,
                        Err(_) => {
                            first_err =
                                first_err.or(Some(io::Error::from_raw_os_error(-c.result())))
                        }
                    }
                    left -= 1;
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Completes a read cut short (not at the end of the file: a read may return fewer bytes
    /// than asked) with `pread`.
    fn finish(&self, buf: &mut [u8], offset: u64, got: usize) -> io::Result<usize> {
        if got == 0 || got == buf.len() {
            return Ok(got);
        }
        Ok(got + fill_at(&self.file, &mut buf[got..], offset + got as u64)?)
    }
}

impl WalFile for UringFile {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let got = self.read_once(&mut [(&mut *buf, offset)])?[0];
        self.finish(buf, offset, got)
    }

    fn read_many(&mut self, offsets: &[u64], len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        out.resize(offsets.len() * len, 0);
        let mut reqs: Vec<(&mut [u8], u64)> =
            out.chunks_mut(len).zip(offsets.iter().copied()).collect();
        let got = self.read_once(&mut reqs)?;
        for ((buf, off), n) in reqs.into_iter().zip(got) {
            if self.finish(buf, off, n)? != len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both backends read the same bytes: single reads (short at the end of the file), and
    /// batches larger than the ring.
    #[test]
    fn backends_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mut backends = vec![open(Resolved::Pread, &path).unwrap()];
        match IoBackend::Auto.resolve().unwrap() {
            Resolved::Uring => backends.push(open(Resolved::Uring, &path).unwrap()),
            Resolved::Pread => eprintln!("io_uring unavailable here: pread only"),
        }
        let offsets: Vec<u64> = (0..200u64).map(|i| (i * 4_999) % 990_000).collect();
        for f in &mut backends {
            let mut buf = vec![0u8; 4096];
            assert_eq!(f.read_at(&mut buf, 12_345).unwrap(), 4096);
            assert_eq!(buf, data[12_345..12_345 + 4096]);
            assert_eq!(f.read_at(&mut buf, 1_000_000).unwrap(), 3);
            assert_eq!(buf[..3], data[1_000_000..]);
            assert_eq!(f.read_at(&mut buf, 2_000_000).unwrap(), 0);
            let mut out = Vec::new();
            f.read_many(&offsets, 4096, &mut out).unwrap();
            for (i, &o) in offsets.iter().enumerate() {
                assert_eq!(
                    out[i * 4096..(i + 1) * 4096],
                    data[o as usize..o as usize + 4096]
                );
            }
            let err = f.read_many(&[999_000], 4096, &mut out).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
    }
}
