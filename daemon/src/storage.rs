//! Where backups go: one small trait, one implementation per kind of target.
//!
//! Every target stores a database's files under a directory named after the database file
//! (`ROOT/data.db/`), one subdirectory per generation, with the object names of
//! `replited_core::name`. Writes are atomic (a temporary name, then a rename) and durable (file
//! and directory fsync) before `commit` returns.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

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
}

impl FsStorage {
    /// The target for database `name` under `root`.
    pub fn new(root: &Path, name: &str) -> FsStorage {
        FsStorage {
            dir: root.join(name),
        }
    }

    /// The target at exactly `dir` (used by `restore file:///...`).
    pub fn at(dir: PathBuf) -> FsStorage {
        FsStorage { dir }
    }

    fn path(&self, meta: &FileMeta) -> PathBuf {
        self.dir.join(meta.path())
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
    fn commit(self: Box<Self>) -> io::Result<()> {
        self.file.sync_data()?;
        fs::rename(&self.tmp, &self.dst)?;
        sync_dir(self.dst.parent().expect("object path has a parent"))
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        // After a successful commit the temporary name no longer exists.
        let _ = fs::remove_file(&self.tmp);
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
            if !g.file_type()?.is_dir() {
                continue;
            }
            let gname = g.file_name().to_string_lossy().into_owned();
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
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Box::new(FsWriter { file, tmp, dst }))
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
            match fs::remove_file(&p) {
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
