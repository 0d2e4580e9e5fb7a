//! Where backups go: one small trait, one implementation per kind of target.
//!
//! Every target stores a database's files under a directory named after the database file
//! (`ROOT/data.db/`), one subdirectory per generation, with the object names of
//! `replited_core::name`. Writes are atomic (a temporary name, then a rename) and durable (file
//! and directory fsync) before `commit` returns.
//!
//! A local directory recycles the files it deletes, as PostgreSQL recycles WAL segments: a
//! deleted file is emptied and moved to `ROOT/data.db/.recycle/`, and the next file created takes
//! it from there. With one segment file per commit and compaction deleting them as fast, creating
//! a fresh inode for each was the largest cost of capture on ext4 without a journal (the inode
//! allocator skips every inode freed in the last seconds, reading each one's on-disk copy).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use replited_core::name::FileMeta;

/// A file being written to a target; nothing is visible under its final name before `commit`.
pub trait ObjectWriter: Write + Send {
    /// Makes the file durable under its final name.
    fn commit(self: Box<Self>) -> io::Result<()>;
}

/// A backup target holding one database's files.
pub trait Storage: Send + Sync {
    /// How the target is named in messages: `fs:/var/backups/replited/data.db`.
    fn describe(&self) -> String;
    /// Creates what is needed and proves a file can be written, or says why not.
    fn check_writable(&self) -> Result<()>;
    /// Every file of this database, with names parsed; anything else is ignored.
    fn list(&self) -> Result<Vec<FileMeta>>;
    /// Starts writing a file.
    fn create(&self, meta: &FileMeta) -> Result<Box<dyn ObjectWriter>>;
    /// Reads a file.
    fn open(&self, meta: &FileMeta) -> Result<Box<dyn Read + Send>>;
    /// Deletes files (missing ones are not an error).
    fn delete(&self, metas: &[FileMeta]) -> Result<()>;
    /// Where a file lives, for messages.
    fn locate(&self, meta: &FileMeta) -> String;

    /// Stores a whole local file (read from its current position) atomically and durably.
    fn put_file(&self, meta: &FileMeta, file: &mut File) -> Result<()> {
        let mut w = self.create(meta)?;
        io::copy(file, &mut w)
            .map_err(anyhow::Error::from)
            .and_then(|_| w.commit().map_err(anyhow::Error::from))
            .with_context(|| format!("writing {}", self.locate(meta)))
    }

    /// Why this target is degraded right now (a remote store failing while files wait in a
    /// spool), for status output; None when it is fine.
    fn degraded(&self) -> Option<String> {
        None
    }

    /// The stored size of a file in bytes.
    fn size(&self, meta: &FileMeta) -> Result<u64>;

    /// The oldest file written to this target that is not yet stored for good (a spooled
    /// target's oldest upload still waiting); None when everything written is stored.
    fn backlog(&self) -> Option<FileMeta> {
        None
    }

    /// Unix ms of the last upload that completed, for a target that stores asynchronously
    /// (None: it stores synchronously, as each write returns).
    fn last_sync_ms(&self) -> Option<u64> {
        None
    }

    /// Writes a whole file atomically and durably.
    fn put(&self, meta: &FileMeta, data: &[u8]) -> Result<()> {
        let mut w = self.create(meta)?;
        w.write_all(data)
            .and_then(|_| w.commit())
            .with_context(|| format!("writing {}", self.locate(meta)))
    }
}

/// A local directory: `ROOT/NAME/...`.
pub struct FsStorage {
    dir: PathBuf,
    /// Emptied files in `dir/.recycle/`, by number; None until first used.
    recycled: Mutex<Option<Recycled>>,
}

/// The subdirectory of emptied files waiting to be reused.
pub(crate) const RECYCLE: &str = ".recycle";
/// At most this many emptied files wait (empty files: a few MB of inodes and names at most);
/// more deletions than that between creations really delete.
const RECYCLE_MAX: usize = 16384;
/// Only files up to this size are recycled: the small per-commit segments that come and go by
/// the thousand. Larger ones (snapshots, merged segments) may be read for longer.
pub(crate) const RECYCLE_SIZE: u64 = 1 << 20;
/// An emptied file is reused no sooner than this after its deletion, so a reader that opened it
/// just before does not find another file's bytes in it (it finds it emptied, and retries).
pub(crate) const REUSE_AFTER: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Recycled {
    free: VecDeque<(u64, Instant)>,
    next: u64,
}

impl FsStorage {
    /// The target for database `name` under `root`.
    pub fn new(root: &Path, name: &str) -> FsStorage {
        FsStorage::at(root.join(name))
    }

    /// The target at exactly `dir` (used by `restore file:///...`).
    pub fn at(dir: PathBuf) -> FsStorage {
        FsStorage {
            dir,
            recycled: Mutex::new(None),
        }
    }

    fn path(&self, meta: &FileMeta) -> PathBuf {
        self.dir.join(meta.path())
    }

    fn recycle_path(&self, n: u64) -> PathBuf {
        self.dir.join(RECYCLE).join(n.to_string())
    }

    /// Runs `f` on the list of emptied files, first read from the directory (files an earlier
    /// run left there are reused too).
    fn with_recycled<T>(&self, f: impl FnOnce(&mut Recycled) -> T) -> T {
        let mut guard = self.recycled.lock().expect("recycle lock");
        let r = guard.get_or_insert_with(|| {
            let mut r = Recycled::default();
            for e in fs::read_dir(self.dir.join(RECYCLE))
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                    r.free.push_back((n, Instant::now()));
                    r.next = r.next.max(n + 1);
                }
            }
            r
        });
        f(r)
    }

    /// Moves an emptied file to `tmp`, if one waits; false when there is none.
    fn reuse(&self, tmp: &Path) -> bool {
        while let Some(n) = self.with_recycled(|r| match r.free.front() {
            Some(&(n, at)) if at.elapsed() >= REUSE_AFTER => {
                r.free.pop_front();
                Some(n)
            }
            _ => None,
        }) {
            if fs::rename(self.recycle_path(n), tmp).is_ok() {
                return true;
            }
        }
        false
    }

    /// Deletes the file at `p` under this directory: a small one is emptied into the recycled
    /// files (its inode serves a file created later), a large one removed.
    pub fn discard(&self, p: &Path) -> io::Result<()> {
        match self.recycle(p) {
            Ok(true) => Ok(()),
            _ => fs::remove_file(p),
        }
    }

    /// Deletes the file at `p` by emptying it into the recycled files (Ok(false): there is no
    /// room, or it could not be moved; the caller removes it).
    fn recycle(&self, p: &Path) -> io::Result<bool> {
        if fs::metadata(p)?.len() > RECYCLE_SIZE {
            return Ok(false);
        }
        let Some(n) = self.with_recycled(|r| {
            (r.free.len() < RECYCLE_MAX).then(|| {
                r.next += 1;
                r.next - 1
            })
        }) else {
            return Ok(false);
        };
        let dst = self.recycle_path(n);
        match fs::rename(p, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && p.exists() => {
                // No recycle directory yet.
                fs::create_dir_all(self.dir.join(RECYCLE))?;
                fs::rename(p, &dst)?;
            }
            Err(e) => return Err(e),
        }
        // Emptied now, so a deleted backup's bytes do not linger; a crash before this leaves
        // them until the file is reused (opened with truncation).
        if OpenOptions::new()
            .write(true)
            .open(&dst)
            .and_then(|f| f.set_len(0))
            .is_ok()
        {
            self.with_recycled(|r| r.free.push_back((n, Instant::now())));
        } else {
            let _ = fs::remove_file(&dst);
        }
        Ok(true)
    }
}

/// The directory a file is in (`.` for a bare file name).
pub fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// fsyncs a directory so a rename or create in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct FsWriter {
    file: File,
    tmp: PathBuf,
    dst: PathBuf,
    /// Renamed into place: nothing is left under the temporary name.
    renamed: bool,
}

impl Write for FsWriter {
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

impl ObjectWriter for FsWriter {
    fn commit(mut self: Box<Self>) -> io::Result<()> {
        self.file.sync_data()?;
        fs::rename(&self.tmp, &self.dst)?;
        self.renamed = true;
        sync_dir(self.dst.parent().expect("object path has a parent"))
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        // An abandoned or failed write leaves no temporary file behind.
        if !self.renamed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Storage for FsStorage {
    fn describe(&self) -> String {
        format!("fs:{}", self.dir.display())
    }

    fn check_writable(&self) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| {
            format!("backup directory {} cannot be created", self.dir.display())
        })?;
        let probe = self.dir.join(".replited-probe");
        File::create(&probe)
            .and_then(|mut f| f.write_all(b"ok").and_then(|_| f.sync_all()))
            .and_then(|_| fs::remove_file(&probe))
            .with_context(|| format!("backup directory {} is not writable", self.dir.display()))?;
        // Temporary files left by a writer that was killed mid-file: never visible under a
        // final name, so nothing refers to them.
        for g in fs::read_dir(&self.dir)?.flatten() {
            if g.file_type().is_ok_and(|t| t.is_dir()) {
                for f in fs::read_dir(g.path())?.flatten() {
                    if f.file_name().to_string_lossy().ends_with(".tmp") {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
        Ok(())
    }

    fn size(&self, meta: &FileMeta) -> Result<u64> {
        let p = self.path(meta);
        Ok(fs::metadata(&p)
            .with_context(|| format!("{}", p.display()))?
            .len())
    }

    fn list(&self) -> Result<Vec<FileMeta>> {
        let mut out = Vec::new();
        let gens = match fs::read_dir(&self.dir) {
            Ok(g) => g,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        for g in gens {
            let g = g?;
            let gname = g.file_name().to_string_lossy().into_owned();
            if !g.file_type()?.is_dir() || gname.starts_with('.') {
                continue;
            }
            for f in
                fs::read_dir(g.path()).with_context(|| format!("listing {}", g.path().display()))?
            {
                let f = f?;
                let rel = format!("{gname}/{}", f.file_name().to_string_lossy());
                if let Some(meta) = FileMeta::parse_path(&rel) {
                    out.push(meta);
                }
            }
        }
        Ok(out)
    }

    fn create(&self, meta: &FileMeta) -> Result<Box<dyn ObjectWriter>> {
        let dst = self.path(meta);
        let parent = dst
            .parent()
            .expect("object path has a parent")
            .to_path_buf();
        if !parent.exists() {
            fs::create_dir_all(&parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            sync_dir(&self.dir).with_context(|| format!("syncing {}", self.dir.display()))?;
        }
        let tmp = dst.with_extension("tmp");
        self.reuse(&tmp);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Box::new(FsWriter {
            file,
            tmp,
            dst,
            renamed: false,
        }))
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn Read + Send>> {
        let p = self.path(meta);
        let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
    }

    fn delete(&self, metas: &[FileMeta]) -> Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for m in metas {
            let p = self.path(m);
            match self.discard(&p) {
                Ok(()) => {
                    dirs.insert(p.parent().expect("object path has a parent").to_path_buf());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {}", p.display())),
            }
        }
        for d in dirs {
            // An emptied generation directory goes too.
            if fs::remove_dir(&d).is_ok() {
                let _ = sync_dir(&self.dir);
            } else {
                let _ = sync_dir(&d);
            }
        }
        Ok(())
    }

    fn locate(&self, meta: &FileMeta) -> String {
        self.path(meta).display().to_string()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use replited_core::format::Kind;
    use std::os::unix::fs::MetadataExt;

    /// A level-0 segment of transaction `txid` (its times `txid` too).
    pub(crate) fn seg(txid: u64) -> FileMeta {
        FileMeta {
            kind: Kind::Segment,
            generation: 1,
            level: 0,
            first_txid: txid,
            last_txid: txid,
            first_time_ms: txid,
            last_time_ms: txid,
        }
    }

    /// The emptied files waiting in `dir/.recycle/`: (inode, length) each.
    pub(crate) fn recycled(dir: &Path) -> Vec<(u64, u64)> {
        fs::read_dir(dir.join(RECYCLE))
            .unwrap()
            .map(|e| {
                let m = e.unwrap().metadata().unwrap();
                (m.ino(), m.len())
            })
            .collect()
    }

    /// A deleted small file is emptied into `.recycle`, unlisted, and its inode serves the next
    /// file created once it has waited; a file too large to recycle is really deleted.
    #[test]
    fn deleted_files_are_emptied_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStorage::at(dir.path().join("data.db"));
        s.check_writable().unwrap();
        s.put(&seg(1), b"first segment").unwrap();
        s.put(&seg(2), &vec![7u8; (RECYCLE_SIZE + 1) as usize])
            .unwrap();
        let ino = fs::metadata(s.path(&seg(1))).unwrap().ino();
        s.delete(&[seg(1), seg(2)]).unwrap();
        assert!(s.list().unwrap().is_empty());
        let waiting = recycled(&dir.path().join("data.db"));
        assert_eq!(waiting.len(), 1, "only the small file is kept");
        assert_eq!(waiting[0], (ino, 0));
        // Too soon: a fresh file.
        s.put(&seg(3), b"third").unwrap();
        assert_ne!(fs::metadata(s.path(&seg(3))).unwrap().ino(), ino);
        std::thread::sleep(REUSE_AFTER + Duration::from_millis(100));
        s.put(&seg(4), b"fourth").unwrap();
        let p4 = s.path(&seg(4));
        assert_eq!(fs::metadata(&p4).unwrap().ino(), ino);
        assert_eq!(fs::read(&p4).unwrap(), b"fourth");
        let listed: Vec<u64> = s.list().unwrap().iter().map(|m| m.first_txid).collect();
        assert_eq!(listed.len(), 2);
        assert!(listed.contains(&3) && listed.contains(&4));
        // A second storage on the same directory (a restart) finds the waiting files.
        s.delete(&[seg(3)]).unwrap();
        let again = FsStorage::at(dir.path().join("data.db"));
        assert_eq!(again.with_recycled(|r| r.free.len()), 1);
    }
}
