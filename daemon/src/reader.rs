//! Reading stored files back: every byte goes through the core decoder, which checks the
//! layout as it goes and the trailing checksum at the end. Errors name the file.

use std::io::Read;

use anyhow::{anyhow, bail, Context, Result};
use replited_core::format::{Decoder, Event, FileHeader, FILE_HEADER_LEN};
use replited_core::name::FileMeta;

use crate::storage::Storage;

/// Decodes a whole stored file, calling `f` for every event (page data in `Decoder::page`).
/// `f` returning `Ok(false)` does not stop the decoding (the trailer must still be verified);
/// it only stops further calls.
pub fn decode_file(
    storage: &dyn Storage,
    meta: &FileMeta,
    f: impl FnMut(&Event, &Decoder) -> Result<bool>,
) -> Result<()> {
    struct Calls<F>(F);
    impl<F: FnMut(&Event, &Decoder) -> Result<bool>> Reading for Calls<F> {
        fn event(&mut self, ev: &Event, dec: &Decoder) -> Result<bool> {
            (self.0)(ev, dec)
        }
    }
    decode_file_into(storage, meta, &mut Calls(f))
}

/// What reads a stored file's events, and may take page data into buffers of its own.
pub trait Reading {
    /// A page-size buffer to decode page `pgno` (of the transaction last announced) into, or
    /// None to have it in `Decoder::page` as usual. Asked once per page, just before its
    /// `Event::Page`; the buffer then holds the page's data.
    fn place(&mut self, _pgno: u32) -> Result<Option<&mut [u8]>> {
        Ok(None)
    }
    /// Every event, as `decode_file`'s `f`.
    fn event(&mut self, ev: &Event, dec: &Decoder) -> Result<bool>;
}

/// [`decode_file`] for a [`Reading`], which may place pages itself.
pub fn decode_file_into(storage: &dyn Storage, meta: &FileMeta, r: &mut dyn Reading) -> Result<()> {
    decode_opened_into(storage, meta, storage.open(meta)?, r)
}

/// Files opened ahead of their reader at most (see [`open_ahead`]).
const OPEN_AHEAD: usize = 3;

type Opening = std::sync::mpsc::Receiver<Result<Box<dyn Read + Send>>>;

/// The files of [`open_ahead`], in order.
pub struct Opened {
    rx: std::sync::mpsc::Receiver<Opening>,
}

impl Opened {
    /// The next file, or why it could not be opened.
    pub fn take(&mut self) -> Result<Box<dyn Read + Send>> {
        self.rx
            .recv()
            .ok()
            .and_then(|o| o.recv().ok())
            .unwrap_or_else(|| Err(anyhow!("no more files were opened")))
    }
}

/// Runs `f` with `metas` opened ahead, in order, each on a thread of its own, a few at once
/// ([`OPEN_AHEAD`] beyond the one being read): from a remote store the downloads of the next
/// files run while one is decoded, so a restore of many small files waits for one round trip
/// per few files, not per file.
pub fn open_ahead<T>(
    storage: &dyn Storage,
    metas: &[FileMeta],
    f: impl FnOnce(&mut Opened) -> Result<T>,
) -> Result<T> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Opening>(OPEN_AHEAD - 1);
        std::thread::Builder::new()
            .name("open-ahead".into())
            .spawn_scoped(s, move || {
                for m in metas {
                    let (otx, orx) = std::sync::mpsc::channel();
                    // Waits while enough are opened ahead; stops once nothing takes them.
                    if tx.send(orx).is_err() {
                        return;
                    }
                    let opener = std::thread::Builder::new()
                        .name("open".into())
                        .spawn_scoped(s, move || {
                            let _ = otx.send(storage.open(m));
                        });
                    if opener.is_err() {
                        return;
                    }
                }
            })
            .context("starting a thread to open files ahead")?;
        let mut opened = Opened { rx };
        let r = f(&mut opened);
        drop(opened);
        r
    })
}

/// [`decode_file_into`] for a file already opened (`input`).
pub fn decode_opened_into(
    storage: &dyn Storage,
    meta: &FileMeta,
    mut input: Box<dyn Read + Send>,
    r: &mut dyn Reading,
) -> Result<()> {
    let loc = storage.locate(meta);
    let mut dec = Decoder::new();
    // Read buffer: `buf[start..filled]` is read and not yet decoded. Refilled in place: the
    // unread tail moves to the front, then a read fills the rest. It starts at 64 KiB (most
    // stored files are small) and grows to `READ_BUF` once a file needs a second read; zeroed
    // only when it grows.
    let mut buf: Vec<u8> = vec![0; 1 << 16];
    let mut refills = 0;
    let (mut start, mut filled) = (0usize, 0usize);
    let mut eof = false;
    let mut calling = true;
    loop {
        let avail = &buf[start..filled];
        let place = match dec.next_page(avail) {
            Some(pgno) if calling => r.place(pgno).with_context(|| loc.clone())?,
            _ => None,
        };
        let (used, ev) = match place {
            Some(dest) => dec.decode_page_into(avail, dest),
            None => dec.decode(avail),
        }
        .map_err(|e| gone_or(storage, meta, anyhow!("{loc}: {e}")))?;
        start += used;
        match ev {
            Some(ev) => {
                if let Event::Header(h) = &ev {
                    if !meta.matches(h) {
                        bail!("{loc}: the file's header does not match its name");
                    }
                }
                let end = matches!(ev, Event::End);
                if calling {
                    calling = r.event(&ev, &dec).with_context(|| loc.clone())?;
                }
                if end {
                    break;
                }
            }
            None => {
                if eof {
                    let e = match dec.finish() {
                        Err(e) => anyhow!("{loc}: {e}"),
                        Ok(()) => anyhow!("{loc}: truncated"),
                    };
                    return Err(gone_or(storage, meta, e));
                }
                // Refill: keep the unread tail, read at least one more item.
                buf.copy_within(start..filled, 0);
                filled -= start;
                start = 0;
                let want = dec.max_item_len().max(FILE_HEADER_LEN);
                refills += 1;
                let size = if refills > 1 { READ_BUF } else { 0 }.max(filled + want);
                if buf.len() < size {
                    buf.resize(size, 0);
                }
                let n = read_some(&mut input, &mut buf[filled..])
                    .with_context(|| format!("reading {loc}"))?;
                filled += n;
                if n == 0 {
                    eof = true;
                }
            }
        }
    }
    // Nothing may follow the trailer.
    let mut extra = [0u8; 1];
    if start < filled || read_some(&mut input, &mut extra)? > 0 {
        bail!("{loc}: unexpected bytes after the trailer");
    }
    Ok(())
}

/// A file that reads back short or malformed may have been deleted while it was read (a local
/// directory empties deleted files for reuse): then the error says so, as a `NotFound` that
/// readers take as "list again" (`restore::vanished`); else it is `e` unchanged.
fn gone_or(storage: &dyn Storage, meta: &FileMeta, e: anyhow::Error) -> anyhow::Error {
    match storage.size(meta) {
        Err(gone) if crate::restore::vanished(&gone) => anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{e:#}: deleted while it was read"),
        )),
        _ => e,
    }
}

/// Bytes read from a stored file at once (at most).
const READ_BUF: usize = 1 << 20;

fn read_some(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads and checks only a file's header.
pub fn read_header(storage: &dyn Storage, meta: &FileMeta) -> Result<FileHeader> {
    let loc = storage.locate(meta);
    let mut input = storage.open(meta)?;
    let mut b = [0u8; FILE_HEADER_LEN];
    if read_some(&mut input, &mut b).with_context(|| format!("reading {loc}"))? != b.len() {
        return Err(gone_or(storage, meta, anyhow!("{loc}: truncated header")));
    }
    let h = FileHeader::decode(&b).map_err(|e| anyhow!("{loc}: {e}"))?;
    if !meta.matches(&h) {
        bail!("{loc}: the file's header does not match its name");
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::vanished;
    use crate::storage::FsStorage;
    use replited_core::format::Kind;

    /// A malformed file is an error of its own while it is there; once deleted (as when a local
    /// directory empties it for reuse under a reader), the same error reads as "list again".
    #[test]
    fn a_file_deleted_while_read_is_vanished() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStorage::at(dir.path().to_path_buf());
        let meta = FileMeta {
            kind: Kind::Segment,
            generation: 1,
            level: 0,
            first_txid: 5,
            last_txid: 5,
            first_time_ms: 1,
            last_time_ms: 1,
        };
        s.put(&meta, b"short").unwrap();
        let e = read_header(&s, &meta).unwrap_err();
        assert!(!vanished(&e), "{e:#}");
        assert!(format!("{e:#}").contains("truncated header"), "{e:#}");
        s.delete(&[meta]).unwrap();
        let e = gone_or(&s, &meta, e);
        assert!(vanished(&e), "{e:#}");
        assert!(
            format!("{e:#}").contains("deleted while it was read"),
            "{e:#}"
        );
    }
}
